//! Frames over QUIC streams: the encoder/decoder from `tandem-protocol` on quinn's chunks,
//! and the pump that turns a bidirectional stream into a [`Link`] for the engine.
//!
//! The agent runs QUIC on one runtime thread, shared by every peer, the acks that complete
//! writes and the heartbeats. Compressing or decompressing block data is the one CPU-heavy
//! step of framing, so it never runs there: a link that compresses gets its own
//! `tandem-compress` thread between the engine and the network writer task, and a link on
//! which compressed frames arrive gets a `tandem-decompr` thread between the network reader
//! task and the engine (started at the first compressed frame). Each stage hands frames on
//! in the order it took them, so a stream's order holds end to end. Links without
//! compression keep the direct path: the writer task encodes (the head only; the payload is
//! shared, not copied) and writes, the reader task decodes and delivers, no hop added.
//! The queues between stages are bounded ([`ENCODED_BATCHES`], [`DECOMPRESS_QUEUE`]): a slow
//! network or a slow engine holds the worker back instead of letting a queue grow.

use bytes::Bytes;
use quinn::{RecvStream, SendStream, VarInt};
use std::sync::Arc;
use std::thread;

use tandem_protocol::{CompressedFrame, Compression, ControlMsg, DecodeError, Decoded, Frame, FrameDecoder};
use tandem_replicator::{stage_trace, Counter};
use tandem_replicator::{Link, LINK_CAPACITY};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

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
    /// Block data received, counted as it comes off the wire (compressed or not).
    counts: Option<Arc<WireCounts>>,
}

impl FrameReader {
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::default(),
            decompress: Arc::new(CompressedFrame::decompress),
            counts: None,
        }
    }

    /// Counts the block data received through this reader in `counts`: `wire_bytes` as
    /// received, `data_bytes` for blocks that arrived uncompressed.
    pub fn with_counts(mut self, counts: Arc<WireCounts>) -> Self {
        self.counts = Some(counts);
        self
    }

    /// Decompresses received block data with `d` instead of [`CompressedFrame::decompress`].
    pub fn with_decompress(mut self, d: Decompress) -> Self {
        self.decompress = d;
        self
    }

    /// The next frame, decompressed on the calling task (handshake, control stream, a
    /// stream's opening frame); `Ok(None)` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, RecvError> {
        match self.next_decoded().await? {
            Some(Decoded::Compressed(c)) => Ok(Some((self.decompress)(c)?)),
            Some(Decoded::Frame(f)) => Ok(Some(f)),
            None => Ok(None),
        }
    }

    /// The next frame, a compressed one not yet decompressed (see [`spawn_link`]);
    /// `Ok(None)` at the end of the stream.
    async fn next_decoded(&mut self) -> Result<Option<Decoded>, RecvError> {
        loop {
            if let Some(d) = self.decoder.next_decoded()? {
                if let Some(c) = &self.counts {
                    match &d {
                        Decoded::Frame(Frame::Data(f) | Frame::ResyncData(f)) => {
                            c.wire_bytes.add(f.payload.len() as u64);
                            c.data_bytes.add(f.payload.len() as u64);
                        }
                        Decoded::Compressed(f) => c.wire_bytes.add(f.wire_len() as u64),
                        Decoded::Frame(_) => {}
                    }
                }
                return Ok(Some(d));
            }
            match self.recv.read_chunk(1 << 20, true).await? {
                Some(chunk) => self.decoder.push_bytes(chunk.bytes),
                None => return Ok(None),
            }
        }
    }
}

/// Encoded batches the compression thread may have ready for the network writer. With
/// [`BATCH_CHUNKS`] and [`BATCH_BYTES`] this bounds the encoded data between the stages to a
/// few MiB per link.
pub const ENCODED_BATCHES: usize = 4;
/// A batch (one stream write) closes at this many chunks...
const BATCH_CHUNKS: usize = 128;
/// ... or once it holds this many encoded bytes (so a busy compressor hands data to the
/// network every MiB or so, not after 64 large blocks).
const BATCH_BYTES: usize = 1 << 20;
/// Received frames waiting for the decompression thread (each at most one compressed
/// block of at most `MAX_DATA_PAYLOAD`).
pub const DECOMPRESS_QUEUE: usize = 16;

