//! `tandem agent`: the daemon of one node.

pub mod control_server;
pub mod events;
pub mod hooks;
pub mod peer_link;
pub mod resource;
pub mod sd_notify;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use quinn::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{Config, Node};
use crate::status::NodeStatus;
use crate::tls::Identity;
use crate::transport::{pin_peers, Transport, TransportSettings};
use resource::Resource;

pub struct Agent {
    pub cfg: Config,
    pub me: Node,
    pub transport: Transport,
    pub resources: BTreeMap<String, Arc<Resource>>,
    connections: Mutex<HashMap<String, Connection>>,
    pub shutdown: CancellationToken,
    /// Wakes the dial loops now instead of after their back-off (after `connect`).
    pub redial: tokio::sync::Notify,
    /// What `tandem events` reads.
    pub events: Arc<events::EventBus>,
    /// The binary this agent runs (resolved at start, so an upgrade that replaces the
    /// file is what `tandem restart` execs).
    exe: std::path::PathBuf,
    /// `tandem restart`: shut down for a restart, then exec `exe`.
    restart: tokio::sync::Notify,
    /// When this process started (Unix ms).
    started_ms: u64,
    /// Held while this agent runs: one agent per node (two would both serve a held device).
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the node's agent lock (`run_dir/agent.lock`), or says which agent holds it.
fn lock_node(run_dir: &std::path::Path, node: &str) -> Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let path = run_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let locked = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "another agent of node {node} is running (pid {}; lock {})",
                pid.trim(),
                path.display()
            )
        }
        Err((_, e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
    };
    use std::io::Write;
    locked.set_len(0)?;
    write!(&*locked, "{}", std::process::id())?;
    Ok(locked)
}

/// How [`Agent::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT.
    Stopped,
}

impl Agent {
    /// Loads everything the node needs and fails with a message naming the problem if
    /// anything is missing or inconsistent: keys, certificates, images, metadata.
    pub fn new(cfg: Config, node: &str) -> Result<Arc<Self>> {
        let me = cfg.node(node)?.clone();
        let identity =
            Identity::load(&me.cert, &me.key).with_context(|| format!("node {node}'s own identity"))?;
        let pinned = pin_peers(&cfg, node)?;
        if cfg.resources_of(node).is_empty() {
            anyhow::bail!("node {node} has no disk in any resource of {}", cfg.path.display());
        }
        let lock = lock_node(&me.run_dir, node)?;
        let bus = events::EventBus::new();
        let exe = std::env::current_exe().context("cannot tell which binary this agent runs")?;
        let keeper = if cfg.options.takeover_grace.is_zero() {
            None
        } else {
            match crate::holder::keeper::Keeper::attach(&exe, &me.run_dir, cfg.options.takeover_grace) {
                Ok(k) => Some(Arc::new(k)),
                Err(e) => {
                    error!("{e:#}: a primary's device will fail if this agent stops while it is in use");
                    None
                }
            }
        };
        let mut held = match &keeper {
            Some(k) => k.held().unwrap_or_else(|e| {
                error!("{e:#}");
                Vec::new()
            }),
            None => Vec::new(),
        };
        // A device of a resource this configuration no longer has on this node: nobody
        // will take it over, so it fails now rather than at the end of the grace time.
        if let Some(k) = &keeper {
            let ours: Vec<String> = cfg
                .resources_of(node)
                .iter()
                .map(|r| resource::fuse_mountpoint(&me.run_dir, &r.name).display().to_string())
                .collect();
            for key in held.iter().filter(|k| !ours.contains(k)) {
                error!(key = %key, "the holder keeps a device no resource of this node has: releasing it (its requests fail)");
                if let Err(e) = k.forget(key) {
                    error!("{e:#}");
                }
            }
            held.retain(|k| ours.contains(k));
        }
        let shared = resource::NodeShared {
            hook_timeout: cfg.options.hook_timeout,
            connect_retry: cfg.options.connect_retry,
            events: bus.clone(),
            keeper,
            held,
        };
        let mut resources = BTreeMap::new();
        for r in cfg.resources_of(node) {
            resources.insert(
                r.name.clone(),
                Resource::open(&cfg.cluster, node, &me.run_dir, &me.device_dir, r, &shared)?,
            );
        }
        let transport = Transport::bind(identity, pinned, TransportSettings::from_config(&cfg), me.address)?;
        Ok(Arc::new(Self {
            cfg,
            me,
            transport,
            resources,
            connections: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            redial: tokio::sync::Notify::new(),
            events: bus,
            exe,
            restart: tokio::sync::Notify::new(),
            started_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            _lock: lock,
        }))
    }

