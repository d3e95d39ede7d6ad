//! Asynchronous O_DIRECT writes to one image through an io_uring owned by one thread.
//!
//! A lone primary under a deep queue (fio's W2: 32 random 4 KiB writes in flight) used to
//! block one engine thread per write in `pwrite`: every write cost that thread a sleep and a
//! wake-up, and on a small machine the wake-ups were the largest CPU user after the disk
//! itself (docs/benchmarks.md). Here the FUSE thread that admitted a write only queues it
//! and returns for the next request; the image's `tandem-uring` thread submits everything
//! queued in one `io_uring_enter`, sleeps until completions arrive and reaps them in a
//! batch, completing each request (its FUSE reply) from there — as the kernel's loop
//! device does with its worker.
//!
//! Invariants:
//! - One thread owns the ring (`SINGLE_ISSUER | DEFER_TASKRUN`): it alone submits and
//!   reaps, so completions run when it asks for them and never interrupt another thread.
//! - Every queued write's `done` runs exactly once, with the kernel's result. A write the
//!   ring cannot take (its submission queue full and not draining, a short write, `EAGAIN`)
//!   is finished with a blocking `pwrite` on the owner thread: slower, never lost. If
//!   `io_uring_enter` itself fails, what is still queued is written so too; what is
//!   already in the submission queue goes with the next enter.
//! - The data's buffer (a [`Bytes`] the op owns) and the descriptor (the writer's own
//!   duplicate) live until the kernel has posted the write's completion.
//! - Queuing never misses a sleeping owner: the owner announces it is about to sleep, then
//!   looks at the queue once more; a queuer that finds the announcement wakes it through an
//!   eventfd whose read is always armed in the ring.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use tandem_replicator::WriteDone;

/// Submission queue entries; the completion queue gets twice as many. More writes than this
/// may be queued at once: they are submitted in rounds, and the kernel holds completions
/// that find the completion queue full (`IORING_FEAT_NODROP`).
const RING_ENTRIES: u32 = 256;
/// The owner thread's stack: it runs completions (a FUSE reply each).
const OWNER_STACK: usize = 256 << 10;
/// The `user_data` of the eventfd read that wakes the owner; writes use their slot index.
const WAKE: u64 = u64::MAX;
/// `io_uring_enter`'s flag to wait for and process completions (the crate's own is private).
const IORING_ENTER_GETEVENTS: u32 = 1;

struct QueuedWrite {
    offset: u64,
    data: Bytes,
    done: WriteDone,
}

struct Shared {
    queue: Mutex<Vec<QueuedWrite>>,
    /// The owner is about to sleep, or sleeps: the next queuer must write the eventfd.
    owner_sleeping: AtomicBool,
    /// The writer was dropped: the owner finishes what is queued and in flight, then exits.
    closing: AtomicBool,
    eventfd: OwnedFd,
}

