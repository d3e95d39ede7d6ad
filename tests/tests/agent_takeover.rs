//! Restarting or upgrading the primary's agent without taking its filesystem down: the
//! descriptor holder keeps the FUSE connection while no agent runs, application requests
//! wait in the kernel, and the next agent takes the connection over. All real: agent and
//! holder processes, `kill -9`, loop devices over FUSE, ext4 with a file-per-fsync writer.
//!
//! - `kill9_agent_under_load_is_a_pause_not_an_error`: the primary's agent is killed and
//!   started again, several times at random instants, under the load: the writer never
//!   sees an error, the kernel logs nothing about the device, every acknowledged file is
//!   intact, the standby gets a delta resync only, the filesystem is clean, the images are
//!   equal. `TANDEM_TAKEOVER_SEED` repeats a run, `TANDEM_TAKEOVER_ITERATIONS` (default 5)
//!   sets the number of kills.
//! - `planned_restart_under_load_prints_the_pause`: `tandem restart`, the same checks.
//! - `grace_exceeded_fails_requests_with_eio_and_loses_nothing`: no agent within the grace
//!   time: requests fail (EIO, or EROFS once ext4 met an EIO first) only then, the promoted
//!   standby holds every file, and the old primary returns as a secondary as after a crash.
//! - `holder_killed_too_behaves_as_a_node_crash`: I/O errors, failover, and the old primary
//!   returns as a secondary that cleans the dead mount up and resyncs.
//!
//! Figures (pauses, re-sent requests, bytes resynced) are printed; see them with
//! `--nocapture`.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use tandem_agent::status::{ResourceStatus, TakeoverStatus};
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const MIB: u64 = 1 << 20;
/// Large enough that the bound on the resync below (half the volume, over every takeover
/// of a run) is far from what a delta resync moves and far below one full resync.
const SIZE: u64 = 256 * MIB;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A lab of alpha and beta in sync mode with the holder's grace time `grace` (e.g. "60s").
/// 1 MiB activity-log extents: the resync after a takeover covers whole hot extents.
fn takeover_lab(grace: &str) -> Lab {
    new_lab(
        &["alpha", "beta"],
        &LabOptions {
            size: SIZE,
            extra_options: format!("takeover_grace = \"{grace}\""),
            resource_extra: "al_extent_size = \"1MiB\"".into(),
            ..Default::default()
        },
    )
}

/// Up to date, and every peer connected, replicating and owed nothing (requests may be in
/// flight: the load goes on).
fn in_sync(r: &ResourceStatus) -> bool {
    r.disk == "up_to_date"
        && !r.peers.is_empty()
        && r.peers.iter().all(|p| {
            p.connection == "connected" && p.replication == "established" && p.out_of_sync_bytes == 0
        })
}

/// Starts both agents, promotes alpha, waits until beta is in sync, makes ext4 on alpha's
/// device and mounts it (tracked by the lab for cleanup); returns the device and the mount.
fn up_with_ext4(lab: &mut Lab) -> (String, PathBuf) {
    let dev = start_and_promote_alpha(lab, &["alpha", "beta"], in_sync);
    mkfs_ext4_for_load(&dev);
    let mnt = lab.dir.join("mnt");
    lab.mount(&dev, &mnt, "").unwrap();
    (dev, mnt)
}

