//! The image file behind a resource on one node, as a [`BlockStore`].
//!
//! Aligned I/O goes through an O_DIRECT descriptor: a completed write has been handed to the
//! device, as with a loop device in direct-io mode or DRBD's lower disk, and the page cache
//! does not hold a second copy of mail data. Unaligned requests (rare: the loop device uses
//! 4 KiB sectors) go through a buffered descriptor of the same file; a flush (fdatasync)
//! covers both. On a filesystem without O_DIRECT (tmpfs) everything is buffered.
//!
//! A discard reads back as zeroes afterwards, through either descriptor. What it does to the
//! blocks follows the image's [`Allocation`]: a fully allocated image stays fully allocated
//! (the range is zeroed in place), a sparse one gives the blocks back (a hole is punched).
//!
//! Blocking `pwrite`/`pread` on the engine's threads, except the writes the engine submits
//! ([`BlockStore::submit_write`]: a lone primary's concurrent writes), which go through an
//! io_uring owned by one thread of the image's ([`uring`]), started at the first of them;
//! where the kernel refuses io_uring they are written blocking as before.

pub mod uring;

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use tandem_replicator::{BlockStore, WriteDone};
use tracing::{info, warn};

use self::uring::UringWriter;

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

/// How an image's blocks are allocated (`allocate = "full" | "sparse"` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Every block is allocated when the image is created and stays allocated: a filling
    /// filesystem cannot fail a write later. A discard zeroes the range in place
    /// (`FALLOC_FL_ZERO_RANGE`, or written zeroes where the filesystem lacks it).
    Full,
    /// Blocks are allocated as they are written; a discard gives them back
    /// (`FALLOC_FL_PUNCH_HOLE`, or written zeroes where the filesystem lacks it).
    Sparse,
}

