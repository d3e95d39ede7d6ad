//! `--mail`: a real Postfix, bound to 127.0.0.1, with its queue and its Maildirs on ext4
//! on the device under test, fed by an SMTP client and emptied by an IMAP-like reader; the
//! figure is messages per second end to end, per stack.
//!
//! One stack's round: a fresh device (`loop`: a plain loop device with direct I/O on a
//! zero-filled file, as in the fio runs; `loop-buffered`, on request only: the same without
//! direct I/O; `solo`: a Tandem primary without a peer; `sync`:
//! a Tandem primary `alpha` with a sync standby `beta` on loopback), `mkfs.ext4` (inode
//! tables and journal initialised at once, so no `ext4lazyinit` writes during the run),
//! mounted with the defaults (`data=ordered`), a Postfix instance on it ([`postfix`]), the
//! reader started ([`reader`]), and then the clock: from the first SMTP connection
//! ([`smtp`], `--mail-sessions` concurrent sessions) until the reader has read the last
//! accepted message. Messages per second = messages / that time. Stacks alternate within
//! each round (loop, solo, sync, loop, ...), so a slow phase of the shared machine hits
//! all of them; the table gives every round and the medians. An uncounted warm-up round
//! (300 messages on the first stack) comes first: without it the first round paid for
//! cold caches (in two runs, loop's first round was the slowest of all loop rounds).
//! On an error, the round's directory under `--work`/mail (Postfix's configuration and
//! log) is kept for a look; the next run removes it.
//!
//! After the clock, the data checks — any failure fails the bench, naming what differs:
//! Postfix's queue is empty and its log reports no delivery but `status=sent`; Postfix
//! stopped, every mailbox is read again (each accepted message in `cur/` exactly once,
//! whole, checksum right, nothing left in `new/` or `tmp/`); the filesystem unmounted,
//! `e2fsck -fn` on the device is clean; for `sync`, once the standby caught up and both
//! agents stopped, its image equals the primary's block by block.

mod postfix;
mod reader;
mod smtp;
mod table;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_tests::lab::{run_cmd, Lab, LabOptions};

use crate::stacks::{zero_file, Loop};
use crate::Args;
use postfix::Postfix;
use reader::Reader;
use smtp::Outgoing;

/// Maildirs the mail is spread over.
const MAILBOXES: usize = 16;

/// If no message is read for this long, the run is stuck (lost mail, a wedged Postfix):
/// it fails, with Postfix's queue and log. A hang guard, not a speed limit.
const STALL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    Loop,
    /// A loop device without direct I/O (losetup's default): the backing file's page cache
    /// in between, flushed on the device's flushes. Not a default stack; another baseline.
    LoopBuffered,
    Solo,
    Sync,
}

impl Stack {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "loop" => Stack::Loop,
            "loop-buffered" => Stack::LoopBuffered,
            "solo" => Stack::Solo,
            "sync" => Stack::Sync,
            other => bail!("unknown mail stack {other:?} (loop, loop-buffered, solo, sync)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Stack::Loop => "loop",
            Stack::LoopBuffered => "loop-buffered",
            Stack::Solo => "tandem-solo",
            Stack::Sync => "tandem-sync",
        }
    }
}

/// One stack's round.
struct Round {
    round: usize,
    stack: Stack,
    messages: usize,
    /// Bytes of the delivered files (Postfix's headers included).
    bytes: u64,
    /// From the first connection until the last message was accepted.
    smtp_secs: f64,
    /// From the first connection until the last message was read.
    secs: f64,
    /// Standby blocks compared with the primary's (all equal), for `sync`.
    standby_blocks: Option<u64>,
}

impl Round {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }
}

/// A filesystem mounted for one round, unmounted on drop.
struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    fn new(dev: &str, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        run_cmd(Command::new("mount").arg(dev).arg(dir))?;
        Ok(Mount { dir: dir.to_path_buf(), mounted: true })
    }

    fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        run_cmd(Command::new("umount").arg(&self.dir)).map(drop)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
    }
}

