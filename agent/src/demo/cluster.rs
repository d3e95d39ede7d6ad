//! A cluster of real agents on this machine, as `tandem demo` runs it: keys, a generated
//! config, one agent process per node, calls on their control sockets, and cleanup of
//! everything it created — processes, mounts, loop devices, files — even when the run fails
//! or panics (in [`Drop`]).
//!
//! Every node's agent listens on the address it is given ([`LocalCluster::on_loopback`]:
//! its own UDP port of 127.0.0.1). The agents share this process's mount namespace, so
//! their FUSE mounts and loop devices are visible here, and their control sockets are
//! plain paths in the cluster's directory.
//!
//! [`LocalCluster::kill9`] is a node crash: the agent and its descriptor holder die, and the
//! FUSE connections with them (requests fail with EIO at once).
//! [`LocalCluster::kill9_agent`] is an agent crash: the holder keeps the connections, and
//! requests wait for the next agent of the node.
//!
//! The integration tests build their lab (network namespaces, cut links, relays) on this
//! type rather than on a copy of it: the config it writes and the way it runs, stops and
//! cleans up agents are the same for the demo and for the tests.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tandem_replicator::Mode;

use crate::control::{self, Request, Response};
use crate::status::{NodeStatus, ResourceStatus};

/// How long [`LocalCluster::start`] waits for a new agent to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What the generated configuration says besides the nodes: one resource on every node.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The resource's size in bytes.
    pub size: u64,
    /// The resource's replication mode.
    pub mode: Mode,
    /// The peer timeout (the heartbeat interval is a fifth of it, at least 50 ms).
    pub timeout: Duration,
    /// TOML lines appended to the `[options]` table (empty for the demo).
    pub extra_options: String,
    /// TOML lines appended to the `[[resource]]` table (e.g. `resync_max_rate = "1MiB"`).
    pub resource_extra: String,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            size: 64 << 20,
            mode: Mode::Sync,
            timeout: Duration::from_secs(3),
            extra_options: String::new(),
            resource_extra: String::new(),
        }
    }
}

struct ClusterNode {
    name: String,
    /// The UDP address the node's agent listens on.
    addr: SocketAddr,
    child: Option<Child>,
}

pub struct LocalCluster {
    pub dir: PathBuf,
    /// The config every agent starts with unless it is given another one.
    pub config: PathBuf,
    /// The one resource of the config.
    pub resource: String,
    nodes: Vec<ClusterNode>,
    exe: PathBuf,
    keep: bool,
    mounts: Vec<PathBuf>,
    /// Loop devices the cluster attached itself (not the agents').
    loops: Vec<String>,
}

/// Finds a free UDP port on 127.0.0.1 (QUIC runs over UDP).
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `cmd` to completion; its stdout, or an error with its status and output.
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

/// The configuration of a cluster in `dir` with `nodes` (name, address) and one resource,
/// "mail", with a disk on every node. Each node's files are under `dir/<name>/`, the keys
/// under `dir/keys/`.
pub fn config_text(dir: &Path, nodes: &[(&str, SocketAddr)], resource: &str, spec: &ClusterSpec) -> String {
    let d = dir.display();
    let timeout_ms = spec.timeout.as_millis();
    let hb = (timeout_ms / 5).max(50);
    let mut s = format!(
        "cluster = \"lab\"\n\n[options]\ntimeout = \"{timeout_ms}ms\"\nheartbeat_interval = \"{hb}ms\"\n\
         connect_retry = \"300ms\"\n{}\n",
        spec.extra_options
    );
    for (name, addr) in nodes {
        s += &format!(
            "[[node]]\nname = \"{name}\"\naddress = \"{addr}\"\ncontrol = \"{d}/{name}/control.sock\"\n\
             run_dir = \"{d}/{name}/run\"\ndevice_dir = \"{d}/{name}/dev\"\ncert = \"{d}/keys/{name}.crt\"\nkey = \"{d}/keys/{name}.key\"\n\n"
        );
    }
    s += &format!(
        "[[resource]]\nname = \"{resource}\"\nsize = \"{}\"\nmode = \"{}\"\n{}\n\n",
        spec.size, spec.mode, spec.resource_extra
    );
    for (name, _) in nodes {
        s += &format!(
            "[resource.disk.{name}]\nimage = \"{d}/{name}/mail.img\"\nmeta = \"{d}/{name}/mail.meta\"\n\n"
        );
    }
    s
}

