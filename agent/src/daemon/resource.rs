//! One replicated resource on this node: its image, metadata, role, and what it knows about
//! each peer. Role changes are serialised by one async lock; status reads never wait for a
//! role change in progress.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use tandem_protocol::{ControlMsg, PeerView, ResourceHello, Role};
use tandem_replicator::{
    Applier, ApplierStats, ApplyError, DirtyBitmap, Link, PeerConfig, PeerHandle, Volume,
};
use tracing::{error, info, warn};

use crate::config;
use crate::daemon::peer_link::PeerConn;
use crate::frontend::{Frontend, FuseLoop};
use crate::meta::{DiskState, MetaFile, MetaRecord};
use crate::status::{PeerStatus, ResourceStats, ResourceStatus};
use crate::storage::FileStore;
use crate::transport::close_code;

/// The logical block size the volume exposes (the loop device's sector size).
pub const LOGICAL_BLOCK: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected,
    StandAlone,
}

impl ConnState {
    fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::StandAlone => "standalone",
        }
    }
}

struct PeerState {
    conn: Option<PeerConn>,
    state: ConnState,
    remote: Option<ResourceHello>,
    /// Primary side: the replication session to this peer.
    session: Option<PeerHandle>,
    /// Secondary side: applying this peer's stream.
    applying: bool,
    last_error: Option<String>,
}

enum RoleState {
    Secondary,
    Primary { volume: Arc<Volume>, frontend: Box<FuseLoop> },
}

pub struct Resource {
    pub name: String,
    cfg: config::Resource,
    me: String,
    store: Arc<FileStore>,
    meta: Mutex<MetaFile>,
    role: tokio::sync::Mutex<RoleState>,
    /// Snapshot of the role for readers that must not wait: (volume, device) when primary.
    current: Mutex<Option<(Arc<Volume>, String)>>,
    peers: Mutex<BTreeMap<String, PeerState>>,
    bitmaps: BTreeMap<String, Arc<Mutex<DirtyBitmap>>>,
    applier_stats: Arc<ApplierStats>,
    /// Only one replication stream is applied at a time; a new one waits for the old.
    apply_lock: Arc<tokio::sync::Mutex<()>>,
    mountpoint: PathBuf,
}

impl Resource {
    /// Opens (creating if needed) the image and metadata of `cfg` on node `me`.
    pub fn open(
        cluster: &str,
        me: &str,
        run_dir: &std::path::Path,
        cfg: &config::Resource,
    ) -> Result<Arc<Self>> {
        let disk =
            cfg.disks.get(me).ok_or_else(|| anyhow!("resource {} has no disk on node {me}", cfg.name))?;
        let created = FileStore::create_if_missing(&disk.image, cfg.size, cfg.allocate_full)?;
        let store = Arc::new(
            FileStore::open(&disk.image, cfg.size).with_context(|| format!("resource {}", cfg.name))?,
        );
        let meta = if disk.meta.exists() {
            let m = MetaFile::open(&disk.meta).with_context(|| format!("resource {}", cfg.name))?;
            check_identity(m.record(), cluster, me, cfg)?;
            m
        } else {
            // A brand-new image is all zeroes, like every other brand-new image: it is a
            // valid copy. An image that existed without metadata holds unknown data.
            let disk_state = if created { DiskState::UpToDate } else { DiskState::Inconsistent };
            if !created {
                warn!(resource = %cfg.name, image = %disk.image.display(),
                      "existing image without metadata: marked inconsistent until synced or promoted with --force");
            }
            MetaFile::create(
                &disk.meta,
                MetaRecord {
                    cluster: cluster.to_string(),
                    resource: cfg.name.clone(),
                    node: me.to_string(),
                    size: cfg.size,
                    bitmap_granularity: cfg.bitmap_granularity,
                    disk: disk_state,
                    primary: false,
                    next_seq: 1,
                    peers: Vec::new(),
                },
            )?
        };
        let mut bitmaps = BTreeMap::new();
        let mut peers = BTreeMap::new();
        for p in cfg.peers_of(me) {
            let mut bm = DirtyBitmap::new(cfg.size, cfg.bitmap_granularity);
            // Without a persisted bitmap, a peer we know is missing writes needs everything.
            if meta.record().peers.iter().any(|m| m.name == p && m.out_of_sync) {
                bm.set_all();
            }
            bitmaps.insert(p.clone(), Arc::new(Mutex::new(bm)));
            peers.insert(
                p,
                PeerState {
                    conn: None,
                    state: ConnState::Connecting,
                    remote: None,
                    session: None,
                    applying: false,
                    last_error: None,
                },
            );
        }
        if meta.record().primary {
            warn!(resource = %cfg.name, "this node was primary when its agent stopped uncleanly; starting as secondary");
        }
        let r = Arc::new(Self {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            me: me.to_string(),
            store,
            meta: Mutex::new(meta),
            role: tokio::sync::Mutex::new(RoleState::Secondary),
            current: Mutex::new(None),
            peers: Mutex::new(peers),
            bitmaps,
            applier_stats: Arc::new(ApplierStats::default()),
            apply_lock: Arc::new(tokio::sync::Mutex::new(())),
            mountpoint: run_dir.join("fuse").join(&cfg.name),
        });
        r.update_meta(|m| m.primary = false)?;
        crate::frontend::prepare_mountpoint(&r.mountpoint)?;
        Ok(r)
    }

