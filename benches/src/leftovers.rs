//! What an interrupted run left in the scratch directory: processes, mounts and loop
//! devices. A run cleans up after itself through drop guards, but a run killed by a signal
//! never unwinds: its agents, its Postfix instance, its mounts and loop devices stay, and
//! the next run would fail on them (a busy image, a port in use) or measure beside them.
//! So every run first clears what belongs to its scratch directory, and only that: a
//! process is ours if it is one the bench starts (an agent, Postfix's master, fio) and its
//! command line or environment names the directory (the agents' configs, Postfix's
//! `MAIL_CONFIG`); a mount if its mount point is inside it; a loop device if its backing
//! file is.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The processes a run starts (`comm`): agents, Postfix's master (its children exit with
/// it), fio.
const OURS: &[&str] = &["tandem", "master", "fio"];

/// Clears what an earlier run left under `work`; says what it cleared.
pub fn clear(work: &Path) -> Vec<String> {
    let Some(work) = work.canonicalize().ok().and_then(|p| p.to_str().map(|s| format!("{s}/"))) else {
        return Vec::new();
    };
    let mut cleared = Vec::new();
    let me = std::process::id();
    let mut killed = Vec::new();
    for pid in pids().into_iter().filter(|&p| p != me) {
        let started_by_us =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| OURS.contains(&c.trim()));
        if started_by_us && (mentions(pid, "cmdline", &work) || mentions(pid, "environ", &work)) {
            // SAFETY: kill(2) with a pid read from /proc; at worst the process is gone.
            if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                killed.push(pid);
            }
        }
    }
    if !killed.is_empty() {
        cleared.push(format!("killed {} process(es) of an earlier run: {killed:?}", killed.len()));
        std::thread::sleep(Duration::from_millis(500));
    }
    // Loop devices before mounts: a file system on one keeps it until unmounted (the
    // detach then completes), and unmounting a FUSE file first would hide its path.
    for (dev, backing) in loops_backed_under(&work) {
        if Command::new("losetup").args(["-d", &dev]).status().is_ok_and(|s| s.success()) {
            cleared.push(format!("detached {dev} ({backing})"));
        }
    }
    let mut mounts = mount_points_under(&work);
    // Deepest first, so a mount inside another goes before it.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        if Command::new("umount").arg("-l").arg(&m).status().is_ok_and(|s| s.success()) {
            cleared.push(format!("unmounted {m}"));
        }
    }
    cleared
}

fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// Whether /proc/PID/`file` (NUL-separated strings) names a path inside `work`.
fn mentions(pid: u32, file: &str, work: &str) -> bool {
    let Ok(bytes) = std::fs::read(format!("/proc/{pid}/{file}")) else { return false };
    bytes.split(|&b| b == 0).any(|s| String::from_utf8_lossy(s).contains(work))
}

/// Mount points inside `work`, from /proc/self/mountinfo (field 5; octal escapes decoded).
fn mount_points_under(work: &str) -> Vec<String> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape).filter(|m| m.starts_with(work)).collect()
}

/// Loop devices whose backing file is inside `work`, with that file.
fn loops_backed_under(work: &str) -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name().to_str()?.to_string();
        let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
        let backing = backing.trim().to_string();
        backing.starts_with(work).then(|| (format!("/dev/{name}"), backing))
    })
    .collect()
}

/// Decodes mountinfo's `\NNN` octal escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v =
                u16::from(b[i + 1] - b'0') * 64 + u16::from(b[i + 2] - b'0') * 8 + u16::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/var/tmp/a\040b"), "/var/tmp/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }
}
