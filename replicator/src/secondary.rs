//! The standby's side of a replication stream: verify, order and apply the primary's
//! change stream, and acknowledge it.
//!
//! Epochs are applied strictly in order: writes of one epoch run concurrently (overlapping
//! ones in sequence order), and the flush that closes the epoch waits for all of them and
//! for the local flush before the next frame is even looked at. So the standby image is, at
//! every instant, the primary's state at some barrier plus part of the following epoch —
//! crash-consistent — and nothing of a later epoch.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tandem_protocol::{AckLevel, ControlMsg, DataFrame, Frame};
use tokio::sync::mpsc;
use tracing::{error, warn};

use crate::error::ApplyError;
use crate::inflight::InflightRanges;
use crate::link::Link;
use crate::stats::ApplierStats;
use crate::store::BlockStore;

/// Threads applying one replication stream's writes concurrently.
const IO_THREADS: usize = 8;

pub struct Applier {
    store: Arc<dyn BlockStore>,
    size: u64,
    pub stats: Arc<ApplierStats>,
}

enum Op {
    Write(Bytes),
    Discard(u64),
}

impl Applier {
    pub fn new(store: Arc<dyn BlockStore>, stats: Arc<ApplierStats>) -> Self {
        let size = store.size();
        Self { store, size, stats }
    }

    /// Applies the stream on `link` until the primary closes it (`Ok`) or it must be dropped
    /// (`Err`, with the reason also sent to the primary). Returns only after every write it
    /// started has finished, so no write lands on the image after it returns.
    pub async fn run(&self, link: Link) -> Result<(), ApplyError> {
        let Link { tx, mut rx } = link;
        let inflight = Arc::new(Mutex::new(InflightRanges::default()));
        let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<String>();
        let pool = spawn_pool(
            IO_THREADS,
            self.store.clone(),
            inflight.clone(),
            tx.clone(),
            fail_tx.clone(),
            self.stats.clone(),
        );
        let mut last_seq = 0u64;
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
                    if let Err(e) = self.check_data(&d) {
                        break Err(e);
                    }
                    if d.wants_received_ack()
                        && tx.send(Frame::Ack { seq: d.seq, level: AckLevel::Received }).is_err()
                    {
                        break Ok(());
                    }
                    let DataFrame { seq, offset, payload, .. } = d;
                    self.start(seq, offset, Op::Write(payload), &inflight, &pool);
                }
                Frame::Discard { seq, offset, len, flags } => {
                    if let Err(e) = self.check_range(offset, len) {
                        break Err(e);
                    }
                    if flags & tandem_protocol::FLAG_ACK_RECEIVED != 0
                        && tx.send(Frame::Ack { seq, level: AckLevel::Received }).is_err()
                    {
                        break Ok(());
                    }
                    self.start(seq, offset, Op::Discard(len), &inflight, &pool);
                }
                Frame::Flush { seq, flags } => {
                    if flags & tandem_protocol::FLAG_ACK_RECEIVED != 0
                        && tx.send(Frame::Ack { seq, level: AckLevel::Received }).is_err()
                    {
                        break Ok(());
                    }
                    // The barrier: everything before it, then the device flush, before
                    // anything after it.
                    let earlier = inflight.lock().unwrap().all();
                    for l in earlier {
                        l.wait().await;
                    }
                    if let Ok(e) = fail_rx.try_recv() {
                        break Err(ApplyError::Io(e));
                    }
                    let store = self.store.clone();
                    let flushed = tokio::task::spawn_blocking(move || store.flush())
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                    if let Err(e) = flushed {
                        self.stats.io_errors.inc();
                        break Err(ApplyError::Io(format!("flush: {e}")));
                    }
                    self.stats.flushes.inc();
                    let _ = tx.send(Frame::Ack { seq, level: AckLevel::Durable });
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
        drop(pool);
        let earlier = inflight.lock().unwrap().all();
        for l in earlier {
            l.wait().await;
        }
        if let Err(e) = &result {
            match e {
                ApplyError::ChecksumMismatch { .. } => self.stats.checksum_errors.inc(),
                ApplyError::Protocol(_) => self.stats.protocol_errors.inc(),
                _ => {}
            }
            error!("dropping replication stream: {e}");
            let _ = tx.send(Frame::Control(ControlMsg::Error { reason: e.to_string() }));
        }
        result
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ApplyError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ApplyError::Protocol(format!(
                "range [{offset}, +{len}) beyond the end of the {}-byte volume",
                self.size
            ))),
        }
    }

    fn check_data(&self, d: &DataFrame) -> Result<(), ApplyError> {
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

    fn start(
        &self,
        seq: u64,
        offset: u64,
        op: Op,
        inflight: &Arc<Mutex<InflightRanges>>,
        pool: &std::sync::mpsc::Sender<Job>,
    ) {
        let len = match &op {
            Op::Write(b) => b.len() as u64,
            Op::Discard(l) => *l,
        };
        let admitted = inflight.lock().unwrap().admit(seq, offset, offset + len);
        // The pool outlives every job sent to it (it ends when `run` drops the sender).
        let _ = pool.send(Job { seq, offset, op, wait_for: admitted.wait_for });
    }
}

/// One write or discard for the standby's I/O threads.
struct Job {
    seq: u64,
    offset: u64,
    op: Op,
    wait_for: Vec<Arc<crate::latch::Latch>>,
}

/// Threads that apply jobs to the store: a write goes from the stream to a thread that
/// writes it and acknowledges it, with no async hand-off in between.
fn spawn_pool(
    threads: usize,
    store: Arc<dyn BlockStore>,
    inflight: Arc<Mutex<InflightRanges>>,
    acks: mpsc::UnboundedSender<Frame>,
    fail: mpsc::UnboundedSender<String>,
    stats: Arc<ApplierStats>,
) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..threads {
        let (rx, store, inflight, acks, job_fail, stats) =
            (rx.clone(), store.clone(), inflight.clone(), acks.clone(), fail.clone(), stats.clone());
        let spawned = std::thread::Builder::new().name(format!("tandem-apply-{i}")).spawn(move || loop {
            let job = match rx.lock().unwrap().recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            for dep in &job.wait_for {
                dep.wait_blocking();
            }
            let (r, len) = match &job.op {
                Op::Write(data) => (store.write_at(job.offset, data), data.len() as u64),
                Op::Discard(len) => (store.discard(job.offset, *len), 0),
            };
            inflight.lock().unwrap().finish(job.seq);
            match r {
                Ok(()) => {
                    if len > 0 {
                        stats.writes.inc();
                        stats.write_bytes.add(len);
                    } else {
                        stats.discards.inc();
                    }
                    let _ = acks.send(Frame::Ack { seq: job.seq, level: AckLevel::Durable });
                }
                Err(e) => {
                    stats.io_errors.inc();
                    let _ = job_fail.send(format!("seq {} at offset {}: {e}", job.seq, job.offset));
                }
            }
        });
        if let Err(e) = spawned {
            let _ = fail.send(format!("cannot start I/O thread: {e}"));
        }
    }
    tx
}

fn frame_seq(f: &Frame) -> Option<u64> {
    match f {
        Frame::Data(d) => Some(d.seq),
        Frame::Flush { seq, .. } | Frame::Discard { seq, .. } => Some(*seq),
        _ => None,
    }
}