/// How frames for one link become chunks: the link's compression, the function that
/// applies it, and the counters of block data sent. Cloned into the compression thread.
#[derive(Clone)]
struct Encoder {
    compression: Compression,
    counts: Option<Arc<WireCounts>>,
    encode: Encode,
}

impl Encoder {
    /// Appends the chunks for `f` to `out`; returns how many bytes they hold.
    fn encode_into(&self, f: &Frame, out: &mut Vec<Bytes>) -> usize {
        let (head, payload) = match self.compression {
            Compression::None => f.encode_chunks(),
            c => (self.encode)(f, c),
        };
        if let (Some(c), Frame::Data(d) | Frame::ResyncData(d), Some(p)) = (&self.counts, f, &payload) {
            c.data_bytes.add(d.payload.len() as u64);
            c.wire_bytes.add(p.len() as u64);
        }
        let n = head.len() + payload.as_ref().map_or(0, |p| p.len());
        out.push(head);
        out.extend(payload);
        n
    }
}

pub struct FrameWriter {
    send: SendStream,
    chunks: Vec<Bytes>,
    enc: Encoder,
}

/// Block data sent to (or received from) a peer: payload bytes as written, and as they
/// went on the wire.
#[derive(Debug, Default)]
pub struct WireCounts {
    pub data_bytes: Counter,
    pub wire_bytes: Counter,
}

impl FrameWriter {
    pub fn new(send: SendStream) -> Self {
        let enc = Encoder {
            compression: Compression::None,
            counts: None,
            encode: Arc::new(Frame::encode_chunks_compressed),
        };
        Self { send, chunks: Vec::new(), enc }
    }

    /// Compresses block data sent through this writer where that pays (WAN peers), and
    /// counts it in `counts`. Once the writer is a link's ([`spawn_link`]), the compression
    /// runs on the link's own thread.
    pub fn with_compression(mut self, c: Compression, counts: Arc<WireCounts>) -> Self {
        self.enc.compression = c;
        self.enc.counts = Some(counts);
        self
    }

    /// Encodes frames of a compressed link with `e` instead of
    /// [`Frame::encode_chunks_compressed`].
    pub fn with_encode(mut self, e: Encode) -> Self {
        self.enc.encode = e;
        self
    }

