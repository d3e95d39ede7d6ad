//! Control messages: rare, small, structured. Encoded with bincode 2.0.1 (`config::standard`,
//! with a size limit) inside a one-byte versioned envelope, or — for the hello — after a fixed
//! little-endian protocol version.

use bincode::{Decode, Encode};

use crate::{DecodeError, MAX_CONTROL_BODY};

/// Version of the control envelope layout (not of the protocol).
pub const CONTROL_ENVELOPE_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Role {
    Primary,
    Secondary,
}

/// The state of a node's local copy of a resource, as in DRBD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum DiskState {
    /// Holds every write acknowledged by the primary.
    UpToDate,
    /// Consistent, but missed writes (e.g. disconnected while the primary went on).
    Outdated,
    /// Being rebuilt, or never synced: not a usable image.
    Inconsistent,
}

/// What the two nodes do automatically when they find a split brain (both wrote as
/// primary while apart). Both must be configured alike; otherwise they stay apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum AfterSplitBrain {
    /// Stay disconnected and report it (the default): a human decides.
    Disconnect,
    /// If only one side wrote since the split, its peer's (empty) changes are discarded.
    DiscardZeroChanges,
    /// The side whose generation began later (the more recent promotion) loses its changes.
    DiscardYoungerPrimary,
    /// The side that changed fewer bytes loses its changes.
    DiscardLeastChanges,
}

/// A node's data generation identifiers for a resource (DRBD's UUIDs): `current` names
/// the data the node holds; `history` the generations it descends from, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
pub struct Generation {
    pub current: u64,
    pub history: Vec<u64>,
}

/// Per-resource part of the handshake: identity, geometry, and what decides whether and
/// in which direction the two copies must be synchronised.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ResourceHello {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub role: Role,
    pub disk: DiskState,
    pub generation: Generation,
    /// The generation the sender had when it last was in sync with the receiver, if the
    /// sender has written since without it (0 = none).
    pub bitmap_uuid: u64,
    /// Bytes the sender has marked out of sync for the receiver.
    pub out_of_sync_bytes: u64,
    /// The sender was primary when it stopped without a clean shutdown: what its activity
    /// log covers may differ from the peer.
    pub crashed_primary: bool,
    /// When the sender's current generation began (ms since the Unix epoch; 0 = unknown).
    pub generation_started_ms: u64,
    /// The sender's `after_split_brain` policy for this resource.
    pub after_split_brain: AfterSplitBrain,
    /// `tandem resolve --discard-local` on the sender: it gives up its changes if it finds
    /// a split brain with the receiver.
    pub discard_local: bool,
}

/// The handshake body. The protocol version travels in front of it, outside bincode.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    pub cluster: String,
    pub node: String,
    pub resources: Vec<ResourceHello>,
}

/// What the sender knows about the receiver's copy of a resource.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct PeerView {
    pub resource: String,
    /// The receiver's disk as the sender (a primary) sees it: `Outdated` when the primary
    /// went on writing without it.
    pub your_disk: DiskState,
    /// Bytes the sender knows the receiver is missing.
    pub out_of_sync_bytes: u64,
}

/// Why a stream was opened; sent as the first frame of every stream after the control stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum StreamPurpose {
    /// Application writes, flushes and discards from the primary; acks back.
    Replication,
    /// Resync data (or checksums) from the sync source; acks back. Separate from
    /// replication so a resync never queues ahead of application writes.
    Resync,
}

/// How a resync transfers data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct ResyncKind {
    /// Every block, not only those marked in the bitmaps.
    pub full: bool,
    /// Compare 128-bit hashes per chunk first and send only chunks that differ.
    pub checksum: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ControlMsg {
    /// The handshake was refused; the connection closes after this.
    Refuse { reason: String },
    /// A fatal error; the sender closes the stream or connection after this.
    Error { reason: String },
    /// A resource's role or disk state changed on the sender.
    ResourceState(ResourceHello),
    /// The sender's view of the receiver's copy.
    PeerView(PeerView),
    /// First frame on a new stream.
    OpenStream { resource: String, purpose: StreamPurpose },
    /// Part of the sender's dirty bitmap for the receiver, as byte ranges; `last` ends it.
    Bitmap { resource: String, runs: Vec<(u64, u64)>, last: bool },
    /// The sender (sync source) starts a resync of the receiver. The receiver takes on the
    /// source's generation while it stays inconsistent, so an interrupted resync resumes
    /// from the source's bitmap instead of starting over.
    ResyncStart { resource: String, kind: ResyncKind, total_bytes: u64, generation: Generation },
    /// Every block of the resync is on the receiver's disk; it now holds `generation`.
    ResyncDone { resource: String, generation: Generation },
    /// The sender discards its copy and asks for a full resync from the receiver.
    Invalidate { resource: String, checksum: bool },
    /// The sender offers the resource's session on this connection, with its side as in the
    /// handshake; `answer`: in reply to the receiver's offer. The session is up once both
    /// offered (in the hello, or with these).
    ResourceUp { hello: ResourceHello, answer: bool },
    /// The sender ends the resource's session (the connection and other resources stay),
    /// or, with `declines_offer`, declines the receiver's offer.
    ResourceDown { resource: String, reason: String, declines_offer: bool },
    /// The sender (a secondary taking a snapshot) asks the receiver, primary, for a barrier:
    /// a flush in the resource's change stream soon, whether or not its application flushes.
    BarrierRequest { resource: String },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_limit::<MAX_CONTROL_BODY>()
}

pub(crate) fn encode_bincode<T: Encode>(v: &T, out: &mut Vec<u8>) {
    // Encoding into a Vec cannot fail except by exceeding the limit, which only a caller
    // bug (a multi-hundred-KiB hello) can cause; surface it loudly in debug builds.
    let r = bincode::encode_into_std_write(v, out, config());
    debug_assert!(r.is_ok(), "control message too large: {r:?}");
}

pub(crate) fn decode_bincode<T: Decode<()>>(body: &[u8]) -> Result<T, DecodeError> {
    let (v, used) =
        bincode::decode_from_slice(body, config()).map_err(|e| DecodeError::Control(e.to_string()))?;
    if used != body.len() {
        return Err(DecodeError::Control(format!("{} trailing bytes after message", body.len() - used)));
    }
    Ok(v)
}
