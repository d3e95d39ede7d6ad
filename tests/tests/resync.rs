//! Dirty tracking and resync across real agents: delta resync after a disconnect, after a
//! primary crash, a resumed full sync, checksum-based seeding, and online verify.

use std::time::Duration;

use rand::Rng;
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const GIB: u64 = 1 << 30;

fn resync_of(lab: &Lab, node: &str) -> tandem_agent::status::ResyncStatus {
    lab.resource_status(node).unwrap().peers[0].resync.clone().unwrap_or_default()
}

fn in_sync(r: &tandem_agent::status::ResourceStatus) -> bool {
    r.peers[0].connection == "connected"
        && r.peers[0].replication == "established"
        && r.peers[0].out_of_sync_bytes == 0
}

fn up(lab: &mut Lab) -> String {
    start_and_promote_alpha(lab, &["alpha", "beta"], in_sync)
}

/// Disconnects alpha from its peer and waits until it replicates to nobody.
fn disconnect(lab: &Lab) {
    tandem_ok(lab, "alpha", &["disconnect", "mail"]);
    wait_until(lab, "alpha", "disconnected", secs(30), |r| r.peers[0].replication == "off");
}

/// Demotes alpha, stops both, and checks that the images are equal and hold `written`.
fn down_and_compare(lab: &mut Lab, run: u64, written: &std::collections::BTreeMap<u64, u64>) {
    assert!(lab.demote("alpha").unwrap().ok);
    let clean = lab.stop_all();
    assert!(clean.values().all(|c| *c), "unclean stop: {clean:?}");
    assert_eq!(
        stale_blocks(&lab.image("alpha"), run, written),
        Vec::<u64>::new(),
        "primary lacks acknowledged writes"
    );
    assert_eq!(stale_blocks(&lab.image("beta"), run, written), Vec::<u64>::new(), "standby lacks writes");
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
}

#[test]
fn delta_resync_after_disconnect_moves_only_what_changed() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: GIB, ..Default::default() });
    let dev = up(&mut lab);
    disconnect(&lab);
    // 1 % of the volume in random 4 KiB blocks.
    let run = rand::random();
    let mut w = BlockWriter::open(&dev, run, false);
    let mut rng = rand::rng();
    let blocks = (GIB / BLOCK as u64) / 100;
    for _ in 0..blocks {
        w.write(rng.random_range(0..GIB / BLOCK as u64) * BLOCK as u64).unwrap();
    }
    w.sync();
    let changed = w.written.len() as u64 * BLOCK as u64;
    let st = lab.resource_status("alpha").unwrap();
    assert_eq!(st.peers[0].out_of_sync_bytes, changed, "every changed block is tracked, nothing else");
    tandem_ok(&lab, "alpha", &["connect", "mail"]);
    wait_until(&lab, "beta", "resynced", secs(120), |r| {
        r.disk == "up_to_date" && r.peers[0].connection == "connected"
    });
    wait_until(&lab, "alpha", "in sync", secs(60), in_sync);
    let moved = resync_of(&lab, "alpha").data_bytes_sent;
    eprintln!("delta resync: {changed} bytes changed while disconnected, {moved} bytes resynced");
    assert!(moved >= changed && moved <= GIB * 2 / 100, "resync moved {moved} bytes for {changed} changed");
    down_and_compare(&mut lab, run, &w.written);
}

