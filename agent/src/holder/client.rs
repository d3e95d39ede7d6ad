//! The agent's side of the holder: store a connection's descriptor, take it back after a
//! restart, forget it when the device is removed.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use thiserror::Error;

use super::fdpass::{recv, send};
use super::Message;

#[derive(Debug, Error)]
pub enum HolderError {
    #[error("holder at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("holder refused: {0}")]
    Refused(String),
    #[error("holder answered {0:?}, which does not answer the request")]
    Unexpected(Box<Message>),
}

/// What [`HolderClient::take`] hands back.
#[derive(Debug)]
pub struct Taken {
    pub fds: Vec<OwnedFd>,
    pub state: Vec<u8>,
    /// How long no agent had been attached to the holder before this one.
    pub agentless: std::time::Duration,
}

/// A connection to the holder. While it is open the holder counts this agent as attached.
pub struct HolderClient {
    sock: UnixStream,
    path: String,
}

impl HolderClient {
    pub fn connect(socket: &Path) -> Result<Self, HolderError> {
        let path = socket.display().to_string();
        let sock =
            UnixStream::connect(socket).map_err(|source| HolderError::Io { path: path.clone(), source })?;
        Ok(Self { sock, path })
    }

    fn call(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(Message, Vec<OwnedFd>), HolderError> {
        let io = |source| HolderError::Io { path: self.path.clone(), source };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send(&self.sock, msg, &raw).map_err(io)?;
        match recv(&self.sock).map_err(io)? {
            Some((Message::Error { reason }, _)) => Err(HolderError::Refused(reason)),
            Some(r) => Ok(r),
            None => Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the holder closed the connection",
            ))),
        }
    }

    /// Has the holder keep copies of `fds` (one connection's devices), with `state`, under
    /// `key`.
    pub fn hold(&self, key: &str, fds: &[BorrowedFd<'_>], state: &[u8]) -> Result<(), HolderError> {
        match self.call(&Message::Hold { key: key.into(), state: state.to_vec() }, fds)? {
            (Message::Ok, _) => Ok(()),
            (other, _) => Err(HolderError::Unexpected(Box::new(other))),
        }
    }

    /// Duplicates of the descriptors held under `key`, in the order they were held.
    pub fn take(&self, key: &str) -> Result<Taken, HolderError> {
        match self.call(&Message::Take { key: key.into() }, &[])? {
            (Message::Held { state, agentless_ms, .. }, fds) if !fds.is_empty() => {
                Ok(Taken { fds, state, agentless: std::time::Duration::from_millis(agentless_ms) })
            }
            (other, _) => Err(HolderError::Unexpected(Box::new(other))),
        }
    }

    /// Has the holder close its copy of the descriptor under `key`.
    pub fn forget(&self, key: &str) -> Result<(), HolderError> {
        match self.call(&Message::Forget { key: key.into() }, &[])? {
            (Message::Ok, _) => Ok(()),
            (other, _) => Err(HolderError::Unexpected(Box::new(other))),
        }
    }

    /// Counts this connection as an attached agent (the grace time does not run while it
    /// is open), even before it holds anything.
    pub fn attach(&self) -> Result<(), HolderError> {
        match self.call(&Message::Attach, &[])? {
            (Message::Ok, _) => Ok(()),
            (other, _) => Err(HolderError::Unexpected(Box::new(other))),
        }
    }

    /// The keys held.
    pub fn list(&self) -> Result<Vec<String>, HolderError> {
        match self.call(&Message::List, &[])? {
            (Message::Keys { keys }, _) => Ok(keys),
            (other, _) => Err(HolderError::Unexpected(Box::new(other))),
        }
    }
}
