//! The snapshot chain against a model: every snapshot, read at any time, shows exactly
//! the live copy as it was when the snapshot was taken — through writes, discards, deletions
//! of any snapshot, restores, a reopening (crash) and a full disk.

use std::sync::Arc;

use proptest::prelude::*;
use tandem_replicator::{BlockStore, MemStore};

use super::cow::BLOCK;
use super::*;

const BLOCKS: u64 = 48;

#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, len: u64, tag: u8 },
    Discard { at: u64, len: u64 },
    Snapshot,
    Delete(usize),
    Restore(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1..6u64, any::<u8>()).prop_map(|(at, len, tag)| Op::Write { at, len: len.min(BLOCKS - at), tag }),
        1 => (0..BLOCKS, 1..4u64).prop_map(|(at, len)| Op::Discard { at, len: len.min(BLOCKS - at) }),
        2 => Just(Op::Snapshot),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => any::<usize>().prop_map(Op::Restore),
        1 => Just(Op::Reopen),
    ]
}

fn block_data(at: u64, tag: u8, i: u64) -> Vec<u8> {
    let mut v = vec![tag; BLOCK as usize];
    v[..8].copy_from_slice(&(at + i).to_le_bytes());
    v
}

fn read_all(store: &SnapshotStore, name: &str) -> Vec<u8> {
    let mut buf = vec![0u8; (BLOCKS * BLOCK) as usize];
    store.read(name, 0, &mut buf).unwrap();
    buf
}

fn check(store: &SnapshotStore, model: &[(String, Vec<u8>)], live: &MemStore) {
    for (name, want) in model {
        assert!(read_all(store, name) == *want, "snapshot {name} no longer shows its instant");
    }
    let names: Vec<String> = store.list().into_iter().map(|i| i.record.name).collect();
    assert_eq!(names, model.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), "chain order");
    assert_eq!(live.snapshot().len() as u64, BLOCKS * BLOCK);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn every_snapshot_shows_its_instant(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let live = Arc::new(MemStore::new(BLOCKS * BLOCK));
        let (mut store, _) = SnapshotStore::open(live.clone(), dir.path()).unwrap();
        let mut model: Vec<(String, Vec<u8>)> = Vec::new();
        let mut n = 0;
        for op in ops {
            match op {
                Op::Write { at, len, tag } => {
                    let data: Vec<u8> = (0..len).flat_map(|i| block_data(at, tag, i)).collect();
                    if tag % 2 == 0 {
                        store.write_at(at * BLOCK, &data).unwrap();
                    } else {
                        // As a lone primary submits its concurrent writes.
                        let (tx, rx) = std::sync::mpsc::channel();
                        store.submit_write(at * BLOCK, data.into(), Box::new(move |r| tx.send(r).unwrap()));
                        rx.recv().unwrap().unwrap();
                    }
                }
                Op::Discard { at, len } => store.discard(at * BLOCK, len * BLOCK).unwrap(),
                Op::Snapshot => {
                    n += 1;
                    let name = format!("s{n}");
                    store.create(&name, SnapshotKind::Manual, n, true, "0".into()).unwrap();
                    model.push((name, live.snapshot()));
                }
                Op::Delete(i) if !model.is_empty() => {
                    let (name, _) = model.remove(i % model.len());
                    store.delete(&name).unwrap();
                }
                Op::Restore(i) if !model.is_empty() => {
                    let (name, want) = model[i % model.len()].clone();
                    let before = live.snapshot();
                    let changed = store.restore(&name).unwrap();
                    prop_assert!(live.snapshot() == want, "restore of {} left another state", name);
                    // Only the blocks it reported can differ from before.
                    for b in 0..BLOCKS {
                        let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
                        if before[r.clone()] != want[r] {
                            prop_assert!(changed.contains(&b), "block {} changed but not reported", b);
                        }
                    }
                }
                Op::Reopen => {
                    drop(store);
                    store = SnapshotStore::open(live.clone(), dir.path()).unwrap().0;
                }
                _ => {}
            }
            check(&store, &model, &live);
        }
    }
}

#[test]
fn a_write_costs_one_copy_however_many_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let live = Arc::new(MemStore::new(BLOCKS * BLOCK));
    let (store, _) = SnapshotStore::open(live.clone(), dir.path()).unwrap();
    for i in 0..10 {
        store.create(&format!("s{i}"), SnapshotKind::Manual, i, true, "0".into()).unwrap();
    }
    store.write_at(0, &vec![1u8; (4 * BLOCK) as usize]).unwrap();
    let held: Vec<u64> = store.list().iter().map(|i| i.blocks).collect();
    assert_eq!(held, vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 4], "only the newest copies");
    // Every one of them still shows zeroes there.
    for i in 0..10 {
        assert!(read_all(&store, &format!("s{i}")).iter().all(|b| *b == 0));
    }
}

#[test]
fn an_interrupted_deletion_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let live = Arc::new(MemStore::new(BLOCKS * BLOCK));
    let (store, _) = SnapshotStore::open(live.clone(), dir.path()).unwrap();
    store.create("old", SnapshotKind::Manual, 1, true, "0".into()).unwrap();
    store.write_at(0, &vec![1u8; BLOCK as usize]).unwrap();
    store.create("new", SnapshotKind::Manual, 2, true, "0".into()).unwrap();
    store.write_at(BLOCK, &vec![2u8; BLOCK as usize]).unwrap();
    let old_view = read_all(&store, "old");
    // The crash: "new" marked deleting, its blocks not yet handed over.
    let (mut f, mut r) = record::RecordFile::open(&dir.path().join("new.snap")).unwrap();
    r.deleting = true;
    f.update(&r).unwrap();
    drop(store);
    let (store, warnings) = SnapshotStore::open(live, dir.path()).unwrap();
    assert!(warnings.iter().any(|w| w.contains("finishing the deletion")), "{warnings:?}");
    assert_eq!(store.list().len(), 1);
    assert_eq!(read_all(&store, "old"), old_view);
    assert!(!dir.path().join("new.cow").exists());
}