/// Names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// A primary alone takes concurrent writes through its image's io_uring: 8 writers at once,
/// each overwriting blocks of its own several times. Every acknowledged version must be on
/// the primary's image, tracked for the peer, and on the standby after the resync.
#[test]
fn a_lone_primarys_concurrent_writes_all_land_and_are_resynced() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: GIB, ..Default::default() });
    let dev = up(&mut lab);
    disconnect(&lab);
    let run = rand::random();
    const WRITERS: u64 = 8;
    // Blocks in the first 64 MiB, each writer's own (block % WRITERS), each written ~3 times.
    let span = (64 << 20) / BLOCK as u64;
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut w = BlockWriter::open(&dev, run, false);
                let mut rng = rand::rng();
                for _ in 0..1500 {
                    let b = rng.random_range(0..span / WRITERS) * WRITERS + t;
                    w.write(b * BLOCK as u64).unwrap();
                }
                w.sync();
                w.written
            })
        })
        .collect();
    let mut written = std::collections::BTreeMap::new();
    for w in writers {
        written.extend(w.join().unwrap());
    }
    let pid = lab.pid("alpha").expect("alpha runs");
    let threads = thread_names(pid);
    assert!(
        threads.iter().any(|n| n == "tandem-uring"),
        "8 concurrent writers never reached the image's io_uring; alpha's threads: {threads:?}"
    );
    assert_eq!(stale_blocks(&lab.image("alpha"), run, &written), Vec::<u64>::new(), "primary lacks writes");
    let st = lab.resource_status("alpha").unwrap();
    assert_eq!(
        st.peers[0].out_of_sync_bytes,
        written.len() as u64 * BLOCK as u64,
        "every block written while alone is tracked for the peer"
    );
    tandem_ok(&lab, "alpha", &["connect", "mail"]);
    wait_until(&lab, "beta", "resynced", secs(120), |r| {
        r.disk == "up_to_date" && r.peers[0].connection == "connected"
    });
    wait_until(&lab, "alpha", "in sync", secs(60), in_sync);
    down_and_compare(&mut lab, run, &written);
}

