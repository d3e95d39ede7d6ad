use thiserror::Error;

/// Why a byte stream could not be decoded into frames. Every variant is a protocol
/// violation by the peer: the connection is dropped with this text as the reason.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("compressed block cannot be decompressed: {0}")]
    Decompress(String),
    #[error(
        "bad frame magic {found:#06x} (expected {expected:#06x}): not a tandem peer or stream out of sync"
    )]
    BadMagic { found: u16, expected: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind} frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { kind: &'static str, len: usize, max: usize },
    #[error("{kind} frame body of {len} bytes is shorter than its fixed part of {need} bytes")]
    TooShort { kind: &'static str, len: usize, need: usize },
    #[error("{kind} frame has {len} body bytes, but its fixed part needs exactly {need}")]
    WrongLength { kind: &'static str, len: usize, need: usize },
    #[error("data frame says payload length {declared}, body carries {actual}")]
    LengthMismatch { declared: u32, actual: usize },
    #[error("data frame with empty payload")]
    EmptyPayload,
    #[error("unknown flag bits {flags:#04x} on {kind} frame")]
    UnknownFlags { kind: &'static str, flags: u8 },
    #[error("unsupported control envelope version {found} (this build understands {supported})")]
    EnvelopeVersion { found: u8, supported: u8 },
    #[error("malformed control message: {0}")]
    Control(String),
    #[error("range overflows: offset {offset} + length {len}")]
    RangeOverflow { offset: u64, len: u64 },
}
