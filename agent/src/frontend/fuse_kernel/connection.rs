//! A FUSE connection: the `/dev/fuse` fd the kernel's filesystem talks to and the
//! parameters negotiated in its one `FUSE_INIT`.
//!
//! The kernel sends INIT once per connection, so a process that takes a connection over
//! (a new agent receiving the fd from a holder process after the old agent died) must
//! start from the parameters negotiated before: [`InitParams`] is serialisable so it can be
//! persisted next to the held fd, and [`Connection::from_fd`] builds a connection from the
//! two without INIT. [`Connection::notify_resend`] then asks the kernel to queue again every
//! request read but not answered.
//!
//! Replies must be written to the device a request was read from (the kernel looks the
//! `unique` up in that device's processing queue), so every request carries its
//! [`Device`].

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::abi::{self, init_flags, InitOut, NotifyCode, Operation, Request};

/// What this side asks for in INIT; the agreed [`InitParams`] are these cut down to what
/// the kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitWanted {
    /// `init_flags` wanted, each only if the kernel offers it.
    pub flags: u64,
    /// Largest WRITE payload (the kernel caps it at `max_pages` pages, at most
    /// `fs.fuse.max_pages_limit`).
    pub max_write: u32,
    /// Background (asynchronous) requests the kernel keeps in flight.
    pub max_background: u16,
    /// Background requests above which the kernel reports the mount congested.
    pub congestion_threshold: u16,
}

/// The parameters negotiated in a connection's INIT: everything a process serving the
/// connection needs and cannot ask for again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitParams {
    /// The protocol minor the kernel speaks.
    pub kernel_minor: u32,
    /// The minor both sides use (the smaller of the kernel's and ours).
    pub minor: u32,
    /// `init_flags` the kernel offered.
    pub kernel_flags: u64,
    /// `init_flags` agreed (what the INIT reply carried).
    pub flags: u64,
    pub max_readahead: u32,
    pub max_write: u32,
    pub max_pages: u16,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub time_gran: u32,
}

impl InitParams {
    /// The read buffer every request fits in: the largest WRITE (`max_write` of data after
    /// the headers) plus a page.
    pub fn read_buffer_size(&self) -> usize {
        (self.max_write as usize + 4096).max(abi::MIN_READ_BUFFER)
    }

    pub fn has(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }
}

/// Why a connection could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("reading FUSE_INIT from /dev/fuse failed: {0}")]
    ReadInit(io::Error),
    #[error("the kernel sent {0} before FUSE_INIT")]
    NotInit(String),
    #[error("malformed FUSE_INIT: {0}")]
    Decode(#[from] abi::DecodeError),
    #[error("the kernel speaks FUSE {major}.{minor}, older than 7.x this transport needs")]
    KernelTooOld { major: u32, minor: u32 },
    #[error("sending the FUSE_INIT reply failed: {0}")]
    ReplyInit(io::Error),
    #[error("cannot clone the /dev/fuse device: {0}")]
    Clone(io::Error),
    #[error("the kernel does not offer FUSE_NOTIFY_RESEND (needs Linux 6.9+, protocol 7.40)")]
    ResendUnsupported,
    #[error("sending FUSE_NOTIFY_RESEND failed: {0}")]
    Notify(io::Error),
    #[error("taking the FUSE connection over: reading what waits on it failed: {0}")]
    Takeover(io::Error),
    #[error("no /dev/fuse device to serve")]
    NoDevice,
}

/// One `/dev/fuse` fd of a connection: the one mounted, or a clone of it with its own
/// request queue.
#[derive(Debug)]
pub struct Device(OwnedFd);

nix::ioctl_read!(fuse_dev_ioc_clone, 229, 0, u32);

