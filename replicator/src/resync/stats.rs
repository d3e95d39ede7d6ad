//! Resync progress as status shows it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counters of one peer's resync. Byte counters are cumulative over the process lifetime,
/// so a resync resumed after an interruption adds to them.
#[derive(Debug, Default)]
pub struct ResyncStats {
    active: AtomicBool,
    /// Bytes to synchronise in the current run (set at its start).
    total: AtomicU64,
    /// Bytes of the current run now in sync.
    done: AtomicU64,
    /// Block data sent (all runs).
    pub data_bytes_sent: AtomicU64,
    /// Hash bytes sent in checksum mode (all runs).
    pub hash_bytes_sent: AtomicU64,
    /// Bytes found equal by checksum and not sent (all runs).
    pub equal_bytes: AtomicU64,
    /// Resync runs started.
    pub runs: AtomicU64,
    /// Current rate, bytes per second.
    rate: AtomicU64,
    started: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncProgress {
    pub active: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    pub elapsed_secs: u64,
    pub data_bytes_sent: u64,
    pub hash_bytes_sent: u64,
    pub equal_bytes: u64,
}

impl ResyncStats {
    pub fn start(&self, total: u64) {
        self.active.store(true, Ordering::SeqCst);
        self.total.store(total, Ordering::SeqCst);
        self.done.store(0, Ordering::SeqCst);
        self.rate.store(0, Ordering::SeqCst);
        self.runs.fetch_add(1, Ordering::SeqCst);
        *self.started.lock().unwrap() = Some(Instant::now());
    }

    pub fn finish(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    pub fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Re-bases the total when more becomes dirty during the run.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn progress(&self) -> ResyncProgress {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(total);
        let rate = self.rate.load(Ordering::Relaxed);
        let elapsed = self.started.lock().unwrap().map_or(Duration::ZERO, |s| s.elapsed());
        ResyncProgress {
            active: self.active.load(Ordering::Relaxed),
            total_bytes: total,
            done_bytes: done,
            rate_bytes_per_sec: rate,
            eta_secs: (rate > 0).then(|| (total - done) / rate),
            elapsed_secs: elapsed.as_secs(),
            data_bytes_sent: self.data_bytes_sent.load(Ordering::Relaxed),
            hash_bytes_sent: self.hash_bytes_sent.load(Ordering::Relaxed),
            equal_bytes: self.equal_bytes.load(Ordering::Relaxed),
        }
    }
}
