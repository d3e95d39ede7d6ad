//! What snapshots on the standby cost.
//!
//! `--configs sync-snap1,sync-snap10`: `sync` with 1 or 10 snapshots on beta, each taken
//! with `tandem snapshot create mail` after a few MiB of O_DIRECT writes on alpha, so every
//! one holds blocks of its own. Before each timed workload the oldest snapshot is deleted
//! (the oldest goes without copying) and a fresh one taken, so beta always holds the same
//! number and every workload runs against a freshly snapshotted standby: each block's
//! first write after the newest snapshot costs a copy on beta (read the old block, append
//! it to the snapshot's block file, fdatasync), later writes to it cost nothing. A snapshot
//! taken only once, before all three workloads, would hide that cost from the later ones.
//! fio's random workloads keep a map of the blocks written and write none twice before all
//! were, so in W1 and W2 every write is a first write (the worst case); W3 sweeps the
//! volume and copies only during its first sweep.
//! After each workload the space of beta's snapshots (`tandem snapshot list mail --json`,
//! `bytes_used`) is recorded next to the bytes beta applied during it.
//!
//! `--snapshot-space`: a mail-like workload on ext4 on alpha's device — Maildir deliveries
//! (write, fsync, rename into new/, fsync the directory), an appended and fdatasync'd index
//! log per mailbox, messages moved to cur/ and deleted — with a snapshot on beta every
//! `--snapshot-interval` seconds, taken while the workload runs. Snapshot k holds the old
//! contents of every block first written between it and snapshot k+1, so its `bytes_used`
//! is the price of that interval, set against the bytes the workload wrote in it (the
//! application's) and the bytes beta applied (the filesystem's, journal included).

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use tandem_agent::daemon::resource::SnapshotStatus;
use tandem_tests::lab::{run_cmd, Lab, LabOptions};

use crate::Args;

/// The standby the snapshots are taken on.
const STANDBY: &str = "beta";

/// Runs `tandem --node beta snapshot ARGS...`; returns its stdout.
fn snapshot_cli(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = Command::new(lab.exe())
        .arg("--config")
        .arg(&lab.config)
        .args(["--node", STANDBY, "snapshot"])
        .args(args)
        .output()
        .context("running tandem snapshot")?;
    if !out.status.success() {
        bail!(
            "tandem snapshot {args:?} on {STANDBY} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn create(lab: &Lab, name: &str) -> Result<()> {
    snapshot_cli(lab, &["create", "mail", "--name", name]).map(drop)
}

/// Beta's snapshots, oldest first, with their space.
pub fn list(lab: &Lab) -> Result<Vec<SnapshotStatus>> {
    let out = snapshot_cli(lab, &["list", "mail", "--json"])?;
    let list: Vec<SnapshotStatus> = serde_json::from_str(&out).context("snapshot list --json")?;
    if let Some(bad) = list.iter().find(|s| s.state != "valid") {
        bail!("snapshot {} on {STANDBY} is {}: {:?}", bad.name, bad.state, bad.invalid_reason);
    }
    Ok(list)
}

fn replicated_bytes(lab: &Lab) -> Result<u64> {
    Ok(lab.resource_status(STANDBY)?.stats.replicated_bytes)
}

/// Space of beta's snapshots after one workload.
#[derive(Debug, Clone)]
pub struct Space {
    pub held: usize,
    /// Bytes beta applied during the workload (fio's ramp included).
    pub written: u64,
    /// Blocks the fresh snapshot copied during the workload, in bytes.
    pub copied: u64,
    pub newest_used: u64,
    pub all_used: u64,
}

/// Beta's snapshots in a `sync-snapN` configuration.
pub struct Standby {
    /// The primary's device.
    dev: String,
    names: VecDeque<String>,
    taken: usize,
    written_before: u64,
}

impl Standby {
    /// Takes `count` snapshots on beta, each followed by 4 MiB of random data written with
    /// O_DIRECT (and an fsync) on `dev`, to a region of its own: each snapshot then holds
    /// 4 MiB of old blocks.
    pub fn prepare(lab: &Lab, dev: &str, count: usize) -> Result<Self> {
        let mut s = Self { dev: dev.to_string(), names: VecDeque::new(), taken: 0, written_before: 0 };
        for i in 0..count {
            s.take(lab)?;
            run_cmd(
                Command::new("dd")
                    .args(["if=/dev/urandom", &format!("of={dev}"), "bs=1M", "count=4"])
                    .arg(format!("seek={}", 4 * i))
                    .args(["oflag=direct", "conv=fsync,notrunc", "status=none"]),
            )?;
        }
        let list = list(lab)?;
        if list.len() != count || list.iter().any(|x| x.blocks == 0) {
            bail!("expected {count} snapshots holding blocks on {STANDBY}, found {list:?}");
        }
        Ok(s)
    }

    fn take(&mut self, lab: &Lab) -> Result<()> {
        let name = format!("bench-{}", self.taken);
        create(lab, &name)?;
        self.taken += 1;
        self.names.push_back(name);
        Ok(())
    }

    /// Before a workload: the oldest snapshot deleted, a fresh one taken. The primary's
    /// device is flushed first: a workload may end with writes after its last flush (fio
    /// stops between a write and its fsync), and a snapshot waits for a barrier, which only
    /// a flush from the primary makes.
    pub fn rotate(&mut self, lab: &Lab) -> Result<()> {
        let oldest = self.names.pop_front().context("no snapshot to rotate")?;
        snapshot_cli(lab, &["delete", "mail", &oldest])?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.dev)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", self.dev))?;
        self.take(lab)?;
        self.written_before = replicated_bytes(lab)?;
        Ok(())
    }

    /// After a workload: what the snapshots take now.
    pub fn space(&self, lab: &Lab) -> Result<Space> {
        let written = replicated_bytes(lab)? - self.written_before;
        let list = list(lab)?;
        let newest = list.last().context("no snapshots")?;
        if Some(&newest.name) != self.names.back() {
            bail!("the newest snapshot is {}, not {:?}", newest.name, self.names.back());
        }
        Ok(Space {
            held: list.len(),
            written,
            copied: newest.blocks * 4096,
            newest_used: newest.bytes_used,
            all_used: list.iter().map(|s| s.bytes_used).sum(),
        })
    }
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

/// The space table of the `sync-snapN` configurations.
pub fn space_table(rows: &[crate::fio::Row]) -> String {
    let mut s = String::from(
        "| config | workload | snapshots on beta | MB beta applied | MB copied into the fresh snapshot | copied / applied | fresh snapshot bytes_used | all snapshots bytes_used |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let Some(p) = &r.snapshot else { continue };
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.0} % | {} | {} |\n",
            r.config,
            r.workload,
            p.held,
            mb(p.written),
            mb(p.copied),
            100.0 * p.copied as f64 / p.written.max(1) as f64,
            p.newest_used,
            p.all_used,
        );
    }
    s
}

