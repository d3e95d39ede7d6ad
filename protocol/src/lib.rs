//! Tandem's wire format. Pure: no I/O, no async, no allocation beyond a capped frame size.
//!
//! Every frame starts with a fixed 8-byte little-endian [`header`]: magic, kind, flags and the
//! length of the body that follows. Hot-path frames (data, flush, discard, ack, heartbeat) have
//! fixed little-endian bodies; the block payload follows the data header as raw bytes. Control
//! messages are bincode 2.0.1 (whose format is frozen) inside a versioned envelope. The hello
//! frame carries the protocol version in a fixed position before its bincode body, so a peer of
//! another version is always told so in plain words instead of failing to decode.
//!
//! See `docs/protocol.md` for the byte-level specification.

mod checksum;
pub mod compress;
mod control;
mod decoder;
mod error;
mod frame;
pub mod header;

pub use checksum::{block_checksum, block_hash, BlockHash};
pub use compress::Compression;
pub use control::{
    AfterSplitBrain, ControlMsg, DiskState, Generation, Hello, PeerView, ResourceHello, ResyncKind, Role,
    StreamPurpose, CONTROL_ENVELOPE_VERSION,
};
pub use decoder::FrameDecoder;
pub use error::DecodeError;
pub use frame::{
    AckLevel, CompressedFrame, DataFrame, Decoded, Frame, FLAG_ACK_RECEIVED, FLAG_LZ4, FLAG_ZSTD,
    VERIFY_BLOCK,
};
pub use header::{FrameKind, HEADER_LEN, MAGIC};

/// The replication protocol version this build speaks. Peers exchange it in [`Hello`];
/// a peer with another version is refused with a message naming both versions.
pub const PROTOCOL_VERSION: u32 = 3;

/// ALPN identifier for the QUIC connection. The version is negotiated in the hello frame,
/// not in ALPN, so a version mismatch produces a readable error instead of a TLS alert.
pub const ALPN: &[u8] = b"tandem";

/// Largest block payload a data frame may carry (the kernel's FUSE max_write is 1 MiB).
pub const MAX_DATA_PAYLOAD: usize = 1 << 20;

/// Largest encoded control message body. Control messages are small; this bounds memory a
/// hostile or broken peer can make us reserve.
pub const MAX_CONTROL_BODY: usize = 256 << 10;
