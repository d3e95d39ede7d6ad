//! The transition function of a [`Relation`]: every change of a resource's relation with
//! a peer happens here, in one place.

use tandem_protocol::{DiskState, Generation, ResourceHello, Role};

use super::{remote_view, Phase, Relation, Session, SourcePhase, TargetPhase};
use crate::generation::{decide_with_policy, SyncDecision};
use crate::split_brain::Resolution;

/// What the relation needs to know about this node when it decides (the agent takes it
/// from the resource before each step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// This node's name.
    pub node: String,
    /// This node's side for this peer, as it would describe it now (the agent snapshots it
    /// once per step; offers carry exactly this snapshot).
    pub hello: ResourceHello,
    /// Another peer (not this one) whose session is up and which is primary.
    pub other_primary: Option<String>,
    /// Compare checksums in every resync (`resync_checksum`).
    pub checksum_resync: bool,
    /// Ask for a checksum-based full resync (`resync_checksum`, or `invalidate --checksum`).
    pub checksum_full_resync: bool,
}

impl Facts {
    fn primary(&self) -> bool {
        self.hello.role == Role::Primary
    }

    fn disk(&self) -> DiskState {
        self.hello.disk
    }

    /// A secondary does not resync a peer while a primary is connected to it: the primary
    /// does (its resync reads are ordered with its writes; a secondary's would race them).
    fn may_serve_resync(&self) -> bool {
        self.primary() || self.other_primary.is_none()
    }
}

/// The peer's side, as it describes itself.
pub type Remote = ResourceHello;

/// Why a pair does not synchronise; the session stays down until an administrator acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Both wrote as primary since they last agreed.
    SplitBrain,
    /// No common generation.
    Unrelated,
    /// Neither side has consistent data.
    BothInconsistent,
    /// The newer data is on the side that is not primary.
    PrimaryWouldBeTarget,
    /// Both are primary.
    BothPrimary,
    /// Different size or block size.
    Geometry,
}

/// Something that happened to the relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection to the peer is established. `sent`: this node's part of the
    /// connection's hello for this resource (it offered it, unless administratively down);
    /// `offer`: the peer's part, if it offered it.
    LinkUp {
        sent: Remote,
        offer: Option<Remote>,
    },
    /// The connection is gone.
    LinkDown {
        reason: String,
    },
    /// The peer offers the resource (`ResourceUp`); `answer`: in reply to an offer of ours.
    Offer {
        remote: Remote,
        answer: bool,
    },
    /// The peer ended the resource's session, or declined this node's offer
    /// (`ResourceDown`).
    Withdraw {
        reason: String,
        declines_offer: bool,
    },
    /// The peer's role, disk or generation changed (`ResourceState`).
    RemoteState(Remote),
    /// The target's bitmap is complete (its runs are merged into ours).
    BitmapDone,
    /// The peer discarded its copy and asks for a full resync.
    Invalidate {
        checksum: bool,
    },
    /// The source starts resyncing this node.
    ResyncStart {
        generation: Generation,
    },
    /// The source says every block is on this node's disk.
    ResyncDone {
        generation: Generation,
    },
    /// Primary: the replication stream started by [`Action::StartReplication`] is attached;
    /// `dirty`: the peer's bitmap has blocks (written before the stream was attached).
    ReplicationAttached {
        dirty: bool,
    },
    /// Target: [`Action::CompleteResyncTarget`] finished; `up_to_date` unless another
    /// source is still resyncing this copy.
    TargetCompleted {
        up_to_date: bool,
    },
    /// Another peer's resync has made this copy up to date with `generation`.
    ResyncedByOther {
        generation: Generation,
    },
    /// Source: the resync this node ran ended.
    SourceEnded {
        result: Result<(), String>,
    },
    /// One of the resource's streams with the peer failed (ack timeout, bad checksum,
    /// protocol error, the peer's error report, a failed local write of replicated data).
    StreamFailed {
        reason: String,
    },
    Promoted,
    Demoted,
    /// `tandem disconnect`.
    AdminDisconnect,
    /// `tandem connect`.
    AdminConnect,
    /// `tandem resolve --discard-local` (the resource's flag is already set).
    DiscardLocal,
    /// The primary has blocks marked for the peer while connected: `tandem resync`,
    /// `verify --repair`, a peer that drained its backlog.
    ResyncRequested,
    /// The back-off after a session ended for a passing reason is over.
    RetryDue,
}