impl Device {
    pub fn new(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Reads one request into `buf` (which must hold the largest); retries EINTR and EAGAIN.
    /// ENODEV (unmounted) and ECONNABORTED (aborted) mean the connection is gone.
    pub fn read_request(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(&self.0, buf) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes one reply (or notification) in one `writev`, as the kernel requires.
    pub fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        loop {
            match nix::sys::uio::writev(&self.0, &slices) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A new device of the same connection (`FUSE_DEV_IOC_CLONE`): requests read from it
    /// are answered on it, and it has a processing queue of its own.
    pub fn try_clone(&self) -> Result<Device, ConnectionError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")
            .map_err(ConnectionError::Clone)?;
        let mut session = self.0.as_raw_fd() as u32;
        // SAFETY: the ioctl reads one u32 (the fd to clone) from the pointer we pass, which
        // lives across the call.
        unsafe { fuse_dev_ioc_clone(f.as_raw_fd(), &mut session) }
            .map_err(|e| ConnectionError::Clone(e.into()))?;
        Ok(Device(f.into()))
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A connection whose INIT is done: its first device and the agreed parameters.
#[derive(Debug)]
pub struct Connection {
    device: Device,
    params: InitParams,
}

impl Connection {
    /// Answers the connection's FUSE_INIT (the first request on a freshly mounted fd) with
    /// `wanted` cut down to what the kernel offers.
    pub fn negotiate(fd: OwnedFd, wanted: &InitWanted) -> Result<Self, ConnectionError> {
        let device = Device(fd);
        let mut buf = vec![0u8; (wanted.max_write as usize + 4096).max(abi::MIN_READ_BUFFER)];
        loop {
            let n = device.read_request(&mut buf).map_err(ConnectionError::ReadInit)?;
            let req = Request::decode(&buf[..n])?;
            let Operation::Init(init) = req.op else {
                return Err(ConnectionError::NotInit(format!("opcode {}", req.header.opcode)));
            };
            let unique = req.header.unique;
            if init.major < abi::KERNEL_VERSION {
                let _ = device.send(&[&abi::out_header(abi::OUT_HEADER_SIZE, -libc::EPROTO, unique)]);
                return Err(ConnectionError::KernelTooOld { major: init.major, minor: init.minor });
            }
            if init.major > abi::KERNEL_VERSION {
                // Answer with our version only; the kernel sends INIT again in ours.
                let out = InitOut {
                    major: abi::KERNEL_VERSION,
                    minor: abi::KERNEL_MINOR_VERSION,
                    max_readahead: 0,
                    flags: 0,
                    max_background: 0,
                    congestion_threshold: 0,
                    max_write: 0,
                    time_gran: 0,
                    max_pages: 0,
                }
                .encode(abi::KERNEL_MINOR_VERSION);
                let hdr = abi::out_header(abi::OUT_HEADER_SIZE + out.len(), 0, unique);
                device.send(&[&hdr, &out]).map_err(ConnectionError::ReplyInit)?;
                continue;
            }
            let params = agree(&init, wanted);
            let out = InitOut {
                major: abi::KERNEL_VERSION,
                minor: params.minor,
                max_readahead: params.max_readahead,
                flags: params.flags,
                max_background: params.max_background,
                congestion_threshold: params.congestion_threshold,
                max_write: params.max_write,
                time_gran: params.time_gran,
                max_pages: params.max_pages,
            }
            .encode(init.minor);
            let hdr = abi::out_header(abi::OUT_HEADER_SIZE + out.len(), 0, unique);
            device.send(&[&hdr, &out]).map_err(ConnectionError::ReplyInit)?;
            info!(
                kernel = %format!("7.{}", init.minor),
                flags = %format!("{:#x}", params.flags),
                max_write = params.max_write,
                max_pages = params.max_pages,
                "FUSE connection initialised"
            );
            return Ok(Self { device, params });
        }
    }

    /// A connection whose INIT another process answered with `params` (takeover: the fd
    /// and the parameters come from the holder). No INIT is read or sent.
    pub fn from_fd(fd: OwnedFd, params: InitParams) -> Self {
        Self { device: Device(fd), params }
    }

    pub fn params(&self) -> &InitParams {
        &self.params
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Splits the connection into its first device and parameters.
    pub fn into_parts(self) -> (Device, InitParams) {
        (self.device, self.params)
    }

    /// `FUSE_NOTIFY_RESEND`: the kernel moves every request that was read from one of this
    /// connection's devices and not answered back to the pending queue, with
    /// [`abi::UNIQUE_RESEND`] set in its `unique`; they are read again like new ones.
    ///
    /// Only requests of devices still open are there: closing a device fails the requests
    /// read from it (ECONNABORTED), so a holder that keeps a connection across a crash must
    /// hold every device requests are read from, clones included.
    pub fn notify_resend(&self) -> Result<(), ConnectionError> {
        send_resend(&self.device, &self.params)
    }
}

/// [`Connection::notify_resend`] on any device of the connection.
pub fn send_resend(device: &Device, params: &InitParams) -> Result<(), ConnectionError> {
    if params.kernel_flags & init_flags::HAS_RESEND == 0 {
        return Err(ConnectionError::ResendUnsupported);
    }
    // A notification: unique 0, the code in `error`, no payload.
    let hdr = abi::out_header(abi::OUT_HEADER_SIZE, NotifyCode::Resend as i32, 0);
    device.send(&[&hdr]).map_err(ConnectionError::Notify)
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u32
    } else {
        4096
    }
}

/// The INIT reply's parameters for a kernel offering `init`.
fn agree(init: &abi::InitIn, wanted: &InitWanted) -> InitParams {
    let mut flags = wanted.flags & init.flags;
    if init.flags & init_flags::INIT_EXT != 0 {
        flags |= init_flags::INIT_EXT;
    }
    let page = page_size();
    let max_pages = if flags & init_flags::MAX_PAGES != 0 {
        (wanted.max_write.max(init.max_readahead).div_ceil(page)).min(u32::from(u16::MAX)) as u16
    } else {
        0
    };
    if wanted.flags & init_flags::MAX_PAGES != 0 && max_pages == 0 {
        warn!("the kernel does not offer FUSE_MAX_PAGES: writes are limited to 32 pages");
    }
    InitParams {
        kernel_minor: init.minor,
        minor: init.minor.min(abi::KERNEL_MINOR_VERSION),
        kernel_flags: init.flags,
        flags,
        max_readahead: init.max_readahead,
        max_write: wanted.max_write,
        max_pages,
        max_background: wanted.max_background,
        congestion_threshold: wanted.congestion_threshold.min(wanted.max_background),
        time_gran: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: InitWanted = InitWanted {
        flags: init_flags::ASYNC_READ
            | init_flags::BIG_WRITES
            | init_flags::MAX_PAGES
            | init_flags::ASYNC_DIO
            | init_flags::PARALLEL_DIROPS,
        max_write: 1 << 20,
        max_background: 128,
        congestion_threshold: 96,
    };

    #[test]
    fn agreed_flags_are_only_those_offered() {
        let init = abi::InitIn {
            major: 7,
            minor: 45,
            max_readahead: 128 << 10,
            flags: init_flags::ASYNC_READ
                | init_flags::MAX_PAGES
                | init_flags::INIT_EXT
                | init_flags::HAS_RESEND,
        };
        let p = agree(&init, &WANTED);
        assert_eq!(p.flags, init_flags::ASYNC_READ | init_flags::MAX_PAGES | init_flags::INIT_EXT);
        assert_eq!(p.minor, abi::KERNEL_MINOR_VERSION);
        assert_eq!(p.kernel_minor, 45);
        assert_eq!(p.max_pages as u32, (1 << 20) / page_size());
        assert!(p.read_buffer_size() >= (1 << 20) + abi::IN_HEADER_SIZE + 40);
    }

    #[test]
    fn without_max_pages_none_are_asked_for() {
        let init = abi::InitIn { major: 7, minor: 31, max_readahead: 0, flags: init_flags::ASYNC_READ };
        let p = agree(&init, &WANTED);
        assert_eq!(p.max_pages, 0);
        assert_eq!(p.minor, 31);
        assert!(!p.has(init_flags::INIT_EXT));
    }

    #[test]
    fn params_survive_serialisation() {
        let init = abi::InitIn {
            major: 7,
            minor: 45,
            max_readahead: 1 << 17,
            flags: init_flags::ASYNC_READ
                | init_flags::MAX_PAGES
                | init_flags::INIT_EXT
                | init_flags::HAS_RESEND,
        };
        let p = agree(&init, &WANTED);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<InitParams>(&json).unwrap(), p);
    }

    #[test]
    fn resend_is_refused_when_the_kernel_does_not_offer_it() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let dev = Device(a.into());
        let init = abi::InitIn { major: 7, minor: 38, max_readahead: 0, flags: init_flags::ASYNC_READ };
        assert!(matches!(send_resend(&dev, &agree(&init, &WANTED)), Err(ConnectionError::ResendUnsupported)));
    }

    #[test]
    fn resend_is_a_bare_notify_header() {
        use std::io::Read;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let dev = Device(a.into());
        let init = abi::InitIn {
            major: 7,
            minor: 45,
            max_readahead: 0,
            flags: init_flags::INIT_EXT | init_flags::HAS_RESEND,
        };
        send_resend(&dev, &agree(&init, &WANTED)).unwrap();
        let mut got = [0u8; 16];
        b.read_exact(&mut got).unwrap();
        assert_eq!(u32::from_ne_bytes(got[0..4].try_into().unwrap()), 16);
        assert_eq!(i32::from_ne_bytes(got[4..8].try_into().unwrap()), 7);
        assert_eq!(u64::from_ne_bytes(got[8..16].try_into().unwrap()), 0);
    }
}
