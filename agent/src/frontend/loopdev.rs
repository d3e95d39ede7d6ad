//! Loop devices over the FUSE image, managed with util-linux `losetup`.
//!
//! `losetup -f --show` always: another process may grab any particular /dev/loopN at any
//! moment, so we never assume a number and only ever detach the device we attached.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

fn losetup(args: &[&str]) -> Result<String> {
    let out =
        Command::new("losetup").args(args).output().context("cannot run losetup (install util-linux)")?;
    if !out.status.success() {
        bail!("losetup {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Attaches a loop device to `file` with direct I/O and 4 KiB logical sectors; returns its
/// path. Direct I/O keeps the loop driver from caching (and delaying) writes in front of us.
pub fn attach(file: &Path) -> Result<String> {
    let f = file.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", file.display()))?;
    let dev = losetup(&["-f", "--show", "--direct-io=on", "--sector-size", "4096", f])?;
    if !dev.starts_with("/dev/loop") {
        bail!("losetup returned an unexpected device {dev:?}");
    }
    match losetup(&["-n", "-O", "DIO", &dev]) {
        Ok(d) if d.trim() == "1" => {}
        Ok(d) => {
            warn!(device = %dev, "loop device did not get direct I/O (DIO={d}); writes may be cached by the loop driver")
        }
        Err(e) => warn!("cannot check direct I/O of {dev}: {e}"),
    }
    info!(device = %dev, file = %file.display(), "loop device attached");
    Ok(dev)
}

/// Attaches a read-only loop device to `file` (4 KiB sectors, direct I/O); returns its path.
pub fn attach_read_only(file: &Path) -> Result<String> {
    let f = file.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", file.display()))?;
    let dev = losetup(&["-f", "--show", "-r", "--direct-io=on", "--sector-size", "4096", f])?;
    if !dev.starts_with("/dev/loop") {
        bail!("losetup returned an unexpected device {dev:?}");
    }
    info!(device = %dev, file = %file.display(), "read-only loop device attached");
    Ok(dev)
}

/// Whether something holds the device open exclusively (a mounted filesystem does).
pub fn in_use(dev: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev) {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// Detaches `dev`, refusing if it is in use.
pub fn detach(dev: &str) -> Result<()> {
    if in_use(dev) {
        bail!("device {dev} is in use (mounted or open); unmount it first");
    }
    losetup(&["-d", dev])?;
    info!(device = %dev, "loop device detached");
    Ok(())
}

/// Loop devices whose backing file is in directory `dir` (a FUSE mount of ours).
pub fn attached_under(dir: &Path) -> Vec<String> {
    let Ok(out) = losetup(&["-l", "-n", "--raw", "-O", "NAME,BACK-FILE"]) else {
        return Vec::new();
    };
    let prefix = format!("{}/", dir.display());
    out.lines()
        .filter_map(|l| l.trim().split_once(' '))
        .filter(|(_, back)| back.trim_start().starts_with(&prefix))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Loop devices whose backing file is `file` (left behind by an agent that was killed).
pub fn attached_to(file: &Path) -> Vec<String> {
    let Some(f) = file.to_str() else {
        return Vec::new();
    };
    match losetup(&["-j", f, "-n", "-O", "NAME"]) {
        Ok(out) => out.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect(),
        Err(_) => Vec::new(),
    }
}