// ---- --snapshot-space ----

const MAILBOXES: usize = 20;

/// What the mail workload has written so far, and how.
#[derive(Default)]
struct MailCounters {
    bytes: AtomicU64,
    delivered: AtomicU64,
    moved: AtomicU64,
    deleted: AtomicU64,
}

fn message(rng: &mut impl Rng, i: u64) -> Vec<u8> {
    const WORDS: &[&str] =
        &["meeting", "invoice", "attached", "please", "review", "the", "report", "thanks", "regards", "team"];
    let mut m = format!(
        "Return-Path: <s{i}@example.org>\r\nFrom: Sender {i} <s{i}@example.org>\r\n\
         To: user@example.net\r\nSubject: message {i}\r\nMessage-ID: <{i}@bench>\r\n\r\n"
    )
    .into_bytes();
    // Mostly short text, some longer, a few with an attachment (base64 of random bytes).
    let (text, attachment) = match rng.random_range(0..100) {
        0..70 => (rng.random_range(1_500..8_000), 0),
        70..95 => (rng.random_range(8_000..60_000), 0),
        _ => (2_000, rng.random_range(100_000..600_000)),
    };
    while m.len() < text {
        m.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
        m.push(b' ');
    }
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for k in 0..attachment * 4 / 3 {
        m.push(B64[rng.random_range(0..64)]);
        if k % 76 == 75 {
            m.extend_from_slice(b"\r\n");
        }
    }
    m
}

