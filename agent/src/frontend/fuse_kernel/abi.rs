//! The part of the kernel's FUSE ABI (`include/uapi/linux/fuse.h`) this frontend speaks:
//! opcodes, the request structs it decodes and the reply structs it encodes.
//!
//! Decoding is checked: every request comes from the kernel, but a short or malformed one
//! (a wrong `len`, an argument shorter than its struct, a name without its NUL) is a
//! [`DecodeError`] naming the opcode and the request's `unique`, never a panic and never an
//! out-of-bounds read. Structs are read field by field in the native byte order (the kernel
//! writes them in its own, which is ours), so no `unsafe` casts of the read buffer.
//! Encoding writes the same layouts; tests pin their sizes to the header's.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// The protocol version this transport implements. Minor 40 is the first with
/// `FUSE_NOTIFY_RESEND`, which agent takeover relies on.
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 40;
/// The root directory's node id.
pub const ROOT_ID: u64 = 1;

/// `fuse_in_header`: 40 bytes before every request's argument.
pub const IN_HEADER_SIZE: usize = 40;
/// `fuse_out_header`: 16 bytes before every reply's payload.
pub const OUT_HEADER_SIZE: usize = 16;
/// The smallest read buffer the kernel accepts (`FUSE_MIN_READ_BUFFER`).
pub const MIN_READ_BUFFER: usize = 8192;
/// Set by the kernel in `unique` of a request re-queued by `FUSE_NOTIFY_RESEND`; the reply
/// echoes `unique` unchanged.
pub const UNIQUE_RESEND: u64 = 1 << 63;

/// `FUSE_INIT` flags (bits 32.. travel in `flags2`, and only with `FUSE_INIT_EXT`).
pub mod init_flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const INIT_EXT: u64 = 1 << 30;
    /// The kernel understands `FUSE_NOTIFY_RESEND` (7.40, Linux 6.9).
    pub const HAS_RESEND: u64 = 1 << 39;
    /// Requests may be served over io_uring (7.42, Linux 6.14).
    pub const OVER_IO_URING: u64 = 1 << 41;
}

/// `FOPEN_*` flags of an open reply.
pub mod open_flags {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
}

/// `enum fuse_notify_code`, as far as it is used (7.40 added `RESEND` = 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum NotifyCode {
    /// Re-queue every request read from the connection's devices but not answered yet.
    Resend = 7,
}

/// The opcodes of `enum fuse_opcode` this transport knows. Any other is answered ENOSYS
/// and kept as its number ([`Operation::Unsupported`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Opcode {
    Lookup = 1,
    Forget = 2,
    Getattr = 3,
    Setattr = 4,
    Open = 14,
    Read = 15,
    Write = 16,
    Statfs = 17,
    Release = 18,
    Fsync = 20,
    Getxattr = 22,
    Listxattr = 23,
    Flush = 25,
    Init = 26,
    Opendir = 27,
    Readdir = 28,
    Releasedir = 29,
    Interrupt = 36,
    Destroy = 38,
    BatchForget = 42,
    Fallocate = 43,
}

impl Opcode {
    pub fn from_raw(raw: u32) -> Option<Self> {
        use Opcode::*;
        Some(match raw {
            1 => Lookup,
            2 => Forget,
            3 => Getattr,
            4 => Setattr,
            14 => Open,
            15 => Read,
            16 => Write,
            17 => Statfs,
            18 => Release,
            20 => Fsync,
            22 => Getxattr,
            23 => Listxattr,
            25 => Flush,
            26 => Init,
            27 => Opendir,
            28 => Readdir,
            29 => Releasedir,
            36 => Interrupt,
            38 => Destroy,
            42 => BatchForget,
            43 => Fallocate,
            _ => return None,
        })
    }
}