    fn update_meta(&self, f: impl FnOnce(&mut MetaRecord)) -> Result<()> {
        self.meta.lock().unwrap().update(f)
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
    }

    pub fn is_primary(&self) -> bool {
        self.current.lock().unwrap().is_some()
    }

    /// This node's part of the handshake for this resource.
    pub fn hello(&self) -> ResourceHello {
        ResourceHello {
            name: self.name.clone(),
            size: self.cfg.size,
            block_size: LOGICAL_BLOCK,
            role: if self.is_primary() { Role::Primary } else { Role::Secondary },
            disk: self.disk().to_wire(),
        }
    }

    pub fn has_peer(&self, node: &str) -> bool {
        self.bitmaps.contains_key(node)
    }

    fn broadcast_state(&self) {
        let hello = self.hello();
        for p in self.peers.lock().unwrap().values() {
            if let Some(c) = &p.conn {
                c.send_control(ControlMsg::ResourceState(hello.clone()));
            }
        }
    }

    /// Records whether a peer is missing writes, so a restart does not forget it.
    fn persist_peer_out_of_sync(&self, peer: &str) {
        let dirty = self.bitmaps[peer].lock().unwrap().count() > 0;
        if let Err(e) = self.update_meta(|m| m.peer_mut(peer).out_of_sync = dirty) {
            error!(resource = %self.name, "cannot record peer state: {e:#}");
        }
    }

    // ---------------------------------------------------------------- connection events

    pub fn peer_connected(self: &Arc<Self>, conn: PeerConn, remote: ResourceHello) {
        let peer = conn.node.clone();
        {
            let mut peers = self.peers.lock().unwrap();
            let Some(p) = peers.get_mut(&peer) else {
                return;
            };
            p.conn = Some(conn.clone());
            p.state = ConnState::Connected;
            p.remote = Some(remote.clone());
            p.last_error = None;
        }
        info!(resource = %self.name, peer = %peer, "peer connected ({:?}, {:?})", remote.role, remote.disk);
        if remote.role == Role::Primary && self.is_primary() {
            self.role_conflict(&conn);
            return;
        }
        if self.is_primary() {
            let me = self.clone();
            tokio::spawn(async move { me.start_replication(&peer).await });
        }
    }

    fn role_conflict(&self, conn: &PeerConn) {
        let reason = format!("resource {}: both {} and {} are primary", self.name, self.me, conn.node);
        error!("{reason}; disconnecting");
        conn.close(close_code::ROLE_CONFLICT, &reason);
    }

    pub fn peer_disconnected(&self, peer: &str, conn_id: usize, reason: &str, refused: bool) {
        let mut peers = self.peers.lock().unwrap();
        let Some(p) = peers.get_mut(peer) else { return };
        if p.conn.as_ref().is_some_and(|c| c.id() != conn_id) {
            return; // a newer connection already replaced this one
        }
        p.conn = None;
        p.remote = None;
        p.state = if refused { ConnState::StandAlone } else { ConnState::Connecting };
        p.last_error = Some(reason.to_string());
    }

