//! Serving a connection: worker threads, each with a device of its own (the first one the
//! mounted fd, the others `FUSE_DEV_IOC_CLONE`s of it, so each has its own queue), reading
//! one request at a time into a buffer that fits the largest WRITE, decoding it, and
//! handing it to the [`Handler`] with a [`Reply`].
//!
//! What happens on each error: ENODEV or ECONNABORTED on a read means the connection is
//! gone (unmounted, aborted) and the thread exits; EINTR and EAGAIN are retried; any other
//! read error is logged and ends the thread. A request that does not decode is logged and
//! answered EIO (unless its opcode takes no reply). On a reply write, ENOENT (the request
//! was interrupted and is gone) and ENODEV (the connection is gone) are expected and only
//! logged at debug level; other errors are logged as warnings.
//!
//! A [`Reply`] is `Send`: a write's reply may be sent from the task that receives the last
//! peer ack. It answers exactly once — every answering method consumes it, and one dropped
//! unanswered answers EIO and logs the request.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tracing::{debug, error, warn};

use super::abi::{self, DirEntries, FileAttr, Operation, Request, Statfs, Ttl};
use super::connection::{Connection, ConnectionError, Device, InitParams};
use super::mount::{self, Unmounted};

/// A worker's stack. A request is decoded from the worker's heap buffer and handed to the
/// filesystem, whose work (an engine admission, a local write) keeps no large data on the
/// stack; the default 2 MiB cost about as much resident per thread here (docs/benchmarks.md).
const WORKER_STACK: usize = 256 << 10;

/// The operations a filesystem on this transport serves. Requests the trait has no method
/// for are answered by the transport: FORGET/BATCH_FORGET take no reply (nothing is
/// reference-counted here), GETXATTR/LISTXATTR are ENOSYS (the kernel stops asking),
/// INTERRUPT is ignored (every request completes), DESTROY is acknowledged, and any other
/// opcode is ENOSYS.
pub trait Handler: Send + Sync + 'static {
    fn lookup(&self, parent: u64, name: &OsStr, reply: Reply);
    fn getattr(&self, ino: u64, reply: Reply);
    fn setattr(&self, _ino: u64, _arg: &abi::SetattrIn, reply: Reply) {
        reply.error(Errno::ENOSYS)
    }
    fn open(&self, _ino: u64, _arg: &abi::OpenIn, reply: Reply) {
        reply.opened(0, 0)
    }
    fn read(&self, ino: u64, arg: &abi::ReadIn, reply: Reply);
    fn write(&self, _ino: u64, _arg: &abi::WriteIn, _data: &[u8], reply: Reply) {
        reply.error(Errno::EROFS)
    }
    fn statfs(&self, _ino: u64, reply: Reply) {
        reply.statfs(&Statfs { bsize: 512, namelen: 255, ..Default::default() })
    }
    fn release(&self, _ino: u64, _arg: &abi::ReleaseIn, reply: Reply) {
        reply.ok()
    }
    fn fsync(&self, _ino: u64, _arg: &abi::FsyncIn, reply: Reply) {
        reply.error(Errno::ENOSYS)
    }
    /// close(2) of a file: not a durability request. ENOSYS makes the kernel stop sending it.
    fn flush(&self, _ino: u64, reply: Reply) {
        reply.error(Errno::ENOSYS)
    }
    fn opendir(&self, _ino: u64, _arg: &abi::OpenIn, reply: Reply) {
        reply.opened(0, 0)
    }
    fn readdir(&self, ino: u64, arg: &abi::ReadIn, reply: Reply);
    fn releasedir(&self, _ino: u64, _arg: &abi::ReleaseIn, reply: Reply) {
        reply.ok()
    }
    fn fallocate(&self, _ino: u64, _arg: &abi::FallocateIn, reply: Reply) {
        reply.error(Errno::ENOSYS)
    }
}

/// The answer to one request, sent on the device the request came from.
#[must_use = "a request must be answered; dropping the reply answers EIO"]
pub struct Reply {
    device: Arc<Device>,
    unique: u64,
    opcode: u32,
    sent: bool,
}

impl Reply {
    pub fn new(device: Arc<Device>, unique: u64, opcode: u32) -> Self {
        Self { device, unique, opcode, sent: false }
    }

