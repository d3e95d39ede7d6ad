//! The storage stacks under test, each set up, measured, checked and torn down in turn.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_tests::lab::{run_cmd, Lab, LabOptions};
use tandem_tests::metrics::enable_metrics;

use crate::fio::{self, Row, WORKLOADS};
use crate::scan::{self, Check};
use crate::snapshots::Standby;
use crate::Args;

/// A file of `size` bytes of written zeroes (every block allocated, like the loop baseline).
pub fn zero_file(path: &Path, size: u64) -> Result<()> {
    let _ = std::fs::remove_file(path);
    run_cmd(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", path.display()))
            .args(["bs=4M", "oflag=direct", "status=none"])
            .arg(format!("count={}", size / (4 << 20))),
    )?;
    Ok(())
}

/// A plain loop device (direct I/O) on a file, detached on drop.
/// Promotes `alpha` and waits until it serves its device with every peer replicating;
/// returns that status (its `device` is set).
pub fn promote_alpha(lab: &Lab) -> Result<tandem_agent::status::ResourceStatus> {
    let r = lab.promote("alpha", false)?;
    if !r.ok {
        bail!("promote: {:?}", r.error);
    }
    lab.wait_for("alpha", "replicating", Duration::from_secs(60), |r| {
        r.device.is_some() && r.peers.iter().all(|p| p.replication == "established")
    })
}

pub struct Loop(pub String);

impl Loop {
    pub fn attach(file: &Path) -> Result<Self> {
        Ok(Loop(
            run_cmd(Command::new("losetup").args(["-f", "--show", "--direct-io=on"]).arg(file))?
                .trim()
                .to_string(),
        ))
    }

