//! Tandem's replication engine, independent of how blocks reach it and how frames travel.
//!
//! - [`Volume`]: the primary's side of a resource — admission, ordering, local I/O, fan-out
//!   to peers, ack accounting per mode, dirty tracking when a peer is absent or lost.
//! - [`Applier`]: the standby's side — checks, orders and applies the change stream epoch by
//!   epoch, and acknowledges it.
//! - [`BlockStore`] and [`Link`] are the seams: the agent plugs in a file and QUIC; tests plug
//!   in [`MemStore`] and [`sim`].

mod activity_log;
pub mod barrier;
mod bitmap;
mod error;
pub mod generation;
mod inflight;
mod io_pool;
mod latch;
mod link;
mod mode;
mod peer;
mod primary;
pub mod relation;
mod request;
pub mod resync;
mod secondary;
pub mod sim;
pub mod split_brain;
pub mod stage_trace;
mod stats;
mod store;

pub use activity_log::{replay_activity_log, ActivityLog, ActivityLogStats, ActivityLogStore, AlGuard};
pub use bitmap::DirtyBitmap;
pub use error::{ApplyError, AttachError, VolumeError};
pub use link::{Link, LINK_CAPACITY};
pub use mode::{Backlog, BacklogPolicy, Mode};
pub use primary::{LocalWork, PeerConfig, PeerHandle, PeerReplication, Volume};
pub use request::Done;
pub use secondary::{Applier, TargetState};
pub use stats::{ApplierStats, Counter, LatencyHistogram, LatencySnapshot, VolumeStats, LATENCY_BUCKETS};
pub use store::{BlockStore, MemStore, WriteDone};
pub use tandem_protocol::ResyncKind;
