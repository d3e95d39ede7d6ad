//! Failover under a real two-node Pacemaker + Corosync cluster (`tandem_tests::pacemaker`):
//! the promotable `ocf:tandem:tandem` clone, `ocf:heartbeat:Filesystem` on the stable path
//! `/dev/tandem/mail` and a service (`ocf:heartbeat:Dummy`) in a group colocated with the
//! Promoted instance and ordered after the promotion.
//!
//! - `crash_of_the_promoted_node_fails_over_and_it_rejoins`: under a write load whose
//!   acknowledged writes (fsync'ed files) are logged here, outside the cluster, the Promoted
//!   node is crashed (its namespaces killed). The survivor is promoted, the filesystem
//!   mounted and the service started on it; no acknowledged write is missing and fsck is
//!   clean. The crashed node boots again, rejoins as Unpromoted with a delta resync, and
//!   the images end equal. The promotion put a constraint against promoting the lost node
//!   (`tandem-fence-peer`), lifted once it has resynced. The time to each step is printed
//!   (`--nocapture`).
//! - `partition_fences_one_node_and_never_makes_two_primaries`: STONITH on (the lab's
//!   fence agent and host-side broker, `priority-fencing-delay`); the standby's link is cut
//!   under the load: exactly one node is fenced — the one without the Promoted instance —
//!   the agents are never both primary, the primary goes on acknowledging writes, none is
//!   lost; the fenced node boots, rejoins Unpromoted, resyncs, and the images end equal.
//! - `switchover_moves_zero_bytes_and_a_killed_agent_is_taken_over_in_place`: moving the
//!   service group moves the Promoted role with it and resyncs nothing; then after `kill
//!   -9` of the agent under the Promoted instance the next monitor starts a new agent,
//!   which takes the device over: no failure (fail-count 0), the service stays, and the
//!   mounted filesystem takes writes again.
//!
//! Settings: corosync token 1000 ms (consensus 1200 ms), `dc-deadtime` 5 s, stonith off
//! except in the partition test; Tandem's own peer timeout is 20 s (5 s in the partition
//! test), so a promotion that waited for it would show.
//! Needs root, FUSE, loop devices, network namespaces and the Pacemaker packages; fails
//! with the reason without them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_tests::pacemaker::{
    node_online, service_group_xml, PacemakerLab, PacemakerOptions, CLONE, CONSTRAINTS_XML, NODES,
};
use tandem_tests::*;

const TOKEN_MS: u32 = 1000;
const TANDEM_TIMEOUT: Duration = Duration::from_secs(20);
/// Acknowledged writes before the crash.
const WRITES_BEFORE_CRASH: usize = 150;

fn other(node: &str) -> &'static str {
    if node == NODES[0] {
        NODES[1]
    } else {
        NODES[0]
    }
}

fn lab() -> PacemakerLab {
    lab_with(PacemakerOptions { token_ms: TOKEN_MS, tandem_timeout: TANDEM_TIMEOUT, fencing: false })
}

fn lab_with(opts: PacemakerOptions) -> PacemakerLab {
    require_real_devices();
    require_netns();
    require_pacemaker();
    let mut lab = PacemakerLab::new(&lab_parent(), &tandem_bin(), &opts).expect("create the cluster");
    if std::env::var_os("TANDEM_KEEP_LAB").is_some_and(|v| v != "0") {
        println!("keeping lab directory {}", lab.dir.display());
        lab.keep(true);
    }
    lab
}

fn in_sync(r: &tandem_agent::status::ResourceStatus) -> bool {
    r.disk == "up_to_date"
        && r.peers.iter().all(|p| {
            p.connection == "connected"
                && p.out_of_sync_bytes == 0
                && p.peer_disk == Some(tandem_agent::status::DiskState::UpToDate)
        })
}

/// `node` holds the Promoted instance, as `viewer` sees it, and its agent is primary (the
/// cluster shows a promotion in flight as Promoted already).
fn promoted_on(lab: &PacemakerLab, viewer: &str, node: &str) -> bool {
    lab.promoted(viewer).as_deref() == Some(node)
        && lab.tandem.resource_status(node).is_ok_and(|r| r.role == "primary" && r.device.is_some())
}

/// The load: one fsync'ed file per record in a directory of the mounted filesystem; a
/// record is acknowledged when the writer prints its number, which this process logs —
/// outside the cluster. It stops when its node dies or when asked ([`Writer::finish`]).
struct Writer {
    child: std::process::Child,
    reader: Option<std::thread::JoinHandle<()>>,
    acked: Arc<Mutex<Vec<u64>>>,
    stop_file: PathBuf,
}