/// The mail workload on the filesystem mounted at `root` until `stop`: deliveries into
/// `MAILBOXES` Maildirs, an index log per mailbox, messages read (moved to cur/) and
/// deleted, keeping the mail stored below `keep` bytes.
fn mail_workload(root: &Path, keep: u64, stop: &AtomicBool, c: &MailCounters) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d61_696c);
    let boxes: Vec<PathBuf> = (0..MAILBOXES).map(|u| root.join(format!("u{u:02}"))).collect();
    for b in &boxes {
        for d in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(b.join("Maildir").join(d))?;
        }
    }
    // Per mailbox: messages in new/ and cur/ (name, size), oldest first.
    let mut new: Vec<VecDeque<(String, u64)>> = vec![VecDeque::new(); MAILBOXES];
    let mut cur: Vec<VecDeque<(String, u64)>> = vec![VecDeque::new(); MAILBOXES];
    let mut stored = 0u64;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let u = rng.random_range(0..MAILBOXES);
        let md = boxes[u].join("Maildir");
        let body = message(&mut rng, i);
        let name = format!("{}.M{i}.bench", 1_700_000_000 + i);
        let tmp = md.join("tmp").join(&name);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, md.join("new").join(&name))?;
        std::fs::File::open(md.join("new"))?.sync_all()?;
        stored += body.len() as u64;
        new[u].push_back((name, body.len() as u64));
        c.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        c.delivered.fetch_add(1, Ordering::Relaxed);
        // The mailbox's index log: a record appended per change, made durable.
        let record = format!("{i} deliver {} {}\n", new[u].back().map_or("", |m| &m.0), body.len());
        let mut log =
            std::fs::OpenOptions::new().create(true).append(true).open(boxes[u].join("index.log"))?;
        log.write_all(record.as_bytes())?;
        log.sync_data()?;
        c.bytes.fetch_add(record.len() as u64, Ordering::Relaxed);
        // Every other delivery, the mailbox's user reads its oldest new message.
        if i.is_multiple_of(2) {
            if let Some((m, len)) = new[u].pop_front() {
                let to = format!("{m}:2,S");
                std::fs::rename(md.join("new").join(&m), md.join("cur").join(&to))?;
                cur[u].push_back((to, len));
                c.moved.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Old mail is deleted once the store is full enough.
        while stored > keep {
            let Some(v) = (0..MAILBOXES).max_by_key(|v| cur[*v].len()) else { break };
            let Some((m, len)) = cur[v].pop_front() else { break };
            std::fs::remove_file(boxes[v].join("Maildir").join("cur").join(&m))?;
            stored -= len;
            c.deleted.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// `--snapshot-space`: see the module docs.
pub fn run_space(args: &Args, tandem: &Path) -> Result<String> {
    let (interval, rounds) = if args.quick {
        (Duration::from_secs(3), 3)
    } else {
        (Duration::from_secs(args.snapshot_interval), 6)
    };
    let opts = LabOptions {
        size: args.size,
        mode: "sync".into(),
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let mut lab = Lab::new(&args.work, tandem, &["alpha", STANDBY], &opts)?;
    lab.start("alpha")?;
    lab.start(STANDBY)?;
    lab.wait_connected("alpha", Duration::from_secs(60))?;
    let dev = crate::stacks::promote_alpha(&lab)?.device.context("no device")?;
    // Inode tables and journal initialised now, not by ext4lazyinit during the run (its
    // zeroing reaches the standby as discards, which snapshots preserve like writes).
    run_cmd(Command::new("mkfs.ext4").args([
        "-q",
        "-F",
        "-E",
        "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
        &dev,
    ]))?;
    let mnt = lab.dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    lab.mount(&dev, &mnt, "")?;
    // Keep the stored mail at a sixteenth of the volume: deletions start within the first
    // intervals, and ext4 reuses the freed blocks, as on a mail server in its steady state.
    let keep = args.size / 16;
    let counters = Arc::new(MailCounters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (root, stop, c) = (mnt.clone(), stop.clone(), counters.clone());
        std::thread::spawn(move || mail_workload(&root, keep, &stop, &c))
    };
    // One interval of warm-up (first allocations of the directories and the journal).
    std::thread::sleep(interval);
    let start = Instant::now();
    // (name, app bytes, bytes beta applied, deliveries) just after each snapshot was taken.
    let mut marks = Vec::new();
    let mut result = Ok(());
    for k in 0..=rounds {
        if worker.is_finished() {
            break;
        }
        let name = format!("mail-{k}");
        if let Err(e) = create(&lab, &name) {
            result = Err(e);
            break;
        }
        marks.push((
            name,
            counters.bytes.load(Ordering::Relaxed),
            replicated_bytes(&lab)?,
            counters.delivered.load(Ordering::Relaxed),
            start.elapsed(),
        ));
        if k < rounds {
            std::thread::sleep(interval);
        }
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().map_err(|_| anyhow::anyhow!("the mail workload panicked"))??;
    result?;
    let list = list(&lab)?;
    // Deleting a snapshot that has an older one hands it the blocks it lacks.
    let (middle, older) = (format!("mail-{}", rounds / 2), format!("mail-{}", rounds / 2 - 1));
    let blocks_of = |l: &[SnapshotStatus], n: &str| l.iter().find(|x| x.name == n).map_or(0, |x| x.blocks);
    let t = Instant::now();
    snapshot_cli(&lab, &["delete", "mail", &middle])?;
    let delete_secs = t.elapsed().as_secs_f64();
    let handed = (blocks_of(&self::list(&lab)?, &older) - blocks_of(&list, &older)) * 4096;
    // The oldest snapshot, read through every newer one: ext4 as after a crash at that
    // instant, so its journal replayed, it must need no repair.
    let oldest_fsck = fsck_snapshot(&lab, "mail-0", &args.work.join("snapshot-copy.img"))?;
    lab.umount(&mnt)?;
    let fsck = Command::new("e2fsck").args(["-fn", &dev]).output()?;
    lab.wait_for("alpha", "standby caught up", Duration::from_secs(120), |r| {
        r.peers.iter().all(|p| p.pending_requests == 0 && p.out_of_sync_bytes == 0)
    })?;
    if !lab.demote("alpha")?.ok {
        bail!("demote failed");
    }
    lab.stop_all();
    let check = crate::scan::scan("snapshot-space", &lab.image("alpha"), Some(&lab.image(STANDBY)))?;

    let secs = interval.as_secs();
    let mut s = format!(
        "Snapshot space after a mail workload: ext4 on a {} MiB volume, {MAILBOXES} Maildirs, a snapshot on \
         {STANDBY} every {secs} s while mail is delivered ({} messages in all, {} moved to cur/, {} deleted)\n\n\
         | snapshot | interval it covers | messages delivered | MB the workload wrote | MB {STANDBY} applied | MB of old blocks it holds | snapshot bytes_used | bytes_used / workload | bytes_used / applied |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        args.size >> 20,
        counters.delivered.load(Ordering::Relaxed),
        counters.moved.load(Ordering::Relaxed),
        counters.deleted.load(Ordering::Relaxed),
    );
    let (mut tot_app, mut tot_applied, mut tot_held, mut tot_used) = (0u64, 0u64, 0u64, 0u64);
    for w in marks.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let snap = list.iter().find(|x| x.name == a.0).context("snapshot gone")?;
        let (app, applied) = (b.1 - a.1, b.2 - a.2);
        tot_app += app;
        tot_applied += applied;
        tot_held += snap.blocks * 4096;
        tot_used += snap.bytes_used;
        s += &format!(
            "| {} | {:.1}–{:.1} s | {} | {} | {} | {} | {} | {:.2} | {:.2} |\n",
            a.0,
            a.4.as_secs_f64(),
            b.4.as_secs_f64(),
            b.3 - a.3,
            mb(app),
            mb(applied),
            mb(snap.blocks * 4096),
            snap.bytes_used,
            snap.bytes_used as f64 / app.max(1) as f64,
            snap.bytes_used as f64 / applied.max(1) as f64,
        );
    }
    s += &format!(
        "| all {} | | | {} | {} | {} | {} | {:.2} | {:.2} |\n\n",
        marks.len().saturating_sub(1),
        mb(tot_app),
        mb(tot_applied),
        mb(tot_held),
        tot_used,
        tot_used as f64 / tot_app.max(1) as f64,
        tot_used as f64 / tot_applied.max(1) as f64,
    );
    s += &format!(
        "Deleting {middle} (between two others, holding {} MB): {} MB handed to {older} in {delete_secs:.1} s.\n\n",
        mb(blocks_of(&list, &middle) * 4096),
        mb(handed),
    );
    s += &format!("mail-0 exposed on {STANDBY}, copied, `e2fsck -fp` (journal replayed): {oldest_fsck}\n");
    s += &format!(
        "e2fsck -fn of alpha's device after unmounting: {}; standby image compared with the primary's: {} of {} \
         blocks differ\n",
        if fsck.status.success() { "clean".to_string() } else { format!("ERRORS\n{}", String::from_utf8_lossy(&fsck.stdout)) },
        check.standby_differs,
        check.standby_blocks_checked.unwrap_or(0),
    );
    if check.standby_differs > 0 || !fsck.status.success() || !oldest_fsck.starts_with("clean") {
        bail!("snapshot-space data check failed:\n{s}");
    }
    Ok(s)
}

/// Exposes snapshot `name` on the standby, copies its device to `copy`, and runs
/// `e2fsck -fp` on the copy (which replays the journal): "clean ..." or what it reported.
fn fsck_snapshot(lab: &Lab, name: &str, copy: &Path) -> Result<String> {
    let out = snapshot_cli(lab, &["expose", "mail", name])?;
    let dev =
        out.split_whitespace().find(|w| w.starts_with("/dev/")).context("no device from expose")?.to_string();
    let copied = run_cmd(
        Command::new("dd")
            .arg(format!("if={dev}"))
            .arg(format!("of={}", copy.display()))
            .args(["bs=1M", "status=none"]),
    );
    snapshot_cli(lab, &["unexpose", "mail", name])?;
    copied?;
    let fsck = Command::new("e2fsck").arg("-fp").arg(copy).output()?;
    std::fs::remove_file(copy)?;
    // 0: clean; 1: errors corrected (what a preen does after a replay: counts, orphans).
    let code = fsck.status.code().unwrap_or(8);
    let text = format!("{}{}", String::from_utf8_lossy(&fsck.stdout), String::from_utf8_lossy(&fsck.stderr));
    Ok(if code <= 1 {
        format!("clean (exit {code}: {})", text.trim().replace('\n', "; "))
    } else {
        format!("FAILED (exit {code}): {text}")
    })
}
