//! The backing store of one node's copy of a resource.
//!
//! Blocking by design: implementations are called from the engine's I/O threads. The agent
//! implements it over a file (O_DIRECT where possible); tests use [`MemStore`].

use std::io;
use std::sync::Mutex;

pub trait BlockStore: Send + Sync + 'static {
    /// Size of the volume in bytes.
    fn size(&self) -> u64;
    /// Writes `data` at `offset`. On return the write is durable to the degree the store
    /// promises for completed writes (for a file opened O_DIRECT: handed to the device).
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Makes every completed write stable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Zeroes a range (deallocating it where the store can).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// An in-memory volume for tests and the deterministic engine harness.
pub struct MemStore {
    data: Mutex<Vec<u8>>,
    /// When set, every operation fails with this errno (a failing disk).
    fail: Mutex<Option<i32>>,
}

impl MemStore {
    pub fn new(size: u64) -> Self {
        Self { data: Mutex::new(vec![0; size as usize]), fail: Mutex::new(None) }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    /// Makes every later operation fail with `errno` (None heals the disk).
    pub fn set_failing(&self, errno: Option<i32>) {
        *self.fail.lock().unwrap() = errno;
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(e) = *self.fail.lock().unwrap() {
            return Err(io::Error::from_raw_os_error(e));
        }
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "range beyond end of volume")),
        }
    }
}

impl BlockStore for MemStore {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.check(0, 0)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + len as usize].fill(0);
        Ok(())
    }
}