impl Writer {
    fn start(lab: &PacemakerLab, node: &str, dir: &std::path::Path) -> Writer {
        let stop_file = lab.dir.join("stop-writer");
        let script = format!(
            "mkdir -p {d} && sync -f {d} && i=0; while [ ! -e {stop} ]; do i=$((i+1)); \
             printf 'record %s\\n' $i | dd of={d}/r$i conv=fsync status=none || exit 1; echo $i; done",
            d = dir.display(),
            stop = stop_file.display()
        );
        let mut cmd = lab.command(node, "sh").unwrap();
        let mut child =
            cmd.args(["-c", &script]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
        let reader = {
            let acked = acked.clone();
            let out = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(n) = line.trim().parse() {
                        acked.lock().unwrap().push(n);
                    }
                }
            })
        };
        Writer { child, reader: Some(reader), acked, stop_file }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn wait_for(&self, lab: &PacemakerLab, n: usize) {
        lab.wait(&format!("{n} acknowledged writes"), Duration::from_secs(120), |_| {
            (self.count() >= n).then_some(())
        })
        .unwrap();
    }

    /// Stops the writer (if its node still runs) and returns the acknowledged records.
    fn finish(mut self) -> Vec<u64> {
        let _ = std::fs::write(&self.stop_file, b"");
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop_file, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The records of `acked` missing (or wrong) on `node`'s mounted filesystem.
fn missing_records(lab: &PacemakerLab, node: &str, dir: &std::path::Path, acked: &[u64]) -> Vec<u64> {
    acked
        .iter()
        .copied()
        .filter(|n| {
            let path = dir.join(format!("r{n}"));
            !matches!(lab.x(node, &["cat", &path.to_string_lossy()]),
                Ok(o) if String::from_utf8_lossy(&o.stdout) == format!("record {n}\n"))
        })
        .collect()
}

fn running_on(lab: &PacemakerLab, viewer: &str, resource: &str) -> Option<String> {
    lab.locate(viewer, resource).into_iter().next().map(|(n, _)| n)
}

/// Boots both nodes, waits for the clone (one Promoted, one Unpromoted), makes ext4 on the
/// Promoted node's stable path and adds the service group and its constraints. Returns the
/// Promoted node and the mount point.
fn cluster_with_service(lab: &mut PacemakerLab) -> (String, PathBuf) {
    let t = Instant::now();
    for n in NODES {
        lab.start(n).unwrap();
    }
    lab.wait("the cluster formed", Duration::from_secs(60), |l| l.formed(NODES[0]).then_some(())).unwrap();
    lab.note(&format!("cluster formed after {:.1}s", t.elapsed().as_secs_f64()));
    let primary = lab
        .wait("one Promoted and one Unpromoted instance", Duration::from_secs(60), |l| {
            let p = l.promoted(NODES[0])?;
            (l.locate(NODES[0], CLONE).len() == 2 && promoted_on(l, NODES[0], &p)).then_some(p)
        })
        .unwrap();
    lab.note(&format!("{primary} Promoted after {:.1}s", t.elapsed().as_secs_f64()));
    lab.x_ok(
        &primary,
        &[
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            "/dev/tandem/mail",
        ],
    )
    .unwrap();
    lab.wait("the standby in sync", Duration::from_secs(60), |l| {
        l.tandem.resource_status(&primary).ok().filter(in_sync)
    })
    .unwrap();
    let mnt = lab.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    lab.cib_create(&primary, "resources", &service_group_xml(&mnt)).unwrap();
    lab.cib_create(&primary, "constraints", CONSTRAINTS_XML).unwrap();
    service_up_on(lab, &primary);
    lab.note(&format!("filesystem and service up on {primary} after {:.1}s", t.elapsed().as_secs_f64()));
    (primary, mnt)
}

fn service_up_on(lab: &PacemakerLab, node: &str) {
    lab.wait(&format!("the service up on {node}"), Duration::from_secs(90), |l| {
        (running_on(l, node, "mail-daemon")? == node && promoted_on(l, node, node)).then_some(())
    })
    .unwrap();
}

#[test]
fn crash_of_the_promoted_node_fails_over_and_it_rejoins() {
    let mut lab = lab();
    let (primary, mnt) = cluster_with_service(&mut lab);
    let survivor = other(&primary);

    // The load: one fsync'ed file per record; a record is acknowledged when the writer
    // prints its number, which this process logs.
    let dir = mnt.join("acked");
    let writer = Writer::start(&lab, &primary, &dir);
    writer.wait_for(&lab, WRITES_BEFORE_CRASH);

    // The crash.
    let crash = Instant::now();
    lab.crash(&primary).unwrap();
    let acked = writer.finish();
    lab.note(&format!("crashed {primary} with {} writes acknowledged", acked.len()));

    let step = |what: &str| {
        let s = crash.elapsed().as_secs_f64();
        lab.note(&format!("crash + {s:5.2}s  {what}"));
        s
    };
    lab.wait("the crashed node lost", Duration::from_secs(60), |l| {
        (node_online(&l.crm_mon(survivor).ok()?, &primary) == Some(false)).then_some(())
    })
    .unwrap();
    let lost = step(&format!("{primary} lost (corosync membership)"));
    lab.wait("the survivor Promoted", Duration::from_secs(60), |l| {
        promoted_on(l, survivor, survivor).then_some(())
    })
    .unwrap();
    let promoted = step(&format!("{survivor} Promoted"));
    lab.wait("the filesystem mounted on the survivor", Duration::from_secs(60), |l| {
        (running_on(l, survivor, "mail-fs")? == survivor).then_some(())
    })
    .unwrap();
    step(&format!("filesystem mounted on {survivor}"));
    lab.wait("the service up on the survivor", Duration::from_secs(60), |l| {
        (running_on(l, survivor, "mail-daemon")? == survivor).then_some(())
    })
    .unwrap();
    step(&format!("service up on {survivor}"));
    lab.note(&format!(
        "lost -> Promoted: {:.2}s (token {TOKEN_MS} ms; Tandem peer timeout {TANDEM_TIMEOUT:?})",
        promoted - lost
    ));
    // The promotion did not wait for Tandem's peer timeout: the OCF agent told the agent
    // the peer was lost (the timeout is far longer than the cluster's detection).
    assert!(
        lab.agent_log(survivor).contains("the cluster manager reports the peer down"),
        "the survivor's session with the dead node was not closed on the cluster's word:\n{}",
        lab.node_log(survivor)
    );

    // The survivor's promotion fenced the lost node from promotion in the CIB.
    assert!(
        lab.fenced_from_promotion(survivor, &primary).unwrap(),
        "no constraint against promoting {primary}:\n{}",
        lab.agent_log(survivor)
    );

    // Every acknowledged record is on the survivor's filesystem.
    let missing = missing_records(&lab, survivor, &dir, &acked);
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?} of {}", acked.len());

    // fsck, with the filesystem unmounted by the cluster (the group stopped).
    lab.x_ok(
        survivor,
        &["crm_resource", "-r", "mail-service", "--meta", "-p", "target-role", "-v", "Stopped"],
    )
    .unwrap();
    lab.wait("the filesystem unmounted", Duration::from_secs(60), |l| {
        running_on(l, survivor, "mail-fs").is_none().then_some(())
    })
    .unwrap();
    let device = lab.tandem.resource_status(survivor).unwrap().device.expect("the survivor is primary");
    e2fsck_clean(&device).unwrap_or_else(|e| panic!("{e}"));

    // The crashed node boots again and rejoins as Unpromoted, with a delta resync.
    let sent_before = resync_bytes_sent_pcmk(&lab, survivor);
    lab.start(&primary).unwrap();
    lab.wait("the old primary Unpromoted", Duration::from_secs(90), |l| {
        let inst = l.locate(survivor, CLONE);
        (inst.len() == 2 && promoted_on(l, survivor, survivor)).then_some(())
    })
    .unwrap();
    let st = lab
        .wait("the rejoined node in sync", Duration::from_secs(90), |l| {
            l.tandem.resource_status(survivor).ok().filter(in_sync)
        })
        .unwrap();
    // Resynced: the constraint is lifted.
    lab.wait("the fence constraint removed after the resync", Duration::from_secs(60), |l| {
        (!l.fenced_from_promotion(survivor, &primary).ok()?).then_some(())
    })
    .unwrap();
    let moved = resync_bytes_sent_pcmk(&lab, survivor) - sent_before;
    lab.note(&format!("{primary} rejoined as Unpromoted; resync moved {moved} bytes of {}", st.size));
    assert!(moved < st.size / 2, "a delta resync, not a full one: {moved} of {} bytes", st.size);

    // Equal images once both nodes are stopped in order (demoted, down).
    for n in [primary.as_str(), survivor] {
        lab.stop(n, Duration::from_secs(60)).unwrap();
    }
    assert_eq!(
        sha256_file(&lab.tandem.image(&primary)),
        sha256_file(&lab.tandem.image(survivor)),
        "images differ"
    );
}

