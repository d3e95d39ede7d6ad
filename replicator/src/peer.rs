//! The primary's side of one live connection to a peer: frames out in sequence order, acks
//! in, and the bookkeeping that decides what the peer is missing when the connection ends.
//!
//! Every frame sent is recorded as pending until the peer acknowledges it `Durable`. When the
//! connection ends for any reason — closed by the transport, an ack timeout, a protocol
//! violation — every pending write's range is marked in the peer's dirty bitmap and every
//! request waiting for this peer is released, so the primary continues alone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::{AckLevel, ControlMsg, Frame};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::activity_log::AlGuard;
use crate::bitmap::DirtyBitmap;
use crate::link::Link;
use crate::mode::{Backlog, BacklogPolicy, Mode};
use crate::request::Request;
use crate::stats::LatencyHistogram;

struct Pending {
    /// Byte range of a write or discard; `None` for a flush or verify.
    range: Option<(u64, u64)>,
    /// Bytes of data this entry counts in the backlog.
    bytes: u64,
    /// The request waiting for this peer, and the ack level that releases it.
    waiter: Option<(AckLevel, Arc<Request>)>,
    /// A verify request waiting for the peer's hashes.
    verify: Option<oneshot::Sender<Bytes>>,
    since: Instant,
    /// Keeps the write's activity-log extents hot until this peer has it on disk (or the
    /// session's end has marked it in the bitmap) — also for peers the request does not
    /// wait for, so an extent never leaves the log while an `async` peer may lack a block.
    _al: Option<Arc<AlGuard>>,
}

#[derive(Default)]
struct PendingAcks {
    by_seq: BTreeMap<u64, Pending>,
    /// The link's outbound side; dropped when the session closes, which ends the stream.
    tx: Option<mpsc::UnboundedSender<Frame>>,
    closed: bool,
    /// Data bytes pending (the backlog).
    bytes: u64,
    /// The backlog overflowed under the `ahead` policy: nothing is sent until it drains.
    ahead: bool,
}

pub(crate) struct PeerSession {
    pub name: String,
    pub mode: Mode,
    backlog: Option<Backlog>,
    pending: Mutex<PendingAcks>,
    bitmap: Arc<Mutex<DirtyBitmap>>,
    ack_latency: Arc<LatencyHistogram>,
    closed: watch::Sender<Option<String>>,
    /// Counts the times an `ahead` episode ended with the backlog drained.
    drained: watch::Sender<u64>,
}

impl PeerSession {
    /// Creates the session and starts its tasks over `link`.
    pub fn start(
        name: String,
        mode: Mode,
        backlog: Option<Backlog>,
        bitmap: Arc<Mutex<DirtyBitmap>>,
        ack_latency: Arc<LatencyHistogram>,
        link: Link,
        timeout: Duration,
    ) -> Arc<Self> {
        let (closed, _) = watch::channel(None);
        let (drained, _) = watch::channel(0);
        let Link { tx, rx } = link;
        let pending = PendingAcks { tx: Some(tx), ..Default::default() };
        // A backlog bounds only peers the application does not wait for in full.
        let backlog = backlog.filter(|_| mode != Mode::Sync);
        let s = Arc::new(Self {
            name,
            mode,
            backlog,
            pending: Mutex::new(pending),
            bitmap,
            ack_latency,
            closed,
            drained,
        });
        tokio::spawn(s.clone().run(rx, timeout));
        s
    }

