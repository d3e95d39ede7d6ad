//! The descriptor holder: a small process that keeps each volume's `/dev/fuse` connection
//! open while no agent runs, so the loop device — and the mail filesystem mounted on it —
//! outlives an agent that crashed or is being upgraded. Requests wait in the kernel while
//! the connection is held; a new agent takes the descriptor back and answers them.
//!
//! Invariants:
//! - The holder keeps its own copy of every descriptor it was given until it is told to
//!   forget it, or until the grace time has passed with no agent attached; an agent that
//!   takes a descriptor gets a duplicate, so the connection survives that agent too.
//! - With each descriptor the holder keeps the opaque state the agent stored beside it
//!   (the FUSE_INIT parameters negotiated once per connection): a new agent needs both.
//! - The grace time runs from the moment the last attached agent's socket closes (it
//!   died, or stopped without forgetting). When it passes, the holder closes its copies:
//!   the kernel aborts the connections, waiting requests fail with EIO — what happens at
//!   once without a holder — and the holder exits.
//! - The holder does no I/O on the descriptors: it cannot corrupt anything, and if it is
//!   killed too, the connections end as they do today (I/O errors, a failover).
//!
//! - A connection is held as all of its devices (the mounted fd and every clone a worker
//!   reads from): closing the device a request was read from fails that request, so the
//!   holder keeps every one of them, and hands them back together.
//! - The holder exits when the last attached agent leaves and nothing is held (a clean
//!   stop), or when the grace time has passed with no agent attached.
//!
//! One message is a 4-byte little-endian length and a JSON body ([`Message`]); descriptors
//! travel as `SCM_RIGHTS` with the message's first bytes.

pub mod client;
pub mod fdpass;
pub mod keeper;
pub mod server;

use serde::{Deserialize, Serialize};

/// The largest message either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

/// A message on the holder's socket. Requests carry the key of the connection (the
/// resource's FUSE mountpoint); `Hold` comes with the connection's descriptors, and so does
/// a `Held` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Message {
    /// Agent → holder: keep these descriptors (attached) and `state` under `key`, replacing
    /// what was held under it.
    Hold { key: String, state: Vec<u8> },
    /// Agent → holder: give me duplicates of the descriptors held under `key`.
    Take { key: String },
    /// Agent → holder: close the descriptors held under `key` (the device was removed).
    Forget { key: String },
    /// Agent → holder: the keys held.
    List,
    /// Agent → holder: count me as an attached agent until this connection closes.
    Attach,
    /// Holder → agent: done.
    Ok,
    /// Holder → agent: the descriptors (attached, in the order they were held) and the
    /// state stored with them; `agentless_ms`: how long no agent had been attached before
    /// this one (0 if one was).
    Held { key: String, state: Vec<u8>, agentless_ms: u64 },
    /// Holder → agent: the keys held.
    Keys { keys: Vec<String> },
    /// Holder → agent: the request failed.
    Error { reason: String },
}

#[cfg(test)]
mod tests;