/// Why a request could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("FUSE request of {len} bytes is shorter than its {IN_HEADER_SIZE}-byte header")]
    ShortHeader { len: usize },
    #[error("FUSE request {unique} (opcode {opcode}) says it is {declared} bytes but {read} were read")]
    LengthMismatch { opcode: u32, unique: u64, declared: u32, read: usize },
    #[error("FUSE request {unique} ({opcode:?}) has a {len}-byte argument, shorter than its {need} bytes")]
    ShortArgument { opcode: Opcode, unique: u64, len: usize, need: usize },
    #[error("FUSE request {unique} ({opcode:?}) has a name without its terminating NUL")]
    UnterminatedName { opcode: Opcode, unique: u64 },
    #[error("FUSE request {unique} (WRITE) declares {declared} bytes of data but carries {carried}")]
    WriteSize { unique: u64, declared: u32, carried: usize },
}

/// `fuse_in_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
}

/// `fuse_init_in` (the fields of 7.36+; an older kernel's shorter struct reads as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32` (flags2 only counts with `FUSE_INIT_EXT`).
    pub flags: u64,
}

/// `fuse_setattr_in` (the fields this frontend looks at).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
}

impl SetattrIn {
    /// `FATTR_SIZE`: the request changes the size.
    pub fn size(&self) -> Option<u64> {
        (self.valid & (1 << 3) != 0).then_some(self.size)
    }
}

/// `fuse_open_in` (OPEN, OPENDIR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

/// `fuse_read_in` (READ, READDIR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub flags: u32,
}

/// `fuse_write_in`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub write_flags: u32,
    pub flags: u32,
}

/// `fuse_release_in` (RELEASE, RELEASEDIR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
}

/// `fuse_fsync_in`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsyncIn {
    pub fh: u64,
    pub fsync_flags: u32,
}

impl FsyncIn {
    /// `FUSE_FSYNC_FDATASYNC`.
    pub fn datasync(&self) -> bool {
        self.fsync_flags & 1 != 0
    }
}

/// `fuse_fallocate_in`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FallocateIn {
    pub fh: u64,
    pub offset: u64,
    pub length: u64,
    pub mode: u32,
}

/// A decoded request's operation and argument; borrowed data points into the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Operation<'a> {
    Init(InitIn),
    Lookup {
        name: &'a OsStr,
    },
    Forget {
        nlookup: u64,
    },
    BatchForget {
        count: u32,
    },
    Getattr,
    Setattr(SetattrIn),
    Open(OpenIn),
    Read(ReadIn),
    Write {
        arg: WriteIn,
        data: &'a [u8],
    },
    Statfs,
    Release(ReleaseIn),
    Fsync(FsyncIn),
    Flush,
    Opendir(OpenIn),
    Readdir(ReadIn),
    Releasedir(ReleaseIn),
    Fallocate(FallocateIn),
    Getxattr,
    Listxattr,
    Interrupt {
        unique: u64,
    },
    Destroy,
    /// An opcode this transport does not serve (answered ENOSYS).
    Unsupported(u32),
}

impl Operation<'_> {
    /// Whether the kernel expects no reply (FORGET, BATCH_FORGET; INTERRUPT is answered only
    /// by answering the interrupted request).
    pub fn expects_reply(&self) -> bool {
        !matches!(
            self,
            Operation::Forget { .. } | Operation::BatchForget { .. } | Operation::Interrupt { .. }
        )
    }
}

/// One request as read from the device.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Operation<'a>,
}

/// Reads native-endian fields from a byte slice, refusing to run past its end.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Callers check the length first (`need`); past the end reads zeros, never panics.
        let mut out = [0u8; N];
        if let Some(src) = self.bytes.get(self.at..self.at + N) {
            out.copy_from_slice(src);
        }
        self.at += N;
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_ne_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take())
    }
    fn skip(&mut self, n: usize) {
        self.at += n;
    }
}

impl InHeader {
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < IN_HEADER_SIZE {
            return Err(DecodeError::ShortHeader { len: bytes.len() });
        }
        let mut f = Fields { bytes, at: 0 };
        Ok(Self {
            len: f.u32(),
            opcode: f.u32(),
            unique: f.u64(),
            nodeid: f.u64(),
            uid: f.u32(),
            gid: f.u32(),
            pid: f.u32(),
            total_extlen: f.u16(),
        })
    }
}

