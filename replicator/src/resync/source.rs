//! The sending side of a resync: walk the peer's dirty bitmap and copy what it marks.
//!
//! Each chunk is read as of a point in the change stream (see [`ResyncReader`]) and sent
//! with that sequence number, so the target can tell it apart from newer replicated writes.
//! A chunk's bits are cleared only when the target acknowledges the chunk on its disk, and
//! only if no bit was set in between (see [`DirtyBitmap::clear_range_if_unchanged`]); so at
//! any moment the bitmap still covers everything not yet confirmed: it is the resync's
//! progress record, and an interrupted resync resumes from it.
//!
//! In checksum mode a chunk's per-block hashes go first; the target answers which blocks
//! differ, and only those are sent.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tandem_protocol::{block_checksum, block_hash, AckLevel, ControlMsg, DataFrame, Frame, VERIFY_BLOCK};

use super::rate::{RateController, RateSettings};
use super::stats::ResyncStats;
use super::CHUNK;
use crate::bitmap::DirtyBitmap;
use crate::link::Link;
use crate::primary::Volume;
use crate::store::BlockStore;

/// Where a resync source reads from.
pub trait ResyncReader: Send + Sync + 'static {
    /// Reads `[offset, +len)` and returns it with the change-stream position it reflects
    /// (blocking). Every write admitted before that position is in the data.
    fn read_at_seq(&self, offset: u64, len: u64) -> io::Result<(u64, Bytes)>;
    /// Cumulative bytes written by the application, to detect activity (0 if none).
    fn app_write_bytes(&self) -> u64;
}

impl ResyncReader for Volume {
    fn read_at_seq(&self, offset: u64, len: u64) -> io::Result<(u64, Bytes)> {
        Volume::read_at_seq(self, offset, len)
    }
    fn app_write_bytes(&self) -> u64 {
        Volume::app_write_bytes(self)
    }
}

/// A source that is not primary: nothing writes to its store. Chunks take their numbers
/// from the resource's change-stream counter, so a chunk read before this node becomes
/// primary is older than every write it makes as primary.
pub struct StoreReader {
    store: Arc<dyn BlockStore>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl StoreReader {
    pub fn new(store: Arc<dyn BlockStore>) -> Self {
        Self::with_counter(store, Arc::new(std::sync::atomic::AtomicU64::new(1)))
    }

    pub fn with_counter(store: Arc<dyn BlockStore>, next: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self { store, next }
    }
}

impl ResyncReader for StoreReader {
    fn read_at_seq(&self, offset: u64, len: u64) -> io::Result<(u64, Bytes)> {
        let mut buf = vec![0u8; len as usize];
        self.store.read_at(offset, &mut buf)?;
        Ok((self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed), Bytes::from(buf)))
    }
    fn app_write_bytes(&self) -> u64 {
        0
    }
}

pub struct ResyncSource {
    pub reader: Arc<dyn ResyncReader>,
    pub bitmap: Arc<Mutex<DirtyBitmap>>,
    pub checksum: bool,
    pub rate: RateSettings,
    pub stats: Arc<ResyncStats>,
}

struct Chunk {
    offset: u64,
    len: u64,
    /// Bitmap version when the chunk was read.
    version: u64,
    sent_at: Instant,
    /// Checksum mode: the data, kept until the target says which blocks differ.
    held: Option<Bytes>,
    /// Data frames sent for this chunk and not yet acknowledged.
    acks_due: usize,
}