    /// Sends one frame, encoding it on the calling task (handshake and control frames).
    pub async fn send(&mut self, f: &Frame) -> Result<(), quinn::WriteError> {
        self.enc.encode_into(f, &mut self.chunks);
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

    /// Abandons the stream (the session it belongs to ended).
    fn reset(mut self) {
        let _ = self.send.reset(VarInt::from_u32(close_code::SHUTDOWN));
    }
}

/// Pumps frames between a stream pair and the engine, until either side ends or `cancel`
/// fires (the resource's session with the peer ended). A malformed frame — a compressed
/// block that does not decompress included — ends this stream only, and the engine gets a
/// `Control(Error)` with the reason, so it ends the resource's session: nothing the peer
/// sent after the bad frame can be trusted or even located on this stream, but the
/// connection's other streams have their own framing, so other resources go on.
///
/// If a worker thread cannot be started (the system is out of threads), the link still
/// works: it compresses or decompresses on the runtime thread, as logged.
pub fn spawn_link(w: FrameWriter, r: FrameReader, peer: String, cancel: CancellationToken) -> Link {
    let (to_net, from_engine) = mpsc::unbounded_channel::<Frame>();
    let (to_engine, from_net) = mpsc::channel::<Frame>(LINK_CAPACITY);
    if w.enc.compression == Compression::None {
        tokio::spawn(write_frames(w, from_engine, cancel.clone()));
    } else {
        // The thread gets its inputs once it exists, so a failed spawn leaves them here.
        let (start_tx, start_rx) = std::sync::mpsc::sync_channel(1);
        match thread::Builder::new().name("tandem-compress".into()).spawn(move || {
            if let Ok((enc, from_engine, to_writer)) = start_rx.recv() {
                compress_frames(enc, from_engine, to_writer);
            }
        }) {
            Ok(_) => {
                let (batches_tx, batches_rx) = mpsc::channel(ENCODED_BATCHES);
                let _ = start_tx.send((w.enc.clone(), from_engine, batches_tx));
                tokio::spawn(write_batches(w, batches_rx, cancel.clone()));
            }
            Err(e) => {
                warn!(peer = %peer, "cannot start a compression thread ({e}): compressing on the network thread");
                tokio::spawn(write_frames(w, from_engine, cancel.clone()));
            }
        }
    }
    tokio::spawn(read_frames(r, to_engine, peer, cancel));
    Link { tx: to_net, rx: from_net }
}

/// The writer task of an uncompressed link: encodes on the runtime (the head only; the
/// payload is shared, not copied) and batches whatever else is ready into one write.
async fn write_frames(
    mut w: FrameWriter,
    mut from_engine: mpsc::UnboundedReceiver<Frame>,
    cancel: CancellationToken,
) {
    loop {
        let f = tokio::select! {
            f = from_engine.recv() => match f {
                Some(f) => f,
                None => break,
            },
            _ = cancel.cancelled() => return w.reset(),
        };
        stage_trace::frame(&f, true);
        w.enc.encode_into(&f, &mut w.chunks);
        while w.chunks.len() < BATCH_CHUNKS {
            match from_engine.try_recv() {
                Ok(f) => {
                    stage_trace::frame(&f, true);
                    w.enc.encode_into(&f, &mut w.chunks);
                }
                Err(_) => break,
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    w.finish();
}

/// The compression thread of a link: takes frames from the engine in order, encodes them
/// into batches and hands the batches to [`write_batches`], waiting while
/// [`ENCODED_BATCHES`] are queued. Ends when the engine drops the link or the writer ends.
fn compress_frames(
    enc: Encoder,
    mut from_engine: mpsc::UnboundedReceiver<Frame>,
    to_writer: mpsc::Sender<Vec<Bytes>>,
) {
    while let Some(f) = from_engine.blocking_recv() {
        let mut batch = Vec::new();
        let mut bytes = enc.encode_into(&f, &mut batch);
        while batch.len() < BATCH_CHUNKS && bytes < BATCH_BYTES {
            match from_engine.try_recv() {
                Ok(f) => bytes += enc.encode_into(&f, &mut batch),
                Err(_) => break,
            }
        }
        if to_writer.blocking_send(batch).is_err() {
            return;
        }
    }
}

/// The writer task of a compressed link: writes the compression thread's batches in order,
/// joining those already queued into one write.
async fn write_batches(
    mut w: FrameWriter,
    mut batches: mpsc::Receiver<Vec<Bytes>>,
    cancel: CancellationToken,
) {
    loop {
        let b = tokio::select! {
            b = batches.recv() => match b {
                Some(b) => b,
                None => break,
            },
            _ = cancel.cancelled() => return w.reset(),
        };
        w.chunks = b;
        while w.chunks.len() < BATCH_CHUNKS {
            match batches.try_recv() {
                Ok(more) => w.chunks.extend(more),
                Err(_) => break,
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    w.finish();
}

/// The reader task of a link. Frames go straight to the engine until the first compressed
/// one; from then on every frame goes through the decompression thread, compressed or not,
/// so none overtakes a block still being decompressed.
async fn read_frames(
    mut r: FrameReader,
    to_engine: mpsc::Sender<Frame>,
    peer: String,
    cancel: CancellationToken,
) {
    let mut worker: Option<mpsc::Sender<Decoded>> = None;
    let mut inline = false;
    loop {
        let worker_gone = async {
            match &worker {
                Some(w) => w.closed().await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            n = r.next_decoded() => n,
            _ = cancel.cancelled() => {
                let _ = r.recv.stop(VarInt::from_u32(close_code::SHUTDOWN));
                return;
            }
            // The decompression thread ended the stream (a block did not decompress).
            _ = worker_gone => {
                let _ = r.recv.stop(VarInt::from_u32(close_code::PROTOCOL_ERROR));
                return;
            }
        };
        let d = match next {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(RecvError::Malformed(e)) => {
                let _ = r.recv.stop(VarInt::from_u32(close_code::PROTOCOL_ERROR));
                // Through the decompression thread if there is one: after what it holds.
                let report = Decoded::Frame(malformed(&peer, &e));
                match &worker {
                    Some(w) => {
                        let _ = w.send(report).await;
                    }
                    None => {
                        if let Decoded::Frame(f) = report {
                            let _ = to_engine.send(f).await;
                        }
                    }
                }
                return;
            }
            Err(RecvError::Read(e)) => {
                debug!(peer = %peer, "stream ended: {e}");
                return;
            }
        };
        if worker.is_none() && !inline {
            if let Decoded::Compressed(_) = d {
                let (tx, rx) = mpsc::channel(DECOMPRESS_QUEUE);
                let (decompress, to_engine, name) = (r.decompress.clone(), to_engine.clone(), peer.clone());
                match thread::Builder::new()
                    .name("tandem-decompr".into())
                    .spawn(move || decompress_frames(rx, decompress, to_engine, name))
                {
                    Ok(_) => worker = Some(tx),
                    Err(e) => {
                        warn!(
                            peer = %peer,
                            "cannot start a decompression thread ({e}): decompressing on the network thread"
                        );
                        inline = true;
                    }
                }
            }
        }
        let sent = match (&worker, d) {
            (Some(w), d) => w.send(d).await.is_ok(),
            (None, Decoded::Frame(f)) => {
                stage_trace::frame(&f, false);
                to_engine.send(f).await.is_ok()
            }
            (None, Decoded::Compressed(c)) => match (r.decompress)(c) {
                Ok(f) => to_engine.send(f).await.is_ok(),
                Err(e) => {
                    let _ = r.recv.stop(VarInt::from_u32(close_code::PROTOCOL_ERROR));
                    let _ = to_engine.send(malformed(&peer, &e)).await;
                    return;
                }
            },
        };
        if !sent {
            return;
        }
    }
}

/// The decompression thread of a link: decompresses in order and delivers to the engine,
/// waiting while the engine's queue is full. A block that does not decompress closes the
/// connection, as any malformed frame does.
fn decompress_frames(
    mut from_reader: mpsc::Receiver<Decoded>,
    decompress: Decompress,
    to_engine: mpsc::Sender<Frame>,
    peer: String,
) {
    while let Some(d) = from_reader.blocking_recv() {
        let f = match d {
            Decoded::Frame(f) => f,
            Decoded::Compressed(c) => match decompress(c) {
                Ok(f) => f,
                Err(e) => {
                    // The reader stops at the end of this stream's queue: the session ends.
                    let _ = to_engine.blocking_send(malformed(&peer, &e));
                    return;
                }
            },
        };
        if to_engine.blocking_send(f).is_err() {
            return;
        }
    }
}

/// What the engine gets for a malformed frame: the reason, as the peer's error, which ends
/// the resource's session.
fn malformed(peer: &str, e: &DecodeError) -> Frame {
    let reason = format!("malformed frame from {peer}: {e}");
    error!("{reason}; ending this stream");
    Frame::Control(ControlMsg::Error { reason })
}

#[cfg(test)]
mod tests {
    //! Links over a real QUIC connection on loopback, on a current-thread runtime like the
    //! agent's. The instrumented compressor and decompressor record the thread they run on;
    //! off the runtime thread they also hold the block until the test lets go, which shows
    //! the runtime serving other links meanwhile. On the runtime thread they must not hold
    //! (nothing could let go): they return at once and the thread check fails.

    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::thread::{self, ThreadId};
    use std::time::Duration;

    use tandem_protocol::{block_checksum, DataFrame, FrameKind, FLAG_ZSTD};

    use super::*;
    use crate::config::Node;
    use crate::tls::{self, Identity, PinnedPeers};
    use crate::transport::{Transport, TransportSettings};

    struct Pair {
        _a: Transport,
        _b: Transport,
        /// a's end (a dialed b) and b's end of the connection.
        ab: quinn::Connection,
        ba: quinn::Connection,
        _dir: tempfile::TempDir,
    }

    async fn connected_pair() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let (a_crt, a_key) = tls::keygen("a", dir.path(), false).unwrap();
        let (b_crt, b_key) = tls::keygen("b", dir.path(), false).unwrap();
        let mut pins = PinnedPeers::default();
        pins.insert("a", &tls::load_certs(&a_crt).unwrap()[0]);
        pins.insert("b", &tls::load_certs(&b_crt).unwrap()[0]);
        let settings = TransportSettings {
            stream_window: 8 << 20,
            heartbeat_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
            max_mtu: 1452,
            bbr: false,
            socket_buffer: 1 << 20,
        };
        let local = "127.0.0.1:0".parse().unwrap();
        let a =
            Transport::bind(Identity::load(&a_crt, &a_key).unwrap(), pins.clone(), settings.clone(), local)
                .unwrap();
        let b = Transport::bind(Identity::load(&b_crt, &b_key).unwrap(), pins, settings, local).unwrap();
        let node_b = Node {
            name: "b".into(),
            address: b.local_addr().unwrap(),
            control: PathBuf::new(),
            run_dir: PathBuf::new(),
            cert: b_crt,
            key: b_key,
            device_dir: PathBuf::new(),
            metrics: None,
        };
        let (ab, ba) = tokio::join!(a.connect(&node_b), async { b.accept().await.unwrap().await });
        Pair { _a: a, _b: b, ab: ab.unwrap(), ba: ba.unwrap(), _dir: dir }
    }

    /// A stream from a to b as a link on each end; `w` and `r` configure a's writer and
    /// b's reader.
    async fn link_pair(
        p: &Pair,
        w: impl FnOnce(FrameWriter) -> FrameWriter,
        r: impl FnOnce(FrameReader) -> FrameReader,
    ) -> (Link, Link) {
        let (send, recv) = p.ab.open_bi().await.unwrap();
        let mut wa = w(FrameWriter::new(send));
        // A stream is announced to the peer by its first bytes.
        wa.send(&Frame::Heartbeat { nonce: 0, reply: false }).await.unwrap();
        let (send_b, recv_b) = p.ba.accept_bi().await.unwrap();
        let mut rb = r(FrameReader::new(recv_b));
        assert_eq!(rb.next().await.unwrap(), Some(Frame::Heartbeat { nonce: 0, reply: false }));
        let a = spawn_link(wa, FrameReader::new(recv), "b".into(), CancellationToken::new());
        let b = spawn_link(FrameWriter::new(send_b), rb, "a".into(), CancellationToken::new());
        (a, b)
    }

    /// Mail-like text: compresses well.
    fn text_block(len: usize, seed: u64) -> Bytes {
        let mut v = Vec::with_capacity(len + 100);
        let mut i = 0;
        while v.len() < len {
            v.extend_from_slice(
                format!("Received: from mx{i}.example.org ({seed}) by mail.example.net\r\n").as_bytes(),
            );
            i += 1;
        }
        v.truncate(len);
        v.into()
    }

    /// Noise: does not compress, goes as is.
    fn noise_block(len: usize, seed: u64) -> Bytes {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect::<Vec<u8>>()
            .into()
    }

    fn data(seq: u64, payload: Bytes) -> Frame {
        Frame::Data(DataFrame {
            seq,
            offset: seq * 65536,
            flags: 0,
            checksum: block_checksum(&payload),
            payload,
        })
    }

    fn current_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// Records the thread it runs on for each data frame, then holds the frame until
    /// released, unless it is on `runtime` (see the module comment).
    fn holding_hook(
        runtime: ThreadId,
    ) -> (mpsc::UnboundedReceiver<ThreadId>, std::sync::mpsc::Sender<()>, impl Fn() + Send + Sync) {
        let (seen_tx, seen_rx) = mpsc::unbounded_channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let hook = move || {
            let me = thread::current().id();
            let _ = seen_tx.send(me);
            if me != runtime {
                let _ = release_rx.lock().unwrap().recv();
            }
        };
        (seen_rx, release_tx, hook)
    }

    #[test]
    fn compression_runs_off_the_runtime_thread() {
        current_thread_runtime().block_on(async {
            let runtime = thread::current().id();
            let p = connected_pair().await;
            let (mut seen, release, hook) = holding_hook(runtime);
            let encode: Encode = Arc::new(move |f: &Frame, c| {
                if matches!(f, Frame::Data(_)) {
                    hook();
                }
                f.encode_chunks_compressed(c)
            });
            let counts = Arc::new(WireCounts::default());
            let (wan, mut wan_peer) = link_pair(
                &p,
                |w| w.with_compression(Compression::Zstd(1), counts.clone()).with_encode(encode),
                |r| r,
            )
            .await;
            let (lan, mut lan_peer) = link_pair(&p, |w| w, |r| r).await;

            let block = data(1, text_block(256 << 10, 1));
            wan.tx.send(block.clone()).unwrap();
            let compressed_on = seen.recv().await.unwrap();
            assert_ne!(
                compressed_on, runtime,
                "block data for the zstd peer was compressed on the runtime thread"
            );
            // The block is still being compressed: the runtime serves the other link.
            lan.tx.send(Frame::Flush { seq: 2, flags: 0 }).unwrap();
            assert_eq!(lan_peer.rx.recv().await, Some(Frame::Flush { seq: 2, flags: 0 }));
            assert_eq!(counts.data_bytes.get(), 0, "counted before it was encoded");

            release.send(()).unwrap();
            assert_eq!(wan_peer.rx.recv().await, Some(block));
            assert_eq!(counts.data_bytes.get(), 256 << 10);
            assert!(
                counts.wire_bytes.get() < (64 << 10),
                "text went uncompressed: {}",
                counts.wire_bytes.get()
            );
        });
    }

    #[test]
    fn decompression_runs_off_the_runtime_thread() {
        current_thread_runtime().block_on(async {
            let runtime = thread::current().id();
            let p = connected_pair().await;
            let (mut seen, release, hook) = holding_hook(runtime);
            let decompress: Decompress = Arc::new(move |c: CompressedFrame| {
                hook();
                c.decompress()
            });
            let counts = Arc::new(WireCounts::default());
            let (wan, mut wan_peer) = link_pair(
                &p,
                |w| w.with_compression(Compression::Lz4, counts.clone()),
                |r| r.with_decompress(decompress),
            )
            .await;
            let (lan, mut lan_peer) = link_pair(&p, |w| w, |r| r).await;

            // Before the first compressed block frames go straight through.
            wan.tx.send(Frame::Flush { seq: 1, flags: 0 }).unwrap();
            assert_eq!(wan_peer.rx.recv().await, Some(Frame::Flush { seq: 1, flags: 0 }));
            let first = data(2, text_block(128 << 10, 2));
            let behind = [data(3, noise_block(8192, 3)), Frame::Flush { seq: 4, flags: 0 }];
            wan.tx.send(first.clone()).unwrap();
            for f in &behind {
                wan.tx.send(f.clone()).unwrap();
            }
            let decompressed_on = seen.recv().await.unwrap();
            assert_ne!(
                decompressed_on, runtime,
                "received block data was decompressed on the runtime thread"
            );
            lan.tx.send(Frame::Flush { seq: 9, flags: 0 }).unwrap();
            assert_eq!(lan_peer.rx.recv().await, Some(Frame::Flush { seq: 9, flags: 0 }));
            // Nothing overtakes the block being decompressed.
            assert!(wan_peer.rx.try_recv().is_err());

            release.send(()).unwrap();
            assert_eq!(wan_peer.rx.recv().await, Some(first));
            for f in behind {
                assert_eq!(wan_peer.rx.recv().await, Some(f));
            }
        });
    }

    #[test]
    fn compressed_links_keep_the_stream_order() {
        current_thread_runtime().block_on(async {
            let p = connected_pair().await;
            for c in [Compression::Zstd(1), Compression::Lz4] {
                let counts = Arc::new(WireCounts::default());
                let (wan, mut peer) = link_pair(&p, |w| w.with_compression(c, counts.clone()), |r| r).await;
                let frames: Vec<Frame> = (0..300u64)
                    .map(|i| match i % 3 {
                        0 => data(i, text_block(4096 << (i % 5), i)),
                        1 => data(i, noise_block(4096, i)),
                        _ => Frame::Flush { seq: i, flags: 0 },
                    })
                    .collect();
                let (mut sent_data, mut sent_noise) = (0u64, 0u64);
                for f in &frames {
                    if let Frame::Data(d) = f {
                        sent_data += d.payload.len() as u64;
                        if d.seq % 3 == 1 {
                            sent_noise += d.payload.len() as u64;
                        }
                    }
                    wan.tx.send(f.clone()).unwrap();
                }
                for f in frames {
                    assert_eq!(peer.rx.recv().await.as_ref(), Some(&f), "{c}");
                }
                assert_eq!(counts.data_bytes.get(), sent_data, "{c}");
                // Noise goes as is, text shrinks.
                let wire = counts.wire_bytes.get();
                assert!(wire > sent_noise && wire < sent_data / 2, "{c}: {wire} wire bytes for {sent_data}");
            }
        });
    }

    #[test]
    fn a_block_that_does_not_decompress_ends_the_stream_with_the_reason() {
        current_thread_runtime().block_on(async {
            let p = connected_pair().await;
            let (_raw_tx, mut peer) = {
                let (send, _recv) = p.ab.open_bi().await.unwrap();
                let mut w = FrameWriter::new(send).with_compression(Compression::Zstd(1), Arc::default());
                let good = data(1, text_block(8192, 1));
                w.send(&good).await.unwrap();
                // A valid head declaring 8 KiB, then bytes that are not zstd.
                let Frame::Data(d) = data(2, text_block(8192, 2)) else { unreachable!() };
                let junk = vec![0x5au8; 300];
                let head =
                    tandem_protocol::compress::encode_compressed_head(&d, FrameKind::Data, FLAG_ZSTD, &junk);
                w.send.write_all(&head).await.unwrap();
                w.send.write_all(&junk).await.unwrap();
                let (send_b, recv_b) = p.ba.accept_bi().await.unwrap();
                let link = spawn_link(
                    FrameWriter::new(send_b),
                    FrameReader::new(recv_b),
                    "a".into(),
                    CancellationToken::new(),
                );
                (w, link)
            };
            assert_eq!(peer.rx.recv().await, Some(data(1, text_block(8192, 1))));
            // The engine is told why (it ends the resource's session), then the stream ends;
            // the bad block and anything after it are never delivered.
            match peer.rx.recv().await {
                Some(Frame::Control(ControlMsg::Error { reason })) => assert!(
                    reason.starts_with("malformed frame from a: compressed block cannot be decompressed"),
                    "{reason}"
                ),
                other => panic!("expected the reason, got {other:?}"),
            }
            assert_eq!(peer.rx.recv().await, None, "the bad block or anything after it was delivered");
            assert!(p.ab.close_reason().is_none(), "the connection (other resources') stays up");
        });
    }
}