    fn send(&mut self, error: i32, payload: &[u8]) {
        self.sent = true;
        let hdr = abi::out_header(abi::OUT_HEADER_SIZE + payload.len(), error, self.unique);
        let parts: &[&[u8]] = if payload.is_empty() { &[&hdr] } else { &[&hdr, payload] };
        match self.device.send(parts) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT)) => {
                debug!(
                    unique = self.unique,
                    opcode = self.opcode,
                    "reply to an interrupted FUSE request dropped"
                )
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV)) => {
                debug!(
                    unique = self.unique,
                    opcode = self.opcode,
                    "reply after the FUSE connection ended dropped"
                )
            }
            Err(e) => warn!(unique = self.unique, opcode = self.opcode, "FUSE reply failed: {e}"),
        }
    }

    pub fn error(mut self, e: Errno) {
        self.send(-(e as i32), &[])
    }

    pub fn ok(mut self) {
        self.send(0, &[])
    }

    pub fn entry(mut self, attr: &FileAttr, ttl: Ttl) {
        self.send(0, &abi::entry_out(attr, 0, ttl))
    }

    pub fn attr(mut self, attr: &FileAttr, ttl: Ttl) {
        self.send(0, &abi::attr_out(attr, ttl))
    }

    pub fn opened(mut self, fh: u64, open_flags: u32) {
        self.send(0, &abi::open_out(fh, open_flags))
    }

    pub fn data(mut self, data: &[u8]) {
        self.send(0, data)
    }

    pub fn written(mut self, size: u32) {
        self.send(0, &abi::write_out(size))
    }

    pub fn statfs(mut self, s: &Statfs) {
        self.send(0, &abi::statfs_out(s))
    }

    pub fn directory(mut self, entries: DirEntries) {
        self.send(0, &entries.into_bytes())
    }

    /// Leaves the request unanswered, on purpose: this process is handing the connection
    /// over, and the kernel resends the request to the next one (FUSE_NOTIFY_RESEND).
    pub fn leave_for_next_server(mut self) {
        self.sent = true;
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.sent {
            warn!(
                unique = self.unique,
                opcode = self.opcode,
                "FUSE request dropped without a reply; answering EIO"
            );
            self.send(-libc::EIO, &[]);
        }
    }
}

fn dispatch<H: Handler>(h: &H, req: Request<'_>, reply: Reply) {
    let ino = req.header.nodeid;
    match req.op {
        Operation::Lookup { name } => h.lookup(ino, name, reply),
        Operation::Getattr => h.getattr(ino, reply),
        Operation::Setattr(a) => h.setattr(ino, &a, reply),
        Operation::Open(a) => h.open(ino, &a, reply),
        Operation::Read(a) => h.read(ino, &a, reply),
        Operation::Write { arg, data } => h.write(ino, &arg, data, reply),
        Operation::Statfs => h.statfs(ino, reply),
        Operation::Release(a) => h.release(ino, &a, reply),
        Operation::Fsync(a) => h.fsync(ino, &a, reply),
        Operation::Flush => h.flush(ino, reply),
        Operation::Opendir(a) => h.opendir(ino, &a, reply),
        Operation::Readdir(a) => h.readdir(ino, &a, reply),
        Operation::Releasedir(a) => h.releasedir(ino, &a, reply),
        Operation::Fallocate(a) => h.fallocate(ino, &a, reply),
        Operation::Getxattr | Operation::Listxattr => reply.error(Errno::ENOSYS),
        Operation::Destroy => reply.ok(),
        Operation::Init(_) => {
            warn!("FUSE_INIT on a connection already initialised");
            reply.error(Errno::EPROTO)
        }
        Operation::Unsupported(op) => {
            debug!(opcode = op, "unsupported FUSE request");
            reply.error(Errno::ENOSYS)
        }
        Operation::Forget { .. } | Operation::BatchForget { .. } | Operation::Interrupt { .. } => {
            // No reply is expected (`serve` never builds one for these): answer nothing.
            let mut reply = reply;
            reply.sent = true;
        }
    }
}

/// Serves `device` until the connection ends.
fn serve<H: Handler>(device: Arc<Device>, handler: &H, buf_size: usize) {
    let mut buf = vec![0u8; buf_size];
    loop {
        let n = match device.read_request(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ECONNABORTED)) => return,
            Err(e) => {
                error!("reading a FUSE request failed: {e}; this worker stops");
                return;
            }
        };
        handle_request(&device, handler, &buf[..n]);
    }
}

