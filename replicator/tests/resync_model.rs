//! Engine harness for dirty tracking and resync: random writes through a primary with an
//! activity log, a cut link, a simulated crash, and resyncs while the application writes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tandem_replicator::resync::rate::RateSettings;
use tandem_replicator::resync::source::{ResyncSource, StoreReader};
use tandem_replicator::resync::stats::ResyncStats;
use tandem_replicator::sim::{sim_pair, SimOptions};
use tandem_replicator::*;

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 128;
const SIZE: u64 = BLOCK * BLOCKS;
/// Small extents and a small log, so eviction happens constantly.
const EXTENT: u64 = 8 * BLOCK;
const AL_CAPACITY: usize = 3;

/// What the metadata file would hold: the hot set and the persisted bitmap bits.
struct MemMeta {
    bitmap: Arc<Mutex<DirtyBitmap>>,
    hot: Mutex<Vec<u32>>,
    persisted: Mutex<DirtyBitmap>,
}

impl ActivityLogStore for MemMeta {
    fn write_hot_set(&self, extents: &[u32]) -> std::io::Result<()> {
        *self.hot.lock().unwrap() = extents.to_vec();
        Ok(())
    }
    fn persist_extent(&self, extent: u32) -> std::io::Result<()> {
        let live = self.bitmap.lock().unwrap();
        let mut p = self.persisted.lock().unwrap();
        let first = extent as u64 * EXTENT / BLOCK;
        for bit in first..(first + EXTENT / BLOCK).min(BLOCKS) {
            if live.is_set(bit) {
                p.set_bit(bit);
            } else {
                p.clear_bit(bit);
            }
        }
        Ok(())
    }
}

impl MemMeta {
    /// What recovery after a crash of the primary would consider possibly different.
    fn recovered(&self) -> BTreeSet<u64> {
        let mut s: BTreeSet<u64> =
            (0..BLOCKS).filter(|b| self.persisted.lock().unwrap().is_set(*b)).collect();
        for e in self.hot.lock().unwrap().iter() {
            let first = *e as u64 * EXTENT / BLOCK;
            s.extend(first..(first + EXTENT / BLOCK).min(BLOCKS));
        }
        s
    }
}

fn block(at: u64, tag: u64) -> Bytes {
    let mut v = vec![(tag % 251) as u8; BLOCK as usize];
    v[..8].copy_from_slice(&(at * BLOCK).to_le_bytes());
    v[8..16].copy_from_slice(&tag.to_le_bytes());
    Bytes::from(v)
}

