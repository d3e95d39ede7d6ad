//! Support for the integration tests (and the benchmarks): the lab of real agents
//! ([`lab`]), locating the `tandem` binary, checking the privileges the real-device tests
//! need (and failing loudly without them), and I/O helpers that write and check blocks
//! recording their own offset.

pub mod epochs;
pub mod lab;
pub mod metrics;
pub mod pacemaker;
pub mod relay;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::lab::{Lab, LabOptions};
use sha2::{Digest, Sha256};

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

/// Labs with `LabOptions::netns` also need iproute2 and nsenter (and root, checked by
/// [`require_real_devices`]). Without them the test fails with the reason.
pub fn require_netns() {
    for tool in ["ip", "nsenter"] {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "this test needs {tool} for network namespaces (apt-get install iproute2 util-linux)");
    }
}

/// The OCF resource agent in this repository (`agent/ocf/tandem`).
pub fn ocf_agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/ocf/tandem")
}

/// The Pacemaker tests need Pacemaker, Corosync, resource-agents (ocf-tester and the
/// heartbeat agents) and xmllint. Without them the test fails with the reason and the
/// install command (`.ci/run` installs them).
pub fn require_pacemaker() {
    let tools = [
        ("ocf-tester", "resource-agents"),
        ("xmllint", "libxml2-utils"),
        ("crm_attribute", "pacemaker-cli-utils"),
        ("crm_mon", "pacemaker-cli-utils"),
        ("pacemakerd", "pacemaker"),
        ("corosync", "corosync"),
        // ocf:heartbeat:Filesystem refuses to run without these.
        ("modprobe", "kmod"),
        ("fuser", "psmisc"),
    ];
    for (tool, package) in tools {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "this test needs {tool} (package {package}); install with: echo 'exit 101' > /usr/sbin/policy-rc.d; \
             apt-get install -y --no-install-recommends pacemaker corosync resource-agents pacemaker-cli-utils libxml2-utils"
        );
    }
}

pub fn new_lab(names: &[&str], opts: &LabOptions) -> Lab {
    require_real_devices();
    if opts.netns {
        require_netns();
    }
    let mut lab = Lab::new(&lab_parent(), &tandem_bin(), names, opts).expect("create lab");
    // TANDEM_KEEP_LAB=1 keeps the lab's directory (config, logs, images) for inspection.
    if std::env::var_os("TANDEM_KEEP_LAB").is_some_and(|v| v != "0") {
        println!("keeping lab directory {}", lab.dir.display());
        lab.keep(true);
    }
    lab
}

/// `e2fsck -fn DEV`: Ok when the filesystem is clean, else its report.
/// mkfs.ext4 for a test load on `dev`: a small journal and the inode tables written now
/// (not by ext4lazyinit after mount), so the filesystem's writes stay where the load puts
/// them.
pub fn mkfs_ext4_for_load(dev: &str) {
    crate::lab::run_cmd(std::process::Command::new("mkfs.ext4").args([
        "-q",
        "-F",
        "-b",
        "4096",
        "-J",
        "size=4",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
        dev,
    ]))
    .unwrap();
}