    /// A connection attempt was refused before it could be established.
    pub fn peer_refused(&self, peer: &str, reason: &str) {
        let mut peers = self.peers.lock().unwrap();
        if let Some(p) = peers.get_mut(peer) {
            if p.conn.is_none() {
                p.state = ConnState::StandAlone;
                p.last_error = Some(reason.to_string());
            }
        }
    }

    pub fn on_remote_state(&self, peer: &str, remote: ResourceHello) {
        let conn = {
            let mut peers = self.peers.lock().unwrap();
            let Some(p) = peers.get_mut(peer) else { return };
            p.remote = Some(remote.clone());
            p.conn.clone()
        };
        info!(resource = %self.name, peer, "peer is now {:?}/{:?}", remote.role, remote.disk);
        if remote.role == Role::Primary && self.is_primary() {
            if let Some(c) = conn {
                self.role_conflict(&c);
            }
        }
    }

    pub fn on_peer_view(&self, peer: &str, view: PeerView) {
        let told = DiskState::from_wire(view.your_disk);
        let mine = self.disk();
        if self.is_primary() {
            return;
        }
        match (mine, told) {
            (DiskState::UpToDate, DiskState::Outdated | DiskState::Inconsistent) => self.set_disk(
                told,
                &format!(
                    "primary {peer} went on without this node ({} bytes out of sync)",
                    view.out_of_sync_bytes
                ),
            ),
            (DiskState::Outdated, DiskState::Inconsistent) => {
                self.set_disk(told, &format!("primary {peer} reports this copy inconsistent"))
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------- replication

    /// Primary: opens a replication stream to `peer` and attaches it to the volume.
    async fn start_replication(self: &Arc<Self>, peer: &str) {
        let Some((volume, _)) = self.current.lock().unwrap().clone() else {
            return;
        };
        let Some(conn) = self.peers.lock().unwrap().get(peer).and_then(|p| p.conn.clone()) else {
            return;
        };
        let link = match conn.open_replication(&self.name).await {
            Ok(l) => l,
            Err(e) => {
                warn!(resource = %self.name, peer, "cannot open replication stream: {e:#}");
                return;
            }
        };
        let handle = match volume.attach_peer(peer, link) {
            Ok(h) => h,
            Err(e) => {
                info!(resource = %self.name, peer, "not attaching: {e}");
                return;
            }
        };
        let oos = self.bitmaps[peer].lock().unwrap().dirty_bytes();
        conn.send_control(ControlMsg::PeerView(PeerView {
            resource: self.name.clone(),
            your_disk: if oos > 0 {
                tandem_protocol::DiskState::Outdated
            } else {
                tandem_protocol::DiskState::UpToDate
            },
            out_of_sync_bytes: oos,
        }));
        if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
            p.session = Some(handle.clone());
        }
        info!(resource = %self.name, peer, out_of_sync_bytes = oos, "replication established");
        let me = self.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            let reason = handle.closed().await;
            let still_primary = me.is_primary();
            if let Some(p) = me.peers.lock().unwrap().get_mut(&peer) {
                p.session = None;
                if still_primary {
                    p.last_error = Some(format!("replication ended: {reason}"));
                }
            }
            me.persist_peer_out_of_sync(&peer);
            // If we go on as primary, make the peer reconnect and learn it is outdated.
            if still_primary {
                if let Some(c) = me.peers.lock().unwrap().get(&peer).and_then(|p| p.conn.clone()) {
                    if c.id() == conn.id() {
                        c.close(close_code::TIMEOUT, &format!("replication ended: {reason}"));
                    }
                }
            }
        });
    }

