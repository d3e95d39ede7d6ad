//! The resync engine: rebuilds a peer's copy by sending only what differs, while the
//! application keeps writing.
//!
//! - [`source`]: walks the dirty bitmap, reads chunks as of a point in the change stream,
//!   sends them (or, in checksum mode, their hashes first), and clears bits on the peer's ack.
//! - [`target`]: applies resync data without ever overwriting a newer replicated write.
//! - [`rate`]: rate cap, in-flight window from the measured bandwidth-delay product, and
//!   backing off while the application writes.
//! - [`stats`]: progress, rate and ETA for status.
//!
//! The bitmap is the progress record: a resync interrupted by a disconnect or a restart
//! continues from the bits still set, never from the start.

pub mod rate;
pub mod source;
pub mod stats;
pub mod target;

/// Largest chunk a resync reads and sends at once.
pub const CHUNK: u64 = 1 << 20;