pub fn e2fsck_clean(dev: &str) -> Result<(), String> {
    let out = std::process::Command::new("e2fsck").args(["-f", "-n", dev]).output().expect("run e2fsck");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn {dev}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Block data `node` has sent as a resync source since its agent started, to every peer.
pub fn resync_bytes_sent(lab: &Lab, node: &str) -> u64 {
    let st = lab.resource_status(node).unwrap_or_else(|e| panic!("status of {node}: {e:#}"));
    st.peers.iter().filter_map(|p| p.resync.as_ref()).map(|r| r.data_bytes_sent).sum()
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

/// Runs `tandem --config <lab config> --node NODE ARGS...`.
pub fn tandem_cli(lab: &Lab, node: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(lab.exe())
        .arg("--config")
        .arg(&lab.config)
        .args(["--node", node])
        .args(args)
        .output()
        .expect("run tandem")
}

/// Runs a CLI verb that must succeed; returns its stdout.
pub fn tandem_ok(lab: &Lab, node: &str, args: &[&str]) -> String {
    let out = tandem_cli(lab, node, args);
    assert!(
        out.status.success(),
        "tandem {args:?} on {node} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Writes stamped blocks with O_DIRECT through one open descriptor and remembers the
/// newest version written at each offset.
pub struct BlockWriter {
    file: std::fs::File,
    pub run: u64,
    pub written: std::collections::BTreeMap<u64, u64>,
    /// The write that failed (offset, version), if one did.
    pub failed: Option<(u64, u64)>,
}

impl BlockWriter {
    pub fn open(dev: &str, run: u64, sync: bool) -> Self {
        let flags = libc::O_DIRECT | if sync { libc::O_DSYNC } else { 0 };
        let file = OpenOptions::new().write(true).custom_flags(flags).open(dev).expect("open device");
        Self { file, run, written: Default::default(), failed: None }
    }

    pub fn write(&mut self, offset: u64) -> std::io::Result<()> {
        let version = self.written.get(&offset).map_or(1, |v| v + 1);
        let a = Aligned::new(&stamped_block(offset, self.run, version));
        if let Err(e) = self.file.write_all_at(a.slice(BLOCK), offset) {
            self.failed = Some((offset, version));
            return Err(e);
        }
        self.written.insert(offset, version);
        Ok(())
    }

    /// Blocks of `image` that hold neither their acknowledged version nor, for the write
    /// that failed (never acknowledged, but it may have reached a disk), its version.
    pub fn lacking(&self, image: &Path) -> Vec<u64> {
        let f = std::fs::File::open(image).expect("open image");
        let mut buf = vec![0u8; BLOCK];
        self.written
            .iter()
            .filter(|(off, v)| {
                f.read_exact_at(&mut buf, **off).expect("read image");
                let in_flight = self.failed.filter(|(o, _)| o == *off).map(|(_, fv)| fv);
                buf != stamped_block(**off, self.run, **v)
                    && in_flight.is_none_or(|fv| buf != stamped_block(**off, self.run, fv))
            })
            .map(|(o, _)| *o)
            .collect()
    }

    pub fn sync(&self) {
        self.file.sync_all().expect("fsync device");
    }
}

/// Checks that `image` holds, at every offset in `written`, the stamped block of that
/// version (the newest write made there); returns the offsets that do not.
pub fn stale_blocks(image: &Path, run: u64, written: &std::collections::BTreeMap<u64, u64>) -> Vec<u64> {
    let f = std::fs::File::open(image).expect("open image");
    let mut buf = vec![0u8; BLOCK];
    written
        .iter()
        .filter(|(off, v)| {
            f.read_exact_at(&mut buf, **off).expect("read image");
            buf != stamped_block(**off, run, **v)
        })
        .map(|(o, _)| *o)
        .collect()
}

/// Polls until `pred` holds for `node`'s status of its only resource.
pub fn wait_until(
    lab: &Lab,
    node: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&tandem_agent::status::ResourceStatus) -> bool,
) -> tandem_agent::status::ResourceStatus {
    lab.wait_for(node, what, timeout, pred)
        .unwrap_or_else(|e| panic!("{e:#}\nlog of {node}:\n{}", lab.log_text(node)))
}

/// Writes `mib` MiB sequentially (wrapping within the first 32 MiB) in 1 MiB O_DIRECT
/// writes of stamped 4 KiB blocks, recording versions in `written`; returns MB/s.
pub fn sequential_mib(
    dev: &str,
    run: u64,
    mib: u64,
    written: &mut std::collections::BTreeMap<u64, u64>,
) -> f64 {
    const MIB: u64 = 1 << 20;
    let t = std::time::Instant::now();
    let mut buf = Vec::with_capacity(MIB as usize);
    for m in 0..mib {
        buf.clear();
        for b in 0..(MIB / BLOCK as u64) {
            let off = ((m % 32) * MIB) + b * BLOCK as u64;
            let v = written.get(&off).map_or(1, |v| v + 1);
            buf.extend_from_slice(&stamped_block(off, run, v));
            written.insert(off, v);
        }
        write_block_direct(dev, (m % 32) * MIB, &buf, false).expect("write");
    }
    (mib * MIB) as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Every peer connected and replicating, with nothing pending and nothing out of sync.
pub fn all_caught_up(r: &tandem_agent::status::ResourceStatus) -> bool {
    r.peers.iter().all(|p| {
        p.connection == "connected"
            && p.replication == "established"
            && p.pending_requests == 0
            && p.out_of_sync_bytes == 0
    })
}

/// Starts the agents of `nodes`, waits until alpha is connected, promotes alpha and waits
/// until `ready` holds for it; returns alpha's device.
pub fn start_and_promote_alpha(
    lab: &mut Lab,
    nodes: &[&str],
    ready: impl Fn(&tandem_agent::status::ResourceStatus) -> bool,
) -> String {
    for n in nodes {
        lab.start(n).unwrap();
    }
    lab.wait_connected("alpha", secs(60)).unwrap();
    let r = lab.promote("alpha", false).unwrap();
    assert!(r.ok, "{r:?}");
    wait_until(lab, "alpha", "ready", secs(60), |r| r.device.is_some() && ready(r))
        .device
        .expect("primary has a device")
}

/// `config` with `keys` (TOML lines) added to `node`'s `[resource.disk.NODE]` table: the
/// per-peer settings (mode, backlog, compression) for replication to `node`.
pub fn with_disk_keys(config: &str, node: &str, keys: &str) -> String {
    let meta = format!("{node}/mail.meta\"\n");
    assert!(config.contains(&meta), "no disk table for {node} in the lab config");
    config.replacen(&meta, &format!("{meta}{keys}\n"), 1)
}

/// Appends a second resource, `name` of `size` in `sync` mode, with a disk on `alpha` and
/// `beta`, to the lab's config (before the agents start).
pub fn add_resource(lab: &Lab, name: &str, size: &str) {
    let text = std::fs::read_to_string(&lab.config).unwrap();
    let d = lab.dir.display();
    let mut extra = format!("\n[[resource]]\nname = \"{name}\"\nsize = \"{size}\"\nmode = \"sync\"\n\n");
    for n in ["alpha", "beta"] {
        extra += &format!(
            "[resource.disk.{n}]\nimage = \"{d}/{n}/{name}.img\"\nmeta = \"{d}/{n}/{name}.meta\"\n\n"
        );
    }
    std::fs::write(&lab.config, text + &extra).unwrap();
}

/// `node`'s status of `resource` (a lab with several resources).
pub fn status_of(lab: &Lab, node: &str, resource: &str) -> tandem_agent::status::ResourceStatus {
    let s = lab.status(node).unwrap_or_else(|e| panic!("status of {node}: {e:#}"));
    s.resources.into_iter().find(|r| r.name == resource).unwrap_or_else(|| panic!("no {resource} on {node}"))
}

/// Polls `node`'s status of `resource` until `pred` holds (60 s at most).
pub fn wait_resource(
    lab: &Lab,
    node: &str,
    resource: &str,
    what: &str,
    pred: impl Fn(&tandem_agent::status::ResourceStatus) -> bool,
) -> tandem_agent::status::ResourceStatus {
    let deadline = std::time::Instant::now() + secs(60);
    loop {
        let s = status_of(lab, node, resource);
        if pred(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {node}/{resource}: {what}; last: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