    /// Without direct I/O: through the backing file's page cache.
    pub fn attach_buffered(file: &Path) -> Result<Self> {
        Ok(Loop(run_cmd(Command::new("losetup").args(["-f", "--show"]).arg(file))?.trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The peak resident size of process `pid` since its last reset (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("agent {pid}"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// `snaps`: a `sync-snapN` standby's snapshots, rotated before each workload.
fn workloads(
    cfg: &str,
    target: &str,
    args: &Args,
    lab: Option<&Lab>,
    mut snaps: Option<&mut Standby>,
) -> Result<Vec<Row>> {
    let out = args.work.join("results");
    std::fs::create_dir_all(&out)?;
    let mut rows = Vec::new();
    for (wl, spec) in WORKLOADS.iter().filter(|(wl, _)| args.workloads.split(',').any(|w| w.trim() == *wl)) {
        if let (Some(l), Some(s)) = (lab, snaps.as_deref_mut()) {
            s.rotate(l)?;
        }
        let before = lab.map(|l| l.resource_status("alpha")).transpose()?;
        let pids: Vec<u32> =
            lab.map_or(vec![], |l| ["alpha", "beta"].iter().filter_map(|n| l.pid(n)).collect());
        for pid in &pids {
            // Resets the peak resident size, so the one read after fio is this workload's.
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
        let mut row = fio::run(cfg, wl, spec, target, args.runtime, &out)?;
        row.peak_rss_mib = pids.iter().map(|p| peak_rss_mib(*p)).collect::<Result<_>>()?;
        if let (Some(l), Some(b)) = (lab, before) {
            let a = l.resource_status("alpha")?;
            let writes = a.stats.writes.saturating_sub(b.stats.writes);
            if writes > 0 {
                row.al_per_1000 =
                    Some(1000.0 * (a.stats.al_writes - b.stats.al_writes) as f64 / writes as f64);
            }
        }
        if let (Some(l), Some(s)) = (lab, snaps.as_deref()) {
            let space = s.space(l)?;
            eprintln!(
                "{cfg} {wl}: {} snapshots on beta, {} bytes applied, {} copied, bytes_used {} (fresh) {} (all)",
                space.held, space.written, space.copied, space.newest_used, space.all_used
            );
            row.snapshot = Some(space);
        }
        eprintln!(
            "{cfg} {wl}: {:.0} IOPS {:.1} MB/s p50 {:.0} µs p99 {:.0} µs",
            row.iops, row.mbps, row.p50_us, row.p99_us
        );
        rows.push(row);
    }
    fio::integrity_pass(target, args.size, if args.quick { 2 } else { 4 })?;
    Ok(rows)
}

pub fn run_config(cfg: &str, args: &Args, tandem: &Path) -> Result<(Vec<Row>, Check)> {
    match cfg {
        "raw" => {
            let f = args.work.join("raw.img");
            zero_file(&f, args.size)?;
            let rows = workloads(cfg, f.to_str().context("path")?, args, None, None)?;
            let c = scan::scan(cfg, &f, None)?;
            std::fs::remove_file(&f)?;
            Ok((rows, c))
        }
        "loop" => {
            let f = args.work.join("loop.img");
            zero_file(&f, args.size)?;
            let dev = Loop::attach(&f)?;
            let rows = workloads(cfg, &dev.0, args, None, None)?;
            drop(dev);
            let c = scan::scan(cfg, &f, None)?;
            std::fs::remove_file(&f)?;
            Ok((rows, c))
        }
        "solo" | "sync" | "sync-snap1" | "sync-snap10" | "memory" | "async" | "sync-scraped"
        | "baseline-sync" | "baseline-solo" => {
            let snapshots = match cfg {
                "sync-snap1" => 1,
                "sync-snap10" => 10,
                _ => 0,
            };
            let solo = cfg == "solo" || cfg == "baseline-solo";
            let names: &[&str] = if solo { &["alpha"] } else { &["alpha", "beta"] };
            let mode = match cfg {
                "memory" | "async" => cfg,
                _ => "sync",
            };
            let opts = LabOptions {
                size: args.size,
                mode: mode.into(),
                timeout: Duration::from_secs(10),
                ..Default::default()
            };
            let mut lab = Lab::new(&args.work, tandem, names, &opts)?;
            if args.breakdown {
                // The agents inherit it: each logs its stage lines there.
                std::env::set_var("TANDEM_STAGE_TRACE", crate::breakdown::trace_dir(&args.work, cfg)?);
            }
            let scraped: Vec<_> =
                if cfg == "sync-scraped" { names.iter().map(|n| enable_metrics(&lab, n)).collect() } else { vec![] };
            for n in names {
                lab.start(n)?;
            }
            let scraper = Scraper::start(scraped);
            if names.len() > 1 {
                lab.wait_connected("alpha", Duration::from_secs(60))?;
            }
            let dev = promote_alpha(&lab)?.device.context("no device")?;
            let mut standby = (snapshots > 0).then(|| Standby::prepare(&lab, &dev, snapshots)).transpose()?;
            let label = format!("tandem-{cfg}");
            let rows = workloads(&label, &dev, args, Some(&lab), standby.as_mut())?;
            if standby.is_some() {
                let list = crate::snapshots::list(&lab)?;
                eprintln!(
                    "{label}: after the integrity pass, {} snapshots on beta use {} bytes",
                    list.len(),
                    list.iter().map(|s| s.bytes_used).sum::<u64>()
                );
            }
            let scrapes = scraper.stop()?;
            if cfg == "sync-scraped" {
                eprintln!("{label}: {scrapes} scrapes during the run");
            }
            // Let an async standby catch up before tearing down, so its image is final.
            lab.wait_for("alpha", "peers caught up", Duration::from_secs(300), |r| {
                r.peers.iter().all(|p| p.pending_requests == 0 && p.out_of_sync_bytes == 0)
            })?;
            // What the transport saw over the run (an older --baseline agent reports none).
            for l in lab.status("alpha")?.links {
                eprintln!("{label}: {}", l.line());
            }
            let r = lab.demote("alpha")?;
            if !r.ok {
                bail!("demote: {:?}", r.error);
            }
            let clean = lab.stop_all();
            if !clean.values().all(|c| *c) {
                bail!("agents did not stop cleanly: {clean:?}");
            }
            let standby = (names.len() > 1).then(|| lab.image("beta"));
            let c = scan::scan(&label, &lab.image("alpha"), standby.as_deref())?;
            Ok((rows, c))
        }
        other => bail!(
            "unknown configuration {other:?} (raw, loop, solo, sync, sync-snap1, sync-snap10, memory, async, sync-scraped, \
             baseline-sync, baseline-solo)"
        ),
    }
}

/// Scrapes metrics endpoints once a second, as Prometheus would, until stopped.
struct Scraper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<u64>>>,
}

impl Scraper {
    fn start(endpoints: Vec<std::net::SocketAddr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if endpoints.is_empty() {
            return Self { stop, thread: None };
        }
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                for e in &endpoints {
                    let body = tandem_tests::metrics::scrape(*e);
                    if !body.contains("tandem_write_latency_seconds_count") {
                        bail!("scrape of {e} without write latency: {body}");
                    }
                    n += 1;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(n)
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops scraping; returns how many scrapes were made.
    fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the scraper panicked"))?,
            None => Ok(0),
        }
    }
}

/// The competitor in the same run: qemu-storage-daemon with a synchronous blockdev-mirror.
pub fn run_peer(script: &Path, runtime: u64) -> Result<String> {
    let out = Command::new("bash")
        .arg(script)
        .arg("run")
        .env("CONFIGS", "C0 C1 C3 N3")
        .env("RUNTIME", runtime.to_string())
        .env("WORK", "/var/tmp/tandem-bench-peer")
        .env("RESULTS", "/var/tmp/tandem-bench-peer-results")
        .output()
        .context("running the peer benchmark")?;
    if !out.status.success() {
        bail!("peer benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(format!("peer (qemu-storage-daemon mirror), same run:\n{}", String::from_utf8_lossy(&out.stdout)))
}

pub fn environment() -> String {
    let sh = |c: &str| {
        Command::new("sh")
            .args(["-c", c])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "date: {}\nkernel: {}  cpus: {}\ncpu: {}\nfio: {}\nload: {}\nidle: {}",
        sh("date -Is"),
        sh("uname -r"),
        sh("nproc"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-"),
        sh("fio --version"),
        sh("cat /proc/loadavg"),
        idle_polling(),
    )
}

/// How the kernel idles its CPUs. On a VM whose guest does not poll before halting
/// (`haltpoll` with `guest_halt_poll_ns` 0), every wake-up of an idle thread is a VM exit:
/// on this machine polling made fsync-per-write IOPS 1.3–2.3× higher for every stack (see
/// docs/benchmarks.md), so runs with different settings cannot be compared.
fn idle_polling() -> String {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).ok();
    let driver = read("/sys/devices/system/cpu/cpuidle/current_driver").unwrap_or_else(|| "none".into());
    match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        Some(ns) => format!("cpuidle {driver}, guest_halt_poll_ns {ns}"),
        None => format!("cpuidle {driver}"),
    }
}

/// CPU time the host took from this VM (`steal` in /proc/stat), to say how noisy a run was.
#[derive(Debug, Clone, Copy)]
pub struct CpuTicks {
    steal: u64,
    total: u64,
}

impl CpuTicks {
    /// The machine's counters now; `None` where /proc/stat has no steal column.
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
        let steal = *f.get(7)?;
        Some(Self { steal, total: f.iter().take(8).sum() })
    }

    /// "host steal during the run: …" since `self`.
    pub fn describe_since(self) -> String {
        match Self::now() {
            Some(n) if n.total > self.total => {
                let (s, t) = (n.steal.saturating_sub(self.steal), n.total - self.total);
                format!(
                    "host steal during the run: {:.1} % of CPU time ({s} of {t} ticks)",
                    s as f64 * 100.0 / t as f64
                )
            }
            _ => "host steal during the run: not known".into(),
        }
    }
}
