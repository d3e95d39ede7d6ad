//! `--configs busy-wan`: the headline three-node setup — a primary, a `sync` LAN standby
//! without compression and an `async` replica with `compression = "zstd"`, all on loopback —
//! and the sync standby's W1 latency with the zstd replica idle, then busy.
//!
//! "Busy" is a second fio job writing compressible 1 MiB blocks (direct, QD4) to the second
//! half of the device for the whole W1 run, so every byte of it is compressed for the zstd
//! replica; W1 runs on the first half. Each W1 write waits for the sync standby's ack,
//! which comes back through the primary's one network thread: if compression runs there,
//! W1 waits for it. The zstd replica's share shows in its wire/data ratio.
//!
//! Data check as for the other configurations: an integrity pass with verify headers, the
//! replicas caught up, then the primary's image scanned and compared block by block with
//! the sync standby's and the zstd replica's.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_agent::lab::{Lab, LabOptions};

use crate::fio::{self, Row, WORKLOADS};
use crate::scan::{self, Check};
use crate::Args;

/// The zstd replica's disk keys, added to its `[resource.disk.gamma]` table.
const GAMMA_KEYS: &str = "mode = \"async\"\ncompression = \"zstd\"\nbacklog = \"1GiB\"\n";

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
    std::fs::write(&lab.config, text.replacen(meta, &format!("{meta}{GAMMA_KEYS}"), 1))?;
    for n in names {
        lab.start(n)?;
    }
    lab.wait_for("alpha", "all connected", Duration::from_secs(60), |r| {
        r.peers.len() == 2 && r.peers.iter().all(|p| p.connection == "connected")
    })?;
    let r = lab.promote("alpha", false)?;
    if !r.ok {
        bail!("promote: {:?}", r.error);
    }
    let st = lab.wait_for("alpha", "replicating", Duration::from_secs(60), |r| {
        r.device.is_some() && r.peers.iter().all(|p| p.replication == "established")
    })?;
    let modes: Vec<_> = st.peers.iter().map(|p| format!("{}={}", p.node, p.mode)).collect();
    eprintln!("peers: {}", modes.join(", "));
    let dev = st.device.context("no device")?;
    let out = args.work.join("results");
    std::fs::create_dir_all(&out)?;
    let half = args.size / 2;
    let w1 = format!("{} --offset=0 --size={half}", WORKLOADS[0].1);

    let mut rows = Vec::new();
    for busy in [false, true] {
        let label = if busy { "3-node, zstd peer busy" } else { "3-node, zstd peer idle" };
        let before = lab.resource_status("alpha")?;
        let mut writer =
            busy.then(|| busy_writer(&dev, half, args.runtime + 2 + BUSY_LEAD + 2)).transpose()?;
        if writer.is_some() {
            std::thread::sleep(Duration::from_secs(BUSY_LEAD));
        }
        let row = fio::run(label, "W1", &w1, &dev, args.runtime, &out);
        if let Some(w) = writer.as_mut() {
            let status = w.wait()?;
            if !status.success() {
                bail!("busy writer failed ({status})");
            }
        }
        let row = row?;
        let after = lab.resource_status("alpha")?;
        let gamma = |s: &tandem_agent::status::ResourceStatus| {
            s.peers.iter().find(|p| p.node == "gamma").map(|p| (p.sent_data_bytes, p.sent_wire_bytes))
        };
        let (d0, w0) = gamma(&before).unwrap_or_default();
        let (d1, w1b) = gamma(&after).unwrap_or_default();
        eprintln!(
            "{label} W1: {:.0} IOPS p50 {:.0} µs p99 {:.0} µs; zstd peer: {:.0} MiB data as {:.0} MiB on the wire",
            row.iops,
            row.p50_us,
            row.p99_us,
            (d1 - d0) as f64 / (1 << 20) as f64,
            (w1b - w0) as f64 / (1 << 20) as f64,
        );
        rows.push(row);
    }

    fio::integrity_pass(&dev, args.size, if args.quick { 2 } else { 4 })?;
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
    let checks = vec![
        scan::scan("busy-wan: alpha vs beta (sync)", &lab.image("alpha"), Some(&lab.image("beta")))?,
        scan::scan("busy-wan: alpha vs gamma (async, zstd)", &lab.image("alpha"), Some(&lab.image("gamma")))?,
    ];
    Ok((rows, checks))
}

/// Sequential 1 MiB direct writes of compressible data (about 3/4 of each 4 KiB chunk
/// compresses away, fresh buffers each write) over `[half, 2 half)` for `seconds`.
fn busy_writer(dev: &str, half: u64, seconds: u64) -> Result<std::process::Child> {
    Command::new("fio")
        .arg("--name=busy-zstd")
        .arg(format!("--filename={dev}"))
        .args(["--direct=1", "--ioengine=libaio", "--rw=write", "--bs=1M", "--iodepth=4", "--time_based"])
        .args(["--buffer_compress_percentage=75", "--buffer_compress_chunk=4096", "--refill_buffers"])
        .arg(format!("--offset={half}"))
        .arg(format!("--size={half}"))
        .arg(format!("--runtime={seconds}"))
        .stdout(Stdio::null())
        .spawn()
        .context("starting the busy writer (fio)")
}