    /// Records a frame as pending and queues it; if the mode waits for this peer, `req`
    /// gets a part that the peer's ack (or the session's end) finishes. Called under the
    /// volume's admission lock, so frames reach the peer in sequence order.
    pub fn enqueue(&self, seq: u64, frame: Frame, range: Option<(u64, u64)>, req: &Arc<Request>) {
        let mut p = self.pending.lock().unwrap();
        if p.closed {
            drop(p);
            if let Some((off, len)) = range {
                self.bitmap.lock().unwrap().set_range(off, len);
            }
            return;
        }
        if p.ahead {
            // Until the backlog drains the peer gets nothing; the bitmap records what it misses.
            drop(p);
            if let Some((off, len)) = range {
                self.bitmap.lock().unwrap().set_range(off, len);
            }
            return;
        }
        let bytes = match &frame {
            Frame::Data(d) => d.payload.len() as u64,
            _ => 0,
        };
        let mut level = self.mode.completion_level();
        if let Some(b) = self.backlog {
            if bytes > 0 && p.bytes + bytes > b.limit {
                match b.when_full {
                    BacklogPolicy::Ahead => {
                        p.ahead = true;
                        let backlog = p.bytes;
                        drop(p);
                        if let Some((off, len)) = range {
                            self.bitmap.lock().unwrap().set_range(off, len);
                        }
                        warn!(peer = %self.name, backlog_bytes = backlog, limit = b.limit,
                              "backlog full: the peer is left behind and resynced once it has caught up");
                        return;
                    }
                    // This write waits until the peer has it on disk: the application is
                    // held to the peer's pace while the backlog is full.
                    BacklogPolicy::Block => level = Some(AckLevel::Durable),
                }
            }
        }
        let waiter = level.map(|level| {
            req.add_part();
            (level, req.clone())
        });
        let al = range.and_then(|_| req.al_guard());
        p.bytes += bytes;
        p.by_seq.insert(seq, Pending { range, bytes, waiter, verify: None, since: Instant::now(), _al: al });
        // Straight to the transport's writer. If it is gone, the receiver sees the link
        // closed and close() accounts for this entry with the rest.
        if let Some(tx) = &p.tx {
            let _ = tx.send(frame);
        }
    }

    /// Queues a verify request; the receiver gets the peer's hashes, or is dropped if the
    /// session ends first.
    pub fn enqueue_verify(&self, seq: u64, frame: Frame) -> Option<oneshot::Receiver<Bytes>> {
        let mut p = self.pending.lock().unwrap();
        if p.closed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let entry = Pending {
            range: None,
            bytes: 0,
            waiter: None,
            verify: Some(tx),
            since: Instant::now(),
            _al: None,
        };
        p.by_seq.insert(seq, entry);
        p.tx.as_ref()?.send(frame).ok()?;
        Some(rx)
    }

    fn on_verify_reply(&self, seq: u64, hashes: Bytes) -> Result<(), String> {
        let mut p = self.pending.lock().unwrap();
        match p.by_seq.remove(&seq) {
            Some(Pending { verify: Some(tx), .. }) => {
                let _ = tx.send(hashes);
                Ok(())
            }
            _ => Err(format!("verify reply for seq {seq}, which is not a pending verify")),
        }
    }

    pub fn pending_count(&self) -> usize {
        self.pending.lock().unwrap().by_seq.len()
    }

    /// Bytes in flight to the peer and the age of the oldest pending frame.
    pub fn lag(&self) -> (u64, Duration) {
        let p = self.pending.lock().unwrap();
        (p.bytes, p.by_seq.values().next().map_or(Duration::ZERO, |e| e.since.elapsed()))
    }

    pub fn is_ahead(&self) -> bool {
        self.pending.lock().unwrap().ahead
    }

