//! Snapshots on a standby (the backup target), with real agents, loop devices and ext4.
//!
//! - `snapshots_under_load_are_each_exactly_the_state_after_a_flush`: the oracle. alpha,
//!   primary, writes epochs of versioned stamped blocks (a batch of writes, then an fsync of
//!   the device: the barrier); beta takes snapshots at random instants meanwhile; each one,
//!   read through its exposed read-only device, must be exactly the state after some epoch
//!   — all writes of epochs <= k, none later — and later snapshots never go back in time.
//! - `an_ext4_snapshot_under_load_is_clean_and_holds_every_acknowledged_file`.
//! - `restore_brings_back_deleted_files_and_the_peer_resyncs_only_the_changed_blocks`.
//! - `snapshots_survive_kill_9_and_retention_keeps_the_newest`.
//! - `a_resync_target_keeps_a_snapshot_until_its_resync_ends`.
//! - `bad_input_gets_a_clear_error_and_a_full_snapshot_disk_loses_nothing`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use tandem_tests::epochs::{read_versions, write_epochs, EpochWriter};
use tandem_tests::lab::{run_cmd, Lab, LabOptions};
use tandem_tests::*;

const NBLOCKS: usize = 512;
const MIB: u64 = 1 << 20;

fn snapshot(lab: &Lab, node: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["snapshot"];
    a.extend_from_slice(args);
    tandem_cli(lab, node, &a)
}

fn snapshot_ok(lab: &Lab, node: &str, args: &[&str]) -> String {
    let out = snapshot(lab, node, args);
    assert!(
        out.status.success(),
        "tandem snapshot {args:?} on {node}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn snapshot_err(lab: &Lab, node: &str, args: &[&str]) -> String {
    let out = snapshot(lab, node, args);
    assert!(!out.status.success(), "tandem snapshot {args:?} on {node} should fail");
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn list(lab: &Lab, node: &str) -> Vec<Value> {
    let out = snapshot_ok(lab, node, &["list", "mail", "--json"]);
    serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|e| panic!("snapshot list --json: {e}: {out}"))
}

fn names(lab: &Lab, node: &str) -> Vec<String> {
    list(lab, node).iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

/// Exposes `name` on `node`, hands its device to `f`, and unexposes it again.
fn with_exposed<T>(lab: &Lab, node: &str, name: &str, f: impl FnOnce(&str) -> T) -> T {
    let dev = snapshot_ok(lab, node, &["expose", "mail", name]);
    assert!(dev.starts_with("/dev/loop"), "expose printed {dev:?}");
    let ro = Command::new("blockdev").args(["--getro", &dev]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&ro.stdout).trim(), "1", "{dev} is not read-only");
    let r = f(&dev);
    snapshot_ok(lab, node, &["unexpose", "mail", name]);
    r
}

#[test]
fn snapshots_under_load_are_each_exactly_the_state_after_a_flush() {
    require_real_devices();
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions::default());
    let dev = start_and_promote_alpha(&mut lab, &["alpha", "beta"], all_caught_up);
    let (run, seed) = (rand::random::<u64>(), rand::random::<u64>());
    println!("seed {seed}");
    let writer = Arc::new(EpochWriter::new(NBLOCKS));
    let w = {
        let (dev, writer) = (dev.clone(), writer.clone());
        std::thread::spawn(move || write_epochs(dev, run, seed, writer))
    };
    let mut rng = rand::rng();
    let mut taken = Vec::new();
    for i in 0..12 {
        std::thread::sleep(Duration::from_millis(rng.random_range(20..250)));
        let name = format!("s{i:02}");
        let before = writer.current.load(Ordering::SeqCst);
        assert_eq!(snapshot_ok(&lab, "beta", &["create", "mail", "--name", &name]), name);
        taken.push((name, (before, writer.current.load(Ordering::SeqCst))));
    }
    writer.pause();
    writer.stop.store(true, Ordering::SeqCst);
    let (epochs, writes) = w.join().unwrap().expect("writer failed");
    println!("{epochs} epochs, {writes} writes, {} snapshots", taken.len());
    let log = writer.log.lock().unwrap().clone();

    // Each snapshot, read through its device: exactly after some epoch, in order.
    let listed = list(&lab, "beta");
    assert_eq!(listed.len(), taken.len(), "{listed:#?}");
    let mut last_k = 0;
    let mut last_seq = 0;
    for ((name, (before, after)), s) in taken.iter().zip(&listed) {
        assert_eq!(s["name"], name.as_str());
        assert_eq!(s["state"], "valid", "{s}");
        assert_eq!(s["at_barrier"], true, "taken while the stream ran: at a barrier: {s}");
        let seq = s["seq"].as_u64().unwrap();
        assert!(seq >= last_seq, "stream positions go forward: {seq} after {last_seq}");
        last_seq = seq;
        let image = with_exposed(&lab, "beta", name, |d| read_versions(Path::new(d), 0, NBLOCKS, run));
        let ks = log.exact(&image);
        let fit = log.check(&image);
        assert!(!ks.is_empty(), "snapshot {name} is not the state after any epoch (prefix check: {fit:?})");
        let k = *ks.last().unwrap();
        assert!(k >= last_k, "snapshot {name} (epoch {k}) is older than the one before it (epoch {last_k})");
        // Asked while the writer was in epoch `before`, answered while it was in `after`:
        // the state after the epoch before `before` at the earliest, `after` at the latest.
        assert!(
            k + 1 >= *before && k <= *after,
            "snapshot {name}: epoch {k}, asked during epoch {before}, answered during {after}"
        );
        last_k = k;
    }
    // The standby itself, and the primary, hold the last epoch.
    wait_until(&lab, "alpha", "caught up", secs(30), all_caught_up);
    let want = log.state_after(log.epochs());
    for n in ["alpha", "beta"] {
        let image = read_versions(&lab.image(n), 0, NBLOCKS, run);
        assert!(image.iter().zip(&want).all(|(i, w)| *i == Some(*w)), "{n} lacks the last epoch");
    }
    // Snapshots did not stop replication: every epoch's writes and flushes went through.
    assert!(epochs > taken.len(), "the writer made progress while snapshots were taken");
}

