//! The standby's side of a replication stream: verify, order and apply the primary's
//! change stream, and acknowledge it.
//!
//! Epochs are applied strictly in order: writes of one epoch run concurrently (overlapping
//! ones in arrival order), and the flush that closes the epoch waits for all of them and
//! for the local flush before the next frame is even looked at. So the standby image is, at
//! every instant, the primary's state at some barrier plus part of the following epoch —
//! crash-consistent — and nothing of a later epoch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tandem_protocol::{block_hash, AckLevel, ControlMsg, DataFrame, Frame, FLAG_ACK_RECEIVED, VERIFY_BLOCK};
use tokio::sync::mpsc;
use tracing::{error, warn};

use crate::barrier::BarrierGate;
use crate::error::ApplyError;
use crate::inflight::{Admitted, InflightRanges};
use crate::io_pool::IoPool;
use crate::link::Link;
use crate::stage_trace::{self, Stage};
use crate::stats::ApplierStats;
use crate::store::BlockStore;

/// Threads applying a node's replicated and resynced writes.
const IO_THREADS: usize = 8;
/// Their stacks: the work is a store call (the data is the frame's own buffer) and an ack.
/// The default 2 MiB cost about as much resident per thread here (docs/benchmarks.md).
const IO_STACK: usize = 256 << 10;

/// What a node receiving data shares between its replication stream and a resync stream:
/// one ordering of operations on its disk, and — while a resync runs — the newest
/// replicated write per block, so an older resync copy never overwrites it.
pub struct TargetState {
    pub(crate) store: Arc<dyn BlockStore>,
    pub(crate) inflight: Mutex<InflightRanges>,
    /// Block index -> highest seq of a replicated write or discard admitted for it, kept
    /// while a resync is in progress.
    recent: Mutex<Option<HashMap<u64, u64>>>,
    pub(crate) pool: IoPool,
    pub stats: Arc<ApplierStats>,
    /// Where the stream stands relative to its barriers (snapshots are taken at one).
    pub barriers: BarrierGate,
}

impl TargetState {
    pub fn new(store: Arc<dyn BlockStore>, stats: Arc<ApplierStats>) -> Arc<Self> {
        Arc::new(Self {
            store,
            inflight: Mutex::new(InflightRanges::default()),
            recent: Mutex::new(None),
            pool: IoPool::with_stack_size(IO_THREADS, "tandem-apply", IO_STACK),
            stats,
            barriers: BarrierGate::default(),
        })
    }

    /// Starts tracking replicated writes per block (a resync is about to run).
    pub fn begin_resync(&self) {
        self.recent.lock().unwrap().get_or_insert_with(HashMap::new);
    }

    pub fn end_resync(&self) {
        *self.recent.lock().unwrap() = None;
    }

    fn note_replicated(&self, seq: u64, offset: u64, len: u64) {
        if let Some(map) = self.recent.lock().unwrap().as_mut() {
            let b = VERIFY_BLOCK as u64;
            for blk in offset / b..(offset + len).div_ceil(b) {
                let e = map.entry(blk).or_insert(seq);
                *e = (*e).max(seq);
            }
        }
    }

    /// Blocks of `[offset, +len)` that a replicated write newer than `seq` has touched.
    pub(crate) fn newer_than(&self, seq: u64, offset: u64, len: u64) -> Vec<bool> {
        let b = VERIFY_BLOCK as u64;
        let n = len.div_ceil(b) as usize;
        match self.recent.lock().unwrap().as_ref() {
            None => vec![false; n],
            Some(map) => {
                (0..n as u64).map(|i| map.get(&(offset / b + i)).is_some_and(|s| *s > seq)).collect()
            }
        }
    }

    pub(crate) fn admit(&self, offset: u64, len: u64) -> Admitted {
        self.inflight.lock().unwrap().admit(offset, offset + len)
    }

    /// As [`admit`](Self::admit), for a request that changes the copy (it moves the copy
    /// past its last barrier).
    pub(crate) fn admit_change(&self, offset: u64, len: u64) -> Admitted {
        self.barriers.change_admitted();
        self.admit(offset, len)
    }

