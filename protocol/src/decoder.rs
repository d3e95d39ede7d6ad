//! Incremental decoder: feed it the chunks a stream delivers, take whole frames out.
//!
//! Chunks are kept as received (no copying into a staging buffer). A data frame's payload is
//! assembled once, directly into memory aligned to [`PAYLOAD_ALIGN`], so the standby can
//! hand it to an O_DIRECT write without another copy. A compressed payload is not copied
//! into aligned memory (it is decompressed into aligned memory instead), and
//! [`FrameDecoder::next_decoded`] leaves the decompression to the caller, so a receiver can
//! run it off its network thread.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

use crate::frame::{decode_body, decode_data_deferred, Decoded, FLAG_LZ4, FLAG_ZSTD};
use crate::header::{FrameKind, Header, HEADER_LEN};
use crate::{DataFrame, DecodeError, Frame, MAX_CONTROL_BODY, MAX_DATA_PAYLOAD};

/// Alignment of decoded data payloads (the strictest O_DIRECT alignment in common use).
pub const PAYLOAD_ALIGN: usize = 4096;

/// Largest body the decoder will buffer for a frame kind.
fn body_limit(kind: FrameKind, max_payload: usize) -> usize {
    match kind {
        FrameKind::Data | FrameKind::ResyncData => DataFrame::FIXED_LEN + max_payload,
        FrameKind::ResyncCheck => 16 + (max_payload / crate::frame::VERIFY_BLOCK as usize) * 16,
        FrameKind::CheckReply => 8 + (max_payload / crate::frame::VERIFY_BLOCK as usize).div_ceil(8),
        FrameKind::Verify => 24,
        FrameKind::VerifyReply => 16 + (max_payload / crate::frame::VERIFY_BLOCK as usize) * 16,
        FrameKind::Hello | FrameKind::Control => MAX_CONTROL_BODY + 8,
        FrameKind::Flush | FrameKind::Ack | FrameKind::Heartbeat => 8,
        FrameKind::Discard => 24,
    }
}

/// Turns a byte stream into frames. Memory use is bounded by one frame of at most the
/// configured limit plus whatever the caller pushes before pulling frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    max_payload: usize,
    /// Header of the frame whose body we are waiting for, once validated.
    pending: Option<Header>,
    /// After an error the stream position is unknown; every later call repeats the error.
    failed: Option<DecodeError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_DATA_PAYLOAD)
    }
}

impl FrameDecoder {
    pub fn new(max_payload: usize) -> Self {
        Self { chunks: VecDeque::new(), buffered: 0, max_payload, pending: None, failed: None }
    }

    /// Appends bytes received from the stream (copied).
    pub fn push(&mut self, chunk: &[u8]) {
        self.push_bytes(Bytes::copy_from_slice(chunk));
    }