/// Work for the agent. Each must be carried out, in order.
#[must_use = "an action of the relation must be carried out"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `ResourceUp` with this node's side as in `hello`; `answer`: in reply to the peer's
    /// offer.
    SendOffer {
        answer: bool,
        hello: Remote,
    },
    /// `ResourceDown`: the session ends, or (`declines_offer`) the peer's offer is declined.
    SendWithdraw {
        reason: String,
        declines_offer: bool,
    },
    /// `ResourceState` with this node's side.
    SendState,
    /// Target: this node's bitmap for the peer (what it has that the source may lack).
    SendBitmap,
    /// Target: ask for a full resync.
    SendInvalidate {
        checksum: bool,
    },
    /// Target: from now on, record the newest replicated write per block, so that no
    /// older resync copy overwrites it.
    BeginTracking,
    /// Source: every block is out of sync for the peer (full resync).
    MarkAllOutOfSync,
    SetDisk {
        disk: DiskState,
        why: String,
    },
    /// An in-sync secondary follows its primary's new generation.
    AdoptGeneration {
        generation: Generation,
        started_ms: u64,
    },
    /// Primary: open the replication stream to the peer and attach it to the volume.
    StartReplication,
    /// Close the resource's streams with the peer (replication, resync, applying).
    StopStreams {
        reason: String,
    },
    /// Primary: it goes on without the peer (bitmap generation; a new generation at the
    /// first write without it).
    LosePeer,
    /// Source: run the resync from the peer's bitmap.
    StartResyncSource {
        checksum: bool,
    },
    /// Target: the source started; this copy is inconsistent and carries the source's
    /// generation until the resync completes.
    ResyncTargetStarted {
        generation: Generation,
    },
    /// Target: flush, then adopt `generation`, clear the bitmap, stop tracking; answer
    /// with [`Event::TargetCompleted`].
    CompleteResyncTarget {
        generation: Generation,
    },
    /// Deliver [`Event::RetryDue`] after the back-off.
    ScheduleRetry,
    /// Log, and run the handler that goes with it.
    Report(Report),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Connected {
        decision: SyncDecision,
    },
    Disconnected {
        reason: String,
    },
    /// `first`: the first report of this split brain (its handler runs once).
    SplitBrain {
        resolution: Resolution,
        first: bool,
    },
    Refused {
        refusal: Refusal,
        reason: String,
    },
    /// The peer holds newer data, but `primary` resyncs this node.
    LeftToPrimary {
        primary: String,
    },
    /// Not resyncing the peer: `primary` is connected and does.
    NotServing {
        primary: String,
    },
    /// The peer asked for a full resync, but this copy is not up to date.
    CannotServe,
}

