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

use tandem_protocol::{AckLevel, ControlMsg, Frame};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::bitmap::DirtyBitmap;
use crate::link::Link;
use crate::mode::Mode;

struct Pending {
    /// Byte range of a write or discard; `None` for a flush.
    range: Option<(u64, u64)>,
    /// The request waiting for this peer, and the ack level that releases it.
    waiter: Option<(AckLevel, oneshot::Sender<bool>)>,
    since: Instant,
}

#[derive(Default)]
struct PendingAcks {
    by_seq: BTreeMap<u64, Pending>,
    closed: bool,
}

/// Result of handing a frame to a session.
pub(crate) enum Enqueued {
    /// The request must wait for this receiver: `true` = acknowledged, `false` = peer lost.
    Wait(oneshot::Receiver<bool>),
    /// Sent; nothing to wait for in this mode.
    NoWait,
    /// The session is closing; the range has been marked out of sync.
    Lost,
}

pub(crate) struct PeerSession {
    pub name: String,
    pub mode: Mode,
    queue: mpsc::UnboundedSender<Frame>,
    pending: Mutex<PendingAcks>,
    bitmap: Arc<Mutex<DirtyBitmap>>,
    closed: watch::Sender<Option<String>>,
}

impl PeerSession {
    /// Creates the session and starts its tasks over `link`.
    pub fn start(
        name: String,
        mode: Mode,
        bitmap: Arc<Mutex<DirtyBitmap>>,
        link: Link,
        timeout: Duration,
    ) -> Arc<Self> {
        let (queue, queue_rx) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(None);
        let s = Arc::new(Self {
            name,
            mode,
            queue,
            pending: Mutex::new(PendingAcks::default()),
            bitmap,
            closed,
        });
        tokio::spawn(s.clone().run(link, queue_rx, timeout));
        s
    }

    /// Records a frame as pending and queues it. Called under the volume's admission lock,
    /// so frames reach the peer in sequence order.
    pub fn enqueue(&self, seq: u64, frame: Frame, range: Option<(u64, u64)>) -> Enqueued {
        let mut p = self.pending.lock().unwrap();
        if p.closed {
            drop(p);
            if let Some((off, len)) = range {
                self.bitmap.lock().unwrap().set_range(off, len);
            }
            return Enqueued::Lost;
        }
        let (waiter, result) = match self.mode.completion_level() {
            Some(level) => {
                let (tx, rx) = oneshot::channel();
                (Some((level, tx)), Enqueued::Wait(rx))
            }
            None => (None, Enqueued::NoWait),
        };
        p.by_seq.insert(
            seq,
            Pending {
                range,
                waiter,
                since: Instant::now(),
            },
        );
        // The receiving half lives as long as the session's sender task; if it is gone the
        // session is closing and close() will account for this entry.
        let _ = self.queue.send(frame);
        result
    }

    pub fn pending_count(&self) -> usize {
        self.pending.lock().unwrap().by_seq.len()
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
        for (_, e) in drained {
            if let Some((_, tx)) = e.waiter {
                let _ = tx.send(false);
            }
        }
    }

    fn on_ack(&self, seq: u64, level: AckLevel) -> Result<(), String> {
        let mut p = self.pending.lock().unwrap();
        let Some(e) = p.by_seq.get_mut(&seq) else {
            return Err(format!("{level:?} ack for seq {seq}, which is not pending"));
        };
        let release =
            matches!(&e.waiter, Some((need, _)) if *need == level || level == AckLevel::Durable);
        if release {
            if let Some((_, tx)) = e.waiter.take() {
                let _ = tx.send(true);
            }
        }
        if level == AckLevel::Durable {
            p.by_seq.remove(&seq);
        }
        Ok(())
    }

    /// The oldest unacknowledged frame's age, if any.
    fn oldest_pending_age(&self) -> Option<Duration> {
        let p = self.pending.lock().unwrap();
        p.by_seq.values().next().map(|e| e.since.elapsed())
    }

    async fn run(
        self: Arc<Self>,
        link: Link,
        mut queue_rx: mpsc::UnboundedReceiver<Frame>,
        timeout: Duration,
    ) {
        let Link { tx, mut rx } = link;
        let sender = async {
            while let Some(frame) = queue_rx.recv().await {
                if tx.send(frame).await.is_err() {
                    return "connection lost while sending".to_string();
                }
            }
            "send queue closed".to_string()
        };
        let receiver = async {
            loop {
                match rx.recv().await {
                    None => return "connection closed".to_string(),
                    Some(Frame::Ack { seq, level }) => {
                        if let Err(e) = self.on_ack(seq, level) {
                            return format!("protocol violation by peer: {e}");
                        }
                    }
                    Some(Frame::Control(ControlMsg::Error { reason })) => {
                        return format!("peer reported an error: {reason}");
                    }
                    Some(other) => {
                        return format!("protocol violation by peer: unexpected {:?} frame on the replication stream", other.kind());
                    }
                }
            }
        };
        let watchdog = async {
            let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
            loop {
                tokio::time::sleep(tick).await;
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
            r = sender => r,
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
