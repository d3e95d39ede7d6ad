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

/// Per-resource part of the handshake: both sides must agree on identity and geometry.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ResourceHello {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub role: Role,
    pub disk: DiskState,
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