    /// A resync into this copy is under way.
    pub fn resyncing(&self) -> bool {
        self.recent.lock().unwrap().is_some()
    }

    pub(crate) fn finish(&self, id: u64) {
        self.inflight.lock().unwrap().finish(id);
    }

    /// Waits until everything admitted so far has finished.
    pub(crate) async fn drain(&self) {
        let earlier = self.inflight.lock().unwrap().all();
        for l in earlier {
            l.wait().await;
        }
    }

    pub fn size(&self) -> u64 {
        self.store.size()
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<(), ApplyError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() && len > 0 => Ok(()),
            _ => Err(ApplyError::Protocol(format!(
                "range [{offset}, +{len}) outside the {}-byte volume",
                self.size()
            ))),
        }
    }

    pub(crate) fn check_data(&self, d: &DataFrame) -> Result<(), ApplyError> {
        self.check_range(d.offset, d.payload.len() as u64)?;
        if !d.checksum_ok() {
            warn!(
                seq = d.seq,
                offset = d.offset,
                len = d.payload.len(),
                "checksum mismatch: block not written"
            );
            return Err(ApplyError::ChecksumMismatch { seq: d.seq, offset: d.offset, len: d.payload.len() });
        }
        Ok(())
    }

    /// Hashes `[offset, +len)` per [`VERIFY_BLOCK`] (blocking).
    pub(crate) fn hash_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.store.read_at(offset, &mut buf)?;
        Ok(buf.chunks(VERIFY_BLOCK as usize).flat_map(block_hash).collect())
    }
}

pub struct Applier {
    state: Arc<TargetState>,
}

enum Op {
    Write(Bytes),
    Discard(u64),
}

impl Applier {
    pub fn new(state: Arc<TargetState>) -> Self {
        Self { state }
    }

