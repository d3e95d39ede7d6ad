//! The FUSE half of the loop-over-FUSE frontend: one directory holding one file per volume
//! (`image` for a resource of one volume, the volume names for a volume group), whose reads
//! and writes go to the primary's [`Volume`] at the volume's place in its address space.
//!
//! Requests are handled on fuser's threads: a write's data is copied once into an aligned
//! buffer, admitted (sequence number, ordering, fan-out) right there so the change stream
//! follows the kernel's order, and written to the local image on the same thread. The reply
//! goes out when the request completes — from this thread if nothing else is awaited, or
//! from the task that receives the last peer ack. FSYNC is the barrier; FALLOCATE
//! punch-hole / zero-range is a replicated discard.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use tandem_replicator::{Volume, VolumeError};
use tracing::{debug, warn};

use super::RequestLatency;
use crate::storage::AlignedBuf;
use crate::volume_set::VolumeLayout;

pub const IMAGE_NAME: &str = "image";
const TTL: Duration = Duration::from_secs(3600);

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

    pub(super) fn file(&self, ino: INodeNo) -> Option<&VolumeLayout> {
        self.files.get((ino.0 as usize).checked_sub(2)?)
    }

    /// The address-space offset of `[offset, +len)` of file `ino`, if the range is inside it.
    pub(super) fn place(&self, ino: INodeNo, offset: u64, len: u64) -> Result<u64, Errno> {
        let f = self.file(ino).ok_or(Errno::ENOENT)?;
        match offset.checked_add(len) {
            Some(end) if end <= f.size => Ok(f.offset + offset),
            _ => Err(Errno::EINVAL),
        }
    }

    pub(super) fn attr(&self, ino: INodeNo) -> FileAttr {
        let dir = ino == INodeNo::ROOT;
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
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm,
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    pub(super) fn lookup(&self, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.files.iter().position(|f| parent == INodeNo::ROOT && name == file_name(f)) {
            Some(i) => reply.entry(&TTL, &self.attr(INodeNo(2 + i as u64)), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    pub(super) fn getattr(&self, ino: INodeNo, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || self.file(ino).is_some() {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    pub(super) fn readdir(&self, ino: INodeNo, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let mut entries =
            vec![(INodeNo::ROOT, FileType::Directory, "."), (INodeNo::ROOT, FileType::Directory, "..")];
        for (i, f) in self.files.iter().enumerate() {
            entries.push((INodeNo(2 + i as u64), FileType::RegularFile, file_name(f)));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

pub struct ImageFs {
    volume: Arc<Volume>,
    files: VolumeFiles,
    latency: Arc<RequestLatency>,
}

impl ImageFs {
    pub fn new(volume: Arc<Volume>, files: Vec<VolumeLayout>, latency: Arc<RequestLatency>) -> Self {
        Self { volume, files: VolumeFiles::new(files, true), latency }
    }

    fn file(&self, ino: INodeNo) -> Option<&VolumeLayout> {
        self.files.file(ino)
    }

    fn place(&self, ino: INodeNo, offset: u64, len: u64) -> Result<u64, Errno> {
        self.files.place(ino, offset, len)
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        self.files.attr(ino)
    }
}

fn errno(e: &VolumeError) -> Errno {
    Errno::from_i32(e.errno())
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // 1 MiB writes (the kernel caps at fs.fuse.max_pages_limit), enough requests in
        // flight for QD32, and asynchronous direct I/O so the loop device's requests are not
        // serialised on the inode lock.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        if config.capabilities().contains(InitFlags::FUSE_ASYNC_DIO) {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.files.lookup(parent, name, reply)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.files.getattr(ino, reply)
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The volume's size is fixed by the configuration; everything else is cosmetic.
        if self.file(ino).is_some_and(|f| size.is_some_and(|s| s != f.size)) {
            reply.error(Errno::EPERM);
            return;
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            reply.error(Errno::EISDIR);
            return;
        }
        // Direct I/O in the kernel: no page cache in front of the engine, so every write
        // and every flush reaches us, and parallel direct writes are not serialised.
        reply.opened(FileHandle(1), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file_size = self.file(ino).map_or(0, |f| f.size);
        let len = (size as u64).min(file_size.saturating_sub(offset)) as usize;
        let at = match self.place(ino, offset, len as u64) {
            Ok(at) => at,
            Err(e) => return reply.error(e),
        };
        let mut buf = AlignedBuf::zeroed(len);
        match self.volume.read_blocking(at, buf.as_mut_slice()) {
            Ok(()) => reply.data(buf.as_ref()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let started = Instant::now();
        let at = match self.place(ino, offset, data.len() as u64) {
            Ok(at) => at,
            Err(e) => return reply.error(e),
        };
        // The one copy out of the kernel's request buffer, before anything else sees it.
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
        // The local write runs on this thread; the reply is sent by whoever completes the
        // request last (this thread, or the task receiving the peer's ack).
        match self.volume.write(at, buf, done) {
            Ok(work) => work.run(),
            Err(e) => debug!("write refused: {e}"),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        // close(2), not a durability request.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let started = Instant::now();
        let latency = self.latency.clone();
        let done = Box::new(move |r: Result<u64, VolumeError>| {
            match r {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
            latency.flush.observe(started.elapsed());
        });
        self.volume.flush(done).run();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        let zero_keep = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            // Preallocation: the image is already fully sized.
            reply.ok();
            return;
        }
        if mode != punch && mode != zero && mode != zero_keep {
            warn!(mode, "unsupported fallocate mode");
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let file_size = self.file(ino).map_or(0, |f| f.size);
        let length = length.min(file_size.saturating_sub(offset));
        if length == 0 {
            reply.ok();
            return;
        }
        let at = match self.place(ino, offset, length) {
            Ok(at) => at,
            Err(e) => return reply.error(e),
        };
        let done = Box::new(move |r: Result<u64, VolumeError>| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        });
        match self.volume.discard(at, length, done) {
            Ok(work) => work.run(),
            Err(e) => debug!("discard refused: {e}"),
        }
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        // No extended attributes; ENOSYS makes the kernel stop asking.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.files.readdir(ino, offset, reply)
    }
}
