//! The FUSE half of the loop-over-FUSE frontend: one directory holding one file per volume
//! (`image` for a resource of one volume, the volume names for a volume group), whose reads
//! and writes go to the primary's [`Volume`] at the volume's place in its address space.
//!
//! Requests are handled on the transport's worker threads ([`super::fuse_kernel`]): a write's data is copied once into an aligned
//! buffer and admitted (sequence number, ordering, fan-out) right there, so the change stream
//! follows the kernel's order; the local write runs on the same thread, or — with no peer
//! connected and other local I/O under way — on the volume's local I/O threads
//! ([`tandem_replicator::LocalWork::dispatch`]). The reply goes out when the request
//! completes — from the thread that wrote it if nothing else is awaited, or from the task
//! that receives the last peer ack. FSYNC is the barrier; FALLOCATE
//! punch-hole / zero-range is a replicated discard.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tandem_replicator::{Volume, VolumeError};
use tracing::{debug, warn};

use super::fuse_kernel::abi::{
    self, open_flags, DirEntries, FileAttr, FileKind, FsyncIn, OpenIn, ReadIn, SetattrIn, WriteIn, ROOT_ID,
};
use super::fuse_kernel::{Handler, Reply};
use super::RequestLatency;
use crate::storage::AlignedBuf;
use crate::volume_set::VolumeLayout;

pub const IMAGE_NAME: &str = "image";
pub(super) const TTL: abi::Ttl = abi::Ttl(Duration::from_secs(3600));

/// The file name a volume is exposed under.
pub fn file_name(v: &VolumeLayout) -> &str {
    if v.name.is_empty() {
        IMAGE_NAME
    } else {
        &v.name
    }
}

/// The directory tree both FUSE filesystems serve (a live volume's, an exposed
/// snapshot's): the root, and one file per volume — inode `2 + i` is `files[i]`.
pub(super) struct VolumeFiles {
    files: Vec<VolumeLayout>,
    writable: bool,
}

impl VolumeFiles {
    pub(super) fn new(files: Vec<VolumeLayout>, writable: bool) -> Self {
        Self { files, writable }
    }

    pub(super) fn file(&self, ino: u64) -> Option<&VolumeLayout> {
        self.files.get(usize::try_from(ino).ok()?.checked_sub(2)?)
    }

    /// The address-space offset of `[offset, +len)` of file `ino`, if the range is inside it.
    pub(super) fn place(&self, ino: u64, offset: u64, len: u64) -> Result<u64, Errno> {
        let f = self.file(ino).ok_or(Errno::ENOENT)?;
        match offset.checked_add(len) {
            Some(end) if end <= f.size => Ok(f.offset + offset),
            _ => Err(Errno::EINVAL),
        }
    }

