//! The integration tests' lab: the agent's [`LocalCluster`] (keys, config, agent processes,
//! control calls, cleanup) plus what only tests need — every agent in a network namespace of
//! its own so that a node's link can be cut ([`Lab::partition`]) and restored
//! ([`Lab::heal`]), per-node configs that route a dialer through a relay
//! ([`Lab::route_via`]), and signals to an agent ([`Lab::signal`]).
//!
//! A `Lab` dereferences to its `LocalCluster`, so the cluster's fields and methods (`dir`,
//! `config`, `promote`, `wait_for`, `mount`, ...) are the lab's. Its own `start` and
//! `start_with_config` take the place of the cluster's: they start a node's agent in its
//! namespace and with its own config, if it has them.
//!
//! With namespaces, only the network namespace differs: the agents share the test's mount
//! namespace, so their FUSE mounts and loop devices are visible to it, and their control
//! sockets are plain paths. Cleanup runs in [`Drop`]: the cluster's first (agents, mounts,
//! loop devices, files), then the namespaces, once no agent is left in them.

pub(crate) mod net;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tandem_agent::demo::cluster::{free_udp_port, ClusterSpec, LocalCluster};

pub use net::LAB_NETNS_PORT;
pub use tandem_agent::demo::cluster::run_cmd;

use net::{netns_path, LabNet};

/// Options for the lab's generated configuration.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub size: u64,
    /// The resource's replication mode: sync, memory or async.
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

impl LabOptions {
    fn cluster_spec(&self) -> Result<ClusterSpec> {
        Ok(ClusterSpec {
            size: self.size,
            mode: self.mode.parse().map_err(|e: String| anyhow!("LabOptions::mode: {e}"))?,
            timeout: self.timeout,
            extra_options: self.extra_options.clone(),
            resource_extra: self.resource_extra.clone(),
        })
    }
}

pub struct Lab {
    // Dropped first: every agent is gone before the namespaces they run in.
    cluster: LocalCluster,
    /// Configs of nodes that do not start with the shared one (see [`Lab::route_via`]).
    own_configs: BTreeMap<String, PathBuf>,
    net: Option<LabNet>,
}

impl Deref for Lab {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.cluster
    }
}

impl DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.cluster
    }
}

impl Lab {
    /// Creates keys and a config for `names` (one resource, "mail", on every node) in a new
    /// directory under `parent` — and, with `opts.netns`, the namespaces and their bridge.
    /// `exe` is the `tandem` binary to run agents with.
    pub fn new(parent: &Path, exe: &Path, names: &[&str], opts: &LabOptions) -> Result<Self> {
        let spec = opts.cluster_spec()?;
        // On an error below, `net` is dropped and deletes its namespaces.
        let net = if opts.netns { Some(LabNet::create(names)?) } else { None };
        let mut nodes = Vec::new();
        for name in names {
            let addr = match &net {
                Some(net) => net.addr(name)?,
                None => SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
            };
            nodes.push((*name, addr));
        }
        let cluster = LocalCluster::create(parent, exe, &nodes, &spec)?;
        Ok(Lab { cluster, own_configs: BTreeMap::new(), net })
    }

    /// The network namespace `node`'s agent runs in, if the lab uses namespaces.
    pub fn netns(&self, node: &str) -> Option<&str> {
        self.net.as_ref()?.ns(node)
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
        net.set_link(node, up)
    }

    /// Starts `node`'s agent (in its namespace, with its own config after
    /// [`Lab::route_via`]) and waits until it answers on its control socket.
    pub fn start(&mut self, node: &str) -> Result<()> {
        let config = self.config_of(node)?;
        self.start_with_config(node, &config)
    }

    /// The config file `node`'s agent starts with: its own copy after [`Lab::route_via`],
    /// else the lab's shared one.
    pub fn config_of(&self, node: &str) -> Result<PathBuf> {
        self.cluster.node_addr(node)?;
        Ok(self.own_configs.get(node).cloned().unwrap_or_else(|| self.cluster.config.clone()))
    }

    /// Makes `dialer` reach `peer` at `via` (e.g. a UDP relay in front of `peer`) instead
    /// of `peer`'s own address: writes `dialer`'s own copy of the config, in which `peer`'s
    /// `address` is `via`, and starts `dialer` with it from now on ([`Lab::start`]). `peer`
    /// still listens on its real address; it accepts the connection by its certificate,
    /// whatever address it comes from. Only the dialing side of a pair — the node whose name
    /// sorts first — uses the address, so `dialer` must sort before `peer`. Returns the
    /// path of the new config. Takes effect at `dialer`'s next start.
    pub fn route_via(&mut self, dialer: &str, peer: &str, via: SocketAddr) -> Result<PathBuf> {
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
        self.own_configs.insert(dialer.to_string(), path.clone());
        Ok(path)
    }

    /// Starts `node`'s agent, in its namespace if it has one, with another config file (e.g.
    /// one that disagrees with the peers' on purpose).
    pub fn start_with_config(&mut self, node: &str, config: &Path) -> Result<()> {
        match self.netns(node).map(netns_path) {
            // `nsenter --net` changes only the network namespace (unlike `ip netns exec`,
            // which also remounts /sys in a mount namespace of its own): the agent's FUSE
            // mount and loop device stay visible here. Without --pid it execs, so the child
            // is the agent.
            Some(ns) => {
                let mut net_arg = OsString::from("--net=");
                net_arg.push(ns);
                let wrapper = [OsString::from("nsenter"), net_arg, OsString::from("--")];
                self.cluster.start_wrapped(node, config, &wrapper)
            }
            None => self.cluster.start_with_config(node, config),
        }
    }

    /// Sends `sig` to `node`'s agent.
    pub fn signal(&self, node: &str, sig: Signal) -> Result<()> {
        let pid = self.pid(node).ok_or_else(|| anyhow!("agent {node} is not running"))?;
        kill(Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }
}
