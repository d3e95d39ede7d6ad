//! `sync` mode against a frozen standby: a write waits for the peer until the timeout, then
//! the primary continues alone, marks the peer outdated, and the outdated node refuses to
//! be promoted unless forced.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_tests::lab::LabOptions;
use tandem_tests::*;

#[test]
fn frozen_standby_holds_writes_until_timeout_then_is_outdated() {
    let timeout = Duration::from_secs(2);
    let heartbeat = timeout / 5; // as the lab configures it
                                 // A slow resync keeps beta behind long enough to observe it.
    let opts =
        LabOptions { timeout, resource_extra: "resync_max_rate = \"4KiB\"".into(), ..Default::default() };
    let mut lab = new_lab(&["alpha", "beta"], &opts);
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    lab.wait_connected("alpha", secs(30)).unwrap();
    assert!(lab.promote("alpha", false).unwrap().ok);
    let st = lab
        .wait_for("alpha", "replication established", secs(30), |r| r.peers[0].replication == "established")
        .unwrap();
    let dev = st.device.unwrap();
    let run = rand::random::<u64>();

    // Healthy pair: a synchronous write completes.
    write_block_direct(&dev, 0, &stamped_block(0, run, 1), true).unwrap();

    lab.signal("beta", Signal::SIGSTOP).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (d2, dev2) = (done.clone(), dev.clone());
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let r = write_block_direct(&dev2, 4096, &stamped_block(4096, run, 1), true);
        d2.store(true, Ordering::SeqCst);
        (r, started.elapsed())
    });
    // The peer went silent at most one heartbeat before the write was issued, so the write
    // must still be waiting well into the timeout.
    std::thread::sleep(timeout - heartbeat - Duration::from_millis(200));
    assert!(!done.load(Ordering::SeqCst), "a sync write completed while the standby was frozen");
    let (r, elapsed) = writer.join().unwrap();
    r.expect("write must complete once the peer is declared disconnected");
    assert!(elapsed >= timeout - heartbeat, "completed after {elapsed:?}, before the {timeout:?} timeout");

    let st = lab.wait_for("alpha", "peer dropped", secs(30), |r| r.peers[0].replication == "off").unwrap();
    assert!(st.peers[0].out_of_sync_bytes >= 4096, "{st:#?}");
    assert!(st.peers[0].last_error.is_some(), "{st:#?}");
    // Writes proceed without waiting now.
    for i in 2..16u64 {
        write_block_direct(&dev, i * 4096, &stamped_block(i * 4096, run, 1), true).unwrap();
    }

    lab.signal("beta", Signal::SIGCONT).unwrap();
    // Beta reconnects and learns from the generation IDs that the primary went on without
    // it: it is behind, and becomes the target of a (deliberately slow) resync.
    let b = lab
        .wait_for("beta", "disk no longer up to date", secs(60), |r| {
            r.disk == "outdated" || r.disk == "inconsistent"
        })
        .unwrap();
    assert_eq!(b.role, "secondary");
    lab.wait_for("alpha", "resync running", secs(30), |r| r.peers[0].replication == "sync_source").unwrap();

    // Refused while the connected peer is primary.
    let r = lab.promote("beta", false).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap().contains("alpha is primary"), "{r:?}");
    // Primary gone mid-resync: refused because the local disk is not up to date — via the
    // real CLI, with a non-zero exit and a clear message.
    assert!(lab.stop("alpha", secs(30)).unwrap(), "alpha did not stop cleanly");
    let disk = lab.resource_status("beta").unwrap().disk;
    assert_ne!(disk, "up_to_date", "beta claims to be up to date after an interrupted resync");
    let out = Command::new(lab.exe())
        .args(["--config"])
        .arg(&lab.config)
        .args(["--node", "beta", "promote", "mail"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promote of a {disk} disk succeeded");
    assert!(stderr.contains(disk.as_str()) && stderr.contains("--force"), "unclear refusal: {stderr}");
    assert_eq!(lab.resource_status("beta").unwrap().role, "secondary");
    // The state survives a restart of the standby.
    assert!(lab.stop("beta", secs(30)).unwrap());
    lab.start("beta").unwrap();
    assert_eq!(lab.resource_status("beta").unwrap().disk, disk);
    // --force is the explicit override.
    let r = lab.promote("beta", true).unwrap();
    assert!(r.ok, "{r:?}");
    let b = lab.resource_status("beta").unwrap();
    assert_eq!((b.role.as_str(), b.disk.as_str()), ("primary", "up_to_date"));
    assert!(lab.demote("beta").unwrap().ok);
}
