//! Frame values and their encoding.

use bytes::Bytes;

use crate::control::{decode_bincode, encode_bincode};
use crate::header::{FrameKind, Header, HEADER_LEN};
use crate::{ControlMsg, DecodeError, Hello, CONTROL_ENVELOPE_VERSION, PROTOCOL_VERSION};

/// How far a peer has taken a write or flush when it acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckLevel {
    /// In the peer's memory (`memory` mode completes here).
    Received,
    /// On the peer's disk: written for a data frame, flushed for a flush frame.
    Durable,
}

/// One block write in the change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFrame {
    /// Position in the resource's change stream; overlapping writes apply in this order.
    pub seq: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// [`FLAG_ACK_RECEIVED`] or zero.
    pub flags: u8,
    /// [`crate::block_checksum`] of the payload, computed by the primary.
    pub checksum: u32,
    pub payload: Bytes,
}

impl DataFrame {
    /// Fixed part of the data body: seq, offset, length, checksum.
    pub const FIXED_LEN: usize = 8 + 8 + 4 + 4;

    /// The header and fixed fields; the payload is sent after it without copying.
    pub fn encode_head(&self) -> [u8; HEADER_LEN + Self::FIXED_LEN] {
        self.encode_head_as(FrameKind::Data)
    }

    /// As [`DataFrame::encode_head`] for a frame kind with the data layout.
    pub fn encode_head_as(&self, kind: FrameKind) -> [u8; HEADER_LEN + Self::FIXED_LEN] {
        let mut b = [0u8; HEADER_LEN + Self::FIXED_LEN];
        let body_len = Self::FIXED_LEN + self.payload.len();
        let h = Header { kind, flags: self.flags, body_len: body_len as u32 };
        b[..HEADER_LEN].copy_from_slice(&h.encode());
        let f = &mut b[HEADER_LEN..];
        f[0..8].copy_from_slice(&self.seq.to_le_bytes());
        f[8..16].copy_from_slice(&self.offset.to_le_bytes());
        f[16..20].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        f[20..24].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    pub fn wants_received_ack(&self) -> bool {
        self.flags & FLAG_ACK_RECEIVED != 0
    }

    /// Whether the payload still matches the checksum the primary computed.
    pub fn checksum_ok(&self) -> bool {
        crate::block_checksum(&self.payload) == self.checksum
    }

    pub fn end(&self) -> u64 {
        self.offset + self.payload.len() as u64
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(DataFrame),
    /// A barrier: closes the current epoch. Acked `Durable` once every earlier write is on
    /// the peer's stable storage.
    Flush {
        seq: u64,
        flags: u8,
    },
    /// Zero (deallocate) a byte range, ordered like a write.
    Discard {
        seq: u64,
        offset: u64,
        len: u64,
        flags: u8,
    },
    Ack {
        seq: u64,
        level: AckLevel,
    },
    /// Liveness probe; the receiver answers with `reply: true` and the same nonce.
    Heartbeat {
        nonce: u64,
        reply: bool,
    },
    /// Handshake. `body` is only decoded (with [`Frame::hello_body`]) when `version` is ours.
    Hello {
        version: u32,
        body: Bytes,
    },
    Control(ControlMsg),
    /// A block copied by a resync, on the resync stream. `seq` is the source's change-stream
    /// position when it read the block: replicated writes with a higher seq are newer.
    ResyncData(DataFrame),
    /// Checksum-based resync: the source's hashes of a range, one [`crate::BlockHash`] per
    /// [`VERIFY_BLOCK`]; the target answers which blocks of its copy hash differently.
    ResyncCheck {
        seq: u64,
        offset: u64,
        hashes: Bytes,
    },
    /// Bit `i` (LSB first) set: block `i` of the checked range differs on the target.
    CheckReply {
        seq: u64,
        differ: Bytes,
    },
    /// Online verify, in the change stream: hash `[offset, +len)` as of this point.
    Verify {
        seq: u64,
        offset: u64,
        len: u32,
    },
    /// The target's hashes of the verified range, one [`crate::BlockHash`] per 4 KiB block.
    VerifyReply {
        seq: u64,
        hashes: Bytes,
    },
}

/// Granularity of online verify: one hash per block of this size.
pub const VERIFY_BLOCK: u32 = 4096;

/// On data, flush and discard frames: the sender also wants an [`AckLevel::Received`] ack
/// as soon as the frame arrives (`memory` mode). A `Durable` ack is always sent.
pub const FLAG_ACK_RECEIVED: u8 = 1;
/// On data and resync-data frames: the payload is lz4-compressed (block format); the fixed
/// part declares the uncompressed length and checksum.
pub const FLAG_LZ4: u8 = 2;
/// As [`FLAG_LZ4`], zstd.
pub const FLAG_ZSTD: u8 = 4;

const ACK_RECEIVED: u8 = 1;
const ACK_DURABLE: u8 = 2;
const HEARTBEAT_REPLY: u8 = 1;

impl Frame {
    /// A hello frame of this build's protocol version.
    pub fn hello(h: &Hello) -> Self {
        let mut body = Vec::new();
        encode_bincode(h, &mut body);
        Frame::Hello { version: PROTOCOL_VERSION, body: body.into() }
    }

    /// Decodes the body of a hello frame of our protocol version.
    pub fn hello_body(body: &[u8]) -> Result<Hello, DecodeError> {
        decode_bincode(body)
    }

    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Data(_) => FrameKind::Data,
            Frame::Flush { .. } => FrameKind::Flush,
            Frame::Discard { .. } => FrameKind::Discard,
            Frame::Ack { .. } => FrameKind::Ack,
            Frame::Heartbeat { .. } => FrameKind::Heartbeat,
            Frame::Hello { .. } => FrameKind::Hello,
            Frame::Control(_) => FrameKind::Control,
            Frame::ResyncData(_) => FrameKind::ResyncData,
            Frame::ResyncCheck { .. } => FrameKind::ResyncCheck,
            Frame::CheckReply { .. } => FrameKind::CheckReply,
            Frame::Verify { .. } => FrameKind::Verify,
            Frame::VerifyReply { .. } => FrameKind::VerifyReply,
        }
    }

