use std::io;

use thiserror::Error;

/// Why an application request on the primary failed.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("request [{offset}, +{len}) lies beyond the end of the {size}-byte volume")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("empty write")]
    Empty,
    #[error("local I/O error: {0}")]
    Io(#[from] io::Error),
}

impl VolumeError {
    /// The errno to hand back to the kernel for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::OutOfRange { .. } => libc_enospc(),
            VolumeError::Empty => 22,                            // EINVAL
            VolumeError::Io(e) => e.raw_os_error().unwrap_or(5), // EIO
        }
    }
}

fn libc_enospc() -> i32 {
    28
}

/// Why a peer connection was attached in error.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AttachError {
    #[error("node {0} is not a peer of this resource")]
    UnknownPeer(String),
    #[error("node {0} is already connected")]
    AlreadyConnected(String),
}

/// Why a standby stopped applying a replication stream.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("checksum mismatch on seq {seq} at offset {offset} (+{len}): block discarded, not written")]
    ChecksumMismatch { seq: u64, offset: u64, len: usize },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("local I/O error on the standby image: {0}")]
    Io(String),
    #[error("primary reported an error: {0}")]
    Peer(String),
}
