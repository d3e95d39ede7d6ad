//! A real two-node Pacemaker + Corosync cluster on this machine, with a Tandem agent on
//! each node, for the failover tests.
//!
//! Each node is a network namespace of the lab's network ([`crate::lab`]'s bridge) plus a
//! mount, UTS and PID namespace whose PID 1 is `node-init.sh`: it gives the node private
//! `/run`, `/dev/shm`, `/dev/tandem`, `/tmp` and Pacemaker/Corosync state directories (the
//! pitfalls: libqb IPC buffers named by PIDs, which repeat across PID namespaces; resource
//! agents' state in `/run`), overlays `ocf:tandem:tandem` from this repository onto the
//! OCF directory, and runs corosync and pacemakerd. Every command for a node runs in its
//! namespaces through `nsenter -t INIT` (`ip netns exec` would make a new mount namespace
//! each time). Killing a node's init with SIGKILL is a crash of the node: the kernel kills
//! everything in its PID namespace, Tandem agent and mounts included.
//!
//! The CIB is seeded before the first start — `stonith-enabled=false`, `dc-deadtime=5s`
//! (the default 20 s would dominate every run) and the promotable Tandem clone — and the
//! corosync token is short (the caller's, e.g. 1000 ms), so a run takes seconds.
//!
//! The Tandem side is a [`LocalCluster`]'s generated config (keys, images, one resource
//! "mail"), with `device_dir = "/dev/tandem"` on both nodes (private per node) and
//! `agent/ocf/tandem-fence-peer` as its fence_peer, disconnected, connected and sync_done
//! handler. Its control
//! sockets are plain paths, so the test reads each agent's status from the host.
//!
//! Cleanup ([`Drop`]), even after a failed assertion: orderly stop of the nodes (SIGKILL
//! after a grace time), then any process left in their network namespaces, loop devices
//! whose backing file is under the lab's directory (left by a crashed node), the
//! namespaces, the directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tandem_agent::demo::cluster::{run_cmd, ClusterSpec, LocalCluster};

use crate::lab::net::LabNet;

const NODE_INIT: &str = include_str!("node-init.sh");
const FENCE_AGENT: &str = include_str!("fence_tandemlab");

/// The one fence device: `fence_tandemlab` for both nodes.
const FENCE_DEVICE_XML: &str = r#"<primitive id="fence-lab" class="stonith" type="fence_tandemlab">
  <instance_attributes id="fence-lab-params">
    <nvpair id="fence-lab-host-list" name="pcmk_host_list" value="alpha beta"/>
  </instance_attributes>
  <operations>
    <op id="fence-lab-monitor" name="monitor" interval="60s"/>
  </operations>
</primitive>"#;

/// The Pacemaker node names, which are also the Tandem node names and host names.
pub const NODES: [&str; 2] = ["alpha", "beta"];

/// The id of the promotable clone of the Tandem resource in the CIB.
pub const CLONE: &str = "mail-clone";

pub struct PacemakerLab {
    /// The lab's own directory (node state, OCF overlay, the Tandem cluster's directory).
    pub dir: PathBuf,
    /// The Tandem cluster (config, images, control sockets). No agent of its own runs:
    /// the OCF agent starts them inside the nodes.
    pub tandem: LocalCluster,
    net: LabNet,
    /// Each node's `unshare` process (the parent of its init) and its init's pid, while it
    /// runs.
    nodes: Vec<(String, Option<Child>, Option<i32>)>,
    /// Every running node's init pid, shared with the fence broker.
    inits: Inits,
    broker: Option<FenceBroker>,
    keep: bool,
}

type Inits = Arc<Mutex<BTreeMap<String, i32>>>;

/// The lab's settings.
#[derive(Debug, Clone)]
pub struct PacemakerOptions {
    /// Corosync's token timeout (consensus is 1.2 times it).
    pub token_ms: u32,
    /// Tandem's own peer timeout.
    pub tandem_timeout: Duration,
    /// STONITH on, with `fence_tandemlab` and the host-side broker, and
    /// `priority-fencing-delay=5s` with priority 1 on the Tandem clone, so the node holding
    /// the Promoted instance wins a fence race.
    pub fencing: bool,
}

