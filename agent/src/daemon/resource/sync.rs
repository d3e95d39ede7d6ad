//! What happens between this node and a peer for this resource: the decision on connect,
//! replication, and resync in either direction.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use tandem_protocol::{ControlMsg, Generation, ResourceHello, ResyncKind, Role, StreamPurpose};
use tandem_replicator::generation::{decide_with_policy, rotate, SideView, SyncDecision, Verdict, UNKNOWN};
use tandem_replicator::resync::rate::RateSettings;
use tandem_replicator::resync::source::{ResyncReader, ResyncSource, StoreReader};
use tandem_replicator::split_brain::{policy_name, Resolution};
use tandem_replicator::{ApplyError, Link, Volume};
use tracing::{error, info, warn};

use super::{new_generation, ConnState, Resource};
use crate::daemon::hooks::HookEvent;
use crate::daemon::peer_link::PeerConn;
use crate::meta::DiskState;
use crate::transport::close_code;

/// Why a pair may not synchronise automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unrelated,
    BothInconsistent,
    PrimaryWouldBeTarget,
}

/// Where this node stands with a peer after the last connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRole {
    /// Not connected, or not decided yet.
    None,
    InSync,
    /// This node sends a resync; `started` once the resync task runs.
    Source {
        started: bool,
    },
    /// This node receives a resync.
    Target,
    SplitBrain,
    Refused(Refusal),
}

impl Resource {
    fn side_view(&self, peer: &str) -> SideView {
        let rec = self.record();
        let changes = self.bitmaps.get(peer).map_or(0, |b| b.lock().unwrap().dirty_bytes());
        SideView {
            changes,
            generation_started_ms: rec.generation_started_ms,
            discard_local: self.discard_local.load(std::sync::atomic::Ordering::SeqCst),
            policy: self.cfg.after_split_brain,
            node: self.me.clone(),
            generation: rec.generation(),
            bitmap_uuid: rec.peer(peer).map_or(0, |p| p.bitmap_uuid),
            dirty: self.bitmaps.get(peer).is_some_and(|b| b.lock().unwrap().count() > 0),
            disk: rec.disk.to_wire(),
            primary: self.is_primary(),
            crashed_primary: rec.crashed_primary,
        }
    }

    fn remote_view(peer: &str, r: &ResourceHello) -> SideView {
        SideView {
            node: peer.to_string(),
            generation: r.generation.clone(),
            bitmap_uuid: r.bitmap_uuid,
            dirty: r.out_of_sync_bytes > 0,
            disk: r.disk,
            primary: r.role == Role::Primary,
            crashed_primary: r.crashed_primary,
            changes: r.out_of_sync_bytes,
            generation_started_ms: r.generation_started_ms,
            discard_local: r.discard_local,
            policy: r.after_split_brain,
        }
    }

    fn decide_with(&self, peer: &str, remote: &ResourceHello) -> Verdict {
        decide_with_policy(&self.side_view(peer), &Self::remote_view(peer, remote))
    }

    /// Logs a split brain and runs its handler, once per split brain.
    /// `remote_discards`: the peer was told to discard its changes (`resolve`).
    fn report_split_brain(&self, peer: &str, resolution: &Resolution, remote_discards: bool) {
        let first = {
            let mut peers = self.peers.lock().unwrap();
            match peers.get_mut(peer) {
                Some(p) => !std::mem::replace(&mut p.split_brain_notified, true),
                None => false,
            }
        };
        match resolution {
            Resolution::Disconnect(_) if !first => {}
            Resolution::Disconnect(why) => {
                error!(resource = %self.name, peer, "split brain: {why}");
                let mut ctx = self.hook_ctx(Some(peer));
                ctx.extra.push(("TANDEM_SPLIT_BRAIN", "unresolved".into()));
                self.hooks.fire(HookEvent::SplitBrain, ctx);
            }
            Resolution::LocalLoses | Resolution::RemoteLoses => {
                let loser = if *resolution == Resolution::LocalLoses { self.me.as_str() } else { peer };
                let how = if self.discard_local.load(std::sync::atomic::Ordering::SeqCst) || remote_discards {
                    "by `resolve --discard-local`".to_string()
                } else {
                    format!("by after_split_brain = {}", policy_name(self.cfg.after_split_brain))
                };
                warn!(resource = %self.name, peer, "split brain resolved {how}: the changes {loser} made since the split are discarded");
                if first {
                    let mut ctx = self.hook_ctx(Some(peer));
                    ctx.extra.push(("TANDEM_SPLIT_BRAIN", format!("resolved: {loser} discards its changes")));
                    self.hooks.fire(HookEvent::SplitBrain, ctx);
                }
            }
        }
    }