/// Decodes one request read from `device` and hands it to `handler` (or answers it here).
fn handle_request<H: Handler>(device: &Arc<Device>, handler: &H, bytes: &[u8]) {
    match Request::decode(bytes) {
        Ok(req) => {
            if !req.op.expects_reply() {
                return;
            }
            let reply = Reply::new(device.clone(), req.header.unique, req.header.opcode);
            dispatch(handler, req, reply);
        }
        Err(e) => {
            warn!("{e}; answering EIO");
            // Answer what can be answered, so the kernel does not wait forever.
            if bytes.len() >= 16 {
                let opcode = u32::from_ne_bytes(bytes[4..8].try_into().unwrap_or_default());
                let unique = u64::from_ne_bytes(bytes[8..16].try_into().unwrap_or_default());
                let no_reply = [abi::Opcode::Forget, abi::Opcode::BatchForget, abi::Opcode::Interrupt]
                    .iter()
                    .any(|o| *o as u32 == opcode);
                if !no_reply {
                    Reply::new(device.clone(), unique, opcode).error(Errno::EIO);
                }
            }
        }
    }
}

/// FUSE_NOTIFY_RESEND on `device`, then every request waiting on the connection, read
/// without blocking, as `(unique, bytes)` sorted by the order the kernel first issued them.
/// The kernel puts resent requests at the head of the pending queue (in hash-bucket order,
/// not their original one; hence the sort) before the write of the notification returns.
fn drain_after_resend(device: &Device, params: &InitParams) -> Result<Vec<(u64, Vec<u8>)>, ConnectionError> {
    let fd = device.as_fd();
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| ConnectionError::Takeover(e.into()))?;
    let blocking = nix::fcntl::OFlag::from_bits_truncate(flags);
    let set = |f: nix::fcntl::OFlag| {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(f))
            .map_err(|e| ConnectionError::Takeover(e.into()))
    };
    super::connection::send_resend(device, params)?;
    set(blocking | nix::fcntl::OFlag::O_NONBLOCK)?;
    let mut waiting = Vec::new();
    let mut buf = vec![0u8; params.read_buffer_size()];
    let drained = loop {
        if waiting.len() >= MAX_REPLAYED {
            break Ok(());
        }
        match nix::unistd::read(fd, &mut buf) {
            Ok(n) if n >= abi::IN_HEADER_SIZE => {
                let unique = u64::from_ne_bytes(buf[8..16].try_into().unwrap_or_default());
                waiting.push((unique, buf[..n].to_vec()));
            }
            Ok(n) => {
                // Too short to carry a unique: nothing to answer.
                warn!(bytes = n, "a truncated FUSE request while taking over; ignored");
            }
            Err(Errno::EAGAIN) => break Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => break Err(ConnectionError::Takeover(e.into())),
        }
    };
    // The file is shared with the holder's copy: leave it as it was.
    set(blocking)?;
    drained?;
    waiting.sort_by_key(|(unique, _)| unique & !abi::UNIQUE_RESEND);
    Ok(waiting)
}

/// The device minor of the mount at `mountpoint`, from /proc/self/mountinfo (field 3 is
/// `major:minor`, field 5 the mountpoint; the last such mount is the one on top).
fn mount_minor(mountpoint: &Path) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_str()?;
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(want))
        .filter_map(|l| l.split(' ').nth(2)?.split_once(':')?.1.parse().ok())
        .next_back()
}

/// A mounted connection served by worker threads.
pub struct Session {
    mountpoint: PathBuf,
    params: InitParams,
    /// Every device a worker reads from (the first is the mounted fd): what a holder must
    /// keep for the connection to outlive this process.
    devices: Vec<Arc<Device>>,
    workers: Vec<JoinHandle<()>>,
    /// The connection's number in /sys/fs/fuse/connections (the mount's device minor).
    conn_id: Option<u64>,
}

/// The most requests [`Session::resume`] replays before it starts the workers; the kernel
/// keeps at most `max_background` plus the synchronous ones in flight, far fewer.
const MAX_REPLAYED: usize = 4096;

