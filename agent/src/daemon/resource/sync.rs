//! The mechanics of replication and resync with a peer: streams, sessions, the resync
//! source and target tasks. What to do and when is decided by the relation state machine
//! (see `relation.rs`); these functions carry out its actions and report back with events.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use tandem_protocol::{ControlMsg, Generation, ResyncKind, StreamPurpose};
use tandem_replicator::generation::rotate;
use tandem_replicator::relation::{Event, Session};
use tandem_replicator::resync::rate::RateSettings;
use tandem_replicator::resync::source::{ResyncReader, ResyncSource, StoreReader};
use tandem_replicator::{ApplyError, Link, Volume};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{new_generation, Resource};
use crate::daemon::hooks::HookEvent;
use crate::daemon::peer_link::PeerConn;
use crate::events::{Kind, Object, Record, ResyncResult, SyncRole};
use crate::meta::DiskState;
use crate::transport::framed::{spawn_link, FrameReader, FrameWriter};

impl Resource {
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

    fn rate_settings(&self) -> RateSettings {
        RateSettings { max_rate: self.cfg.resync_max_rate, min_rate: self.cfg.resync_min_rate }
    }

    /// The connection and the current session's stream token for `peer`.
    fn session_streams(&self, peer: &str) -> Option<(PeerConn, CancellationToken)> {
        let peers = self.peers.lock().unwrap();
        let p = peers.get(peer)?;
        Some((p.conn.clone()?, p.streams.clone()))
    }

    // ---------------------------------------------------------------- resync source

