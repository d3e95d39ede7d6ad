//! The primary's engine for one resource: admission, local I/O and fan-out to peers.
//!
//! Admission happens synchronously in the caller (the FUSE request thread), under one short
//! lock: the request gets its sequence number, is registered with the in-flight ranges so
//! overlapping requests apply in sequence order, and its frame is queued to every live peer
//! — so every peer sees the change stream in sequence order. Admission returns the request's
//! [`LocalWork`], which the caller runs on its own thread or dispatches (below). The request
//! completes — its `done` callback runs — when the local I/O and every ack its mode needs
//! are in, on whichever thread finishes last.
//!
//! [`LocalWork::dispatch`] decides where the local I/O runs. For a request no peer was sent
//! (the primary is alone), that waits for no earlier request and finds other local I/O
//! under way, off the caller's thread: a write is submitted to the store when it takes
//! writes asynchronously (the agent's files: an io_uring, completions reaped in batches by
//! one thread), anything else runs on one of the volume's local I/O threads. A disk reaches
//! its throughput only with many requests in flight, and the caller (a FUSE thread) goes
//! back for the next request instead of waiting on the disk, so the number of FUSE threads
//! no longer bounds the queue depth the image sees.
//! Otherwise on the caller's thread: one request at a time (QD1, fsync-bound mail) pays no
//! hand-off, and with a peer the request waits for the network anyway — measured, the
//! extra hand-off there cost more than the queue depth it bought (docs/benchmarks.md).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::{block_checksum, block_hash, DataFrame, Frame, VERIFY_BLOCK};
use tokio::sync::oneshot;

use crate::activity_log::ActivityLog;
use crate::bitmap::DirtyBitmap;
use crate::error::{AttachError, VolumeError};
use crate::inflight::InflightRanges;
use crate::io_pool::IoPool;
use crate::latch::Latch;
use crate::link::Link;
use crate::mode::{Backlog, Mode};
use crate::peer::PeerSession;
use crate::request::{Done, Request};
use crate::stats::{LatencyHistogram, VolumeStats};
use crate::store::BlockStore;

/// A configured peer of the resource, connected or not.
pub struct PeerConfig {
    pub name: String,
    pub mode: Mode,
    /// Blocks this peer is missing. Shared with the agent, which persists it.
    pub bitmap: Arc<Mutex<DirtyBitmap>>,
    /// For `memory` and `async` peers: the bound on what may be in flight to them.
    pub backlog: Option<Backlog>,
    /// Time from a request's frame being queued to this peer to its durable ack. Shared
    /// with the agent, which exports it; outlives the volume (and its sessions).
    pub ack_latency: Arc<LatencyHistogram>,
}

struct PeerSlot {
    mode: Mode,
    backlog: Option<Backlog>,
    bitmap: Arc<Mutex<DirtyBitmap>>,
    ack_latency: Arc<LatencyHistogram>,
    session: Option<Arc<PeerSession>>,
    last_error: Option<String>,
}

struct Core {
    next_seq: u64,
    inflight: InflightRanges,
    peers: BTreeMap<String, PeerSlot>,
}

impl Core {
    fn fan_out(
        &mut self,
        seq: u64,
        range: Option<(u64, u64)>,
        req: &Arc<Request>,
        frame: impl Fn(u8) -> Frame,
    ) -> bool {
        let mut sent = false;
        for slot in self.peers.values_mut() {
            match &slot.session {
                Some(s) => {
                    s.enqueue(seq, frame(slot.mode.frame_flags()), range, req);
                    sent = true;
                }
                None => {
                    if let Some((off, len)) = range {
                        slot.bitmap.lock().unwrap().set_range(off, len);
                    }
                }
            }
        }
        sent
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }
}

/// A peer as the primary sees it, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReplication {
    pub name: String,
    pub mode: Mode,
    pub connected: bool,
    pub out_of_sync_bytes: u64,
    pub pending_requests: usize,
    /// Bytes sent to the peer and not yet on its disk, and the age of the oldest of them.
    pub lag_bytes: u64,
    pub lag: Duration,
    /// The backlog overflowed: the peer gets no data until it has drained (then a resync).
    pub ahead: bool,
    pub last_error: Option<String>,
}

enum LocalOp {
    Write { offset: u64, data: Bytes },
    Discard { offset: u64, len: u64 },
    Flush,
}