impl Allocation {
    /// The `fallocate` mode a discard uses. Neither changes the file's size.
    fn discard_mode(self) -> libc::c_int {
        match self {
            Allocation::Full => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            Allocation::Sparse => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

pub struct FileStore {
    path: PathBuf,
    direct: Option<File>,
    buffered: File,
    size: u64,
    allocation: Allocation,
    /// The asynchronous writer, started at the first submitted write; None where the image
    /// has no O_DIRECT descriptor or the kernel refused a ring.
    uring: OnceLock<Option<UringWriter>>,
}

impl FileStore {
    /// Creates an image of exactly `size` bytes of zeroes if none exists. Returns whether it
    /// created one (a new image is known to be all zeroes).
    ///
    /// With [`Allocation::Full`] the zeroes are written out: every block is allocated before
    /// the volume is used, so a filling filesystem cannot fail a write later, and writes are
    /// overwrites — on ext4 a first write into a hole or an unwritten extent costs a journal
    /// commit at the next flush, which cut synchronous 4 KiB writes to a quarter here.
    pub fn create_if_missing(path: &Path, size: u64, allocation: Allocation) -> Result<bool> {
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
        if allocation == Allocation::Full {
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
        info!(image = %path.display(), size, ?allocation, "created image");
        Ok(true)
    }

    /// Opens an existing image, which must be exactly `size` bytes; `allocation` decides
    /// what a discard does to its blocks.
    pub fn open(path: &Path, size: u64, allocation: Allocation) -> Result<Self> {
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
        Ok(Self { path: path.to_path_buf(), direct, buffered, size, allocation, uring: OnceLock::new() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn direct_for(&self, off: u64, len: usize) -> Option<&File> {
        self.direct.as_ref().filter(|_| aligned(off, len))
    }

    fn uring(&self) -> Option<&UringWriter> {
        self.uring
            .get_or_init(|| {
                let f = self.direct.as_ref()?;
                UringWriter::start(f)
                    .inspect(
                        |_| info!(image = %self.path.display(), "concurrent writes go through an io_uring"),
                    )
                    .inspect_err(|e| {
                        warn!(image = %self.path.display(), error = %e,
                              "no io_uring for this image: its concurrent writes block a thread each")
                    })
                    .ok()
            })
            .as_ref()
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

    fn submits_writes(&self) -> bool {
        self.uring().is_some()
    }

    /// Aligned writes of aligned buffers go to the ring; anything else is written here.
    fn submit_write(&self, offset: u64, data: Bytes, done: WriteDone) {
        match self.uring() {
            Some(w) if aligned(offset, data.len()) && mem_aligned(&data) => w.submit(offset, data, done),
            _ => done(self.write_at(offset, &data)),
        }
    }

    /// Zeroes `[offset, offset+len)`; frees its blocks only if the image is sparse. The
    /// kernel writes back and drops the range's page cache, and O_DIRECT reads of zeroed or
    /// punched extents return zeroes: both descriptors read zeroes after it.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.buffered.as_raw_fd();
        let mode = self.allocation.discard_mode();
        // SAFETY: plain syscall on an owned fd.
        let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // The filesystem cannot zero or punch (tmpfs has no ZERO_RANGE): write zeroes, which
        // keeps the blocks allocated and reads back as zero everywhere.
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
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    /// A store on a real filesystem with O_DIRECT, hole punching and ZERO_RANGE (tmpfs has
    /// no ZERO_RANGE, so not the default temporary directory, which may be tmpfs).
    fn store_on_disk(dir: &tempfile::TempDir, size: u64, allocation: Allocation) -> (PathBuf, FileStore) {
        let p = dir.path().join("img");
        assert!(FileStore::create_if_missing(&p, size, allocation).unwrap());
        let s = FileStore::open(&p, size, allocation).unwrap();
        assert!(
            s.direct.is_some(),
            "{} has no O_DIRECT: these tests need a disk filesystem (ext4, xfs) there",
            dir.path().display()
        );
        (p, s)
    }

    fn allocated_bytes(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    /// Reads `[offset, offset+len)` through the O_DIRECT descriptor (aligned buffer).
    fn read_direct(s: &FileStore, offset: u64, len: usize) -> Vec<u8> {
        let mut b = AlignedBuf::zeroed(len);
        s.direct.as_ref().unwrap().read_exact_at(b.as_mut_slice(), offset).unwrap();
        b.as_ref().to_vec()
    }

    #[test]
    fn a_discard_on_a_fully_allocated_image_zeroes_in_place_and_keeps_every_block() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let size = 4 * MIB;
        let (p, s) = store_on_disk(&dir, size, Allocation::Full);
        s.write_at(MIB, &AlignedBuf::copy_from(&vec![7u8; 2 * MIB as usize]).into_bytes()).unwrap();
        // Buffered writes into the range and at its edges, not yet flushed: the page cache
        // holds them when the range is discarded.
        s.write_at(MIB + 100, b"in range").unwrap();
        s.write_at(MIB + 4096 - 3, b"edge").unwrap();
        s.flush().unwrap();
        let before = allocated_bytes(&p);
        assert!(before >= size, "created fully allocated: {before} of {size} bytes");

        // An aligned discard, and one that starts and ends inside blocks.
        s.discard(MIB, MIB).unwrap();
        s.discard(2 * MIB + 1000, 5000).unwrap();
        s.flush().unwrap();

        let after = allocated_bytes(&p);
        assert!(
            after >= before,
            "a discard freed blocks of a fully allocated image: {before} -> {after} bytes"
        );
        let direct = read_direct(&s, 0, 4 * MIB as usize);
        let zeroed =
            |r: std::ops::Range<u64>| direct[r.start as usize..r.end as usize].iter().all(|b| *b == 0);
        let sevens =
            |r: std::ops::Range<u64>| direct[r.start as usize..r.end as usize].iter().all(|b| *b == 7);
        assert!(zeroed(MIB..2 * MIB), "a direct read sees the discarded range as zeroes");
        assert!(sevens(2 * MIB..2 * MIB + 1000) && sevens(2 * MIB + 6000..3 * MIB), "neighbours are kept");
        assert!(zeroed(2 * MIB + 1000..2 * MIB + 6000), "the unaligned discard is zero to the byte");
        assert!(zeroed(0..MIB) && zeroed(3 * MIB..4 * MIB));
        // The buffered descriptor agrees (an unaligned read goes through it).
        let mut buffered = vec![1u8; MIB as usize + 1];
        s.read_at(MIB, &mut buffered).unwrap();
        assert!(buffered[..MIB as usize].iter().all(|b| *b == 0) && buffered[MIB as usize] == 7);
    }

    #[test]
    fn a_discard_on_a_sparse_image_frees_its_blocks() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (p, s) = store_on_disk(&dir, 4 * MIB, Allocation::Sparse);
        assert!(allocated_bytes(&p) < MIB, "a sparse image starts with (almost) no blocks");
        s.write_at(0, &AlignedBuf::copy_from(&vec![7u8; 3 * MIB as usize]).into_bytes()).unwrap();
        s.flush().unwrap();
        let before = allocated_bytes(&p);
        assert!(before >= 3 * MIB, "written blocks are allocated: {before}");
        s.discard(MIB, MIB).unwrap();
        s.flush().unwrap();
        let after = allocated_bytes(&p);
        assert!(after + MIB <= before, "the hole gives back the discarded MiB: {before} -> {after} bytes");
        let direct = read_direct(&s, 0, 3 * MIB as usize);
        assert!(direct[MIB as usize..2 * MIB as usize].iter().all(|b| *b == 0));
        assert!(direct[..MIB as usize].iter().chain(&direct[2 * MIB as usize..]).all(|b| *b == 7));
    }

    #[test]
    fn aligned_and_unaligned_io_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        assert!(FileStore::create_if_missing(&p, 1 << 20, Allocation::Full).unwrap());
        assert!(!FileStore::create_if_missing(&p, 1 << 20, Allocation::Full).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let s = FileStore::open(&p, 1 << 20, Allocation::Full).unwrap();
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
        let e = FileStore::open(&p, 2 << 20, Allocation::Full).err().unwrap().to_string();
        assert!(e.contains("1048576 bytes but the config says 2097152"), "{e}");
    }
}