/// Applies `event` to `rel`; returns the actions to carry out, in order.
pub fn step(rel: &mut Relation, facts: &Facts, event: Event) -> Vec<Action> {
    let mut acts = Vec::new();
    let a = &mut acts;
    match event {
        Event::LinkUp { sent, offer } => {
            rel.remote = None;
            if rel.admin_down {
                rel.session = Session::Down { retry: false };
                if offer.is_some() {
                    a.push(Action::SendWithdraw {
                        reason: "disconnected by the administrator".into(),
                        declines_offer: true,
                    });
                }
            } else if let Some(remote) = offer {
                up(rel, facts, &sent, remote, a);
            } else {
                rel.offered = Some(sent);
                rel.session = Session::Offered;
            }
        }
        Event::LinkDown { reason } => {
            if rel.is_up() {
                lose(rel, facts, &reason, a);
                a.push(Action::Report(Report::Disconnected { reason: reason.clone() }));
            }
            rel.session = Session::NoLink;
            rel.remote = None;
            forget_phase(rel);
            rel.last_error = Some(reason);
        }
        Event::Offer { remote, answer } => {
            if rel.admin_down {
                if !answer {
                    a.push(Action::SendWithdraw {
                        reason: "disconnected by the administrator".into(),
                        declines_offer: true,
                    });
                }
                rel.session = Session::Down { retry: false };
                return acts;
            }
            // Both sides decide on the same two snapshots: the offer and the answer, or the
            // two offers when both offered at once.
            let ours = match (&rel.session, answer) {
                (Session::Offered, _) => rel.offered.clone().unwrap_or_else(|| facts.hello.clone()),
                (Session::NoLink | Session::Down { .. }, false) => {
                    a.push(Action::SendOffer { answer: true, hello: facts.hello.clone() });
                    facts.hello.clone()
                }
                // A reply to an offer this node no longer makes: nothing new. (An offer while
                // up cannot follow from the protocol: the peer ends a session before it
                // offers again; ignore it.)
                (Session::NoLink | Session::Down { .. }, true) | (Session::Up, _) => return acts,
            };
            up(rel, facts, &ours, remote, a);
        }
        Event::Withdraw { reason, declines_offer } => {
            // The side that ended the session offers it again when it can. An offer of
            // ours that crosses the end of the previous session stands.
            if rel.is_up() && !declines_offer {
                lose(rel, facts, &reason, a);
                a.push(Action::Report(Report::Disconnected { reason: format!("peer: {reason}") }));
                rel.session = Session::Down { retry: false };
                rel.remote = None;
                forget_phase(rel);
            } else if rel.session == Session::Offered && declines_offer {
                rel.session = Session::Down { retry: false };
                rel.offered = None;
            }
            rel.last_error = Some(format!("peer: {reason}"));
        }
        Event::RemoteState(remote) => {
            if !rel.is_up() {
                return acts;
            }
            let primary = remote.role == Role::Primary;
            let (oos, generation, started) =
                (remote.out_of_sync_bytes, remote.generation.clone(), remote.generation_started_ms);
            rel.remote = Some(remote);
            if primary && facts.primary() {
                let reason = format!("both {} and {} are primary", facts.node, rel.peer);
                refuse(rel, facts, Refusal::BothPrimary, reason, a);
                return acts;
            }
            if primary && rel.phase == Phase::InSync {
                if oos > 0 {
                    // The primary has blocks marked for us while connected: receive them,
                    // tracking replicated writes before the source may send anything.
                    a.push(Action::BeginTracking);
                    a.push(Action::SendBitmap);
                    rel.phase = Phase::Target(TargetPhase::Requested);
                } else if facts.disk() == DiskState::UpToDate
                    && generation.current != facts.hello.generation.current
                {
                    a.push(Action::AdoptGeneration { generation, started_ms: started });
                }
            }
        }
        Event::BitmapDone => {
            if rel.is_up() && rel.phase != Phase::Source(SourcePhase::Running) {
                serve_resync(rel, facts, facts.checksum_resync, a);
            }
        }
        Event::Invalidate { checksum } => {
            if !rel.is_up() {
                return acts;
            }
            if facts.disk() != DiskState::UpToDate {
                a.push(Action::Report(Report::CannotServe));
                return acts;
            }
            if !facts.may_serve_resync() {
                serve_resync(rel, facts, false, a);
                return acts;
            }
            a.push(Action::MarkAllOutOfSync);
            if rel.phase != Phase::Source(SourcePhase::Running) {
                serve_resync(rel, facts, checksum || facts.checksum_resync, a);
            }
        }
        Event::ResyncStart { generation } => {
            if rel.is_up() {
                a.push(Action::BeginTracking);
                a.push(Action::ResyncTargetStarted { generation });
                rel.phase = Phase::Target(TargetPhase::Receiving);
                rel.split_brain_reported = false;
            }
        }
        Event::ResyncDone { generation } => {
            if rel.is_up() && rel.phase == Phase::Target(TargetPhase::Receiving) {
                a.push(Action::CompleteResyncTarget { generation });
            }
        }
        Event::ReplicationAttached { dirty } => {
            // Blocks marked after the snapshot the decision was taken on: the same path as
            // `tandem resync`.
            if dirty && rel.is_up() && facts.primary() && rel.phase == Phase::InSync {
                a.push(Action::SendState);
            }
        }
        Event::TargetCompleted { up_to_date } => {
            if rel.phase == Phase::Target(TargetPhase::Receiving) {
                rel.phase = if up_to_date && rel.is_up() { Phase::InSync } else { Phase::Idle };
            }
        }
        Event::ResyncedByOther { generation } => {
            if matches!(rel.phase, Phase::Target(_) | Phase::LeftToPrimary) {
                let same = rel.remote.as_ref().is_some_and(|r| r.generation.current == generation.current);
                rel.phase = if same && rel.is_up() { Phase::InSync } else { Phase::Idle };
            }
        }
        Event::SourceEnded { result } => {
            if rel.phase != Phase::Source(SourcePhase::Running) {
                return acts;
            }
            match result {
                Ok(()) => rel.phase = Phase::InSync,
                Err(e) => {
                    rel.phase = Phase::Idle;
                    if rel.is_up() {
                        end(rel, facts, format!("resync interrupted: {e}"), true, a);
                    } else {
                        rel.last_error = Some(format!("resync interrupted: {e}"));
                    }
                }
            }
        }
        Event::StreamFailed { reason } => {
            if rel.is_up() {
                end(rel, facts, reason, true, a);
            }
        }
        Event::Promoted | Event::Demoted => {
            if rel.is_up() {
                if facts.primary() && matches!(rel.phase, Phase::InSync | Phase::Source(_)) {
                    a.push(Action::StartReplication);
                }
                a.push(Action::SendState);
            } else {
                // A refusal may not hold any more (both primary, both inconsistent).
                offer_again(rel, facts, a);
            }
        }
        Event::AdminDisconnect => {
            rel.admin_down = true;
            match rel.session {
                Session::Up => end(rel, facts, "disconnected by the administrator".into(), false, a),
                Session::Offered | Session::Down { .. } => {
                    a.push(Action::SendWithdraw {
                        reason: "disconnected by the administrator".into(),
                        declines_offer: false,
                    });
                    rel.session = Session::Down { retry: false };
                    rel.offered = None;
                }
                Session::NoLink => {}
            }
        }
        Event::AdminConnect => {
            rel.admin_down = false;
            if matches!(rel.phase, Phase::Refused(r) if r != Refusal::SplitBrain) {
                rel.phase = Phase::Idle;
            }
            offer_again(rel, facts, a);
        }
        Event::DiscardLocal => {
            if rel.phase == Phase::Refused(Refusal::SplitBrain) {
                rel.phase = Phase::Idle;
            }
            offer_again(rel, facts, a);
        }
        Event::ResyncRequested => {
            // The target answers with its bitmap after it starts tracking (see RemoteState).
            if rel.is_up() && facts.primary() && matches!(rel.phase, Phase::InSync | Phase::Source(_)) {
                a.push(Action::SendState);
            }
        }
        Event::RetryDue => {
            if rel.session == (Session::Down { retry: true }) && !rel.admin_down {
                offer(rel, facts, a);
            }
        }
    }
    acts
}

