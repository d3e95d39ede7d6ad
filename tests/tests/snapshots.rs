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
fn file_per_fsync(
    dir: PathBuf,
    acks: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<u64> {
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

#[test]
fn restore_brings_back_deleted_files_and_the_peer_resyncs_only_the_changed_blocks() {
    require_real_devices();
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions::default());
    let dev = start_and_promote_alpha(&mut lab, &["alpha", "beta"], all_caught_up);
    run_cmd(Command::new("mkfs.ext4").args(["-q", "-F", &dev])).unwrap();
    let mnt = lab.dir.join("mnt");
    lab.mount(&dev, &mnt, "").unwrap();
    let mail = mnt.join("Maildir");
    std::fs::create_dir_all(&mail).unwrap();
    for n in 0..200u64 {
        std::fs::write(mail.join(format!("m{n:06}")), file_body(n)).unwrap();
    }
    run_cmd(&mut Command::new("sync")).unwrap();
    wait_until(&lab, "alpha", "caught up", secs(30), all_caught_up);
    snapshot_ok(&lab, "beta", &["create", "mail", "--name", "before-the-mistake"]);
    // The mistake: half the mailbox deleted, a message that came after.
    for n in (0..200u64).step_by(2) {
        std::fs::remove_file(mail.join(format!("m{n:06}"))).unwrap();
    }
    std::fs::write(mail.join("later"), b"delivered after the snapshot").unwrap();
    run_cmd(&mut Command::new("sync")).unwrap();
    lab.umount(&mnt).unwrap();
    let r = lab.demote("alpha").unwrap();
    assert!(r.ok, "{r:?}");
    wait_until(&lab, "beta", "alpha secondary", secs(30), |r| {
        r.peers[0].peer_role == Some(tandem_agent::status::Role::Secondary)
    });
    let changed = list(&lab, "beta")[0]["blocks"].as_u64().unwrap() * BLOCK as u64;
    assert!(changed > 0, "the deletions changed blocks after the snapshot");
    let sent_before = resync_bytes_sent(&lab, "beta");

    let msg = snapshot_ok(&lab, "beta", &["restore", "mail", "before-the-mistake"]);
    println!("{msg}");
    assert!(msg.contains(&format!("{changed} bytes written back")), "{msg}");
    // Two secondaries: connected, nothing out of sync, alpha up to date (no replication).
    let st = wait_until(&lab, "beta", "alpha resynced", secs(60), |r| {
        let p = &r.peers[0];
        p.connection == "connected"
            && p.out_of_sync_bytes == 0
            && p.peer_disk == Some(tandem_agent::status::DiskState::UpToDate)
            && p.resync.as_ref().is_some_and(|x| !x.active)
    });
    let resynced = resync_bytes_sent(&lab, "beta") - sent_before;
    println!("restored {changed} bytes; resynced to alpha: {resynced} bytes of {}", st.size);
    assert_eq!(resynced, changed, "alpha resyncs exactly the blocks the restore wrote back");
    assert_eq!(
        sha256_file(&lab.image("alpha")),
        sha256_file(&lab.image("beta")),
        "images differ after the resync"
    );

    // Switchover to beta: every deleted message is back, the later one is gone.
    let r = lab.promote("beta", false).unwrap();
    assert!(r.ok, "{r:?}");
    let dev_b = wait_until(&lab, "beta", "device", secs(30), |r| r.device.is_some()).device.unwrap();
    let mnt_b = lab.dir.join("mnt-beta");
    lab.mount(&dev_b, &mnt_b, "").unwrap();
    for n in 0..200u64 {
        let data = std::fs::read(mnt_b.join("Maildir").join(format!("m{n:06}")))
            .unwrap_or_else(|e| panic!("message {n} not back after the restore: {e}"));
        assert!(data == file_body(n), "message {n} differs");
    }
    assert!(!mnt_b.join("Maildir/later").exists(), "a file from after the snapshot survived the restore");
    lab.umount(&mnt_b).unwrap();
    e2fsck_clean(&dev_b).unwrap_or_else(|e| panic!("{e}"));
}

/// Writes `blocks` stamped blocks of `version` from offset 0 (O_DIRECT, then fsync).
fn write_blocks(dev: &str, run: u64, blocks: u64, version: u64) {
    let mut w = BlockWriter::open(dev, run, false);
    for b in 0..blocks {
        while w.written.get(&(b * BLOCK as u64)).is_none_or(|v| *v < version) {
            w.write(b * BLOCK as u64).unwrap();
        }
    }
    w.sync();
}

fn versions_of(dev: &str, run: u64, blocks: usize) -> Vec<Option<u64>> {
    read_versions(Path::new(dev), 0, blocks, run)
}

#[test]
fn snapshots_survive_kill_9_and_retention_keeps_the_newest() {
    require_real_devices();
    let lab0 = new_lab(&["alpha", "beta"], &LabOptions::default());
    let text = std::fs::read_to_string(&lab0.config).unwrap();
    std::fs::write(&lab0.config, with_disk_keys(&text, "beta", "snapshot_schedule = [\"5s:2\"]")).unwrap();
    let mut lab = lab0;
    let dev = start_and_promote_alpha(&mut lab, &["alpha", "beta"], all_caught_up);
    let run = rand::random::<u64>();
    write_blocks(&dev, run, 256, 1);
    snapshot_ok(&lab, "beta", &["create", "mail", "--name", "keep-me"]);
    write_blocks(&dev, run, 256, 2);

    // The schedule takes one every 5 s and keeps the newest 2; the manual one stays.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + secs(90);
    loop {
        let scheduled: Vec<String> = list(&lab, "beta")
            .into_iter()
            .filter(|s| s["kind"] == "scheduled")
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        assert!(scheduled.len() <= 2, "retention keeps 2: {scheduled:?}");
        seen.extend(scheduled.iter().cloned());
        if seen.len() >= 4 && scheduled.len() == 2 {
            let newest: Vec<String> = seen.iter().rev().take(2).rev().cloned().collect();
            assert_eq!(scheduled, newest, "retention deleted the oldest");
            break;
        }
        assert!(Instant::now() < deadline, "only {seen:?} scheduled snapshots in 90 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(names(&lab, "beta").contains(&"keep-me".to_string()), "retention deleted a manual snapshot");

    // kill -9 of the standby's agent while the writer overwrites what the snapshots hold.
    let before: BTreeMap<String, Value> =
        list(&lab, "beta").into_iter().map(|s| (s["name"].as_str().unwrap().to_string(), s)).collect();
    let w = {
        let dev = dev.clone();
        std::thread::spawn(move || write_blocks(&dev, run, 256, 3))
    };
    // Exposed at the time of the kill: the new agent removes the dead devices.
    let exposed = snapshot_ok(&lab, "beta", &["expose", "mail", "keep-me"]);
    std::thread::sleep(Duration::from_millis(100));
    lab.kill9("beta").unwrap();
    w.join().unwrap();
    lab.start("beta").unwrap();
    let loops = run_cmd(Command::new("losetup").arg("-a")).unwrap();
    assert!(
        !loops.lines().any(|l| l.starts_with(&format!("{exposed}:")) && l.contains("snapshot")),
        "the exposure of the killed agent is still attached: {loops}"
    );
    let after: BTreeMap<String, Value> =
        list(&lab, "beta").into_iter().map(|s| (s["name"].as_str().unwrap().to_string(), s)).collect();
    for (name, s) in &before {
        let a = after.get(name).unwrap_or_else(|| panic!("snapshot {name} lost by kill -9: {after:#?}"));
        assert_eq!(a["state"], "valid", "{a}");
        assert_eq!(a["seq"], s["seq"], "{name}");
    }
    // "keep-me" still shows version 1 everywhere, although the copy moved on twice.
    let v = with_exposed(&lab, "beta", "keep-me", |d| versions_of(d, run, 256));
    assert!(v.iter().all(|x| *x == Some(1)), "keep-me after kill -9: {v:?}");
    wait_until(&lab, "alpha", "beta back and caught up", secs(60), all_caught_up);
}

#[test]
fn a_resync_target_keeps_a_snapshot_until_its_resync_ends() {
    require_real_devices();
    let opts = LabOptions { resource_extra: "resync_max_rate = \"2MiB\"".into(), ..Default::default() };
    let mut lab = new_lab(&["alpha", "beta"], &opts);
    let dev = start_and_promote_alpha(&mut lab, &["alpha", "beta"], all_caught_up);
    let run = rand::random::<u64>();
    write_blocks(&dev, run, 1024, 1);
    wait_until(&lab, "alpha", "caught up", secs(30), all_caught_up);
    tandem_ok(&lab, "alpha", &["disconnect", "mail"]);
    write_blocks(&dev, run, 4096, 2); // 16 MiB beta misses: 8 s at 2 MiB/s
    assert!(list(&lab, "beta").is_empty());
    tandem_ok(&lab, "alpha", &["connect", "mail"]);
    // While beta is a resync target it holds the snapshot of its copy before the resync.
    let deadline = Instant::now() + secs(30);
    let snap = loop {
        let l = list(&lab, "beta");
        if let Some(s) = l.iter().find(|s| s["kind"] == "before_resync") {
            break s["name"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no before-resync snapshot on beta: {l:#?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let st = lab.resource_status("beta").unwrap();
    assert!(
        st.disk != "up_to_date" && st.peers[0].replication == "sync_target",
        "beta is a resync target while it has the snapshot: {st:?}"
    );
    let v = with_exposed(&lab, "beta", &snap, |d| versions_of(d, run, 4096));
    assert!(
        v[..1024].iter().all(|x| *x == Some(1)) && v[1024..].iter().all(|x| *x == Some(0)),
        "the snapshot is beta before the resync"
    );
    let err = snapshot_err(&lab, "beta", &["create", "mail"]);
    assert!(err.contains("resync"), "a manual snapshot of a copy mid-resync is refused: {err}");
    // Gone once the resync is done.
    wait_until(&lab, "alpha", "resynced", secs(120), all_caught_up);
    wait_until(&lab, "beta", "up to date", secs(30), |r| r.disk == "up_to_date");
    let deadline = Instant::now() + secs(30);
    while !list(&lab, "beta").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the before-resync snapshot outlived the resync: {:#?}",
            list(&lab, "beta")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(versions_of(lab.image("beta").to_str().unwrap(), run, 4096).iter().all(|x| *x == Some(2)));
}

/// A small tmpfs for a copy's snapshots, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        run_cmd(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tandem-snapshots"])
                .arg(&dir),
        )
        .unwrap();
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // The lab's own cleanup unmounts what is mounted under its directory; this is for a
        // test that fails before the lab is dropped.
        if self.0.exists() {
            let _ =
                Command::new("umount").arg("-l").arg(&self.0).stderr(std::process::Stdio::null()).status();
        }
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_a_full_snapshot_disk_loses_nothing() {
    require_real_devices();
    let lab0 = new_lab(&["alpha", "beta"], &LabOptions::default());
    let small = SmallDisk::mount(lab0.dir.join("beta-snapshots"), "1m");
    let text = std::fs::read_to_string(&lab0.config).unwrap();
    let key = format!("snapshot_dir = \"{}\"", small.0.display());
    std::fs::write(&lab0.config, with_disk_keys(&text, "beta", &key)).unwrap();
    let mut lab = lab0;
    let dev = start_and_promote_alpha(&mut lab, &["alpha", "beta"], all_caught_up);

    let e = snapshot_err(&lab, "alpha", &["create", "mail"]);
    assert!(e.contains("primary") && e.contains("secondary"), "on the primary: {e}");
    let e = snapshot_err(&lab, "beta", &["create", "nosuch"]);
    assert!(e.contains("no resource \"nosuch\""), "{e}");
    let e = snapshot_err(&lab, "beta", &["create", "mail", "--name", "../../etc"]);
    assert!(e.contains("not a snapshot name"), "{e}");
    for op in ["delete", "expose", "restore", "unexpose"] {
        let e = snapshot_err(&lab, "beta", &[op, "mail", "nosuch"]);
        assert!(e.contains("nosuch"), "{op}: {e}");
    }
    snapshot_ok(&lab, "beta", &["create", "mail", "--name", "small"]);
    let e = snapshot_err(&lab, "beta", &["create", "mail", "--name", "small"]);
    assert!(e.contains("exists already"), "{e}");

    // 4 MiB of new blocks: more than the 1 MiB the snapshot may use.
    let run = rand::random::<u64>();
    write_blocks(&dev, run, 1024, 1);
    wait_until(&lab, "alpha", "caught up", secs(30), all_caught_up);
    let s = &list(&lab, "beta")[0];
    assert_eq!(s["state"], "invalid", "{s}");
    assert!(s["invalid_reason"].as_str().unwrap().contains("No space left"), "{s}");
    let e = snapshot_err(&lab, "beta", &["expose", "mail", "small"]);
    assert!(e.contains("invalid"), "{e}");
    // Replication never noticed: both copies hold every write.
    for n in ["alpha", "beta"] {
        let v = versions_of(lab.image(n).to_str().unwrap(), run, 1024);
        assert!(v.iter().all(|x| *x == Some(1)), "{n} lost writes");
    }
    let st = lab.resource_status("beta").unwrap();
    assert_eq!(st.stats.standby_io_errors, 0);
    assert_eq!(st.snapshots.count - st.snapshots.valid, 1);
    snapshot_ok(&lab, "beta", &["delete", "mail", "small"]);
    assert!(list(&lab, "beta").is_empty());
    drop(small);
    drop(lab);
}
