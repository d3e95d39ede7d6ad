//! The cluster configuration file (TOML): nodes, resources, disks, options.
//!
//! Parsing is strict (unknown keys are errors) and every error names the file and the
//! offending item, so a typo is found when the agent starts, not when a failover needs it.
//!
//! Two steps: serde reads the file into typed values with their defaults (`file.rs`; the
//! defaults all live in `defaults.rs`, the string forms in `units.rs`), then [`Config::parse`]
//! resolves what is inherited (a disk's mode and backlog from its resource, a resource's
//! timeout and handlers from the top level) and checks what relates several values
//! (heartbeat shorter than timeout, sizes that are multiples of 4KiB, known nodes, ...).

mod defaults;
mod file;
mod units;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tandem_protocol::Compression;
use tandem_replicator::split_brain::AfterSplitBrain;
use tandem_replicator::{Backlog, Mode};
use thiserror::Error;

use crate::volume_set::VolumeLayout;
use file::{Allocation, ConfigFile, ResourceFile};
pub use units::SnapshotTier;
pub use units::{format_size, parse_duration, parse_size, ByteRate, ByteSize};

/// Nodes holding a copy of one resource (the primary and up to 31 peers).
pub const MAX_NODES_PER_RESOURCE: usize = 32;

/// Data in flight to a `memory` or `async` peer before `on_backlog_full` applies.
pub const DEFAULT_BACKLOG: u64 = defaults::backlog();

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Not TOML, or a key or value the schema refuses.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// Values that parse but do not fit together, or a lookup of something not configured.
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Commands run on events (like DRBD's handlers): each is run with `sh -c`, with
/// `TANDEM_EVENT`, `TANDEM_RESOURCE`, `TANDEM_NODE`, `TANDEM_PEER`, `TANDEM_ROLE` and
/// `TANDEM_DISK` in its environment. A resource's `[resource.handlers]` overrides the
/// top-level `[handlers]` key by key. None is set by default.
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

/// A `[[node]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    /// The UDP address the agent listens on (QUIC).
    #[serde(deserialize_with = "units::socket_address")]
    pub address: SocketAddr,
    pub control: PathBuf,
    pub run_dir: PathBuf,
    /// Where a primary's stable device paths live: `DIR/RESOURCE`, or `DIR/RESOURCE/VOLUME`
    /// for a volume group, each a symlink to the loop device while this node is primary.
    #[serde(default = "defaults::device_dir")]
    pub device_dir: PathBuf,
    /// Where the agent serves Prometheus metrics (`GET /metrics`, TCP); off when absent.
    #[serde(default, deserialize_with = "units::optional_socket_address")]
    pub metrics: Option<SocketAddr>,
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
    /// Where this copy's snapshots live (default: beside the metadata, `META.snapshots`).
    pub snapshot_dir: PathBuf,
    /// The agent's snapshot schedule for this copy.
    pub snapshot_schedule: Vec<SnapshotTier>,
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
    /// A copy becoming a resync target first takes a snapshot, kept until the resync ends.
    pub snapshot_before_resync: bool,
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
    pub fn allocation(&self) -> crate::storage::Allocation {
        if self.allocate_full {
            crate::storage::Allocation::Full
        } else {
            crate::storage::Allocation::Sparse
        }
    }

    /// How a primary replicates to `node`.
    pub fn link_to(&self, node: &str) -> PeerLink {
        match self.disks.get(node) {
            Some(d) => PeerLink { mode: d.mode, backlog: d.backlog, compression: d.compression },
            None => PeerLink { mode: self.mode, backlog: None, compression: defaults::compression() },
        }
    }

    /// Nodes other than `me` with a disk for this resource.
    pub fn peers_of(&self, me: &str) -> Vec<String> {
        self.disks.keys().filter(|n| n.as_str() != me).cloned().collect()
    }
}

