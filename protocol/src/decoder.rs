//! Incremental decoder: feed it the chunks a stream delivers, take whole frames out.

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::decode_body;
use crate::header::{FrameKind, Header, HEADER_LEN};
use crate::{DataFrame, DecodeError, Frame, MAX_CONTROL_BODY, MAX_DATA_PAYLOAD};

/// Largest body the decoder will buffer for a frame kind.
fn body_limit(kind: FrameKind, max_payload: usize) -> usize {
    match kind {
        FrameKind::Data => DataFrame::FIXED_LEN + max_payload,
        FrameKind::Hello | FrameKind::Control => MAX_CONTROL_BODY + 8,
        FrameKind::Flush | FrameKind::Ack | FrameKind::Heartbeat => 8,
        FrameKind::Discard => 24,
    }
}

/// Turns a byte stream into frames. Memory use is bounded by one frame of at most the
/// configured limit plus whatever the caller pushes before pulling frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
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
        Self {
            buf: BytesMut::new(),
            max_payload,
            pending: None,
            failed: None,
        }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed, or the first
    /// protocol violation (after which the stream cannot be resynchronised).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
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

    fn try_next(&mut self) -> Result<Option<Frame>, DecodeError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if self.buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&self.buf[..HEADER_LEN]);
                let h = Header::decode(&raw)?;
                let limit = body_limit(h.kind, self.max_payload);
                if h.body_len as usize > limit {
                    return Err(DecodeError::TooLarge {
                        kind: h.kind.name(),
                        len: h.body_len as usize,
                        max: limit,
                    });
                }
                self.buf.advance(HEADER_LEN);
                // Reserve only after the length was checked against the cap.
                self.buf.reserve(h.body_len as usize);
                self.pending = Some(h);
                h
            }
        };
        let len = header.body_len as usize;
        if self.buf.len() < len {
            return Ok(None);
        }
        self.pending = None;
        let body: Bytes = self.buf.split_to(len).freeze();
        decode_body(header, body).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_is_refused_before_buffering() {
        let mut d = FrameDecoder::new(4096);
        let mut h = Header {
            kind: FrameKind::Data,
            flags: 0,
            body_len: u32::MAX,
        }
        .encode()
        .to_vec();
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
}
