//! The image file behind a resource on one node, as a [`BlockStore`].
//!
//! Aligned I/O goes through an O_DIRECT descriptor: a completed write has been handed to the
//! device, as with a loop device in direct-io mode or DRBD's lower disk, and the page cache
//! does not hold a second copy of mail data. Unaligned requests (rare: the loop device uses
//! 4 KiB sectors) go through a buffered descriptor of the same file; a flush (fdatasync)
//! covers both. On a filesystem without O_DIRECT (tmpfs) everything is buffered.
//!
//! Blocking `pwrite`/`pread` on the engine's I/O threads: measured in docs/benchmarks.md,
//! the storage call is not where time goes on this path, so io_uring waits for a profile
//! that says otherwise.

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use tandem_replicator::BlockStore;
use tracing::info;

/// Alignment of O_DIRECT offsets, lengths and buffers. 4 KiB satisfies every device with
/// 512-byte or 4 KiB logical sectors.
pub const DIO_ALIGN: usize = 4096;

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory; no interior aliasing.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1).next_multiple_of(DIO_ALIGN), DIO_ALIGN)
            .expect("buffer size overflows a Layout")
    }

    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        Self { ptr, len, layout }
    }

    /// The one copy of a request's data out of the kernel's buffer (no zeroing first: every
    /// byte up to `len` is overwritten, and nothing reads beyond `len`).
    pub fn copy_from(data: &[u8]) -> Self {
        let layout = Self::layout(data.len());
        // SAFETY: layout has non-zero size; the first data.len() bytes are initialised by the
        // copy before any reference to them exists, and the tail is never exposed.
        unsafe {
            let raw = std::alloc::alloc(layout);
            let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
            std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len());
            Self { ptr, len: data.len(), layout }
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() >= len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as above, shared borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in zeroed() with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn aligned(off: u64, len: usize) -> bool {
    off.is_multiple_of(DIO_ALIGN as u64) && len.is_multiple_of(DIO_ALIGN)
}

fn mem_aligned(p: &[u8]) -> bool {
    (p.as_ptr() as usize).is_multiple_of(DIO_ALIGN)
}

pub struct FileStore {
    path: PathBuf,
    direct: Option<File>,
    buffered: File,
    size: u64,
}

impl FileStore {
    /// Creates an image of exactly `size` bytes of zeroes if none exists. Returns whether it
    /// created one (a new image is known to be all zeroes).
    ///
    /// With `full` allocation the zeroes are written out: every block is allocated before
    /// the volume is used, so a filling filesystem cannot fail a write later, and writes are
    /// overwrites — on ext4 a first write into a hole or an unwritten extent costs a journal
    /// commit at the next flush, which cut synchronous 4 KiB writes to a quarter here.
    pub fn create_if_missing(path: &Path, size: u64, full: bool) -> Result<bool> {
        if path.exists() {
            return Ok(false);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create image {}", path.display()))?;
        f.set_len(size).with_context(|| format!("cannot size image {}", path.display()))?;
        if full {
            info!(image = %path.display(), size, "allocating image (writing zeroes)");
            let zeroes = vec![0u8; 4 << 20];
            let mut at = 0u64;
            while at < size {
                let n = ((size - at) as usize).min(zeroes.len());
                f.write_all_at(&zeroes[..n], at)
                    .with_context(|| format!("cannot allocate image {} (disk full?)", path.display()))?;
                at += n as u64;
            }
        }
        f.sync_all()?;
        info!(image = %path.display(), size, full, "created image");
        Ok(true)
    }

    /// Opens an existing image, which must be exactly `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open image {}", path.display()))?;
        let actual = buffered.metadata()?.len();
        if actual != size {
            return Err(anyhow!(
                "image {} is {actual} bytes but the config says {size}; refusing to use it \
                 (resize the image or fix the resource's size)",
                path.display()
            ));
        }
        let direct = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                info!(image = %path.display(), "filesystem has no O_DIRECT: writes are buffered and made durable by flushes");
                None
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open image {} with O_DIRECT", path.display()))
            }
        };
        Ok(Self { path: path.to_path_buf(), direct, buffered, size })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn direct_for(&self, off: u64, len: usize) -> Option<&File> {
        self.direct.as_ref().filter(|_| aligned(off, len))
    }
}

impl BlockStore for FileStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        match self.direct_for(offset, data.len()) {
            Some(f) if mem_aligned(data) => f.write_all_at(data, offset),
            Some(f) => f.write_all_at(AlignedBuf::copy_from(data).as_ref(), offset),
            None => self.buffered.write_all_at(data, offset),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.direct_for(offset, buf.len()) {
            Some(f) if mem_aligned(buf) => f.read_exact_at(buf, offset),
            Some(f) => {
                let mut b = AlignedBuf::zeroed(buf.len());
                f.read_exact_at(b.as_mut_slice(), offset)?;
                buf.copy_from_slice(b.as_ref());
                Ok(())
            }
            None => self.buffered.read_exact_at(buf, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.buffered.as_raw_fd();
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on an owned fd.
        let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // No hole punching here: write zeroes, so the range reads back as zero everywhere.
        let chunk = AlignedBuf::zeroed(1 << 20);
        let mut at = offset;
        while at < offset + len {
            let n = ((offset + len - at) as usize).min(1 << 20);
            self.write_at(at, &chunk.as_ref()[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_unaligned_io_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        assert!(FileStore::create_if_missing(&p, 1 << 20, true).unwrap());
        assert!(!FileStore::create_if_missing(&p, 1 << 20, true).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let s = FileStore::open(&p, 1 << 20).unwrap();
        let data = AlignedBuf::copy_from(&[7u8; 8192]).into_bytes();
        s.write_at(4096, &data).unwrap();
        s.write_at(100, b"hello").unwrap(); // unaligned
        s.write_at(8192, &[9u8; 4096]).unwrap(); // memory probably unaligned: bounce
        s.flush().unwrap();
        let mut buf = vec![0u8; 16384];
        s.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[100..105], b"hello");
        assert!(buf[4096..8192].iter().all(|b| *b == 7));
        assert!(buf[8192..12288].iter().all(|b| *b == 9));
        s.discard(4096, 8192).unwrap();
        s.read_at(0, &mut buf).unwrap();
        assert!(buf[4096..12288].iter().all(|b| *b == 0));
        assert_eq!(&buf[100..105], b"hello");
        let e = FileStore::open(&p, 2 << 20).err().unwrap().to_string();
        assert!(e.contains("1048576 bytes but the config says 2097152"), "{e}");
    }
}
