//! One replicated resource on this node: its image, metadata, role, dirty tracking, and
//! what it knows about each peer. Role changes are serialised by one async lock; status
//! reads never wait for a role change in progress.
//!
//! - `relation`: the resource's relation with each peer — the engine's state machine fed
//!   with events, its actions carried out; nothing else changes a relation;
//! - `roles`: promotion and demotion rules;
//! - `sync`: the mechanics of replication and resync as source and as target;
//! - `verify`: online verify;
//! - `persist`: the activity log's and bitmaps' way to the metadata file;
//! - `device_links`: the stable device paths of a primary (`/dev/tandem/RESOURCE`);
//! - `takeover`: serving again, as the same primary, a device the previous agent left with
//!   the descriptor holder;
//! - `snapshots`: point-in-time snapshots of this copy (taken, listed, exposed, restored,
//!   scheduled, and taken before it becomes a resync target).

mod device_links;
mod persist;
mod relation;
mod roles;
mod snapshots;
mod sync;
mod takeover;
mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tandem_protocol::{ResourceHello, Role};
use tandem_replicator::generation::{BLANK, UNKNOWN};
use tandem_replicator::relation::{Phase, Refusal, Relation};
use tandem_replicator::resync::stats::ResyncStats;
use tandem_replicator::{
    ActivityLog, ApplierStats, BlockStore, DirtyBitmap, LatencyHistogram, LatencySnapshot, PeerHandle,
    TargetState, Volume, VolumeStats,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config;
use crate::daemon::events::{EventBus, ResourceEvents};
use crate::daemon::hooks::{HookContext, HookEvent, HookStats, Hooks};
use crate::daemon::peer_link::PeerConn;
use crate::frontend::{Frontend, RequestLatency};
use crate::meta::{DiskState, MetaFile, MetaRecord, AL_MAX_EXTENTS};
use crate::status::{
    HandlerStats, LatencySummary, PeerStatus, ReplicationState, ResourceStats, ResourceStatus, ResyncStatus,
    VolumeStatus,
};
use crate::storage::FileStore;
use crate::transport::framed::WireCounts;
use crate::volume_set::{VolumeLayout, VolumeSet};
use persist::{persist_all_bitmaps, MetaAl};
pub use snapshots::SnapshotStatus;
pub use verify::VerifyReport;

/// The logical block size the volume exposes (the loop device's sector size).
pub const LOGICAL_BLOCK: u32 = 4096;

/// What the resource keeps about one peer.
struct PeerState {
    /// The relation's state machine (`tandem_replicator::relation`).
    rel: Relation,
    /// The live connection to the peer, if any.
    conn: Option<PeerConn>,
    /// Primary side: the replication session to this peer.
    session: Option<PeerHandle>,
    /// Secondary side: applying this peer's stream.
    applying: bool,
    /// Cancelled when the resource's session with the peer ends: every stream of the
    /// session (replication, resync) ends with it. A new one per session.
    streams: CancellationToken,
    /// Target side: bytes the running resync announced.
    resync_total: u64,
}

enum RoleState {
    Secondary,
    Primary { volume: Arc<Volume>, frontend: Box<dyn Frontend> },
}

pub struct Resource {
    pub name: String,
    cfg: config::Resource,
    me: String,
    /// The image, or a volume group's images as one address space, behind its snapshots:
    /// every write goes through `snapshots`.
    store: Arc<dyn BlockStore>,
    snapshots: Arc<crate::snapshot::SnapshotStore>,
    /// Snapshots known to be invalid (each gets one `snapshot-invalid` record).
    invalid_seen: Mutex<std::collections::BTreeSet<String>>,
    /// Snapshots exposed as read-only devices.
    exposed: Mutex<BTreeMap<String, crate::frontend::snapshot_fs::SnapshotExport>>,
    meta: Arc<Mutex<MetaFile>>,
    role: tokio::sync::Mutex<RoleState>,
    /// Snapshot of the role for readers that must not wait: (volume, device) when primary.
    current: Mutex<Option<(Arc<Volume>, String)>>,
    /// While primary: each volume's device (name, path).
    devices: Mutex<Vec<(String, String)>>,
    peers: Mutex<BTreeMap<String, PeerState>>,
    bitmaps: BTreeMap<String, Arc<Mutex<DirtyBitmap>>>,
    resync_stats: BTreeMap<String, Arc<ResyncStats>>,
    /// Block data sent to each peer, before and after compression.
    wire: BTreeMap<String, Arc<WireCounts>>,
    /// Block data received from each peer, as it came off the wire.
    received: BTreeMap<String, Arc<WireCounts>>,
    /// Each peer's time to a durable ack of a replicated request.
    ack_latency: BTreeMap<String, Arc<LatencyHistogram>>,
    /// The application's requests as primary, over every promotion since the agent started.
    volume_stats: Arc<VolumeStats>,
    request_latency: Arc<RequestLatency>,
    al: Arc<ActivityLog>,
    /// Receiving side shared by replication and resync streams.
    target: Arc<TargetState>,
    applier_stats: Arc<ApplierStats>,
    /// Only one replication stream is applied at a time; a new one waits for the old.
    apply_lock: Arc<tokio::sync::Mutex<()>>,
    mountpoint: PathBuf,
    /// The resource's change-stream position while this node is not primary (resync reads
    /// take numbers from it; a promotion continues from it).
    seq: Arc<std::sync::atomic::AtomicU64>,
    hooks: Hooks,
    /// `tandem resolve --discard-local`: give up this node's changes at the next split brain.
    discard_local: AtomicBool,
    /// Peers resyncing into this copy right now.
    resyncing_from: Mutex<std::collections::BTreeSet<String>>,
    /// How long a session that ended for a passing reason waits before it is offered again.
    retry_after: Duration,
    /// The node's `device_dir`: the stable device paths live here while primary.
    device_dir: PathBuf,
    /// `tandem down`: out of service here (secondary, no replication) until `tandem up`.
    down: AtomicBool,
    /// The resource's records on the agent's event bus (`tandem events`).
    events: Arc<ResourceEvents>,
    /// Split brains detected since the agent started.
    split_brains: AtomicU64,
    /// The node's descriptor holder, if it has one: keeps a primary's connection.
    keeper: Option<Arc<crate::holder::keeper::Keeper>>,
    /// The holder keeps this resource's connection from the previous agent, which was
    /// primary: [`Resource::take_over`] serves it again.
    held_at_start: AtomicBool,
    /// The takeover this agent made, if it made one.
    takeover: Mutex<Option<crate::status::TakeoverStatus>>,
}

/// See [`Resource::latency`].
#[derive(Debug)]
pub struct ResourceLatency {
    pub write: LatencySnapshot,
    pub flush: LatencySnapshot,
    pub ack: BTreeMap<String, LatencySnapshot>,
}

/// What the node's resources share: settings from `[options]` and the event bus.
pub struct NodeShared {
    /// How long a handler may run.
    pub hook_timeout: Duration,
    /// How long a session that ended for a passing reason waits before it is offered again.
    pub connect_retry: Duration,
    pub events: Arc<EventBus>,
    /// The node's descriptor holder (none with `takeover_grace = "0s"` or if it could not
    /// start), and the keys (FUSE mountpoints) it held when the agent started.
    pub keeper: Option<Arc<crate::holder::keeper::Keeper>>,
    pub held: Vec<String>,
}

/// Where a resource's FUSE files are mounted on a node: also the key the descriptor holder
/// keeps its connection under.
pub fn fuse_mountpoint(run_dir: &std::path::Path, resource: &str) -> PathBuf {
    run_dir.join("fuse").join(resource)
}

fn new_generation() -> u64 {
    loop {
        let g: u64 = rand::random();
        if g > BLANK {
            return g;
        }
    }
}

impl Resource {
    /// Opens (creating if needed) the image and metadata of `cfg` on node `me`, and replays
    /// the activity log if this node crashed while primary.
    pub fn open(
        cluster: &str,
        me: &str,
        run_dir: &std::path::Path,
        device_dir: &std::path::Path,
        cfg: &config::Resource,
        node: &NodeShared,
    ) -> Result<Arc<Self>> {
        let (hook_timeout, retry_after) = (node.hook_timeout, node.connect_retry);
        let disk =
            cfg.disks.get(me).ok_or_else(|| anyhow!("resource {} has no disk on node {me}", cfg.name))?;
        let meta = open_or_create_meta(cluster, me, cfg, disk)?;
        let (snapshots, warnings) =
            crate::snapshot::SnapshotStore::open(open_store(cfg, disk)?, &disk.snapshot_dir)
                .with_context(|| format!("resource {}", cfg.name))?;
        for w in warnings {
            warn!(resource = %cfg.name, "{w}");
        }
        let store: Arc<dyn BlockStore> = snapshots.clone();
        let mut meta = meta;
        for p in cfg.peers_of(me) {
            if meta.record().peer(&p).is_none() {
                meta.update(|m| {
                    m.peer_mut(&p);
                })?;
            }
        }
        let mut bitmaps = BTreeMap::new();
        let mut peers = BTreeMap::new();
        let mut resync_stats = BTreeMap::new();
        for p in cfg.peers_of(me) {
            let bm = meta.load_bitmap(&p).with_context(|| format!("resource {}", cfg.name))?;
            bitmaps.insert(p.clone(), Arc::new(Mutex::new(bm)));
            resync_stats.insert(p.clone(), Arc::new(ResyncStats::default()));
            peers.insert(
                p.clone(),
                PeerState {
                    rel: Relation::new(&p),
                    conn: None,
                    session: None,
                    applying: false,
                    streams: CancellationToken::new(),
                    resync_total: 0,
                },
            );
        }
        let was_primary = meta.record().primary;
        // Crash recovery: every block of a hot extent may differ from every peer. The log's
        // extents are in the size it was written with, which the metadata records.
        if was_primary {
            let recorded = meta
                .load_al()
                .inspect_err(|e| warn!(resource = %cfg.name, "{e:#}; treating the whole volume as hot"))
                .ok();
            let mut locked: Vec<_> = bitmaps.values().map(|bm| bm.lock().unwrap()).collect();
            let marked = tandem_replicator::replay_activity_log(
                recorded.as_deref(),
                meta.record().al_extent_size,
                meta.record().size,
                locked.iter_mut().map(|bm| &mut **bm),
            );
            drop(locked);
            // An empty log (a planned restart drained and recorded it so; or an idle
            // primary): by the log's invariant every block that may differ from a peer is
            // in the persisted bitmaps, so nothing more is marked and no side needs to be
            // told a primary crashed.
            let clean = recorded.as_deref().is_some_and(|hot| hot.is_empty());
            if clean {
                info!(resource = %cfg.name, "this node was primary and its activity log is empty: nothing to resync");
            } else {
                warn!(resource = %cfg.name, hot_bytes = marked,
                      "this node was primary when its agent stopped uncleanly: marking its activity log out of sync for every peer");
            }
            let meta_m = Mutex::new(meta);
            persist_all_bitmaps(&meta_m, &bitmaps)?;
            meta = meta_m.into_inner().unwrap();
            meta.update(|m| {
                m.primary = false;
                m.crashed_primary |= !clean;
            })?;
        }
        meta.store_al(&[])?;
        // The log is empty now: new transactions may use the configured extent size.
        meta.update(|m| m.al_extent_size = cfg.al_extent_size)?;
        let seq = Arc::new(std::sync::atomic::AtomicU64::new(meta.record().next_seq.max(1)));
        let meta = Arc::new(Mutex::new(meta));
        let al_store = Arc::new(MetaAl {
            meta: meta.clone(),
            bitmaps: bitmaps.clone(),
            extent_size: cfg.al_extent_size,
            granularity: cfg.bitmap_granularity,
        });
        let al = ActivityLog::new(cfg.al_extent_size, cfg.al_extents.min(AL_MAX_EXTENTS), al_store, &[]);
        let applier_stats = Arc::new(ApplierStats::default());
        let events = ResourceEvents::new(&cfg.name, node.events.clone());
        let r = Arc::new(Self {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            me: me.to_string(),
            target: TargetState::new(store.clone(), applier_stats.clone()),
            store,
            snapshots,
            exposed: Mutex::new(BTreeMap::new()),
            invalid_seen: Mutex::new(Default::default()),
            meta,
            role: tokio::sync::Mutex::new(RoleState::Secondary),
            current: Mutex::new(None),
            devices: Mutex::new(Vec::new()),
            peers: Mutex::new(peers),
            bitmaps,
            wire: resync_stats.keys().map(|p| (p.clone(), Arc::default())).collect(),
            received: resync_stats.keys().map(|p| (p.clone(), Arc::default())).collect(),
            ack_latency: resync_stats.keys().map(|p| (p.clone(), Arc::default())).collect(),
            volume_stats: Arc::default(),
            request_latency: Arc::default(),
            resync_stats,
            al,
            applier_stats,
            apply_lock: Arc::new(tokio::sync::Mutex::new(())),
            mountpoint: fuse_mountpoint(run_dir, &cfg.name),
            seq,
            hooks: Hooks::new(&cfg.name, me, cfg.handlers.clone(), hook_timeout, events.clone()),
            discard_local: AtomicBool::new(false),
            resyncing_from: Mutex::new(Default::default()),
            retry_after,
            device_dir: device_dir.to_path_buf(),
            down: AtomicBool::new(false),
            events,
            split_brains: AtomicU64::new(0),
            keeper: node.keeper.clone(),
            held_at_start: AtomicBool::new(false),
            takeover: Mutex::new(None),
        });
        let key = r.mountpoint.display().to_string();
        match (node.held.contains(&key), &node.keeper) {
            (true, Some(_)) if was_primary => r.held_at_start.store(true, Ordering::SeqCst),
            (true, Some(k)) => {
                warn!(resource = %r.name, "the holder keeps a connection for {key}, but this node was not primary: releasing it");
                if let Err(e) = k.forget(&key) {
                    warn!(resource = %r.name, "{e:#}");
                }
            }
            _ => {}
        }
        if !r.held_at_start.load(Ordering::SeqCst) {
            crate::frontend::prepare_mountpoint(&r.mountpoint)?;
        }
        // Snapshots a killed agent had exposed: their loop devices and FUSE mounts are dead.
        for stale in r.stale_exposures() {
            warn!(resource = %r.name, mountpoint = %stale.display(), "removing a snapshot exposure left by a previous agent");
            crate::frontend::prepare_mountpoint(&stale)?;
            let _ = std::fs::remove_dir(&stale);
        }
        // Links a crashed agent left behind point at loop devices that are gone (or reused).
        device_links::remove(device_dir, &r.name).with_context(|| format!("resource {}", r.name))?;
        Ok(r)
    }

    fn update_meta(&self, f: impl FnOnce(&mut MetaRecord)) -> Result<()> {
        self.meta.lock().unwrap().update(f)
    }

    fn record(&self) -> MetaRecord {
        self.meta.lock().unwrap().record().clone()
    }

    pub fn disk(&self) -> DiskState {
        self.meta.lock().unwrap().record().disk
    }

    fn set_disk(&self, d: DiskState, why: &str) {
        if self.disk() == d {
            return;
        }
        warn!(resource = %self.name, "local disk is now {}: {why}", d.as_str());
        if let Err(e) = self.update_meta(|m| m.disk = d) {
            error!(resource = %self.name, "cannot record disk state: {e:#}");
        }
        self.publish();
    }

    // ---------------------------------------------------------------- events

    /// Publishes on the event bus what changed in the resource's state since it last did
    /// (see `daemon::events`). Called after every change of what `status()` shows; never
    /// while holding one of the resource's locks.
    pub(crate) fn publish(&self) {
        self.events.publish(|| self.status());
    }

    /// The once-a-second tick: changes that are not announced (out-of-sync bytes, a
    /// backlog gone ahead) and the progress of running resyncs.
    pub(crate) fn publish_tick(&self) {
        self.snapshot_tick();
        self.events.tick(|| self.status());
    }

    /// A record that is an event rather than a state, ordered with the state changes.
    fn emit(&self, record: impl FnOnce(&str) -> crate::events::Record) {
        self.events.emit(record);
    }

    pub(crate) fn events(&self) -> &ResourceEvents {
        &self.events
    }

    /// Split brains detected with any peer since the agent started.
    pub fn split_brains(&self) -> u64 {
        self.split_brains.load(Ordering::Relaxed)
    }

    /// Runs and failures of each event handler since the agent started.
    pub fn hook_stats(&self) -> Vec<HookStats> {
        self.hooks.stats()
    }

    /// Whether `tandem down` took the resource out of service here.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    pub fn is_primary(&self) -> bool {
        self.current.lock().unwrap().is_some()
    }

    fn volume(&self) -> Option<Arc<Volume>> {
        self.current.lock().unwrap().as_ref().map(|(v, _)| v.clone())
    }

    pub fn has_peer(&self, node: &str) -> bool {
        self.bitmaps.contains_key(node)
    }

    /// This node's part of the handshake with `peer` for this resource.
    pub fn hello_for(&self, peer: &str) -> ResourceHello {
        let rec = self.record();
        ResourceHello {
            name: self.name.clone(),
            size: self.cfg.size,
            block_size: LOGICAL_BLOCK,
            role: if self.is_primary() { Role::Primary } else { Role::Secondary },
            disk: rec.disk.to_wire(),
            generation: rec.generation(),
            bitmap_uuid: rec.peer(peer).map_or(0, |p| p.bitmap_uuid),
            out_of_sync_bytes: self.bitmaps.get(peer).map_or(0, |b| b.lock().unwrap().dirty_bytes()),
            crashed_primary: rec.crashed_primary,
            generation_started_ms: rec.generation_started_ms,
            after_split_brain: self.cfg.after_split_brain,
            discard_local: self.discard_local.load(Ordering::SeqCst),
        }
    }

    /// What an event handler is told, for an event about `peer` (or the resource).
    fn hook_ctx(&self, peer: Option<&str>) -> HookContext {
        HookContext {
            peer: peer.map(str::to_string),
            role: if self.is_primary() { "primary" } else { "secondary" }.to_string(),
            disk: self.disk().as_str().to_string(),
            extra: Vec::new(),
        }
    }

    fn fire(&self, event: HookEvent, peer: Option<&str>) {
        self.hooks.fire(event, self.hook_ctx(peer));
    }

    /// Writes every bitmap in full (progress record, clean shutdown).
    fn persist_bitmaps(&self) {
        if let Err(e) = persist_all_bitmaps(&self.meta, &self.bitmaps) {
            error!(resource = %self.name, "cannot persist dirty bitmaps: {e}");
        }
    }

    fn conn_of(&self, peer: &str) -> Option<PeerConn> {
        self.peers.lock().unwrap().get(peer).and_then(|p| p.conn.clone())
    }

    /// This node's snapshot schedule for the resource.
    pub fn snapshot_tiers(&self) -> Vec<config::SnapshotTier> {
        self.cfg.disks.get(&self.me).map(|d| d.snapshot_schedule.clone()).unwrap_or_default()
    }

    pub fn peer_names(&self) -> Vec<String> {
        self.bitmaps.keys().cloned().collect()
    }

    // ---------------------------------------------------------------- status

    /// The latency histograms as they stand: application writes and flushes, and each
    /// peer's acks (the metrics export their buckets).
    pub fn latency(&self) -> ResourceLatency {
        ResourceLatency {
            write: self.request_latency.write.snapshot(),
            flush: self.request_latency.flush.snapshot(),
            ack: self.ack_latency.iter().map(|(p, h)| (p.clone(), h.snapshot())).collect(),
        }
    }

    pub fn status(&self) -> ResourceStatus {
        let current = self.current.lock().unwrap().clone();
        let replication: BTreeMap<String, _> = current
            .as_ref()
            .map(|(v, _)| v.peers().into_iter().map(|p| (p.name.clone(), p)).collect())
            .unwrap_or_default();
        let rec = self.record();
        let peers = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .map(|(name, p)| {
                let rep = replication.get(name);
                let progress = self.resync_stats[name].progress();
                let replicating = rep.is_some_and(|r| r.connected) || p.applying;
                let up = p.rel.is_up();
                let replication = match p.rel.phase {
                    _ if rep.is_some_and(|r| r.ahead) => ReplicationState::Ahead,
                    Phase::Source(_) if progress.active || up => ReplicationState::SyncSource,
                    Phase::Target(_) if up => ReplicationState::SyncTarget,
                    Phase::Refused(Refusal::SplitBrain) => ReplicationState::SplitBrain,
                    _ if replicating => ReplicationState::Established,
                    _ => ReplicationState::Off,
                };
                let remote = p.rel.remote.as_ref().filter(|_| up);
                PeerStatus {
                    node: name.clone(),
                    connection: p.rel.connection_state().into(),
                    replication,
                    mode: self.cfg.link_to(name).mode.to_string(),
                    out_of_sync_bytes: self.bitmaps[name].lock().unwrap().dirty_bytes(),
                    peer_role: remote.map(|r| r.role.into()),
                    peer_disk: remote.map(|r| DiskState::from_wire(r.disk)),
                    pending_requests: rep.map_or(0, |r| r.pending_requests),
                    lag_bytes: rep.map_or(0, |r| r.lag_bytes),
                    sent_data_bytes: self.wire[name].data_bytes.get(),
                    sent_wire_bytes: self.wire[name].wire_bytes.get(),
                    received_wire_bytes: self.received[name].wire_bytes.get(),
                    ack_latency: LatencySummary::from(&self.ack_latency[name].snapshot()),
                    lag_secs: rep.map_or(0.0, |r| r.lag.as_secs_f64()),
                    resync: (progress.active || progress.data_bytes_sent > 0 || progress.hash_bytes_sent > 0)
                        .then(|| ResyncStatus::from(progress)),
                    last_error: p.rel.last_error.clone(),
                }
            })
            .collect();
        let a = &self.applier_stats;
        let al = self.al.stats();
        let mut stats = ResourceStats {
            replicated_writes: a.writes.get(),
            replicated_bytes: a.write_bytes.get(),
            replicated_flushes: a.flushes.get(),
            resync_received_bytes: a.resync_bytes.get(),
            checksum_errors: a.checksum_errors.get(),
            protocol_errors: a.protocol_errors.get(),
            standby_io_errors: a.io_errors.get(),
            al_writes: al.transactions,
            al_hot_extents: al.hot as u64,
            split_brains: self.split_brains(),
            handlers: self
                .hook_stats()
                .into_iter()
                .map(|h| HandlerStats {
                    handler: h.event.as_str().to_string(),
                    runs: h.runs,
                    failures: h.failures,
                })
                .collect(),
            ..Default::default()
        };
        let s = &self.volume_stats;
        stats.writes = s.writes.get();
        stats.write_bytes = s.write_bytes.get();
        stats.flushes = s.flushes.get();
        stats.discards = s.discards.get();
        stats.reads = s.reads.get();
        stats.read_bytes = s.read_bytes.get();
        stats.local_io_errors = s.local_io_errors.get();
        stats.write_latency = LatencySummary::from(&self.request_latency.write.snapshot());
        stats.flush_latency = LatencySummary::from(&self.request_latency.flush.snapshot());
        ResourceStatus {
            name: self.name.clone(),
            role: if current.is_some() {
                crate::status::Role::Primary
            } else {
                crate::status::Role::Secondary
            },
            disk: rec.disk,
            device: current.map(|(_, d)| d),
            volumes: {
                let devices = self.devices.lock().unwrap();
                self.cfg
                    .volumes
                    .iter()
                    .filter(|v| !v.name.is_empty())
                    .map(|v| VolumeStatus {
                        name: v.name.clone(),
                        size: v.size,
                        device: devices.iter().find(|(n, _)| *n == v.name).map(|(_, d)| d.clone()),
                    })
                    .collect()
            },
            size: self.cfg.size,
            generation: format!("{:016x}", rec.current_generation),
            down: self.is_down(),
            snapshots: self.snapshot_summary(),
            takeover: self.takeover_status(),
            peers,
            stats,
        }
    }
}

