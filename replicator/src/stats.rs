//! Counters the agent exports in status and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Primary-side counters of one resource.
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub writes: Counter,
    pub write_bytes: Counter,
    pub flushes: Counter,
    pub discards: Counter,
    pub reads: Counter,
    pub read_bytes: Counter,
    pub local_io_errors: Counter,
    pub peer_disconnects: Counter,
}

/// Standby-side counters of one resource.
#[derive(Debug, Default)]
pub struct ApplierStats {
    pub writes: Counter,
    pub write_bytes: Counter,
    pub flushes: Counter,
    pub discards: Counter,
    pub resync_writes: Counter,
    pub resync_bytes: Counter,
    pub checksum_errors: Counter,
    pub protocol_errors: Counter,
    pub io_errors: Counter,
}
