//! Resync measurements: a full resync against a plain `dd` copy of the same image, and a
//! delta resync's bytes against the bytes changed while the peer was away.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::Rng;
use tandem_tests::lab::{run_cmd, Lab, LabOptions};

use crate::Args;

fn dd_copy(from: &Path, to: &Path) -> Result<f64> {
    let t = Instant::now();
    run_cmd(
        Command::new("dd").arg(format!("if={}", from.display())).arg(format!("of={}", to.display())).args([
            "bs=1M",
            "iflag=direct",
            "oflag=direct",
            "conv=fsync,notrunc",
            "status=none",
        ]),
    )?;
    Ok(t.elapsed().as_secs_f64())
}

fn write_random(dev: &str, blocks: u64, size: u64) -> Result<u64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(dev)?;
    let mut buf = vec![0u8; 8192];
    let off = buf.as_ptr().align_offset(4096);
    let mut rng = rand::rng();
    let mut set = std::collections::BTreeSet::new();
    for i in 0..blocks {
        let b = rng.random_range(0..size / 4096);
        buf[off..off + 8].copy_from_slice(&i.to_le_bytes());
        f.write_all_at(&buf[off..off + 4096], b * 4096)?;
        set.insert(b);
    }
    f.sync_all()?;
    Ok(set.len() as u64 * 4096)
}

pub fn run(args: &Args, tandem: &Path) -> Result<String> {
    let size = args.size;
    let opts = LabOptions { size, timeout: Duration::from_secs(10), ..Default::default() };
    let mut lab = Lab::new(&args.work, tandem, &["alpha", "beta"], &opts)?;
    lab.start("alpha")?;
    lab.start("beta")?;
    lab.wait_connected("alpha", Duration::from_secs(60))?;
    if !lab.promote("alpha", false)?.ok {
        bail!("promote failed");
    }
    let dev = lab
        .wait_for("alpha", "replicating", Duration::from_secs(60), |r| r.device.is_some())?
        .device
        .unwrap_or_default();
    // Give the volume content so the copy is not of zeroes.
    run_cmd(
        Command::new("dd")
            .args(["if=/dev/urandom", &format!("of={dev}"), "bs=1M", "oflag=direct", "status=none"])
            .arg(format!("count={}", size >> 20)),
    )?;
    // Full resync: the standby discards its copy.
    let t = Instant::now();
    let out = Command::new(tandem)
        .arg("--config")
        .arg(&lab.config)
        .args(["--node", "beta", "invalidate", "mail"])
        .output()?;
    if !out.status.success() {
        bail!("invalidate: {}", String::from_utf8_lossy(&out.stderr));
    }
    lab.wait_for("beta", "full resync done", Duration::from_secs(600), |r| {
        r.disk == "up_to_date" && r.peers[0].connection == "connected"
    })?;
    let full_secs = t.elapsed().as_secs_f64();
    let full_bytes =
        lab.resource_status("alpha")?.peers[0].resync.clone().unwrap_or_default().data_bytes_sent;
    // Delta: 1 % of the volume in random blocks while disconnected.
    let before = lab.resource_status("alpha")?.peers[0].resync.clone().unwrap_or_default().data_bytes_sent;
    let out = Command::new(tandem)
        .arg("--config")
        .arg(&lab.config)
        .args(["--node", "alpha", "disconnect", "mail"])
        .output()?;
    if !out.status.success() {
        bail!("disconnect failed");
    }
    let changed = write_random(&dev, (size / 4096) / 100, size)?;
    let t = Instant::now();
    let out = Command::new(tandem)
        .arg("--config")
        .arg(&lab.config)
        .args(["--node", "alpha", "connect", "mail"])
        .output()?;
    if !out.status.success() {
        bail!("connect failed");
    }
    lab.wait_for("alpha", "delta resync done", Duration::from_secs(600), |r| {
        r.peers[0].connection == "connected"
            && r.peers[0].out_of_sync_bytes == 0
            && r.peers[0].replication == "established"
    })?;
    let delta_secs = t.elapsed().as_secs_f64();
    let delta_bytes =
        lab.resource_status("alpha")?.peers[0].resync.clone().unwrap_or_default().data_bytes_sent - before;
    if !lab.demote("alpha")?.ok {
        bail!("demote failed");
    }
    lab.stop_all();
    let same =
        crate::scan::scan("resync", &lab.image("alpha"), Some(&lab.image("beta")))?.standby_differs == 0;
    let copy = args.work.join("dd-copy.img");
    crate::stacks::zero_file(&copy, size)?;
    let dd_secs = dd_copy(&lab.image("alpha"), &copy)?;
    std::fs::remove_file(&copy)?;
    let mb = |b: u64, s: f64| b as f64 / s / 1e6;
    Ok(format!(
        "| resync measurement | value |\n|---|---|\n\
         | full resync of {size} bytes | {full_secs:.1} s, {:.0} MB/s ({full_bytes} bytes sent) |\n\
         | dd copy of the same image (O_DIRECT, 1 MiB) | {dd_secs:.1} s, {:.0} MB/s |\n\
         | full resync rate / dd rate | {:.0} % |\n\
         | delta resync: bytes changed while disconnected | {changed} |\n\
         | delta resync: bytes sent | {delta_bytes} ({:.2} x changed) in {delta_secs:.1} s |\n\
         | images identical afterwards | {} |\n",
        mb(size, full_secs),
        mb(size, dd_secs),
        100.0 * dd_secs / full_secs,
        delta_bytes as f64 / changed.max(1) as f64,
        if same { "yes" } else { "NO" },
    ))
}
