//! Point-in-time snapshots of a node's copy of a resource: the backup target.
//!
//! Mechanism (see docs/architecture.md, "Snapshots"): copy-on-first-write of old blocks
//! into a per-snapshot file, as LVM's thick snapshots do, chained so that a write costs one
//! copy however many snapshots exist ([`chain`]). Each snapshot is a block file of preserved
//! blocks ([`cow`]) and a small record of what it is ([`record`]). Snapshots are taken at a
//! barrier of the replication stream, with no write in flight, so each is exactly the
//! primary's state after some flush; replication never pauses for one.

pub mod chain;
pub mod cow;
pub mod record;

pub use chain::{valid_name, SnapshotError, SnapshotInfo, SnapshotStore};
pub use record::{SnapshotKind, SnapshotRecord, SnapshotState};

#[cfg(test)]
mod tests;