    /// Secondary: applies a replication stream opened by primary `peer`.
    pub fn accept_replication(self: &Arc<Self>, peer: &str, conn: PeerConn, link: Link) {
        if self.is_primary() {
            self.role_conflict(&conn);
            return;
        }
        let me = self.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            let _one_at_a_time = me.apply_lock.clone().lock_owned().await;
            if let Some(p) = me.peers.lock().unwrap().get_mut(&peer) {
                p.applying = true;
            }
            info!(resource = %me.name, peer = %peer, "applying replication stream");
            let applier = Applier::new(me.store.clone(), me.applier_stats.clone());
            let r = applier.run(link).await;
            if let Some(p) = me.peers.lock().unwrap().get_mut(&peer) {
                p.applying = false;
                if let Err(e) = &r {
                    p.last_error = Some(e.to_string());
                }
            }
            match r {
                Ok(()) => info!(resource = %me.name, peer = %peer, "replication stream ended"),
                Err(e) => {
                    let code = match &e {
                        ApplyError::ChecksumMismatch { .. } => close_code::CHECKSUM,
                        ApplyError::Io(_) => {
                            me.set_disk(DiskState::Outdated, &format!("a replicated write failed: {e}"));
                            close_code::PROTOCOL_ERROR
                        }
                        _ => close_code::PROTOCOL_ERROR,
                    };
                    // Drop the connection; the dialer re-establishes it.
                    conn.close(code, &e.to_string());
                }
            }
        });
    }

    // ---------------------------------------------------------------- role changes

    pub async fn promote(self: &Arc<Self>, force: bool) -> Result<String> {
        let mut role = self.role.lock().await;
        if matches!(*role, RoleState::Primary { .. }) {
            return Ok(format!("{} is already primary here", self.name));
        }
        let primary_peer = self.peers.lock().unwrap().iter().find_map(|(n, p)| {
            (p.conn.is_some() && p.remote.as_ref().is_some_and(|r| r.role == Role::Primary))
                .then(|| n.clone())
        });
        if let Some(n) = primary_peer {
            bail!("refusing to promote {}: peer {n} is primary (demote it first)", self.name);
        }
        let disk = self.disk();
        if disk != DiskState::UpToDate && !force {
            bail!(
                "refusing to promote {}: the local disk is {} (it may lack writes the last primary made); \
                 use --force only if you know this copy is the one to keep",
                self.name,
                disk.as_str()
            );
        }
        if disk != DiskState::UpToDate {
            warn!(resource = %self.name, "forced promotion of a {} disk: every peer will need a full resync", disk.as_str());
            for (peer, bm) in &self.bitmaps {
                bm.lock().unwrap().set_all();
                self.update_meta(|m| m.peer_mut(peer).out_of_sync = true)?;
            }
            self.update_meta(|m| m.disk = DiskState::UpToDate)?;
        }
        // Peers not connected now will miss what we write next: remember that durably
        // before the first write can happen.
        let absent: Vec<String> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.conn.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        let first_seq = self.meta.lock().unwrap().record().next_seq;
        self.update_meta(|m| {
            m.primary = true;
            for p in &absent {
                m.peer_mut(p).out_of_sync = true;
            }
        })?;
        let peers = self
            .bitmaps
            .iter()
            .map(|(n, bm)| PeerConfig { name: n.clone(), mode: self.cfg.mode, bitmap: bm.clone() })
            .collect();
        let volume = Volume::new(self.store.clone(), peers, first_seq, self.cfg.timeout);
        let (v, mp) = (volume.clone(), self.mountpoint.clone());
        let frontend = match tokio::task::spawn_blocking(move || FuseLoop::start(v, &mp)).await? {
            Ok(f) => Box::new(f),
            Err(e) => {
                self.update_meta(|m| m.primary = false)?;
                return Err(e.context(format!("cannot start the device for {}", self.name)));
            }
        };
        let device = frontend.device().to_string();
        *self.current.lock().unwrap() = Some((volume.clone(), device.clone()));
        *role = RoleState::Primary { volume, frontend };
        drop(role);
        info!(resource = %self.name, device = %device, "promoted to primary");
        self.broadcast_state();
        let connected: Vec<String> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.conn.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for p in connected {
            self.start_replication(&p).await;
        }
        Ok(format!("{} is primary on {}; device {device}", self.name, self.me))
    }

    pub async fn demote(self: &Arc<Self>) -> Result<String> {
        let mut role = self.role.lock().await;
        let RoleState::Primary { volume, frontend } = std::mem::replace(&mut *role, RoleState::Secondary)
        else {
            return Ok(format!("{} is already secondary here", self.name));
        };
        let device = frontend.device().to_string();
        let stopped = tokio::task::spawn_blocking(move || frontend.stop()).await?;
        if let Err((frontend, e)) = stopped {
            *role = RoleState::Primary { volume, frontend };
            return Err(e.context(format!("cannot demote {}", self.name)));
        }
        *self.current.lock().unwrap() = None;
        // A last barrier so every peer holds everything before we let go.
        if let Err(e) = volume.submit_flush().await {
            warn!(resource = %self.name, "final flush failed: {e}");
        }
        let sessions: Vec<(String, PeerHandle)> = self
            .peers
            .lock()
            .unwrap()
            .iter_mut()
            .filter_map(|(n, p)| p.session.take().map(|s| (n.clone(), s)))
            .collect();
        for (_, s) in &sessions {
            s.close("primary demoted");
        }
        for (_, s) in &sessions {
            s.closed().await;
        }
        let next_seq = volume.next_seq();
        let dirty: Vec<(String, bool)> =
            self.bitmaps.iter().map(|(n, b)| (n.clone(), b.lock().unwrap().count() > 0)).collect();
        self.update_meta(|m| {
            m.primary = false;
            m.next_seq = next_seq;
            for (n, d) in &dirty {
                m.peer_mut(n).out_of_sync = *d;
            }
        })?;
        drop(role);
        info!(resource = %self.name, device = %device, "demoted to secondary");
        self.broadcast_state();
        Ok(format!("{} is secondary on {}; device {device} removed", self.name, self.me))
    }

    /// Agent shutdown: demote if possible; if the device is in use, tear it down anyway
    /// (the filesystem on it will see I/O errors) after making peers durable.
    pub async fn shutdown(self: &Arc<Self>) {
        if !self.is_primary() {
            return;
        }
        match self.demote().await {
            Ok(m) => info!("{m}"),
            Err(e) => {
                error!(resource = %self.name, "shutting down while primary and in use: {e:#}");
                let mut role = self.role.lock().await;
                if let RoleState::Primary { volume, frontend } =
                    std::mem::replace(&mut *role, RoleState::Secondary)
                {
                    let _ = volume.submit_flush().await;
                    *self.current.lock().unwrap() = None;
                    drop(frontend); // detaches the loop device (lazily if open) and unmounts FUSE
                    let _ = self.update_meta(|m| m.primary = false);
                }
            }
        }
    }

    // ---------------------------------------------------------------- status

    pub fn status(&self) -> ResourceStatus {
        let current = self.current.lock().unwrap().clone();
        let replication: BTreeMap<String, _> = current
            .as_ref()
            .map(|(v, _)| v.peers().into_iter().map(|p| (p.name.clone(), p)).collect())
            .unwrap_or_default();
        let peers = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .map(|(name, p)| {
                let rep = replication.get(name);
                PeerStatus {
                    node: name.clone(),
                    connection: p.state.as_str().to_string(),
                    replication: if rep.is_some_and(|r| r.connected) || p.applying {
                        "established"
                    } else {
                        "off"
                    }
                    .to_string(),
                    mode: self.cfg.mode.to_string(),
                    out_of_sync_bytes: self.bitmaps[name].lock().unwrap().dirty_bytes(),
                    peer_role: p.remote.as_ref().map(|r| match r.role {
                        Role::Primary => "primary".to_string(),
                        Role::Secondary => "secondary".to_string(),
                    }),
                    peer_disk: p.remote.as_ref().map(|r| DiskState::from_wire(r.disk).as_str().to_string()),
                    pending_requests: rep.map_or(0, |r| r.pending_requests),
                    last_error: p.last_error.clone(),
                }
            })
            .collect();
        let a = &self.applier_stats;
        let mut stats = ResourceStats {
            replicated_writes: a.writes.get(),
            replicated_bytes: a.write_bytes.get(),
            replicated_flushes: a.flushes.get(),
            checksum_errors: a.checksum_errors.get(),
            protocol_errors: a.protocol_errors.get(),
            standby_io_errors: a.io_errors.get(),
            ..Default::default()
        };
        if let Some((v, _)) = &current {
            let s = &v.stats;
            stats.writes = s.writes.get();
            stats.write_bytes = s.write_bytes.get();
            stats.flushes = s.flushes.get();
            stats.discards = s.discards.get();
            stats.reads = s.reads.get();
            stats.local_io_errors = s.local_io_errors.get();
        }
        ResourceStatus {
            name: self.name.clone(),
            role: if current.is_some() { "primary" } else { "secondary" }.to_string(),
            disk: self.disk().as_str().to_string(),
            device: current.map(|(_, d)| d),
            size: self.cfg.size,
            peers,
            stats,
        }
    }
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
    if !problems.is_empty() {
        bail!("metadata belongs to a different volume: {}", problems.join(", "));
    }
    Ok(())
}
