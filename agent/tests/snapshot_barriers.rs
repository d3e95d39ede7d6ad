//! The engine's replication path with snapshots on the standby, deterministic and without
//! root: a primary `Volume` writes epochs (writes, then a flush) over a simulated link to an
//! `Applier` whose store is a snapshot chain over an in-memory disk; snapshots are requested
//! through the barrier gate at random moments while epochs are in flight. Each snapshot must
//! be exactly the standby's state after some epoch (every write of epochs <= k, none later),
//! and later snapshots never older.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tandem_agent::snapshot::{SnapshotKind, SnapshotStore};
use tandem_replicator::sim::{sim_pair, SimOptions};
use tandem_replicator::{
    Applier, ApplierStats, DirtyBitmap, MemStore, Mode, PeerConfig, TargetState, Volume,
};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 32;

fn block(b: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    v
}

/// The version of every block in `image` (0: never written).
fn versions(image: &[u8]) -> Vec<u64> {
    image.chunks(BLOCK as usize).map(|c| u64::from_le_bytes(c[8..16].try_into().unwrap())).collect()
}

fn run(epochs: Vec<Vec<u64>>, snapshot_after: Vec<usize>, latency_us: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let live = Arc::new(MemStore::new(BLOCKS * BLOCK));
        let (snaps, _) = SnapshotStore::open(live.clone(), dir.path()).unwrap();
        let target = TargetState::new(snaps.clone(), Arc::new(ApplierStats::default()));
        let volume = Volume::new(
            Arc::new(MemStore::new(BLOCKS * BLOCK)),
            vec![PeerConfig {
                name: "beta".into(),
                mode: Mode::Sync,
                bitmap: Arc::new(Mutex::new(DirtyBitmap::new(BLOCKS * BLOCK, BLOCK))),
                backlog: None,
                ack_latency: Default::default(),
            }],
            1,
            Duration::from_secs(10),
        );
        let (a, b, _ctl) = sim_pair(SimOptions { latency: Duration::from_micros(latency_us) });
        let applier = Applier::new(target.clone());
        tokio::spawn(async move { applier.run(b).await });
        let _peer = volume.attach_peer("beta", a).unwrap();

        // The model: every block's version after each epoch.
        let mut state = vec![0u64; BLOCKS as usize];
        let mut after = vec![state.clone()];
        let mut versions_now = vec![0u64; BLOCKS as usize];
        let mut requested = Vec::new();
        for (e, writes) in epochs.iter().enumerate() {
            // The epoch's first writes, applied on the standby (sync: acknowledged once on
            // its disk); then a snapshot is asked for; then the rest of the epoch, in flight
            // together, and the barrier.
            let (first, rest) = writes.split_at(writes.len() / 2);
            let mut submit = |b: u64| {
                versions_now[b as usize] += 1;
                state[b as usize] = versions_now[b as usize];
                let data = Bytes::from(block(b, versions_now[b as usize]));
                volume.submit_write(b * BLOCK, data).unwrap()
            };
            let applied: Vec<_> = first.iter().map(|&b| submit(b)).collect();
            for p in applied {
                p.await.unwrap();
            }
            let pending: Vec<_> = rest.iter().map(|&b| submit(b)).collect();
            if snapshot_after.contains(&e) {
                let name = format!("s{e}");
                let (s, n) = (snaps.clone(), name.clone());
                let (tx, rx) = tokio::sync::oneshot::channel();
                let t = target.clone();
                tokio::task::spawn_blocking(move || {
                    t.barriers.at_barrier(false, move |p| {
                        let _ = tx.send(s.create(&n, SnapshotKind::Manual, p.seq, p.at_barrier, "0".into()));
                    });
                })
                .await
                .unwrap();
                requested.push((name, rx));
            }
            for p in pending {
                p.await.unwrap();
            }
            volume.submit_flush().await.unwrap();
            after.push(state.clone());
        }
        let mut last_k = 0;
        for (name, rx) in requested {
            let rec = tokio::time::timeout(Duration::from_secs(10), rx).await.unwrap().unwrap().unwrap();
            assert!(rec.at_barrier, "{name} taken between barriers");
            let mut image = vec![0u8; (BLOCKS * BLOCK) as usize];
            snaps.read(&name, 0, &mut image).unwrap();
            let v = versions(&image);
            let k = after.iter().rposition(|s| *s == v);
            let Some(k) = k else { panic!("snapshot {name} is the state after no epoch: {v:?}") };
            assert!(k >= last_k, "snapshot {name} (epoch {k}) older than the one before (epoch {last_k})");
            last_k = k;
        }
        // The standby itself holds the last epoch.
        assert_eq!(versions(&live.snapshot()), *after.last().unwrap());
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn snapshots_through_the_gate_are_each_exactly_after_an_epoch(
        epochs in prop::collection::vec(prop::collection::vec(0..BLOCKS, 2..8), 2..14),
        snapshot_after in prop::collection::vec(0usize..14, 1..6),
        latency_us in 0u64..400,
    ) {
        run(epochs, snapshot_after, latency_us);
    }
}
