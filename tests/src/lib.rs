//! Support for the integration tests: locating the `tandem` binary, checking the privileges
//! the real-device tests need (and failing loudly without them), and I/O helpers that write
//! and check blocks recording their own offset.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tandem_agent::lab::{Lab, LabOptions};

/// The `tandem` binary built alongside this test (cargo builds it for the agent's own
/// integration tests): target/<profile>/tandem, two levels above target/<profile>/deps/.
pub fn tandem_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANDEM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target dir").join("tandem");
    assert!(
        bin.exists(),
        "tandem binary not found at {} — run the tests with `cargo test --workspace` (which builds it) or set TANDEM_BIN",
        bin.display()
    );
    bin
}

/// The real-device tests need root, /dev/fuse, loop devices and util-linux. Without them
/// they fail with the reason — they never pass silently.
pub fn require_real_devices() {
    // SAFETY: geteuid cannot fail.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root (FUSE mounts, loop devices, mkfs); run as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "this test needs /dev/fuse (modprobe fuse)");
    assert!(Path::new("/dev/loop-control").exists(), "this test needs loop devices (modprobe loop)");
    for tool in ["losetup", "mkfs.ext4", "mount", "e2fsck"] {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "this test needs {tool} (apt-get install util-linux e2fsprogs mount)");
    }
}

/// Where labs live: a real filesystem (O_DIRECT works), not tmpfs.
pub fn lab_parent() -> PathBuf {
    PathBuf::from(std::env::var("TANDEM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
}

pub fn new_lab(names: &[&str], opts: &LabOptions) -> Lab {
    require_real_devices();
    Lab::new(&lab_parent(), &tandem_bin(), names, opts).expect("create lab")
}

pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("read");
    format!("{:x}", h.finalize())
}

pub const BLOCK: usize = 4096;

/// A 4 KiB block that records its own offset, a run id and a version, so a block found at
/// the wrong place or from the wrong run is recognised.
pub fn stamped_block(offset: u64, run: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(b"TANDEMBK");
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..24].copy_from_slice(&run.to_le_bytes());
    b[24..32].copy_from_slice(&version.to_le_bytes());
    for (i, x) in b[32..].iter_mut().enumerate() {
        *x = (offset.wrapping_mul(31) ^ run ^ version.wrapping_mul(7) ^ i as u64) as u8;
    }
    b
}

/// Aligned buffer for O_DIRECT.
pub struct Aligned(Vec<u8>, usize);

impl Aligned {
    pub fn new(data: &[u8]) -> Self {
        let mut v = vec![0u8; data.len() + BLOCK];
        let off = v.as_ptr().align_offset(BLOCK);
        v[off..off + data.len()].copy_from_slice(data);
        Aligned(v, off)
    }
    pub fn slice(&self, len: usize) -> &[u8] {
        &self.0[self.1..self.1 + len]
    }
}

/// Writes one block with O_DIRECT (and O_DSYNC when `sync`), bypassing every cache.
pub fn write_block_direct(dev: &str, offset: u64, data: &[u8], sync: bool) -> std::io::Result<()> {
    let flags = libc::O_DIRECT | if sync { libc::O_DSYNC } else { 0 };
    let f = OpenOptions::new().write(true).custom_flags(flags).open(dev)?;
    let a = Aligned::new(data);
    f.write_all_at(a.slice(data.len()), offset)
}

/// Reads `len` bytes at `offset` from a file (image) without the page cache.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("open");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).expect("read");
    b
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