    /// Appends a received chunk without copying it.
    pub fn push_bytes(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.buffered += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed, or the first
    /// protocol violation (after which the stream cannot be resynchronised). A compressed
    /// payload is decompressed here, on the caller's thread.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        match self.next_decoded()? {
            None => Ok(None),
            Some(Decoded::Frame(f)) => Ok(Some(f)),
            Some(Decoded::Compressed(c)) => match c.decompress() {
                Ok(f) => Ok(Some(f)),
                Err(e) => {
                    self.failed = Some(e.clone());
                    Err(e)
                }
            },
        }
    }

    /// As [`FrameDecoder::next_frame`], but a data frame with a compressed payload comes
    /// out as [`Decoded::Compressed`], validated except for the decompression itself. The
    /// caller must decompress it before it uses any frame that follows (stream order), and
    /// treat a decompression error like any other protocol violation.
    pub fn next_decoded(&mut self) -> Result<Option<Decoded>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.try_next() {
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
            ok => ok,
        }
    }

    /// Copies the next `dst.len()` buffered bytes into `dst` and consumes them.
    fn copy_out(&mut self, dst: &mut [u8]) {
        let mut at = 0;
        while at < dst.len() {
            let front = self.chunks.front_mut().expect("caller checked buffered");
            let n = front.len().min(dst.len() - at);
            dst[at..at + n].copy_from_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            at += n;
        }
        self.buffered -= dst.len();
    }

    /// Takes the next `n` bytes: a slice of the front chunk when it holds them all,
    /// otherwise one copy into a new buffer.
    fn take(&mut self, n: usize) -> Bytes {
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= n {
                let b = front.split_to(n);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                self.buffered -= n;
                return b;
            }
        }
        let mut v = vec![0u8; n];
        self.copy_out(&mut v);
        Bytes::from(v)
    }

    /// Takes the next `n` bytes into a buffer whose start is aligned to [`PAYLOAD_ALIGN`].
    fn take_aligned(&mut self, n: usize) -> Bytes {
        let mut v: Vec<u8> = Vec::with_capacity(n + PAYLOAD_ALIGN);
        let pad = v.as_ptr().align_offset(PAYLOAD_ALIGN).min(PAYLOAD_ALIGN);
        v.resize(pad, 0);
        let mut left = n;
        while left > 0 {
            let front = self.chunks.front_mut().expect("caller checked buffered");
            let k = front.len().min(left);
            v.extend_from_slice(&front[..k]);
            front.advance(k);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            left -= k;
        }
        self.buffered -= n;
        Bytes::from(v).slice(pad..)
    }

    fn try_next(&mut self) -> Result<Option<Decoded>, DecodeError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if self.buffered < HEADER_LEN {
                    return Ok(None);
                }
                let mut raw = [0u8; HEADER_LEN];
                self.copy_out(&mut raw);
                let h = Header::decode(&raw)?;
                let limit = body_limit(h.kind, self.max_payload);
                if h.body_len as usize > limit {
                    return Err(DecodeError::TooLarge {
                        kind: h.kind.name(),
                        len: h.body_len as usize,
                        max: limit,
                    });
                }
                self.pending = Some(h);
                h
            }
        };
        let len = header.body_len as usize;
        if self.buffered < len {
            return Ok(None);
        }
        self.pending = None;
        if matches!(header.kind, FrameKind::Data | FrameKind::ResyncData) && len >= DataFrame::FIXED_LEN {
            let mut fixed = [0u8; DataFrame::FIXED_LEN];
            self.copy_out(&mut fixed);
            let n = len - DataFrame::FIXED_LEN;
            let payload = if header.flags & (FLAG_LZ4 | FLAG_ZSTD) != 0 {
                // Decompressed into aligned memory later: no point aligning the wire bytes.
                self.take(n)
            } else {
                self.take_aligned(n)
            };
            return decode_data_deferred(header, &fixed, payload).map(Some);
        }
        let body = self.take(len);
        decode_body(header, body).map(|f| Some(Decoded::Frame(f)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_is_refused_before_buffering() {
        let mut d = FrameDecoder::new(4096);
        let mut h = Header { kind: FrameKind::Data, flags: 0, body_len: u32::MAX }.encode().to_vec();
        h.extend_from_slice(&[0; 16]);
        d.push(&h);
        assert!(matches!(d.next_frame(), Err(DecodeError::TooLarge { .. })));
        // sticky
        assert!(matches!(d.next_frame(), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn bad_magic() {
        let mut d = FrameDecoder::default();
        d.push(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_frame(), Err(DecodeError::BadMagic { .. })));
    }

    #[test]
    fn data_payload_is_aligned_across_chunks() {
        let payload = Bytes::from(vec![7u8; 8192]);
        let f = Frame::Data(DataFrame {
            seq: 1,
            offset: 4096,
            flags: 0,
            checksum: crate::block_checksum(&payload),
            payload,
        });
        let bytes = f.encode_to_vec();
        let mut d = FrameDecoder::default();
        for c in bytes.chunks(1000) {
            d.push(c);
        }
        match d.next_frame().unwrap() {
            Some(Frame::Data(got)) => {
                assert_eq!(got.payload.as_ptr() as usize % PAYLOAD_ALIGN, 0);
                assert!(got.checksum_ok());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(d.buffered(), 0);
    }
}
