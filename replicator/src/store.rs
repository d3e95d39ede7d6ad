//! The backing store of one node's copy of a resource.
//!
//! Blocking by design: implementations are called from the engine's I/O threads. The agent
//! implements it over a file (O_DIRECT where possible); tests use [`MemStore`]. A store may
//! also take writes asynchronously ([`BlockStore::submit_write`], an io_uring for the
//! agent's files): the engine uses that for a lone primary's concurrent writes, where a
//! blocking call per write would cost a thread and a wake-up per write.

use std::io;
use std::sync::Mutex;

use bytes::Bytes;

/// What a submitted write calls with its result, on whichever thread completes it.
pub type WriteDone = Box<dyn FnOnce(io::Result<()>) + Send>;

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

    /// Whether [`BlockStore::submit_write`] returns before the write is done (completing it
    /// on a thread of the store's own) rather than writing on the caller's thread.
    fn submits_writes(&self) -> bool {
        false
    }

    /// Starts writing `data` at `offset`; `done` gets the result once the write is as
    /// durable as [`BlockStore::write_at`] makes it, exactly once. The default writes on the
    /// calling thread.
    fn submit_write(&self, offset: u64, data: Bytes, done: WriteDone) {
        done(self.write_at(offset, &data))
    }
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
