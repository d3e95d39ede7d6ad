//! Deterministic engine harness: a primary [`Volume`] and a standby [`Applier`] on in-memory
//! disks, joined by a simulated link, driven with random writes, overlaps, discards and
//! flushes, and checked against a model that applies the same requests in sequence order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tandem_replicator::sim::{sim_pair, SimControl, SimOptions};
use tandem_replicator::*;

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 64;
const SIZE: u64 = BLOCK * BLOCKS;

#[derive(Debug, Clone)]
enum Op {
    /// Write `len` blocks at block `at`, filled with a pattern derived from `tag`.
    Write {
        at: u64,
        len: u64,
        tag: u8,
    },
    Discard {
        at: u64,
        len: u64,
    },
    Flush,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1u64..5, any::<u8>()).prop_map(|(at, len, tag)| Op::Write { at: at.min(BLOCKS - len), len, tag }),
        1 => (0..BLOCKS, 1u64..4).prop_map(|(at, len)| Op::Discard { at: at.min(BLOCKS - len), len }),
        2 => Just(Op::Flush),
    ]
}

/// Block content that records its own offset, the op's tag and the op's index.
fn payload(at: u64, len: u64, tag: u8, index: usize) -> Bytes {
    let mut v = vec![tag; (len * BLOCK) as usize];
    for b in 0..len {
        let o = (b * BLOCK) as usize;
        v[o..o + 8].copy_from_slice(&((at + b) * BLOCK).to_le_bytes());
        v[o + 8..o + 16].copy_from_slice(&(index as u64).to_le_bytes());
    }
    Bytes::from(v)
}

struct Pair {
    primary_disk: Arc<MemStore>,
    standby_disk: Arc<MemStore>,
    volume: Arc<Volume>,
    bitmap: Arc<Mutex<DirtyBitmap>>,
    ctl: Arc<SimControl>,
    applier: tokio::task::JoinHandle<Result<(), ApplyError>>,
    applier_stats: Arc<ApplierStats>,
    peer: PeerHandle,
}

fn pair(mode: Mode, latency: Duration, timeout: Duration) -> Pair {
    pair_with_backlog(mode, latency, timeout, None)
}

fn pair_with_backlog(mode: Mode, latency: Duration, timeout: Duration, backlog: Option<Backlog>) -> Pair {
    let primary_disk = Arc::new(MemStore::new(SIZE));
    let standby_disk = Arc::new(MemStore::new(SIZE));
    let bitmap = Arc::new(Mutex::new(DirtyBitmap::new(SIZE, BLOCK)));
    let volume = Volume::new(
        primary_disk.clone(),
        vec![PeerConfig {
            name: "beta".into(),
            mode,
            bitmap: bitmap.clone(),
            backlog,
            ack_latency: Default::default(),
        }],
        1,
        timeout,
    );
    let (a, b, ctl) = sim_pair(SimOptions { latency });
    let applier_stats = Arc::new(ApplierStats::default());
    let applier = Applier::new(TargetState::new(standby_disk.clone(), applier_stats.clone()));
    let applier = tokio::spawn(async move { applier.run(b).await });
    let peer = volume.attach_peer("beta", a).unwrap();
    Pair { primary_disk, standby_disk, volume, bitmap, ctl, applier, applier_stats, peer }
}

/// Submits `ops` with up to `window` requests in flight; returns (seq, op index) per request.
async fn drive(volume: &Arc<Volume>, ops: &[Op], base: usize, window: usize) -> Vec<(u64, usize)> {
    let mut done = Vec::new();
    let mut running = tokio::task::JoinSet::new();
    for (i, op) in ops.iter().enumerate() {
        let i = i + base;
        while running.len() >= window {
            done.push(running.join_next().await.unwrap().unwrap());
        }
        match op {
            Op::Write { at, len, tag } => {
                let f = volume.submit_write(at * BLOCK, payload(*at, *len, *tag, i)).unwrap();
                running.spawn(async move { (f.await.unwrap(), i) });
            }
            Op::Discard { at, len } => {
                let f = volume.submit_discard(at * BLOCK, len * BLOCK).unwrap();
                running.spawn(async move { (f.await.unwrap(), i) });
            }
            Op::Flush => {
                let f = volume.submit_flush();
                running.spawn(async move { (f.await.unwrap(), i) });
            }
        }
    }
    while let Some(r) = running.join_next().await {
        done.push(r.unwrap());
    }
    done
}

