//! Frames over QUIC streams: the encoder/decoder from `tandem-protocol` on quinn's chunks,
//! and the pump that turns a bidirectional stream into a [`Link`] for the engine.

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use std::sync::Arc;

use tandem_protocol::{CompressedFrame, Compression, DecodeError, Decoded, Frame, FrameDecoder};
use tandem_replicator::Counter;
use tandem_replicator::{Link, LINK_CAPACITY};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, error};

use super::close_code;

#[derive(Debug, Error)]
pub enum RecvError {
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
}

/// Encodes a frame for a link with the given compression: [`Frame::encode_chunks_compressed`]
/// in the agent; tests substitute an instrumented one.
pub type Encode = Arc<dyn Fn(&Frame, Compression) -> (Bytes, Option<Bytes>) + Send + Sync>;

/// Decompresses a received frame: [`CompressedFrame::decompress`] in the agent; tests
/// substitute an instrumented one.
pub type Decompress = Arc<dyn Fn(CompressedFrame) -> Result<Frame, DecodeError> + Send + Sync>;

pub struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    decompress: Decompress,
}

impl FrameReader {
    pub fn new(recv: RecvStream) -> Self {
        Self { recv, decoder: FrameDecoder::default(), decompress: Arc::new(CompressedFrame::decompress) }
    }

    /// Decompresses received block data with `d` instead of [`CompressedFrame::decompress`].
    pub fn with_decompress(mut self, d: Decompress) -> Self {
        self.decompress = d;
        self
    }

    /// The next frame; `Ok(None)` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, RecvError> {
        match self.next_decoded().await? {
            Some(Decoded::Compressed(c)) => Ok(Some((self.decompress)(c)?)),
            Some(Decoded::Frame(f)) => Ok(Some(f)),
            None => Ok(None),
        }
    }

    /// The next frame, a compressed one not yet decompressed; `Ok(None)` at the end of the
    /// stream.
    async fn next_decoded(&mut self) -> Result<Option<Decoded>, RecvError> {
        loop {
            if let Some(d) = self.decoder.next_decoded()? {
                return Ok(Some(d));
            }
            match self.recv.read_chunk(1 << 20, true).await? {
                Some(chunk) => self.decoder.push_bytes(chunk.bytes),
                None => return Ok(None),
            }
        }
    }
}

pub struct FrameWriter {
    send: SendStream,
    chunks: Vec<Bytes>,
    compression: Compression,
    counts: Option<Arc<WireCounts>>,
    encode: Encode,
}

/// Block data sent to a peer: payload bytes as written, and as they went on the wire.
#[derive(Debug, Default)]
pub struct WireCounts {
    pub data_bytes: Counter,
    pub wire_bytes: Counter,
}

impl FrameWriter {
    pub fn new(send: SendStream) -> Self {
        Self {
            send,
            chunks: Vec::new(),
            compression: Compression::None,
            counts: None,
            encode: Arc::new(Frame::encode_chunks_compressed),
        }
    }

    /// Compresses block data sent through this writer where that pays (WAN peers), and
    /// counts it in `counts`.
    pub fn with_compression(mut self, c: Compression, counts: Arc<WireCounts>) -> Self {
        self.compression = c;
        self.counts = Some(counts);
        self
    }

    /// Encodes frames of a compressed link with `e` instead of
    /// [`Frame::encode_chunks_compressed`].
    pub fn with_encode(mut self, e: Encode) -> Self {
        self.encode = e;
        self
    }

    fn push(&mut self, f: &Frame) {
        let (head, payload) = match self.compression {
            Compression::None => f.encode_chunks(),
            c => (self.encode)(f, c),
        };
        if let (Some(c), Frame::Data(d) | Frame::ResyncData(d), Some(p)) = (&self.counts, f, &payload) {
            c.data_bytes.add(d.payload.len() as u64);
            c.wire_bytes.add(p.len() as u64);
        }
        self.chunks.push(head);
        if let Some(p) = payload {
            self.chunks.push(p);
        }
    }

    pub async fn send(&mut self, f: &Frame) -> Result<(), quinn::WriteError> {
        self.push(f);
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), quinn::WriteError> {
        let r = self.send.write_all_chunks(&mut self.chunks).await;
        self.chunks.clear();
        r
    }

    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// Pumps frames between a stream pair and the engine. A malformed frame closes the whole
/// connection with the decoder's reason: the peer is broken or hostile, and nothing it sent
/// after the bad frame can be trusted or even located.
pub fn spawn_link(conn: Connection, mut w: FrameWriter, mut r: FrameReader, peer: String) -> Link {
    let (to_net, mut from_engine) = mpsc::unbounded_channel::<Frame>();
    let (to_engine, from_net) = mpsc::channel::<Frame>(LINK_CAPACITY);
    tokio::spawn(async move {
        while let Some(f) = from_engine.recv().await {
            w.push(&f);
            // Batch whatever else is ready into one write.
            while w.chunks.len() < 128 {
                match from_engine.try_recv() {
                    Ok(f) => w.push(&f),
                    Err(_) => break,
                }
            }
            if w.flush().await.is_err() {
                return;
            }
        }
        w.finish();
    });
    tokio::spawn(async move {
        loop {
            match r.next().await {
                Ok(Some(f)) => {
                    if to_engine.send(f).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(RecvError::Malformed(e)) => {
                    let reason = format!("malformed frame from {peer}: {e}");
                    error!("{reason}; closing the connection");
                    conn.close(VarInt::from_u32(close_code::PROTOCOL_ERROR), reason.as_bytes());
                    return;
                }
                Err(RecvError::Read(e)) => {
                    debug!(peer = %peer, "replication stream ended: {e}");
                    return;
                }
            }
        }
    });
    Link { tx: to_net, rx: from_net }
}
