//! The fixed 8-byte frame header shared by every frame kind.
//!
//! ```text
//! 0      2      3      4              8
//! +------+------+------+--------------+
//! | magic| kind | flags|   body_len   |   all little-endian
//! +------+------+------+--------------+
//! ```

use crate::DecodeError;

/// "TN" — the first two bytes of every frame.
pub const MAGIC: u16 = u16::from_le_bytes(*b"TN");
pub const HEADER_LEN: usize = 8;

/// Frame kinds. Values are part of the wire format and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Data = 1,
    Flush = 2,
    Discard = 3,
    Ack = 4,
    Heartbeat = 5,
    Hello = 6,
    Control = 7,
    ResyncData = 8,
    ResyncCheck = 9,
    CheckReply = 10,
    Verify = 11,
    VerifyReply = 12,
}

impl FrameKind {
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::Data,
            2 => Self::Flush,
            3 => Self::Discard,
            4 => Self::Ack,
            5 => Self::Heartbeat,
            6 => Self::Hello,
            7 => Self::Control,
            8 => Self::ResyncData,
            9 => Self::ResyncCheck,
            10 => Self::CheckReply,
            11 => Self::Verify,
            12 => Self::VerifyReply,
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Flush => "flush",
            Self::Discard => "discard",
            Self::Ack => "ack",
            Self::Heartbeat => "heartbeat",
            Self::Hello => "hello",
            Self::Control => "control",
            Self::ResyncData => "resync-data",
            Self::ResyncCheck => "resync-check",
            Self::CheckReply => "check-reply",
            Self::Verify => "verify",
            Self::VerifyReply => "verify-reply",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub flags: u8,
    pub body_len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[3] = self.flags;
        b[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        b
    }

    /// Parses a header from exactly [`HEADER_LEN`] bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic, expected: MAGIC });
        }
        let kind = FrameKind::from_u8(b[2])?;
        Ok(Self { kind, flags: b[3], body_len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]) })
    }
}
