//! A cluster of real agents on this machine, for `tandem demo` and the integration tests:
//! keys, a config, agent processes, and cleanup of everything it created — processes,
//! mounts, loop devices, network namespaces, files — even when the run fails or panics.
//!
//! By default every agent listens on its own port of 127.0.0.1. With
//! [`LabOptions::netns`] each agent runs in a network namespace of its own, with its own
//! address, the namespaces joined through a bridge (itself in one more namespace), so a
//! node's link can be cut ([`Lab::partition`]) and restored ([`Lab::heal`]). Only the
//! network namespace differs: the agents share the test's mount namespace, so their FUSE
//! mounts and loop devices are visible to it, and their control sockets are plain paths.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::control::{self, Request, Response};
use crate::status::{NodeStatus, ResourceStatus};

pub struct LabNode {
    pub name: String,
    /// The IP address the node's agent listens on (127.0.0.1, or its namespace's address).
    pub ip: String,
    pub port: u16,
    /// The network namespace the agent runs in (`LabOptions::netns`).
    pub netns: Option<String>,
    /// The config file this node's agent starts with when it is not the lab's shared one
    /// (see [`Lab::route_via`]).
    config: Option<PathBuf>,
    child: Option<Child>,
}

pub struct Lab {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub nodes: Vec<LabNode>,
    pub resource: String,
    exe: PathBuf,
    keep: bool,
    mounts: Vec<PathBuf>,
    /// Loop devices the lab attached itself (not the agents').
    loops: Vec<String>,
    net: Option<LabNet>,
}

/// Finds a free UDP port on 127.0.0.1 (QUIC runs over UDP).
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Options for the lab's generated configuration.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub size: u64,
    pub mode: String,
    pub timeout: Duration,
    /// Extra lines appended to the `[options]` table.
    pub extra_options: String,
    /// Extra lines appended to the `[[resource]]` table (e.g. `resync_max_rate = "1MiB"`).
    pub resource_extra: String,
    /// Run every agent in a network namespace of its own (needs root, `ip` and `nsenter`),
    /// so that links can be cut with [`Lab::partition`].
    pub netns: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            size: 64 << 20,
            mode: "sync".into(),
            timeout: Duration::from_secs(3),
            extra_options: String::new(),
            resource_extra: String::new(),
            netns: false,
        }
    }
}

impl Lab {
    /// Creates keys and a config for `names` (one resource, "mail", on every node) in a new
    /// directory under `parent`. `exe` is the `tandem` binary to run agents with.
    pub fn new(parent: &Path, exe: &Path, names: &[&str], opts: &LabOptions) -> Result<Self> {
        std::fs::create_dir_all(parent)?;
        let dir = tempfile::Builder::new().prefix("tandem-lab-").tempdir_in(parent)?.keep();
        let mut lab = Lab {
            config: dir.join("tandem.toml"),
            dir,
            nodes: Vec::new(),
            resource: "mail".into(),
            exe: exe.to_path_buf(),
            keep: false,
            mounts: Vec::new(),
            loops: Vec::new(),
            net: None,
        };
        // From here on, dropping `lab` on an error removes whatever was created.
        if opts.netns {
            lab.net = Some(LabNet::create(names.len())?);
        }
        for (i, n) in names.iter().enumerate() {
            crate::tls::keygen(n, &lab.dir.join("keys"), false)?;
            let node = match &lab.net {
                Some(net) => LabNode {
                    name: n.to_string(),
                    ip: net.node_ip(i),
                    port: LAB_NETNS_PORT,
                    netns: Some(net.node_ns[i].clone()),
                    config: None,
                    child: None,
                },
                None => LabNode {
                    name: n.to_string(),
                    ip: "127.0.0.1".into(),
                    port: free_udp_port()?,
                    netns: None,
                    config: None,
                    child: None,
                },
            };
            lab.nodes.push(node);
        }
        let text = lab.config_text(opts);
        std::fs::write(&lab.config, text)?;
        Ok(lab)
    }