/// Both sides offered: decide what happens between them.
fn up(rel: &mut Relation, facts: &Facts, ours: &Remote, remote: Remote, a: &mut Vec<Action>) {
    rel.session = Session::Up;
    rel.offered = None;
    let local = remote_view(&facts.node, ours);
    rel.last_error = None;
    rel.phase = Phase::Idle;
    let remote_is_primary = remote.role == Role::Primary;
    let geometry = (remote.size != ours.size).then(|| {
        format!(
            "size mismatch: {} has {} bytes, {} has {} bytes",
            facts.node, ours.size, rel.peer, remote.size
        )
    });
    let geometry = geometry.or_else(|| {
        (remote.block_size != ours.block_size).then(|| {
            format!(
                "block size mismatch: {} uses {}, {} uses {}",
                facts.node, ours.block_size, rel.peer, remote.block_size
            )
        })
    });
    let view = remote_view(&rel.peer, &remote);
    rel.remote = Some(remote);
    if let Some(reason) = geometry {
        refuse(rel, facts, Refusal::Geometry, reason, a);
        return;
    }
    let verdict = decide_with_policy(&local, &view);
    match &verdict.split_brain {
        Some(resolution) => {
            let first = !std::mem::replace(&mut rel.split_brain_reported, true);
            a.push(Action::Report(Report::SplitBrain { resolution: resolution.clone(), first }));
        }
        None => rel.split_brain_reported = false,
    }
    let (me, peer) = (&facts.node, &rel.peer);
    let refusal = match verdict.decision {
        SyncDecision::SplitBrain => {
            let why = match &verdict.split_brain {
                Some(Resolution::Disconnect(why)) => why.clone(),
                _ => String::new(),
            };
            Some((
                Refusal::SplitBrain,
                format!(
                    "split brain: {me} and {peer} both wrote since they last agreed (generations {:016x} and \
                     {:016x}); staying disconnected: {why}",
                    local.generation.current, view.generation.current
                ),
            ))
        }
        SyncDecision::Unrelated => Some((
            Refusal::Unrelated,
            format!("{me} and {peer} hold unrelated data (no common generation); refusing to sync"),
        )),
        SyncDecision::BothInconsistent => Some((
            Refusal::BothInconsistent,
            format!("neither {me} nor {peer} has consistent data; promote one with --force"),
        )),
        SyncDecision::Target { .. } if facts.primary() => Some((
            Refusal::PrimaryWouldBeTarget,
            format!("{peer}'s data is newer but {me} is primary here; demote this node first"),
        )),
        SyncDecision::Source { .. } if remote_is_primary => Some((
            Refusal::PrimaryWouldBeTarget,
            format!("{me}'s data is newer but {peer} is primary; demote {peer} first"),
        )),
        _ if remote_is_primary && facts.primary() => {
            Some((Refusal::BothPrimary, format!("both {me} and {peer} are primary")))
        }
        _ => None,
    };
    if let Some((refusal, reason)) = refusal {
        refuse(rel, facts, refusal, reason, a);
        // `resolve --discard-local` ran after the offer this decision was taken on: offer
        // again with it, so the split brain is settled instead of left standing.
        if refusal == Refusal::SplitBrain && facts.hello.discard_local && !ours.discard_local {
            offer(rel, facts, a);
        }
        return;
    }
    a.push(Action::Report(Report::Connected { decision: verdict.decision }));
    match verdict.decision {
        SyncDecision::InSync => {
            // Same generation and nothing marked on either side: the same data. A copy
            // left outdated by an interrupted decision is up to date again.
            if local.disk == DiskState::Outdated && view.disk == DiskState::UpToDate {
                a.push(Action::SetDisk { disk: DiskState::UpToDate, why: format!("same data as {peer}") });
            }
            rel.phase = Phase::InSync;
        }
        SyncDecision::Source { full } => {
            if full {
                a.push(Action::MarkAllOutOfSync);
            }
            // The resync starts when the target has sent its bitmap.
            rel.phase = Phase::Source(SourcePhase::AwaitingRequest);
        }
        SyncDecision::Target { .. } if !remote_is_primary && facts.other_primary.is_some() => {
            // Only the primary resyncs a node while there is one.
            let primary = facts.other_primary.clone().unwrap_or_default();
            a.push(Action::Report(Report::LeftToPrimary { primary }));
            rel.phase = Phase::LeftToPrimary;
        }
        SyncDecision::Target { full } => {
            if local.disk == DiskState::UpToDate {
                a.push(Action::SetDisk {
                    disk: DiskState::Outdated,
                    why: format!("{peer} holds newer data"),
                });
            }
            a.push(Action::BeginTracking);
            a.push(if full {
                Action::SendInvalidate { checksum: facts.checksum_full_resync }
            } else {
                Action::SendBitmap
            });
            rel.phase = Phase::Target(TargetPhase::Requested);
        }
        // Refused above.
        SyncDecision::SplitBrain | SyncDecision::Unrelated | SyncDecision::BothInconsistent => {}
    }
    if facts.primary() && matches!(rel.phase, Phase::InSync | Phase::Source(_)) {
        a.push(Action::StartReplication);
    }
}

