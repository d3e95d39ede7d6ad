//! Frames over QUIC streams: the encoder/decoder from `tandem-protocol` on quinn's chunks,
//! and the pump that turns a bidirectional stream into a [`Link`] for the engine.

use bytes::Bytes;
use quinn::{RecvStream, SendStream, VarInt};
use std::sync::Arc;

use tandem_protocol::{Compression, ControlMsg, DecodeError, Frame, FrameDecoder};
use tandem_replicator::Counter;
use tandem_replicator::{Link, LINK_CAPACITY};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::close_code;

#[derive(Debug, Error)]
pub enum RecvError {
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
}

pub struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub fn new(recv: RecvStream) -> Self {
        Self { recv, decoder: FrameDecoder::default() }
    }

    /// The next frame; `Ok(None)` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, RecvError> {
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                return Ok(Some(f));
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
}

/// Block data sent to a peer: payload bytes as written, and as they went on the wire.
#[derive(Debug, Default)]
pub struct WireCounts {
    pub data_bytes: Counter,
    pub wire_bytes: Counter,
}

impl FrameWriter {
    pub fn new(send: SendStream) -> Self {
        Self { send, chunks: Vec::new(), compression: Compression::None, counts: None }
    }

    /// Compresses block data sent through this writer where that pays (WAN peers), and
    /// counts it in `counts`.
    pub fn with_compression(mut self, c: Compression, counts: Arc<WireCounts>) -> Self {
        self.compression = c;
        self.counts = Some(counts);
        self
    }

    fn push(&mut self, f: &Frame) {
        let (head, payload) = match self.compression {
            Compression::None => f.encode_chunks(),
            c => f.encode_chunks_compressed(c),
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

/// Pumps frames between a stream pair and the engine, until either side ends or `cancel`
/// fires (the resource's session with the peer ended). A malformed frame ends this stream
/// only, with the decoder's reason logged: nothing the peer sent after it can be trusted or
/// even located on this stream, but the connection's other streams have their own framing,
/// so other resources go on.
pub fn spawn_link(mut w: FrameWriter, mut r: FrameReader, peer: String, cancel: CancellationToken) -> Link {
    let (to_net, mut from_engine) = mpsc::unbounded_channel::<Frame>();
    let (to_engine, from_net) = mpsc::channel::<Frame>(LINK_CAPACITY);
    let writer_cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            let f = tokio::select! {
                f = from_engine.recv() => match f {
                    Some(f) => f,
                    None => break,
                },
                _ = writer_cancel.cancelled() => {
                    let _ = w.send.reset(VarInt::from_u32(close_code::SHUTDOWN));
                    return;
                }
            };
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
            let next = tokio::select! {
                n = r.next() => n,
                _ = cancel.cancelled() => {
                    let _ = r.recv.stop(VarInt::from_u32(close_code::SHUTDOWN));
                    return;
                }
            };
            match next {
                Ok(Some(f)) => {
                    if to_engine.send(f).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(RecvError::Malformed(e)) => {
                    let reason = format!("malformed frame from {peer}: {e}");
                    error!("{reason}; ending this stream");
                    let _ = r.recv.stop(VarInt::from_u32(close_code::PROTOCOL_ERROR));
                    // The engine ends the resource's session with this reason.
                    let _ = to_engine.send(Frame::Control(ControlMsg::Error { reason })).await;
                    return;
                }
                Err(RecvError::Read(e)) => {
                    debug!(peer = %peer, "stream ended: {e}");
                    return;
                }
            }
        }
    });
    Link { tx: to_net, rx: from_net }
}