/// `[options]`: cluster-wide settings; every key is optional (defaults in `defaults.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    #[serde(deserialize_with = "units::parsed")]
    pub timeout: Duration,
    #[serde(deserialize_with = "units::parsed")]
    pub heartbeat_interval: Duration,
    #[serde(deserialize_with = "units::parsed")]
    pub connect_retry: Duration,
    #[serde(deserialize_with = "units::size")]
    pub stream_window: u64,
    /// Largest UDP payload QUIC's path MTU discovery may probe for.
    #[serde(deserialize_with = "units::mtu")]
    pub max_mtu: u16,
    /// Receive and send buffer the kernel keeps for the QUIC socket.
    #[serde(deserialize_with = "units::socket_buffer")]
    pub socket_buffer: u64,
    /// How long a handler may run; `fence-peer` past it refuses the promotion.
    #[serde(deserialize_with = "units::parsed")]
    pub hook_timeout: Duration,
    /// How long a primary's device waits for a new agent after its agent stopped
    /// uncleanly or for a restart (its FUSE connection kept by the descriptor holder);
    /// past it, requests fail with EIO. Zero: no holder, requests fail at once.
    #[serde(deserialize_with = "units::parsed")]
    pub takeover_grace: Duration,
    /// QUIC congestion control.
    pub congestion: Congestion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// Loss-based (the default; fair to other traffic on a shared LAN).
    Cubic,
    /// Model-based: keeps a lossy long-distance path full.
    Bbr,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: defaults::timeout(),
            heartbeat_interval: defaults::heartbeat_interval(),
            connect_retry: defaults::connect_retry(),
            stream_window: defaults::stream_window(),
            max_mtu: defaults::max_mtu(),
            socket_buffer: defaults::socket_buffer(),
            hook_timeout: defaults::hook_timeout(),
            takeover_grace: defaults::takeover_grace(),
            congestion: defaults::congestion(),
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