impl<'a> Request<'a> {
    /// Decodes one request: `bytes` is exactly what one read of the device returned.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let header = InHeader::decode(bytes)?;
        if header.len as usize != bytes.len() {
            return Err(DecodeError::LengthMismatch {
                opcode: header.opcode,
                unique: header.unique,
                declared: header.len,
                read: bytes.len(),
            });
        }
        let arg = &bytes[IN_HEADER_SIZE..];
        let Some(opcode) = Opcode::from_raw(header.opcode) else {
            return Ok(Self { header, op: Operation::Unsupported(header.opcode) });
        };
        let unique = header.unique;
        let need = |n: usize| -> Result<Fields<'a>, DecodeError> {
            if arg.len() < n {
                Err(DecodeError::ShortArgument { opcode, unique, len: arg.len(), need: n })
            } else {
                Ok(Fields { bytes: arg, at: 0 })
            }
        };
        let op = match opcode {
            Opcode::Init => {
                // 7.36+ kernels send 64 bytes (with flags2); older ones 16.
                let mut f = need(16)?;
                let (major, minor, max_readahead, flags) = (f.u32(), f.u32(), f.u32(), f.u32());
                let flags2 = if arg.len() >= 20 { f.u32() } else { 0 };
                let mut flags = u64::from(flags);
                if flags & init_flags::INIT_EXT != 0 {
                    flags |= u64::from(flags2) << 32;
                }
                Operation::Init(InitIn { major, minor, max_readahead, flags })
            }
            Opcode::Lookup => {
                let nul = arg
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(DecodeError::UnterminatedName { opcode, unique })?;
                Operation::Lookup { name: OsStr::from_bytes(&arg[..nul]) }
            }
            Opcode::Forget => Operation::Forget { nlookup: need(8)?.u64() },
            Opcode::BatchForget => Operation::BatchForget { count: need(8)?.u32() },
            Opcode::Getattr => Operation::Getattr,
            Opcode::Setattr => {
                let mut f = need(88)?;
                let valid = f.u32();
                f.skip(4);
                let fh = f.u64();
                let size = f.u64();
                Operation::Setattr(SetattrIn { valid, fh, size })
            }
            Opcode::Open | Opcode::Opendir => {
                let mut f = need(8)?;
                let a = OpenIn { flags: f.u32(), open_flags: f.u32() };
                if opcode == Opcode::Open {
                    Operation::Open(a)
                } else {
                    Operation::Opendir(a)
                }
            }
            Opcode::Read | Opcode::Readdir => {
                let mut f = need(40)?;
                let (fh, offset, size, read_flags) = (f.u64(), f.u64(), f.u32(), f.u32());
                f.skip(8);
                let a = ReadIn { fh, offset, size, read_flags, flags: f.u32() };
                if opcode == Opcode::Read {
                    Operation::Read(a)
                } else {
                    Operation::Readdir(a)
                }
            }
            Opcode::Write => {
                let mut f = need(40)?;
                let (fh, offset, size, write_flags) = (f.u64(), f.u64(), f.u32(), f.u32());
                f.skip(8);
                let a = WriteIn { fh, offset, size, write_flags, flags: f.u32() };
                let data = &arg[40..];
                if data.len() != size as usize {
                    return Err(DecodeError::WriteSize { unique, declared: size, carried: data.len() });
                }
                Operation::Write { arg: a, data }
            }
            Opcode::Statfs => Operation::Statfs,
            Opcode::Release | Opcode::Releasedir => {
                let mut f = need(24)?;
                let a = ReleaseIn { fh: f.u64(), flags: f.u32() };
                if opcode == Opcode::Release {
                    Operation::Release(a)
                } else {
                    Operation::Releasedir(a)
                }
            }
            Opcode::Fsync => {
                let mut f = need(16)?;
                Operation::Fsync(FsyncIn { fh: f.u64(), fsync_flags: f.u32() })
            }
            Opcode::Flush => {
                need(24)?;
                Operation::Flush
            }
            Opcode::Fallocate => {
                let mut f = need(32)?;
                Operation::Fallocate(FallocateIn {
                    fh: f.u64(),
                    offset: f.u64(),
                    length: f.u64(),
                    mode: f.u32(),
                })
            }
            Opcode::Getxattr => Operation::Getxattr,
            Opcode::Listxattr => Operation::Listxattr,
            Opcode::Interrupt => Operation::Interrupt { unique: need(8)?.u64() },
            Opcode::Destroy => Operation::Destroy,
        };
        Ok(Self { header, op })
    }
}