fn differing(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    (0..BLOCKS)
        .filter(|blk| {
            let r = (*blk * BLOCK) as usize..((*blk + 1) * BLOCK) as usize;
            a[r.clone()] != b[r]
        })
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

struct Setup {
    primary: Arc<MemStore>,
    standby: Arc<MemStore>,
    bitmap: Arc<Mutex<DirtyBitmap>>,
    meta: Arc<MemMeta>,
    volume: Arc<Volume>,
    target: Arc<TargetState>,
}

fn setup() -> Setup {
    let primary = Arc::new(MemStore::new(SIZE));
    let standby = Arc::new(MemStore::new(SIZE));
    let bitmap = Arc::new(Mutex::new(DirtyBitmap::new(SIZE, BLOCK)));
    let meta = Arc::new(MemMeta {
        bitmap: bitmap.clone(),
        hot: Mutex::new(vec![]),
        persisted: Mutex::new(DirtyBitmap::new(SIZE, BLOCK)),
    });
    let al = ActivityLog::new(EXTENT, AL_CAPACITY, meta.clone(), &[]);
    let volume = Volume::with_activity_log(
        primary.clone(),
        vec![PeerConfig {
            name: "beta".into(),
            mode: Mode::Sync,
            bitmap: bitmap.clone(),
            backlog: None,
            ack_latency: Default::default(),
        }],
        1,
        Duration::from_secs(30),
        Some(al),
        Default::default(),
    );
    let target = TargetState::new(standby.clone(), Arc::new(ApplierStats::default()));
    Setup { primary, standby, bitmap, meta, volume, target }
}

/// Connects the replication stream; returns the link control.
fn connect(s: &Setup) -> Arc<tandem_replicator::sim::SimControl> {
    let (a, b, ctl) = sim_pair(SimOptions { latency: Duration::from_micros(300) });
    let applier = Applier::new(s.target.clone());
    tokio::spawn(async move { applier.run(b).await });
    s.volume.attach_peer("beta", a).unwrap();
    ctl
}

async fn resync(s: &Setup, checksum: bool) -> Arc<ResyncStats> {
    let (a, b, _ctl) = sim_pair(SimOptions { latency: Duration::from_micros(300) });
    let stats = Arc::new(ResyncStats::default());
    let src = ResyncSource {
        reader: s.volume.clone(),
        bitmap: s.bitmap.clone(),
        checksum,
        rate: RateSettings::default(),
        stats: stats.clone(),
    };
    s.target.begin_resync();
    let target = s.target.clone();
    let t = tokio::spawn(async move { tandem_replicator::resync::target::run(&target, b).await });
    src.run(a).await.expect("resync completes");
    drop(src);
    let _ = t.await;
    s.target.end_resync();
    stats
}

async fn write_all(volume: &Arc<Volume>, writes: &[(u64, u64)], window: usize) {
    let mut js = tokio::task::JoinSet::new();
    for (at, tag) in writes {
        while js.len() >= window {
            js.join_next().await.unwrap().unwrap();
        }
        let f = volume.submit_write(at * BLOCK, block(*at, *tag)).unwrap();
        js.spawn(async move { f.await.unwrap() });
        if tag % 7 == 0 {
            let f = volume.submit_flush();
            js.spawn(async move { f.await.unwrap() });
        }
    }
    while let Some(r) = js.join_next().await {
        r.unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Cut the link, keep writing, "crash" the primary at a random moment with requests in
    /// flight: what recovery would find (persisted bits ∪ hot extents) covers every block
    /// where the two images differ. Then a resync from that recovered set makes them equal.
    #[test]
    fn recovered_dirty_set_covers_every_difference(
        before in proptest::collection::vec(0..BLOCKS, 0..40),
        after in proptest::collection::vec(0..BLOCKS, 1..60),
        crash_after in 0usize..60,
    ) {
        rt().block_on(async {
            let s = setup();
            let ctl = connect(&s);
            let w: Vec<(u64, u64)> = before.iter().enumerate().map(|(i, b)| (*b, i as u64 + 1)).collect();
            write_all(&s.volume, &w, 8).await;
            ctl.cut();
            // Requests after the cut, concurrently; the crash lands in the middle of them.
            let crash_at = crash_after.min(after.len());
            let mut js = tokio::task::JoinSet::new();
            for (i, b) in after.iter().enumerate() {
                let f = s.volume.submit_write(b * BLOCK, block(*b, 1000 + i as u64)).unwrap();
                js.spawn(async move { f.await.unwrap() });
                if i == crash_at {
                    break;
                }
            }
            tokio::task::yield_now().await;
            // The crash: the disks as they are now, then the metadata as it is now.
            let p = s.primary.snapshot();
            let q = s.standby.snapshot();
            let recovered = s.meta.recovered();
            for blk in differing(&p, &q) {
                prop_assert!(recovered.contains(&blk), "block {} differs but recovery would not resync it", blk);
            }
            while js.join_next().await.is_some() {}
            // Recovery: the bitmap becomes what the metadata says; resync from the primary.
            {
                let mut bm = s.bitmap.lock().unwrap();
                bm.clear_all();
                for blk in &recovered {
                    bm.set_bit(*blk);
                }
                // The primary went on writing after the snapshot: those blocks are marked too.
                for blk in differing(&s.primary.snapshot(), &s.standby.snapshot()) {
                    prop_assert!(bm.is_set(blk) || s.meta.recovered().contains(&blk));
                    bm.set_bit(blk);
                }
            }
            let stats = resync(&s, false).await;
            prop_assert_eq!(s.primary.snapshot(), s.standby.snapshot());
            prop_assert!(stats.progress().data_bytes_sent <= recovered.len() as u64 * BLOCK + SIZE);
            Ok(())
        })?;
    }

    /// The application keeps writing — also to blocks being resynced — while a resync runs
    /// on its own stream beside replication: both images end equal to the primary's.
    #[test]
    fn resync_under_application_writes_converges(
        missed in proptest::collection::vec(0..BLOCKS, 1..60),
        during in proptest::collection::vec(0..BLOCKS, 1..80),
        checksum in any::<bool>(),
    ) {
        rt().block_on(async {
            let s = setup();
            // The peer is away: these writes are only tracked.
            let w: Vec<(u64, u64)> = missed.iter().enumerate().map(|(i, b)| (*b, i as u64 + 1)).collect();
            write_all(&s.volume, &w, 8).await;
            prop_assert!(s.bitmap.lock().unwrap().count() > 0);
            // Reconnect: replication resumes, and the resync runs at the same time as new writes.
            let _ctl = connect(&s);
            let v = s.volume.clone();
            let d: Vec<(u64, u64)> = during.iter().enumerate().map(|(i, b)| (*b, 10_000 + i as u64)).collect();
            let writer = tokio::spawn(async move { write_all(&v, &d, 8).await });
            resync(&s, checksum).await;
            writer.await.unwrap();
            // Replicated writes are durable when they complete (sync mode).
            prop_assert_eq!(s.bitmap.lock().unwrap().count(), 0);
            prop_assert_eq!(differing(&s.primary.snapshot(), &s.standby.snapshot()), BTreeSet::new());
            Ok(())
        })?;
    }
}

/// Checksum mode sends only the blocks that differ.
#[test]
fn checksum_resync_sends_only_differences() {
    rt().block_on(async {
        let s = setup();
        // Both copies hold the same data, except 3 blocks on the standby.
        for b in 0..BLOCKS {
            s.primary.write_at(b * BLOCK, &block(b, 1)).unwrap();
            s.standby.write_at(b * BLOCK, &block(b, if b % 40 == 5 { 2 } else { 1 })).unwrap();
        }
        s.bitmap.lock().unwrap().set_all();
        let stats = resync(&s, true).await;
        assert_eq!(s.primary.snapshot(), s.standby.snapshot());
        let p = stats.progress();
        assert_eq!(p.data_bytes_sent, 4 * BLOCK, "{p:?}");
        assert_eq!(p.equal_bytes, SIZE - 4 * BLOCK);
        assert_eq!(p.hash_bytes_sent, BLOCKS * 16);
    });
}

/// A source that is not primary (no volume) resyncs from its store.
#[test]
fn secondary_source_resyncs_from_its_store() {
    rt().block_on(async {
        let s = setup();
        for b in (0..BLOCKS).step_by(3) {
            s.primary.write_at(b * BLOCK, &block(b, 9)).unwrap();
            s.bitmap.lock().unwrap().set_bit(b);
        }
        let (a, b, _ctl) = sim_pair(SimOptions::default());
        let src = ResyncSource {
            reader: Arc::new(StoreReader::new(s.primary.clone())),
            bitmap: s.bitmap.clone(),
            checksum: false,
            rate: RateSettings { max_rate: Some(64 << 20), min_rate: 1 << 20 },
            stats: Arc::new(ResyncStats::default()),
        };
        let target = s.target.clone();
        let t = tokio::spawn(async move { tandem_replicator::resync::target::run(&target, b).await });
        src.run(a).await.unwrap();
        drop(src);
        t.await.unwrap().unwrap();
        assert_eq!(s.primary.snapshot(), s.standby.snapshot());
    });
}
