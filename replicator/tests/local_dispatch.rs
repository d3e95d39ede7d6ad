//! Where the primary's local I/O runs (`LocalWork::dispatch`): on the calling thread unless
//! the primary is alone, the request waits for no earlier one, and other local I/O is under
//! way — then on the volume's local I/O threads, so the caller is free for the next request
//! while the disk works.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_replicator::sim::{sim_pair, SimOptions};
use tandem_replicator::{
    Applier, ApplierStats, BlockStore, DirtyBitmap, MemStore, Mode, PeerConfig, TargetState, Volume,
    VolumeError,
};

const SIZE: u64 = 1 << 20;
/// Far beyond anything the steps below take; reaching it is the failure.
const PATIENCE: Duration = Duration::from_secs(20);

/// A disk whose writes wait at a gate, recording which thread wrote.
struct GatedStore {
    inner: MemStore,
    open: Mutex<bool>,
    writers: Mutex<Vec<String>>,
    changed: Condvar,
}

impl GatedStore {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemStore::new(SIZE),
            open: Mutex::new(false),
            writers: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        })
    }

    /// Waits until `n` writes have reached the disk; returns their threads' names.
    fn wait_for_writers(&self, n: usize) -> Vec<String> {
        let w = self.writers.lock().unwrap();
        let (w, t) = self.changed.wait_timeout_while(w, PATIENCE, |w| w.len() < n).unwrap();
        assert!(!t.timed_out(), "only {} of {n} writes reached the disk: {:?}", w.len(), *w);
        w.clone()
    }

    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }
}

impl BlockStore for GatedStore {
    fn size(&self) -> u64 {
        SIZE
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let me = std::thread::current().name().unwrap_or("unnamed").to_string();
        self.writers.lock().unwrap().push(me);
        self.changed.notify_all();
        let open = self.open.lock().unwrap();
        let (_open, t) = self.changed.wait_timeout_while(open, PATIENCE, |o| !*o).unwrap();
        if t.timed_out() {
            return Err(io::Error::other("the gate never opened"));
        }
        self.inner.write_at(offset, data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

fn block(tag: u8) -> Bytes {
    Bytes::from(vec![tag; 4096])
}

/// Dispatches a write of `tag` at `offset` from a new thread named `thread`; the first
/// receiver says the dispatch returned, the second carries the request's result.
fn dispatch_from(
    thread: &str,
    volume: &Arc<Volume>,
    offset: u64,
    tag: u8,
) -> (mpsc::Receiver<()>, mpsc::Receiver<Result<u64, VolumeError>>) {
    let (returned_tx, returned) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let v = volume.clone();
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            let work = v.write(offset, block(tag), Box::new(move |r| done_tx.send(r).unwrap())).unwrap();
            work.dispatch();
            returned_tx.send(()).unwrap();
        })
        .unwrap();
    (returned, done)
}

#[test]
fn a_lone_primary_moves_a_write_off_the_caller_while_another_is_on_the_disk() {
    let disk = GatedStore::new();
    let volume = Volume::new(disk.clone(), vec![], 1, Duration::from_secs(30));

    // The only request under way: written on the caller's thread, which waits at the gate.
    let (first_returned, first_done) = dispatch_from("caller-1", &volume, 0, 1);
    assert_eq!(disk.wait_for_writers(1), ["caller-1"]);
    // A second one while it is on the disk: its caller gets its thread back at once, and
    // the write reaches the disk from a local I/O thread.
    let (second_returned, second_done) = dispatch_from("caller-2", &volume, 8192, 2);
    second_returned.recv_timeout(PATIENCE).expect("the second dispatch waited for the disk");
    let writers = disk.wait_for_writers(2);
    assert!(writers[1].starts_with("tandem-local"), "second write ran on {:?}", writers[1]);
    assert!(first_returned.try_recv().is_err(), "the first dispatch returned before its write was done");

    disk.open_gate();
    first_done.recv_timeout(PATIENCE).unwrap().unwrap();
    second_done.recv_timeout(PATIENCE).unwrap().unwrap();
    first_returned.recv_timeout(PATIENCE).unwrap();
    let mut buf = vec![0u8; 4096];
    disk.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 1));
    disk.read_at(8192, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 2));
}