    /// Encodes the frame as one or two chunks ready for a stream: the head, and for data
    /// frames the payload (shared, not copied).
    pub fn encode_chunks(&self) -> (Bytes, Option<Bytes>) {
        match self {
            Frame::Data(d) => (Bytes::copy_from_slice(&d.encode_head()), Some(d.payload.clone())),
            Frame::ResyncData(d) => {
                (Bytes::copy_from_slice(&d.encode_head_as(FrameKind::ResyncData)), Some(d.payload.clone()))
            }
            other => (Bytes::from(other.encode_small()), None),
        }
    }

    /// As [`Frame::encode_chunks`], with a data payload compressed by `c` where that pays.
    pub fn encode_chunks_compressed(&self, c: crate::Compression) -> (Bytes, Option<Bytes>) {
        let (d, kind) = match self {
            Frame::Data(d) => (d, FrameKind::Data),
            Frame::ResyncData(d) => (d, FrameKind::ResyncData),
            _ => return self.encode_chunks(),
        };
        match crate::compress::compress(c, &d.payload) {
            Some((flag, z)) => (
                Bytes::copy_from_slice(&crate::compress::encode_compressed_head(d, kind, flag, &z)),
                Some(Bytes::from(z)),
            ),
            None => self.encode_chunks(),
        }
    }

    /// Encodes the whole frame into one buffer (copies a data payload).
    pub fn encode_to_vec(&self) -> Vec<u8> {
        match self {
            Frame::Data(_) | Frame::ResyncData(_) => {
                let (head, payload) = self.encode_chunks();
                let mut v = head.to_vec();
                v.extend_from_slice(&payload.unwrap_or_default());
                v
            }
            other => other.encode_small(),
        }
    }

