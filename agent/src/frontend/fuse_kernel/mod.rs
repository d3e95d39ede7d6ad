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
//! # FUSE over io_uring (not built yet)
//!
//! A second queue type behind the same [`Handler`]: the INIT reply asks for
//! [`abi::init_flags::OVER_IO_URING`] (only offered with
//! `/sys/module/fuse/parameters/enable_uring` set), then one queue per possible CPU
//! registers ring entries with `IORING_OP_URING_CMD` / `FUSE_IO_URING_CMD_REGISTER` and
//! answers with `COMMIT_AND_FETCH`. The kernel uses the ring only once every queue has an
//! entry registered (`is_ring_ready` in fs/fuse/dev_uring.c); until then, and whenever
//! registration fails, requests keep coming through the device reads here, which is the
//! fallback.

pub mod abi;
pub mod connection;
pub mod mount;
pub mod session;

pub use connection::{Connection, InitParams, InitWanted};
pub use session::{Handler, Reply, Session};