#[test]
fn bad_names_and_unknown_snapshots_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = SnapshotStore::open(Arc::new(MemStore::new(BLOCKS * BLOCK)), dir.path()).unwrap();
    for bad in ["", "../x", ".hidden", "-x", "a b", &"x".repeat(65)] {
        let e = store.create(bad, SnapshotKind::Manual, 0, true, "0".into()).unwrap_err();
        assert!(matches!(e, SnapshotError::BadName(_)), "{bad:?}: {e}");
    }
    store.create("a", SnapshotKind::Manual, 0, true, "0".into()).unwrap();
    let e = store.create("a", SnapshotKind::Manual, 0, true, "0".into()).unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    let e = store.delete("nope").unwrap_err();
    assert_eq!(e.to_string(), "no snapshot \"nope\" (snapshots: a)");
    let mut buf = vec![0u8; 10];
    assert!(store.read("nope", 0, &mut buf).is_err());
}

/// The newest snapshot's block file cannot grow (a full disk): the snapshots that can no
/// longer show their instant are marked invalid and say why; the live copy gets every write.
#[test]
fn a_full_snapshot_disk_invalidates_snapshots_never_the_live_copy() {
    let dir = tempfile::tempdir().unwrap();
    let live = Arc::new(MemStore::new(BLOCKS * BLOCK));
    let (store, _) = SnapshotStore::open(live.clone(), dir.path()).unwrap();
    store.create("older", SnapshotKind::Manual, 1, true, "0".into()).unwrap();
    store.write_at(0, &vec![1u8; BLOCK as usize]).unwrap(); // "older" holds block 0
    store.create("newer", SnapshotKind::Manual, 2, true, "0".into()).unwrap();
    store.newest_fails_to_grow();
    // Block 0: "newer" loses it; "older" has its own copy.
    store.write_at(0, &vec![2u8; BLOCK as usize]).unwrap();
    let states: Vec<bool> = store.list().iter().map(|i| i.record.state == SnapshotState::Valid).collect();
    assert_eq!(states, vec![true, false]);
    let older_view = read_all(&store, "older");
    assert_eq!(&older_view[..BLOCK as usize], &vec![0u8; BLOCK as usize][..]);
    // Block 5: neither holds it; "older" saw it through "newer".
    store.write_at(5 * BLOCK, &vec![3u8; BLOCK as usize]).unwrap();
    let list = store.list();
    assert!(list.iter().all(|i| matches!(&i.record.state, SnapshotState::Invalid { reason } if reason.contains("No space left"))), "{list:?}");
    let e = store.read("older", 0, &mut vec![0u8; 4096]).unwrap_err();
    assert!(e.to_string().contains("is invalid"), "{e}");
    assert!(store.restore("older").is_err());
    // The live copy has every write, and the invalid state survives a restart.
    let img = live.snapshot();
    assert_eq!(img[0], 2);
    assert_eq!(img[(5 * BLOCK) as usize], 3);
    drop(store);
    let (store, _) = SnapshotStore::open(live, dir.path()).unwrap();
    assert!(store.list().iter().all(|i| i.record.state != SnapshotState::Valid));
}

#[test]
fn a_deletion_hands_over_more_than_one_batch_of_blocks() {
    // More blocks than one hand-over batch (256), some of them held by the older snapshot
    // already, so the batches are not aligned with the victim's blocks.
    let n = 700u64;
    let dir = tempfile::tempdir().unwrap();
    let live = Arc::new(MemStore::new(n * BLOCK));
    let (store, _) = SnapshotStore::open(live.clone(), dir.path()).unwrap();
    let all = |store: &SnapshotStore, name: &str| {
        let mut buf = vec![0u8; (n * BLOCK) as usize];
        store.read(name, 0, &mut buf).unwrap();
        buf
    };
    for b in 0..n {
        store.write_at(b * BLOCK, &block_data(b, 1, 0)).unwrap();
    }
    store.create("old", SnapshotKind::Manual, 1, true, "0".into()).unwrap();
    for b in (0..n).step_by(3) {
        store.write_at(b * BLOCK, &block_data(b, 2, 0)).unwrap();
    }
    store.create("mid", SnapshotKind::Manual, 2, true, "0".into()).unwrap();
    store.create("new", SnapshotKind::Manual, 3, true, "0".into()).unwrap();
    for b in 0..n {
        store.write_at(b * BLOCK, &block_data(b, 3, 0)).unwrap();
    }
    let (old_view, new_view) = (all(&store, "old"), all(&store, "new"));
    // "mid" holds nothing; delete "new" (all n blocks, a third of them in "old" already).
    store.delete("mid").unwrap();
    store.delete("new").unwrap();
    assert_eq!(store.list().iter().map(|i| i.blocks).collect::<Vec<_>>(), vec![n]);
    assert!(all(&store, "old") == old_view, "the older snapshot's view changed");
    assert!(new_view != old_view);
}