    /// Runs the resync of `peer` from this node's bitmap for it, reporting its end.
    pub(super) fn start_resync_source(self: &Arc<Self>, peer: &str, checksum: bool) {
        let me = self.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            let mut started = false;
            let r = me.run_resync_source(&peer, checksum, &mut started).await;
            me.persist_bitmaps();
            if let Err(e) = &r {
                warn!(resource = %me.name, peer = %peer, "resync interrupted: {e:#}; it resumes from the bitmap");
                if started {
                    me.emit(|name| Record {
                        peer: Some(peer.clone()),
                        sync_role: Some(SyncRole::Source),
                        result: Some(ResyncResult::Interrupted),
                        reason: Some(format!("{e:#}")),
                        ..Record::new(Kind::ResyncFinished, Object::Peer, name)
                    });
                }
            }
            me.handle(&peer, Event::SourceEnded { result: r.map_err(|e| format!("{e:#}")) });
        });
    }

    /// Sets `started` once the resync has begun (and `resync-started` was reported).
    async fn run_resync_source(
        self: &Arc<Self>,
        peer: &str,
        checksum: bool,
        started: &mut bool,
    ) -> Result<()> {
        let (conn, streams) = self.session_streams(peer).ok_or_else(|| anyhow!("not connected"))?;
        let link = conn
            .open_stream(
                &self.name,
                StreamPurpose::Resync,
                self.cfg.link_to(peer).compression,
                self.wire[peer].clone(),
                streams,
            )
            .await?;
        let bitmap = self.bitmaps[peer].clone();
        let total = bitmap.lock().unwrap().dirty_bytes();
        info!(resource = %self.name, peer, total_bytes = total, checksum, "resync started as source");
        *started = true;
        self.emit(|name| Record {
            peer: Some(peer.to_string()),
            sync_role: Some(SyncRole::Source),
            total: Some(total),
            ..Record::new(Kind::ResyncStarted, Object::Peer, name)
        });
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
        r.map_err(|e| anyhow!(e))?;
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
        self.emit(|name| Record {
            peer: Some(peer.to_string()),
            sync_role: Some(SyncRole::Source),
            done: Some(p.done_bytes),
            total: Some(p.total_bytes),
            result: Some(ResyncResult::Done),
            ..Record::new(Kind::ResyncFinished, Object::Peer, name)
        });
        let mut ctx = self.hook_ctx(Some(peer));
        ctx.extra.extend([
            ("TANDEM_SYNC_ROLE", "source".to_string()),
            ("TANDEM_SYNC_BYTES", p.data_bytes_sent.to_string()),
        ]);
        self.hooks.fire(HookEvent::SyncDone, ctx);
        Ok(())
    }

    // ---------------------------------------------------------------- resync target

    /// Target side: the source starts sending. From now on this copy is inconsistent, and
    /// it carries the source's generation: if the resync is interrupted, the source's
    /// bitmap (which names that generation) is exactly what is still missing.
    pub(super) fn resync_target_started(&self, peer: &str, g: Generation) {
        self.resyncing_from.lock().unwrap().insert(peer.to_string());
        // The changes this node is told to give up are being replaced now.
        self.discard_local.store(false, std::sync::atomic::Ordering::SeqCst);
        let (started_ms, total) = {
            let peers = self.peers.lock().unwrap();
            let p = peers.get(peer);
            (
                p.and_then(|p| p.rel.remote.as_ref()).map_or(0, |r| r.generation_started_ms),
                p.map_or(0, |p| p.resync_total),
            )
        };
        if let Err(e) = self.update_meta(|m| {
            m.disk = DiskState::Inconsistent;
            m.current_generation = g.current;
            m.history = g.history.clone();
            m.generation_started_ms = started_ms;
        }) {
            error!(resource = %self.name, "cannot record the resync start: {e:#}");
        }
        self.emit(|name| Record {
            peer: Some(peer.to_string()),
            sync_role: Some(SyncRole::Target),
            total: Some(total),
            ..Record::new(Kind::ResyncStarted, Object::Peer, name)
        });
        let mut ctx = self.hook_ctx(Some(peer));
        ctx.extra
            .extend([("TANDEM_SYNC_ROLE", "target".to_string()), ("TANDEM_SYNC_BYTES", total.to_string())]);
        self.hooks.fire(HookEvent::SyncStart, ctx);
    }

    /// Target side: every block is here; adopt the source's generation, unless another
    /// source is still resyncing this copy.
    pub(super) async fn complete_resync_target(self: &Arc<Self>, peer: &str, g: Generation) {
        let (up_to_date, failed) = match self.finish_resync_target(peer, &g).await {
            Ok(done) => (done, None),
            Err(e) => {
                error!(resource = %self.name, peer, "cannot complete the resync: {e:#}");
                (false, Some(format!("cannot complete the resync: {e:#}")))
            }
        };
        self.emit(|name| Record {
            peer: Some(peer.to_string()),
            sync_role: Some(SyncRole::Target),
            result: Some(match (&failed, up_to_date) {
                (Some(_), _) => ResyncResult::Interrupted,
                (None, true) => ResyncResult::Done,
                (None, false) => ResyncResult::DoneWaitingForOthers,
            }),
            reason: failed.clone(),
            ..Record::new(Kind::ResyncFinished, Object::Peer, name)
        });
        self.handle(peer, Event::TargetCompleted { up_to_date });
        if !up_to_date {
            return;
        }
        for other in self.peer_names().into_iter().filter(|n| n != peer) {
            self.handle(&other, Event::ResyncedByOther { generation: g.clone() });
        }
        info!(resource = %self.name, peer, "resync complete: disk up to date");
        self.resync_target_done().await;
        self.broadcast_state();
        let mut ctx = self.hook_ctx(Some(peer));
        ctx.extra.push(("TANDEM_SYNC_ROLE", "target".to_string()));
        self.hooks.fire(HookEvent::SyncDone, ctx);
    }

    async fn finish_resync_target(self: &Arc<Self>, peer: &str, g: &Generation) -> Result<bool> {
        let others: Vec<String> = {
            let mut active = self.resyncing_from.lock().unwrap();
            active.remove(peer);
            active.iter().cloned().collect()
        };
        if !others.is_empty() {
            // Another source is still writing into this copy: it is not complete until
            // that resync is, and replicated writes must stay tracked for it.
            info!(resource = %self.name, peer, "resync from {peer} done; still receiving from {}", others.join(", "));
            return Ok(false);
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
        Ok(true)
    }

    // ---------------------------------------------------------------- streams from the peer

    /// A stream the peer opened for this resource. Accepted only within the session it
    /// belongs to, and it ends with the session. A peer that answered this node's offer
    /// may open its streams before the answer, on the control stream, has been read here:
    /// such a stream waits (up to the resource's timeout) for the session to come up.
    pub async fn accept_stream(
        self: &Arc<Self>,
        peer: &str,
        conn: &PeerConn,
        purpose: StreamPurpose,
        w: FrameWriter,
        r: FrameReader,
    ) {
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        let streams = loop {
            let (up, waiting) = {
                let peers = self.peers.lock().unwrap();
                let p = peers.get(peer).filter(|p| p.conn.as_ref().is_some_and(|c| c.id() == conn.id()));
                (
                    p.filter(|p| p.rel.is_up()).map(|p| p.streams.clone()),
                    p.is_some_and(|p| p.rel.session == Session::Offered),
                )
            };
            if up.is_some() || !waiting || tokio::time::Instant::now() > deadline {
                break up;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let Some(streams) = streams else {
            warn!(resource = %self.name, peer, ?purpose, "stream outside an established session ignored");
            return;
        };
        let r = match self.received.get(peer) {
            Some(counts) => r.with_counts(counts.clone()),
            None => r,
        };
        let link = spawn_link(w, r, peer.to_string(), streams.clone());
        match purpose {
            StreamPurpose::Replication => self.accept_replication(peer, link, streams),
            StreamPurpose::Resync => self.accept_resync(peer, link, streams),
        }
    }

    /// Target side: a resync stream from the source.
    fn accept_resync(self: &Arc<Self>, peer: &str, link: Link, streams: CancellationToken) {
        if self.is_primary() {
            warn!(resource = %self.name, peer, "refusing a resync stream while primary");
            return;
        }
        let me = self.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            match tandem_replicator::resync::target::run(&me.target, link).await {
                Ok(()) => info!(resource = %me.name, peer = %peer, "resync stream ended"),
                Err(e) if !streams.is_cancelled() => {
                    me.handle(&peer, Event::StreamFailed { reason: e.to_string() })
                }
                Err(e) => {
                    info!(resource = %me.name, peer = %peer, "resync stream ended with the session: {e}")
                }
            }
        });
    }

    /// Secondary: applies a replication stream opened by primary `peer`.
    fn accept_replication(self: &Arc<Self>, peer: &str, link: Link, streams: CancellationToken) {
        if self.is_primary() {
            warn!(resource = %self.name, peer, "refusing a replication stream while primary");
            return;
        }
        let me = self.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            let _one_at_a_time = me.apply_lock.clone().lock_owned().await;
            // No write of this session is applied yet, and the last stream is done.
            me.snapshot_before_resync(&peer).await;
            if let Some(p) = me.peers.lock().unwrap().get_mut(&peer) {
                p.applying = true;
            }
            me.publish();
            info!(resource = %me.name, peer = %peer, "applying replication stream");
            let applier = tandem_replicator::Applier::new(me.target.clone());
            let r = applier.run(link).await;
            if let Some(p) = me.peers.lock().unwrap().get_mut(&peer) {
                p.applying = false;
            }
            me.publish();
            match r {
                Ok(()) => info!(resource = %me.name, peer = %peer, "replication stream ended"),
                Err(e) => {
                    if let ApplyError::Io(_) = &e {
                        me.set_disk(DiskState::Outdated, &format!("a replicated write failed: {e}"));
                    }
                    if !streams.is_cancelled() {
                        // The session restarts from a known state: the primary marks what
                        // this node did not acknowledge and resyncs it.
                        me.handle(&peer, Event::StreamFailed { reason: e.to_string() });
                    }
                }
            }
        });
    }

    // ---------------------------------------------------------------- replication

    /// Primary: opens a replication stream to `peer` and attaches it to the volume.
    pub(super) async fn start_replication(self: &Arc<Self>, peer: &str) {
        let Some(volume) = self.volume() else { return };
        let Some((conn, streams)) = self.session_streams(peer) else { return };
        let opened = conn
            .open_stream(
                &self.name,
                StreamPurpose::Replication,
                self.cfg.link_to(peer).compression,
                self.wire[peer].clone(),
                streams.clone(),
            )
            .await;
        let link = match opened {
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
        {
            let mut peers = self.peers.lock().unwrap();
            let Some(p) = peers.get_mut(peer) else { return };
            if streams.is_cancelled() || !p.rel.is_up() {
                // The session ended while the stream was being opened.
                drop(peers);
                handle.close("session ended");
                return;
            }
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
                info!(resource = %me.name, peer = %name, "backlog drained: resyncing what the peer missed");
                me.handle(&name, Event::ResyncRequested);
            }
        });
        let (me, name) = (self.clone(), peer.to_string());
        tokio::spawn(async move {
            let reason = handle.closed().await;
            // Ended on purpose (the session or the primary role ended): nothing to report.
            if streams.is_cancelled() || !me.is_primary() {
                return;
            }
            if let Some(p) = me.peers.lock().unwrap().get_mut(&name) {
                p.session = None;
            }
            me.handle(&name, Event::StreamFailed { reason: format!("replication ended: {reason}") });
        });
        let dirty = self.bitmaps[peer].lock().unwrap().count() > 0;
        self.handle(peer, Event::ReplicationAttached { dirty });
    }

    /// A primary goes on without `peer`: the peer holds the current generation plus what
    /// its bitmap records. The first write made without it starts a new generation (not
    /// the loss itself: a primary that writes nothing more has not diverged, so meeting a
    /// standby promoted meanwhile is a clean resync, not a split brain).
    pub(super) fn lose_peer(self: &Arc<Self>, peer: &str) {
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
    /// Over every promotion (the resource's counter, not one volume's): a promotion during
    /// a resync must not look like a burst of application writes.
    fn app_write_bytes(&self) -> u64 {
        self.res.upgrade().map_or(0, |r| r.volume_stats.write_bytes.get())
    }
}
