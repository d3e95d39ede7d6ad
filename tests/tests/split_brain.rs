//! Split brain across real hosts (each agent in its own network namespace, the link cut
//! with `ip link set … down`): detection, staying apart by default, `resolve
//! --discard-local`, each automatic policy, and the event handlers including `fence-peer`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tandem_agent::status::ResourceStatus;
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const SIZE: u64 = 64 << 20;
const B: u64 = BLOCK as u64;

/// Every handler appends "EVENT RESOURCE NODE PEER ROLE DISK EXTRA" to DIR/NODE.log.
fn handlers(dir: &Path) -> String {
    let line = |extra: &str| {
        format!(
            "\"echo \\\"$TANDEM_EVENT $TANDEM_RESOURCE $TANDEM_NODE $TANDEM_PEER $TANDEM_ROLE $TANDEM_DISK {extra}\\\" >> {}/$TANDEM_NODE.log\"",
            dir.display()
        )
    };
    format!(
        "[resource.handlers]\nsplit_brain = {}\nrole_change = {}\nconnected = {}\ndisconnected = {}\n\
         sync_start = {}\nsync_done = {}\nfence_peer = \"test -e {}/fence-ok\"\n",
        line("$TANDEM_SPLIT_BRAIN"),
        line("$TANDEM_DEVICE"),
        line(""),
        line(""),
        line("$TANDEM_SYNC_ROLE"),
        line("$TANDEM_SYNC_ROLE"),
        dir.display()
    )
}

struct Pair {
    lab: Lab,
    hooks: PathBuf,
    _hooks_dir: tempfile::TempDir,
}

impl Pair {
    fn new(policy: &str) -> Self {
        let hooks_dir = tempfile::tempdir().unwrap();
        let hooks = hooks_dir.path().to_path_buf();
        // Fencing succeeds unless a test says otherwise.
        std::fs::write(hooks.join("fence-ok"), "").unwrap();
        let opts = LabOptions {
            size: SIZE,
            netns: true,
            resource_extra: format!("after_split_brain = \"{policy}\"\n{}", handlers(&hooks)),
            ..Default::default()
        };
        let mut lab = new_lab(&["alpha", "beta"], &opts);
        lab.start("alpha").unwrap();
        lab.start("beta").unwrap();
        lab.wait_connected("alpha", secs(30)).unwrap();
        Pair { lab, hooks, _hooks_dir: hooks_dir }
    }

    fn hook_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.hooks.join(format!("{node}.log"))).unwrap_or_default()
    }

    fn wait_hook(&self, node: &str, needle: &str) {
        let deadline = Instant::now() + secs(20);
        while !self.hook_log(node).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} handler line on {node}:\n{}",
                self.hook_log(node)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn promote(&self, node: &str) -> String {
        let r = self.lab.promote(node, false).unwrap();
        assert!(r.ok, "promote {node}: {r:?}");
        wait_until(&self.lab, node, "device", secs(20), |r| r.device.is_some()).device.unwrap()
    }

    fn demote(&self, node: &str) {
        let r = self.lab.demote(node).unwrap();
        assert!(r.ok, "demote {node}: {r:?}");
    }

    /// Cuts alpha off and waits until both sides have noticed.
    fn partition(&self) {
        self.lab.partition("alpha").unwrap();
        for n in ["alpha", "beta"] {
            wait_until(&self.lab, n, "peer lost", secs(30), |r| r.peers[0].connection != "connected");
        }
    }

    fn wait_synced(&self, primary: &str) -> ResourceStatus {
        wait_until(&self.lab, primary, "peer in sync", secs(60), |r| {
            r.peers[0].connection == "connected"
                && r.peers[0].replication == "established"
                && r.peers[0].out_of_sync_bytes == 0
                && r.peers[0].peer_disk == Some(tandem_agent::status::DiskState::UpToDate)
        })
    }
}

/// Writes `blocks` (block numbers) with run `run` on `dev`, synchronously.
fn write(dev: &str, run: u64, blocks: impl IntoIterator<Item = u64>) -> BTreeMap<u64, u64> {
    let mut w = BlockWriter::open(dev, run, true);
    for b in blocks {
        w.write(b * B).unwrap();
    }
    w.written
}

fn is_zero(image: &Path, block: u64) -> bool {
    read_at(image, block * B, BLOCK).iter().all(|b| *b == 0)
}

/// Both agents stopped cleanly, images equal, `kept` present on both and `discarded`
/// nowhere (those blocks are back to what they held before the split: zeroes here).
fn check_outcome(lab: &mut Lab, run: u64, kept: &BTreeMap<u64, u64>, discarded: &[u64]) {
    let clean = lab.stop_all();
    assert!(clean.values().all(|c| *c), "unclean stop: {clean:?}");
    for n in ["alpha", "beta"] {
        assert_eq!(stale_blocks(&lab.image(n), run, kept), Vec::<u64>::new(), "{n} lacks the kept changes");
        for b in discarded {
            assert!(is_zero(&lab.image(n), *b), "{n}: block {b} still holds discarded changes");
        }
    }
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
}