fn resync_bytes_sent_pcmk(lab: &PacemakerLab, node: &str) -> u64 {
    lab.tandem
        .resource_status(node)
        .map(|s| s.peers.iter().filter_map(|p| p.resync.as_ref()).map(|r| r.data_bytes_sent).sum())
        .unwrap_or(0)
}

/// The pid of the Tandem agent the OCF agent started in `node`.
fn agent_pid(lab: &PacemakerLab, node: &str) -> Option<String> {
    let out = lab.x(node, &["cat", &format!("/run/resource-agents/tandem-agent-{node}.pid")]).ok()?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!pid.is_empty()).then_some(pid)
}

/// The fail count of the clone's instance on `node`, from crm_mon's history.
fn fail_count(lab: &PacemakerLab, node: &str) -> u32 {
    let Ok(xml) = lab.crm_mon(node) else { return 0 };
    let Some(start) = xml.find("<node_history>") else { return 0 };
    let history = &xml[start..];
    let Some(mine) = history.find(&format!("<node name=\"{node}\">")) else { return 0 };
    let section = &history[mine..history[mine..].find("</node>").map_or(history.len(), |e| mine + e)];
    section
        .split("<resource_history id=\"mail\"")
        .nth(1)
        .and_then(|r| r.split("fail-count=\"").nth(1))
        .and_then(|c| c.split('"').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn switchover_moves_zero_bytes_and_a_killed_agent_is_taken_over_in_place() {
    let mut lab = lab();
    let (primary, mnt) = cluster_with_service(&mut lab);
    let standby = other(&primary);
    let file = mnt.join("before-switchover");
    let file = file.to_string_lossy().to_string();
    lab.x_ok(&primary, &["sh", "-c", &format!("echo kept > {file} && sync -f {file}")]).unwrap();
    lab.wait("in sync", Duration::from_secs(60), |l| l.tandem.resource_status(&primary).ok().filter(in_sync))
        .unwrap();
    let sent = |l: &PacemakerLab| resync_bytes_sent_pcmk(l, &primary) + resync_bytes_sent_pcmk(l, standby);
    let sent_before = sent(&lab);

    // Planned switchover: move the service; the Promoted role follows it.
    let t = Instant::now();
    lab.x_ok(&primary, &["crm_resource", "--move", "-r", "mail-service", "-N", standby]).unwrap();
    service_up_on(&lab, standby);
    lab.note(&format!(
        "switchover {primary} -> {standby}: service up after {:.2}s",
        t.elapsed().as_secs_f64()
    ));
    lab.x_ok(&primary, &["crm_resource", "--clear", "-r", "mail-service"]).unwrap();
    lab.wait("the old primary Unpromoted and in sync", Duration::from_secs(60), |l| {
        (l.locate(standby, CLONE).len() == 2).then_some(())?;
        l.tandem.resource_status(standby).ok().filter(in_sync)
    })
    .unwrap();
    assert_eq!(sent(&lab), sent_before, "a planned switchover resyncs nothing");
    let out = lab.x_ok(standby, &["cat", &file]).unwrap();
    assert_eq!(out, "kept\n");

    // kill -9 of the agent under the Promoted instance: the descriptor holder keeps the
    // device, so the mounted filesystem waits; the next monitor starts a new agent there,
    // which takes the device over. Nothing failed for Pacemaker to recover: the service
    // stays where it is and the filesystem takes writes again.
    let old_pid = agent_pid(&lab, standby).expect("the OCF agent's pid file");
    let t = Instant::now();
    lab.x_ok(standby, &["kill", "-9", &old_pid]).unwrap();
    let (new_pid, takeover) = lab
        .wait("a new agent serving the device", Duration::from_secs(120), |l| {
            let pid = agent_pid(l, standby).filter(|p| *p != old_pid)?;
            let st = l.tandem.resource_status(standby).ok()?;
            (st.role == "primary").then_some((pid, st.takeover?))
        })
        .unwrap();
    let promoted = lab
        .wait("the Promoted instance with the service", Duration::from_secs(120), |l| {
            let p = l.promoted(standby)?;
            (running_on(l, &p, "mail-daemon")? == p && promoted_on(l, &p, &p)).then_some(p)
        })
        .unwrap();
    assert_eq!(promoted, standby, "the service did not move");
    assert_eq!(fail_count(&lab, standby), 0, "a takeover is not a failure");
    let after = mnt.join("after-agent-kill").to_string_lossy().to_string();
    lab.x_ok(standby, &["sh", "-c", &format!("echo written > {after} && sync -f {after}")])
        .expect("the filesystem takes writes after the takeover");
    lab.note(&format!(
        "agent killed on {standby}: a new agent took the device over (pid {old_pid} -> {new_pid}, device paused \
         {} ms, {} requests re-sent), serving again after {:.2}s, fail-count 0",
        takeover.paused_ms,
        takeover.resent,
        t.elapsed().as_secs_f64()
    ));
    let out = lab.x_ok(&promoted, &["cat", &file]).unwrap();
    assert_eq!(out, "kept\n");
}

/// Whether `node`'s agent says it is primary (false when it does not answer).
fn agent_primary(lab: &PacemakerLab, node: &str) -> bool {
    lab.running(node) && lab.tandem.resource_status(node).is_ok_and(|r| r.role == "primary")
}

#[test]
fn partition_fences_one_node_and_never_makes_two_primaries() {
    let mut lab = lab_with(PacemakerOptions {
        token_ms: TOKEN_MS,
        tandem_timeout: Duration::from_secs(5),
        fencing: true,
    });
    let (primary, mnt) = cluster_with_service(&mut lab);
    let standby = other(&primary);
    let dir = mnt.join("acked");
    let writer = Writer::start(&lab, &primary, &dir);
    writer.wait_for(&lab, 100);

    // The standby's link is cut: both sides lose each other and race to fence. The node
    // holding the Promoted instance wins (priority-fencing-delay); at no time are both
    // agents primary.
    let t = Instant::now();
    lab.set_link(standby, false).unwrap();
    let mut two_primaries = false;
    let fenced = lab
        .wait("one node fenced", Duration::from_secs(90), |l| {
            two_primaries |= agent_primary(l, &primary) && agent_primary(l, standby);
            NODES.iter().find(|n| !l.running(n)).map(|n| n.to_string())
        })
        .unwrap();
    lab.note(&format!(
        "partition: {fenced} fenced after {:.2}s; broker: {:?}",
        t.elapsed().as_secs_f64(),
        lab.fence_log()
    ));
    assert_eq!(fenced, standby, "the node holding the Promoted instance wins the fence race");
    assert!(lab.running(&primary), "exactly one node is fenced");
    let fences = lab.fence_log().iter().filter(|l| l.ends_with("rc 0")).count();
    assert_eq!(fences, 1, "one fencing carried out: {:?}", lab.fence_log());
    // The primary goes on: the writes go on being acknowledged (after Tandem's timeout).
    let before = writer.count();
    writer.wait_for(&lab, before + 50);
    service_up_on(&lab, &primary);

    // The link back, the fenced node booted: it rejoins Unpromoted and resyncs.
    lab.set_link(standby, true).unwrap();
    lab.start(standby).unwrap();
    lab.wait("the fenced node back as Unpromoted, in sync", Duration::from_secs(120), |l| {
        two_primaries |= agent_primary(l, &primary) && agent_primary(l, standby);
        (l.locate(&primary, CLONE).len() == 2 && promoted_on(l, &primary, &primary)).then_some(())?;
        l.tandem.resource_status(&primary).ok().filter(in_sync)
    })
    .unwrap();
    assert!(!two_primaries, "both agents were primary at once");
    let acked = writer.finish();
    let missing = missing_records(&lab, &primary, &dir, &acked);
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?} of {}", acked.len());
    lab.note(&format!("{standby} rejoined as Unpromoted; {} writes acknowledged, none lost", acked.len()));

    // Equal images: the filesystem unmounted by the cluster, the last writes replicated,
    // then the nodes stopped in order (the secondary first, so nothing is promoted).
    lab.x_ok(
        &primary,
        &["crm_resource", "-r", "mail-service", "--meta", "-p", "target-role", "-v", "Stopped"],
    )
    .unwrap();
    lab.wait("the filesystem unmounted and in sync", Duration::from_secs(60), |l| {
        running_on(l, &primary, "mail-fs").is_none().then_some(())?;
        l.tandem.resource_status(&primary).ok().filter(in_sync)
    })
    .unwrap();
    for n in [standby, primary.as_str()] {
        lab.stop(n, Duration::from_secs(60)).unwrap();
    }
    assert_eq!(
        sha256_file(&lab.tandem.image(&primary)),
        sha256_file(&lab.tandem.image(standby)),
        "images differ"
    );
}