#[test]
fn a_write_that_waits_for_an_earlier_one_waits_on_its_callers_thread() {
    let disk = GatedStore::new();
    let volume = Volume::new(disk.clone(), vec![], 1, Duration::from_secs(30));
    let (_first_returned, first_done) = dispatch_from("caller-1", &volume, 0, 1);
    assert_eq!(disk.wait_for_writers(1), ["caller-1"]);
    // Overlaps the first: it may not start before the first is done, and it must not take
    // a local I/O thread to wait on (all of them could end up waiting so).
    let (second_returned, second_done) = dispatch_from("caller-2", &volume, 0, 2);
    // Admitted while the first is on the disk (it waits for it), before the gate opens.
    let admitted_by = std::time::Instant::now() + PATIENCE;
    while volume.inflight() < 2 {
        assert!(std::time::Instant::now() < admitted_by, "the second write was never admitted");
        std::thread::sleep(Duration::from_millis(1));
    }
    disk.open_gate();
    first_done.recv_timeout(PATIENCE).unwrap().unwrap();
    second_done.recv_timeout(PATIENCE).unwrap().unwrap();
    second_returned.recv_timeout(PATIENCE).unwrap();
    assert_eq!(disk.wait_for_writers(2), ["caller-1", "caller-2"]);
    let mut buf = vec![0u8; 4096];
    disk.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 2), "the later write is the one that stays");
}

#[test]
fn with_a_peer_every_write_stays_on_its_callers_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let disk = GatedStore::new();
    let standby = Arc::new(MemStore::new(SIZE));
    let volume = Volume::new(
        disk.clone(),
        vec![PeerConfig {
            name: "beta".into(),
            mode: Mode::Sync,
            bitmap: Arc::new(Mutex::new(DirtyBitmap::new(SIZE, 4096))),
            backlog: None,
            ack_latency: Default::default(),
        }],
        1,
        Duration::from_secs(30),
    );
    let _runtime = rt.enter();
    let (a, b, _ctl) = sim_pair(SimOptions { latency: Duration::ZERO });
    let applier = Applier::new(TargetState::new(standby.clone(), Arc::new(ApplierStats::default())));
    let _applier = rt.spawn(async move { applier.run(b).await });
    let _peer = rt.block_on(async { volume.attach_peer("beta", a).unwrap() });

    let (_first_returned, first_done) = dispatch_from("caller-1", &volume, 0, 1);
    assert_eq!(disk.wait_for_writers(1), ["caller-1"]);
    let (_second_returned, second_done) = dispatch_from("caller-2", &volume, 8192, 2);
    assert_eq!(disk.wait_for_writers(2), ["caller-1", "caller-2"]);

    disk.open_gate();
    first_done.recv_timeout(PATIENCE).unwrap().unwrap();
    second_done.recv_timeout(PATIENCE).unwrap().unwrap();
    let mut buf = vec![0u8; 4096];
    standby.read_at(8192, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 2), "the standby has the second write");
}

/// A disk that takes writes asynchronously, as the agent's io_uring does: `submit_write`
/// returns at once and a thread of the store's own writes (at the gate) and completes.
struct SubmittingStore {
    disk: Arc<GatedStore>,
    /// When set, every submitted write completes with this errno instead of writing.
    fail: Mutex<Option<i32>>,
}