/// Writes files into `dir` one by one — write, fsync the file, fsync the directory — and
/// appends each acknowledged name to `acks` (outside the volume) until `stop` is set.
fn file_per_fsync(dir: PathBuf, acks: PathBuf, stop: Arc<std::sync::atomic::AtomicBool>) -> std::io::Result<u64> {
    let mut log = std::fs::File::create(&acks)?;
    let d = std::fs::File::open(&dir)?;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let name = format!("m{n:06}");
        let mut f = std::fs::File::create(dir.join(&name))?;
        f.write_all(&file_body(n))?;
        f.sync_all()?;
        d.sync_all()?;
        writeln!(log, "{name}")?;
        n += 1;
    }
    log.sync_all()?;
    Ok(n)
}

fn file_body(n: u64) -> Vec<u8> {
    (0..(1024 + (n as usize * 131) % 12000)).map(|j| (j as u64 ^ n.wrapping_mul(2654435761)) as u8).collect()
}

fn acked(acks: &Path) -> Vec<String> {
    std::fs::read_to_string(acks).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn an_ext4_snapshot_under_load_is_clean_and_holds_every_acknowledged_file() {
    require_real_devices();
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions::default());
    let dev = start_and_promote_alpha(&mut lab, &["alpha", "beta"], all_caught_up);
    run_cmd(Command::new("mkfs.ext4").args(["-q", "-F", &dev])).unwrap();
    let mnt = lab.dir.join("mnt");
    lab.mount(&dev, &mnt, "").unwrap();
    let acks = lab.dir.join("acks");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = {
        let (m, a, s) = (mnt.clone(), acks.clone(), stop.clone());
        std::thread::spawn(move || file_per_fsync(m, a, s))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let before = acked(&acks);
    snapshot_ok(&lab, "beta", &["create", "mail", "--name", "under-load"]);
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let total = w.join().unwrap().expect("the writer failed");
    println!("{} files acknowledged before the snapshot, {total} in all", before.len());
    assert!(before.len() > 10 && (total as usize) > before.len(), "the load ran on after the snapshot");

    // Crash-consistent, as the standby itself: its journal still has to be replayed (fsck
    // of the blocks as they are may see a directory converted to an index whose inode is
    // not yet rewritten). With a throwaway overlay, a read-only mount replays it: every
    // file acknowledged before the snapshot is there, whole, and then fsck finds the
    // replayed filesystem clean.
    let digest = |dev: &str| sha256_file(Path::new(dev));
    let before_digest = with_exposed(&lab, "beta", "under-load", digest);
    let snap = snapshot_ok(&lab, "beta", &["expose", "mail", "under-load", "--overlay"]);
    let ro = lab.dir.join("snap-ro");
    lab.mount(&snap, &ro, "ro").unwrap();
    for name in &before {
        let data = std::fs::read(ro.join(name))
            .unwrap_or_else(|e| panic!("{name}, acknowledged before the snapshot: {e}"));
        let n: u64 = name[1..].parse().unwrap();
        assert!(data == file_body(n), "{name} differs in the snapshot");
    }
    lab.umount(&ro).unwrap();
    e2fsck_clean(&snap).unwrap_or_else(|e| panic!("the snapshot, its journal replayed: {e}"));
    snapshot_ok(&lab, "beta", &["unexpose", "mail", "under-load"]);
    // The snapshot itself did not change.
    let after_digest = with_exposed(&lab, "beta", "under-load", digest);
    assert_eq!(before_digest, after_digest, "the overlay's writes reached the snapshot");
    lab.umount(&mnt).unwrap();
}