    /// Counts `ahead` episodes that ended (the backlog drained, data flows again, and what
    /// the peer missed meanwhile is in its bitmap, to be resynced).
    pub fn drained_episodes(&self) -> watch::Receiver<u64> {
        self.drained.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        self.pending.lock().unwrap().closed
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// Resolves with the reason once the session has ended.
    pub async fn closed(&self) -> String {
        let mut rx = self.closed.subscribe();
        let r = rx.wait_for(|r| r.is_some()).await;
        match r {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "session dropped".to_string(),
        }
    }

    /// Ends the session: everything not durably acknowledged becomes out of sync.
    pub fn close(&self, reason: &str) {
        let drained = {
            let mut p = self.pending.lock().unwrap();
            if p.closed {
                return;
            }
            p.closed = true;
            p.tx = None;
            std::mem::take(&mut p.by_seq)
        };
        let mut lost = 0u64;
        {
            let mut bm = self.bitmap.lock().unwrap();
            for e in drained.values() {
                if let Some((off, len)) = e.range {
                    bm.set_range(off, len);
                    lost += len;
                }
            }
        }
        if lost > 0 {
            warn!(peer = %self.name, unacknowledged_bytes = lost, "replication to peer ended: {reason}");
        } else {
            tracing::info!(peer = %self.name, "replication to peer ended: {reason}");
        }
        // Publish the reason before releasing the requests, so anyone woken sees why.
        self.closed.send_replace(Some(reason.to_string()));
        // The peer is lost, not the request: it completes without this peer.
        for (_, e) in drained {
            if let Some((_, req)) = e.waiter {
                req.part_done(Ok(()));
            }
        }
    }

    fn on_ack(&self, seq: u64, level: AckLevel) -> Result<(), String> {
        let mut p = self.pending.lock().unwrap();
        let Some(e) = p.by_seq.get_mut(&seq) else {
            return Err(format!("{level:?} ack for seq {seq}, which is not pending"));
        };
        let release = matches!(&e.waiter, Some((need, _)) if *need == level || level == AckLevel::Durable);
        let waiter = if release { e.waiter.take() } else { None };
        let mut drained = false;
        if level == AckLevel::Durable {
            if let Some(e) = p.by_seq.remove(&seq) {
                p.bytes -= e.bytes;
                self.ack_latency.observe(e.since.elapsed());
            }
            if p.ahead && p.bytes == 0 {
                p.ahead = false;
                drained = true;
            }
        }
        drop(p);
        if drained {
            tracing::info!(peer = %self.name, "backlog drained: sending data again");
            self.drained.send_modify(|n| *n += 1);
        }
        if let Some((_, req)) = waiter {
            req.part_done(Ok(()));
        }
        Ok(())
    }

    /// The oldest unacknowledged frame's age, if any.
    fn oldest_pending_age(&self) -> Option<Duration> {
        let p = self.pending.lock().unwrap();
        p.by_seq.values().next().map(|e| e.since.elapsed())
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Frame>, timeout: Duration) {
        let receiver = async {
            loop {
                match rx.recv().await {
                    None => return "connection closed".to_string(),
                    Some(Frame::Ack { seq, level }) => {
                        if let Err(e) = self.on_ack(seq, level) {
                            return format!("protocol violation by peer: {e}");
                        }
                    }
                    Some(Frame::VerifyReply { seq, hashes }) => {
                        if let Err(e) = self.on_verify_reply(seq, hashes) {
                            return format!("protocol violation by peer: {e}");
                        }
                    }
                    Some(Frame::Control(ControlMsg::Error { reason })) => {
                        return format!("peer reported an error: {reason}");
                    }
                    Some(other) => {
                        return format!(
                            "protocol violation by peer: unexpected {:?} frame on the replication stream",
                            other.kind()
                        );
                    }
                }
            }
        };
        let watchdog = async {
            let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
            loop {
                tokio::time::sleep(tick).await;
                // Nobody waits for an async peer's acks: its backlog bound, not a timer,
                // limits how far it may fall behind (a dead peer is found by heartbeats).
                if self.mode == Mode::Async {
                    continue;
                }
                if let Some(age) = self.oldest_pending_age() {
                    if age > timeout {
                        return format!(
                            "no acknowledgement for {:.1}s (timeout {:?})",
                            age.as_secs_f64(),
                            timeout
                        );
                    }
                }
            }
        };
        let mut closed_rx = self.closed.subscribe();
        let reason = tokio::select! {
            r = receiver => r,
            r = watchdog => r,
            _ = closed_rx.wait_for(|c| c.is_some()) => String::new(),
        };
        if !reason.is_empty() {
            self.close(&reason);
        }
        debug!(peer = %self.name, "peer session tasks ended");
    }
}
