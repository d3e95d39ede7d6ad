//! `--configs busy-wan`: the headline three-node setup — a primary, a `sync` LAN standby
//! without compression and an `async` replica with `compression = "zstd"`, all on loopback —
//! and the sync standby's W1 latency with the zstd replica idle, then busy.
//!
//! "Busy" is a second writer for the whole W1 run: 1 MiB O_DIRECT writes (QD1) of the
//! mail-like data set of `--compression` (zstd level 1 sends ~69 % of it, at ~110 MB/s per
//! core) to the second half of the device, so the zstd replica's compression has real work;
//! W1 runs on the first half. Each of its 4 KiB blocks starts with the stamp of
//! `tests/src/lib.rs`'s `stamped_block` (magic, offset, run, version), checked afterwards. `--busy-rate` caps it, `--wan-compression none`
//! runs the same load with no compression at all (the share of the busy writer's cost that
//! is not compression: its data goes to the sync standby too, and every W1 fsync waits for
//! its writes in flight, as a flush is a barrier for the whole device). Each W1 write waits for the sync standby's ack,
//! which comes back through the primary's one network thread: if compression runs there,
//! W1 waits for it. The zstd replica's share shows in its wire/data ratio.
//!
//! Data check as for the other configurations: an integrity pass with verify headers, the
//! replicas caught up, then the primary's image scanned and compared block by block with
//! the sync standby's and the zstd replica's.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_tests::lab::{Lab, LabOptions};

use crate::fio::{self, Row, WORKLOADS};
use crate::scan::{self, Check};
use crate::Args;

/// The replica's disk keys, added to its `[resource.disk.gamma]` table.
fn gamma_keys(compression: &str) -> String {
    format!("mode = \"async\"\ncompression = \"{compression}\"\nbacklog = \"1GiB\"\n")
}

/// Seconds the busy writer runs before W1 starts (fio's own ramp comes on top).
const BUSY_LEAD: u64 = 2;

pub fn run(args: &Args, tandem: &Path) -> Result<(Vec<Row>, Vec<Check>)> {
    let opts = LabOptions {
        size: args.size,
        mode: "sync".into(),
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let names = ["alpha", "beta", "gamma"];
    let mut lab = Lab::new(&args.work, tandem, &names, &opts)?;
    let text = std::fs::read_to_string(&lab.config)?;
    let meta = "gamma/mail.meta\"\n";
    if !text.contains(meta) {
        bail!("no disk table for gamma in the lab config");
    }
    std::fs::write(
        &lab.config,
        text.replacen(meta, &format!("{meta}{}", gamma_keys(&args.wan_compression)), 1),
    )?;
    for n in names {
        lab.start(n)?;
    }
    lab.wait_for("alpha", "all connected", Duration::from_secs(60), |r| {
        r.peers.len() == 2 && r.peers.iter().all(|p| p.connection == "connected")
    })?;
    let st = crate::stacks::promote_alpha(&lab)?;
    let modes: Vec<_> = st.peers.iter().map(|p| format!("{}={}", p.node, p.mode)).collect();
    eprintln!("peers: {}", modes.join(", "));
    let dev = st.device.context("no device")?;
    let out = args.work.join("results");
    std::fs::create_dir_all(&out)?;
    let half = args.size / 2;
    let w1 = format!("{} --offset=0 --size={half}", WORKLOADS[0].1);

    let run: u64 = rand::random();
    let mut rows = Vec::new();
    for busy in [false, true] {
        let c = &args.wan_compression;
        let label = if busy { format!("3-node, {c} peer busy") } else { format!("3-node, {c} peer idle") };
        let label = label.as_str();
        let before = lab.resource_status("alpha")?;
        let writer = busy.then(|| BusyWriter::start(&dev, half, args.busy_rate, run)).transpose()?;
        if writer.is_some() {
            std::thread::sleep(Duration::from_secs(BUSY_LEAD));
        }
        let row = fio::run(label, "W1", &w1, &dev, args.runtime, &out);
        if let Some(w) = writer {
            let bytes = w.finish()?;
            eprintln!("busy writer: {} MiB of stamped mail blocks", bytes >> 20);
        }
        let row = row?;
        let after = lab.resource_status("alpha")?;
        let gamma = |s: &tandem_agent::status::ResourceStatus| {
            s.peers.iter().find(|p| p.node == "gamma").map(|p| (p.sent_data_bytes, p.sent_wire_bytes))
        };
        let (d0, w0) = gamma(&before).unwrap_or_default();
        let (d1, w1b) = gamma(&after).unwrap_or_default();
        eprintln!(
            "{label} W1: {:.0} IOPS p50 {:.0} µs p99 {:.0} µs; gamma: {:.0} MiB data as {:.0} MiB on the wire",
            row.iops,
            row.p50_us,
            row.p99_us,
            (d1 - d0) as f64 / (1 << 20) as f64,
            (w1b - w0) as f64 / (1 << 20) as f64,
        );
        rows.push(row);
    }

    // The integrity pass over the first half only: the busy writer's blocks stay as written.
    fio::integrity_pass(&dev, half, if args.quick { 2 } else { 4 })?;
    lab.wait_for("alpha", "peers caught up", Duration::from_secs(600), |r| {
        r.peers.iter().all(|p| p.pending_requests == 0 && p.out_of_sync_bytes == 0)
    })?;
    let r = lab.demote("alpha")?;
    if !r.ok {
        bail!("demote: {:?}", r.error);
    }
    let clean = lab.stop_all();
    if !clean.values().all(|c| *c) {
        bail!("agents did not stop cleanly: {clean:?}");
    }
    // The busy writer's blocks the integrity pass did not overwrite: where they belong, on
    // every node (the scans below compare the replicas with the primary block by block).
    for n in names {
        let (found, bad) = check_busy_blocks(&lab.image(n), half, run)?;
        eprintln!("{n}: {found} busy blocks, {bad} misplaced");
        if found == 0 || bad > 0 {
            bail!("DATA CHECK FAILED on {n}: {found} busy blocks found, {bad} misplaced or stale");
        }
    }
    let checks = vec![
        scan::scan("busy-wan: alpha vs beta (sync)", &lab.image("alpha"), Some(&lab.image("beta")))?,
        scan::scan(
            &format!("busy-wan: alpha vs gamma (async, {})", args.wan_compression),
            &lab.image("alpha"),
            Some(&lab.image("gamma")),
        )?,
    ];
    Ok((rows, checks))
}

/// Bytes of the stamp at the start of each busy block, as in `stamped_block`.
const STAMP: usize = 32;
const MAGIC: &[u8; 8] = b"TANDEMBK";
const BS: usize = 4096;
const WRITE: usize = 1 << 20;

/// The busy writer: a thread writing stamped mail blocks over `[half, 2 half)` until told
/// to stop, at most `rate` MB/s if not 0.
struct BusyWriter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64>>,
}