#[test]
fn primary_crash_resyncs_only_its_activity_log() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: GIB, ..Default::default() });
    let dev = up(&mut lab);
    // A write load on a hot region of 48 MiB, until the primary is killed under it.
    let run = rand::random();
    let writer = std::thread::spawn(move || {
        let mut w = BlockWriter::open(&dev, run, true);
        let mut rng = rand::rng();
        loop {
            let off = (64 << 20) + rng.random_range(0..(48 << 20) / BLOCK as u64) * BLOCK as u64;
            if w.write(off).is_err() {
                // Acknowledged writes are in `written`; the failed one is not (it may or
                // may not have reached either disk).
                return w;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    lab.kill9("alpha").unwrap();
    let load = writer.join().unwrap();
    let acked = load.written.clone();
    assert!(acked.len() > 10, "the load wrote too little to mean anything");
    // The standby holds every acknowledged write (sync mode).
    assert_eq!(load.lacking(&lab.image("beta")), Vec::<u64>::new());
    if let Some((off, v)) = load.failed {
        let on_beta = read_at(&lab.image("beta"), off, BLOCK) == stamped_block(off, run, v);
        eprintln!("the write in flight at the kill (offset {off}) reached the standby: {on_beta}");
    }
    // The old primary comes back: its activity log, not the volume, is resynced.
    lab.start("alpha").unwrap();
    assert!(lab.log_text("alpha").contains("stopped uncleanly"));
    wait_until(&lab, "alpha", "resynced", secs(120), |r| {
        r.peers[0].connection == "connected"
            && r.peers[0].out_of_sync_bytes == 0
            && r.peers[0].replication != "sync_source"
    });
    wait_until(&lab, "beta", "up to date", secs(60), |r| r.disk == "up_to_date");
    let moved = resync_of(&lab, "alpha").data_bytes_sent;
    eprintln!(
        "primary crash: {} acknowledged writes, {moved} bytes resynced from the activity log",
        acked.len()
    );
    assert!(moved > 0, "the activity log's extents were not resynced");
    assert!(moved <= 128 << 20, "resync moved {moved} bytes; the activity log covers ~48 MiB");
    // Local recovery: the restarted node is promoted again and replication resumes.
    let r = lab.promote("alpha", false).unwrap();
    assert!(r.ok, "promotion after a local restart: {r:?}");
    let dev = wait_until(&lab, "alpha", "device", secs(20), |r| r.device.is_some()).device.unwrap();
    let run2 = rand::random();
    let mut w = BlockWriter::open(&dev, run2, true);
    for b in 0..64u64 {
        w.write(b * BLOCK as u64).unwrap();
    }
    let after = w.written.clone();
    drop(w);
    wait_until(&lab, "alpha", "replicating again", secs(30), in_sync);
    assert!(lab.demote("alpha").unwrap().ok);
    lab.stop_all();
    // The write that failed may or may not have reached either disk; both are equal anyway,
    // and both hold every acknowledged write, from before the crash and after.
    for n in ["alpha", "beta"] {
        assert_eq!(load.lacking(&lab.image(n)), Vec::<u64>::new(), "{n}");
        assert_eq!(stale_blocks(&lab.image(n), run2, &after), Vec::<u64>::new(), "{n}");
    }
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
}

#[test]
fn interrupted_full_sync_resumes_instead_of_restarting() {
    let opts =
        LabOptions { size: GIB, resource_extra: "resync_max_rate = \"150MiB\"".into(), ..Default::default() };
    let mut lab = new_lab(&["alpha", "beta"], &opts);
    let dev = up(&mut lab);
    let run = rand::random();
    let mut w = BlockWriter::open(&dev, run, true);
    for i in 0..256u64 {
        w.write(i * (4 << 20)).unwrap();
    }
    // Replace the standby's copy: full initial sync while the primary serves writes.
    tandem_ok(&lab, "beta", &["invalidate", "mail"]);
    wait_until(&lab, "alpha", "half synced", secs(120), |r| {
        r.peers[0]
            .resync
            .as_ref()
            .is_some_and(|s| s.active && s.total_bytes > 0 && s.done_bytes * 2 >= s.total_bytes)
    });
    lab.kill9("beta").unwrap();
    for i in 0..64u64 {
        w.write(i * (16 << 20) + 4096).unwrap();
    }
    lab.start("beta").unwrap();
    assert_ne!(lab.resource_status("beta").unwrap().disk, "up_to_date");
    wait_until(&lab, "beta", "resynced", secs(180), |r| {
        r.disk == "up_to_date" && r.peers[0].connection == "connected"
    });
    wait_until(&lab, "alpha", "in sync", secs(60), in_sync);
    let moved = resync_of(&lab, "alpha").data_bytes_sent;
    eprintln!("interrupted full sync of {GIB} bytes: {moved} bytes moved in total");
    assert!(
        moved <= GIB * 12 / 10,
        "full sync interrupted half-way moved {moved} bytes in total (> 1.2 x volume)"
    );
    assert!(moved >= GIB * 9 / 10, "a full sync moved only {moved} bytes");
    down_and_compare(&mut lab, run, &w.written);
}

#[test]
fn checksum_resync_of_a_seeded_standby_sends_only_differences() {
    let size = 256 << 20;
    let opts = LabOptions { size, resource_extra: "resync_checksum = true".into(), ..Default::default() };
    let mut lab = new_lab(&["alpha", "beta"], &opts);
    lab.start("alpha").unwrap();
    assert!(lab.promote("alpha", false).unwrap().ok);
    let dev = lab.resource_status("alpha").unwrap().device.unwrap();
    let run = rand::random();
    let mut w = BlockWriter::open(&dev, run, false);
    for b in 0..size / BLOCK as u64 {
        w.write(b * BLOCK as u64).unwrap();
    }
    w.sync();
    // Seed beta's image from a copy of alpha's (e.g. a backup restored there).
    assert!(lab.demote("alpha").unwrap().ok);
    std::fs::create_dir_all(lab.dir.join("beta")).unwrap();
    std::fs::copy(lab.image("alpha"), lab.image("beta")).unwrap();
    assert!(lab.promote("alpha", false).unwrap().ok);
    let dev = lab.resource_status("alpha").unwrap().device.unwrap();
    let mut w2 = BlockWriter::open(&dev, run, false);
    w2.written = w.written.clone();
    let mut rng = rand::rng();
    for _ in 0..(size / BLOCK as u64) / 100 {
        w2.write(rng.random_range(0..size / BLOCK as u64) * BLOCK as u64).unwrap();
    }
    w2.sync();
    // Beta starts with the stale copy and no metadata: inconsistent, full sync by checksum.
    lab.start("beta").unwrap();
    wait_until(&lab, "beta", "resynced", secs(120), |r| {
        r.disk == "up_to_date" && r.peers[0].connection == "connected"
    });
    let rs = resync_of(&lab, "alpha");
    let sent = rs.data_bytes_sent + rs.hash_bytes_sent;
    eprintln!("checksum resync of a {size}-byte seeded copy: {rs:?}");
    assert!(sent <= size * 3 / 100, "checksum resync sent {sent} bytes ({rs:?})");
    assert!(rs.equal_bytes >= size * 95 / 100, "{rs:?}");
    down_and_compare(&mut lab, run, &w2.written);
}

#[test]
fn verify_finds_exactly_the_corrupted_blocks_and_repair_fixes_them() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: 128 << 20, ..Default::default() });
    let dev = up(&mut lab);
    let run = rand::random();
    let mut w = BlockWriter::open(&dev, run, true);
    for i in 0..512u64 {
        w.write(i * 64 * BLOCK as u64).unwrap();
    }
    // A healthy pair verifies clean, also while the application writes.
    let dev2 = dev.clone();
    let load = std::thread::spawn(move || {
        let mut w = BlockWriter::open(&dev2, run ^ 1, true);
        let mut rng = rand::rng();
        for _ in 0..2000 {
            w.write(rng.random_range(0..(128 << 20) / BLOCK as u64) * BLOCK as u64).unwrap();
        }
    });
    let out = tandem_ok(&lab, "alpha", &["verify", "mail", "--json"]);
    load.join().unwrap();
    let reports: Vec<tandem_agent::status::VerifyReport> = serde_json::from_str(&out).unwrap();
    assert_eq!(reports[0].differing_bytes, 0, "false positives on a healthy pair: {reports:?}");
    // Corrupt three blocks of the standby behind its back, while its agent is stopped.
    assert!(lab.stop("beta", secs(30)).unwrap());
    let corrupt = [5 * BLOCK as u64, 9000 * BLOCK as u64, 9001 * BLOCK as u64];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(lab.image("beta")).unwrap();
        for off in corrupt {
            f.write_all_at(&[0xEEu8; 4096], off).unwrap();
        }
        f.sync_all().unwrap();
    }
    lab.start("beta").unwrap();
    wait_until(&lab, "alpha", "in sync", secs(60), in_sync);
    let out = tandem_ok(&lab, "alpha", &["verify", "mail", "--json"]);
    let reports: Vec<tandem_agent::status::VerifyReport> = serde_json::from_str(&out).unwrap();
    assert_eq!(reports[0].ranges, vec![(corrupt[0], 4096), (corrupt[1], 8192)], "{reports:?}");
    assert_eq!(lab.resource_status("alpha").unwrap().peers[0].out_of_sync_bytes, 3 * 4096);
    tandem_ok(&lab, "alpha", &["resync", "mail"]);
    wait_until(&lab, "alpha", "repaired", secs(60), in_sync);
    let out = tandem_ok(&lab, "alpha", &["verify", "mail", "--json"]);
    let reports: Vec<tandem_agent::status::VerifyReport> = serde_json::from_str(&out).unwrap();
    assert_eq!(reports[0].differing_bytes, 0, "{reports:?}");
    assert!(lab.demote("alpha").unwrap().ok);
    lab.stop_all();
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")));
}