    pub fn config_text(&self, o: &LabOptions) -> String {
        let d = self.dir.display();
        let timeout_ms = o.timeout.as_millis();
        let hb = (timeout_ms / 5).max(50);
        let mut s = format!(
            "cluster = \"lab\"\n\n[options]\ntimeout = \"{timeout_ms}ms\"\nheartbeat_interval = \"{hb}ms\"\n\
             connect_retry = \"300ms\"\n{}\n",
            o.extra_options
        );
        for n in &self.nodes {
            let name = &n.name;
            s += &format!(
                "[[node]]\nname = \"{name}\"\naddress = \"{}:{}\"\ncontrol = \"{d}/{name}/control.sock\"\n\
                 run_dir = \"{d}/{name}/run\"\ncert = \"{d}/keys/{name}.crt\"\nkey = \"{d}/keys/{name}.key\"\n\n",
                n.ip, n.port
            );
        }
        s += &format!(
            "[[resource]]\nname = \"{}\"\nsize = \"{}\"\nmode = \"{}\"\n{}\n\n",
            self.resource, o.size, o.mode, o.resource_extra
        );
        for n in &self.nodes {
            let name = &n.name;
            s += &format!(
                "[resource.disk.{name}]\nimage = \"{d}/{name}/mail.img\"\nmeta = \"{d}/{name}/mail.meta\"\n\n"
            );
        }
        s
    }

    /// Keep the directory after the lab is dropped (for inspection).
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut LabNode> {
        self.nodes.iter_mut().find(|n| n.name == name).ok_or_else(|| anyhow!("no lab node {name}"))
    }

    fn node_index(&self, name: &str) -> Result<usize> {
        self.nodes.iter().position(|n| n.name == name).ok_or_else(|| anyhow!("no lab node {name}"))
    }

    /// The network namespace `node`'s agent runs in, if the lab uses namespaces.
    pub fn netns(&self, node: &str) -> Option<&str> {
        self.nodes.iter().find(|n| n.name == node)?.netns.as_deref()
    }

    /// Cuts `node`'s link (its port on the lab's bridge goes down: its peers' packets to it
    /// and its own packets are dropped, as with a pulled cable). Needs `LabOptions::netns`.
    pub fn partition(&self, node: &str) -> Result<()> {
        self.set_link(node, false)
    }

    /// Restores `node`'s link after [`Lab::partition`].
    pub fn heal(&self, node: &str) -> Result<()> {
        self.set_link(node, true)
    }

    fn set_link(&self, node: &str, up: bool) -> Result<()> {
        let net = self.net.as_ref().ok_or_else(|| anyhow!("the lab runs without network namespaces"))?;
        net.set_port(self.node_index(node)?, up)
    }

    pub fn image(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("mail.img")
    }

    pub fn meta(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("mail.meta")
    }

    pub fn log(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.log"))
    }

    pub fn log_text(&self, node: &str) -> String {
        std::fs::read_to_string(self.log(node)).unwrap_or_default()
    }

    /// Starts `node`'s agent and waits until it answers on its control socket.
    pub fn start(&mut self, node: &str) -> Result<()> {
        let config = self.config_of(node)?;
        self.start_with_config(node, &config)
    }

    /// The config file `node`'s agent starts with: its own copy after [`Lab::route_via`],
    /// else the lab's shared one.
    pub fn config_of(&self, node: &str) -> Result<PathBuf> {
        let n = &self.nodes[self.node_index(node)?];
        Ok(n.config.clone().unwrap_or_else(|| self.config.clone()))
    }

    /// The UDP address `node`'s agent listens on.
    pub fn node_addr(&self, node: &str) -> Result<std::net::SocketAddr> {
        let n = &self.nodes[self.node_index(node)?];
        format!("{}:{}", n.ip, n.port).parse().with_context(|| format!("address of {node}"))
    }

    /// Makes `dialer` reach `peer` at `via` (e.g. a UDP relay in front of `peer`) instead
    /// of `peer`'s own address: writes `dialer`'s own copy of the config, in which `peer`'s
    /// `address` is `via`, and starts `dialer` with it from now on ([`Lab::start`]). `peer`
    /// still listens on its real address; it accepts the connection by its certificate,
    /// whatever address it comes from. Only the dialing side of a pair — the node whose name
    /// sorts first — uses the address, so `dialer` must sort before `peer`. Returns the
    /// path of the new config. Takes effect at `dialer`'s next start.
    pub fn route_via(&mut self, dialer: &str, peer: &str, via: std::net::SocketAddr) -> Result<PathBuf> {
        if dialer >= peer {
            bail!("{dialer} does not dial {peer} (the node whose name sorts first dials)");
        }
        let real = self.node_addr(peer)?;
        let base = self.config_of(dialer)?;
        let text = std::fs::read_to_string(&base).with_context(|| format!("read {}", base.display()))?;
        let from = format!("address = \"{real}\"");
        if text.matches(&from).count() != 1 {
            bail!("{} does not name {peer}'s address {real} exactly once", base.display());
        }
        let path = self.dir.join(format!("{dialer}.toml"));
        std::fs::write(&path, text.replace(&from, &format!("address = \"{via}\"")))?;
        self.node_mut(dialer)?.config = Some(path.clone());
        Ok(path)
    }

