//! The network of a lab with `LabOptions::netns`: one network namespace per node with
//! `eth0` holding the node's address, veth-paired with port `p<i>` of bridge `br0` in one
//! more namespace, the lab's bridge namespace. A node's link is cut by taking its bridge
//! port down. Deleting the namespaces removes every interface in them; namespaces a killed
//! test run left behind are deleted by the next lab that creates a network.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use tandem_agent::demo::cluster::run_cmd;

/// The port agents listen on inside their namespaces (each has its own address).
pub const LAB_NETNS_PORT: u16 = 7789;

/// Prefix of the lab's namespace names: `tdm<pid>-<n>-<suffix>`.
const NETNS_PREFIX: &str = "tdm";

static NEXT_NET: AtomicUsize = AtomicUsize::new(0);

/// Where `ip netns` keeps the namespace `ns` (what `nsenter --net=` takes).
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args)).context("ip (iproute2) failed; network namespaces need root")
}

pub(crate) struct LabNet {
    /// The nodes' names, in the order of their namespaces and bridge ports.
    names: Vec<String>,
    node_ns: Vec<String>,
    bridge_ns: String,
    /// 10.77.<subnet>.0/24 (the namespaces are private to the lab; the subnet only makes
    /// logs of concurrent labs easier to tell apart).
    subnet: u8,
    /// Namespaces created so far, deleted on drop.
    created: Vec<String>,
}

impl LabNet {
    /// Creates the bridge and a namespace for each of `names`.
    pub(crate) fn create(names: &[&str]) -> Result<Self> {
        for tool in ["ip", "nsenter"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                bail!("network namespaces need `{tool}` (apt-get install iproute2 util-linux)");
            }
        }
        if names.len() > 250 {
            bail!("a lab network holds at most 250 nodes (one /24), not {}", names.len());
        }
        remove_orphaned_namespaces();
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        let base = format!("{NETNS_PREFIX}{}-{n}", std::process::id());
        let mut net = LabNet {
            names: names.iter().map(|s| s.to_string()).collect(),
            node_ns: (0..names.len()).map(|i| format!("{base}-n{i}")).collect(),
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
        for i in 0..names.len() {
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

    fn index(&self, node: &str) -> Result<usize> {
        self.names.iter().position(|n| n == node).ok_or_else(|| anyhow!("no lab node {node}"))
    }

    fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, i as u8 + 1)
    }

    /// The address `node`'s agent listens on, in its namespace.
    pub(crate) fn addr(&self, node: &str) -> Result<SocketAddr> {
        Ok(SocketAddr::from((self.node_ip(self.index(node)?), LAB_NETNS_PORT)))
    }

    /// The namespace `node`'s agent runs in.
    pub(crate) fn ns(&self, node: &str) -> Option<&str> {
        Some(self.node_ns[self.index(node).ok()?].as_str())
    }

    /// Takes `node`'s bridge port up or down.
    pub(crate) fn set_link(&self, node: &str, up: bool) -> Result<()> {
        let port = format!("p{}", self.index(node)?);
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