/// The local part of an admitted request. It must be run exactly once; later overlapping
/// requests wait for it.
#[must_use = "an admitted request's local work must be run"]
pub struct LocalWork {
    volume: Arc<Volume>,
    req: Arc<Request>,
    op: LocalOp,
    /// The request's entry in the in-flight ranges (none for a flush).
    inflight_id: Option<u64>,
    /// Earlier requests that must finish locally first.
    wait_for: Vec<Arc<Latch>>,
    /// A peer was sent the request (see [`LocalWork::dispatch`]).
    replicated: bool,
}

impl LocalWork {
    pub fn seq(&self) -> u64 {
        self.req.seq()
    }

    /// Performs the local I/O on the calling thread, unless no peer was sent the request,
    /// it waits for no earlier one, and other local I/O of the volume is under way: then,
    /// returning at once, a write goes to the store if it takes writes asynchronously and
    /// anything else to one of the volume's local I/O threads (see the module docs).
    ///
    /// Only requests with nothing to wait for leave the caller, so none of them ever
    /// blocks on a latch: a request with dependencies waits on its caller's thread, as
    /// before, and the earlier requests it waits for are either running or queued behind
    /// threads that will finish. (Were dependent requests queued too, the threads could all
    /// be taken by writes waiting for an earlier one still queued behind them.)
    pub fn dispatch(self) {
        let v = self.volume.clone();
        let disk_idle = v.local_running.fetch_add(1, Ordering::SeqCst) == 0;
        if disk_idle || self.replicated || !self.wait_for.is_empty() {
            self.run_counted();
        } else if matches!(self.op, LocalOp::Write { .. }) && v.store.submits_writes() {
            self.submit_counted();
        } else {
            let pool = v
                .local_pool
                .get_or_init(|| IoPool::with_stack_size(LOCAL_IO_THREADS, "tandem-local", LOCAL_IO_STACK));
            pool.submit(Vec::new(), move || self.run_counted());
        }
    }

    /// Runs the local I/O and counts the disk free again before the request completes, so
    /// that a request its completion lets in sees the disk as it is.
    fn run_counted(self) {
        let r = self.perform();
        self.volume.local_running.fetch_sub(1, Ordering::SeqCst);
        self.volume.finish_local(self.inflight_id, &self.req, r);
    }

    /// Hands a write with nothing to wait for to the store, which completes it on its own
    /// thread (see [`BlockStore::submit_write`]).
    fn submit_counted(self) {
        debug_assert!(self.wait_for.is_empty() && !self.replicated);
        let LocalWork { volume, req, op, inflight_id, .. } = self;
        let LocalOp::Write { offset, data } = op else {
            unreachable!("only writes are submitted");
        };
        volume.stats.writes.inc();
        volume.stats.write_bytes.add(data.len() as u64);
        let v = volume.clone();
        volume.store.submit_write(
            offset,
            data,
            Box::new(move |r| {
                v.local_running.fetch_sub(1, Ordering::SeqCst);
                v.finish_local(inflight_id, &req, r);
            }),
        );
    }

    /// Performs the local I/O on the calling thread (blocking).
    pub fn run(self) {
        let r = self.perform();
        self.volume.finish_local(self.inflight_id, &self.req, r);
    }

    /// Waits for the requests this one depends on, then does its local I/O.
    fn perform(&self) -> std::io::Result<()> {
        for dep in &self.wait_for {
            dep.wait_blocking();
        }
        let v = &self.volume;
        let store = &v.store;
        match &self.op {
            LocalOp::Write { offset, data } => {
                v.stats.writes.inc();
                v.stats.write_bytes.add(data.len() as u64);
                store.write_at(*offset, data)
            }
            LocalOp::Discard { offset, len } => {
                v.stats.discards.inc();
                store.discard(*offset, *len)
            }
            LocalOp::Flush => {
                v.stats.flushes.inc();
                store.flush()
            }
        }
    }
}

/// Threads a lone primary's local I/O moves to when more than one request is under way and
/// the store does not take the writes itself (then only flushes and discards come here):
/// enough for the queue depth the loop device sends (its default `nr_requests` is 128,
/// fio's W2 is 32); each costs a stack, no buffer — the data is the request's own copy.
const LOCAL_IO_THREADS: usize = 32;
/// Their stacks: the work is a store call and the request's completion (a FUSE reply).
const LOCAL_IO_STACK: usize = 256 << 10;

