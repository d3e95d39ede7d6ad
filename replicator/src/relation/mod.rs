//! A resource's relation with one peer, as one pure state machine:
//! `(Relation, Facts, Event) -> (Relation, Vec<Action>)`.
//!
//! One connection between two nodes carries every resource they share, and each resource
//! has its own **session** with the peer on it: offered in the connection's hello (or later
//! with `ResourceUp`), up when both sides have offered, and ended by either side with
//! `ResourceDown` — a refusal, a split brain, a role conflict, a replication timeout, a bad
//! checksum or a protocol error on one of the resource's streams ends that session only,
//! never the connection or another resource. A session that ended for a passing reason is
//! offered again after a back-off and restarts from a known state: the decision on
//! connect is taken afresh from both sides' generations and bitmaps.
//!
//! Within a session the machine runs the generation decision ([`decide_with_policy`]) and
//! the resync protocol in either direction. What matters for safety is the order it
//! imposes:
//!
//! - A resync target starts tracking the replicated writes it applies
//!   ([`Action::BeginTracking`]) in the same step in which it asks for the resync (its
//!   bitmap or `Invalidate`), and a source starts sending only when that answer arrives.
//!   So no resync block read before a replicated write can overwrite it on the target:
//!   this holds for a connect, for `tandem resync`, for `verify --repair` and for a peer
//!   that drained its backlog — all take the same path ([`Event::ResyncRequested`]).
//! - A copy becomes up to date only through [`Action::CompleteResyncTarget`], issued when
//!   the source says every block is on the target's disk.
//! - While a primary is connected, only the primary resyncs a node: its reads are ordered
//!   with the writes it replicates; a secondary's are not.
//!
//! The agent delivers events (messages from the peer, streams ending, administrator
//! commands, role changes) and executes the actions (frames, I/O, handlers, metadata).
//! Nothing here does I/O, so the machine is tested without root, by property tests that run
//! random event sequences through two machines and a model of both disks.

mod machine;

pub use machine::{step, Action, Event, Facts, Refusal, Remote, Report};

use crate::generation::SideView;
use tandem_protocol::ResourceHello;

/// Whether the resource's session with the peer is up on the current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// No connection to the peer.
    NoLink,
    /// The link is up; this node offered the resource and waits for the peer's offer.
    Offered,
    /// The link is up; neither side offers the resource now. `retry`: this node offers it
    /// again after a back-off (the session ended for a passing reason).
    Down { retry: bool },
    /// Both offered: the resource replicates with the peer.
    Up,
}

/// What the session does, once up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not decided (no session), or decided that nothing happens between the two.
    Idle,
    /// Same data: replication only.
    InSync,
    /// This node resyncs the peer.
    Source(SourcePhase),
    /// This node is resynced by the peer.
    Target(TargetPhase),
    /// The peer holds newer data, but another node is primary and resyncs this one.
    LeftToPrimary,
    /// Refused to synchronise: stays apart until an administrator acts.
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// Waiting for the target's bitmap (or `Invalidate`) before sending anything.
    AwaitingRequest,
    /// The resync runs.
    Running,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPhase {
    /// Asked for the resync (tracking replicated writes since); the source has not started.
    Requested,
    /// The source is sending.
    Receiving,
}

/// The connection state an administrator sees for a resource and a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Trying to reach the peer, or waiting for it to offer the resource.
    Connecting,
    /// The session is up.
    Connected,
    /// Kept apart: disconnected by the administrator, or refused (split brain, unrelated
    /// data, ...) until an administrator acts.
    StandAlone,
}

/// A resource's relation with one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub peer: String,
    pub session: Session,
    pub phase: Phase,
    /// `tandem disconnect`: the resource is not offered to this peer until `connect`.
    pub admin_down: bool,
    /// The peer's side as it last described it (its offer, then its state updates).
    pub remote: Option<ResourceHello>,
    /// This node's side as it offered it, while waiting for the peer's answer: the
    /// decision is taken on the snapshots the two exchanged.
    pub offered: Option<ResourceHello>,
    /// The split-brain report ran for the split brain this pair is in.
    pub split_brain_reported: bool,
    /// Why the session last ended or was refused.
    pub last_error: Option<String>,
}

impl Relation {
    pub fn new(peer: &str) -> Self {
        Self {
            peer: peer.to_string(),
            session: Session::NoLink,
            phase: Phase::Idle,
            admin_down: false,
            remote: None,
            offered: None,
            split_brain_reported: false,
            last_error: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.session == Session::Up
    }

    /// Whether this node offers the resource in a new connection's hello.
    pub fn offers(&self) -> bool {
        !self.admin_down
    }

    /// The peer is primary, as far as this session knows.
    pub fn remote_primary(&self) -> bool {
        self.is_up() && self.remote.as_ref().is_some_and(|r| r.role == tandem_protocol::Role::Primary)
    }

    pub fn connection_state(&self) -> ConnectionState {
        match (&self.session, self.phase) {
            (Session::Up, _) => ConnectionState::Connected,
            _ if self.admin_down => ConnectionState::StandAlone,
            (_, Phase::Refused(_)) => ConnectionState::StandAlone,
            _ => ConnectionState::Connecting,
        }
    }

    /// The other side's view for [`decide_with_policy`].
    pub fn remote_view(&self) -> Option<SideView> {
        self.remote.as_ref().map(|r| remote_view(&self.peer, r))
    }
}

/// A peer's [`ResourceHello`] as one side of the generation decision.
pub fn remote_view(peer: &str, r: &ResourceHello) -> SideView {
    SideView {
        node: peer.to_string(),
        generation: r.generation.clone(),
        bitmap_uuid: r.bitmap_uuid,
        dirty: r.out_of_sync_bytes > 0,
        disk: r.disk,
        primary: r.role == tandem_protocol::Role::Primary,
        crashed_primary: r.crashed_primary,
        changes: r.out_of_sync_bytes,
        generation_started_ms: r.generation_started_ms,
        discard_local: r.discard_local,
        policy: r.after_split_brain,
    }
}