/// What [`Session::resume`] found waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Requests the previous process had read and not answered, queued again by the kernel.
    pub resent: usize,
    /// Requests the previous process had not read yet.
    pub pending: usize,
}

impl Session {
    /// Serves `conn` (mounted at `mountpoint`) with `threads` workers named `name`, each on
    /// a device of its own (the first the connection's, the others clones of it).
    pub fn spawn<H: Handler>(
        conn: Connection,
        mountpoint: &Path,
        handler: H,
        threads: usize,
        name: &str,
    ) -> Result<Self, ConnectionError> {
        let (first, params) = conn.into_parts();
        let mut devices = Vec::with_capacity(threads.max(1));
        for _ in 1..threads.max(1) {
            devices.push(first.try_clone()?);
        }
        devices.insert(0, first);
        Self::start(devices.into_iter().map(Arc::new).collect(), params, mountpoint, Arc::new(handler), name)
    }

    /// Takes over a connection another process served (its devices, from a holder, and the
    /// parameters it negotiated): asks the kernel to queue again every request that process
    /// read and did not answer (FUSE_NOTIFY_RESEND), answers everything waiting in the
    /// order the kernel first issued it (`unique`, without the resend bit) — so a request
    /// replayed is admitted before any later one — and then starts one worker per device.
    pub fn resume<H: Handler>(
        devices: Vec<Device>,
        params: InitParams,
        mountpoint: &Path,
        handler: H,
        name: &str,
    ) -> Result<(Self, Replayed), ConnectionError> {
        let devices: Vec<Arc<Device>> = devices.into_iter().map(Arc::new).collect();
        let Some(first) = devices.first().cloned() else {
            return Err(ConnectionError::NoDevice);
        };
        let handler = Arc::new(handler);
        let waiting = drain_after_resend(&first, &params)?;
        let replayed = Replayed {
            resent: waiting.iter().filter(|r| r.0 & abi::UNIQUE_RESEND != 0).count(),
            pending: waiting.iter().filter(|r| r.0 & abi::UNIQUE_RESEND == 0).count(),
        };
        for (_, bytes) in &waiting {
            handle_request(&first, &*handler, bytes);
        }
        Ok((Self::start(devices, params, mountpoint, handler, name)?, replayed))
    }

    fn start<H: Handler>(
        devices: Vec<Arc<Device>>,
        params: InitParams,
        mountpoint: &Path,
        handler: Arc<H>,
        name: &str,
    ) -> Result<Self, ConnectionError> {
        // Not stat(2): that may ask the filesystem, which has no workers yet.
        let conn_id = mount_minor(mountpoint);
        let buf_size = params.read_buffer_size();
        let mut workers = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let (d, h) = (d.clone(), handler.clone());
            let w = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(WORKER_STACK)
                .spawn(move || serve(d, &*h, buf_size))
                .map_err(ConnectionError::Clone)?;
            workers.push(w);
        }
        Ok(Self { mountpoint: mountpoint.to_path_buf(), params, devices, workers, conn_id })
    }

    /// The devices the workers read from, the mounted one first.
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    pub fn params(&self) -> &InitParams {
        &self.params
    }

    /// Unmounts and waits for the workers. A busy mount is detached lazily and its
    /// connection aborted (through fusectl), so the workers end either way; if they do not
    /// within a few seconds they are left running and this says so.
    pub fn unmount_and_join(&mut self) -> Result<Unmounted, mount::MountError> {
        let how = mount::unmount(&self.mountpoint);
        if !matches!(how, Ok(Unmounted::Fully)) {
            self.abort();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.workers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (done, running): (Vec<_>, Vec<_>) = self.workers.drain(..).partition(|w| w.is_finished());
        for w in done {
            let _ = w.join();
        }
        if !running.is_empty() {
            warn!(
                mountpoint = %self.mountpoint.display(),
                "{} FUSE workers still running after the unmount; leaving them",
                running.len()
            );
        }
        how
    }

    /// Aborts the connection: every request waiting fails, the workers' reads return.
    fn abort(&self) {
        let Some(id) = self.conn_id else { return };
        if let Err(e) = mount::abort_connection(id) {
            debug!("cannot abort FUSE connection {id}: {e}");
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            let _ = self.unmount_and_join();
        }
    }
}