    /// Applies the stream on `link` until the primary closes it (`Ok`) or it must be dropped
    /// (`Err`, with the reason also sent to the primary). Returns only after every write it
    /// started has finished, so no write lands on the image after it returns.
    pub async fn run(&self, link: Link) -> Result<(), ApplyError> {
        let Link { tx, mut rx } = link;
        let st = &self.state;
        let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<String>();
        let mut last_seq = 0u64;
        let stream = st.barriers.stream();
        let result = loop {
            let frame = tokio::select! {
                biased;
                Some(e) = fail_rx.recv() => break Err(ApplyError::Io(e)),
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => break Ok(()),
                },
            };
            if let Some(seq) = frame_seq(&frame) {
                if seq <= last_seq {
                    break Err(ApplyError::Protocol(format!(
                        "seq {seq} after seq {last_seq}: stream out of order"
                    )));
                }
                last_seq = seq;
            }
            match frame {
                Frame::Data(d) => {
                    if let Err(e) = st.check_data(&d) {
                        break Err(e);
                    }
                    if d.wants_received_ack()
                        && tx.send(Frame::Ack { seq: d.seq, level: AckLevel::Received }).is_err()
                    {
                        break Ok(());
                    }
                    let DataFrame { seq, offset, payload, .. } = d;
                    self.start(seq, offset, Op::Write(payload), &tx, &fail_tx);
                }
                Frame::Discard { seq, offset, len, flags } => {
                    if let Err(e) = st.check_range(offset, len) {
                        break Err(e);
                    }
                    if flags & FLAG_ACK_RECEIVED != 0
                        && tx.send(Frame::Ack { seq, level: AckLevel::Received }).is_err()
                    {
                        break Ok(());
                    }
                    self.start(seq, offset, Op::Discard(len), &tx, &fail_tx);
                }
                Frame::Flush { seq, flags } => {
                    if flags & FLAG_ACK_RECEIVED != 0
                        && tx.send(Frame::Ack { seq, level: AckLevel::Received }).is_err()
                    {
                        break Ok(());
                    }
                    // The barrier: everything before it, then the device flush, before
                    // anything after it.
                    st.drain().await;
                    stage_trace::mark(Stage::ApplyStart, seq);
                    if let Ok(e) = fail_rx.try_recv() {
                        break Err(ApplyError::Io(e));
                    }
                    // The device flush and then the work waiting for a barrier (a
                    // snapshot), on one blocking thread: both before any later request is
                    // admitted, with one thread hand-off per epoch, not two.
                    let state = st.clone();
                    let flushed = tokio::task::spawn_blocking(move || {
                        let r = state.store.flush();
                        if r.is_ok() {
                            state.barriers.barrier_reached(seq, state.resyncing());
                        }
                        r
                    })
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                    if let Err(e) = flushed {
                        st.stats.io_errors.inc();
                        break Err(ApplyError::Io(format!("flush: {e}")));
                    }
                    st.stats.flushes.inc();
                    stage_trace::mark(Stage::Applied, seq);
                    let _ = tx.send(Frame::Ack { seq, level: AckLevel::Durable });
                }
                Frame::Verify { seq, offset, len } => {
                    if let Err(e) = st.check_range(offset, len as u64) {
                        break Err(e);
                    }
                    let admitted = st.admit(offset, len as u64);
                    let (state, tx, fail) = (st.clone(), tx.clone(), fail_tx.clone());
                    st.pool.submit(admitted.wait_for, move || {
                        let r = state.hash_range(offset, len as u64);
                        state.finish(admitted.id);
                        match r {
                            Ok(h) => {
                                let _ = tx.send(Frame::VerifyReply { seq, hashes: Bytes::from(h) });
                            }
                            Err(e) => {
                                let _ = fail.send(format!("verify read at offset {offset}: {e}"));
                            }
                        }
                    });
                }
                Frame::Control(ControlMsg::Error { reason }) => break Err(ApplyError::Peer(reason)),
                other => {
                    break Err(ApplyError::Protocol(format!(
                        "unexpected {} frame on the replication stream",
                        other.kind().name()
                    )))
                }
            }
        };
        // Let every started write finish before reporting, so nothing lands afterwards.
        st.drain().await;
        drop(stream);
        if let Err(e) = &result {
            match e {
                ApplyError::ChecksumMismatch { .. } => st.stats.checksum_errors.inc(),
                ApplyError::Protocol(_) => st.stats.protocol_errors.inc(),
                _ => {}
            }
            error!("dropping replication stream: {e}");
            let _ = tx.send(Frame::Control(ControlMsg::Error { reason: e.to_string() }));
        }
        result
    }

    fn start(
        &self,
        seq: u64,
        offset: u64,
        op: Op,
        acks: &mpsc::UnboundedSender<Frame>,
        fail: &mpsc::UnboundedSender<String>,
    ) {
        let st = &self.state;
        let len = match &op {
            Op::Write(b) => b.len() as u64,
            Op::Discard(l) => *l,
        };
        let admitted = st.admit_change(offset, len);
        st.note_replicated(seq, offset, len);
        let (state, acks, fail) = (st.clone(), acks.clone(), fail.clone());
        st.pool.submit(admitted.wait_for, move || {
            stage_trace::mark(Stage::ApplyStart, seq);
            let r = match &op {
                Op::Write(data) => state.store.write_at(offset, data),
                Op::Discard(len) => state.store.discard(offset, *len),
            };
            state.finish(admitted.id);
            match r {
                Ok(()) => {
                    match op {
                        Op::Write(_) => {
                            state.stats.writes.inc();
                            state.stats.write_bytes.add(len);
                        }
                        Op::Discard(_) => state.stats.discards.inc(),
                    }
                    stage_trace::mark(Stage::Applied, seq);
                    let _ = acks.send(Frame::Ack { seq, level: AckLevel::Durable });
                }
                Err(e) => {
                    state.stats.io_errors.inc();
                    let _ = fail.send(format!("seq {seq} at offset {offset}: {e}"));
                }
            }
        });
    }
}

fn frame_seq(f: &Frame) -> Option<u64> {
    match f {
        Frame::Data(d) => Some(d.seq),
        Frame::Flush { seq, .. } | Frame::Discard { seq, .. } | Frame::Verify { seq, .. } => Some(*seq),
        _ => None,
    }
}