    fn encode_small(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(32);
        let flags = match self {
            Frame::Data(_) | Frame::ResyncData(_) => unreachable!("data frames are encoded by encode_head"),
            Frame::ResyncCheck { seq, offset, hashes } => {
                body.extend_from_slice(&seq.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(hashes);
                0
            }
            Frame::CheckReply { seq, differ } => {
                body.extend_from_slice(&seq.to_le_bytes());
                body.extend_from_slice(differ);
                0
            }
            Frame::Verify { seq, offset, len } => {
                body.extend_from_slice(&seq.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                0
            }
            Frame::VerifyReply { seq, hashes } => {
                body.extend_from_slice(&seq.to_le_bytes());
                body.extend_from_slice(&((hashes.len() / 16) as u32).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                body.extend_from_slice(hashes);
                0
            }
            Frame::Flush { seq, flags } => {
                body.extend_from_slice(&seq.to_le_bytes());
                *flags
            }
            Frame::Discard { seq, offset, len, flags } => {
                body.extend_from_slice(&seq.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
                *flags
            }
            Frame::Ack { seq, level } => {
                body.extend_from_slice(&seq.to_le_bytes());
                match level {
                    AckLevel::Received => ACK_RECEIVED,
                    AckLevel::Durable => ACK_DURABLE,
                }
            }
            Frame::Heartbeat { nonce, reply } => {
                body.extend_from_slice(&nonce.to_le_bytes());
                if *reply {
                    HEARTBEAT_REPLY
                } else {
                    0
                }
            }
            Frame::Hello { version, body: b } => {
                body.extend_from_slice(&version.to_le_bytes());
                body.extend_from_slice(b);
                0
            }
            Frame::Control(msg) => {
                body.push(CONTROL_ENVELOPE_VERSION);
                encode_bincode(msg, &mut body);
                0
            }
        };
        let h = Header { kind: self.kind(), flags, body_len: body.len() as u32 };
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(&body);
        out
    }
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn exact(kind: FrameKind, body: &[u8], need: usize) -> Result<(), DecodeError> {
    if body.len() != need {
        return Err(DecodeError::WrongLength { kind: kind.name(), len: body.len(), need });
    }
    Ok(())
}

/// A range in a resync or verify request: non-empty, at most one maximal payload, no overflow.
fn check_range_len(offset: u64, len: u32) -> Result<(), DecodeError> {
    if len == 0 || len as usize > crate::MAX_DATA_PAYLOAD || offset.checked_add(len as u64).is_none() {
        return Err(DecodeError::RangeOverflow { offset, len: len as u64 });
    }
    Ok(())
}

fn no_flags(kind: FrameKind, flags: u8) -> Result<(), DecodeError> {
    only_flags(kind, flags, 0)
}

fn only_flags(kind: FrameKind, flags: u8, allowed: u8) -> Result<(), DecodeError> {
    if flags & !allowed != 0 {
        return Err(DecodeError::UnknownFlags { kind: kind.name(), flags });
    }
    Ok(())
}

/// Decodes a data or resync-data frame from its fixed part and its payload.
pub(crate) fn decode_data(
    h: Header,
    fixed: &[u8; DataFrame::FIXED_LEN],
    payload: Bytes,
) -> Result<Frame, DecodeError> {
    match decode_data_deferred(h, fixed, payload)? {
        Decoded::Frame(f) => Ok(f),
        Decoded::Compressed(c) => c.decompress(),
    }
}

/// As [`decode_data`], except that a compressed payload is checked but not decompressed:
/// everything but the codec's own output is validated here, so a [`CompressedFrame`] only
/// has the decompression left to fail.
pub(crate) fn decode_data_deferred(
    h: Header,
    fixed: &[u8; DataFrame::FIXED_LEN],
    payload: Bytes,
) -> Result<Decoded, DecodeError> {
    let codecs = FLAG_LZ4 | FLAG_ZSTD;
    let allowed = if h.kind == FrameKind::Data { FLAG_ACK_RECEIVED | codecs } else { codecs };
    only_flags(h.kind, h.flags, allowed)?;
    let seq = le_u64(&fixed[0..]);
    let offset = le_u64(&fixed[8..]);
    let declared = le_u32(&fixed[16..]);
    let checksum = le_u32(&fixed[20..]);
    let codec = h.flags & codecs;
    let h = Header { flags: h.flags & !codecs, ..h };
    match codec {
        0 => {}
        FLAG_LZ4 | FLAG_ZSTD => {
            crate::compress::check_declared(declared)?;
            if offset.checked_add(declared as u64).is_none() {
                return Err(DecodeError::RangeOverflow { offset, len: declared as u64 });
            }
            return Ok(Decoded::Compressed(CompressedFrame {
                kind: h.kind,
                codec,
                frame: DataFrame { seq, offset, flags: h.flags, checksum, payload },
                declared,
            }));
        }
        _ => return Err(DecodeError::UnknownFlags { kind: h.kind.name(), flags: h.flags | codec }),
    }
    finish_data(h.kind, DataFrame { seq, offset, flags: h.flags, checksum, payload }, declared)
        .map(Decoded::Frame)
}

/// The checks on a data frame whose payload is as written (received so, or decompressed).
fn finish_data(kind: FrameKind, d: DataFrame, declared: u32) -> Result<Frame, DecodeError> {
    if d.payload.len() != declared as usize {
        return Err(DecodeError::LengthMismatch { declared, actual: d.payload.len() });
    }
    if d.payload.is_empty() {
        return Err(DecodeError::EmptyPayload);
    }
    if d.offset.checked_add(declared as u64).is_none() {
        return Err(DecodeError::RangeOverflow { offset: d.offset, len: declared as u64 });
    }
    Ok(if kind == FrameKind::Data { Frame::Data(d) } else { Frame::ResyncData(d) })
}

/// What the decoder found next: a whole frame, or a data frame whose compressed payload is
/// still to be decompressed (by [`CompressedFrame::decompress`], on whatever thread the
/// caller chooses: it is the one expensive step of decoding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    Compressed(CompressedFrame),
}

/// A data or resync-data frame as received with a compressed payload. Its header and fixed
/// part are already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedFrame {
    kind: FrameKind,
    /// [`FLAG_LZ4`] or [`FLAG_ZSTD`].
    codec: u8,
    /// The frame with the compressed bytes as its payload and the codec flag removed.
    frame: DataFrame,
    /// The uncompressed length the sender declared.
    declared: u32,
}

impl CompressedFrame {
    /// Bytes on the wire (the compressed payload).
    pub fn wire_len(&self) -> usize {
        self.frame.payload.len()
    }

    /// The frame as written: decompresses the payload into an aligned buffer of exactly the
    /// declared length and checks it like an uncompressed frame.
    pub fn decompress(self) -> Result<Frame, DecodeError> {
        let CompressedFrame { kind, codec, mut frame, declared } = self;
        frame.payload = crate::compress::decompress(codec, declared, &frame.payload)?;
        finish_data(kind, frame, declared)
    }
}

/// Decodes a frame body whose header has been validated and whose length is within limits.
/// `body` is handed in as `Bytes` so a data payload is a slice of it, not a copy.
pub(crate) fn decode_body(h: Header, body: Bytes) -> Result<Frame, DecodeError> {
    let kind = h.kind;
    Ok(match kind {
        FrameKind::Data | FrameKind::ResyncData => {
            if body.len() < DataFrame::FIXED_LEN {
                return Err(DecodeError::TooShort {
                    kind: kind.name(),
                    len: body.len(),
                    need: DataFrame::FIXED_LEN,
                });
            }
            let mut fixed = [0u8; DataFrame::FIXED_LEN];
            fixed.copy_from_slice(&body[..DataFrame::FIXED_LEN]);
            decode_data(h, &fixed, body.slice(DataFrame::FIXED_LEN..))?
        }
        FrameKind::ResyncCheck => {
            no_flags(kind, h.flags)?;
            let hashes = body.len().saturating_sub(16);
            if body.len() < 16 + 16 || !hashes.is_multiple_of(16) {
                return Err(DecodeError::WrongLength { kind: kind.name(), len: body.len(), need: 16 + 16 });
            }
            let (seq, offset) = (le_u64(&body), le_u64(&body[8..]));
            check_range_len(offset, (hashes / 16) as u32 * VERIFY_BLOCK)?;
            Frame::ResyncCheck { seq, offset, hashes: body.slice(16..) }
        }
        FrameKind::CheckReply => {
            no_flags(kind, h.flags)?;
            if body.len() < 9 {
                return Err(DecodeError::TooShort { kind: kind.name(), len: body.len(), need: 9 });
            }
            Frame::CheckReply { seq: le_u64(&body), differ: body.slice(8..) }
        }
        FrameKind::Verify => {
            exact(kind, &body, 24)?;
            no_flags(kind, h.flags)?;
            let (seq, offset, len) = (le_u64(&body), le_u64(&body[8..]), le_u32(&body[16..]));
            check_range_len(offset, len)?;
            Frame::Verify { seq, offset, len }
        }
        FrameKind::VerifyReply => {
            if body.len() < 16 {
                return Err(DecodeError::TooShort { kind: kind.name(), len: body.len(), need: 16 });
            }
            no_flags(kind, h.flags)?;
            let count = le_u32(&body[8..]) as usize;
            let need = 16 + count * 16;
            if body.len() != need {
                return Err(DecodeError::WrongLength { kind: kind.name(), len: body.len(), need });
            }
            Frame::VerifyReply { seq: le_u64(&body), hashes: body.slice(16..) }
        }
        FrameKind::Flush => {
            exact(kind, &body, 8)?;
            only_flags(kind, h.flags, FLAG_ACK_RECEIVED)?;
            Frame::Flush { seq: le_u64(&body), flags: h.flags }
        }
        FrameKind::Discard => {
            exact(kind, &body, 24)?;
            only_flags(kind, h.flags, FLAG_ACK_RECEIVED)?;
            let (seq, offset, len) = (le_u64(&body), le_u64(&body[8..]), le_u64(&body[16..]));
            if offset.checked_add(len).is_none() {
                return Err(DecodeError::RangeOverflow { offset, len });
            }
            Frame::Discard { seq, offset, len, flags: h.flags }
        }
        FrameKind::Ack => {
            exact(kind, &body, 8)?;
            let level = match h.flags {
                ACK_RECEIVED => AckLevel::Received,
                ACK_DURABLE => AckLevel::Durable,
                flags => return Err(DecodeError::UnknownFlags { kind: kind.name(), flags }),
            };
            Frame::Ack { seq: le_u64(&body), level }
        }
        FrameKind::Heartbeat => {
            exact(kind, &body, 8)?;
            let reply = match h.flags {
                0 => false,
                HEARTBEAT_REPLY => true,
                flags => return Err(DecodeError::UnknownFlags { kind: kind.name(), flags }),
            };
            Frame::Heartbeat { nonce: le_u64(&body), reply }
        }
        FrameKind::Hello => {
            if body.len() < 4 {
                return Err(DecodeError::TooShort { kind: kind.name(), len: body.len(), need: 4 });
            }
            no_flags(kind, h.flags)?;
            Frame::Hello { version: le_u32(&body), body: body.slice(4..) }
        }
        FrameKind::Control => {
            if body.is_empty() {
                return Err(DecodeError::TooShort { kind: kind.name(), len: 0, need: 1 });
            }
            no_flags(kind, h.flags)?;
            if body[0] != CONTROL_ENVELOPE_VERSION {
                return Err(DecodeError::EnvelopeVersion {
                    found: body[0],
                    supported: CONTROL_ENVELOPE_VERSION,
                });
            }
            Frame::Control(decode_bincode(&body[1..])?)
        }
    })
}
