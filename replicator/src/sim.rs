//! A simulated network link for engine tests: frames go through the real encoder and
//! decoder, with latency, and the link can be frozen (a stopped peer), cut (a dead
//! connection) or made to corrupt one data payload in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::{Frame, FrameDecoder};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::link::{Link, LINK_CAPACITY};

#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// One-way delay of every frame.
    pub latency: Duration,
}

/// Handles to impair a simulated link while it runs.
#[derive(Debug)]
pub struct SimControl {
    frozen: watch::Sender<bool>,
    cut: watch::Sender<bool>,
    corrupt_next_data: AtomicBool,
    /// Data frames delivered, each direction summed.
    pub delivered_data: AtomicU64,
}

impl SimControl {
    /// Stops delivering frames in both directions (like SIGSTOP on the peer) until thawed.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
    /// Severs the link: both ends see it closed; frames in flight are lost.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
    /// Flips a byte in the payload of the next data frame after its checksum was computed.
    pub fn corrupt_next_data(&self) {
        self.corrupt_next_data.store(true, Ordering::SeqCst);
    }
}

/// Builds a simulated link; returns the two ends and its control handle.
pub fn sim_pair(opts: SimOptions) -> (Link, Link, Arc<SimControl>) {
    let (frozen, _) = watch::channel(false);
    let (cut, _) = watch::channel(false);
    let ctl = Arc::new(SimControl {
        frozen,
        cut,
        corrupt_next_data: AtomicBool::new(false),
        delivered_data: AtomicU64::new(0),
    });
    let (a_tx, a_out) = mpsc::unbounded_channel();
    let (b_tx, b_out) = mpsc::unbounded_channel();
    let (a_in_tx, a_rx) = mpsc::channel(LINK_CAPACITY);
    let (b_in_tx, b_rx) = mpsc::channel(LINK_CAPACITY);
    tokio::spawn(forward(a_out, b_in_tx, opts.clone(), ctl.clone()));
    tokio::spawn(forward(b_out, a_in_tx, opts, ctl.clone()));
    (Link { tx: a_tx, rx: a_rx }, Link { tx: b_tx, rx: b_rx }, ctl)
}

async fn forward(
    mut from: mpsc::UnboundedReceiver<Frame>,
    to: mpsc::Sender<Frame>,
    opts: SimOptions,
    ctl: Arc<SimControl>,
) {
    let mut cut = ctl.cut.subscribe();
    let mut frozen = ctl.frozen.subscribe();
    let (q_tx, mut q_rx) = mpsc::unbounded_channel::<(Instant, Frame)>();
    // Stage 1 stamps each frame on entry; stage 2 delivers it once its latency has elapsed,
    // so latency is pipelined rather than accumulated, and order is preserved.
    let stamp = async move {
        while let Some(f) = from.recv().await {
            if q_tx.send((Instant::now() + opts.latency, f)).is_err() {
                break;
            }
        }
        // Dropping q_tx lets `deliver` drain what is in flight, then end: a closed end still
        // delivers the frames sent before it closed, like a stream's FIN.
    };
    let deliver = async {
        let mut decoder = FrameDecoder::default();
        while let Some((at, frame)) = q_rx.recv().await {
            tokio::time::sleep_until(at).await;
            while *frozen.borrow_and_update() {
                if frozen.changed().await.is_err() {
                    return;
                }
            }
            let mut bytes = frame.encode_to_vec();
            if matches!(frame, Frame::Data(_)) {
                ctl.delivered_data.fetch_add(1, Ordering::Relaxed);
                if ctl.corrupt_next_data.swap(false, Ordering::SeqCst) {
                    let last = bytes.len() - 1;
                    bytes[last] ^= 0x5a;
                }
            }
            decoder.push(&bytes);
            match decoder.next_frame() {
                Ok(Some(f)) => {
                    if to.send(f).await.is_err() {
                        return;
                    }
                }
                other => panic!("sim link: encoder/decoder disagree: {other:?}"),
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(stamp, deliver) } => {}
        _ = cut.wait_for(|c| *c) => {}
    }
}
