//! The cluster configuration file (TOML): nodes, resources, disks, options.
//!
//! Parsing is strict (unknown keys are errors) and every check names the offending item, so
//! a typo is found when the agent starts, not when a failover needs it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::storage::Allocation;
use crate::volume_set::VolumeLayout;
use serde::Deserialize;
use tandem_protocol::Compression;
use tandem_replicator::split_brain::{parse_policy, AfterSplitBrain};
use tandem_replicator::{Backlog, BacklogPolicy, Mode};

/// Nodes holding a copy of one resource (the primary and up to 31 peers).
pub const MAX_NODES_PER_RESOURCE: usize = 32;

/// Data in flight to a `memory` or `async` peer before `on_backlog_full` applies.
pub const DEFAULT_BACKLOG: u64 = 128 << 20;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cluster: String,
    #[serde(default)]
    options: FileOptions,
    #[serde(default)]
    node: Vec<FileNode>,
    #[serde(default)]
    resource: Vec<FileResource>,
    #[serde(default)]
    handlers: Handlers,
}

/// Commands run on events (like DRBD's handlers): each is run with `sh -c`, with
/// `TANDEM_EVENT`, `TANDEM_RESOURCE`, `TANDEM_NODE`, `TANDEM_PEER`, `TANDEM_ROLE` and
/// `TANDEM_DISK` in its environment. A resource's `[resource.handlers]` overrides the
/// top-level `[handlers]` key by key.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Handlers {
    /// Runs before a promotion while a peer is unreachable; a non-zero exit refuses it.
    pub fence_peer: Option<String>,
    pub split_brain: Option<String>,
    pub role_change: Option<String>,
    pub connected: Option<String>,
    pub disconnected: Option<String>,
    pub sync_start: Option<String>,
    pub sync_done: Option<String>,
}

