//! Every default of the config file, and nothing else: the serde schema (`file.rs`) and
//! [`Options::default`](super::Options) name these functions, so a default is changed
//! here or nowhere. `docs/operations.md` lists the same values; a test parses that table
//! and compares.
//!
//! Not here, because they are inherited rather than fixed: a resource's `timeout` is
//! `options.timeout`; a `[resource.disk.NODE]`'s `mode`, `backlog` and `on_backlog_full`
//! are the resource's; `[resource.handlers]` keys are the top-level `[handlers]` ones.

use std::time::Duration;

use tandem_protocol::Compression;
use tandem_replicator::split_brain::AfterSplitBrain;
use tandem_replicator::{BacklogPolicy, Mode};

use super::file::Allocation;
use super::Congestion;

// [[node]]

pub fn device_dir() -> std::path::PathBuf {
    "/dev/tandem".into()
}

// [options]

pub const fn timeout() -> Duration {
    Duration::from_secs(5)
}

pub const fn heartbeat_interval() -> Duration {
    Duration::from_secs(1)
}

pub const fn connect_retry() -> Duration {
    Duration::from_secs(1)
}

pub const fn stream_window() -> u64 {
    16 << 20
}

pub const fn max_mtu() -> u16 {
    9000
}

/// The QUIC socket's receive and send buffers: the kernel's default (~208 KiB) overflows
/// under a burst of replication traffic while the network thread is busy
/// (docs/benchmarks.md).
pub const fn socket_buffer() -> u64 {
    8 << 20
}

pub const fn takeover_grace() -> Duration {
    Duration::from_secs(60)
}

pub const fn hook_timeout() -> Duration {
    Duration::from_secs(60)
}

pub const fn congestion() -> Congestion {
    Congestion::Cubic
}

// [[resource]]

pub const fn mode() -> Mode {
    Mode::Sync
}

pub const fn bitmap_granularity() -> u64 {
    4096
}

pub const fn allocate() -> Allocation {
    Allocation::Full
}

/// Unlimited.
pub const fn resync_max_rate() -> Option<u64> {
    None
}

pub const fn resync_min_rate() -> u64 {
    16 << 20
}

pub const fn resync_checksum() -> bool {
    false
}

pub const fn snapshot_before_resync() -> bool {
    true
}

pub const fn al_extents() -> usize {
    1000
}

pub const fn al_extent_size() -> u64 {
    4 << 20
}

pub const fn after_split_brain() -> AfterSplitBrain {
    AfterSplitBrain::Disconnect
}

pub const fn backlog() -> u64 {
    128 << 20
}

pub const fn on_backlog_full() -> BacklogPolicy {
    BacklogPolicy::Ahead
}

// [resource.disk.NODE]

pub const fn compression() -> Compression {
    Compression::None
}
