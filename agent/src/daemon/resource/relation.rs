//! Where the resource meets its relation state machines (`tandem_replicator::relation`):
//! every event about a peer — a message, a stream ending, an administrator's command, a
//! role change — goes through [`Resource::handle`], which takes one snapshot of this
//! node's side, runs the machine's step and carries out the actions it returns, in order.
//! Nothing else changes a relation.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Result};
use tandem_protocol::{ControlMsg, Generation, ResourceHello, ResyncKind};
use tandem_replicator::generation::{SyncDecision, UNKNOWN};
use tandem_replicator::relation::{step, Action, Event, Facts, Phase, Refusal, Report};
use tandem_replicator::split_brain::{policy_name, Resolution};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::Resource;
use crate::daemon::hooks::HookEvent;
use crate::daemon::peer_link::PeerConn;
use crate::events::{Kind, Object, Record, ResyncResult, SplitBrainResolution, SyncRole};
use crate::meta::DiskState;

impl Resource {
    /// Delivers `event` to the relation with `peer` and carries out what it decides.
    pub(super) fn handle(self: &Arc<Self>, peer: &str, event: Event) {
        // Our side, snapshotted once: offers carry exactly what the decision saw.
        let hello = self.hello_for(peer);
        let checksum_full_resync = self.cfg.resync_checksum || self.record().checksum_resync_requested;
        let actions = {
            let mut peers = self.peers.lock().unwrap();
            let other_primary = peers
                .iter()
                .find(|(n, p)| n.as_str() != peer && p.rel.remote_primary())
                .map(|(n, _)| n.clone());
            let Some(p) = peers.get_mut(peer) else { return };
            let facts = Facts {
                node: self.me.clone(),
                hello,
                other_primary,
                checksum_resync: self.cfg.resync_checksum,
                checksum_full_resync,
            };
            debug!(resource = %self.name, peer, ?event, "relation event");
            step(&mut p.rel, &facts, event)
        };
        for a in actions {
            self.execute(peer, a);
        }
        // What the step and its actions changed, as one set of records after them.
        self.publish();
    }

