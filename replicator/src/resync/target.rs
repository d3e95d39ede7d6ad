//! The receiving side of a resync stream.
//!
//! Resync data is applied in the same ordering as replicated writes (one set of in-flight
//! ranges), and block by block it yields to newer data: a block that a replicated write
//! with a higher sequence number has touched already holds data newer than the resync copy
//! (which was read at its own sequence number), so that block is skipped. A replicated write
//! arriving after the resync copy simply overwrites it. Either way the newest data wins.

use std::sync::Arc;

use bytes::Bytes;
use tandem_protocol::{AckLevel, ControlMsg, DataFrame, Frame, VERIFY_BLOCK};
use tokio::sync::mpsc;
use tracing::error;

use crate::error::ApplyError;
use crate::link::Link;
use crate::secondary::TargetState;

/// Applies a resync stream until the source closes it (`Ok`) or it must be dropped. Returns
/// only once everything it started is on the disk.
pub async fn run(state: &Arc<TargetState>, link: Link) -> Result<(), ApplyError> {
    let Link { tx, mut rx } = link;
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<String>();
    let result = loop {
        let frame = tokio::select! {
            biased;
            Some(e) = fail_rx.recv() => break Err(ApplyError::Io(e)),
            f = rx.recv() => match f {
                Some(f) => f,
                None => break Ok(()),
            },
        };
        match frame {
            Frame::ResyncData(d) => {
                if let Err(e) = state.check_data(&d) {
                    break Err(e);
                }
                apply(state, d, &tx, &fail_tx);
            }
            Frame::ResyncCheck { seq, offset, hashes } => {
                let len = (hashes.len() / 16) as u64 * VERIFY_BLOCK as u64;
                if let Err(e) = state.check_range(offset, len) {
                    break Err(e);
                }
                compare(state, seq, offset, hashes, &tx, &fail_tx);
            }
            Frame::Control(ControlMsg::Error { reason }) => break Err(ApplyError::Peer(reason)),
            other => {
                break Err(ApplyError::Protocol(format!(
                    "unexpected {} frame on the resync stream",
                    other.kind().name()
                )))
            }
        }
    };
    state.drain().await;
    if let Err(e) = &result {
        if matches!(e, ApplyError::ChecksumMismatch { .. }) {
            state.stats.checksum_errors.inc();
        }
        error!("dropping resync stream: {e}");
        let _ = tx.send(Frame::Control(ControlMsg::Error { reason: e.to_string() }));
    }
    result
}

fn apply(
    state: &Arc<TargetState>,
    d: DataFrame,
    acks: &mpsc::UnboundedSender<Frame>,
    fail: &mpsc::UnboundedSender<String>,
) {
    let DataFrame { seq, offset, payload, .. } = d;
    let len = payload.len() as u64;
    let admitted = state.admit_change(offset, len);
    let (st, acks, fail) = (state.clone(), acks.clone(), fail.clone());
    state.pool.submit(admitted.wait_for, move || {
        let r = write_older(&st, seq, offset, &payload);
        st.finish(admitted.id);
        match r {
            Ok(written) => {
                st.stats.resync_writes.inc();
                st.stats.resync_bytes.add(written);
                let _ = acks.send(Frame::Ack { seq, level: AckLevel::Durable });
            }
            Err(e) => {
                st.stats.io_errors.inc();
                let _ = fail.send(format!("resync write at offset {offset}: {e}"));
            }
        }
    });
}

/// Writes the blocks of a resync copy read at `seq` that no newer replicated write has
/// touched; returns the bytes written.
fn write_older(st: &TargetState, seq: u64, offset: u64, payload: &Bytes) -> std::io::Result<u64> {
    let newer = st.newer_than(seq, offset, payload.len() as u64);
    if !newer.iter().any(|n| *n) {
        st.store.write_at(offset, payload)?;
        return Ok(payload.len() as u64);
    }
    let b = VERIFY_BLOCK as usize;
    let mut written = 0;
    let mut i = 0;
    while i < newer.len() {
        if newer[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < newer.len() && !newer[i] {
            i += 1;
        }
        let (from, to) = (start * b, (i * b).min(payload.len()));
        st.store.write_at(offset + from as u64, &payload[from..to])?;
        written += (to - from) as u64;
    }
    Ok(written)
}

fn compare(
    state: &Arc<TargetState>,
    seq: u64,
    offset: u64,
    hashes: Bytes,
    replies: &mpsc::UnboundedSender<Frame>,
    fail: &mpsc::UnboundedSender<String>,
) {
    let len = (hashes.len() / 16) as u64 * VERIFY_BLOCK as u64;
    let admitted = state.admit(offset, len);
    let (st, replies, fail) = (state.clone(), replies.clone(), fail.clone());
    state.pool.submit(admitted.wait_for, move || {
        let mine = st.hash_range(offset, len);
        // A block a newer replicated write touched needs nothing from this (older) copy.
        let newer = st.newer_than(seq, offset, len);
        st.finish(admitted.id);
        match mine {
            Ok(mine) => {
                let n = newer.len();
                let mut differ = vec![0u8; n.div_ceil(8)];
                for i in 0..n {
                    if !newer[i] && mine[i * 16..(i + 1) * 16] != hashes[i * 16..(i + 1) * 16] {
                        differ[i / 8] |= 1 << (i % 8);
                    }
                }
                let _ = replies.send(Frame::CheckReply { seq, differ: Bytes::from(differ) });
            }
            Err(e) => {
                st.stats.io_errors.inc();
                let _ = fail.send(format!("resync compare at offset {offset}: {e}"));
            }
        }
    });
}
