//! The FUSE transport of the loop-over-FUSE frontend, our own instead of a library's: it
//! serves exactly what the frontend needs (one directory of one file per volume) and owns
//! the connection, which agent takeover and FUSE-over-io_uring need.
//!
//! - [`abi`]: the kernel's structs and opcodes, checked decoding, encoding.
//! - [`mount`]: `/dev/fuse` and `mount(2)` / `umount2`.
//! - [`connection`]: the device fds and the parameters negotiated in INIT (serialisable,
//!   for takeover), FUSE_NOTIFY_RESEND.
//! - [`session`]: worker threads, the [`Handler`] trait and [`Reply`].
//!
//! # Takeover
//!
//! The descriptor holder (`crate::holder`) keeps the connection's devices so the mount
//! outlives a crashed agent. What a new agent needs from it: every device requests are read
//! from (the mounted fd and each `FUSE_DEV_IOC_CLONE` of it — closing the last copy of a
//! device fails the requests read from it and not answered, with ECONNABORTED, in
//! `fuse_dev_release`; only requests on devices still open can be resent), the
//! [`InitParams`] (INIT is sent once per connection), and the mountpoint.
//! [`Session::resume`] sends FUSE_NOTIFY_RESEND — the kernel queues again what the dead
//! agent had read, with [`abi::UNIQUE_RESEND`] in `unique` — answers everything waiting in
//! the order the kernel first issued it, then starts the workers on the held devices. A
//! resent WRITE was never acknowledged, so admitting it again is allowed; admitting it in
//! its original order keeps overlapping requests in the order the kernel sent them.
//!
//! # FUSE over io_uring (measured, not kept)
//!
//! A second queue type behind the same [`Handler`] was prototyped and measured
//! (docs/benchmarks.md, "What was tried and not kept"): no gain for synchronous writes,
//! slower at queue depth 32, and no takeover. What it takes, for a next attempt: the INIT
//! reply asks for [`abi::init_flags::OVER_IO_URING`] (offered only with
//! `/sys/module/fuse/parameters/enable_uring` set); from then on the kernel holds every new
//! request until each per-CPU queue has a ring entry registered (`IORING_OP_URING_CMD`,
//! `FUSE_IO_URING_CMD_REGISTER`; `fuse_block_alloc`), so registering is not optional once
//! asked for — only a failed REGISTER turns the ring off and the device reads back on. A
//! reply is committed (`COMMIT_AND_FETCH`) by the thread that owns the ring entry, and
//! requests in flight on the ring are not resent by FUSE_NOTIFY_RESEND.

pub mod abi;
pub mod connection;
pub mod mount;
pub mod session;

pub use connection::{Connection, InitParams, InitWanted};
pub use session::{Handler, Reply, Session};
