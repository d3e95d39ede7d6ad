//! Runs blocking [`BlockStore`] operations off the async executor.

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use crate::store::BlockStore;

#[derive(Clone)]
pub struct StoreIo {
    store: Arc<dyn BlockStore>,
}

fn joined<T>(r: Result<io::Result<T>, tokio::task::JoinError>) -> io::Result<T> {
    r.unwrap_or_else(|e| Err(io::Error::other(format!("I/O task failed: {e}"))))
}

impl StoreIo {
    pub fn new(store: Arc<dyn BlockStore>) -> Self {
        Self { store }
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let s = self.store.clone();
        joined(tokio::task::spawn_blocking(move || s.write_at(offset, &data)).await)
    }

    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let s = self.store.clone();
        joined(
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                s.read_at(offset, &mut buf).map(|_| buf)
            })
            .await,
        )
    }

    pub async fn flush(&self) -> io::Result<()> {
        let s = self.store.clone();
        joined(tokio::task::spawn_blocking(move || s.flush()).await)
    }

    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let s = self.store.clone();
        joined(tokio::task::spawn_blocking(move || s.discard(offset, len)).await)
    }
}