/// The resource's image as a store; a volume group's images as one.
fn open_store(cfg: &config::Resource, disk: &config::Disk) -> Result<Arc<dyn BlockStore>> {
    let ctx = || format!("resource {}", cfg.name);
    if let [only] = cfg.volumes.as_slice() {
        return Ok(Arc::new(
            FileStore::open(&disk.image_for(only), only.size, cfg.allocation()).with_context(ctx)?,
        ));
    }
    let mut parts: Vec<(VolumeLayout, Arc<dyn BlockStore>)> = Vec::new();
    for v in &cfg.volumes {
        let s = FileStore::open(&disk.image_for(v), v.size, cfg.allocation())
            .with_context(|| format!("{}, volume {}", ctx(), v.name))?;
        parts.push((v.clone(), Arc::new(s)));
    }
    Ok(Arc::new(VolumeSet::new(parts)))
}

fn open_or_create_meta(
    cluster: &str,
    me: &str,
    cfg: &config::Resource,
    d: &config::Disk,
) -> Result<MetaFile> {
    let meta_path = &d.meta;
    if meta_path.exists() {
        let m = MetaFile::open(meta_path).with_context(|| format!("resource {}", cfg.name))?;
        check_identity(m.record(), cluster, me, cfg)?;
        for v in &cfg.volumes {
            let image = d.image_for(v);
            if !image.exists() {
                bail!(
                    "resource {}: metadata {} exists but the image {} does not; refusing to create an empty \
                     image under metadata that describes data (move the metadata away to start fresh)",
                    cfg.name,
                    meta_path.display(),
                    image.display()
                );
            }
        }
        return Ok(m);
    }
    // Every image new: all zeroes, like every other brand-new image, so a valid copy
    // (generation BLANK). An image that existed without metadata holds unknown data.
    let mut created = true;
    for v in &cfg.volumes {
        let image = d.image_for(v);
        if !FileStore::create_if_missing(&image, v.size, cfg.allocation())? {
            warn!(resource = %cfg.name, image = %image.display(),
                  "existing image without metadata: marked inconsistent until synced or promoted with --force");
            created = false;
        }
    }
    let (disk, generation) =
        if created { (DiskState::UpToDate, BLANK) } else { (DiskState::Inconsistent, UNKNOWN) };
    MetaFile::create(
        meta_path,
        MetaRecord {
            cluster: cluster.to_string(),
            resource: cfg.name.clone(),
            node: me.to_string(),
            size: cfg.size,
            bitmap_granularity: cfg.bitmap_granularity,
            al_extent_size: cfg.al_extent_size,
            disk,
            primary: false,
            crashed_primary: false,
            next_seq: 1,
            current_generation: generation,
            history: Vec::new(),
            generation_started_ms: 0,
            peers: Vec::new(),
            checksum_resync_requested: false,
        },
    )
}