impl LocalCluster {
    /// Creates keys and a config ([`config_text`]) for `nodes` in a new directory under
    /// `parent`. `exe` is the `tandem` binary to run agents with. No agent runs yet.
    pub fn create(
        parent: &Path,
        exe: &Path,
        nodes: &[(&str, SocketAddr)],
        spec: &ClusterSpec,
    ) -> Result<Self> {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("tandem-lab-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?
            .keep();
        let cluster = LocalCluster {
            config: dir.join("tandem.toml"),
            dir,
            resource: "mail".into(),
            nodes: nodes
                .iter()
                .map(|(name, addr)| ClusterNode { name: name.to_string(), addr: *addr, child: None })
                .collect(),
            exe: exe.to_path_buf(),
            keep: false,
            mounts: Vec::new(),
            loops: Vec::new(),
        };
        // From here on, dropping `cluster` on an error removes whatever was created.
        for (name, _) in nodes {
            crate::tls::keygen(name, &cluster.dir.join("keys"), false)?;
        }
        let text = config_text(&cluster.dir, nodes, &cluster.resource, spec);
        std::fs::write(&cluster.config, text)
            .with_context(|| format!("cannot write {}", cluster.config.display()))?;
        Ok(cluster)
    }

    /// [`LocalCluster::create`] with every node on a free UDP port of 127.0.0.1.
    pub fn on_loopback(parent: &Path, exe: &Path, names: &[&str], spec: &ClusterSpec) -> Result<Self> {
        let mut nodes = Vec::new();
        for name in names {
            nodes.push((*name, SocketAddr::from(([127, 0, 0, 1], free_udp_port()?))));
        }
        Self::create(parent, exe, &nodes, spec)
    }

    /// Keep the directory after the cluster is dropped (for inspection).
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// The nodes' names, in the order they were given.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.name.as_str())
    }

    fn node(&self, name: &str) -> Result<&ClusterNode> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| anyhow!("no node {name} in the cluster"))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut ClusterNode> {
        self.nodes.iter_mut().find(|n| n.name == name).ok_or_else(|| anyhow!("no node {name} in the cluster"))
    }

    /// The UDP address `node`'s agent listens on.
    pub fn node_addr(&self, node: &str) -> Result<SocketAddr> {
        Ok(self.node(node)?.addr)
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

    /// Starts `node`'s agent with the cluster's config and waits until it answers on its
    /// control socket.
    pub fn start(&mut self, node: &str) -> Result<()> {
        let config = self.config.clone();
        self.start_with_config(node, &config)
    }

    /// Starts `node`'s agent with another config file (e.g. one that disagrees with the
    /// peers' on purpose).
    pub fn start_with_config(&mut self, node: &str, config: &Path) -> Result<()> {
        self.start_wrapped(node, config, &[])
    }

    /// Starts `node`'s agent as `WRAPPER... tandem agent --config CONFIG --node NODE` (no
    /// wrapper: the agent itself), logging to [`LocalCluster::log`], and waits until it
    /// answers on its control socket. The wrapper must exec the agent (as `nsenter` does),
    /// so that the child this cluster signals, stops and reaps is the agent.
    pub fn start_wrapped(&mut self, node: &str, config: &Path, wrapper: &[OsString]) -> Result<()> {
        self.node(node)?;
        std::fs::create_dir_all(self.dir.join(node))?;
        let log = File::options().create(true).append(true).open(self.log(node))?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.exe);
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
            .with_context(|| format!("cannot start {cmd:?}"))?;
        self.node_mut(node)?.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
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
                bail!("agent {node} did not answer within {START_TIMEOUT:?}; log:\n{}", self.log_text(node));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id of `node`'s agent, while it runs.
    pub fn pid(&self, node: &str) -> Option<u32> {
        self.node(node).ok()?.child.as_ref().map(|c| c.id())
    }

    /// The directory of `node`'s runtime files (its `run_dir`): the holder's socket, pid
    /// file and log among them.
    pub fn run_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("run")
    }

    /// The process id of `node`'s descriptor holder, while one runs: the pid its pid file
    /// names, if that process exists, is not a zombie, and is a `tandem holder` of this
    /// node (its command line names the holder and this node's run directory — a pid left
    /// in the file by a holder that is gone may since belong to anything).
    pub fn holder_pid(&self, node: &str) -> Option<u32> {
        let run_dir = self.run_dir(node);
        let pid: u32 = std::fs::read_to_string(run_dir.join("holder.pid")).ok()?.trim().parse().ok()?;
        holder_process(pid, &run_dir).then_some(pid)
    }

    /// A node crash: SIGKILL to `node`'s agent and to its descriptor holder, so that the
    /// FUSE connections end at once (the loop device fails its requests with EIO), as
    /// they do when the machine dies. Returns once both are gone (the agent reaped).
    pub fn kill9(&mut self, node: &str) -> Result<()> {
        let holder = self.holder_pid(node);
        // The agent first, at once followed by the holder: a holder killed first could
        // be replaced by the agent in the moment before it dies.
        let child = self.node_mut(node)?.child.take();
        if let Some(mut c) = child {
            let _ = c.kill();
            if let Some(pid) = holder {
                kill_holder(pid);
            }
            let _ = c.wait();
        } else if let Some(pid) = holder {
            kill_holder(pid);
        }
        if let Some(pid) = holder {
            wait_gone(pid, node)?;
        }
        Ok(())
    }

    /// SIGKILL to `node`'s agent only, and reap: the agent crashes, the machine does not.
    /// Its descriptor holder (if one runs) keeps the FUSE connections, so requests wait in
    /// the kernel for the next agent (or until the holder's grace time ends).
    pub fn kill9_agent(&mut self, node: &str) -> Result<()> {
        if let Some(mut c) = self.node_mut(node)?.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// SIGKILL to every node's holder that still runs, and waits until they are gone.
    fn kill_holders(&self, only_without_agent: bool) {
        for n in &self.nodes {
            if only_without_agent && n.child.is_some() {
                continue;
            }
            if let Some(pid) = self.holder_pid(&n.name) {
                kill_holder(pid);
                let _ = wait_gone(pid, &n.name);
            }
        }
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

    /// The `tandem` binary the cluster runs.
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
            .ok_or_else(|| anyhow!("no resource {} in {node}'s status", self.resource))
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
        let names: Vec<String> = self.node_names().map(str::to_string).collect();
        names
            .into_iter()
            .map(|n| (n.clone(), self.stop(&n, Duration::from_secs(20)).unwrap_or(false)))
            .collect()
    }
}