    /// Checked during the handshake: the reason to refuse the connection, if any.
    pub fn precheck(&self, peer: &str, remote: &ResourceHello) -> Result<(), String> {
        if self.admin_down(peer) {
            return Ok(());
        }
        let v = self.decide_with(peer, remote);
        if let Some(r) = &v.split_brain {
            self.report_split_brain(peer, r, remote.discard_local);
        }
        let refusal = match v.decision {
            SyncDecision::SplitBrain => {
                let why = match &v.split_brain {
                    Some(Resolution::Disconnect(why)) => why.clone(),
                    _ => String::new(),
                };
                let msg = format!(
                    "split brain on {}: {} and {peer} both wrote since they last agreed (generations {:016x} and {:016x}); \
                     staying disconnected: {why}",
                    self.name,
                    self.me,
                    self.record().current_generation,
                    remote.generation.current
                );
                Some((SyncRole::SplitBrain, msg))
            }
            SyncDecision::Unrelated => Some((
                SyncRole::Refused(Refusal::Unrelated),
                format!(
                    "{}: {} and {peer} hold unrelated data (no common generation); refusing to sync",
                    self.name, self.me
                ),
            )),
            SyncDecision::BothInconsistent => Some((
                SyncRole::Refused(Refusal::BothInconsistent),
                format!(
                    "{}: neither {} nor {peer} has consistent data; promote one with --force",
                    self.name, self.me
                ),
            )),
            SyncDecision::Target { .. } if self.is_primary() => Some((
                SyncRole::Refused(Refusal::PrimaryWouldBeTarget),
                format!(
                    "{}: {peer}'s data is newer but {} is primary here; demote this node first",
                    self.name, self.me
                ),
            )),
            SyncDecision::Source { .. } if remote.role == Role::Primary => Some((
                SyncRole::Refused(Refusal::PrimaryWouldBeTarget),
                format!(
                    "{}: {}'s data is newer but {peer} is primary; demote {peer} first",
                    self.name, self.me
                ),
            )),
            _ => None,
        };
        if let Some((role, msg)) = refusal {
            error!("{msg}");
            if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
                p.sync = role;
            }
            return Err(msg);
        }
        Ok(())
    }

    pub fn peer_connected(self: &Arc<Self>, conn: PeerConn, remote: ResourceHello) {
        let peer = conn.node.clone();
        if self.admin_down(&peer) {
            info!(resource = %self.name, peer = %peer, "administratively disconnected: not using this connection");
            return;
        }
        let verdict = self.decide_with(&peer, &remote);
        let decision = verdict.decision;
        {
            let mut peers = self.peers.lock().unwrap();
            let Some(p) = peers.get_mut(&peer) else { return };
            p.conn = Some(conn.clone());
            p.state = ConnState::Connected;
            p.remote = Some(remote.clone());
            p.last_error = None;
            if verdict.split_brain.is_none() {
                p.split_brain_notified = false;
            }
            p.sync = match decision {
                SyncDecision::InSync => SyncRole::InSync,
                SyncDecision::Source { .. } => SyncRole::Source { started: false },
                SyncDecision::Target { .. } => SyncRole::Target,
                SyncDecision::SplitBrain => SyncRole::SplitBrain,
                SyncDecision::Unrelated => SyncRole::Refused(Refusal::Unrelated),
                SyncDecision::BothInconsistent => SyncRole::Refused(Refusal::BothInconsistent),
            };
        }
        info!(resource = %self.name, peer = %peer, ?decision, "peer connected ({:?}, {:?})", remote.role, remote.disk);
        self.fire(HookEvent::Connected, Some(&peer));
        if remote.role == Role::Primary && self.is_primary() {
            self.role_conflict(&conn);
            return;
        }
        let other_primary = self.connected_primary(&peer);
        match decision {
            SyncDecision::InSync => {}
            SyncDecision::Source { full } => {
                if full {
                    self.bitmaps[&peer].lock().unwrap().set_all();
                }
                // The resync starts when the target has sent its own bitmap.
            }
            SyncDecision::Target { .. } if remote.role != Role::Primary && other_primary.is_some() => {
                // Only the primary resyncs a node while there is one: its reads are ordered
                // with the writes it replicates to us; a secondary's are not.
                let primary = other_primary.unwrap_or_default();
                info!(resource = %self.name, peer = %peer, "{peer} holds newer data, but {primary} is primary: the resync comes from {primary}");
                if let Some(p) = self.peers.lock().unwrap().get_mut(&peer) {
                    p.sync = SyncRole::None;
                }
            }
            SyncDecision::Target { full } => {
                if self.disk() == DiskState::UpToDate {
                    self.set_disk(DiskState::Outdated, &format!("{peer} holds newer data"));
                }
                self.target.begin_resync();
                if full {
                    let checksum = self.cfg.resync_checksum || self.record().checksum_resync_requested;
                    conn.send_control(ControlMsg::Invalidate { resource: self.name.clone(), checksum });
                } else {
                    self.send_bitmap(&conn);
                }
            }
            _ => {
                conn.close(close_code::HANDSHAKE_REFUSED, "resource cannot sync");
                return;
            }
        }
        if self.is_primary() {
            let me = self.clone();
            tokio::spawn(async move { me.start_replication(&peer).await });
        }
    }

    /// Target side: tell the source which blocks this node has that it lacks.
    pub(super) fn send_bitmap(&self, conn: &PeerConn) {
        let runs = self.bitmaps[&conn.node].lock().unwrap().dirty_runs();
        let mut chunks = runs.chunks(4096).peekable();
        if chunks.peek().is_none() {
            conn.send_control(ControlMsg::Bitmap { resource: self.name.clone(), runs: vec![], last: true });
        }
        while let Some(c) = chunks.next() {
            let last = chunks.peek().is_none();
            conn.send_control(ControlMsg::Bitmap { resource: self.name.clone(), runs: c.to_vec(), last });
        }
    }

    /// Source side: part of the target's bitmap for us.
    pub fn on_bitmap(self: &Arc<Self>, peer: &str, runs: Vec<(u64, u64)>, last: bool) {
        if last && !self.may_serve_resync(peer) {
            return;
        }
        {
            let mut bm = self.bitmaps[peer].lock().unwrap();
            for (off, len) in runs {
                bm.set_range(off, len);
            }
        }
        if last {
            self.start_resync_source(peer, self.cfg.resync_checksum);
        }
    }

    /// Source side: the target discarded its copy and wants everything.
    pub fn on_invalidate(self: &Arc<Self>, peer: &str, checksum: bool) {
        if self.disk() != DiskState::UpToDate {
            warn!(resource = %self.name, peer, "peer asks for a full resync, but this node is not up to date");
            return;
        }
        if !self.may_serve_resync(peer) {
            return;
        }
        info!(resource = %self.name, peer, checksum, "peer invalidated its copy: full resync");
        self.bitmaps[peer].lock().unwrap().set_all();
        if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
            p.sync = SyncRole::Source { started: false };
        }
        self.start_resync_source(peer, checksum || self.cfg.resync_checksum);
    }

    /// A connected peer other than `except` that is primary.
    pub(super) fn connected_primary(&self, except: &str) -> Option<String> {
        self.peers.lock().unwrap().iter().find_map(|(n, p)| {
            (n != except && p.conn.is_some() && p.remote.as_ref().is_some_and(|r| r.role == Role::Primary))
                .then(|| n.clone())
        })
    }

    /// A secondary does not resync a peer while a primary is connected to it: the primary
    /// does (its resync reads are ordered with its writes; a secondary's would race them).
    fn may_serve_resync(&self, peer: &str) -> bool {
        if self.is_primary() {
            return true;
        }
        match self.connected_primary(peer) {
            None => true,
            Some(primary) => {
                info!(resource = %self.name, peer, "not resyncing {peer}: {primary} is primary and resyncs it");
                if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
                    p.sync = SyncRole::None;
                }
                false
            }
        }
    }

    fn rate_settings(&self) -> RateSettings {
        RateSettings { max_rate: self.cfg.resync_max_rate, min_rate: self.cfg.resync_min_rate }
    }

    /// Starts resyncing `peer` from this node's bitmap for it, unless already running.
    pub(super) fn start_resync_source(self: &Arc<Self>, peer: &str, checksum: bool) {
        {
            let mut peers = self.peers.lock().unwrap();
            let Some(p) = peers.get_mut(peer) else { return };
            if p.sync == (SyncRole::Source { started: true }) || p.conn.is_none() {
                return;
            }
            p.sync = SyncRole::Source { started: true };
        }
        let me = self.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            let r = me.run_resync_source(&peer, checksum).await;
            me.persist_bitmaps();
            let mut peers = me.peers.lock().unwrap();
            if let Some(p) = peers.get_mut(&peer) {
                match r {
                    Ok(()) => p.sync = SyncRole::InSync,
                    Err(e) => {
                        warn!(resource = %me.name, peer = %peer, "resync interrupted: {e:#}; it resumes from the bitmap");
                        p.last_error = Some(format!("resync interrupted: {e:#}"));
                        if p.sync == (SyncRole::Source { started: true }) {
                            p.sync = SyncRole::Source { started: false };
                        }
                    }
                }
            }
        });
    }

    async fn run_resync_source(self: &Arc<Self>, peer: &str, checksum: bool) -> Result<()> {
        let Some(conn) = self.conn_of(peer) else { bail!("not connected") };
        let link = conn
            .open_stream(
                &self.name,
                StreamPurpose::Resync,
                self.cfg.link_to(peer).compression,
                self.wire[peer].clone(),
            )
            .await?;
        let bitmap = self.bitmaps[peer].clone();
        let total = bitmap.lock().unwrap().dirty_bytes();
        info!(resource = %self.name, peer, total_bytes = total, checksum, "resync started as source");
        let mut ctx = self.hook_ctx(Some(peer));
        ctx.extra
            .extend([("TANDEM_SYNC_ROLE", "source".to_string()), ("TANDEM_SYNC_BYTES", total.to_string())]);
        self.hooks.fire(HookEvent::SyncStart, ctx);
        conn.send_control(ControlMsg::ResyncStart {
            resource: self.name.clone(),
            kind: ResyncKind { full: false, checksum },
            total_bytes: total,
            generation: self.record().generation(),
        });
        let reader: Arc<dyn ResyncReader> = Arc::new(ResourceReader {
            res: Arc::downgrade(self),
            fallback: StoreReader::with_counter(self.store.clone(), self.seq.clone()),
        });
        let source = ResyncSource {
            reader,
            bitmap,
            checksum,
            rate: self.rate_settings(),
            stats: self.resync_stats[peer].clone(),
        };
        // The bitmap is the progress record: persist it while the resync runs.
        let me = self.clone();
        let persister = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let m = me.clone();
                let _ = tokio::task::spawn_blocking(move || m.persist_bitmaps()).await;
            }
        });
        let r = source.run(link).await;
        persister.abort();
        r.map_err(|e| anyhow::anyhow!(e))?;
        // Everything is on the target's disk: it now holds our generation.
        let rec = self.record();
        let all_clean = self.bitmaps.values().all(|b| b.lock().unwrap().count() == 0);
        self.update_meta(|m| {
            m.peer_mut(peer).bitmap_uuid = 0;
            if all_clean {
                m.crashed_primary = false;
            }
        })?;
        conn.send_control(ControlMsg::ResyncDone {
            resource: self.name.clone(),
            generation: rec.generation(),
        });
        let p = self.resync_stats[peer].progress();
        info!(resource = %self.name, peer, data_bytes = p.data_bytes_sent, hash_bytes = p.hash_bytes_sent,
              equal_bytes = p.equal_bytes, "resync done");
        let mut ctx = self.hook_ctx(Some(peer));
        ctx.extra.extend([
            ("TANDEM_SYNC_ROLE", "source".to_string()),
            ("TANDEM_SYNC_BYTES", p.data_bytes_sent.to_string()),
        ]);
        self.hooks.fire(HookEvent::SyncDone, ctx);
        Ok(())
    }

    /// Target side: the source starts sending. From now on this copy is inconsistent, and
    /// it carries the source's generation: if the resync is interrupted, the source's
    /// bitmap (which names that generation) is exactly what is still missing.
    pub fn on_resync_start(&self, peer: &str, kind: ResyncKind, total: u64, g: Generation) {
        info!(resource = %self.name, peer, total_bytes = total, checksum = kind.checksum, "resync started as target");
        self.target.begin_resync();
        self.resyncing_from.lock().unwrap().insert(peer.to_string());
        // The changes this node is told to give up are being replaced now.
        self.discard_local.store(false, std::sync::atomic::Ordering::SeqCst);
        let started_ms = self.remote_generation_started(peer);
        if let Err(e) = self.update_meta(|m| {
            m.disk = DiskState::Inconsistent;
            m.current_generation = g.current;
            m.history = g.history.clone();
            m.generation_started_ms = started_ms;
        }) {
            error!(resource = %self.name, "cannot record the resync start: {e:#}");
        }
        if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
            p.sync = SyncRole::Target;
            p.split_brain_notified = false;
        }
        let mut ctx = self.hook_ctx(Some(peer));
        ctx.extra
            .extend([("TANDEM_SYNC_ROLE", "target".to_string()), ("TANDEM_SYNC_BYTES", total.to_string())]);
        self.hooks.fire(HookEvent::SyncStart, ctx);
    }

    fn remote_generation_started(&self, peer: &str) -> u64 {
        self.peers
            .lock()
            .unwrap()
            .get(peer)
            .and_then(|p| p.remote.as_ref())
            .map_or(0, |r| r.generation_started_ms)
    }

    /// Target side: every block is here; adopt the source's generation.
    pub fn on_resync_done(self: &Arc<Self>, peer: &str, generation: Generation) {
        let me = self.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            if let Err(e) = me.finish_resync_target(&peer, generation).await {
                error!(resource = %me.name, peer = %peer, "cannot complete the resync: {e:#}");
            }
        });
    }

    async fn finish_resync_target(self: &Arc<Self>, peer: &str, g: Generation) -> Result<()> {
        let others: Vec<String> = {
            let mut active = self.resyncing_from.lock().unwrap();
            active.remove(peer);
            active.iter().cloned().collect()
        };
        if !others.is_empty() {
            // Another source is still writing into this copy: it is not complete until
            // that resync is, and replicated writes must stay tracked for it.
            info!(resource = %self.name, peer, "resync from {peer} done; still receiving from {}", others.join(", "));
            if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
                p.sync = SyncRole::None;
            }
            return Ok(());
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || tandem_replicator::BlockStore::flush(store.as_ref())).await??;
        self.bitmaps[peer].lock().unwrap().clear_all();
        self.update_meta(|m| {
            m.disk = DiskState::UpToDate;
            m.current_generation = g.current;
            m.history = g.history.clone();
            m.peer_mut(peer).bitmap_uuid = 0;
            m.crashed_primary = false;
            m.checksum_resync_requested = false;
        })?;
        self.persist_bitmaps();
        self.target.end_resync();
        for (n, p) in self.peers.lock().unwrap().iter_mut() {
            if n == peer {
                p.sync = SyncRole::InSync;
            } else if p.sync == SyncRole::Target {
                // A resync asked of another peer that never ran (it left it to the
                // primary): we now hold what it holds, or the next connect decides.
                let same = p.remote.as_ref().is_some_and(|r| r.generation.current == g.current);
                p.sync = if same { SyncRole::InSync } else { SyncRole::None };
            }
        }
        info!(resource = %self.name, peer, "resync complete: disk up to date");
        self.broadcast_state();
        let mut ctx = self.hook_ctx(Some(peer));
        ctx.extra.push(("TANDEM_SYNC_ROLE", "target".to_string()));
        self.hooks.fire(HookEvent::SyncDone, ctx);
        Ok(())
    }

    /// Target side: a resync stream from the source.
    pub fn accept_resync(self: &Arc<Self>, peer: &str, conn: PeerConn, link: Link) {
        if self.is_primary() {
            warn!(resource = %self.name, peer, "refusing a resync stream while primary");
            return;
        }
        let me = self.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            match tandem_replicator::resync::target::run(&me.target, link).await {
                Ok(()) => info!(resource = %me.name, peer = %peer, "resync stream ended"),
                Err(e) => {
                    if let Some(p) = me.peers.lock().unwrap().get_mut(&peer) {
                        p.last_error = Some(e.to_string());
                    }
                    let code = if matches!(e, ApplyError::ChecksumMismatch { .. }) {
                        close_code::CHECKSUM
                    } else {
                        close_code::PROTOCOL_ERROR
                    };
                    conn.close(code, &e.to_string());
                }
            }
        });
    }

    /// `tandem invalidate`: discard this node's copy and take a full resync from a peer.
    pub fn invalidate(self: &Arc<Self>, checksum: bool) -> Result<String> {
        if self.is_primary() {
            bail!("refusing to invalidate {}: this node is primary", self.name);
        }
        self.update_meta(|m| {
            m.disk = DiskState::Inconsistent;
            m.current_generation = UNKNOWN;
            m.checksum_resync_requested = checksum;
        })?;
        self.target.begin_resync();
        let conns: Vec<PeerConn> = {
            let mut peers = self.peers.lock().unwrap();
            peers
                .values_mut()
                .filter(|p| p.conn.is_some() && !p.admin_down)
                .filter(|p| {
                    p.remote.as_ref().is_some_and(|r| DiskState::from_wire(r.disk) == DiskState::UpToDate)
                })
                .take(1)
                .filter_map(|p| {
                    p.sync = SyncRole::Target;
                    p.conn.clone()
                })
                .collect()
        };
        match conns.first() {
            Some(c) => {
                c.send_control(ControlMsg::Invalidate { resource: self.name.clone(), checksum });
                Ok(format!(
                    "{}: local copy invalidated; full resync{} from {}",
                    self.name,
                    if checksum { " (checksum-based)" } else { "" },
                    c.node
                ))
            }
            None => Ok(format!(
                "{}: local copy invalidated; a full resync starts when an up-to-date peer connects",
                self.name
            )),
        }
    }

    /// `tandem resync`: start resyncing every connected peer with out-of-sync blocks.
    pub fn request_resync(self: &Arc<Self>) -> Result<String> {
        if self.disk() != DiskState::UpToDate {
            bail!("{}: this node is not up to date; it cannot be a resync source", self.name);
        }
        let peers: Vec<String> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, p)| {
                p.conn.is_some() && !p.admin_down && self.bitmaps[*n].lock().unwrap().count() > 0
            })
            .map(|(n, _)| n.clone())
            .collect();
        if peers.is_empty() {
            return Ok(format!("{}: no connected peer has out-of-sync blocks", self.name));
        }
        for p in &peers {
            if let Some(c) = self.conn_of(p) {
                // The peer learns it is behind, starts tracking the replicated writes it
                // applies (so no older resync copy overwrites them) and answers with its
                // bitmap; the resync starts on that answer, never before the tracking.
                c.send_control(ControlMsg::ResourceState(self.hello_for(p)));
            }
        }
        Ok(format!("{}: resync started to {}", self.name, peers.join(", ")))
    }

    // ---------------------------------------------------------------- replication

    /// Primary: opens a replication stream to `peer` and attaches it to the volume.
    pub(super) async fn start_replication(self: &Arc<Self>, peer: &str) {
        let Some(volume) = self.volume() else { return };
        let Some(conn) = self.conn_of(peer) else { return };
        let link = match conn
            .open_stream(
                &self.name,
                StreamPurpose::Replication,
                self.cfg.link_to(peer).compression,
                self.wire[peer].clone(),
            )
            .await
        {
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
        if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
            p.session = Some(handle.clone());
        }
        info!(resource = %self.name, peer, "replication established");
        // A peer left behind by a full backlog catches up by a resync once it has drained.
        let (me, h, name) = (self.clone(), handle.clone(), peer.to_string());
        let mut drained = handle.backlog_drained();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = drained.changed() => if r.is_err() { return },
                    _ = h.closed() => return,
                }
                if let Some(c) = me.conn_of(&name) {
                    info!(resource = %me.name, peer = %name, "backlog drained: resyncing what the peer missed");
                    c.send_control(ControlMsg::ResourceState(me.hello_for(&name)));
                }
            }
        });
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
            if !still_primary {
                return;
            }
            // We go on without the peer: a new generation; the old one names what the peer
            // has, plus what its bitmap records.
            me.lose_peer(&peer);
            if let Some(c) = me.conn_of(&peer) {
                if c.id() == conn.id() {
                    c.close(close_code::TIMEOUT, &format!("replication ended: {reason}"));
                }
            }
        });
    }

    /// A primary goes on without `peer`: the peer holds the current generation plus what
    /// its bitmap records. The first write made without it starts a new generation (not
    /// the loss itself: a primary that writes nothing more has not diverged, so meeting a
    /// standby promoted meanwhile is a clean resync, not a split brain).
    fn lose_peer(self: &Arc<Self>, peer: &str) {
        let r = self.update_meta(|m| {
            let current = m.current_generation;
            let p = m.peer_mut(peer);
            if p.bitmap_uuid == 0 {
                p.bitmap_uuid = current;
            }
        });
        if let Err(e) = r {
            error!(resource = %self.name, "cannot record the peer's bitmap generation: {e:#}");
        }
        if let Some(v) = self.volume() {
            let me = Arc::downgrade(self);
            v.before_next_write(Box::new(move || {
                let Some(me) = me.upgrade() else { return Ok(()) };
                me.update_meta(|m| {
                    rotate_generation(m);
                })
                .map_err(|e| std::io::Error::other(format!("cannot record a new data generation: {e:#}")))?;
                info!(resource = %me.name, generation = %format!("{:016x}", me.record().current_generation),
                      "first write without a peer: new data generation");
                me.broadcast_state();
                Ok(())
            }));
        }
        self.persist_bitmaps();
        self.broadcast_state();
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
            let applier = tandem_replicator::Applier::new(me.target.clone());
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
}

/// Starts a new generation in the record; returns the old one.
pub(super) fn rotate_generation(m: &mut crate::meta::MetaRecord) -> u64 {
    let mut g = m.generation();
    let old = rotate(&mut g, new_generation());
    m.current_generation = g.current;
    m.history = g.history;
    m.generation_started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    old
}

/// Reads for a resync through the volume while this node is primary (ordered with the
/// application's writes), from the store otherwise.
struct ResourceReader {
    res: std::sync::Weak<Resource>,
    fallback: StoreReader,
}

impl ResyncReader for ResourceReader {
    fn read_at_seq(&self, offset: u64, len: u64) -> std::io::Result<(u64, bytes::Bytes)> {
        match self.res.upgrade().and_then(|r| r.volume()) {
            Some(v) => Volume::read_at_seq(&v, offset, len),
            None => self.fallback.read_at_seq(offset, len),
        }
    }
    fn app_write_bytes(&self) -> u64 {
        self.res.upgrade().and_then(|r| r.volume()).map_or(0, |v| v.app_write_bytes())
    }
}
