//! Two resources between the same two nodes share one connection; trouble in one never
//! stops the other. A split brain is made on the first (disconnect both sides, promote
//! both, write on both, connect) while a writer runs on the second: the second's writes
//! keep reaching its standby throughout, its session stays established, and every write
//! acknowledged on it is on the standby's image at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_agent::control::Request;
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const SECOND: &str = "queue";

fn ok(lab: &Lab, node: &str, req: Request) -> String {
    let r = lab.request(node, &req).unwrap();
    assert!(r.ok, "{node}: {req:?}: {r:?}");
    r.message.unwrap_or_default()
}

fn device_of(lab: &Lab, node: &str, resource: &str) -> String {
    let msg = ok(lab, node, Request::Promote { resource: resource.into(), force: false });
    assert!(msg.contains("/dev/loop"), "{msg}");
    status_of(lab, node, resource).device.expect("primary has a device")
}

#[test]
fn split_brain_on_one_resource_never_stops_the_other() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: 32 << 20, ..LabOptions::default() });
    add_resource(&lab, SECOND, "32MiB");
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    for node in ["alpha", "beta"] {
        for res in ["mail", SECOND] {
            wait_resource(&lab, node, res, "connected", |r| {
                r.peers.iter().all(|p| p.connection == "connected")
            });
        }
    }

    // A writer on the second resource, running throughout.
    let queue_dev = device_of(&lab, "alpha", SECOND);
    wait_resource(&lab, "alpha", SECOND, "replicating", all_caught_up);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dev) = (stop.clone(), queue_dev.clone());
        std::thread::spawn(move || {
            let mut w = BlockWriter::open(&dev, 77, true);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                w.write((i % 4096) * BLOCK as u64).expect("a write on the second resource failed");
                i += 1;
            }
            w
        })
    };

    // Meanwhile: a split brain on the first resource.
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, status) = (watch_stop.clone(), {
            let cfg = lab.config.clone();
            move |node: &str| {
                let out = std::process::Command::new(tandem_bin())
                    .args(["-c", cfg.to_str().unwrap(), "-n", node, "status", "--json"])
                    .output()
                    .expect("run tandem status");
                let s: tandem_agent::status::NodeStatus =
                    serde_json::from_slice(&out.stdout).expect("status json");
                s.resources.into_iter().find(|r| r.name == SECOND).expect("second resource")
            }
        });
        std::thread::spawn(move || {
            // On the standby, the second resource's session stays up and its writes keep
            // arriving while the first resource goes through its split brain.
            let mut samples = 0;
            let mut last_writes = status("beta").stats.replicated_writes;
            let mut stalls = 0;
            while !stop.load(Ordering::SeqCst) {
                let s = status("beta");
                let p = &s.peers[0];
                assert_eq!(p.connection, "connected", "second resource lost its session: {p:#?}");
                assert_eq!(p.replication, "established", "second resource stopped replicating: {p:#?}");
                if s.stats.replicated_writes == last_writes {
                    stalls += 1;
                } else {
                    stalls = 0;
                }
                // Writes are continuous (each a few hundred microseconds); not one reached
                // the standby for 100 samples (10 s or more): replication stopped.
                assert!(
                    stalls < 100,
                    "no write of the second resource reached the standby for {stalls} samples"
                );
                last_writes = s.stats.replicated_writes;
                samples += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };

    for n in ["alpha", "beta"] {
        ok(&lab, n, Request::Disconnect { resource: "mail".into() });
    }
    let mail_a = device_of(&lab, "alpha", "mail");
    let mail_b = device_of(&lab, "beta", "mail");
    for (dev, run) in [(&mail_a, 1u64), (&mail_b, 2u64)] {
        let mut w = BlockWriter::open(dev, run, true);
        for b in 0..64u64 {
            w.write(b * BLOCK as u64).unwrap();
        }
    }
    for n in ["alpha", "beta"] {
        ok(&lab, n, Request::Connect { resource: "mail".into() });
    }
    for n in ["alpha", "beta"] {
        let s =
            wait_resource(&lab, n, "mail", "split brain found", |r| r.peers[0].replication == "split_brain");
        assert_eq!(s.peers[0].connection, "standalone", "{n}: {s:#?}");
        assert!(
            s.peers[0].last_error.as_deref().is_some_and(|e| e.contains("split brain")),
            "{n}: the reason is in the status: {s:#?}"
        );
    }
    // Let the writer run a little longer against the settled split brain.
    std::thread::sleep(Duration::from_secs(2));

    watch_stop.store(true, Ordering::SeqCst);
    let samples = watcher.join().expect("the second resource kept replicating");
    assert!(samples >= 10, "the watcher sampled the standby only {samples} times");
    stop.store(true, Ordering::SeqCst);
    let w = writer.join().expect("writer");
    assert!(w.written.len() > 100, "the writer made only {} writes", w.written.len());
    // Sync mode: every write acknowledged on the second resource is on the standby's disk.
    wait_resource(&lab, "alpha", SECOND, "caught up", all_caught_up);
    let lacking = w.lacking(&lab.dir.join("beta").join(format!("{SECOND}.img")));
    assert!(lacking.is_empty(), "acknowledged writes missing on the standby: {lacking:?}");
    // One connection all along: it was never dropped and re-established.
    let log = lab.log_text("alpha");
    assert_eq!(
        log.matches("peer_link: connected peer=beta").count(),
        1,
        "the connection was re-established:\n{log}"
    );
    assert!(!log.contains("peer_link: disconnected"), "the connection itself ended:\n{log}");

    for (n, res) in [("alpha", "mail"), ("beta", "mail"), ("alpha", SECOND)] {
        ok(&lab, n, Request::Demote { resource: res.into() });
    }
}
