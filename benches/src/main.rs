//! `tandem-bench`: fio on the raw backing file, a plain loop device, Tandem without a peer
//! and Tandem with a standby in each mode — one run, one table, ratios to the loop device —
//! and after each configuration a data check: every 4 KiB block fio wrote records its own
//! offset, on the primary and on the standby, and the two images are compared block by
//! block. A fast wrong answer is worthless. Not a test: nothing here has a time limit.

mod breakdown;
mod busy_wan;
mod compression;
mod fio;
mod leftovers;
mod mail;
mod resync;
mod scan;
mod snapshots;
mod stacks;
mod wakeups;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Benchmark Tandem against the raw file and a plain loop device, with data checks")]
pub struct Args {
    /// The tandem binary (default: next to this one).
    #[arg(long)]
    tandem: Option<PathBuf>,
    /// Scratch directory (a real filesystem, not tmpfs).
    #[arg(long, default_value = "/var/tmp/tandem-bench")]
    work: PathBuf,
    /// Seconds per timed fio job.
    #[arg(long, default_value_t = 15)]
    runtime: u64,
    /// Short runs (3 s) to check that everything works.
    #[arg(long)]
    quick: bool,
    /// Configurations, comma-separated: raw, loop, solo, sync, memory, async, busy-wan
    /// (three nodes: the sync standby's W1 with a zstd async replica idle, then busy),
    /// sync-scraped (sync with both nodes' metrics endpoints scraped every second),
    /// sync-snap1, sync-snap10 (sync with 1 or 10 snapshots on the standby, a fresh one
    /// before each workload),
    /// baseline-sync, baseline-solo (sync or solo with the `--baseline` binary).
    #[arg(long, default_value = "raw,loop,solo,sync")]
    configs: String,
    /// Also run ../shared/bench/peer-qsd-mirror.sh (qemu's synchronous mirror) in this run.
    #[arg(long)]
    peer: Option<PathBuf>,
    /// Also measure resync: full resync rate vs dd, delta resync bytes vs changed bytes.
    #[arg(long)]
    resync: bool,
    /// Also measure snapshot space: a mail workload on ext4 with a snapshot on the
    /// standby every --snapshot-interval seconds; bytes used per snapshot vs bytes written.
    #[arg(long)]
    snapshot_space: bool,
    /// --snapshot-space: seconds between snapshots.
    #[arg(long, default_value_t = 10)]
    snapshot_interval: u64,
    /// Only measure compression of mail-like data (no fio, no root needed).
    #[arg(long)]
    compression: bool,
    /// Only measure what a wake-up costs here: a message and its reply between two threads
    /// on one CPU and on two, over a channel, UDP on loopback and the agent's QUIC (no root
    /// needed; see benches/src/wakeups.rs).
    #[arg(long)]
    wakeups: bool,
    /// busy-wan: the replica's `compression` (zstd; `none` shows what the busy writer costs
    /// without any compression).
    #[arg(long, default_value = "zstd")]
    wan_compression: String,
    /// busy-wan: cap the busy writer at this many MB/s (0: as fast as it goes).
    #[arg(long, default_value_t = 0)]
    busy_rate: u64,
    /// Another tandem binary (e.g. an older build) for the `baseline-*` configurations,
    /// to compare two builds in one run.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Workloads to run, comma-separated (W1, W2, W3).
    #[arg(long, default_value = "W1,W2,W3")]
    workloads: String,
    /// Where one request's time goes: W1 (unless --workloads says otherwise) on `solo` and
    /// `sync` (unless --configs says otherwise) with a tandem built with `--features
    /// tandem-agent/stage-trace`, and the median of every step of the data path, joined
    /// across both agents; one table per configuration and workload.
    #[arg(long)]
    breakdown: bool,
    /// Only the mail benchmark: a real Postfix on each stack (see benches/src/mail/mod.rs).
    #[arg(long)]
    mail: bool,
    /// --mail: messages per stack and round (default 3000; 300 with --quick).
    #[arg(long)]
    mail_messages: Option<usize>,
    /// --mail: concurrent SMTP sessions.
    #[arg(long, default_value_t = 8)]
    mail_sessions: usize,
    /// --mail: interleaved rounds (default 3; 1 with --quick).
    #[arg(long)]
    mail_rounds: Option<usize>,
    /// --mail: stacks, comma-separated, in the order each round runs them: loop, solo, sync,
    /// loop-buffered (a loop device without direct I/O).
    #[arg(long, default_value = "loop,solo,sync")]
    mail_stacks: String,
    /// Volume size for the fio runs (and the mail benchmark).
    #[arg(long, default_value_t = 1 << 30)]
    size: u64,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.runtime = 3;
    }
    if args.breakdown {
        if args.workloads == "W1,W2,W3" {
            args.workloads = "W1".into();
        }
        if args.configs == "raw,loop,solo,sync" {
            args.configs = "loop,solo,sync".into();
        }
    }
    if args.compression {
        println!("{}", compression::run());
        return Ok(());
    }
    if args.wakeups {
        println!("{}", wakeups::run(&args.work)?);
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("tandem-bench needs root (loop devices, FUSE)");
    }
    let tools: &[&str] = if args.mail { &["losetup", "mkfs.ext4", "e2fsck"] } else { &["fio", "losetup"] };
    for tool in tools {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            bail!("{tool} not found (apt-get install -y fio util-linux e2fsprogs)");
        }
    }
    let tandem = match &args.tandem {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.join("tandem"),
    };
    if !tandem.exists() {
        bail!("tandem binary not found at {} (build it, or pass --tandem)", tandem.display());
    }
    std::fs::create_dir_all(&args.work)?;
    for what in leftovers::clear(&args.work) {
        eprintln!("before starting: {what}");
    }
    let env = stacks::environment();
    println!("{env}");
    let ticks = stacks::CpuTicks::now();
    if args.mail {
        println!("\n{}", mail::run(&args, &tandem)?);
        if let Some(t) = ticks {
            println!("{}", t.describe_since());
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    let mut breakdown = Vec::new();
    for cfg in args.configs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        eprintln!("=== {cfg}");
        if cfg == "busy-wan" {
            let (r, c) = busy_wan::run(&args, &tandem)?;
            rows.extend(r);
            checks.extend(c);
            continue;
        }
        let (r, c) = if cfg.starts_with("baseline-") {
            let b = args.baseline.as_ref().with_context(|| format!("{cfg} needs --baseline PATH"))?;
            stacks::run_config(cfg, &args, b)?
        } else {
            stacks::run_config(cfg, &args, &tandem)?
        };
        if args.breakdown && cfg != "raw" && cfg != "loop" {
            for row in &r {
                let dir = args.work.join(format!("stages-{cfg}"));
                breakdown.push(breakdown::table(
                    &format!("{} {}", row.config, row.workload),
                    &dir,
                    row.window,
                    row.p50_us,
                    row.sync_p50_us,
                    row.workload == "W1",
                )?);
            }
        }
        rows.extend(r);
        checks.push(c);
    }
    println!("\n{}", fio::table(&rows));
    if let Some(l) = rows.iter().find(|r| r.config == "loop" && r.workload == "W1").filter(|_| args.breakdown)
    {
        // The floor of what fio reports for this machine's kernel and disk, engine aside.
        println!(
            "plain loop device, same run: fio write p50 {:.0} µs, fsync p50 {:.0} µs\n",
            l.p50_us, l.sync_p50_us
        );
    }
    for b in &breakdown {
        println!("{b}");
    }
    println!("{}", scan::table(&checks));
    if rows.iter().any(|r| r.snapshot.is_some()) {
        println!("{}", snapshots::space_table(&rows));
    }
    if args.snapshot_space {
        println!("{}", snapshots::run_space(&args, &tandem)?);
    }
    if args.resync {
        println!("{}", resync::run(&args, &tandem)?);
    }
    if let Some(script) = &args.peer {
        println!("{}", stacks::run_peer(script, args.runtime)?);
    }
    if let Some(t) = ticks {
        println!("{}", t.describe_since());
    }
    let bad: u64 = checks.iter().map(|c| c.misplaced + c.standby_differs + c.standby_misplaced).sum();
    if bad > 0 {
        bail!("DATA CHECK FAILED: {bad} misplaced or differing blocks");
    }
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