/// How long [`LocalCluster::kill9`] waits for a killed holder to be gone.
const HOLDER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether process `pid` runs: it exists and is not a zombie (a zombie's descriptors are
/// closed already).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

/// Whether process `pid` runs and is the `tandem holder` of the node whose run directory
/// is `run_dir`.
fn holder_process(pid: u32, run_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let run_dir = run_dir.as_os_str().as_encoded_bytes();
    running(pid) && args.contains(&&b"holder"[..]) && args.iter().any(|a| a.starts_with(run_dir))
}

fn kill_holder(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// Waits until the holder `pid` has exited — its descriptors closed, the FUSE connections
/// aborted. It is not our child (it runs in a session of its own; init reaps it).
fn wait_gone(pid: u32, node: &str) -> Result<()> {
    let deadline = Instant::now() + HOLDER_EXIT_TIMEOUT;
    while running(pid) {
        if Instant::now() > deadline {
            bail!("the holder of {node} (pid {pid}) still runs {HOLDER_EXIT_TIMEOUT:?} after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // A holder whose agent is gone keeps its connections: requests to its loop device
        // — the unmounts below among them — would wait for its grace time.
        self.kill_holders(true);
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
            let _ = Command::new("umount").arg("-l").arg(&m).stderr(Stdio::null()).status();
        }
        self.stop_all();
        // Whatever holder is left (one a stopped agent left behind) lets go of its FUSE
        // connections before the cleanup of what the agents left.
        self.kill_holders(false);
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
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated config is one the agent loads, with the spec's values and every
    /// node's address and files.
    #[test]
    fn generated_config_loads() {
        let dir = Path::new("/var/tmp/tandem-lab-x");
        let nodes =
            [("alpha", "127.0.0.1:7001".parse().unwrap()), ("beta", "10.77.0.2:7789".parse().unwrap())];
        let spec = ClusterSpec {
            size: 32 << 20,
            mode: Mode::Async,
            timeout: Duration::from_secs(2),
            extra_options: "congestion = \"bbr\"".into(),
            resource_extra: "resync_max_rate = \"1MiB\"".into(),
        };
        let text = config_text(dir, &nodes, "mail", &spec);
        let cfg = crate::config::Config::parse(&text, &dir.join("tandem.toml")).unwrap();
        assert_eq!(cfg.nodes.len(), 2);
        assert_eq!(cfg.node("beta").unwrap().address.to_string(), "10.77.0.2:7789");
        assert_eq!(cfg.node("alpha").unwrap().control, dir.join("alpha/control.sock"));
        assert_eq!(cfg.options.timeout, Duration::from_secs(2));
        let r = cfg.resource("mail").unwrap();
        assert_eq!(r.size, 32 << 20);
        assert_eq!(r.mode, Mode::Async);
        assert_eq!(r.disks["beta"].image, dir.join("beta/mail.img"));
        assert_eq!(r.disks["alpha"].meta, dir.join("alpha/mail.meta"));
        // The extra lines land in their tables.
        assert_eq!(cfg.options.congestion, crate::config::Congestion::Bbr);
        assert_eq!(r.resync_max_rate, Some(1 << 20));
    }
}