    /// Starts `node`'s agent with another config file (e.g. one that disagrees with the
    /// peers' on purpose).
    pub fn start_with_config(&mut self, node: &str, config: &Path) -> Result<()> {
        std::fs::create_dir_all(self.dir.join(node))?;
        let log = File::options().create(true).append(true).open(self.log(node))?;
        let netns = self.netns(node).map(str::to_string);
        // `nsenter --net` changes only the network namespace (unlike `ip netns exec`, which
        // also remounts /sys in a mount namespace of its own): the agent's FUSE mount and
        // loop device stay visible here. Without --pid it execs, so the child is the agent.
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", netns_path(ns).display())).arg("--").arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        let child = cmd
            .args(["agent", "--config"])
            .arg(config)
            .args(["--node", node])
            .env("RUST_LOG", std::env::var("TANDEM_LAB_LOG").unwrap_or_else(|_| "info,quinn=warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        self.node_mut(node)?.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.status(node).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.node_mut(node)?.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("agent {node} exited at start ({st}); log:\n{}", self.log_text(node));
                }
            }
            if Instant::now() > deadline {
                bail!("agent {node} did not answer within 20s; log:\n{}", self.log_text(node));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self, node: &str) -> Option<u32> {
        self.nodes.iter().find(|n| n.name == node)?.child.as_ref().map(|c| c.id())
    }

    /// Sends `sig` to `node`'s agent.
    pub fn signal(&self, node: &str, sig: Signal) -> Result<()> {
        let pid = self.pid(node).ok_or_else(|| anyhow!("agent {node} is not running"))?;
        kill(Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self, node: &str) -> Result<()> {
        if let Some(mut c) = self.node_mut(node)?.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after `grace`). Returns whether it exited
    /// cleanly with status 0.
    pub fn stop(&mut self, node: &str, grace: Duration) -> Result<bool> {
        let Some(mut c) = self.node_mut(node)?.child.take() else {
            return Ok(true);
        };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st.success());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `tandem` binary the lab runs.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    fn socket(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("control.sock")
    }

    pub fn request(&self, node: &str, req: &Request) -> Result<Response> {
        control::call(&self.socket(node), req, Duration::from_secs(120))
    }

    pub fn status(&self, node: &str) -> Result<NodeStatus> {
        let r = self.request(node, &Request::Status)?;
        r.status.ok_or_else(|| anyhow!("no status: {:?}", r.error))
    }

    pub fn resource_status(&self, node: &str) -> Result<ResourceStatus> {
        let s = self.status(node)?;
        s.resources
            .into_iter()
            .find(|r| r.name == self.resource)
            .ok_or_else(|| anyhow!("no resource in status"))
    }

    /// Polls `node`'s status until `pred` holds.
    pub fn wait_for(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ResourceStatus) -> bool,
    ) -> Result<ResourceStatus> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match self.resource_status(node) {
                Ok(s) if pred(&s) => return Ok(s),
                Ok(s) => last = Some(s),
                Err(_) => {}
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {node}: {what}; last status: {last:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every peer of `node` is connected.
    pub fn wait_connected(&self, node: &str, timeout: Duration) -> Result<ResourceStatus> {
        self.wait_for(node, "all peers connected", timeout, |r| {
            r.peers.iter().all(|p| p.connection == "connected")
        })
    }

    pub fn promote(&self, node: &str, force: bool) -> Result<Response> {
        self.request(node, &Request::Promote { resource: self.resource.clone(), force })
    }

    pub fn demote(&self, node: &str) -> Result<Response> {
        self.request(node, &Request::Demote { resource: self.resource.clone() })
    }

    /// Mounts `dev` at `dir` (created), tracked for cleanup.
    pub fn mount(&mut self, dev: &str, dir: &Path, opts: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut c = Command::new("mount");
        if !opts.is_empty() {
            c.args(["-o", opts]);
        }
        run_cmd(c.arg(dev).arg(dir))?;
        self.mounts.push(dir.to_path_buf());
        Ok(())
    }

    pub fn umount(&mut self, dir: &Path) -> Result<()> {
        run_cmd(Command::new("umount").arg(dir))?;
        self.mounts.retain(|m| m != dir);
        Ok(())
    }

    /// `umount -l`: detaches a filesystem whose device is gone (e.g. on a killed agent's
    /// loop device) without waiting for it.
    pub fn umount_lazy(&mut self, dir: &Path) -> Result<()> {
        run_cmd(Command::new("umount").arg("-l").arg(dir))?;
        self.mounts.retain(|m| m != dir);
        Ok(())
    }

    /// Attaches a read-only loop device to a file, tracked for cleanup.
    pub fn attach_ro(&mut self, file: &Path) -> Result<String> {
        let dev = run_cmd(Command::new("losetup").args(["-f", "--show", "-r"]).arg(file))?.trim().to_string();
        self.loops.push(dev.clone());
        Ok(dev)
    }

    pub fn detach(&mut self, dev: &str) -> Result<()> {
        run_cmd(Command::new("losetup").args(["-d", dev]))?;
        self.loops.retain(|d| d != dev);
        Ok(())
    }

    /// Stops every agent (cleanly if possible) and returns which exited cleanly.
    pub fn stop_all(&mut self) -> BTreeMap<String, bool> {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        names
            .into_iter()
            .map(|n| (n.clone(), self.stop(&n, Duration::from_secs(20)).unwrap_or(false)))
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
            let _ = Command::new("umount").arg("-l").arg(&m).stderr(Stdio::null()).status();
        }
        self.stop_all();
        for d in self.loops.drain(..) {
            let _ = Command::new("losetup").args(["-d", &d]).status();
        }
        // Whatever a killed agent left behind in our directory: loop devices on its FUSE
        // image, then the FUSE mount itself.
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let root = self.dir.to_string_lossy().to_string();
            for mp in info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&root)) {
                for dev in crate::frontend::loopdev::attached_under(Path::new(mp)) {
                    let _ = Command::new("losetup").args(["-d", &dev]).status();
                }
                let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // Every agent is gone: the namespaces (and the veth pairs and bridge in them) go.
        drop(self.net.take());
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The port agents listen on inside their namespaces (each has its own address).
pub const LAB_NETNS_PORT: u16 = 7789;

/// Prefix of the lab's namespace names: `tdm<pid>-<n>-<suffix>`.
const NETNS_PREFIX: &str = "tdm";

static NEXT_NET: AtomicUsize = AtomicUsize::new(0);

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args)).context("ip (iproute2) failed; network namespaces need root")
}

