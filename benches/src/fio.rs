//! Running fio and reading its JSON.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const WORKLOADS: [(&str, &str); 3] = [
    ("W1", "--rw=randwrite --bs=4k --iodepth=1 --fsync=1"),
    ("W2", "--rw=randwrite --bs=4k --iodepth=32"),
    ("W3", "--rw=write --bs=1M --iodepth=4"),
];

#[derive(Debug, Clone)]
pub struct Row {
    pub config: String,
    pub workload: String,
    pub iops: f64,
    pub mbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Activity-log writes per 1000 application writes (Tandem configurations).
    pub al_per_1000: Option<f64>,
    /// `sync-snapN`: the standby's snapshot space after the workload.
    pub snapshot: Option<crate::snapshots::Space>,
    /// p50 of the fsyncs fio issued (W1), µs.
    pub sync_p50_us: f64,
    /// When fio ran (`CLOCK_MONOTONIC` ns; ramp included), for `--breakdown`.
    pub window: (u64, u64),
    /// Each agent's peak resident size during the workload (primary first), MiB.
    pub peak_rss_mib: Vec<f64>,
}

/// Runs one timed workload against `target` (a file or block device).
pub fn run(config: &str, wl: &str, spec: &str, target: &str, runtime: u64, out: &Path) -> Result<Row> {
    let json = out.join(format!("{config}.{wl}.json"));
    let started = crate::breakdown::now_ns();
    let status = Command::new("fio")
        .arg(format!("--name={config}-{wl}"))
        .arg(format!("--filename={target}"))
        .args([
            "--direct=1",
            "--ioengine=libaio",
            "--numjobs=1",
            "--time_based",
            "--ramp_time=2",
            "--size=1G",
        ])
        .args(spec.split_whitespace())
        .arg(format!("--runtime={runtime}"))
        .arg("--output-format=json")
        .arg(format!("--output={}", json.display()))
        .status()
        .context("running fio")?;
    if !status.success() {
        bail!("fio {config} {wl} failed ({status})");
    }
    let window = (started, crate::breakdown::now_ns());
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let w = &v["jobs"][0]["write"];
    let pct = |k: &str| w["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Row {
        config: config.to_string(),
        workload: wl.to_string(),
        iops: w["iops"].as_f64().unwrap_or(0.0),
        mbps: w["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        al_per_1000: None,
        snapshot: None,
        sync_p50_us: v["jobs"][0]["sync"]["lat_ns"]["percentile"]["50.000000"].as_f64().unwrap_or(0.0)
            / 1000.0,
        window,
        peak_rss_mib: vec![],
    })
}

/// The integrity pass: fio writes blocks carrying a verify header that records their
/// offset — random 4 KiB at QD32 over the first half, sequential 1 MiB at QD4 over the
/// second — like the peer script's.
pub fn integrity_pass(target: &str, size: u64, seconds: u64) -> Result<()> {
    let half = size / 2;
    for (name, offset, spec) in
        [("I2", 0, "--rw=randwrite --bs=4k --iodepth=32"), ("I3", half, "--rw=write --bs=1M --iodepth=4")]
    {
        let status = Command::new("fio")
            .arg(format!("--name={name}"))
            .arg(format!("--filename={target}"))
            .args(["--direct=1", "--ioengine=libaio", "--numjobs=1", "--time_based"])
            .args(["--verify=crc32c", "--verify_interval=4096", "--do_verify=0", "--verify_state_save=0"])
            .arg(format!("--offset={offset}"))
            .arg(format!("--size={half}"))
            .arg(format!("--runtime={seconds}"))
            .args(spec.split_whitespace())
            .stdout(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            bail!("integrity fio {name} failed");
        }
    }
    Ok(())
}

pub fn table(rows: &[Row]) -> String {
    let find =
        |cfg: &str, wl: &str| rows.iter().find(|r| r.config == cfg && r.workload == wl).map(|r| r.iops);
    let mut s = String::from(
        "| config | workload | IOPS | MB/s | clat p50 µs | clat p99 µs | vs loop | vs raw | vs tandem-sync | AL writes / 1000 writes | agents' peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = |base: Option<f64>| {
            base.filter(|b| *b > 0.0).map_or("-".into(), |b| format!("{:.0} %", 100.0 * r.iops / b))
        };
        s += &format!(
            "| {} | {} | {:.0} | {:.1} | {:.0} | {:.0} | {} | {} | {} | {} | {} |\n",
            r.config,
            r.workload,
            r.iops,
            r.mbps,
            r.p50_us,
            r.p99_us,
            ratio(find("loop", &r.workload)),
            ratio(find("raw", &r.workload)),
            ratio(find("tandem-sync", &r.workload)),
            r.al_per_1000.map_or("-".into(), |a| format!("{a:.2}")),
            if r.peak_rss_mib.is_empty() {
                "-".to_string()
            } else {
                r.peak_rss_mib.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" / ")
            },
        );
    }
    s
}
