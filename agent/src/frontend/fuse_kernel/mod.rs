//! The FUSE transport of the loop-over-FUSE frontend, our own instead of a library's: it
//! serves exactly what the frontend needs (one directory of one file per volume) and owns
//! the connection, which agent takeover (a holder process keeping the `/dev/fuse` fds
//! across an agent crash) and FUSE-over-io_uring need.
//!
//! - [`abi`]: the kernel's structs and opcodes, checked decoding, encoding.
//! - [`mount`]: `/dev/fuse` and `mount(2)` / `umount2`.
//! - [`connection`]: the fd and the parameters negotiated in INIT (serialisable, for
//!   takeover), FUSE_NOTIFY_RESEND.
//! - [`session`]: worker threads, the [`Handler`] trait and [`Reply`].

pub mod abi;
pub mod connection;
pub mod mount;
pub mod session;

pub use connection::{Connection, InitParams, InitWanted};
pub use session::{Handler, Reply, Session};