pub struct Volume {
    store: Arc<dyn BlockStore>,
    /// Local I/O started and not finished (see [`LocalWork::dispatch`]).
    local_running: AtomicUsize,
    /// Started at the first request that finds another one running.
    local_pool: OnceLock<IoPool>,
    size: u64,
    core: Mutex<Core>,
    timeout: Duration,
    /// Present when the resource has peers: makes every write's region durable-hot first.
    al: Option<Arc<ActivityLog>>,
    /// Runs once before the next write or discard is admitted (see [`Volume::before_next_write`]).
    next_write_hook: Mutex<Option<WriteHook>>,
    next_write_hook_armed: std::sync::atomic::AtomicBool,
    /// The application's requests; shared so counts outlive one promotion.
    pub stats: Arc<VolumeStats>,
}

pub type WriteHook = Box<dyn Fn() -> std::io::Result<()> + Send>;

impl Volume {
    /// `first_seq` continues the resource's change stream; `timeout` is how long a peer may
    /// leave a request unacknowledged before it is declared disconnected.
    pub fn new(
        store: Arc<dyn BlockStore>,
        peers: Vec<PeerConfig>,
        first_seq: u64,
        timeout: Duration,
    ) -> Arc<Self> {
        Self::with_activity_log(store, peers, first_seq, timeout, None, Arc::default())
    }