/// `--mail`: see the module docs; returns the tables.
pub fn run(args: &Args, tandem: &Path) -> Result<String> {
    let version = postfix::require_installed()?;
    let count = args.mail_messages.unwrap_or(if args.quick { 300 } else { 3000 });
    let rounds = args.mail_rounds.unwrap_or(if args.quick { 1 } else { 3 });
    let stacks: Vec<Stack> = args
        .mail_stacks
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Stack::parse)
        .collect::<Result<_>>()?;
    if count == 0 || rounds == 0 || args.mail_sessions == 0 || stacks.is_empty() {
        bail!("--mail needs at least one message, round, session and stack");
    }
    let messages = Arc::new(smtp::make(count, MAILBOXES));
    let body_bytes: usize = messages.iter().map(|m| m.expected.body_len).sum();
    let work = args.work.join("mail");
    // The first round would otherwise pay for cold caches (Postfix's daemons are started on
    // demand during the run, from binaries and libraries not read yet): a short round of
    // the first stack first, checked like the others, not counted.
    let warm_up = Arc::new(smtp::make(count.min(300), MAILBOXES));
    eprintln!("=== mail warm-up (not counted): {}", stacks[0].name());
    run_stack(stacks[0], 0, args, tandem, &work, &warm_up)?;
    let mut results = Vec::new();
    for round in 1..=rounds {
        for &stack in &stacks {
            eprintln!("=== mail round {round}: {}", stack.name());
            let r = run_stack(stack, round, args, tandem, &work, &messages)?;
            eprintln!(
                "{} round {round}: {} messages in {:.1} s (accepted in {:.1} s): {:.0} msgs/s",
                stack.name(),
                r.messages,
                r.secs,
                r.smtp_secs,
                r.rate()
            );
            results.push(r);
        }
    }
    Ok(table::table(&version, args, count, body_bytes, rounds, &stacks, &results))
}