/// The image after applying `ops` in sequence order.
fn model(ops: &[Op], order: &[(u64, usize)]) -> Vec<u8> {
    let mut order = order.to_vec();
    order.sort();
    let mut img = vec![0u8; SIZE as usize];
    for (_, i) in order {
        match &ops[i] {
            Op::Write { at, len, tag } => {
                let o = (at * BLOCK) as usize;
                img[o..o + (len * BLOCK) as usize].copy_from_slice(&payload(*at, *len, *tag, i));
            }
            Op::Discard { at, len } => {
                let o = (at * BLOCK) as usize;
                img[o..o + (len * BLOCK) as usize].fill(0);
            }
            Op::Flush => {}
        }
    }
    img
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<u64> {
    (0..BLOCKS)
        .filter(|blk| {
            let r = (*blk * BLOCK) as usize..((*blk + 1) * BLOCK) as usize;
            a[r.clone()] != b[r]
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Connected sync pair: primary and standby both equal the sequence-order model, and the
    /// standby has missed nothing.
    #[test]
    fn sync_standby_equals_model(ops in proptest::collection::vec(arb_op(), 1..80),
                                 window in 1usize..24, latency_us in 0u64..800) {
        rt().block_on(async {
            let p = pair(Mode::Sync, Duration::from_micros(latency_us), Duration::from_secs(30));
            let order = drive(&p.volume, &ops, 0, window).await;
            let want = model(&ops, &order);
            let prim = p.primary_disk.snapshot();
            let stby = p.standby_disk.snapshot();
            prop_assert!(differing_blocks(&prim, &want).is_empty(), "primary differs from model");
            prop_assert!(differing_blocks(&stby, &want).is_empty(), "standby differs from model");
            prop_assert_eq!(p.bitmap.lock().unwrap().count(), 0);
            prop_assert_eq!(p.applier_stats.checksum_errors.get(), 0);
            Ok(())
        })?;
    }

    /// The link is cut at a random point while requests are in flight: the primary completes
    /// everything alone, and the peer's dirty bitmap covers every block where the two images
    /// differ (nothing the standby is missing goes untracked).
    #[test]
    fn cut_link_bitmap_covers_every_difference(ops in proptest::collection::vec(arb_op(), 1..80),
                                              cut_after in 0usize..80, window in 1usize..16) {
        rt().block_on(async {
            let p = pair(Mode::Sync, Duration::from_micros(200), Duration::from_secs(30));
            let cut_at = cut_after.min(ops.len());
            let mut order = drive(&p.volume, &ops[..cut_at], 0, window).await;
            p.ctl.cut();
            // Requests after the cut, some racing the session's teardown.
            order.extend(drive(&p.volume, &ops[cut_at..], cut_at, window).await);
            let _ = p.applier.await;
            let want = model(&ops, &order);
            let prim = p.primary_disk.snapshot();
            prop_assert!(differing_blocks(&prim, &want).is_empty(), "primary differs at {:?}; order {:?}", differing_blocks(&prim, &want), order);
            let stby = p.standby_disk.snapshot();
            let bm = p.bitmap.lock().unwrap();
            for blk in differing_blocks(&prim, &stby) {
                prop_assert!(bm.is_set(blk), "block {} differs but is not marked out of sync", blk);
            }
            Ok(())
        })?;
    }
}

/// A store that records the order in which operations reach it.
struct RecordingStore {
    inner: MemStore,
    log: Mutex<Vec<Event>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    /// A write carrying the index of the op that produced it.
    Write(u64),
    Flush,
}

impl BlockStore for RecordingStore {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let idx = u64::from_le_bytes(data[8..16].try_into().unwrap());
        // Widen the window in which a reordering would show.
        std::thread::sleep(Duration::from_micros(50 + (idx % 7) * 30));
        self.inner.write_at(offset, data)?;
        self.log.lock().unwrap().push(Event::Write(idx));
        Ok(())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.log.lock().unwrap().push(Event::Flush);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
}

/// On the standby, no write of epoch k+1 reaches the disk before every write of epoch k and
/// the flush closing it: the standby image is always crash-consistent.
#[test]
fn standby_applies_epochs_in_order() {
    rt().block_on(async {
        let primary_disk = Arc::new(MemStore::new(SIZE));
        let standby = Arc::new(RecordingStore { inner: MemStore::new(SIZE), log: Mutex::new(Vec::new()) });
        let bitmap = Arc::new(Mutex::new(DirtyBitmap::new(SIZE, BLOCK)));
        // async mode: the primary does not wait, so several epochs are in flight at once.
        let volume = Volume::new(
            primary_disk,
            vec![PeerConfig {
                name: "beta".into(),
                mode: Mode::Async,
                bitmap,
                backlog: None,
                ack_latency: Default::default(),
            }],
            1,
            Duration::from_secs(30),
        );
        let (a, b, _ctl) = sim_pair(SimOptions::default());
        let applier = Applier::new(TargetState::new(standby.clone(), Arc::new(ApplierStats::default())));
        let applier = tokio::spawn(async move { applier.run(b).await });
        let _peer = volume.attach_peer("beta", a).unwrap();
        // epoch e: 8 writes to distinct blocks, then a flush.
        let mut epoch_of = std::collections::HashMap::new();
        let mut futs = Vec::new();
        let mut idx = 0u64;
        for e in 0..10u64 {
            for w in 0..8u64 {
                idx += 1;
                epoch_of.insert(idx, e);
                let at = (e * 8 + w) % BLOCKS;
                futs.push(tokio::spawn(
                    volume.submit_write(at * BLOCK, payload(at, 1, 1, idx as usize)).unwrap(),
                ));
            }
            futs.push(tokio::spawn(volume.submit_flush()));
        }
        for f in futs {
            f.await.unwrap().unwrap();
        }
        // Wait until the standby has applied everything (async mode did not wait for it).
        for _ in 0..500 {
            if standby.log.lock().unwrap().iter().filter(|e| **e == Event::Flush).count() == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(volume);
        let log = standby.log.lock().unwrap().clone();
        assert_eq!(log.iter().filter(|e| **e == Event::Flush).count(), 10, "log: {log:?}");
        let mut flushes_seen = 0u64;
        for ev in &log {
            match ev {
                Event::Flush => flushes_seen += 1,
                Event::Write(i) => {
                    assert_eq!(epoch_of[i], flushes_seen, "write {i} applied in the wrong epoch: {log:?}")
                }
            }
        }
        applier.abort();
    });
}

/// A peer that stops answering holds sync writes until the timeout, then is dropped: the
/// write completes, the peer is disconnected and the write is tracked as out of sync.
#[test]
fn frozen_peer_times_out_and_primary_continues() {
    rt().block_on(async {
        let timeout = Duration::from_millis(400);
        let p = pair(Mode::Sync, Duration::ZERO, timeout);
        // Connected and healthy first.
        p.volume.submit_write(0, payload(0, 1, 9, 0)).unwrap().await.unwrap();
        assert_eq!(p.bitmap.lock().unwrap().count(), 0);
        p.ctl.freeze();
        let start = tokio::time::Instant::now();
        let w = tokio::spawn(p.volume.submit_write(BLOCK, payload(1, 1, 9, 1)).unwrap());
        tokio::time::sleep(timeout / 2).await;
        assert!(!w.is_finished(), "a sync write completed while the peer was frozen");
        w.await.unwrap().unwrap();
        assert!(start.elapsed() >= timeout, "completed after {:?}", start.elapsed());
        let peers = p.volume.peers();
        assert!(!peers[0].connected);
        assert!(peers[0].last_error.as_deref().unwrap().contains("no acknowledgement"), "{peers:?}");
        assert!(p.bitmap.lock().unwrap().is_set(1));
        // Later writes complete at once and are tracked.
        let t = tokio::time::Instant::now();
        p.volume.submit_write(2 * BLOCK, payload(2, 1, 9, 2)).unwrap().await.unwrap();
        assert!(t.elapsed() < timeout);
        assert!(p.bitmap.lock().unwrap().is_set(2));
        assert_eq!(p.volume.peers()[0].out_of_sync_bytes, 2 * BLOCK);
    });
}

/// A data frame corrupted in flight is never written; the standby counts it and drops the
/// stream with the reason; the primary marks the block out of sync.
#[test]
fn corrupted_block_is_not_written() {
    rt().block_on(async {
        let p = pair(Mode::Sync, Duration::ZERO, Duration::from_secs(30));
        p.volume.submit_write(0, payload(0, 1, 1, 0)).unwrap().await.unwrap();
        p.ctl.corrupt_next_data();
        p.volume.submit_write(BLOCK, payload(1, 1, 2, 1)).unwrap().await.unwrap();
        let r = p.applier.await.unwrap();
        assert!(matches!(r, Err(ApplyError::ChecksumMismatch { offset, .. }) if offset == BLOCK), "{r:?}");
        assert_eq!(p.applier_stats.checksum_errors.get(), 1);
        let stby = p.standby_disk.snapshot();
        assert!(
            stby[BLOCK as usize..2 * BLOCK as usize].iter().all(|b| *b == 0),
            "corrupt block reached the disk"
        );
        assert_eq!(&stby[..BLOCK as usize], &payload(0, 1, 1, 0)[..]);
        let reason = p.peer.closed().await;
        assert!(reason.contains("checksum mismatch"), "{reason}");
        assert!(p.bitmap.lock().unwrap().is_set(1));
    });
}

/// Memory mode completes on receipt; a failing standby disk drops the connection and the
/// write is tracked as out of sync rather than lost.
#[test]
fn standby_disk_failure_drops_connection_and_tracks_block() {
    rt().block_on(async {
        let p = pair(Mode::Memory, Duration::ZERO, Duration::from_secs(30));
        p.volume.submit_write(0, payload(0, 1, 1, 0)).unwrap().await.unwrap();
        p.standby_disk.set_failing(Some(5));
        p.volume.submit_write(BLOCK, payload(1, 1, 1, 1)).unwrap().await.unwrap();
        let r = p.applier.await.unwrap();
        assert!(matches!(r, Err(ApplyError::Io(_))), "{r:?}");
        for _ in 0..100 {
            if !p.volume.peers()[0].connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!p.volume.peers()[0].connected);
        assert!(p.bitmap.lock().unwrap().is_set(1));
    });
}

/// An extent stays in the activity log until every peer has the writes to it on disk, not
/// only until the request completes: with an `async` peer that lags, cooling (or eviction)
/// must not drop the extent, or a primary crash would lose track of blocks the peer lacks.
#[test]
fn activity_log_holds_extents_until_async_peers_have_them() {
    struct NoMeta;
    impl tandem_replicator::ActivityLogStore for NoMeta {
        fn write_hot_set(&self, _: &[u32]) -> std::io::Result<()> {
            Ok(())
        }
        fn persist_extent(&self, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }
    rt().block_on(async {
        let bitmap = Arc::new(Mutex::new(DirtyBitmap::new(SIZE, BLOCK)));
        let al = tandem_replicator::ActivityLog::new(SIZE / 4, 4, Arc::new(NoMeta), &[]);
        let volume = Volume::with_activity_log(
            Arc::new(MemStore::new(SIZE)),
            vec![PeerConfig {
                name: "beta".into(),
                mode: Mode::Async,
                bitmap,
                backlog: None,
                ack_latency: Default::default(),
            }],
            1,
            Duration::from_secs(30),
            Some(al.clone()),
            Default::default(),
        );
        let (a, b, ctl) = sim_pair(SimOptions { latency: Duration::ZERO });
        let applier = Applier::new(TargetState::new(Arc::new(MemStore::new(SIZE)), Arc::default()));
        let applier = tokio::spawn(async move { applier.run(b).await });
        let _peer = volume.attach_peer("beta", a).unwrap();
        ctl.freeze();
        // Completes at once (async), but the peer has not got it.
        volume.submit_write(0, payload(0, 1, 1, 0)).unwrap().await.unwrap();
        for _ in 0..3 {
            al.cool().unwrap();
        }
        assert_eq!(al.hot_extents(), vec![0], "an extent left the log while a peer lacked a write to it");
        ctl.thaw();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while volume.peers()[0].pending_requests > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the peer never acknowledged");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..3 {
            al.cool().unwrap();
        }
        assert!(al.hot_extents().is_empty(), "{:?}", al.hot_extents());
        applier.abort();
    });
}

/// An async peer with a 16-block backlog.
fn backlog_pair(when_full: BacklogPolicy) -> Pair {
    let backlog = Some(Backlog { limit: 16 * BLOCK, when_full });
    pair_with_backlog(Mode::Async, Duration::ZERO, Duration::from_millis(300), backlog)
}

/// An async peer that cannot keep up never holds the application: past its backlog it is
/// left behind (ahead), what it misses goes to its bitmap, and once it has drained data
/// flows to it again. An async peer is not dropped for slow acks (no timeout).
#[test]
fn async_backlog_overflow_goes_ahead_then_drains() {
    rt().block_on(async {
        let Pair { volume, bitmap, ctl, peer, .. } = backlog_pair(BacklogPolicy::Ahead);
        ctl.freeze();
        for i in 0..32u64 {
            let w = volume.submit_write(i * BLOCK, payload(i, 1, 3, i as usize)).unwrap();
            tokio::time::timeout(Duration::from_secs(1), w).await.expect("an async write waited").unwrap();
        }
        let p = &volume.peers()[0];
        assert!(p.ahead && p.connected, "{p:?}");
        assert_eq!(p.lag_bytes, 16 * BLOCK);
        assert_eq!(bitmap.lock().unwrap().count(), 16, "the writes past the backlog are tracked");
        assert!((16..32).all(|b| bitmap.lock().unwrap().is_set(b)));
        // Longer than the timeout: an async peer is not dropped for slow acks.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(volume.peers()[0].connected);
        let mut drained = peer.backlog_drained();
        ctl.thaw();
        tokio::time::timeout(Duration::from_secs(10), drained.changed())
            .await
            .expect("never drained")
            .unwrap();
        let p = &volume.peers()[0];
        assert!(!p.ahead && p.lag_bytes == 0, "{p:?}");
        // Data flows again.
        volume.submit_write(40 * BLOCK, payload(40, 1, 3, 40)).unwrap().await.unwrap();
        assert!(!bitmap.lock().unwrap().is_set(40));
    });
}

/// With `block`, a full backlog makes writes wait for the peer's disk instead.
#[test]
fn async_backlog_overflow_blocks_when_told_to() {
    rt().block_on(async {
        let Pair { volume, bitmap, ctl, peer: _peer, .. } = backlog_pair(BacklogPolicy::Block);
        ctl.freeze();
        for i in 0..16u64 {
            volume.submit_write(i * BLOCK, payload(i, 1, 4, i as usize)).unwrap().await.unwrap();
        }
        let w = tokio::spawn(volume.submit_write(16 * BLOCK, payload(16, 1, 4, 16)).unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!w.is_finished(), "a write past the backlog completed while the peer was frozen");
        ctl.thaw();
        tokio::time::timeout(Duration::from_secs(10), w).await.expect("still waiting").unwrap().unwrap();
        assert_eq!(bitmap.lock().unwrap().count(), 0, "nothing was left behind");
        assert!(!volume.peers()[0].ahead);
    });
}

/// The ack-latency histogram times each request a peer acknowledges durably, once — the
/// count the metrics export is the number of replicated requests, not of ack frames.
#[tokio::test]
async fn every_durable_ack_is_timed_once() {
    let ack_latency = Arc::new(LatencyHistogram::default());
    let primary_disk = Arc::new(MemStore::new(SIZE));
    let standby_disk = Arc::new(MemStore::new(SIZE));
    let bitmap = Arc::new(Mutex::new(DirtyBitmap::new(SIZE, BLOCK)));
    let volume = Volume::new(
        primary_disk,
        vec![PeerConfig {
            name: "beta".into(),
            mode: Mode::Sync,
            bitmap,
            backlog: None,
            ack_latency: ack_latency.clone(),
        }],
        1,
        Duration::from_secs(5),
    );
    let (a, b, _ctl) = sim_pair(SimOptions { latency: Duration::from_millis(1) });
    let applier = Applier::new(TargetState::new(standby_disk, Arc::new(ApplierStats::default())));
    tokio::spawn(async move { applier.run(b).await });
    let _peer = volume.attach_peer("beta", a).unwrap();
    for i in 0..20u64 {
        volume
            .submit_write((i % BLOCKS) * BLOCK, Bytes::from(vec![i as u8; BLOCK as usize]))
            .unwrap()
            .await
            .unwrap();
        if i % 7 == 0 {
            volume.submit_flush().await.unwrap();
        }
    }
    let s = ack_latency.snapshot();
    assert_eq!(s.count, 23, "20 writes and 3 flushes, each acknowledged once: {s:?}");
    assert!(s.sum_secs >= 23.0 * 0.001, "each waited for the simulated link: {s:?}");
}