    /// A new reader of the event bus for `only` (every resource if `None`): the receiver
    /// and the records to send first (the current state, then the end-of-dump marker).
    pub fn subscribe_events(
        &self,
        only: Option<&str>,
    ) -> (tokio::sync::broadcast::Receiver<Arc<crate::events::Record>>, Vec<crate::events::Record>) {
        self.events.subscribe(self.resources.values().map(|r| (r.events(), || r.status())), only)
    }

    pub fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Records the live connection to `node`, returning one it replaces.
    pub fn register_connection(&self, node: &str, conn: Connection) -> Option<Connection> {
        self.connections.lock().unwrap().insert(node.to_string(), conn)
    }

    pub fn unregister_connection(&self, node: &str, conn: &Connection) {
        let mut c = self.connections.lock().unwrap();
        if c.get(node).is_some_and(|x| x.stable_id() == conn.stable_id()) {
            c.remove(node);
        }
    }

    /// `tandem peer-lost NODE`: the cluster manager knows `node` is down (fenced, or lost
    /// from its membership). Its connection is closed now, so every resource ends its
    /// session with it at once — a promotion that follows does not wait for the peer
    /// timeout to notice what the cluster already knows. The dial loop reconnects when the
    /// node comes back.
    pub fn peer_lost(&self, node: &str) -> Result<String> {
        if !self.cfg.peers_of(&self.me.name).iter().any(|p| p.name == node) {
            anyhow::bail!("{node} is not a peer of node {} in {}", self.me.name, self.cfg.path.display());
        }
        let conn = self.connections.lock().unwrap().remove(node);
        Ok(match conn {
            Some(c) => {
                c.close(
                    quinn::VarInt::from_u32(crate::transport::close_code::PEER_LOST),
                    b"reported down by the cluster manager",
                );
                info!(peer = %node, "connection closed: the cluster manager reports the peer down");
                format!("connection to {node} closed")
            }
            None => format!("no connection to {node}"),
        })
    }