impl Handlers {
    fn overridden_by(&self, o: &Handlers) -> Handlers {
        let pick = |a: &Option<String>, b: &Option<String>| b.clone().or_else(|| a.clone());
        Handlers {
            fence_peer: pick(&self.fence_peer, &o.fence_peer),
            split_brain: pick(&self.split_brain, &o.split_brain),
            role_change: pick(&self.role_change, &o.role_change),
            connected: pick(&self.connected, &o.connected),
            disconnected: pick(&self.disconnected, &o.disconnected),
            sync_start: pick(&self.sync_start, &o.sync_start),
            sync_done: pick(&self.sync_done, &o.sync_done),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOptions {
    timeout: Option<String>,
    heartbeat_interval: Option<String>,
    connect_retry: Option<String>,
    stream_window: Option<String>,
    max_mtu: Option<u16>,
    hook_timeout: Option<String>,
    congestion: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: String,
    address: String,
    control: PathBuf,
    run_dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileResource {
    name: String,
    /// The volume's size; for a volume group, omitted (the sum of the volumes).
    #[serde(default)]
    size: Option<String>,
    /// A volume group: several volumes, one device each, one ordered change stream.
    #[serde(default)]
    volume: Vec<FileVolume>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    bitmap_granularity: Option<String>,
    #[serde(default)]
    allocate: Option<String>,
    #[serde(default)]
    resync_max_rate: Option<String>,
    #[serde(default)]
    resync_min_rate: Option<String>,
    #[serde(default)]
    resync_checksum: Option<bool>,
    #[serde(default)]
    al_extents: Option<usize>,
    #[serde(default)]
    al_extent_size: Option<String>,
    #[serde(default)]
    after_split_brain: Option<String>,
    #[serde(default)]
    backlog: Option<String>,
    #[serde(default)]
    on_backlog_full: Option<String>,
    #[serde(default)]
    handlers: Handlers,
    #[serde(default)]
    disk: BTreeMap<String, FileDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVolume {
    name: String,
    size: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    image: PathBuf,
    meta: PathBuf,
    /// How the primary replicates to this node (default: the resource's mode).
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    backlog: Option<String>,
    #[serde(default)]
    on_backlog_full: Option<String>,
    #[serde(default)]
    compression: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub address: SocketAddr,
    pub control: PathBuf,
    pub run_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Disk {
    /// The image; for a volume group a pattern with `{volume}` (see [`Disk::image_for`]).
    pub image: PathBuf,
    pub meta: PathBuf,
    /// How a primary replicates to this node.
    pub mode: Mode,
    /// For `memory` and `async`: the bound on data in flight to this node.
    pub backlog: Option<Backlog>,
    /// Compression of block data sent to this node.
    pub compression: Compression,
}

impl Disk {
    /// The image file of `volume` (the resource's only volume has an empty name).
    pub fn image_for(&self, volume: &VolumeLayout) -> PathBuf {
        if volume.name.is_empty() {
            return self.image.clone();
        }
        PathBuf::from(self.image.to_string_lossy().replace("{volume}", &volume.name))
    }
}

/// How a primary replicates to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLink {
    pub mode: Mode,
    pub backlog: Option<Backlog>,
    pub compression: Compression,
}

#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    /// Total size (of every volume of a group).
    pub size: u64,
    /// The volumes, laid end to end; one unnamed volume unless the resource is a group.
    pub volumes: Vec<VolumeLayout>,
    pub mode: Mode,
    /// How long a peer may leave a request unanswered before it is declared disconnected.
    pub timeout: Duration,
    pub bitmap_granularity: u64,
    /// Write out new images in full (default) rather than leaving them sparse.
    pub allocate_full: bool,
    /// Resync bandwidth cap in bytes per second (None: unlimited).
    pub resync_max_rate: Option<u64>,
    /// Resync rate while the application writes, bytes per second.
    pub resync_min_rate: u64,
    /// Compare checksums and send only differing blocks in every resync.
    pub resync_checksum: bool,
    /// Activity log: hot extents kept, and extent size.
    pub al_extents: usize,
    pub al_extent_size: u64,
    /// What to do automatically about a split brain.
    pub after_split_brain: AfterSplitBrain,
    /// Event handlers (top-level ones overridden by the resource's).
    pub handlers: Handlers,
    /// Nodes holding a copy, by name.
    pub disks: BTreeMap<String, Disk>,
}

impl Resource {
    /// How the images' blocks are allocated, and so what a discard does to them.
    pub fn allocation(&self) -> Allocation {
        if self.allocate_full {
            Allocation::Full
        } else {
            Allocation::Sparse
        }
    }

    /// How a primary replicates to `node`.
    pub fn link_to(&self, node: &str) -> PeerLink {
        match self.disks.get(node) {
            Some(d) => PeerLink { mode: d.mode, backlog: d.backlog, compression: d.compression },
            None => PeerLink { mode: self.mode, backlog: None, compression: Compression::None },
        }
    }

    /// Nodes other than `me` with a disk for this resource.
    pub fn peers_of(&self, me: &str) -> Vec<String> {
        self.disks.keys().filter(|n| n.as_str() != me).cloned().collect()
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub timeout: Duration,
    pub heartbeat_interval: Duration,
    pub connect_retry: Duration,
    pub stream_window: u64,
    /// Largest UDP payload QUIC's path MTU discovery may probe for.
    pub max_mtu: u16,
    /// How long a handler may run; `fence-peer` past it refuses the promotion.
    pub hook_timeout: Duration,
    /// QUIC congestion control.
    pub congestion: Congestion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// Loss-based (the default; fair to other traffic on a shared LAN).
    Cubic,
    /// Model-based: keeps a lossy long-distance path full.
    Bbr,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            connect_retry: Duration::from_secs(1),
            stream_window: 16 << 20,
            max_mtu: 9000,
            hook_timeout: Duration::from_secs(60),
            congestion: Congestion::Cubic,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub cluster: String,
    pub options: Options,
    pub nodes: Vec<Node>,
    pub resources: Vec<Resource>,
}

/// Parses "512MiB", "1GiB", "4096", "4k" (binary units; bytes if no unit).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 512MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration (e.g. 5s, 500ms): {e}"))
}

fn valid_name(kind: &str, n: &str) -> Result<(), ConfigError> {
    if n.is_empty() || n.len() > 63 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(invalid(format!(
            "{kind} name {n:?} must be 1-63 characters of letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let f: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        valid_name("cluster", &f.cluster)?;
        let mut options = Options::default();
        let dur = |what: &str, v: &Option<String>, d: Duration| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(d),
                Some(s) => parse_duration(s).map_err(|e| invalid(format!("options.{what}: {e}"))),
            }
        };
        options.timeout = dur("timeout", &f.options.timeout, options.timeout)?;
        options.heartbeat_interval =
            dur("heartbeat_interval", &f.options.heartbeat_interval, options.heartbeat_interval)?;
        options.connect_retry = dur("connect_retry", &f.options.connect_retry, options.connect_retry)?;
        options.hook_timeout = dur("hook_timeout", &f.options.hook_timeout, options.hook_timeout)?;
        options.congestion = match f.options.congestion.as_deref() {
            None | Some("cubic") => Congestion::Cubic,
            Some("bbr") => Congestion::Bbr,
            Some(other) => {
                return Err(invalid(format!("options.congestion {other:?} must be \"cubic\" or \"bbr\"")))
            }
        };
        if let Some(w) = &f.options.stream_window {
            options.stream_window =
                parse_size(w).map_err(|e| invalid(format!("options.stream_window: {e}")))?;
        }
        if let Some(m) = f.options.max_mtu {
            if !(1200..=65527).contains(&m) {
                return Err(invalid("options.max_mtu must be between 1200 and 65527"));
            }
            options.max_mtu = m;
        }
        if options.heartbeat_interval >= options.timeout {
            return Err(invalid(format!(
                "options.heartbeat_interval ({:?}) must be shorter than options.timeout ({:?})",
                options.heartbeat_interval, options.timeout
            )));
        }
        if options.stream_window < (1 << 20) {
            return Err(invalid("options.stream_window must be at least 1MiB"));
        }

        let mut nodes = Vec::new();
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for n in f.node {
            valid_name("node", &n.name)?;
            if !names.insert(n.name.clone()) {
                return Err(invalid(format!("node {:?} is defined twice", n.name)));
            }
            let address: SocketAddr = n.address.parse().map_err(|_| {
                invalid(format!(
                    "node {}: address {:?} is not IP:port (e.g. 192.0.2.1:7789)",
                    n.name, n.address
                ))
            })?;
            if !addrs.insert(address) {
                return Err(invalid(format!("node {}: address {address} is used by another node", n.name)));
            }
            nodes.push(Node {
                name: n.name,
                address,
                control: n.control,
                run_dir: n.run_dir,
                cert: n.cert,
                key: n.key,
            });
        }
        if nodes.is_empty() {
            return Err(invalid("no [[node]] defined"));
        }

        let mut resources = Vec::new();
        let mut rnames = BTreeSet::new();
        for r in f.resource {
            valid_name("resource", &r.name)?;
            if !rnames.insert(r.name.clone()) {
                return Err(invalid(format!("resource {:?} is defined twice", r.name)));
            }
            let ctx = |m: String| invalid(format!("resource {}: {m}", r.name));
            let check = |what: &str, s: &str| -> Result<u64, ConfigError> {
                let n = parse_size(s).map_err(|e| ctx(format!("{what}: {e}")))?;
                if n == 0 || n % 4096 != 0 {
                    return Err(ctx(format!("{what} {s} must be a positive multiple of 4KiB")));
                }
                Ok(n)
            };
            let volumes = if r.volume.is_empty() {
                let Some(s) = &r.size else { return Err(ctx("size is missing".into())) };
                vec![VolumeLayout { name: String::new(), offset: 0, size: check("size", s)? }]
            } else {
                if r.size.is_some() {
                    return Err(ctx(
                        "a volume group has no size of its own: give each [[resource.volume]] one".into(),
                    ));
                }
                let mut v: Vec<VolumeLayout> = Vec::new();
                for fv in &r.volume {
                    valid_name("volume", &fv.name)?;
                    if v.iter().any(|x| x.name == fv.name) {
                        return Err(ctx(format!("volume {:?} is defined twice", fv.name)));
                    }
                    let offset = v.last().map_or(0, |l| l.offset + l.size);
                    v.push(VolumeLayout {
                        name: fv.name.clone(),
                        offset,
                        size: check(&format!("volume {} size", fv.name), &fv.size)?,
                    });
                }
                v
            };
            let size = volumes.iter().map(|v| v.size).sum::<u64>();
            let mode = match &r.mode {
                None => Mode::Sync,
                Some(m) => m.parse().map_err(|e: String| ctx(format!("mode: {e}")))?,
            };
            let timeout = match &r.timeout {
                None => options.timeout,
                Some(t) => parse_duration(t).map_err(|e| ctx(format!("timeout: {e}")))?,
            };
            let bitmap_granularity = match &r.bitmap_granularity {
                None => 4096,
                Some(g) => parse_size(g).map_err(|e| ctx(format!("bitmap_granularity: {e}")))?,
            };
            if !bitmap_granularity.is_power_of_two() || !(4096..=(1 << 20)).contains(&bitmap_granularity) {
                return Err(ctx("bitmap_granularity must be a power of two from 4KiB to 1MiB".into()));
            }
            let allocate_full = match r.allocate.as_deref() {
                None | Some("full") => true,
                Some("sparse") => false,
                Some(other) => return Err(ctx(format!("allocate {other:?} must be \"full\" or \"sparse\""))),
            };
            let rate = |what: &str, v: &Option<String>| -> Result<Option<u64>, ConfigError> {
                match v {
                    None => Ok(None),
                    Some(s) => {
                        let s = s.trim().trim_end_matches("/s");
                        parse_size(s).map(Some).map_err(|e| ctx(format!("{what}: {e} (e.g. \"100MiB\")")))
                    }
                }
            };
            let resync_max_rate = rate("resync_max_rate", &r.resync_max_rate)?;
            let resync_min_rate = rate("resync_min_rate", &r.resync_min_rate)?.unwrap_or(16 << 20);
            if resync_max_rate == Some(0) || resync_min_rate == 0 {
                return Err(ctx("resync rates must be positive".into()));
            }
            let al_extents = r.al_extents.unwrap_or(1000);
            if !(1..=crate::meta::AL_MAX_EXTENTS).contains(&al_extents) {
                return Err(ctx(format!("al_extents must be 1..={}", crate::meta::AL_MAX_EXTENTS)));
            }
            let al_extent_size = match &r.al_extent_size {
                None => 4 << 20,
                Some(v) => parse_size(v).map_err(|e| ctx(format!("al_extent_size: {e}")))?,
            };
            if !al_extent_size.is_power_of_two()
                || al_extent_size < bitmap_granularity
                || al_extent_size > (1 << 30)
            {
                return Err(ctx(
                    "al_extent_size must be a power of two, at least bitmap_granularity, at most 1GiB".into(),
                ));
            }
            let after_split_brain = match &r.after_split_brain {
                None => AfterSplitBrain::Disconnect,
                Some(p) => parse_policy(p).map_err(|e| ctx(format!("after_split_brain: {e}")))?,
            };
            let handlers = f.handlers.overridden_by(&r.handlers);
            let policy =
                |what: &str, v: &Option<String>, d: BacklogPolicy| -> Result<BacklogPolicy, ConfigError> {
                    match v {
                        None => Ok(d),
                        Some(p) => p.parse().map_err(|e: String| ctx(format!("{what}: {e}"))),
                    }
                };
            let backlog_size = |what: &str, v: &Option<String>, d: u64| -> Result<u64, ConfigError> {
                let n = match v {
                    None => d,
                    Some(b) => parse_size(b).map_err(|e| ctx(format!("{what}: {e}")))?,
                };
                if n < (1 << 20) {
                    return Err(ctx(format!("{what} must be at least 1MiB")));
                }
                Ok(n)
            };
            let default_backlog = backlog_size("backlog", &r.backlog, DEFAULT_BACKLOG)?;
            let default_policy = policy("on_backlog_full", &r.on_backlog_full, BacklogPolicy::Ahead)?;
            let mut disks = BTreeMap::new();
            for (node, d) in r.disk {
                if !names.contains(&node) {
                    return Err(ctx(format!(
                        "disk for unknown node {node:?} (nodes: {})",
                        names.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                if d.image == d.meta {
                    return Err(ctx(format!("node {node}: image and meta are the same file")));
                }
                if volumes.len() > 1 && !d.image.to_string_lossy().contains("{volume}") {
                    return Err(ctx(format!(
                        "node {node}: a volume group needs one image per volume: put {{volume}} in the image path \
                         (e.g. /var/lib/tandem/{}-{{volume}}.img)",
                        r.name
                    )));
                }
                let what = |k: &str| format!("disk.{node}.{k}");
                let peer_mode = match &d.mode {
                    None => mode,
                    Some(m) => m.parse().map_err(|e: String| ctx(format!("{}: {e}", what("mode"))))?,
                };
                let limit = backlog_size(&what("backlog"), &d.backlog, default_backlog)?;
                let when_full = policy(&what("on_backlog_full"), &d.on_backlog_full, default_policy)?;
                let backlog = (peer_mode != Mode::Sync).then_some(Backlog { limit, when_full });
                let compression = match &d.compression {
                    None => Compression::None,
                    Some(c) => c.parse().map_err(|e: String| ctx(format!("{}: {e}", what("compression"))))?,
                };
                disks.insert(
                    node,
                    Disk { image: d.image, meta: d.meta, mode: peer_mode, backlog, compression },
                );
            }
            if disks.is_empty() {
                return Err(ctx("no [resource.disk.NODE] entries".into()));
            }
            if disks.len() > MAX_NODES_PER_RESOURCE {
                return Err(ctx(format!(
                    "{} nodes hold a copy; at most {MAX_NODES_PER_RESOURCE} may",
                    disks.len()
                )));
            }
            resources.push(Resource {
                name: r.name,
                size,
                volumes,
                mode,
                timeout,
                bitmap_granularity,
                allocate_full,
                resync_max_rate,
                resync_min_rate,
                resync_checksum: r.resync_checksum.unwrap_or(false),
                al_extents,
                al_extent_size,
                after_split_brain,
                handlers,
                disks,
            });
        }
        Ok(Config { path: path.to_path_buf(), cluster: f.cluster, options, nodes, resources })
    }

    pub fn node(&self, name: &str) -> Result<&Node, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            invalid(format!(
                "node {name:?} is not defined in {} (nodes: {})",
                self.path.display(),
                self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Resources with a disk on `node`.
    pub fn resources_of(&self, node: &str) -> Vec<&Resource> {
        self.resources.iter().filter(|r| r.disks.contains_key(node)).collect()
    }

    /// Nodes that share at least one resource with `node`.
    pub fn peers_of(&self, node: &str) -> Vec<&Node> {
        let mut set = BTreeSet::new();
        for r in self.resources_of(node) {
            set.extend(r.peers_of(node));
        }
        self.nodes.iter().filter(|n| set.contains(&n.name)).collect()
    }

    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster = "mail"
[[node]]
name = "alpha"
address = "127.0.0.1:7789"
control = "/run/tandem/alpha.sock"
run_dir = "/run/tandem/alpha"
cert = "/etc/tandem/alpha.crt"
key = "/etc/tandem/alpha.key"
[[node]]
name = "beta"
address = "127.0.0.1:7790"
control = "/run/tandem/beta.sock"
run_dir = "/run/tandem/beta"
cert = "/etc/tandem/beta.crt"
key = "/etc/tandem/beta.key"
[[resource]]
name = "mailstore"
size = "512MiB"
mode = "sync"
[resource.disk.alpha]
image = "/var/lib/tandem/alpha/mailstore.img"
meta = "/var/lib/tandem/alpha/mailstore.meta"
[resource.disk.beta]
image = "/var/lib/tandem/beta/mailstore.img"
meta = "/var/lib/tandem/beta/mailstore.meta"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.resources[0].size, 512 << 20);
        assert_eq!(c.resources[0].mode, Mode::Sync);
        assert_eq!(c.peers_of("alpha").len(), 1);
        assert_eq!(c.resources[0].peers_of("beta"), vec!["alpha".to_string()]);
    }

    #[test]
    fn errors_name_the_problem() {
        let e =
            parse(&GOOD.replace("[resource.disk.beta]", "[resource.disk.gamma]")).unwrap_err().to_string();
        assert!(e.contains("unknown node \"gamma\""), "{e}");
        let e = parse(&GOOD.replace("512MiB", "512 parsecs")).unwrap_err().to_string();
        assert!(e.contains("mailstore") && e.contains("size"), "{e}");
        let e = parse(&GOOD.replace("mode = \"sync\"", "mode = \"fast\"")).unwrap_err().to_string();
        assert!(e.contains("unknown replication mode"), "{e}");
        let e = parse(&GOOD.replace("127.0.0.1:7790", "localhost")).unwrap_err().to_string();
        assert!(e.contains("beta") && e.contains("address"), "{e}");
        let e = parse(&GOOD.replace("cluster = \"mail\"", "cluster = \"mail\"\ncolor = 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let c = parse(GOOD).unwrap();
        let e = c.node("gamma").unwrap_err().to_string();
        assert!(e.contains("gamma") && e.contains("alpha, beta"), "{e}");
    }

    #[test]
    fn handlers_and_split_brain_policy() {
        let text = GOOD.replace(
            "mode = \"sync\"",
            "mode = \"sync\"\nafter_split_brain = \"discard-zero-changes\"\n\
             [resource.handlers]\nsplit_brain = \"/bin/alert sb\"",
        ) + "[handlers]\nsplit_brain = \"/bin/other\"\nfence_peer = \"/bin/fence\"\n";
        let c = parse(&text).unwrap();
        let r = &c.resources[0];
        assert_eq!(r.after_split_brain, AfterSplitBrain::DiscardZeroChanges);
        assert_eq!(r.handlers.split_brain.as_deref(), Some("/bin/alert sb"));
        assert_eq!(r.handlers.fence_peer.as_deref(), Some("/bin/fence"));
        assert_eq!(r.handlers.sync_done, None);
        let e = parse(&GOOD.replace("mode = \"sync\"", "after_split_brain = \"coin-flip\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("after_split_brain") && e.contains("coin-flip"), "{e}");
        let e = parse(&(GOOD.to_string() + "[handlers]\nfence = \"x\"\n")).unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("fence"), "{e}");
    }

    #[test]
    fn per_peer_modes_and_backlogs() {
        let text = GOOD.replace(
            "meta = \"/var/lib/tandem/beta/mailstore.meta\"",
            "meta = \"/var/lib/tandem/beta/mailstore.meta\"\nmode = \"async\"\nbacklog = \"64MiB\"",
        );
        let c = parse(&text).unwrap();
        let r = &c.resources[0];
        assert_eq!(
            r.link_to("alpha"),
            PeerLink { mode: Mode::Sync, backlog: None, compression: Compression::None }
        );
        assert_eq!(
            r.link_to("beta"),
            PeerLink {
                mode: Mode::Async,
                backlog: Some(Backlog { limit: 64 << 20, when_full: BacklogPolicy::Ahead }),
                compression: Compression::None,
            }
        );
        let e = parse(&text.replace("mode = \"async\"", "mode = \"asap\"")).unwrap_err().to_string();
        assert!(e.contains("disk.beta.mode") && e.contains("asap"), "{e}");
        let e = parse(&text.replace("64MiB", "10k")).unwrap_err().to_string();
        assert!(e.contains("disk.beta.backlog") && e.contains("1MiB"), "{e}");
        let e = parse(&text.replace("backlog = \"64MiB\"", "on_backlog_full = \"wait\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("on_backlog_full") && e.contains("wait"), "{e}");
    }

    #[test]
    fn volume_groups() {
        let text = GOOD
            .replace("size = \"512MiB\"\n", "")
            .replacen(
                "[resource.disk.alpha]",
                "[[resource.volume]]\nname = \"queue\"\nsize = \"64MiB\"\n[[resource.volume]]\nname = \"store\"\n\
                 size = \"1GiB\"\n[resource.disk.alpha]",
                1,
            )
            .replace("mailstore.img", "mailstore-{volume}.img");
        let c = parse(&text).unwrap();
        let r = &c.resources[0];
        assert_eq!(r.size, (64 << 20) + (1 << 30));
        assert_eq!(r.volumes[1], VolumeLayout { name: "store".into(), offset: 64 << 20, size: 1 << 30 });
        assert_eq!(
            r.disks["alpha"].image_for(&r.volumes[0]),
            PathBuf::from("/var/lib/tandem/alpha/mailstore-queue.img")
        );
        let e = parse(&text.replace("mailstore-{volume}.img", "mailstore.img")).unwrap_err().to_string();
        assert!(e.contains("{volume}"), "{e}");
        let e = parse(&text.replace("name = \"store\"", "name = \"queue\"")).unwrap_err().to_string();
        assert!(e.contains("defined twice"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    }
}