/// `tandem create-md`: creates the metadata (and, if missing, the image) without an agent.
pub fn create_md(cluster: &str, me: &str, cfg: &config::Resource) -> Result<String> {
    let disk = cfg.disks.get(me).ok_or_else(|| anyhow!("resource {} has no disk on node {me}", cfg.name))?;
    if disk.meta.exists() {
        bail!("{} already exists; move it away first if you really want new metadata", disk.meta.display());
    }
    let m = open_or_create_meta(cluster, me, cfg, disk)?;
    Ok(format!("created {} for {} on {me}: disk {}", disk.meta.display(), cfg.name, m.record().disk.as_str()))
}

fn check_identity(m: &MetaRecord, cluster: &str, me: &str, cfg: &config::Resource) -> Result<()> {
    let mut problems = Vec::new();
    if m.cluster != cluster {
        problems.push(format!("cluster {:?} (config: {cluster:?})", m.cluster));
    }
    if m.resource != cfg.name {
        problems.push(format!("resource {:?} (config: {:?})", m.resource, cfg.name));
    }
    if m.node != me {
        problems.push(format!("node {:?} (config: {me:?})", m.node));
    }
    if m.size != cfg.size {
        problems.push(format!("size {} (config: {})", m.size, cfg.size));
    }
    if m.bitmap_granularity != cfg.bitmap_granularity {
        problems.push(format!(
            "bitmap granularity {} (config: {})",
            m.bitmap_granularity, cfg.bitmap_granularity
        ));
    }
    if !problems.is_empty() {
        bail!("metadata belongs to a different volume: {}", problems.join(", "));
    }
    Ok(())
}