/// Source side: the target asked for the resync.
fn serve_resync(rel: &mut Relation, facts: &Facts, checksum: bool, a: &mut Vec<Action>) {
    if !facts.may_serve_resync() {
        let primary = facts.other_primary.clone().unwrap_or_default();
        a.push(Action::Report(Report::NotServing { primary }));
        rel.phase = Phase::LeftToPrimary;
        return;
    }
    rel.phase = Phase::Source(SourcePhase::Running);
    a.push(Action::StartResyncSource { checksum });
}

/// The session stays apart until an administrator acts (or a role change lifts it).
fn refuse(rel: &mut Relation, facts: &Facts, refusal: Refusal, reason: String, a: &mut Vec<Action>) {
    if rel.is_up() {
        lose(rel, facts, &reason, a);
    }
    a.push(Action::Report(Report::Refused { refusal, reason: reason.clone() }));
    a.push(Action::SendWithdraw { reason: reason.clone(), declines_offer: false });
    rel.session = Session::Down { retry: false };
    rel.phase = Phase::Refused(refusal);
    rel.last_error = Some(reason);
}

/// This node ends an established session.
fn end(rel: &mut Relation, facts: &Facts, reason: String, retry: bool, a: &mut Vec<Action>) {
    lose(rel, facts, &reason, a);
    a.push(Action::SendWithdraw { reason: reason.clone(), declines_offer: false });
    a.push(Action::Report(Report::Disconnected { reason: reason.clone() }));
    let retry = retry && !rel.admin_down;
    rel.session = Session::Down { retry };
    if retry {
        a.push(Action::ScheduleRetry);
    }
    rel.remote = None;
    forget_phase(rel);
    rel.last_error = Some(reason);
}

/// The streams of an established session stop; a primary goes on without the peer.
fn lose(rel: &Relation, facts: &Facts, reason: &str, a: &mut Vec<Action>) {
    a.push(Action::StopStreams { reason: reason.to_string() });
    if facts.primary() && matches!(rel.phase, Phase::InSync | Phase::Source(_)) {
        a.push(Action::LosePeer);
    }
}

/// A refusal is kept (status shows it) until the next decision; anything else is over.
fn forget_phase(rel: &mut Relation) {
    if !matches!(rel.phase, Phase::Refused(_)) {
        rel.phase = Phase::Idle;
    }
}

fn offer_again(rel: &mut Relation, facts: &Facts, a: &mut Vec<Action>) {
    if rel.admin_down || !matches!(rel.session, Session::Down { .. }) {
        return;
    }
    offer(rel, facts, a);
}

fn offer(rel: &mut Relation, facts: &Facts, a: &mut Vec<Action>) {
    a.push(Action::SendOffer { answer: false, hello: facts.hello.clone() });
    rel.offered = Some(facts.hello.clone());
    rel.session = Session::Offered;
}