/// The content of file `n` of a run: a header that names it and its length, then bytes
/// that depend on the run and `n` — a file found under another name, truncated, or from
/// another run does not match.
fn file_body(run: u64, n: u64) -> Vec<u8> {
    let len = 4096 + ((n.wrapping_mul(2654435761) ^ run) % 12288) as usize;
    let mut body = format!("tandem takeover test: run {run:016x} file {n} length {len}\n").into_bytes();
    let mut x = (run ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    while body.len() < len {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.extend_from_slice(&x.to_le_bytes());
    }
    body.truncate(len);
    body
}

fn file_name(n: u64) -> String {
    format!("f{n:07}")
}

fn sha_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// The writer's first error, and when and where it came.
#[derive(Debug, Clone)]
struct WriterError {
    file: String,
    step: &'static str,
    error: String,
    errno: Option<i32>,
    at: Instant,
    /// The test's phase (e.g. its iteration) when it came.
    phase: u64,
}

/// Files written one by one into a directory of the volume — create, write, fsync the
/// file, fsync the directory — each acknowledged file (name and checksum) appended to a
/// log outside the volume (the lab's `acks`, for inspection with TANDEM_KEEP_LAB=1) and
/// kept in memory, until it is stopped or an operation fails.
struct FileWriter {
    stop: Arc<AtomicBool>,
    /// Acknowledged files: (n, sha256 of the content).
    acked: Arc<Mutex<Vec<(u64, String)>>>,
    error: Arc<Mutex<Option<WriterError>>>,
    /// Set by the test: what it is doing (recorded with an error).
    phase: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl FileWriter {
    fn start(dir: PathBuf, acks: PathBuf, run: u64) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let phase = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, acked, error, phase) = (stop.clone(), acked.clone(), error.clone(), phase.clone());
            std::thread::spawn(move || {
                let mut log = File::create(&acks).expect("create the acknowledgement log");
                let fail = |file: &str, step: &'static str, e: std::io::Error| {
                    *error.lock().unwrap() = Some(WriterError {
                        file: file.to_string(),
                        step,
                        errno: e.raw_os_error(),
                        error: e.to_string(),
                        at: Instant::now(),
                        phase: phase.load(Ordering::SeqCst),
                    });
                };
                let d = match File::open(&dir) {
                    Ok(d) => d,
                    Err(e) => return fail("", "open the directory", e),
                };
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let name = file_name(n);
                    let body = file_body(run, n);
                    let mut f = match File::create(dir.join(&name)) {
                        Ok(f) => f,
                        Err(e) => return fail(&name, "create", e),
                    };
                    if let Err(e) = f.write_all(&body) {
                        return fail(&name, "write", e);
                    }
                    if let Err(e) = f.sync_all() {
                        return fail(&name, "fsync", e);
                    }
                    if let Err(e) = d.sync_all() {
                        return fail(&name, "fsync the directory", e);
                    }
                    let sum = sha_hex(&body);
                    writeln!(log, "{name} {sum}").expect("append to the acknowledgement log");
                    acked.lock().unwrap().push((n, sum));
                    n += 1;
                }
            })
        };
        FileWriter { stop, acked, error, phase, handle: Some(handle) }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn error(&self) -> Option<WriterError> {
        self.error.lock().unwrap().clone()
    }

    fn set_phase(&self, phase: u64) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Panics if the writer failed.
    fn assert_no_error(&self, context: &str) {
        if let Some(e) = self.error() {
            self.stop.store(true, Ordering::SeqCst);
            panic!("{context}: the writer failed (phase {}): {e:?}", e.phase);
        }
    }

    /// Waits (`timeout` at most: a hang detector) until more than `count` files are
    /// acknowledged, or the writer fails.
    fn wait_beyond(&self, count: usize, timeout: Duration, context: &str) {
        let deadline = Instant::now() + timeout;
        while self.acked_count() <= count {
            self.assert_no_error(context);
            if Instant::now() > deadline {
                self.stop.store(true, Ordering::SeqCst);
                panic!("{context}: no file acknowledged in {timeout:?} (after {count})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (`timeout` at most: a hang detector) until the writer has failed.
    fn wait_error(&self, timeout: Duration, context: &str) -> WriterError {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.error() {
                return e;
            }
            if Instant::now() > deadline {
                self.stop.store(true, Ordering::SeqCst);
                panic!("{context}: the writer saw no error within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the writer and returns the acknowledged files.
    fn finish(mut self) -> Vec<(u64, String)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("the writer thread panicked");
        }
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        // A failing test must not leave the thread writing into a filesystem the lab unmounts.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Every acknowledged file under `dir` (a filesystem mounted after the writer's, so read
/// from the device, not from the writer's page cache) with its content and checksum;
/// returns what is missing or differs.
fn check_files(dir: &Path, run: u64, acked: &[(u64, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (n, sum) in acked {
        let name = file_name(*n);
        match std::fs::read(dir.join(&name)) {
            Err(e) => problems.push(format!("{name}: {e}")),
            Ok(data) => {
                if sha_hex(&data) != *sum {
                    problems.push(format!("{name}: checksum differs from the acknowledged one"));
                } else if data != file_body(run, *n) {
                    problems.push(format!("{name}: content is not file {n} of run {run:x}"));
                }
            }
        }
    }
    problems
}

/// Mounts `dev` read-only at `mnt` (the filesystem unmounted before, so nothing is cached),
/// checks the acknowledged files in its `mail/`, unmounts; panics with the problems.
fn assert_files_on(lab: &mut Lab, dev: &str, mnt: &Path, run: u64, acked: &[(u64, String)], what: &str) {
    // Cached blocks of the device would hide what is on it.
    let _ = Command::new("blockdev").args(["--flushbufs", dev]).status();
    lab.mount(dev, mnt, "ro").unwrap();
    let problems = check_files(&mnt.join("mail"), run, acked);
    lab.umount(mnt).unwrap();
    assert!(
        problems.is_empty(),
        "{what}: {} of {} acknowledged files missing or damaged:\n{}",
        problems.len(),
        acked.len(),
        problems.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
    println!("{what}: all {} acknowledged files intact", acked.len());
}

/// The kernel log, read from /dev/kmsg: records after sequence number `after`, and the last
/// sequence number.
fn kernel_log_since(after: Option<u64>) -> (Vec<String>, Option<u64>) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .expect("open /dev/kmsg (the test needs to read the kernel log)");
    let mut lines = Vec::new();
    let mut last = after;
    let mut buf = vec![0u8; 16384];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                // "PRIORITY,SEQ,USEC,FLAGS;MESSAGE\n continuation lines"
                let rec = String::from_utf8_lossy(&buf[..k]).to_string();
                let Some((head, msg)) = rec.split_once(';') else { continue };
                let Some(seq) = head.split(',').nth(1).and_then(|s| s.parse::<u64>().ok()) else {
                    continue;
                };
                if after.is_none_or(|a| seq > a) {
                    lines.push(msg.trim_end().to_string());
                }
                last = Some(last.map_or(seq, |l| l.max(seq)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            // Records overwritten while we read: the next read goes on after them.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) => panic!("read /dev/kmsg: {e}"),
        }
    }
    (lines, last)
}

/// Kernel log lines since `mark` that are about `dev` (e.g. "/dev/loop3": any line naming
/// "loop3" — I/O errors, "EXT4-fs error (device loop3)", "JBD2: ... loop3-8") or that
/// report an error of any device without naming it.
fn kernel_complaints(mark: Option<u64>, dev: &str) -> Vec<String> {
    let name = dev.trim_start_matches("/dev/");
    let names_dev = |l: &str| {
        l.match_indices(name).any(|(i, _)| {
            // "loop3" but not "loop30"
            !l[i + name.len()..].starts_with(|c: char| c.is_ascii_digit())
        })
    };
    kernel_log_since(mark).0.into_iter().filter(|l| names_dev(l)).collect()
}

/// Other devices' errors in the same window (other tests may run): printed, not asserted.
fn other_errors(mark: Option<u64>) -> Vec<String> {
    kernel_log_since(mark)
        .0
        .into_iter()
        .filter(|l| l.contains("I/O error") || l.contains("EXT4-fs error") || l.contains("JBD2"))
        .collect()
}

/// Waits until `node` is primary on `dev` again with a takeover in its status, failing at
/// once if the writer fails meanwhile.
fn wait_taken_over(lab: &Lab, node: &str, dev: &str, writer: &FileWriter, context: &str) -> TakeoverStatus {
    let deadline = Instant::now() + secs(60);
    loop {
        writer.assert_no_error(context);
        let st = lab.resource_status(node).ok();
        if let Some(st) = st.as_ref().filter(|s| s.role == "primary" && s.device.is_some()) {
            assert_eq!(
                st.device.as_deref(),
                Some(dev),
                "{context}: the new agent serves another device: no takeover of the held connection"
            );
            if let Some(t) = st.takeover {
                return t;
            }
        }
        if Instant::now() > deadline {
            writer.stop.store(true, Ordering::SeqCst);
            panic!(
                "{context}: {node} is not primary with a takeover after 60 s; status: {st:#?}\nlog:\n{}",
                lab.log_text(node)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The resource's mountpoint of FUSE files on `node` (`<run_dir>/fuse/mail`).
fn fuse_mountpoint(lab: &Lab, node: &str) -> PathBuf {
    lab.run_dir(node).join("fuse").join("mail")
}

fn is_mounted(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&p))
}

/// A pair under load: `takeover_lab(grace)`, ext4 mounted on alpha's device, the kernel
/// log's position after the mount, and a file-per-fsync writer (run `run`) that has
/// acknowledged more than 10 files.
struct Loaded {
    lab: Lab,
    dev: String,
    mnt: PathBuf,
    mark: Option<u64>,
    writer: FileWriter,
}

fn loaded(grace: &str, run: u64, what: &str) -> Loaded {
    let mut lab = takeover_lab(grace);
    let (dev, mnt) = up_with_ext4(&mut lab);
    let (_, mark) = kernel_log_since(None);
    let writer = FileWriter::start(mnt.join("mail"), lab.dir.join("acks"), run);
    writer.wait_beyond(10, secs(60), what);
    Loaded { lab, dev, mnt, mark, writer }
}

#[test]
fn kill9_agent_under_load_is_a_pause_not_an_error() {
    let iterations = env_u64("TANDEM_TAKEOVER_ITERATIONS").unwrap_or(5);
    let seed = env_u64("TANDEM_TAKEOVER_SEED").unwrap_or_else(rand::random);
    println!("takeover: {iterations} kills, seed {seed} (TANDEM_TAKEOVER_SEED={seed} repeats the run)");
    let mut rng = StdRng::seed_from_u64(seed);
    let run: u64 = rng.random();
    let Loaded { mut lab, dev, mnt, mark, writer } = loaded("60s", run, "before the first kill");
    // The first agent's own resync (none is expected on a new pair) is no takeover's.
    let initial_resync = resync_bytes_sent(&lab, "alpha");
    let mut resynced = 0u64;
    let mut figures = Vec::new();
    for it in 1..=iterations {
        writer.set_phase(it);
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
        writer.assert_no_error(&format!("iteration {it}, before the kill"));
        let hot = lab.resource_status("alpha").unwrap().stats.al_hot_extents;
        let holder = lab.holder_pid("alpha");
        assert!(holder.is_some(), "iteration {it}: no holder runs for alpha:\n{}", lab.log_text("alpha"));
        let before = writer.acked_count();
        lab.kill9_agent("alpha").unwrap();
        let away = Duration::from_millis(rng.random_range(0..800));
        std::thread::sleep(away);
        lab.start("alpha").unwrap();
        let t = wait_taken_over(&lab, "alpha", &dev, &writer, &format!("iteration {it}"));
        // Not a speed assertion: the old agent was reaped before the wait and the new one
        // started after it, so the device had no agent for all of `away` at least.
        assert!(
            Duration::from_millis(t.paused_ms) >= away,
            "iteration {it}: the status reports a pause of {} ms, but alpha had no agent for {away:?}: {t:?}",
            t.paused_ms
        );
        assert_eq!(lab.holder_pid("alpha"), holder, "iteration {it}: the holder was replaced");
        // The writer goes on, without an error.
        writer.wait_beyond(
            writer.acked_count().max(before),
            secs(60),
            &format!("iteration {it}, after the takeover"),
        );
        // This agent's resync (the activity log's extents) ends before the next kill.
        wait_until(&lab, "alpha", "beta in sync after the takeover", secs(120), in_sync);
        let moved = resync_bytes_sent(&lab, "alpha");
        resynced += moved;
        // A takeover resyncs the activity log's hot extents (this load keeps 10-30 of 1 MiB
        // hot); a full resync would move the whole volume. A quarter of it is far above
        // the one and far below the other.
        assert!(
            moved < SIZE / 4,
            "iteration {it}: {moved} bytes resynced after the takeover: not a delta of the activity log \
             ({hot} hot 1 MiB extents at the kill, volume {SIZE})"
        );
        println!(
            "iteration {it}: away {away:?}; paused {} ms, {} requests re-sent, {} waited; \
             {hot} hot 1 MiB extents at the kill, {moved} bytes resynced",
            t.paused_ms, t.resent, t.waited
        );
        figures.push((t.paused_ms, t.resent, moved));
    }
    writer.assert_no_error("after the last takeover");
    let acked = writer.finish();
    let complaints = kernel_complaints(mark, &dev);
    let others = other_errors(mark);
    if !others.is_empty() {
        println!("kernel errors in the same time (other devices):\n{}", others.join("\n"));
    }
    assert!(
        complaints.is_empty(),
        "the kernel logged about {dev} during the takeovers:\n{}",
        complaints.join("\n")
    );
    let st = wait_until(&lab, "alpha", "beta caught up", secs(120), all_caught_up);
    assert_eq!(st.peers[0].out_of_sync_bytes, 0);
    // Over the run: every takeover's delta together is still below half the volume (with
    // the default 5 kills; one full resync alone would exceed it).
    println!(
        "{} files acknowledged; {resynced} bytes resynced in {iterations} takeovers ({:.1} % of the {SIZE} byte volume); initial resync {initial_resync}",
        acked.len(),
        resynced as f64 * 100.0 / SIZE as f64
    );
    assert!(
        resynced < SIZE / 2 * iterations.div_ceil(5),
        "{resynced} bytes resynced after {iterations} takeovers: not a delta of the activity log (volume {SIZE})"
    );
    lab.umount(&mnt).unwrap();
    e2fsck_clean(&dev).unwrap_or_else(|e| panic!("{e}"));
    let check = lab.dir.join("mnt-check");
    assert_files_on(&mut lab, &dev, &check, run, &acked, "alpha after the takeovers");
    wait_until(&lab, "alpha", "idle and caught up", secs(60), all_caught_up);
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
    let pauses: Vec<u64> = figures.iter().map(|f| f.0).collect();
    let resent: Vec<u64> = figures.iter().map(|f| f.1).collect();
    println!("pauses (ms) {pauses:?}; re-sent {resent:?}");
}

/// Parses "mail: taken over after a pause of 412 ms (3 requests re-sent)": the pause in ms
/// and the re-sent requests.
fn parse_restart_line(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().find(|l| l.starts_with("mail:"))?;
    let pause = line.split("pause of ").nth(1)?.split(" ms").next()?.trim().parse().ok()?;
    let resent = line.split('(').nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some((pause, resent))
}

/// `tandem restart` on `node`, killed after 120 s (a hang detector, not a speed assertion).
fn restart(lab: &Lab, node: &str) -> std::process::Output {
    Command::new("timeout")
        .args(["--signal=KILL", "120"])
        .arg(lab.exe())
        .arg("--config")
        .arg(&lab.config)
        .args(["--node", node, "restart"])
        .output()
        .expect("run tandem restart")
}

#[test]
fn planned_restart_under_load_prints_the_pause() {
    let seed = env_u64("TANDEM_TAKEOVER_SEED").unwrap_or_else(rand::random);
    println!("restart: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let run: u64 = rng.random();
    let Loaded { mut lab, dev, mnt, mark, writer } = loaded("60s", run, "before the first restart");
    let pid = lab.pid("alpha");
    for it in 1..=3 {
        writer.set_phase(it);
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
        let before = writer.acked_count();
        let out = restart(&lab, "alpha");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "restart {it}: tandem restart failed: {stdout}{stderr}\n{}",
            lab.log_text("alpha")
        );
        let (pause, resent) = parse_restart_line(&stdout)
            .unwrap_or_else(|| panic!("restart {it}: no line \"mail: taken over after a pause of N ms (M requests re-sent)\" in: {stdout}"));
        println!("restart {it}: {}", stdout.trim());
        println!("restart {it}: paused {pause} ms, {resent} requests re-sent");
        // The same process (exec), so the lab's handle is still the agent's.
        assert_eq!(lab.pid("alpha"), pid);
        let t = wait_taken_over(&lab, "alpha", &dev, &writer, &format!("restart {it}"));
        assert_eq!((t.paused_ms, t.resent), (pause, resent), "restart {it}: the status and the CLI disagree");
        writer.wait_beyond(before.max(writer.acked_count()), secs(60), &format!("restart {it}"));
        wait_until(&lab, "alpha", "beta in sync after the restart", secs(120), in_sync);
        println!("restart {it}: {} bytes resynced", resync_bytes_sent(&lab, "alpha"));
        // A planned restart drains and records an empty activity log: the new agent has
        // nothing to mark (what it resyncs is only what it wrote before the standby was
        // back), unlike after a kill.
        let log = lab.log_text("alpha");
        assert_eq!(
            log.matches("its activity log is empty: nothing to resync").count() as u64,
            it,
            "restart {it}: the handover was not clean:\n{log}"
        );
    }
    writer.assert_no_error("after the restarts");
    let acked = writer.finish();
    let complaints = kernel_complaints(mark, &dev);
    assert!(
        complaints.is_empty(),
        "the kernel logged about {dev} during the restarts:\n{}",
        complaints.join("\n")
    );
    lab.umount(&mnt).unwrap();
    e2fsck_clean(&dev).unwrap_or_else(|e| panic!("{e}"));
    let check = lab.dir.join("mnt-check");
    assert_files_on(&mut lab, &dev, &check, run, &acked, "alpha after the restarts");
    wait_until(&lab, "alpha", "idle and caught up", secs(120), all_caught_up);
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
}

/// After the primary's writer failed: detaches alpha's dead filesystem, promotes beta and
/// checks every acknowledged file there, then that beta's filesystem is clean. Returns
/// beta's device.
fn fail_over_to_beta(lab: &mut Lab, mnt: &Path, run: u64, acked: &[(u64, String)]) -> String {
    lab.umount_lazy(mnt).unwrap();
    wait_until(lab, "beta", "alpha gone", secs(60), |r| r.peers[0].connection != "connected");
    let st = lab.resource_status("beta").unwrap();
    assert_eq!(st.disk, "up_to_date", "sync mode: the standby of a dead primary is up to date");
    let r = lab.promote("beta", false).unwrap();
    assert!(r.ok, "promotion of the up-to-date standby refused: {r:?}");
    let dev_b = wait_until(lab, "beta", "device", secs(30), |r| r.device.is_some()).device.unwrap();
    // The journal is replayed by a read-write mount; then the files, then fsck.
    let mnt_b = lab.dir.join("mnt-beta");
    lab.mount(&dev_b, &mnt_b, "").unwrap();
    lab.umount(&mnt_b).unwrap();
    assert_files_on(lab, &dev_b, &mnt_b, run, acked, "beta after the failover");
    e2fsck_clean(&dev_b).unwrap_or_else(|e| panic!("beta's filesystem after the failover: {e}"));
    dev_b
}

/// After a failover to beta: alpha's agent starts again, removes its dead FUSE mount (and
/// the loop device on it), comes up secondary without a takeover (nothing was held) and
/// takes a delta resync from beta; then the images are equal.
fn alpha_returns_as_secondary(lab: &mut Lab, what: &str) {
    let sent_before = resync_bytes_sent(lab, "beta");
    lab.start("alpha").unwrap();
    assert!(
        lab.log_text("alpha").contains("removing FUSE mount left by a previous agent"),
        "the restarted alpha did not clean its dead mount up:\n{}",
        lab.log_text("alpha")
    );
    let st = lab.resource_status("alpha").unwrap();
    assert_eq!(st.role, "secondary", "{what} came back as primary");
    assert_eq!(st.device, None);
    assert!(st.takeover.is_none(), "nothing was held: no takeover: {:?}", st.takeover);
    assert!(!is_mounted(&fuse_mountpoint(lab, "alpha")), "alpha's dead FUSE mount is still there");
    wait_until(lab, "beta", "alpha resynced", secs(120), all_caught_up);
    wait_until(lab, "alpha", "up to date", secs(60), |r| r.disk == "up_to_date");
    let moved = resync_bytes_sent(lab, "beta") - sent_before;
    println!("alpha resynced from beta: {moved} bytes of {SIZE}");
    assert!(moved > 0, "{what}'s activity-log extents must be resynced from beta");
    assert!(moved < SIZE / 4, "{moved} bytes resynced: not a delta");
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
}

/// The writer's error came from the device: EIO, or EROFS once ext4 has met an EIO in its
/// journal first and remounted read-only (errors=remount-ro).
fn assert_device_failed(e: &WriterError, when: &str) {
    assert!(
        matches!(e.errno, Some(libc::EIO) | Some(libc::EROFS)),
        "requests fail with EIO (or EROFS after ext4's own EIO) {when}: {e:?}"
    );
}

#[test]
fn grace_exceeded_fails_requests_with_eio_and_loses_nothing() {
    let grace = Duration::from_secs(2);
    let run: u64 = rand::random();
    let Loaded { mut lab, dev, mnt, writer, .. } = loaded("2s", run, "before the kill");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(lab.holder_pid("alpha").is_some(), "no holder runs for alpha:\n{}", lab.log_text("alpha"));
    writer.set_phase(1);
    // Taken before the kill: the grace time starts after it.
    let killed = Instant::now();
    lab.kill9_agent("alpha").unwrap();
    // Not a speed assertion: a hang detector.
    let e = writer.wait_error(grace + secs(30), "no agent after the grace time");
    let after = e.at.saturating_duration_since(killed);
    println!("the writer failed {after:?} after the kill ({} of {}): {}", e.step, e.file, e.error);
    // Requests waited while the holder kept the connection: no error before the grace time
    // (which starts when the agent is gone, after the kill).
    assert!(after >= grace, "the writer failed {after:?} after the kill, within the grace time: {e:?}");
    assert_device_failed(&e, "after the grace time");
    let acked = writer.finish();
    println!("{} files acknowledged before the error", acked.len());
    let dev_b = fail_over_to_beta(&mut lab, &mnt, run, &acked);
    println!(
        "alpha's device was {dev}, beta's is {dev_b}; holder of alpha now: {:?}",
        lab.holder_pid("alpha")
    );
    alpha_returns_as_secondary(&mut lab, "the primary whose agent stayed away");
}

#[test]
fn holder_killed_too_behaves_as_a_node_crash() {
    let run: u64 = rand::random();
    let Loaded { mut lab, dev, mnt, writer, .. } = loaded("60s", run, "before the crash");
    std::thread::sleep(Duration::from_millis(1000));
    let holder = lab.holder_pid("alpha");
    assert!(
        holder.is_some(),
        "no holder runs for alpha: the crash would not kill one:\n{}",
        lab.log_text("alpha")
    );
    writer.set_phase(1);
    let sent_before = resync_bytes_sent(&lab, "alpha");
    lab.kill9("alpha").unwrap();
    let killed = Instant::now();
    assert_eq!(lab.holder_pid("alpha"), None, "the holder survived the node crash");
    let e = writer.wait_error(secs(30), "after the node crash");
    println!(
        "the writer failed {:?} after the crash ({} of {}): {}",
        e.at.saturating_duration_since(killed),
        e.step,
        e.file,
        e.error
    );
    assert_device_failed(&e, "after the node crash");
    let acked = writer.finish();
    println!("{} files acknowledged before the crash; alpha sent {sent_before} resync bytes", acked.len());
    let dev_b = fail_over_to_beta(&mut lab, &mnt, run, &acked);

    alpha_returns_as_secondary(&mut lab, "the crashed primary");
    println!("alpha's device was {dev}, beta's is {dev_b}");
}