fn valid_name(kind: &str, n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 63 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("{kind} name {n:?} must be 1-63 characters of letters, digits, '-' or '_'"));
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses `text`, read from `path` (named in every error).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let f = ConfigFile::from_toml(text)
            .map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })?;
        let invalid = |message| ConfigError::Invalid { path: path.to_path_buf(), message };
        valid_name("cluster", &f.cluster).map_err(invalid)?;
        check_options(&f.options).map_err(invalid)?;
        check_nodes(&f.node).map_err(invalid)?;
        let names: BTreeSet<&str> = f.node.iter().map(|n| n.name.as_str()).collect();
        let mut resources = Vec::new();
        let mut rnames = BTreeSet::new();
        for r in f.resource {
            valid_name("resource", &r.name).map_err(invalid)?;
            if !rnames.insert(r.name.clone()) {
                return Err(invalid(format!("resource {:?} is defined twice", r.name)));
            }
            let name = r.name.clone();
            let resource = resolve_resource(r, &f.options, &f.handlers, &names)
                .map_err(|m| invalid(format!("resource {name}: {m}")))?;
            resources.push(resource);
        }
        Ok(Config {
            path: path.to_path_buf(),
            cluster: f.cluster,
            options: f.options,
            nodes: f.node,
            resources,
        })
    }

    pub fn node(&self, name: &str) -> Result<&Node, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| ConfigError::Invalid {
            path: self.path.clone(),
            message: format!(
                "node {name:?} is not defined (nodes: {})",
                self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
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

fn check_options(o: &Options) -> Result<(), String> {
    if o.heartbeat_interval >= o.timeout {
        return Err(format!(
            "options.heartbeat_interval ({:?}) must be shorter than options.timeout ({:?})",
            o.heartbeat_interval, o.timeout
        ));
    }
    if o.stream_window < (1 << 20) {
        return Err(format!(
            "options.stream_window ({}) must be at least 1MiB",
            format_size(o.stream_window)
        ));
    }
    Ok(())
}

fn check_nodes(nodes: &[Node]) -> Result<(), String> {
    let mut names = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for n in nodes {
        valid_name("node", &n.name)?;
        if !names.insert(n.name.as_str()) {
            return Err(format!("node {:?} is defined twice", n.name));
        }
        if !addrs.insert(n.address) {
            return Err(format!("node {}: address {} is used by another node", n.name, n.address));
        }
    }
    if nodes.is_empty() {
        return Err("no [[node]] defined".into());
    }
    Ok(())
}

/// A positive multiple of 4KiB (the block size of every image).
fn check_block_multiple(what: &str, n: u64) -> Result<u64, String> {
    if n == 0 || !n.is_multiple_of(4096) {
        return Err(format!("{what} {} must be a positive multiple of 4KiB", format_size(n)));
    }
    Ok(n)
}

/// At least 1MiB, so that a backlog holds more than a handful of writes.
fn check_backlog(what: &str, n: u64) -> Result<u64, String> {
    if n < (1 << 20) {
        return Err(format!("{what} ({}) must be at least 1MiB", format_size(n)));
    }
    Ok(n)
}

/// The resource `r` with what it inherits resolved; errors are relative to the resource.
fn resolve_resource(
    r: ResourceFile,
    options: &Options,
    handlers: &Handlers,
    nodes: &BTreeSet<&str>,
) -> Result<Resource, String> {
    let volumes = if r.volume.is_empty() {
        let Some(size) = r.size else { return Err("size is missing".into()) };
        vec![VolumeLayout { name: String::new(), offset: 0, size: check_block_multiple("size", size)? }]
    } else {
        if r.size.is_some() {
            return Err("a volume group has no size of its own: give each [[resource.volume]] one".into());
        }
        let mut v: Vec<VolumeLayout> = Vec::new();
        for fv in &r.volume {
            valid_name("volume", &fv.name)?;
            if v.iter().any(|x| x.name == fv.name) {
                return Err(format!("volume {:?} is defined twice", fv.name));
            }
            let offset = v.last().map_or(0, |l| l.offset + l.size);
            let size = check_block_multiple(&format!("volume {} size", fv.name), fv.size)?;
            v.push(VolumeLayout { name: fv.name.clone(), offset, size });
        }
        v
    };
    let size = volumes.iter().map(|v| v.size).sum::<u64>();
    let g = r.bitmap_granularity;
    if !g.is_power_of_two() || !(4096..=(1 << 20)).contains(&g) {
        return Err(format!(
            "bitmap_granularity ({}) must be a power of two from 4KiB to 1MiB",
            format_size(g)
        ));
    }
    if r.resync_max_rate == Some(0) || r.resync_min_rate == 0 {
        return Err("resync rates must be positive".into());
    }
    if !(1..=crate::meta::AL_MAX_EXTENTS).contains(&r.al_extents) {
        return Err(format!("al_extents ({}) must be 1..={}", r.al_extents, crate::meta::AL_MAX_EXTENTS));
    }
    let e = r.al_extent_size;
    if !e.is_power_of_two() || e < g || e > (1 << 30) {
        return Err(format!(
            "al_extent_size ({}) must be a power of two, at least bitmap_granularity, at most 1GiB",
            format_size(e)
        ));
    }
    let default_backlog = check_backlog("backlog", r.backlog)?;
    let mut disks = BTreeMap::new();
    for (node, d) in r.disk {
        if !nodes.contains(node.as_str()) {
            return Err(format!(
                "disk for unknown node {node:?} (nodes: {})",
                nodes.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }
        if d.image == d.meta {
            return Err(format!("node {node}: image and meta are the same file"));
        }
        if volumes.len() > 1 && !d.image.to_string_lossy().contains("{volume}") {
            return Err(format!(
                "node {node}: a volume group needs one image per volume: put {{volume}} in the image path \
                 (e.g. /var/lib/tandem/{}-{{volume}}.img)",
                r.name
            ));
        }
        let mode = d.mode.unwrap_or(r.mode);
        let limit = match d.backlog {
            Some(b) => check_backlog(&format!("disk.{node}.backlog"), b)?,
            None => default_backlog,
        };
        let when_full = d.on_backlog_full.unwrap_or(r.on_backlog_full);
        let backlog = (mode != Mode::Sync).then_some(Backlog { limit, when_full });
        let snapshot_dir = d.snapshot_dir.unwrap_or_else(|| {
            let mut p = d.meta.clone().into_os_string();
            p.push(".snapshots");
            PathBuf::from(p)
        });
        disks.insert(
            node,
            Disk {
                image: d.image,
                meta: d.meta,
                mode,
                backlog,
                compression: d.compression,
                snapshot_dir,
                snapshot_schedule: d.snapshot_schedule,
            },
        );
    }
    if disks.is_empty() {
        return Err("no [resource.disk.NODE] entries".into());
    }
    if disks.len() > MAX_NODES_PER_RESOURCE {
        return Err(format!("{} nodes hold a copy; at most {MAX_NODES_PER_RESOURCE} may", disks.len()));
    }
    Ok(Resource {
        name: r.name,
        size,
        volumes,
        mode: r.mode,
        timeout: r.timeout.unwrap_or(options.timeout),
        bitmap_granularity: g,
        allocate_full: r.allocate == Allocation::Full,
        resync_max_rate: r.resync_max_rate,
        resync_min_rate: r.resync_min_rate,
        resync_checksum: r.resync_checksum,
        snapshot_before_resync: r.snapshot_before_resync,
        al_extents: r.al_extents,
        al_extent_size: e,
        after_split_brain: r.after_split_brain,
        handlers: handlers.overridden_by(&r.handlers),
        disks,
    })
}