/// Appends native-endian fields to a reply payload.
#[derive(Default)]
pub struct Encoder(pub Vec<u8>);

impl Encoder {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// `fuse_out_header`: `len` covers the header and the payload; `error` is 0 or a negative
/// errno (or, with `unique` 0, a notify code).
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER_SIZE] {
    let mut e = Encoder::default();
    e.u32(len as u32).u32(error as u32).u64(unique);
    e.0.try_into().unwrap_or([0; OUT_HEADER_SIZE])
}

/// The kind of a file, as `fuse_attr.mode`'s type bits and a dirent's `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    RegularFile,
}

impl FileKind {
    fn mode_bits(self) -> u32 {
        match self {
            FileKind::Directory => libc::S_IFDIR,
            FileKind::RegularFile => libc::S_IFREG,
        }
    }
    fn dirent_type(self) -> u32 {
        self.mode_bits() >> 12
    }
}

/// `fuse_attr`. Times are the epoch: nothing here has meaningful ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileAttr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// Encoded size of `fuse_attr`.
pub const ATTR_SIZE: usize = 88;

impl FileAttr {
    fn encode(&self, e: &mut Encoder) {
        e.u64(self.ino).u64(self.size).u64(self.blocks);
        e.zeros(3 * 8 + 3 * 4); // atime, mtime, ctime and their nsec
        e.u32(self.kind.mode_bits() | u32::from(self.perm));
        e.u32(self.nlink).u32(self.uid).u32(self.gid).u32(0); // rdev
        e.u32(self.blksize).u32(0); // flags
    }
}

/// A cache lifetime as the kernel takes it: seconds and nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ttl(pub std::time::Duration);

/// `fuse_entry_out` (LOOKUP).
pub fn entry_out(attr: &FileAttr, generation: u64, ttl: Ttl) -> Vec<u8> {
    let mut e = Encoder::default();
    let (s, ns) = (ttl.0.as_secs(), ttl.0.subsec_nanos());
    e.u64(attr.ino).u64(generation).u64(s).u64(s).u32(ns).u32(ns);
    attr.encode(&mut e);
    e.0
}

/// `fuse_attr_out` (GETATTR, SETATTR).
pub fn attr_out(attr: &FileAttr, ttl: Ttl) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u64(ttl.0.as_secs()).u32(ttl.0.subsec_nanos()).u32(0);
    attr.encode(&mut e);
    e.0
}

/// `fuse_open_out`.
pub fn open_out(fh: u64, open_flags: u32) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u64(fh).u32(open_flags).u32(0);
    e.0
}

/// `fuse_write_out`.
pub fn write_out(size: u32) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u32(size).u32(0);
    e.0
}

/// `fuse_kstatfs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// `fuse_statfs_out`.
pub fn statfs_out(s: &Statfs) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u64(s.blocks).u64(s.bfree).u64(s.bavail).u64(s.files).u64(s.ffree);
    e.u32(s.bsize).u32(s.namelen).u32(s.frsize).u32(0).zeros(6 * 4);
    e.0
}

/// A READDIR reply being filled: `fuse_dirent` records, each padded to 8 bytes, up to the
/// size the kernel asked for.
pub struct DirEntries {
    buf: Vec<u8>,
    max: usize,
}

impl DirEntries {
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max }
    }

    /// Adds an entry; `offset` is what a READDIR continuing after it passes. Returns false
    /// (adding nothing) when the entry does not fit: the buffer is full.
    pub fn add(&mut self, ino: u64, offset: u64, kind: FileKind, name: &OsStr) -> bool {
        let name = name.as_bytes();
        let size = (24 + name.len()).next_multiple_of(8);
        if self.buf.len() + size > self.max {
            return false;
        }
        let mut e = Encoder(std::mem::take(&mut self.buf));
        e.u64(ino).u64(offset).u32(name.len() as u32).u32(kind.dirent_type());
        e.0.extend_from_slice(name);
        e.zeros(size - 24 - name.len());
        self.buf = e.0;
        true
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// `fuse_init_out`, cut to the size a kernel of `kernel_minor` expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
}