    /// As [`Volume::new`], with an activity log recording hot regions before writes to them,
    /// counting the application's requests in `stats`.
    pub fn with_activity_log(
        store: Arc<dyn BlockStore>,
        peers: Vec<PeerConfig>,
        first_seq: u64,
        timeout: Duration,
        al: Option<Arc<ActivityLog>>,
        stats: Arc<VolumeStats>,
    ) -> Arc<Self> {
        let size = store.size();
        let peers = peers
            .into_iter()
            .map(|p| {
                let slot = PeerSlot {
                    mode: p.mode,
                    backlog: p.backlog,
                    bitmap: p.bitmap,
                    ack_latency: p.ack_latency,
                    session: None,
                    last_error: None,
                };
                (p.name, slot)
            })
            .collect();
        Arc::new(Self {
            store,
            local_running: AtomicUsize::new(0),
            local_pool: OnceLock::new(),
            size,
            core: Mutex::new(Core { next_seq: first_seq.max(1), inflight: InflightRanges::default(), peers }),
            timeout,
            al,
            next_write_hook: Mutex::new(None),
            next_write_hook_armed: std::sync::atomic::AtomicBool::new(false),
            stats,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The sequence number the next request will get.
    pub fn next_seq(&self) -> u64 {
        self.core.lock().unwrap().next_seq
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(VolumeError::OutOfRange { offset, len, size: self.size }),
        }
    }

    /// Arms `hook` to run before the next write or discard is admitted; that write fails if
    /// the hook does. Used to start a new data generation when a primary first writes
    /// without a peer: the generation must be durable before data that is not in the old one
    /// reaches the disk. Writes admitted while the hook runs wait for it.
    pub fn before_next_write(&self, hook: WriteHook) {
        *self.next_write_hook.lock().unwrap() = Some(hook);
        self.next_write_hook_armed.store(true, std::sync::atomic::Ordering::Release);
    }

    fn run_write_hook(&self) -> Result<(), VolumeError> {
        if !self.next_write_hook_armed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.next_write_hook.lock().unwrap();
        if let Some(hook) = slot.as_ref() {
            // On failure the hook stays armed: this write fails, the next one tries again.
            hook().map_err(|e| self.io_error(e))?;
        }
        *slot = None;
        self.next_write_hook_armed.store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn admit(
        self: &Arc<Self>,
        op: LocalOp,
        range: Option<(u64, u64)>,
        done: Done,
        frame: impl Fn(u64, u8) -> Frame,
    ) -> Result<LocalWork, VolumeError> {
        if range.is_some() {
            self.run_write_hook()?;
        }
        // The region is recorded hot before anything is written anywhere.
        let al = match (&self.al, range) {
            (Some(al), Some((off, len))) => Some(al.begin(off, len).map_err(|e| self.io_error(e))?),
            _ => None,
        };
        let mut core = self.core.lock().unwrap();
        let seq = core.take_seq();
        crate::stage_trace::admitted(seq, matches!(op, LocalOp::Flush));
        // Two parts to start with: the local I/O, and admission itself (released below, once
        // every peer this request waits for has added its part).
        let req = Arc::new(Request::new(seq, 2, done, al));
        let (inflight_id, wait_for) = match range {
            Some((off, len)) => {
                let a = core.inflight.admit(off, off + len);
                (Some(a.id), a.wait_for)
            }
            // A flush waits for everything admitted before it.
            None => (None, core.inflight.all()),
        };
        let replicated = core.fan_out(seq, range, &req, |flags| frame(seq, flags));
        drop(core);
        req.part_done(Ok(()));
        Ok(LocalWork { volume: self.clone(), req, op, inflight_id, wait_for, replicated })
    }

    /// Admits a write of `data` at `offset`. `data` must already be the request's own copy
    /// (the one copy out of the kernel's buffer): it is checksummed, written locally and sent
    /// to every peer from this buffer.
    pub fn write(self: &Arc<Self>, offset: u64, data: Bytes, done: Done) -> Result<LocalWork, VolumeError> {
        let len = data.len() as u64;
        if len == 0 {
            return Err(VolumeError::Empty);
        }
        self.check_range(offset, len)?;
        let checksum = block_checksum(&data);
        let payload = data.clone();
        self.admit(LocalOp::Write { offset, data }, Some((offset, len)), done, move |seq, flags| {
            Frame::Data(DataFrame { seq, offset, flags, checksum, payload: payload.clone() })
        })
    }

    /// Admits a discard (zeroing) of a range, ordered like a write.
    pub fn discard(self: &Arc<Self>, offset: u64, len: u64, done: Done) -> Result<LocalWork, VolumeError> {
        if len == 0 {
            return Err(VolumeError::Empty);
        }
        self.check_range(offset, len)?;
        self.admit(LocalOp::Discard { offset, len }, Some((offset, len)), done, move |seq, flags| {
            Frame::Discard { seq, offset, len, flags }
        })
    }

    /// Admits a flush: a barrier that closes the current epoch. It completes once every
    /// request admitted before it is on stable storage locally and, per mode, on the peers.
    pub fn flush(self: &Arc<Self>, done: Done) -> LocalWork {
        self.admit(LocalOp::Flush, None, done, |seq, flags| Frame::Flush { seq, flags })
            .expect("a flush touches no activity-log extent")
    }

    /// Reads from the local copy on the calling thread.
    pub fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_range(offset, buf.len() as u64)?;
        let r = self.store.read_at(offset, buf);
        self.stats.reads.inc();
        self.stats.read_bytes.add(buf.len() as u64);
        self.local_result(r)
    }

    fn io_error(&self, e: std::io::Error) -> VolumeError {
        self.stats.local_io_errors.inc();
        tracing::error!("local I/O error on the primary: {e}");
        VolumeError::Io(e)
    }

    fn local_result<T>(&self, r: std::io::Result<T>) -> Result<T, VolumeError> {
        r.map_err(|e| self.io_error(e))
    }

    /// A request's local I/O is done with `r`: later overlapping requests may go, and the
    /// request has its local part.
    fn finish_local(&self, inflight_id: Option<u64>, req: &Request, r: std::io::Result<()>) {
        if let Some(id) = inflight_id {
            self.core.lock().unwrap().inflight.finish(id);
        }
        crate::stage_trace::mark(crate::stage_trace::Stage::LocalDone, req.seq());
        req.part_done(self.local_result(r));
    }

    /// Reads a range for a resync, as of a point in the change stream: every request
    /// admitted before the returned sequence number is in the data, and none admitted after
    /// it touches the range until the read is done. Blocking.
    pub fn read_at_seq(&self, offset: u64, len: u64) -> std::io::Result<(u64, Bytes)> {
        let (seq, admitted) = {
            let mut core = self.core.lock().unwrap();
            let seq = core.take_seq();
            (seq, core.inflight.admit(offset, offset + len))
        };
        for dep in &admitted.wait_for {
            dep.wait_blocking();
        }
        let mut buf = vec![0u8; len as usize];
        let r = self.store.read_at(offset, &mut buf);
        self.core.lock().unwrap().inflight.finish(admitted.id);
        r.map(|_| (seq, Bytes::from(buf)))
    }

    /// Online verify of `[offset, +len)` against `peer`, ordered in the change stream like a
    /// write: both sides hash the range exactly as of this point, so a write racing the
    /// comparison can never show up as a difference. Returns the byte ranges that differ,
    /// or an error if the peer is not connected or is lost meanwhile.
    pub async fn verify_range(
        self: &Arc<Self>,
        peer: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, String> {
        self.check_range(offset, len).map_err(|e| e.to_string())?;
        let len32 = u32::try_from(len).map_err(|_| "verify range too long".to_string())?;
        let (admitted, remote) = {
            let mut core = self.core.lock().unwrap();
            let seq = core.take_seq();
            let slot = core.peers.get(peer).ok_or_else(|| format!("{peer} is not a peer"))?;
            let session = slot
                .session
                .clone()
                .filter(|s| !s.is_closed())
                .ok_or_else(|| format!("{peer} is not connected"))?;
            let admitted = core.inflight.admit(offset, offset + len);
            let remote = session.enqueue_verify(seq, Frame::Verify { seq, offset, len: len32 });
            (admitted, remote)
        };
        let this = self.clone();
        let local = tokio::task::spawn_blocking(move || {
            for dep in &admitted.wait_for {
                dep.wait_blocking();
            }
            let mut buf = vec![0u8; len as usize];
            let r = this.store.read_at(offset, &mut buf);
            this.core.lock().unwrap().inflight.finish(admitted.id);
            r.map(|_| buf)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("local read: {e}"))?;
        let remote = match remote {
            Some(rx) => rx.await.map_err(|_| format!("connection to {peer} lost during verify"))?,
            None => return Err(format!("connection to {peer} lost during verify")),
        };
        let block = VERIFY_BLOCK as usize;
        let blocks = local.len().div_ceil(block);
        if remote.len() != blocks * 16 {
            return Err(format!("{peer} returned {} hashes for {blocks} blocks", remote.len() / 16));
        }
        let mut differ: Vec<(u64, u64)> = Vec::new();
        for (i, chunk) in local.chunks(block).enumerate() {
            if block_hash(chunk)[..] != remote[i * 16..(i + 1) * 16] {
                let off = offset + (i * block) as u64;
                match differ.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += chunk.len() as u64,
                    _ => differ.push((off, chunk.len() as u64)),
                }
            }
        }
        Ok(differ)
    }

    /// Bytes written by the application so far (the resync controller backs off while
    /// this moves).
    pub fn app_write_bytes(&self) -> u64 {
        self.stats.write_bytes.get()
    }

    pub fn activity_log(&self) -> Option<&Arc<ActivityLog>> {
        self.al.as_ref()
    }

    // ------------------------------------------------------------ async conveniences

    /// Runs `work` on a blocking thread and resolves when the request completes.
    fn complete_async(
        work: Result<(LocalWork, oneshot::Receiver<Result<u64, VolumeError>>), VolumeError>,
    ) -> Result<impl Future<Output = Result<u64, VolumeError>> + Send + 'static, VolumeError> {
        let (work, rx) = work?;
        tokio::task::spawn_blocking(move || work.run());
        Ok(async move {
            rx.await.unwrap_or_else(|_| Err(VolumeError::Io(std::io::Error::other("request dropped"))))
        })
    }

    fn channel() -> (Done, oneshot::Receiver<Result<u64, VolumeError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
            rx,
        )
    }

    /// [`Volume::write`] with the local I/O on a blocking thread; the future resolves to the
    /// request's sequence number when it completes.
    pub fn submit_write(
        self: &Arc<Self>,
        offset: u64,
        data: Bytes,
    ) -> Result<impl Future<Output = Result<u64, VolumeError>> + Send + 'static, VolumeError> {
        let (done, rx) = Self::channel();
        Self::complete_async(admit_in_place(|| self.write(offset, data, done)).map(|w| (w, rx)))
    }

