//! Replication modes: when a write completes, per peer (DRBD protocols C, B, A).

use std::fmt;
use std::str::FromStr;

use tandem_protocol::{AckLevel, FLAG_ACK_RECEIVED};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Completes when the peer has the write on stable storage (protocol C).
    Sync,
    /// Completes when the peer has received the write (protocol B).
    Memory,
    /// Completes after the local write; the peer catches up (protocol A).
    Async,
}

impl Mode {
    /// The acknowledgement a request waits for from a peer in this mode, if any.
    pub fn completion_level(self) -> Option<AckLevel> {
        match self {
            Mode::Sync => Some(AckLevel::Durable),
            Mode::Memory => Some(AckLevel::Received),
            Mode::Async => None,
        }
    }

    /// Frame flags that ask the peer for the acks this mode needs.
    pub fn frame_flags(self) -> u8 {
        match self {
            Mode::Memory => FLAG_ACK_RECEIVED,
            Mode::Sync | Mode::Async => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Memory => "memory",
            Mode::Async => "async",
        }
    }
}

/// What the primary does when a peer's backlog (bytes sent and not yet on its disk) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BacklogPolicy {
    /// Stop sending data to the peer; mark what it misses in its bitmap and resync it once
    /// the backlog has drained. The application never waits for a slow peer.
    Ahead,
    /// Writes wait until the peer has them on disk, while the backlog is full.
    Block,
}

impl FromStr for BacklogPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ahead" => Ok(BacklogPolicy::Ahead),
            "block" => Ok(BacklogPolicy::Block),
            other => Err(format!("unknown backlog policy {other:?} (expected ahead or block)")),
        }
    }
}

/// A bounded backlog for a peer that the application does not wait for in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub limit: u64,
    pub when_full: BacklogPolicy,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Mode::Sync),
            "memory" => Ok(Mode::Memory),
            "async" => Ok(Mode::Async),
            other => Err(format!("unknown replication mode {other:?} (expected sync, memory or async)")),
        }
    }
}