impl BusyWriter {
    fn start(dev: &str, half: u64, rate: u64, run: u64) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)
            .with_context(|| format!("cannot open {dev} for the busy writer"))?;
        let mail = crate::compression::maildir_blocks(400);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<u64> {
            let mut raw = vec![0u8; WRITE + BS];
            let pad = raw.as_ptr().align_offset(BS);
            let buf = &mut raw[pad..pad + WRITE];
            let started = Instant::now();
            let (mut written, mut next_block, mut at, mut version) = (0u64, 0usize, 0u64, 1u64);
            while !flag.load(Ordering::Relaxed) {
                for (i, b) in buf.chunks_mut(BS).enumerate() {
                    b.copy_from_slice(&mail[next_block % mail.len()]);
                    next_block += 1;
                    stamp(b, half + at + (i * BS) as u64, run, version);
                }
                f.write_all_at(buf, half + at).context("busy writer")?;
                written += WRITE as u64;
                at += WRITE as u64;
                if at + WRITE as u64 > half {
                    at = 0;
                    version += 1;
                }
                if rate > 0 {
                    let due = Duration::from_secs_f64(written as f64 / (rate as f64 * 1e6));
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            Ok(written)
        });
        Ok(Self { stop, thread })
    }

    /// Stops the writer; returns the bytes it wrote.
    fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("busy writer panicked"))?
    }
}

fn stamp(b: &mut [u8], offset: u64, run: u64, version: u64) {
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..24].copy_from_slice(&run.to_le_bytes());
    b[24..STAMP].copy_from_slice(&version.to_le_bytes());
}

/// Busy blocks in `[half, 2 half)` of `image`: (found, misplaced or from another run).
fn check_busy_blocks(image: &Path, half: u64, run: u64) -> Result<(u64, u64)> {
    let f = std::fs::File::open(image)?;
    let mut buf = vec![0u8; WRITE];
    let (mut found, mut bad) = (0, 0);
    let mut at = half;
    while at < 2 * half {
        f.read_exact_at(&mut buf, at)?;
        for (i, b) in buf.chunks(BS).enumerate() {
            if &b[0..8] == MAGIC {
                found += 1;
                let off = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
                let r = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
                if off != at + (i * BS) as u64 || r != run {
                    bad += 1;
                }
            }
        }
        at += WRITE as u64;
    }
    Ok((found, bad))
}