impl InitOut {
    pub fn encode(&self, kernel_minor: u32) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u32(self.major).u32(self.minor).u32(self.max_readahead).u32(self.flags as u32);
        e.u16(self.max_background).u16(self.congestion_threshold).u32(self.max_write);
        e.u32(self.time_gran).u16(self.max_pages).u16(0); // map_alignment
        e.u32((self.flags >> 32) as u32).zeros(7 * 4);
        let len = match kernel_minor {
            0..5 => 8,
            5..23 => 24,
            _ => e.0.len(),
        };
        e.0.truncate(len);
        e.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: usize, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u32(len as u32).u32(opcode).u64(unique).u64(nodeid).u32(0).u32(0).u32(42).u16(0).u16(0);
        e.0
    }

    fn request(opcode: u32, unique: u64, nodeid: u64, arg: &[u8]) -> Vec<u8> {
        let mut b = header(IN_HEADER_SIZE + arg.len(), opcode, unique, nodeid);
        b.extend_from_slice(arg);
        b
    }

    #[test]
    fn reply_structs_have_the_kernel_sizes() {
        let attr = FileAttr {
            ino: 2,
            size: 4096,
            blocks: 8,
            kind: FileKind::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid: 0,
            gid: 0,
            blksize: 4096,
        };
        let ttl = Ttl(std::time::Duration::from_secs(1));
        assert_eq!(entry_out(&attr, 0, ttl).len(), 128);
        assert_eq!(attr_out(&attr, ttl).len(), 104);
        assert_eq!(open_out(1, 0).len(), 16);
        assert_eq!(write_out(1).len(), 8);
        assert_eq!(statfs_out(&Statfs::default()).len(), 80);
        let init = InitOut {
            major: 7,
            minor: 40,
            max_readahead: 0,
            flags: 0,
            max_background: 0,
            congestion_threshold: 0,
            max_write: 0,
            time_gran: 1,
            max_pages: 0,
        };
        assert_eq!(init.encode(45).len(), 64);
        assert_eq!(init.encode(22).len(), 24);
        assert_eq!(init.encode(4).len(), 8);
    }

    #[test]
    fn attr_mode_carries_the_file_type() {
        let attr = FileAttr {
            ino: 1,
            size: 0,
            blocks: 0,
            kind: FileKind::Directory,
            perm: 0o700,
            nlink: 2,
            uid: 0,
            gid: 0,
            blksize: 4096,
        };
        let b = attr_out(&attr, Ttl(std::time::Duration::ZERO));
        // fuse_attr starts 16 bytes in; mode is at offset 60 of fuse_attr.
        let mode = u32::from_ne_bytes(b[16 + 60..16 + 64].try_into().unwrap());
        assert_eq!(mode, libc::S_IFDIR | 0o700);
    }

    #[test]
    fn init_flags2_counts_only_with_init_ext() {
        let mut arg = Encoder::default();
        arg.u32(7).u32(45).u32(131072).u32(init_flags::INIT_EXT as u32).u32(1 << 7).zeros(44);
        let b = request(26, 1, 0, &arg.0);
        let Operation::Init(i) = Request::decode(&b).unwrap().op else { panic!("not INIT") };
        assert_eq!((i.major, i.minor, i.max_readahead), (7, 45, 131072));
        assert_eq!(i.flags, init_flags::INIT_EXT | init_flags::HAS_RESEND);

        let mut arg = Encoder::default();
        arg.u32(7).u32(45).u32(0).u32(0).u32(1 << 7).zeros(44);
        let b = request(26, 1, 0, &arg.0);
        let Operation::Init(i) = Request::decode(&b).unwrap().op else { panic!("not INIT") };
        assert_eq!(i.flags, 0);
    }

    #[test]
    fn write_carries_its_data() {
        let mut arg = Encoder::default();
        arg.u64(7).u64(8192).u32(5).u32(0).u64(0).u32(libc::O_RDWR as u32).u32(0);
        arg.0.extend_from_slice(b"hello");
        let b = request(16, 9, 2, &arg.0);
        let r = Request::decode(&b).unwrap();
        assert_eq!(r.header.unique, 9);
        assert_eq!(r.header.nodeid, 2);
        let Operation::Write { arg, data } = r.op else { panic!("not WRITE") };
        assert_eq!((arg.fh, arg.offset, arg.size), (7, 8192, 5));
        assert_eq!(data, b"hello");
    }

    #[test]
    fn write_with_missing_data_is_an_error() {
        let mut arg = Encoder::default();
        arg.u64(7).u64(0).u32(4096).u32(0).u64(0).u32(0).u32(0);
        arg.0.extend_from_slice(b"short");
        let b = request(16, 9, 2, &arg.0);
        assert_eq!(
            Request::decode(&b),
            Err(DecodeError::WriteSize { unique: 9, declared: 4096, carried: 5 })
        );
    }

    #[test]
    fn short_argument_names_the_opcode_and_request() {
        let b = request(15, 77, 2, &[0; 12]);
        let e = Request::decode(&b).unwrap_err();
        assert_eq!(e, DecodeError::ShortArgument { opcode: Opcode::Read, unique: 77, len: 12, need: 40 });
        let msg = e.to_string();
        assert!(msg.contains("77") && msg.contains("Read"), "{msg}");
    }

    #[test]
    fn length_must_match_what_was_read() {
        let mut b = request(3, 5, 1, &[0; 16]);
        b.push(0);
        assert!(matches!(Request::decode(&b), Err(DecodeError::LengthMismatch { unique: 5, .. })));
        assert_eq!(Request::decode(&b[..10]), Err(DecodeError::ShortHeader { len: 10 }));
    }

    #[test]
    fn lookup_name_needs_its_nul() {
        let b = request(1, 3, 1, b"image\0");
        assert_eq!(Request::decode(&b).unwrap().op, Operation::Lookup { name: OsStr::new("image") });
        let b = request(1, 3, 1, b"image");
        assert_eq!(
            Request::decode(&b),
            Err(DecodeError::UnterminatedName { opcode: Opcode::Lookup, unique: 3 })
        );
    }

    #[test]
    fn unknown_opcodes_are_kept_unsupported() {
        let b = request(9, 4, 1, &[0; 8]); // MKDIR
        let r = Request::decode(&b).unwrap();
        assert_eq!(r.op, Operation::Unsupported(9));
        assert!(r.op.expects_reply());
        let b = request(2, 4, 2, &1u64.to_ne_bytes()); // FORGET
        assert!(!Request::decode(&b).unwrap().op.expects_reply());
    }

    #[test]
    fn setattr_size_only_when_valid() {
        let mut arg = Encoder::default();
        arg.u32(1 << 3).u32(0).u64(1).u64(1 << 20).zeros(88 - 24);
        let b = request(4, 1, 2, &arg.0);
        let Operation::Setattr(s) = Request::decode(&b).unwrap().op else { panic!("not SETATTR") };
        assert_eq!(s.size(), Some(1 << 20));
        let mut arg = Encoder::default();
        arg.u32(1).u32(0).u64(1).u64(1 << 20).zeros(88 - 24);
        let b = request(4, 1, 2, &arg.0);
        let Operation::Setattr(s) = Request::decode(&b).unwrap().op else { panic!("not SETATTR") };
        assert_eq!(s.size(), None);
    }

    #[test]
    fn dirents_are_padded_and_stop_when_full() {
        let mut d = DirEntries::new(64);
        assert!(d.add(1, 1, FileKind::Directory, OsStr::new(".")));
        assert!(d.add(2, 2, FileKind::RegularFile, OsStr::new("image")));
        assert!(!d.add(3, 3, FileKind::RegularFile, OsStr::new("more-than-fits")));
        let b = d.into_bytes();
        assert_eq!(b.len(), 32 + 32);
        assert_eq!(u32::from_ne_bytes(b[16..20].try_into().unwrap()), 1); // namelen of "."
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), libc::S_IFDIR >> 12);
        assert_eq!(&b[56..61], b"image");
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = Request::decode(&bytes);
        }

        #[test]
        fn random_arguments_behind_a_valid_header_never_panic(
            opcode in 0u32..50,
            arg in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let b = request(opcode, 1, 1, &arg);
            let _ = Request::decode(&b);
        }
    }
}