    pub(super) fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == ROOT_ID;
        let size = if dir { 0 } else { self.file(ino).map_or(0, |f| f.size) };
        let perm = match (dir, self.writable) {
            (true, true) => 0o700,
            (true, false) => 0o500,
            (false, true) => 0o600,
            (false, false) => 0o400,
        };
        FileAttr {
            ino,
            size,
            blocks: size / 512,
            kind: if dir { FileKind::Directory } else { FileKind::RegularFile },
            perm,
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            blksize: 4096,
        }
    }

    pub(super) fn lookup(&self, parent: u64, name: &OsStr, reply: Reply) {
        match self.files.iter().position(|f| parent == ROOT_ID && name == file_name(f)) {
            Some(i) => reply.entry(&self.attr(2 + i as u64), TTL),
            None => reply.error(Errno::ENOENT),
        }
    }

    pub(super) fn getattr(&self, ino: u64, reply: Reply) {
        if ino == ROOT_ID || self.file(ino).is_some() {
            reply.attr(&self.attr(ino), TTL);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    pub(super) fn readdir(&self, ino: u64, arg: &ReadIn, reply: Reply) {
        if ino != ROOT_ID {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![(ROOT_ID, FileKind::Directory, "."), (ROOT_ID, FileKind::Directory, "..")];
        for (i, f) in self.files.iter().enumerate() {
            entries.push((2 + i as u64, FileKind::RegularFile, file_name(f)));
        }
        let mut out = DirEntries::new(arg.size as usize);
        let skip = usize::try_from(arg.offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(skip) {
            if !out.add(*ino, (i + 1) as u64, *kind, OsStr::new(name)) {
                break;
            }
        }
        reply.directory(out);
    }
}

pub struct ImageFs {
    volume: Arc<Volume>,
    files: VolumeFiles,
    latency: Arc<RequestLatency>,
    /// Closed when this agent hands the connection to the next one.
    gate: Arc<HandoverGate>,
}

/// Closed when this agent hands its connection to the next one: I/O requests are left
/// unanswered from then on (the kernel resends them to the next agent), so what was
/// admitted can drain and nothing new reaches this engine. A request counts as inside from
/// before it looks at the gate until its admission is done; once the gate is closed and
/// nothing is inside, every later request sees it closed (both sides use SeqCst).
#[derive(Debug, Default)]
pub struct HandoverGate {
    closed: AtomicBool,
    inside: AtomicUsize,
}

/// A request past the gate, until dropped.
struct Inside<'a>(&'a HandoverGate);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HandoverGate {
    fn enter(&self) -> Option<Inside<'_>> {
        self.inside.fetch_add(1, Ordering::SeqCst);
        let inside = Inside(self);
        (!self.closed.load(Ordering::SeqCst)).then_some(inside)
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Closed, and no request between the gate and the end of its admission.
    pub fn drained(&self) -> bool {
        self.closed.load(Ordering::SeqCst) && self.inside.load(Ordering::SeqCst) == 0
    }
}

impl ImageFs {
    pub fn new(
        volume: Arc<Volume>,
        files: Vec<VolumeLayout>,
        latency: Arc<RequestLatency>,
        gate: Arc<HandoverGate>,
    ) -> Self {
        Self { volume, files: VolumeFiles::new(files, true), latency, gate }
    }

    /// Past the gate with `reply`, or the request is left to the next agent (see
    /// [`HandoverGate`]).
    fn enter(&self, reply: Reply) -> Option<(Inside<'_>, Reply)> {
        match self.gate.enter() {
            Some(inside) => Some((inside, reply)),
            None => {
                reply.leave_for_next_server();
                None
            }
        }
    }

    fn file(&self, ino: u64) -> Option<&VolumeLayout> {
        self.files.file(ino)
    }

    /// What the transport asks the kernel for in INIT: 1 MiB writes (the kernel caps at
    /// fs.fuse.max_pages_limit), enough requests in flight for QD32, and asynchronous
    /// direct I/O so the loop device's requests are not serialised on the inode lock.
    pub fn init_wanted() -> super::fuse_kernel::InitWanted {
        use abi::init_flags::*;
        super::fuse_kernel::InitWanted {
            flags: ASYNC_READ | BIG_WRITES | MAX_PAGES | ASYNC_DIO | PARALLEL_DIROPS,
            max_write: 1 << 20,
            max_background: 128,
            congestion_threshold: 96,
        }
    }
}

fn errno(e: &VolumeError) -> Errno {
    Errno::from_raw(e.errno())
}

impl Handler for ImageFs {
    fn lookup(&self, parent: u64, name: &OsStr, reply: Reply) {
        self.files.lookup(parent, name, reply)
    }

    fn getattr(&self, ino: u64, reply: Reply) {
        self.files.getattr(ino, reply)
    }

    fn setattr(&self, ino: u64, arg: &SetattrIn, reply: Reply) {
        // The volume's size is fixed by the configuration; everything else is cosmetic.
        if self.file(ino).is_some_and(|f| arg.size().is_some_and(|s| s != f.size)) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&self.files.attr(ino), TTL);
    }

    fn open(&self, ino: u64, _arg: &OpenIn, reply: Reply) {
        if self.file(ino).is_none() {
            return reply.error(Errno::EISDIR);
        }
        // Direct I/O in the kernel: no page cache in front of the engine, so every write
        // and every flush reaches us, and parallel direct writes are not serialised.
        reply.opened(1, open_flags::DIRECT_IO | open_flags::PARALLEL_DIRECT_WRITES);
    }

    fn read(&self, ino: u64, arg: &ReadIn, reply: Reply) {
        let Some((_inside, reply)) = self.enter(reply) else { return };
        let file_size = self.file(ino).map_or(0, |f| f.size);
        let len = u64::from(arg.size).min(file_size.saturating_sub(arg.offset)) as usize;
        let at = match self.files.place(ino, arg.offset, len as u64) {
            Ok(at) => at,
            Err(e) => return reply.error(e),
        };
        let mut buf = AlignedBuf::zeroed(len);
        match self.volume.read_blocking(at, buf.as_mut_slice()) {
            Ok(()) => reply.data(buf.as_ref()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(&self, ino: u64, arg: &WriteIn, data: &[u8], reply: Reply) {
        let Some((_inside, reply)) = self.enter(reply) else { return };
        let started = Instant::now();
        let at = match self.files.place(ino, arg.offset, data.len() as u64) {
            Ok(at) => at,
            Err(e) => return reply.error(e),
        };
        // The one copy out of the transport's request buffer, before anything else sees it.
        let buf = AlignedBuf::copy_from(data).into_bytes();
        let len = data.len() as u32;
        let latency = self.latency.clone();
        let done = Box::new(move |r: Result<u64, VolumeError>| {
            match r {
                Ok(_) => reply.written(len),
                Err(e) => reply.error(errno(&e)),
            }
            latency.write.observe(started.elapsed());
        });
        // The local write runs on this thread or a local I/O thread (see `dispatch`); the
        // reply is sent by whoever completes the request last (that thread, or the task
        // receiving the peer's ack).
        match self.volume.write(at, buf, done) {
            Ok(work) => work.dispatch(),
            Err(e) => debug!("write refused: {e}"),
        }
    }

    fn flush(&self, _ino: u64, reply: Reply) {
        // close(2), not a durability request.
        reply.ok();
    }

    fn fsync(&self, _ino: u64, _arg: &FsyncIn, reply: Reply) {
        let Some((_inside, reply)) = self.enter(reply) else { return };
        let started = Instant::now();
        let latency = self.latency.clone();
        let done = Box::new(move |r: Result<u64, VolumeError>| {
            match r {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
            latency.flush.observe(started.elapsed());
        });
        self.volume.flush(done).dispatch();
    }

    fn fallocate(&self, ino: u64, arg: &abi::FallocateIn, reply: Reply) {
        let Some((_inside, reply)) = self.enter(reply) else { return };
        let mode = arg.mode as i32;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        let zero_keep = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            // Preallocation: the image is already fully sized.
            return reply.ok();
        }
        if mode != punch && mode != zero && mode != zero_keep {
            warn!(mode, "unsupported fallocate mode");
            return reply.error(Errno::EOPNOTSUPP);
        }
        let file_size = self.file(ino).map_or(0, |f| f.size);
        let length = arg.length.min(file_size.saturating_sub(arg.offset));
        if length == 0 {
            return reply.ok();
        }
        let at = match self.files.place(ino, arg.offset, length) {
            Ok(at) => at,
            Err(e) => return reply.error(e),
        };
        let done = Box::new(move |r: Result<u64, VolumeError>| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        });
        match self.volume.discard(at, length, done) {
            Ok(work) => work.dispatch(),
            Err(e) => debug!("discard refused: {e}"),
        }
    }

    fn readdir(&self, ino: u64, arg: &ReadIn, reply: Reply) {
        self.files.readdir(ino, arg, reply)
    }
}