/// The host side of `fence_tandemlab`: reads requests from the spool directory and kills
/// the target node's init (off, reboot; the test boots the node again) or reports whether
/// it runs (status). A request from a node that is dead already is refused: the loser of
/// a fence race fences nobody. What it did is in [`PacemakerLab::fence_log`].
struct FenceBroker {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FenceBroker {
    fn start(spool: PathBuf, inits: Inits) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let alive = |node: &str| {
                inits.lock().unwrap().get(node).is_some_and(|p| kill(Pid::from_raw(*p), None).is_ok())
            };
            while !s.load(Ordering::SeqCst) {
                let Ok(entries) = std::fs::read_dir(&spool) else { return };
                for e in entries.flatten() {
                    let path = e.path();
                    if path.extension().is_none_or(|x| x != "req") {
                        continue;
                    }
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let _ = std::fs::remove_file(&path);
                    let words: Vec<&str> = text.split_whitespace().collect();
                    let [action, target, requester] = words[..] else { continue };
                    let rc = if !NODES.contains(&target) {
                        1
                    } else if action == "status" {
                        if alive(target) {
                            0
                        } else {
                            2
                        }
                    } else if !alive(requester) {
                        1
                    } else if action == "off" || action == "reboot" {
                        if let Some(p) = inits.lock().unwrap().remove(target) {
                            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                        }
                        0
                    } else {
                        1
                    };
                    if action != "status" {
                        l.lock().unwrap().push(format!("{action} {target} (asked by {requester}): rc {rc}"));
                    }
                    let _ = std::fs::write(path.with_extension("res"), rc.to_string());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        FenceBroker { stop, log, thread: Some(thread) }
    }
}

impl Drop for FenceBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PacemakerLab {
    /// Creates the network, the nodes' directories and configs, and the seeded CIB with
    /// the Tandem clone; no node runs yet. `token_ms`: corosync's token timeout.
    pub fn new(parent: &Path, exe: &Path, opts: &PacemakerOptions) -> Result<Self> {
        std::fs::create_dir_all(parent)?;
        let dir = tempfile::Builder::new().prefix("tandem-pcmk-").tempdir_in(parent)?.keep();
        // The nodes get a /tmp of their own: a binary built in a checkout under /tmp would
        // not be there. The lab's directory is visible to them.
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin)?;
        let own = bin.join("tandem");
        std::fs::copy(exe, &own).with_context(|| format!("copy {} into the lab", exe.display()))?;
        let exe = own.as_path();
        let net = LabNet::create(&NODES)?;
        let addrs: Vec<_> = NODES.iter().map(|n| net.addr(n).map(|a| (*n, a))).collect::<Result<_>>()?;
        let spec = ClusterSpec { size: 64 << 20, timeout: opts.tandem_timeout, ..ClusterSpec::default() };
        let tandem = LocalCluster::create(&dir, exe, &addrs, &spec)?;
        let inits = Inits::default();
        let mut lab = PacemakerLab { dir, tandem, net, nodes: Vec::new(), inits, broker: None, keep: false };
        lab.write_tandem_config()?;
        lab.write_node_dirs(opts.token_ms)?;
        lab.write_ocf_overlay()?;
        if opts.fencing {
            let spool = lab.dir.join("fence-spool");
            std::fs::create_dir_all(&spool)?;
            let bin = lab.dir.join("fence-bin");
            std::fs::create_dir_all(&bin)?;
            let agent = FENCE_AGENT.replace("@SPOOL@", &spool.to_string_lossy());
            std::fs::write(bin.join("fence_tandemlab"), agent)?;
            std::fs::set_permissions(bin.join("fence_tandemlab"), std::fs::Permissions::from_mode(0o755))?;
            lab.broker = Some(FenceBroker::start(spool, lab.inits.clone()));
        }
        lab.seed_cib(exe, opts.fencing)?;
        lab.nodes = NODES.iter().map(|n| (n.to_string(), None, None)).collect();
        Ok(lab)
    }