impl Shared {
    fn wake_owner(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to an eventfd we own. It can only fail if the counter
        // would overflow, and then a wake-up is pending anyway.
        unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// The image's asynchronous writer. Dropping it lets its thread finish every write queued
/// so far and exit.
pub struct UringWriter {
    shared: Arc<Shared>,
}

impl UringWriter {
    /// Starts the owner thread for `file` (an O_DIRECT descriptor, duplicated here) and its
    /// ring. Fails where the kernel offers no io_uring or forbids it (`io_uring_disabled`,
    /// a seccomp filter): the caller then writes synchronously.
    pub fn start(file: &File) -> io::Result<Self> {
        let file = file.try_clone()?;
        // SAFETY: plain syscall; the returned descriptor is checked and then owned.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            owner_sleeping: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            eventfd,
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let owner = shared.clone();
        std::thread::Builder::new().name("tandem-uring".into()).stack_size(OWNER_STACK).spawn(move || {
            // The ring is built on the thread that will be its only issuer.
            let ring = IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_cqsize(RING_ENTRIES * 2)
                .build(RING_ENTRIES);
            match ring {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    Owner::new(ring, owner, file).run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("the io_uring thread exited at start"))??;
        Ok(Self { shared })
    }

    /// Queues a write of `data` (aligned for O_DIRECT) at `offset`; `done` runs on the owner
    /// thread when it is complete.
    pub fn submit(&self, offset: u64, data: Bytes, done: WriteDone) {
        self.shared.queue.lock().unwrap().push(QueuedWrite { offset, data, done });
        if self.shared.owner_sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake_owner();
        }
    }
}

impl Drop for UringWriter {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake_owner();
    }
}

/// A write the kernel has: its buffer stays here until its completion is reaped.
struct InFlight {
    offset: u64,
    data: Bytes,
    done: WriteDone,
}

struct Owner {
    ring: IoUring,
    shared: Arc<Shared>,
    file: File,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Where the armed eventfd read puts the counter; boxed so it does not move.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
}

impl Owner {
    fn new(ring: IoUring, shared: Arc<Shared>, file: File) -> Self {
        Self {
            ring,
            shared,
            file,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
        }
    }

    fn run(mut self) {
        let mut batch = Vec::new();
        let mut completed = Vec::new();
        loop {
            if !self.wake_armed {
                let read = opcode::Read::new(
                    types::Fd(self.shared.eventfd.as_raw_fd()),
                    self.wake_buf.as_mut_ptr(),
                    8,
                )
                .build()
                .user_data(WAKE);
                if self.push(&read) {
                    self.wake_armed = true;
                }
            }
            self.take_queued(&mut batch);
            if self.shared.closing.load(Ordering::SeqCst)
                && self.in_flight == 0
                && self.shared.queue.lock().unwrap().is_empty()
            {
                break;
            }
            // Announce the sleep, then look once more: a write queued before the
            // announcement is seen here, one queued after it wakes us.
            self.shared.owner_sleeping.store(true, Ordering::SeqCst);
            let want = if self.shared.queue.lock().unwrap().is_empty() { 1 } else { 0 };
            if want == 0 {
                self.shared.owner_sleeping.store(false, Ordering::SeqCst);
            } else if !self.wake_armed && self.in_flight == 0 {
                // The ring took no wake-up read (it is full and would not submit): nothing
                // would wake us. Look again shortly instead of sleeping in the ring.
                self.shared.owner_sleeping.store(false, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            // GETEVENTS even when not waiting: with DEFER_TASKRUN that is what posts the
            // completions the kernel has ready.
            let to_submit = self.ring.submission().len() as u32;
            // SAFETY: a plain io_uring_enter on our own ring, no argument.
            match unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(to_submit, want, IORING_ENTER_GETEVENTS, None)
            } {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; finishing queued writes synchronously");
                    self.finish_unsubmitted();
                    // Not a hot loop of failing calls (and log lines) if it persists.
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.shared.owner_sleeping.store(false, Ordering::SeqCst);
            self.reap(&mut completed);
            // What was queued while we slept goes to the disk before the completions run
            // (each is a FUSE reply): the disk works while we reply.
            if !completed.is_empty() {
                self.submit_queued(&mut batch);
            }
            for (token, res) in completed.drain(..) {
                self.complete(token, res);
            }
        }
        // The eventfd read is still armed: let it complete and reap it, so the kernel is
        // done with `wake_buf` before it is freed.
        if self.wake_armed {
            self.shared.wake_owner();
            while self.wake_armed {
                if self.ring.submitter().submit_and_wait(1).is_err() {
                    // The ring is unusable; dropping it cancels the read. Keep the buffer.
                    std::mem::forget(std::mem::take(&mut self.wake_buf));
                    return;
                }
                self.reap(&mut completed);
                for (token, res) in completed.drain(..) {
                    self.complete(token, res);
                }
            }
        }
    }

    /// Takes the completions the kernel has posted (token, result), freeing their slots in
    /// the completion queue before any of them runs.
    fn reap(&mut self, completed: &mut Vec<(u64, i32)>) {
        completed.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }

    /// Moves every queued write into the submission queue.
    fn take_queued(&mut self, batch: &mut Vec<QueuedWrite>) {
        std::mem::swap(&mut *self.shared.queue.lock().unwrap(), batch);
        for w in batch.drain(..) {
            self.start_write(w);
        }
    }

    /// Moves every queued write into the submission queue and submits them, not waiting.
    fn submit_queued(&mut self, batch: &mut Vec<QueuedWrite>) {
        self.take_queued(batch);
        if !self.ring.submission().is_empty() {
            // A failure leaves them in the submission queue: the next enter retries.
            let _ = self.ring.submitter().submit();
        }
    }

    /// Pushes an entry, submitting what is queued first if the submission queue is full.
    /// False if the ring takes no more (then the caller finishes the work itself).
    fn push(&mut self, entry: &io_uring::squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: every buffer and descriptor an entry names outlives its completion
            // (see the module docs); only this thread touches the submission queue.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return true;
            }
            if self.ring.submitter().submit().is_err() {
                return false;
            }
        }
        false
    }

    fn start_write(&mut self, w: QueuedWrite) {
        let Ok(len) = u32::try_from(w.data.len()) else {
            return self.finish_blocking(w.offset, w.data, w.done);
        };
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let entry = opcode::Write::new(types::Fd(self.file.as_raw_fd()), w.data.as_ptr(), len)
            .offset(w.offset)
            .build()
            .user_data(slot as u64);
        self.slots[slot] = Some(InFlight { offset: w.offset, data: w.data, done: w.done });
        if self.push(&entry) {
            self.in_flight += 1;
        } else {
            let f = self.slots[slot].take().expect("slot just filled");
            self.free.push(slot);
            self.finish_blocking(f.offset, f.data, f.done);
        }
    }

    fn complete(&mut self, token: u64, res: i32) {
        if token == WAKE {
            self.wake_armed = false;
            return;
        }
        let Some(f) = usize::try_from(token).ok().and_then(|i| self.slots.get_mut(i)).and_then(Option::take)
        else {
            tracing::error!(token, "io_uring completion for no write in flight; ignored");
            return;
        };
        self.free.push(token as usize);
        self.in_flight -= 1;
        match write_outcome(res, f.data.len()) {
            Outcome::Done(r) => (f.done)(r),
            Outcome::Retry => self.finish_blocking(f.offset, f.data, f.done),
        }
    }

    /// Finishes a write with a blocking `pwrite` (all of it: a short write restarts).
    fn finish_blocking(&self, offset: u64, data: Bytes, done: WriteDone) {
        done(self.file.write_all_at(&data, offset));
    }

    /// The ring failed: every write not yet handed to it is written here.
    fn finish_unsubmitted(&mut self) {
        let batch = std::mem::take(&mut *self.shared.queue.lock().unwrap());
        for w in batch {
            self.finish_blocking(w.offset, w.data, w.done);
        }
    }
}

#[derive(Debug)]
enum Outcome {
    Done(io::Result<()>),
    /// Not an answer about the data: write it again, blocking.
    Retry,
}

/// What a write's completion result means for a write of `len` bytes.
fn write_outcome(res: i32, len: usize) -> Outcome {
    if res < 0 {
        return match -res {
            libc::EAGAIN | libc::EINTR => Outcome::Retry,
            errno => Outcome::Done(Err(io::Error::from_raw_os_error(errno))),
        };
    }
    if res as usize == len {
        Outcome::Done(Ok(()))
    } else {
        // A short write (the disk filled up, or a signal): the blocking path writes it all
        // or reports the error that stopped it.
        Outcome::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{AlignedBuf, DIO_ALIGN};
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::Duration;

    #[test]
    fn completion_results_map_to_done_errors_or_a_blocking_retry() {
        assert!(matches!(write_outcome(4096, 4096), Outcome::Done(Ok(()))));
        assert!(matches!(write_outcome(512, 4096), Outcome::Retry));
        assert!(matches!(write_outcome(-libc::EAGAIN, 4096), Outcome::Retry));
        assert!(matches!(write_outcome(-libc::EINTR, 4096), Outcome::Retry));
        match write_outcome(-libc::ENOSPC, 4096) {
            Outcome::Done(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC)),
            other => panic!("ENOSPC gave {other:?}"),
        }
        match write_outcome(-libc::EIO, 4096) {
            Outcome::Done(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
            other => panic!("EIO gave {other:?}"),
        }
    }

    /// The writer, or a failure that says why this machine gives none.
    fn start_or_explain(file: &File) -> UringWriter {
        UringWriter::start(file).unwrap_or_else(|e| {
            let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
            panic!(
                "no io_uring here ({e}; kernel.io_uring_disabled = {}): these tests need one, \
                 as the agent does for a lone primary's concurrent writes",
                disabled.trim()
            )
        })
    }

    /// Blocks that name their own offset, as the benchmarks write them.
    fn block_for(offset: u64) -> Bytes {
        let mut b = vec![0u8; DIO_ALIGN];
        for (i, chunk) in b.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(offset ^ i as u64).to_le_bytes());
        }
        AlignedBuf::copy_from(&b).into_bytes()
    }

    #[test]
    fn many_concurrent_writes_land_at_their_offsets_and_each_completes_once() {
        // A disk filesystem: O_DIRECT (tmpfs has none).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img");
        let blocks = 2048u64;
        std::fs::write(&path, vec![0u8; (blocks as usize) * DIO_ALIGN]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let writer = Arc::new(start_or_explain(&file));
        let (tx, rx) = mpsc::channel();
        // Four threads queue in a scattered order, more at once than the ring has entries.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (writer, tx) = (writer.clone(), tx.clone());
                std::thread::spawn(move || {
                    for i in (t..blocks).step_by(4) {
                        let b = (i * 7919) % blocks;
                        let tx = tx.clone();
                        let off = b * DIO_ALIGN as u64;
                        writer.submit(off, block_for(off), Box::new(move |r| tx.send((b, r)).unwrap()));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(tx);
        let mut seen = vec![0u32; blocks as usize];
        for _ in 0..blocks {
            let (b, r) = rx.recv_timeout(Duration::from_secs(60)).expect("a write never completed");
            r.unwrap_or_else(|e| panic!("write of block {b}: {e}"));
            seen[b as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n == 1), "every write completes exactly once");
        // Dropping the writer ends its thread once nothing is in flight; the channel closes
        // when every `done` has been dropped.
        drop(writer);
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_err(), "no completion after the last");
        let back = std::fs::read(&path).unwrap();
        for b in 0..blocks {
            let off = b * DIO_ALIGN as u64;
            let at = off as usize;
            assert_eq!(
                &back[at..at + DIO_ALIGN],
                &block_for(off)[..],
                "block {b} holds another block's data"
            );
        }
    }

    #[test]
    fn a_failing_write_reports_the_kernels_error() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4 * DIO_ALIGN]).unwrap();
        // Read-only: every write fails with EBADF, through the ring.
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
        let writer = start_or_explain(&file);
        let (tx, rx) = mpsc::channel();
        writer.submit(0, block_for(0), Box::new(move |r| tx.send(r).unwrap()));
        let r = rx.recv_timeout(Duration::from_secs(30)).expect("the write never completed");
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 4 * DIO_ALIGN], "nothing written");
    }
}