/// The network of a lab with `LabOptions::netns`: one namespace per node with `eth0`
/// holding the node's address, veth-paired with port `p<i>` of bridge `br0` in the lab's
/// bridge namespace. Deleting the namespaces removes every interface in them.
struct LabNet {
    node_ns: Vec<String>,
    bridge_ns: String,
    /// 10.77.<subnet>.0/24 (the namespaces are private to the lab; the subnet only makes
    /// logs of concurrent labs easier to tell apart).
    subnet: u8,
    /// Namespaces created so far, deleted on drop.
    created: Vec<String>,
}

impl LabNet {
    fn create(nodes: usize) -> Result<Self> {
        for tool in ["ip", "nsenter"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                bail!("network namespaces need `{tool}` (apt-get install iproute2 util-linux)");
            }
        }
        remove_orphaned_namespaces();
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        let base = format!("{NETNS_PREFIX}{}-{n}", std::process::id());
        let mut net = LabNet {
            node_ns: (0..nodes).map(|i| format!("{base}-n{i}")).collect(),
            bridge_ns: format!("{base}-br"),
            subnet: (n % 250) as u8,
            created: Vec::new(),
        };
        // On an error `net` is dropped, deleting what was created.
        net.add_ns(&net.bridge_ns.clone())?;
        let br = net.bridge_ns.clone();
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        for i in 0..nodes {
            let ns = net.node_ns[i].clone();
            let port = format!("p{i}");
            net.add_ns(&ns)?;
            ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &br])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.node_ip(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.created.push(ns.to_string());
        Ok(())
    }

    fn node_ip(&self, i: usize) -> String {
        format!("10.77.{}.{}", self.subnet, i + 1)
    }

    fn set_port(&self, i: usize, up: bool) -> Result<()> {
        let port = format!("p{i}");
        ip(&["-n", &self.bridge_ns, "link", "set", &port, if up { "up" } else { "down" }])?;
        Ok(())
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        }
    }
}

/// Deletes namespaces left by labs of processes that no longer exist (killed test runs).
fn remove_orphaned_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        }
    }
}