    pub fn submit_discard(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
    ) -> Result<impl Future<Output = Result<u64, VolumeError>> + Send + 'static, VolumeError> {
        let (done, rx) = Self::channel();
        Self::complete_async(admit_in_place(|| self.discard(offset, len, done)).map(|w| (w, rx)))
    }

    pub fn submit_flush(self: &Arc<Self>) -> impl Future<Output = Result<u64, VolumeError>> + Send + 'static {
        let (done, rx) = Self::channel();
        let work = admit_in_place(|| self.flush(done));
        tokio::task::spawn_blocking(move || work.run());
        async move { rx.await.unwrap_or_else(|_| Err(VolumeError::Io(std::io::Error::other("request dropped")))) }
    }

    pub async fn read(self: &Arc<Self>, offset: u64, len: u64) -> Result<Vec<u8>, VolumeError> {
        let v = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            v.read_blocking(offset, &mut buf).map(|_| buf)
        })
        .await
        .unwrap_or_else(|e| Err(VolumeError::Io(std::io::Error::other(e.to_string()))))
    }

    // ------------------------------------------------------------ peers

    /// Starts replicating to `peer` over `link`. New requests are sent to it from the next
    /// sequence number on; requests admitted earlier stay marked out of sync for it.
    /// The returned handle resolves when the connection ends.
    pub fn attach_peer(self: &Arc<Self>, peer: &str, link: Link) -> Result<PeerHandle, AttachError> {
        let session = {
            let mut core = self.core.lock().unwrap();
            let slot = core.peers.get_mut(peer).ok_or_else(|| AttachError::UnknownPeer(peer.to_string()))?;
            if slot.session.as_ref().is_some_and(|s| !s.is_closed()) {
                return Err(AttachError::AlreadyConnected(peer.to_string()));
            }
            let s = PeerSession::start(
                peer.to_string(),
                slot.mode,
                slot.backlog,
                slot.bitmap.clone(),
                slot.ack_latency.clone(),
                link,
                self.timeout,
            );
            slot.session = Some(s.clone());
            slot.last_error = None;
            s
        };
        // Detach the session from the slot once it ends, so later requests go to the bitmap.
        let this = self.clone();
        let s = session.clone();
        let name = peer.to_string();
        let (done_tx, done_rx) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let reason = s.closed().await;
            {
                let mut core = this.core.lock().unwrap();
                if let Some(slot) = core.peers.get_mut(&name) {
                    if slot.session.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &s)) {
                        slot.session = None;
                        slot.last_error = Some(reason.clone());
                    }
                }
            }
            this.stats.peer_disconnects.inc();
            done_tx.send_replace(Some(reason));
        });
        Ok(PeerHandle { session, done: done_rx })
    }

    pub fn peers(&self) -> Vec<PeerReplication> {
        let core = self.core.lock().unwrap();
        core.peers
            .iter()
            .map(|(name, slot)| (name, slot, slot.session.as_ref().map_or((0, Duration::ZERO), |s| s.lag())))
            .map(|(name, slot, (lag_bytes, lag))| PeerReplication {
                name: name.clone(),
                mode: slot.mode,
                connected: slot.session.as_ref().is_some_and(|s| !s.is_closed()),
                out_of_sync_bytes: slot.bitmap.lock().unwrap().dirty_bytes(),
                pending_requests: slot.session.as_ref().map_or(0, |s| s.pending_count()),
                lag_bytes,
                lag,
                ahead: slot.session.as_ref().is_some_and(|s| s.is_ahead()),
                last_error: slot
                    .session
                    .as_ref()
                    .and_then(|s| s.close_reason())
                    .or_else(|| slot.last_error.clone()),
            })
            .collect()
    }

    /// Requests admitted and not yet complete locally.
    pub fn inflight(&self) -> usize {
        self.core.lock().unwrap().inflight.len()
    }
}