    fn execute(self: &Arc<Self>, peer: &str, action: Action) {
        debug!(resource = %self.name, peer, ?action, "relation action");
        match action {
            Action::SendOffer { answer, hello } => self.send(peer, ControlMsg::ResourceUp { hello, answer }),
            Action::SendWithdraw { reason, declines_offer } => self
                .send(peer, ControlMsg::ResourceDown { resource: self.name.clone(), reason, declines_offer }),
            Action::SendState => self.send(peer, ControlMsg::ResourceState(self.hello_for(peer))),
            Action::SendBitmap => {
                if let Some(c) = self.conn_of(peer) {
                    self.send_bitmap(&c);
                }
            }
            Action::SendInvalidate { checksum } => {
                self.send(peer, ControlMsg::Invalidate { resource: self.name.clone(), checksum })
            }
            Action::BeginTracking => {
                // Before the source can send anything: keep the copy as it is.
                self.snapshot_before_resync_now(peer);
                self.target.begin_resync()
            }
            Action::MarkAllOutOfSync => self.bitmaps[peer].lock().unwrap().set_all(),
            Action::SetDisk { disk, why } => self.set_disk(DiskState::from_wire(disk), &why),
            Action::AdoptGeneration { generation, started_ms } => {
                if let Err(e) = self.update_meta(|m| {
                    m.current_generation = generation.current;
                    m.history = generation.history.clone();
                    m.generation_started_ms = started_ms;
                }) {
                    error!(resource = %self.name, "cannot record generation: {e:#}");
                }
            }
            Action::StartReplication => {
                let (me, peer) = (self.clone(), peer.to_string());
                tokio::spawn(async move { me.start_replication(&peer).await });
            }
            Action::StopStreams { reason } => self.stop_streams(peer, &reason),
            Action::LosePeer => self.lose_peer(peer),
            Action::StartResyncSource { checksum } => self.start_resync_source(peer, checksum),
            Action::ResyncTargetStarted { generation } => self.resync_target_started(peer, generation),
            Action::CompleteResyncTarget { generation } => {
                let (me, peer) = (self.clone(), peer.to_string());
                tokio::spawn(async move { me.complete_resync_target(&peer, generation).await });
            }
            Action::ScheduleRetry => {
                let (me, peer, wait) = (Arc::downgrade(self), peer.to_string(), self.retry_after);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    if let Some(me) = me.upgrade() {
                        me.handle(&peer, Event::RetryDue);
                    }
                });
            }
            Action::Report(r) => self.report(peer, r),
        }
    }

    fn send(&self, peer: &str, msg: ControlMsg) {
        if let Some(c) = self.conn_of(peer) {
            c.send_control(msg);
        }
    }

    /// Ends the resource's streams with `peer`: the replication session (whatever it had not
    /// acknowledged is marked out of sync), and the streams this node applies or resyncs.
    fn stop_streams(&self, peer: &str, reason: &str) {
        let (session, streams) = {
            let mut peers = self.peers.lock().unwrap();
            let Some(p) = peers.get_mut(peer) else { return };
            (p.session.take(), std::mem::replace(&mut p.streams, CancellationToken::new()))
        };
        streams.cancel();
        if let Some(s) = session {
            s.close(reason);
        }
    }

    fn report(&self, peer: &str, r: Report) {
        match r {
            Report::Connected { decision } => {
                info!(resource = %self.name, peer, ?decision, "session with {peer} established");
                // What the session starts with: a handler that lifts a fence once the peer
                // holds the same data (see agent/ocf/tandem-fence-peer) needs to know.
                let sync = match decision {
                    SyncDecision::InSync => "in_sync",
                    SyncDecision::Source { .. } => "source",
                    SyncDecision::Target { .. } => "target",
                    _ => "none",
                };
                let mut ctx = self.hook_ctx(Some(peer));
                ctx.extra.push(("TANDEM_SYNC", sync.to_string()));
                self.hooks.fire(HookEvent::Connected, ctx);
            }
            Report::Disconnected { reason } => {
                warn!(resource = %self.name, peer, "session with {peer} ended: {reason}");
                let mut ctx = self.hook_ctx(Some(peer));
                ctx.extra.push(("TANDEM_REASON", reason));
                self.hooks.fire(HookEvent::Disconnected, ctx);
            }
            Report::SplitBrain { resolution, first } => self.report_split_brain(peer, &resolution, first),
            Report::Refused { refusal, reason } => {
                error!(resource = %self.name, peer, ?refusal, "not replicating with {peer}: {reason}")
            }
            Report::LeftToPrimary { primary } => info!(resource = %self.name, peer,
                "{peer} holds newer data, but {primary} is primary: the resync comes from {primary}"),
            Report::NotServing { primary } => {
                info!(resource = %self.name, peer, "not resyncing {peer}: {primary} is primary and resyncs it")
            }
            Report::CannotServe => {
                warn!(resource = %self.name, peer, "peer asks for a full resync, but this node is not up to date")
            }
        }
    }

    /// Logs a split brain and runs its handler, once per split brain; counts it and
    /// reports it on the event bus.
    fn report_split_brain(&self, peer: &str, resolution: &Resolution, first: bool) {
        if first {
            self.split_brains.fetch_add(1, Ordering::Relaxed);
        }
        match resolution {
            Resolution::Disconnect(_) if !first => {}
            Resolution::Disconnect(why) => {
                error!(resource = %self.name, peer, "split brain: {why}");
                self.emit(|name| Record {
                    peer: Some(peer.to_string()),
                    resolution: Some(SplitBrainResolution::WaitsForAdministrator),
                    reason: Some(why.to_string()),
                    ..Record::new(Kind::SplitBrain, Object::Peer, name)
                });
                let mut ctx = self.hook_ctx(Some(peer));
                ctx.extra.push(("TANDEM_SPLIT_BRAIN", "unresolved".into()));
                self.hooks.fire(HookEvent::SplitBrain, ctx);
            }
            Resolution::LocalLoses | Resolution::RemoteLoses => {
                let loser = if *resolution == Resolution::LocalLoses { self.me.as_str() } else { peer };
                let remote_discards = self
                    .peers
                    .lock()
                    .unwrap()
                    .get(peer)
                    .and_then(|p| p.rel.remote.as_ref())
                    .is_some_and(|r| r.discard_local);
                let how = if self.discard_local.load(Ordering::SeqCst) || remote_discards {
                    "by `resolve --discard-local`".to_string()
                } else {
                    format!("by after_split_brain = {}", policy_name(self.cfg.after_split_brain))
                };
                warn!(resource = %self.name, peer, "split brain resolved {how}: the changes {loser} made since the split are discarded");
                if first {
                    self.emit(|name| Record {
                        peer: Some(peer.to_string()),
                        resolution: Some(SplitBrainResolution::Resolved),
                        loser: Some(loser.to_string()),
                        reason: Some(format!("resolved {how}")),
                        ..Record::new(Kind::SplitBrain, Object::Peer, name)
                    });
                    let mut ctx = self.hook_ctx(Some(peer));
                    ctx.extra.push(("TANDEM_SPLIT_BRAIN", format!("resolved: {loser} discards its changes")));
                    self.hooks.fire(HookEvent::SplitBrain, ctx);
                }
            }
        }
    }

    /// Tells every peer in session this node's side changed (role, disk, generation).
    pub(super) fn broadcast_state(&self) {
        let up: Vec<(String, PeerConn)> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.rel.is_up())
            .filter_map(|(n, p)| p.conn.clone().map(|c| (n.clone(), c)))
            .collect();
        for (n, c) in up {
            c.send_control(ControlMsg::ResourceState(self.hello_for(&n)));
        }
    }

    // ------------------------------------------------------------ the connection's events

    /// A connection to `peer` is up: `sent` is what this node put in its hello for this
    /// resource, `offer` the peer's part, if it offered the resource.
    pub fn link_up(self: &Arc<Self>, conn: PeerConn, sent: ResourceHello, offer: Option<ResourceHello>) {
        let peer = conn.node.clone();
        {
            let mut peers = self.peers.lock().unwrap();
            let Some(p) = peers.get_mut(&peer) else { return };
            p.conn = Some(conn);
            p.streams = CancellationToken::new();
        }
        self.handle(&peer, Event::LinkUp { sent, offer });
    }

    pub fn link_down(self: &Arc<Self>, peer: &str, conn_id: usize, reason: &str) {
        {
            let mut peers = self.peers.lock().unwrap();
            let Some(p) = peers.get_mut(peer) else { return };
            if p.conn.as_ref().is_none_or(|c| c.id() != conn_id) {
                return; // a newer connection already replaced this one
            }
            p.conn = None;
        }
        // Its resync into us, if any, has ended with the connection.
        if self.resyncing_from.lock().unwrap().remove(peer) {
            self.emit(|name| Record {
                peer: Some(peer.to_string()),
                sync_role: Some(SyncRole::Target),
                result: Some(ResyncResult::Interrupted),
                reason: Some(reason.to_string()),
                ..Record::new(Kind::ResyncFinished, Object::Peer, name)
            });
        }
        self.handle(peer, Event::LinkDown { reason: reason.to_string() });
    }

    /// A connection attempt was refused before it could be established.
    pub fn peer_refused(&self, peer: &str, reason: &str) {
        if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
            if p.conn.is_none() {
                p.rel.last_error = Some(reason.to_string());
            }
        }
    }

    /// Whether this node offers the resource to `peer` in a new connection's hello.
    pub fn offers(&self, peer: &str) -> bool {
        self.peers.lock().unwrap().get(peer).is_some_and(|p| p.rel.offers())
    }

    pub fn on_offer(self: &Arc<Self>, peer: &str, remote: ResourceHello, answer: bool) {
        self.handle(peer, Event::Offer { remote, answer });
    }

    pub fn on_withdraw(self: &Arc<Self>, peer: &str, reason: String, declines_offer: bool) {
        self.handle(peer, Event::Withdraw { reason, declines_offer });
    }

    pub fn on_remote_state(self: &Arc<Self>, peer: &str, remote: ResourceHello) {
        info!(resource = %self.name, peer, "peer is now {:?}/{:?}", remote.role, remote.disk);
        self.handle(peer, Event::RemoteState(remote));
    }

    /// Source side: part of the target's bitmap for us (blocks it has that we may lack).
    pub fn on_bitmap(self: &Arc<Self>, peer: &str, runs: Vec<(u64, u64)>, last: bool) {
        if !self.session_up(peer) {
            return;
        }
        {
            let mut bm = self.bitmaps[peer].lock().unwrap();
            for (off, len) in runs {
                bm.set_range(off, len);
            }
        }
        if last {
            self.handle(peer, Event::BitmapDone);
        }
    }

    pub fn on_invalidate(self: &Arc<Self>, peer: &str, checksum: bool) {
        info!(resource = %self.name, peer, checksum, "peer invalidated its copy and asks for a full resync");
        self.handle(peer, Event::Invalidate { checksum });
    }

    pub fn on_resync_start(self: &Arc<Self>, peer: &str, kind: ResyncKind, total: u64, g: Generation) {
        info!(resource = %self.name, peer, total_bytes = total, checksum = kind.checksum, "resync started as target");
        if let Some(p) = self.peers.lock().unwrap().get_mut(peer) {
            p.resync_total = total;
        }
        self.handle(peer, Event::ResyncStart { generation: g });
    }

    pub fn on_resync_done(self: &Arc<Self>, peer: &str, generation: Generation) {
        self.handle(peer, Event::ResyncDone { generation });
    }

    pub(super) fn session_up(&self, peer: &str) -> bool {
        self.peers.lock().unwrap().get(peer).is_some_and(|p| p.rel.is_up())
    }

    // ------------------------------------------------------------ administrator commands

    /// `tandem disconnect`: stop replicating with every peer and stay apart until `connect`.
    /// The connections stay: other resources go on using them.
    pub fn admin_disconnect(self: &Arc<Self>) -> String {
        for peer in self.peer_names() {
            self.handle(&peer, Event::AdminDisconnect);
        }
        self.persist_bitmaps();
        format!("{} disconnected from its peers; `tandem connect {}` resumes", self.name, self.name)
    }

    pub fn admin_connect(self: &Arc<Self>) -> String {
        for peer in self.peer_names() {
            self.handle(&peer, Event::AdminConnect);
        }
        format!("{} will connect to its peers", self.name)
    }

    /// `tandem resolve --discard-local`: this node gives up the changes it made since a
    /// split brain and becomes the sync target of the peer it split from.
    pub fn resolve_discard_local(self: &Arc<Self>) -> Result<String> {
        if self.is_primary() {
            bail!(
                "refusing to discard the changes of {} on {}: it is primary here; unmount and `tandem demote` first",
                self.name,
                self.me
            );
        }
        self.discard_local.store(true, Ordering::SeqCst);
        let split: Vec<String> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.rel.phase == Phase::Refused(Refusal::SplitBrain))
            .map(|(n, _)| n.clone())
            .collect();
        for peer in self.peer_names() {
            self.handle(&peer, Event::DiscardLocal);
        }
        warn!(resource = %self.name, "resolve --discard-local: this node's changes since the split will be replaced");
        Ok(if split.is_empty() {
            format!(
                "{}: no split brain is known yet; if one is found at the next connection, {}'s changes are discarded",
                self.name, self.me
            )
        } else {
            format!(
                "{}: discarding {}'s changes since the split; reconnecting to {} to resync from it",
                self.name,
                self.me,
                split.join(", ")
            )
        })
    }

    /// `tandem resync`: resync every peer in session that has out-of-sync blocks.
    pub fn request_resync(self: &Arc<Self>) -> Result<String> {
        if self.disk() != DiskState::UpToDate {
            bail!("{}: this node is not up to date; it cannot be a resync source", self.name);
        }
        let peers: Vec<String> = self
            .peer_names()
            .into_iter()
            .filter(|n| self.session_up(n) && self.bitmaps[n].lock().unwrap().count() > 0)
            .collect();
        if peers.is_empty() {
            return Ok(format!("{}: no connected peer has out-of-sync blocks", self.name));
        }
        for p in &peers {
            // The peer learns it is behind, starts tracking the replicated writes it applies
            // (so no older resync copy overwrites them) and answers with its bitmap; the
            // resync starts on that answer, never before the tracking.
            self.handle(p, Event::ResyncRequested);
        }
        Ok(format!("{}: resync started to {}", self.name, peers.join(", ")))
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
        let up: Vec<String> = self.peer_names().into_iter().filter(|n| self.session_up(n)).collect();
        self.publish();
        // Each session restarts and decides afresh: this copy is now the target of a full
        // resync from an up-to-date peer.
        for p in &up {
            self.handle(p, Event::StreamFailed { reason: "local copy invalidated".into() });
        }
        Ok(if up.is_empty() {
            format!(
                "{}: local copy invalidated; a full resync starts when an up-to-date peer connects",
                self.name
            )
        } else {
            format!(
                "{}: local copy invalidated; full resync{} from {}",
                self.name,
                if checksum { " (checksum-based)" } else { "" },
                up.join(", ")
            )
        })
    }
}
