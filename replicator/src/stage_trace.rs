//! Timestamps of a request's stages through the data path, for the latency breakdown in
//! `docs/benchmarks.md`. Compiled in only with the `stage-trace` feature (off by default:
//! the calls are empty inline functions then, so the product pays nothing).
//!
//! With the feature, and `TANDEM_STAGE_TRACE=DIR` in the environment, every process appends
//! `stage seq nanoseconds` lines to `DIR/stages.PID`, once a second. Times are
//! `CLOCK_MONOTONIC`, which every process of one machine shares, so a primary's and a
//! standby's lines on one host line up by sequence number (`tandem-bench --breakdown`
//! joins them). Only the change stream's own sequence numbers are traced: a primary's
//! request and the replication frames and acks carrying it.

use tandem_protocol::Frame;

/// A point a request passes. The order is the order of a sync write's round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Primary: the request got its sequence number (admitted).
    Admitted = 0,
    /// Primary: the local write or flush returned.
    LocalDone = 1,
    /// Either side's link writer took a data or flush frame from its queue.
    Sent = 2,
    /// Standby: the link reader decoded the data or flush frame.
    Received = 3,
    /// Standby: the apply started (a write on an I/O thread, a flush after its epoch).
    ApplyStart = 4,
    /// Standby: the write or flush is on its disk; the ack is queued.
    Applied = 5,
    /// Standby: its link writer took the ack from its queue.
    AckSent = 6,
    /// Primary: the link reader decoded the ack.
    AckReceived = 7,
    /// Primary: the request completed (the application's reply is being sent).
    Completed = 8,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Admitted,
        Stage::LocalDone,
        Stage::Sent,
        Stage::Received,
        Stage::ApplyStart,
        Stage::Applied,
        Stage::AckSent,
        Stage::AckReceived,
        Stage::Completed,
    ];

    pub fn from_u8(v: u8) -> Option<Stage> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Admitted => "admitted",
            Stage::LocalDone => "local-done",
            Stage::Sent => "sent",
            Stage::Received => "received",
            Stage::ApplyStart => "apply-start",
            Stage::Applied => "applied",
            Stage::AckSent => "ack-sent",
            Stage::AckReceived => "ack-received",
            Stage::Completed => "completed",
        }
    }
}

/// Set in the stage byte of an `admitted` line whose request is a flush (the breakdown
/// splits writes from flushes).
pub const FLUSH_BIT: u8 = 0x80;

/// Records that request `seq` (a flush if `flush`) got its sequence number.
#[inline]
pub fn admitted(seq: u64, flush: bool) {
    #[cfg(feature = "stage-trace")]
    imp::mark(Stage::Admitted as u8 | if flush { FLUSH_BIT } else { 0 }, seq);
    #[cfg(not(feature = "stage-trace"))]
    let _ = (seq, flush);
}

/// Records that request `seq` passed `stage`.
#[inline]
pub fn mark(stage: Stage, seq: u64) {
    #[cfg(feature = "stage-trace")]
    imp::mark(stage as u8, seq);
    #[cfg(not(feature = "stage-trace"))]
    let _ = (stage, seq);
}

/// Records a data or flush frame (`sent`/`received`) or an ack (`ack_sent`/`ack_received`)
/// passing a link's writer or reader.
#[inline]
pub fn frame(f: &Frame, outbound: bool) {
    #[cfg(feature = "stage-trace")]
    {
        let (seq, ack) = match f {
            Frame::Data(d) => (d.seq, false),
            Frame::Flush { seq, .. } => (*seq, false),
            Frame::Ack { seq, level: tandem_protocol::AckLevel::Durable } => (*seq, true),
            _ => return,
        };
        let stage = match (outbound, ack) {
            (true, false) => Stage::Sent,
            (false, false) => Stage::Received,
            (true, true) => Stage::AckSent,
            (false, true) => Stage::AckReceived,
        };
        imp::mark(stage as u8, seq);
    }
    #[cfg(not(feature = "stage-trace"))]
    let _ = (f, outbound);
}

#[cfg(feature = "stage-trace")]
mod imp {
    use std::io::Write;
    use std::sync::{Mutex, OnceLock};

    struct Sink {
        lines: Mutex<Vec<(u8, u64, u64)>>,
    }

    fn sink() -> Option<&'static Sink> {
        static SINK: OnceLock<Option<&'static Sink>> = OnceLock::new();
        *SINK.get_or_init(|| {
            let dir = std::env::var_os("TANDEM_STAGE_TRACE")?;
            let path = std::path::Path::new(&dir).join(format!("stages.{}", std::process::id()));
            let sink: &'static Sink =
                Box::leak(Box::new(Sink { lines: Mutex::new(Vec::with_capacity(1 << 16)) }));
            std::thread::Builder::new()
                .name("tandem-trace".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    let batch = std::mem::take(&mut *sink.lines.lock().unwrap());
                    if batch.is_empty() {
                        continue;
                    }
                    let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) else {
                        continue;
                    };
                    let mut out = String::with_capacity(batch.len() * 24);
                    for (stage, seq, ns) in batch {
                        out.push_str(&format!("{stage} {seq} {ns}\n"));
                    }
                    let _ = f.write_all(out.as_bytes());
                })
                .ok()?;
            Some(sink)
        })
    }

    pub(super) fn mark(stage: u8, seq: u64) {
        let Some(s) = sink() else { return };
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec it is given. CLOCK_MONOTONIC is
        // shared by every process of the machine, so two agents' lines line up.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } != 0 {
            return;
        }
        let ns = t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
        s.lines.lock().unwrap().push((stage, seq, ns));
    }
}