impl ResyncSource {
    /// Runs until every bit is clear and acknowledged (`Ok`), or the stream fails.
    pub async fn run(&self, link: Link) -> Result<(), String> {
        let Link { tx, mut rx } = link;
        let mut rc = RateController::new(self.rate);
        let mut inflight: BTreeMap<u64, Chunk> = BTreeMap::new();
        let mut inflight_bytes = 0u64;
        let mut cursor = 0u64;
        self.stats.start(self.bitmap.lock().unwrap().dirty_bytes());
        let r = loop {
            let now = Instant::now();
            if let Some(rate) = rc.tick(self.reader.app_write_bytes(), now) {
                self.stats.set_rate(rate);
            }
            // Send what the window and the rate allow.
            let mut blocked = None;
            let mut exhausted = false;
            loop {
                let next = self.bitmap.lock().unwrap().next_dirty(cursor, CHUNK);
                let Some((off, len)) = next else {
                    exhausted = true;
                    break;
                };
                if !rc.try_send(len, inflight_bytes, now) {
                    blocked = Some(rc.wait_hint(len, now));
                    break;
                }
                let version = self.bitmap.lock().unwrap().version();
                let reader = self.reader.clone();
                let (seq, data) =
                    match tokio::task::spawn_blocking(move || reader.read_at_seq(off, len)).await {
                        Ok(Ok(x)) => x,
                        Ok(Err(e)) => return Err(format!("resync read at offset {off}: {e}")),
                        Err(e) => return Err(format!("resync read task: {e}")),
                    };
                cursor = off + len;
                let frame = if self.checksum {
                    let hashes: Vec<u8> = data.chunks(VERIFY_BLOCK as usize).flat_map(block_hash).collect();
                    self.stats
                        .hash_bytes_sent
                        .fetch_add(hashes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    Frame::ResyncCheck { seq, offset: off, hashes: Bytes::from(hashes) }
                } else {
                    self.stats.data_bytes_sent.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                    data_frame(seq, off, data.clone())
                };
                if tx.send(frame).is_err() {
                    return Err("resync stream closed".into());
                }
                inflight.insert(
                    seq,
                    Chunk {
                        offset: off,
                        len,
                        version,
                        sent_at: Instant::now(),
                        held: self.checksum.then_some(data),
                        acks_due: usize::from(!self.checksum),
                    },
                );
                inflight_bytes += len;
            }
            if exhausted && inflight.is_empty() {
                if self.bitmap.lock().unwrap().count() == 0 {
                    break Ok(());
                }
                // Bits left behind (set again while in flight): another pass.
                cursor = 0;
                continue;
            }
            let wait =
                if exhausted { std::time::Duration::from_millis(100) } else { blocked.unwrap_or_default() };
            let frame = tokio::select! {
                f = rx.recv() => f,
                _ = tokio::time::sleep(wait) => continue,
            };
            let Some(frame) = frame else { break Err("resync stream closed by the target".to_string()) };
            match frame {
                Frame::Ack { seq, level: AckLevel::Durable } => {
                    let Some(c) = inflight.get_mut(&seq) else {
                        break Err(format!("resync ack for seq {seq}, which is not in flight"));
                    };
                    c.acks_due = c.acks_due.saturating_sub(1);
                    if c.acks_due == 0 && c.held.is_none() {
                        self.complete(&mut rc, &mut inflight, &mut inflight_bytes, seq);
                    }
                }
                Frame::CheckReply { seq, differ } => {
                    let Some(c) = inflight.get_mut(&seq) else {
                        break Err(format!("check reply for seq {seq}, which is not in flight"));
                    };
                    let Some(data) = c.held.take() else {
                        break Err(format!("second check reply for seq {seq}"));
                    };
                    let runs = differing_runs(&differ, data.len());
                    let mut sent = 0u64;
                    for (from, to) in &runs {
                        let f = data_frame(seq, c.offset + *from as u64, data.slice(*from..*to));
                        if tx.send(f).is_err() {
                            return Err("resync stream closed".into());
                        }
                        sent += (to - from) as u64;
                    }
                    self.stats.data_bytes_sent.fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
                    self.stats.equal_bytes.fetch_add(c.len - sent, std::sync::atomic::Ordering::Relaxed);
                    c.acks_due = runs.len();
                    if c.acks_due == 0 {
                        self.complete(&mut rc, &mut inflight, &mut inflight_bytes, seq);
                    }
                }
                Frame::Control(ControlMsg::Error { reason }) => {
                    break Err(format!("target reported: {reason}"))
                }
                other => break Err(format!("unexpected {} frame on the resync stream", other.kind().name())),
            }
        };
        self.stats.finish();
        r
    }

    fn complete(
        &self,
        rc: &mut RateController,
        inflight: &mut BTreeMap<u64, Chunk>,
        inflight_bytes: &mut u64,
        seq: u64,
    ) {
        let c = inflight.remove(&seq).expect("completing a chunk in flight");
        *inflight_bytes -= c.len;
        rc.on_ack(c.len, c.sent_at.elapsed());
        let mut bm = self.bitmap.lock().unwrap();
        if bm.clear_range_if_unchanged(c.offset, c.len, c.version) {
            self.stats.add_done(c.len);
        }
        let remaining = bm.dirty_bytes();
        drop(bm);
        let p = self.stats.progress();
        self.stats.set_total(p.done_bytes + remaining);
    }
}

fn data_frame(seq: u64, offset: u64, payload: Bytes) -> Frame {
    Frame::ResyncData(DataFrame { seq, offset, flags: 0, checksum: block_checksum(&payload), payload })
}

/// Byte ranges `[from, to)` within a chunk of `len` bytes whose blocks are marked in `differ`.
fn differing_runs(differ: &[u8], len: usize) -> Vec<(usize, usize)> {
    let b = VERIFY_BLOCK as usize;
    let blocks = len.div_ceil(b);
    let set = |i: usize| differ.get(i / 8).is_some_and(|x| x & (1 << (i % 8)) != 0);
    let mut runs = Vec::new();
    let mut i = 0;
    while i < blocks {
        if !set(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < blocks && set(i) {
            i += 1;
        }
        runs.push((start * b, (i * b).min(len)));
    }
    runs
}