fn run_stack(
    stack: Stack,
    round: usize,
    args: &Args,
    tandem: &Path,
    work: &Path,
    messages: &Arc<Vec<Outgoing>>,
) -> Result<Round> {
    let dir = work.join(format!("{}-{round}", stack.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let run = format!("{}-{round}", stack.name());
    let r = match stack {
        Stack::Loop | Stack::LoopBuffered => {
            let img = dir.join("loop.img");
            zero_file(&img, args.size)?;
            let dev = if stack == Stack::Loop { Loop::attach(&img)? } else { Loop::attach_buffered(&img)? };
            let r = measure((stack, round), &dev.0, &dir, args, messages, &run)?;
            drop(dev);
            std::fs::remove_file(&img)?;
            r
        }
        Stack::Solo | Stack::Sync => {
            let names: &[&str] = if stack == Stack::Solo { &["alpha"] } else { &["alpha", "beta"] };
            let opts = LabOptions {
                size: args.size,
                mode: "sync".into(),
                timeout: Duration::from_secs(10),
                ..Default::default()
            };
            let mut lab = Lab::new(&dir, tandem, names, &opts)?;
            for n in names {
                lab.start(n)?;
            }
            if names.len() > 1 {
                lab.wait_connected("alpha", Duration::from_secs(60))?;
            }
            let dev = crate::stacks::promote_alpha(&lab)?.device.context("no device")?;
            let mut r = measure((stack, round), &dev, &dir, args, messages, &run)?;
            lab.wait_for("alpha", "peers caught up", Duration::from_secs(300), |r| {
                r.peers.iter().all(|p| p.pending_requests == 0 && p.out_of_sync_bytes == 0)
            })?;
            let d = lab.demote("alpha")?;
            if !d.ok {
                bail!("demote: {:?}", d.error);
            }
            let clean = lab.stop_all();
            if !clean.values().all(|c| *c) {
                bail!("agents did not stop cleanly: {clean:?}");
            }
            if stack == Stack::Sync {
                let c = crate::scan::scan(&run, &lab.image("alpha"), Some(&lab.image("beta")))?;
                let compared = c.standby_blocks_checked.unwrap_or(0);
                if c.standby_differs > 0 || compared != args.size / 4096 {
                    bail!(
                        "{run}: the standby's image differs from the primary's: {} of {compared} blocks differ \
                         ({} blocks in the volume)",
                        c.standby_differs,
                        args.size / 4096
                    );
                }
                r.standby_blocks = Some(compared);
            }
            r
        }
    };
    std::fs::remove_dir_all(&dir)?;
    Ok(r)
}

/// One measurement on `dev`, and its checks (see the module docs); `dir` holds the Postfix
/// instance's configuration and the mount point.
fn measure(
    (stack, round): (Stack, usize),
    dev: &str,
    dir: &Path,
    args: &Args,
    messages: &Arc<Vec<Outgoing>>,
    run: &str,
) -> Result<Round> {
    run_cmd(Command::new("mkfs.ext4").args([
        "-q",
        "-F",
        "-E",
        "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
        dev,
    ]))?;
    let mount = Mount::new(dev, &dir.join("mnt"))?;
    // Dropped in reverse order on an error: the reader, Postfix, then the mount.
    let postfix = Postfix::start(&dir.join("postfix"), &mount.dir, MAILBOXES)?;
    let reader = Reader::spawn(postfix.mailboxes.clone(), MAILBOXES, messages.clone(), run.to_string());
    let start = Instant::now();
    smtp::send_all(postfix.addr(), messages, args.mail_sessions, run)
        .with_context(|| format!("{run}: SMTP; Postfix's log ends:\n{}", postfix.log_tail(20)))?;
    let smtp_secs = start.elapsed().as_secs_f64();
    let (mut seen, mut since) = (0, Instant::now());
    let end = loop {
        let p = reader.progress();
        if p.read == messages.len() {
            break p.last_at.context("no time of the last read")?;
        }
        if reader.is_finished() {
            return Err(reader.stop().err().unwrap_or_else(|| anyhow::anyhow!("the reader ended early")))
                .with_context(|| format!("{run}: reading the Maildirs"));
        }
        if p.read != seen {
            (seen, since) = (p.read, Instant::now());
        } else if since.elapsed() > STALL {
            bail!(
                "{run}: {} of {} accepted messages read, none for {STALL:?}; queue: {:?}\nlog ends:\n{}",
                p.read,
                messages.len(),
                postfix.queue_listing(),
                postfix.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let bytes = reader.progress().bytes;
    reader.stop()?;
    if let Some(q) = postfix.queue_listing()? {
        bail!("{run}: Postfix's queue is not empty after every message was read:\n{q}");
    }
    let (problems, warnings) = postfix.log_problems();
    if !problems.is_empty() {
        bail!("{run}: Postfix's log reports {} problems:\n{}", problems.len(), problems.join("\n"));
    }
    for w in warnings {
        eprintln!("{run}: postfix {w}");
    }
    let mailboxes = postfix.mailboxes.clone();
    postfix.stop()?;
    let stored = reader::final_check(&mailboxes, MAILBOXES, messages, run)
        .with_context(|| format!("{run}: final check"))?;
    if stored != bytes {
        bail!("{run}: the Maildirs hold {stored} bytes after the run, {bytes} were read");
    }
    mount.unmount()?;
    let fsck = Command::new("e2fsck").args(["-fn", dev]).output()?;
    if !fsck.status.success() {
        bail!("{run}: e2fsck -fn {dev} after the run:\n{}", String::from_utf8_lossy(&fsck.stdout));
    }
    Ok(Round {
        round,
        stack,
        messages: messages.len(),
        bytes,
        smtp_secs,
        secs: end.duration_since(start).as_secs_f64(),
        standby_blocks: None,
    })
}