/// Runs an admission from async code. Admission may block — a write waits for room in the
/// activity log, which only requests finishing elsewhere on the runtime make — so on a
/// multi-threaded runtime the worker hands its other tasks on first (a task queued behind
/// the blocked one could otherwise be the request it waits for).
fn admit_in_place<T>(admit: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(admit),
        _ => admit(),
    }
}

/// A live replication connection from the primary to one peer.
#[derive(Clone)]
pub struct PeerHandle {
    session: Arc<PeerSession>,
    done: tokio::sync::watch::Receiver<Option<String>>,
}

impl PeerHandle {
    /// Ends the connection (the peer becomes out of sync for anything unacknowledged).
    pub fn close(&self, reason: &str) {
        self.session.close(reason);
    }

    /// Changes each time the peer, left behind because its backlog overflowed, has drained
    /// it: data flows again, and the blocks it missed are in its bitmap. A receiver sees
    /// every drain after its creation, however late it looks.
    pub fn backlog_drained(&self) -> tokio::sync::watch::Receiver<u64> {
        self.session.drained_episodes()
    }

    /// Resolves with the reason once the connection has ended and the volume has let go of it.
    pub async fn closed(&self) -> String {
        let mut done = self.done.clone();
        let r = match done.wait_for(|d| d.is_some()).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => "volume dropped".to_string(),
        };
        r
    }
}