impl BlockStore for SubmittingStore {
    fn size(&self) -> u64 {
        SIZE
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.disk.write_at(offset, data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.discard(offset, len)
    }
    fn submits_writes(&self) -> bool {
        true
    }
    fn submit_write(&self, offset: u64, data: Bytes, done: tandem_replicator::WriteDone) {
        let disk = self.disk.clone();
        let fail = *self.fail.lock().unwrap();
        std::thread::Builder::new()
            .name("store-completer".into())
            .spawn(move || match fail {
                Some(errno) => done(Err(io::Error::from_raw_os_error(errno))),
                None => done(disk.write_at(offset, &data)),
            })
            .unwrap();
    }
}

#[test]
fn a_store_that_takes_writes_asynchronously_gets_the_concurrent_ones_in_order_with_the_rest() {
    let disk = GatedStore::new();
    let store = Arc::new(SubmittingStore { disk: disk.clone(), fail: Mutex::new(None) });
    let volume = Volume::new(store.clone(), vec![], 1, Duration::from_secs(30));

    // Alone: on the caller's thread, as with any store.
    let (_first_returned, first_done) = dispatch_from("caller-1", &volume, 0, 1);
    assert_eq!(disk.wait_for_writers(1), ["caller-1"]);
    // With the disk busy: submitted, the caller free at once, completed by the store.
    let (second_returned, second_done) = dispatch_from("caller-2", &volume, 8192, 2);
    second_returned.recv_timeout(PATIENCE).expect("the submitting dispatch waited for the disk");
    assert_eq!(disk.wait_for_writers(2)[1], "store-completer");
    // A write over the submitted one waits for it on its own caller's thread.
    let (third_returned, third_done) = dispatch_from("caller-3", &volume, 8192, 3);
    let admitted_by = std::time::Instant::now() + PATIENCE;
    while volume.inflight() < 3 {
        assert!(std::time::Instant::now() < admitted_by, "the third write was never admitted");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(third_returned.try_recv().is_err(), "the overlapping write did not wait");
    disk.open_gate();
    for done in [first_done, second_done, third_done] {
        done.recv_timeout(PATIENCE).unwrap().unwrap();
    }
    third_returned.recv_timeout(PATIENCE).unwrap();
    assert_eq!(disk.wait_for_writers(3), ["caller-1", "store-completer", "caller-3"]);
    let mut buf = vec![0u8; 4096];
    disk.read_at(8192, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 3), "the later write is the one that stays");
    let mut buf = vec![0u8; 4096];
    disk.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 1));
}

#[test]
fn a_submitted_write_that_fails_fails_its_request_and_frees_the_disk_count() {
    let disk = GatedStore::new();
    let store = Arc::new(SubmittingStore { disk: disk.clone(), fail: Mutex::new(Some(libc_eio())) });
    let volume = Volume::new(store.clone(), vec![], 1, Duration::from_secs(30));
    let (_first_returned, first_done) = dispatch_from("caller-1", &volume, 0, 1);
    assert_eq!(disk.wait_for_writers(1), ["caller-1"]);
    let (_second_returned, second_done) = dispatch_from("caller-2", &volume, 8192, 2);
    let err = second_done.recv_timeout(PATIENCE).unwrap().unwrap_err();
    assert_eq!(err.errno(), libc_eio(), "the kernel's error reaches the request: {err}");
    disk.open_gate();
    first_done.recv_timeout(PATIENCE).unwrap().unwrap();
    // Nothing is under way any more: the next write runs on its caller's thread again,
    // which it would not if the failed write had left the disk counted busy.
    *store.fail.lock().unwrap() = None;
    let (_third_returned, third_done) = dispatch_from("caller-3", &volume, 16384, 3);
    third_done.recv_timeout(PATIENCE).unwrap().unwrap();
    assert_eq!(disk.wait_for_writers(2), ["caller-1", "caller-3"]);
    let mut buf = vec![0u8; 4096];
    disk.read_at(8192, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "the failed write left the disk as it was");
}

/// EIO, without a libc dependency in this test crate.
fn libc_eio() -> i32 {
    5
}