    /// Both nodes' stable device paths at the same place (each node's own tmpfs).
    fn write_tandem_config(&self) -> Result<()> {
        let text = std::fs::read_to_string(&self.tandem.config)?;
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with("device_dir = ") {
                out += "device_dir = \"/dev/tandem\"\n";
            } else {
                out += line;
                out.push('\n');
            }
        }
        // Tandem's Pacemaker fencing handler: a peer the primary lost (or outran at a
        // promotion) may not be promoted until it has resynced.
        // A copy in the lab, which the nodes see (see `new`).
        let handler = self.dir.join("bin/tandem-fence-peer");
        std::fs::copy(fence_handler(), &handler).context("copy agent/ocf/tandem-fence-peer")?;
        let fence = format!("{} {CLONE}", handler.display());
        out += &format!(
            "\n[handlers]\nfence_peer = \"{fence}\"\ndisconnected = \"{fence}\"\nconnected = \"{fence}\"\n\
             sync_done = \"{fence}\"\n"
        );
        std::fs::write(&self.tandem.config, out)?;
        Ok(())
    }

    /// Whether the CIB holds the constraint `tandem-fence-peer` puts against promoting
    /// `node`, as `viewer` sees it.
    pub fn fenced_from_promotion(&self, viewer: &str, node: &str) -> Result<bool> {
        let xml = self.x_ok(viewer, &["cibadmin", "--query", "-o", "constraints"])?;
        Ok(xml.contains(&format!("id=\"tandem-fence-mail-{node}\"")))
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    fn write_node_dirs(&self, token_ms: u32) -> Result<()> {
        let addrs: Vec<String> =
            NODES.iter().map(|n| self.net.addr(n).map(|a| a.ip().to_string())).collect::<Result<_>>()?;
        let corosync = format!(
            "totem {{\n    version: 2\n    cluster_name: tandemlab\n    transport: knet\n    crypto_cipher: none\n    \
             crypto_hash: none\n    token: {token_ms}\n}}\nnodelist {{\n    node {{\n        name: {}\n        nodeid: 1\n        \
             ring0_addr: {}\n    }}\n    node {{\n        name: {}\n        nodeid: 2\n        ring0_addr: {}\n    }}\n}}\n\
             quorum {{\n    provider: corosync_votequorum\n    two_node: 1\n}}\nlogging {{\n    to_logfile: yes\n    \
             logfile: /var/log/corosync/corosync.log\n    to_stderr: no\n    to_syslog: no\n    timestamp: hires\n}}\n",
            NODES[0], addrs[0], NODES[1], addrs[1]
        );
        for node in NODES {
            let d = self.node_dir(node);
            for sub in ["etc/corosync", "var/lib/corosync", "var/log/corosync", "tmp"] {
                std::fs::create_dir_all(d.join(sub))?;
            }
            std::fs::set_permissions(d.join("tmp"), std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
            for sub in [
                "var/lib/pacemaker/cib",
                "var/lib/pacemaker/pengine",
                "var/lib/pacemaker/blackbox",
                "var/lib/pacemaker/cores",
                "var/log/pacemaker/bundles",
            ] {
                std::fs::create_dir_all(d.join(sub))?;
            }
            run_cmd(
                Command::new("chown").args(["-R", "hacluster:haclient"]).arg(d.join("var/lib/pacemaker")),
            )
            .context("the Pacemaker packages create user hacluster")?;
            run_cmd(
                Command::new("chown").args(["-R", "hacluster:haclient"]).arg(d.join("var/log/pacemaker")),
            )?;
            std::fs::write(d.join("etc/corosync/corosync.conf"), &corosync)?;
        }
        std::fs::write(self.dir.join("node-init.sh"), NODE_INIT)?;
        std::fs::set_permissions(
            self.dir.join("node-init.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        Ok(())
    }

    fn write_ocf_overlay(&self) -> Result<()> {
        let d = self.dir.join("ocf/tandem");
        std::fs::create_dir_all(&d)?;
        std::fs::copy(crate::ocf_agent(), d.join("tandem")).context("copy agent/ocf/tandem")?;
        Ok(())
    }

    /// The CIB both nodes start with, built offline (`CIB_file`): cluster options and the
    /// promotable clone of `ocf:tandem:tandem`.
    fn seed_cib(&self, exe: &Path, fencing: bool) -> Result<()> {
        let seed = self.dir.join("seed.xml");
        let empty = run_cmd(Command::new("cibadmin").arg("--empty"))?;
        std::fs::write(&seed, empty)?;
        let offline = |args: &[&str]| run_cmd(Command::new(args[0]).args(&args[1..]).env("CIB_file", &seed));
        let stonith = if fencing { "true" } else { "false" };
        let mut options =
            vec![("stonith-enabled", stonith), ("dc-deadtime", "5s"), ("cluster-recheck-interval", "1min")];
        if fencing {
            options.push(("priority-fencing-delay", "5s"));
        }
        for (name, value) in options {
            offline(&["crm_attribute", "--type", "crm_config", "--name", name, "--update", value])?;
        }
        let clone = clone_xml(&self.tandem.config, exe);
        offline(&["cibadmin", "--create", "-o", "resources", "--xml-text", &clone])?;
        if fencing {
            offline(&["cibadmin", "--create", "-o", "resources", "--xml-text", FENCE_DEVICE_XML])?;
        }
        for node in NODES {
            let cib = self.node_dir(node).join("var/lib/pacemaker/cib/cib.xml");
            std::fs::copy(&seed, &cib)?;
            run_cmd(Command::new("chown").args(["hacluster:haclient"]).arg(&cib))?;
            std::fs::set_permissions(&cib, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        Ok(())
    }

    /// Boots `node`: its init in new namespaces inside its network namespace.
    pub fn start(&mut self, node: &str) -> Result<()> {
        // A node the broker fenced is reaped first.
        self.reap(node, Duration::from_secs(10))?;
        let ns = self.net.ns(node).ok_or_else(|| anyhow!("no node {node}"))?.to_string();
        let log = File::options().create(true).append(true).open(self.node_dir(node).join("init.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc"])
            .args(["--propagation", "private"])
            .arg(self.dir.join("node-init.sh"))
            .arg(node)
            .arg(self.dir.join("nodes"))
            .arg(self.dir.join("ocf"))
            .arg(if self.broker.is_some() { self.dir.join("fence-bin") } else { PathBuf::new() })
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start a node (ip netns exec ... unshare)")?;
        // Its init is the child of `unshare` (which `ip netns exec` became).
        let deadline = Instant::now() + Duration::from_secs(10);
        let init = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
                    .unwrap_or_default();
            if let Some(p) = children.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()) {
                break p;
            }
            if Instant::now() > deadline {
                bail!("node {node}'s init did not start; {}", self.node_log(node));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let slot = self.slot(node)?;
        *slot = (node.to_string(), Some(child), Some(init));
        self.inits.lock().unwrap().insert(node.to_string(), init);
        Ok(())
    }

    fn slot(&mut self, node: &str) -> Result<&mut (String, Option<Child>, Option<i32>)> {
        self.nodes.iter_mut().find(|n| n.0 == node).ok_or_else(|| anyhow!("no node {node}"))
    }

    fn init_pid(&self, node: &str) -> Result<i32> {
        self.nodes
            .iter()
            .find(|n| n.0 == node)
            .and_then(|n| n.2)
            .ok_or_else(|| anyhow!("node {node} is not running"))
    }

    /// A command to run `program` inside `node`'s namespaces.
    pub fn command(&self, node: &str, program: &str) -> Result<Command> {
        let pid = self.init_pid(node)?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &pid.to_string(), "-n", "-m", "-u", "-p", "--", program]);
        Ok(c)
    }

    /// Runs `args` inside `node`; its output, whatever its exit status.
    pub fn x(&self, node: &str, args: &[&str]) -> Result<Output> {
        let mut c = self.command(node, args[0])?;
        c.args(&args[1..]);
        c.output().with_context(|| format!("run {args:?} in {node}"))
    }

    /// Runs `args` inside `node` and returns its stdout; an error names the command and
    /// its output.
    pub fn x_ok(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut c = self.command(node, args[0])?;
        c.args(&args[1..]);
        run_cmd(&mut c)
    }

    /// Crashes `node`: SIGKILL to its init, and waits until nothing of it is left.
    pub fn crash(&mut self, node: &str) -> Result<()> {
        let init = self.init_pid(node)?;
        let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
        self.reap(node, Duration::from_secs(10))
    }

    /// Orderly shutdown of `node` (SIGTERM to its init: Pacemaker stops the resources).
    pub fn stop(&mut self, node: &str, grace: Duration) -> Result<()> {
        let init = self.init_pid(node)?;
        let _ = kill(Pid::from_raw(init), Signal::SIGTERM);
        self.reap(node, grace)
    }

    fn reap(&mut self, node: &str, grace: Duration) -> Result<()> {
        let ns = self.net.ns(node).map(str::to_string);
        let slot = self.slot(node)?;
        let (Some(mut child), Some(init)) = (slot.1.take(), slot.2.take()) else { return Ok(()) };
        self.inits.lock().unwrap().remove(node);
        let deadline = Instant::now() + grace;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The PID namespace dies asynchronously: wait until its network namespace is empty.
        if let Some(ns) = ns {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !netns_pids(&ns).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Whether `node` runs (its init is alive: not crashed, not fenced).
    pub fn running(&self, node: &str) -> bool {
        self.init_pid(node).is_ok_and(|p| kill(Pid::from_raw(p), None).is_ok())
    }

    /// What the fence broker did, in order.
    pub fn fence_log(&self) -> Vec<String> {
        self.broker.as_ref().map(|b| b.log.lock().unwrap().clone()).unwrap_or_default()
    }

    /// Cuts `node`'s link to the other (its bridge port down), or restores it.
    pub fn set_link(&self, node: &str, up: bool) -> Result<()> {
        self.net.set_link(node, up)
    }

    /// The log of the Tandem agent the OCF agent started in `node` (kept across crashes).
    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.node_dir(node).join("tmp/tandem-agent.log")).unwrap_or_default()
    }

    pub fn node_log(&self, node: &str) -> String {
        let d = self.node_dir(node);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let tail = |s: String, n: usize| {
            s.lines().rev().take(n).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        format!(
            "--- {node} init.log\n{}\n--- {node} tandem agent log (last 60 lines)\n{}\n--- {node} pacemaker.log (last 60 lines)\n{}",
            read(d.join("init.log")),
            tail(read(d.join("tmp/tandem-agent.log")), 60),
            tail(read(d.join("var/log/pacemaker/pacemaker.log")), 60),
        )
    }

    /// `crm_mon --output-as=xml` as `viewer` sees the cluster.
    pub fn crm_mon(&self, viewer: &str) -> Result<String> {
        self.x_ok(viewer, &["crm_mon", "-1", "--output-as=xml"])
    }

    /// Whether `viewer` sees a DC and both nodes online.
    pub fn formed(&self, viewer: &str) -> bool {
        self.crm_mon(viewer).is_ok_and(|x| {
            x.contains("<current_dc present=\"true\"")
                && NODES.iter().all(|n| {
                    x.contains(&format!("<node name=\"{n}\" id=\"")) && node_online(&x, n) == Some(true)
                })
        })
    }

    /// Where `resource` runs, as `viewer` sees it: (node, role) per instance
    /// (`crm_resource --locate`; role "Promoted" or "" for a started instance).
    pub fn locate(&self, viewer: &str, resource: &str) -> Vec<(String, String)> {
        let Ok(out) = self.x(viewer, &["crm_resource", "--locate", "-r", resource]) else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once("is running on: ").map(|(_, rest)| rest.trim()))
            .map(|rest| match rest.split_once(' ') {
                Some((n, role)) => (n.to_string(), role.trim().to_string()),
                None => (rest.to_string(), String::new()),
            })
            .collect()
    }

    /// The node holding the Promoted instance of the clone, if exactly one does.
    pub fn promoted(&self, viewer: &str) -> Option<String> {
        let l = self.locate(viewer, CLONE);
        let p: Vec<_> = l.iter().filter(|(_, r)| r == "Promoted").collect();
        (p.len() == 1).then(|| p[0].0.clone())
    }

    /// Adds `xml` to the CIB section `section` (resources, constraints) from `viewer`.
    pub fn cib_create(&self, viewer: &str, section: &str, xml: &str) -> Result<()> {
        self.x_ok(viewer, &["cibadmin", "--create", "-o", section, "--xml-text", xml]).map(drop)
    }

    /// Polls `what` every 50 ms until it returns `Some`, for at most `timeout`.
    pub fn wait<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Self) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = NODES.iter().map(|n| self.node_log(n)).collect();
                let mon = NODES.iter().filter_map(|n| self.crm_mon(n).ok()).next().unwrap_or_default();
                bail!("timed out after {timeout:?} waiting for {what}\ncrm_mon:\n{mon}\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Keeps the lab's directory after the test (`TANDEM_KEEP_LAB`).
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
        self.tandem.keep(keep);
    }

    /// Writes a line to the lab's timeline file and stdout.
    pub fn note(&self, line: &str) {
        println!("{line}");
        if let Ok(mut f) = File::options().create(true).append(true).open(self.dir.join("timeline.txt")) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// The handler in this repository (`agent/ocf/tandem-fence-peer`).
pub fn fence_handler() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/ocf/tandem-fence-peer")
}

/// `online="true|false"` of `node` in crm_mon's XML.
pub fn node_online(xml: &str, node: &str) -> Option<bool> {
    let start = xml.find(&format!("<node name=\"{node}\" id=\""))?;
    let tag = &xml[start..start + xml[start..].find('>')?];
    Some(tag.contains("online=\"true\""))
}

fn netns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
        })
        .unwrap_or_default()
}

/// The promotable clone of `ocf:tandem:tandem` for the lab's resource "mail": one
/// Promoted, notifications on, monitors every 2 s (Promoted) and 3 s (Unpromoted).
fn clone_xml(config: &Path, exe: &Path) -> String {
    format!(
        r#"<clone id="{CLONE}">
  <meta_attributes id="mail-clone-meta">
    <nvpair id="mail-clone-promotable" name="promotable" value="true"/>
    <nvpair id="mail-clone-promoted-max" name="promoted-max" value="1"/>
    <nvpair id="mail-clone-promoted-node-max" name="promoted-node-max" value="1"/>
    <nvpair id="mail-clone-clone-max" name="clone-max" value="2"/>
    <nvpair id="mail-clone-clone-node-max" name="clone-node-max" value="1"/>
    <nvpair id="mail-clone-notify" name="notify" value="true"/>
  </meta_attributes>
  <primitive id="mail" class="ocf" provider="tandem" type="tandem">
    <meta_attributes id="mail-meta">
      <nvpair id="mail-priority" name="priority" value="1"/>
    </meta_attributes>
    <instance_attributes id="mail-params">
      <nvpair id="mail-resource" name="resource" value="mail"/>
      <nvpair id="mail-config" name="config" value="{}"/>
      <nvpair id="mail-binary" name="binary" value="{}"/>
      <nvpair id="mail-agent-log" name="agent_log" value="/tmp/tandem-agent.log"/>
    </instance_attributes>
    <operations>
      <op id="mail-start" name="start" interval="0s" timeout="60s"/>
      <op id="mail-stop" name="stop" interval="0s" timeout="60s"/>
      <op id="mail-promote" name="promote" interval="0s" timeout="90s"/>
      <op id="mail-demote" name="demote" interval="0s" timeout="60s"/>
      <op id="mail-notify" name="notify" interval="0s" timeout="30s"/>
      <op id="mail-monitor-promoted" name="monitor" interval="2s" role="Promoted" timeout="20s"/>
      <op id="mail-monitor-unpromoted" name="monitor" interval="3s" role="Unpromoted" timeout="20s"/>
    </operations>
  </primitive>
</clone>"#,
        config.display(),
        exe.display()
    )
}

/// The service stack on the Promoted node: the ext4 filesystem on the stable device path,
/// then the service (`ocf:heartbeat:Dummy` standing for the mail server), as a group.
pub fn service_group_xml(mountpoint: &Path) -> String {
    format!(
        r#"<group id="mail-service">
  <primitive id="mail-fs" class="ocf" provider="heartbeat" type="Filesystem">
    <instance_attributes id="mail-fs-params">
      <nvpair id="mail-fs-device" name="device" value="/dev/tandem/mail"/>
      <nvpair id="mail-fs-directory" name="directory" value="{}"/>
      <nvpair id="mail-fs-fstype" name="fstype" value="ext4"/>
    </instance_attributes>
    <operations>
      <op id="mail-fs-monitor" name="monitor" interval="5s" timeout="40s"/>
      <op id="mail-fs-start" name="start" interval="0s" timeout="60s"/>
      <op id="mail-fs-stop" name="stop" interval="0s" timeout="60s"/>
    </operations>
  </primitive>
  <primitive id="mail-daemon" class="ocf" provider="heartbeat" type="Dummy">
    <operations>
      <op id="mail-daemon-monitor" name="monitor" interval="5s" timeout="20s"/>
    </operations>
  </primitive>
</group>"#,
        mountpoint.display()
    )
}

/// The service group runs only with the Promoted instance, and starts after the promotion.
pub const CONSTRAINTS_XML: &str = r#"<constraints>
  <rsc_colocation id="mail-service-with-promoted" score="INFINITY" rsc="mail-service" with-rsc="mail-clone" with-rsc-role="Promoted"/>
  <rsc_order id="mail-service-after-promote" first="mail-clone" first-action="promote" then="mail-service" then-action="start"/>
</constraints>"#;

impl PacemakerLab {
    /// Loop devices the agents of this lab attached and did not detach, by their logs.
    fn leaked_loop_devices(&self) -> Vec<String> {
        let mut attached = std::collections::BTreeSet::new();
        for node in NODES {
            let log =
                std::fs::read_to_string(self.node_dir(node).join("tmp/tandem-agent.log")).unwrap_or_default();
            for line in log.lines() {
                let Some(dev) = line.split_whitespace().find_map(|w| w.strip_prefix("device=")) else {
                    continue;
                };
                if line.contains("loop device attached") {
                    attached.insert(dev.to_string());
                } else if line.contains("loop device detached") || line.contains("detaching loop device left")
                {
                    attached.remove(dev);
                }
            }
        }
        let listed = Command::new("losetup")
            .args(["-n", "-O", "NAME", "-l"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let listed: std::collections::BTreeSet<&str> = listed.lines().map(str::trim).collect();
        attached.into_iter().filter(|d| listed.contains(d.as_str())).collect()
    }
}

impl Drop for PacemakerLab {
    fn drop(&mut self) {
        for node in NODES {
            let _ = self.stop(node, Duration::from_secs(60));
        }
        for node in NODES {
            if let Some(ns) = self.net.ns(node) {
                for p in netns_pids(ns) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        }
        // Loop devices of a crashed node's agent. Their backing files were in the node's
        // mount namespace, which died with it, so the host cannot name them by path: the
        // agents' logs can. A device this lab's agents attached and never detached is
        // still attached to a dead FUSE file (nothing else can have taken its number).
        for dev in self.leaked_loop_devices() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        // The Tandem cluster (its directory is inside ours) is dropped after this; then
        // our directory goes, unless kept.
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