    /// What a metrics scrape reports: the status and every latency histogram.
    pub fn scrape(&self) -> crate::metrics::exposition::Scrape {
        crate::metrics::exposition::Scrape {
            status: self.status(),
            latency: self.resources.iter().map(|(n, r)| (n.clone(), r.latency())).collect(),
        }
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.me.name.clone(),
            cluster: self.cfg.cluster.clone(),
            agent_started_ms: self.started_ms,
            resources: self.resources.values().map(|r| r.status()).collect(),
            links: {
                let conns = self.connections.lock().unwrap();
                let mut links: Vec<_> =
                    conns.iter().map(|(node, c)| crate::transport::link_status(node, c)).collect();
                links.sort_by(|a, b| a.node.cmp(&b.node));
                links
            },
        }
    }

    /// `tandem restart`, first half: checks that every primary's device is kept by the
    /// descriptor holder (else the restart would fail it) and that the binary to exec runs
    /// (`--version`). Refused, with the agent as it was, if not.
    pub async fn check_restart(&self) -> Result<String> {
        for r in self.resources.values().filter(|r| r.is_primary()) {
            if !r.device_held().await {
                anyhow::bail!(
                    "refusing to restart: {}'s device is not kept by a descriptor holder (takeover_grace = \"0s\", \
                     or the holder could not start: see the agent's log), so a restart would fail it; \
                     demote it or switch over first",
                    r.name
                );
            }
        }
        let out = std::process::Command::new(&self.exe)
            .arg("--version")
            .output()
            .with_context(|| format!("refusing to restart: cannot run {}", self.exe.display()))?;
        if !out.status.success() {
            anyhow::bail!(
                "refusing to restart: `{} --version` failed ({}): {}",
                self.exe.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(format!(
            "restarting the agent of {} (pid {}) as {}",
            self.me.name,
            std::process::id(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }

    /// `tandem restart`, second half: [`Agent::run`] shuts down for a restart and execs the
    /// binary.
    pub fn trigger_restart(&self) {
        self.restart.notify_one();
    }

    /// Serves every device the previous agent left with the holder, before anything else.
    async fn take_over_held(&self) {
        for r in self.resources.values().filter(|r| r.has_held_device()) {
            if let Err(e) = r.take_over().await {
                error!(resource = %r.name, "{e:#}");
            }
        }
    }

    /// Runs until SIGTERM/SIGINT, then shuts down cleanly; or until `tandem restart`, then
    /// shuts down for a restart and execs the binary (it only returns if that fails).
    pub async fn run(self: Arc<Self>) -> Result<Exit> {
        self.take_over_held().await;
        let control = control_server::ControlServer::bind(&self.me.control)?;
        info!(node = %self.me.name, address = %self.me.address, control = %self.me.control.display(),
              resources = ?self.resources.keys().collect::<Vec<_>>(), "agent started");
        let metrics = match self.me.metrics {
            Some(addr) => Some(crate::metrics::MetricsServer::bind(addr).await?),
            None => None,
        };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(control.serve(self.clone()));
        if let Some(m) = metrics {
            tasks.spawn(m.serve(self.clone()));
        }
        for peer in self.cfg.peers_of(&self.me.name) {
            if peer_link::dials(&self.me.name, &peer.name) {
                tasks.spawn(peer_link::dial_loop(self.clone(), peer.clone()));
            }
        }
        for r in self.resources.values() {
            let tiers = r.snapshot_tiers();
            if tiers.is_empty() {
                continue;
            }
            let r = r.clone();
            tasks.spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    r.snapshot_schedule_tick(&tiers).await;
                }
            });
        }
        let acceptor = self.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    inc = acceptor.transport.accept() => match inc {
                        Some(i) => { tokio::spawn(peer_link::accept(acceptor.clone(), i)); }
                        None => return,
                    },
                    _ = acceptor.shutdown.cancelled() => return,
                }
            }
        });
        // Once a second: what changes without an announcement (out-of-sync bytes), and
        // the progress of running resyncs. Does nothing while nobody reads events.
        let ticker = self.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                for r in ticker.resources.values() {
                    r.publish_tick();
                }
            }
        });
        // The control socket is bound and served: the CLI can talk to us.
        sd_notify::notify("READY=1");
        if let Some(every) = sd_notify::watchdog_interval() {
            tasks.spawn(async move {
                loop {
                    sd_notify::notify("WATCHDOG=1");
                    tokio::time::sleep(every).await;
                }
            });
        }
        let restarting = tokio::select! {
            _ = wait_for_signal() => false,
            _ = self.restart.notified() => true,
        };
        sd_notify::notify(if restarting { "RELOADING=1" } else { "STOPPING=1" });
        info!(restarting, "shutting down");
        self.shutdown.cancel();
        for r in self.resources.values() {
            r.shutdown(restarting).await;
        }
        self.transport.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.transport.wait_idle()).await;
        tasks.abort_all();
        let _ = std::fs::remove_file(&self.me.control);
        if restarting {
            return Err(self.exec_again());
        }
        info!("agent stopped");
        Ok(Exit::Stopped)
    }

    /// Replaces this process with `exe` and the same arguments; the new agent takes over
    /// every device left with the holder. Returns only if the exec failed.
    fn exec_again(&self) -> anyhow::Error {
        use std::os::unix::process::CommandExt;
        info!(exe = %self.exe.display(), "agent restarting");
        let err = std::process::Command::new(&self.exe).args(std::env::args_os().skip(1)).exec();
        anyhow::Error::new(err).context(format!(
            "cannot exec {} for the restart; start `tandem agent` again within takeover_grace \
             ({:?}) and it takes the devices over",
            self.exe.display(),
            self.cfg.options.takeover_grace
        ))
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install SIGTERM handler: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