#[test]
fn split_brain_stays_apart_by_default_until_resolved_by_command() {
    let mut p = Pair::new("disconnect");
    let dev = p.promote("alpha");
    let base_run = rand::random();
    let base = write(&dev, base_run, 0..16);
    p.wait_synced("alpha");

    p.partition();
    // Both sides write as primary while apart.
    let (ra, rb): (u64, u64) = (rand::random(), rand::random());
    let alpha_w = write(&dev, ra, (100..110).chain(0..4));
    let dev_b = {
        let r = p.lab.promote("beta", true).unwrap();
        assert!(r.ok, "{r:?}");
        wait_until(&p.lab, "beta", "device", secs(20), |r| r.device.is_some()).device.unwrap()
    };
    let beta_w = write(&dev_b, rb, (200..220).chain(2..6));
    p.lab.heal("alpha").unwrap();

    for n in ["alpha", "beta"] {
        let st = wait_until(&p.lab, n, "split brain reported", secs(40), |r| {
            r.peers[0].replication == "split_brain"
        });
        println!(
            "{n}: {:?} / {}",
            st.peers[0].replication,
            st.peers[0].last_error.clone().unwrap_or_default()
        );
        p.wait_hook(n, "split-brain mail");
    }
    // Stays apart: nothing moves, both keep their role and data.
    std::thread::sleep(secs(4));
    for n in ["alpha", "beta"] {
        let st = p.lab.resource_status(n).unwrap();
        assert_eq!(st.role, "primary", "{n}");
        assert_eq!(st.peers[0].replication, "split_brain", "{n}");
        assert_eq!(resync_bytes_sent(&p.lab, n), 0, "{n} resynced during a split brain");
    }
    assert!(p.hook_log("alpha").contains("unresolved"), "{}", p.hook_log("alpha"));

    // A primary cannot discard its own changes.
    let out = tandem_cli(&p.lab, "alpha", &["resolve", "mail", "--discard-local"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("primary"));
    // Without the flag nothing happens.
    assert!(!tandem_cli(&p.lab, "alpha", &["resolve", "mail"]).status.success());

    p.demote("alpha");
    let msg = tandem_ok(&p.lab, "alpha", &["resolve", "mail", "--discard-local"]);
    println!("{msg}");
    let st = p.wait_synced("beta");
    let moved = resync_bytes_sent(&p.lab, "beta");
    println!("resolved: beta sent {moved} bytes; {st:?}");
    // The union of both sides' changes since the split: 10+4 on alpha, 20+4 on beta, 2 shared.
    assert!(moved >= 36 * B, "the resync must cover both sides' changes, moved {moved}");
    assert!(moved <= 64 * B, "a split-brain resync copies the changed blocks only, moved {moved}");
    p.wait_hook("alpha", "sync-done mail alpha beta");

    p.demote("beta");
    // alpha's changes are gone (blocks 0..2 hold the base version again, 100..110 their old
    // zeroes); beta's are everywhere, and the base blocks neither touched are intact.
    let discarded: Vec<u64> = alpha_w.keys().map(|b| b / B).filter(|b| *b >= 100).collect();
    check_outcome(&mut p.lab, rb, &beta_w, &discarded);
    let base_kept: BTreeMap<u64, u64> =
        base.into_iter().filter(|(b, _)| !(2 * B..6 * B).contains(b)).collect();
    for n in ["alpha", "beta"] {
        assert_eq!(stale_blocks(&p.lab.image(n), base_run, &base_kept), Vec::<u64>::new(), "{n}");
    }
}

#[test]
fn discard_zero_changes_resyncs_the_node_that_wrote_nothing() {
    let mut p = Pair::new("discard-zero-changes");
    let dev = p.promote("alpha");
    let base_run = rand::random();
    let base = write(&dev, base_run, 0..8);
    p.wait_synced("alpha");
    p.demote("alpha");
    p.partition();
    // Both promoted while apart; only beta writes.
    p.promote("alpha");
    let dev_b = p.promote("beta");
    let rb = rand::random();
    let beta_w = write(&dev_b, rb, 40..60);
    p.demote("alpha");
    p.lab.heal("alpha").unwrap();
    p.wait_synced("beta");
    p.wait_hook("alpha", "resolved: alpha discards its changes");
    let moved = resync_bytes_sent(&p.lab, "beta");
    println!("discard-zero-changes: beta sent {moved} bytes");
    assert!((20 * B..=32 * B).contains(&moved), "moved {moved}");
    p.demote("beta");
    check_outcome(&mut p.lab, rb, &beta_w, &[]);
    assert_eq!(stale_blocks(&p.lab.image("alpha"), base_run, &base), Vec::<u64>::new());
}

#[test]
fn discard_zero_changes_leaves_two_writers_apart() {
    let p = Pair::new("discard-zero-changes");
    let dev = p.promote("alpha");
    p.wait_synced("alpha");
    p.partition();
    write(&dev, 1, 10..12);
    let dev_b = p.promote("beta");
    write(&dev_b, 2, 20..22);
    p.demote("alpha");
    p.demote("beta");
    p.lab.heal("alpha").unwrap();
    for n in ["alpha", "beta"] {
        wait_until(&p.lab, n, "split brain reported", secs(40), |r| r.peers[0].replication == "split_brain");
    }
    std::thread::sleep(secs(3));
    for n in ["alpha", "beta"] {
        assert_eq!(resync_bytes_sent(&p.lab, n), 0, "{n}: both sides changed data; nothing may be discarded");
    }
}

#[test]
fn discard_younger_primary_keeps_the_first_primarys_changes() {
    let mut p = Pair::new("discard-younger-primary");
    let dev = p.promote("alpha");
    p.wait_synced("alpha");
    p.partition();
    let ra = rand::random();
    let alpha_w = write(&dev, ra, 10..30);
    std::thread::sleep(Duration::from_millis(50));
    // beta becomes primary after alpha's first write alone: beta is the younger primary.
    let dev_b = p.promote("beta");
    let beta_w = write(&dev_b, rand::random(), 100..104);
    p.demote("beta");
    p.lab.heal("alpha").unwrap();
    p.wait_synced("alpha");
    p.wait_hook("beta", "resolved: beta discards its changes");
    let moved = resync_bytes_sent(&p.lab, "alpha");
    println!("discard-younger-primary: alpha sent {moved} bytes");
    assert!((24 * B..=40 * B).contains(&moved), "moved {moved}");
    p.demote("alpha");
    let discarded: Vec<u64> = beta_w.keys().map(|b| b / B).collect();
    check_outcome(&mut p.lab, ra, &alpha_w, &discarded);
}

#[test]
fn discard_least_changes_keeps_the_bigger_side() {
    let mut p = Pair::new("discard-least-changes");
    let dev = p.promote("alpha");
    p.wait_synced("alpha");
    p.partition();
    let alpha_w = write(&dev, rand::random(), 10..15);
    let dev_b = p.promote("beta");
    let rb = rand::random();
    let beta_w = write(&dev_b, rb, 100..130);
    p.demote("alpha");
    p.lab.heal("alpha").unwrap();
    p.wait_synced("beta");
    p.wait_hook("alpha", "resolved: alpha discards its changes");
    let moved = resync_bytes_sent(&p.lab, "beta");
    println!("discard-least-changes: beta sent {moved} bytes");
    assert!((35 * B..=48 * B).contains(&moved), "moved {moved}");
    p.demote("beta");
    let discarded: Vec<u64> = alpha_w.keys().map(|b| b / B).collect();
    check_outcome(&mut p.lab, rb, &beta_w, &discarded);
}

#[test]
fn handlers_run_with_the_event_and_fence_peer_can_refuse_promotion() {
    let mut p = Pair::new("disconnect");
    p.wait_hook("alpha", "connected mail alpha beta secondary up_to_date");
    let dev = p.promote("alpha");
    p.wait_hook("alpha", &format!("role-change mail alpha  primary up_to_date {dev}"));
    p.wait_synced("alpha");

    // The primary dies; the standby's promotion needs the peer fenced first.
    std::fs::remove_file(p.hooks.join("fence-ok")).unwrap();
    p.lab.kill9("alpha").unwrap();
    wait_until(&p.lab, "beta", "peer lost", secs(30), |r| r.peers[0].connection != "connected");
    p.wait_hook("beta", "disconnected mail beta alpha secondary");
    let r = p.lab.promote("beta", false).unwrap();
    assert!(!r.ok, "promotion without a successful fence-peer handler: {r:?}");
    let e = r.error.unwrap_or_default();
    assert!(e.contains("fence-peer") && e.contains("exited with 1"), "{e}");
    assert_eq!(p.lab.resource_status("beta").unwrap().role, "secondary");
    // Even --force does not skip fencing.
    assert!(!p.lab.promote("beta", true).unwrap().ok);

    std::fs::write(p.hooks.join("fence-ok"), "").unwrap();
    p.promote("beta");
    p.wait_hook("beta", "role-change mail beta  primary up_to_date /dev/loop");

    // The old primary returns as sync target: sync-start/sync-done on both sides.
    p.lab.start("alpha").unwrap();
    p.wait_synced("beta");
    p.wait_hook("beta", "sync-start mail beta alpha primary up_to_date source");
    p.wait_hook("beta", "sync-done mail beta alpha primary up_to_date source");
    p.wait_hook("alpha", "sync-done mail alpha beta secondary up_to_date target");
    for n in ["alpha", "beta"] {
        println!("{n} handlers:\n{}", p.hook_log(n));
    }
}
