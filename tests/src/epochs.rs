//! An oracle for crash consistency of a standby's image under epochs (the writes between two
//! barriers): the writer records, per epoch, which version of which block it wrote; the
//! oracle then says whether an image is the state after some epoch `k` plus part of epoch
//! `k + 1` — and nothing of any later epoch — which is what Tandem promises of every standby
//! at every instant.
//!
//! Blocks are the stamped blocks of [`crate::stamped_block`] (offset, run, version), so a
//! block's version is read from the image itself; a block that is neither all zeroes
//! (version 0, never written) nor a stamped block of this run at its own offset is garbage
//! and fits no epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

use crate::{stamped_block, Aligned, BLOCK};

/// The writes of a run, epoch by epoch. Epoch 0 is the initial state (every block version
/// 0); `epochs[i]` holds the `(block index, version)` writes of epoch `i + 1`, in order.
#[derive(Debug, Clone, Default)]
pub struct EpochLog {
    nblocks: usize,
    epochs: Vec<Vec<(usize, u64)>>,
}

/// Where an image fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixFit {
    /// The largest `k` such that the image is the state after epoch `k` plus part of epoch
    /// `k + 1`.
    pub k: usize,
    /// Every `k` that fits (several fit when an epoch left the state as it was).
    pub fitting: Vec<usize>,
    /// Of the blocks epoch `k + 1` wrote, how many already hold one of its versions.
    pub next_applied: usize,
    /// Blocks epoch `k + 1` wrote (0 if `k` is the last epoch).
    pub next_blocks: usize,
}

impl EpochLog {
    pub fn new(nblocks: usize) -> Self {
        Self { nblocks, epochs: Vec::new() }
    }

    pub fn nblocks(&self) -> usize {
        self.nblocks
    }

    /// Starts the next epoch; returns its number (1 for the first).
    pub fn begin_epoch(&mut self) -> usize {
        self.epochs.push(Vec::new());
        self.epochs.len()
    }

    /// Records a write of `version` to `block` in the current epoch.
    pub fn record(&mut self, block: usize, version: u64) {
        assert!(block < self.nblocks, "block {block} outside the log's {} blocks", self.nblocks);
        self.epochs.last_mut().expect("record before begin_epoch").push((block, version));
    }

    /// Epochs begun so far.
    pub fn epochs(&self) -> usize {
        self.epochs.len()
    }

    pub fn writes(&self) -> usize {
        self.epochs.iter().map(Vec::len).sum()
    }

    /// Every block's version after all writes of epochs `<= k`.
    pub fn state_after(&self, k: usize) -> Vec<u64> {
        let mut v = vec![0u64; self.nblocks];
        for e in &self.epochs[..k.min(self.epochs.len())] {
            for &(b, ver) in e {
                v[b] = ver;
            }
        }
        v
    }

    /// The epochs `k` after which the state is exactly `image` (all writes of epochs
    /// `<= k`, none later): what a snapshot at a barrier must show.
    pub fn exact(&self, image: &[Option<u64>]) -> Vec<usize> {
        let image: Option<Vec<u64>> = image.iter().copied().collect();
        let Some(image) = image else { return Vec::new() };
        (0..=self.epochs.len()).filter(|k| self.state_after(*k) == image).collect()
    }

    /// Checks `image` (per block: `Some(version)`, `None` for garbage) against every epoch.
    /// `Err` explains, for the epoch that comes closest, which blocks do not fit.
    pub fn check(&self, image: &[Option<u64>]) -> Result<PrefixFit, String> {
        assert_eq!(image.len(), self.nblocks, "image has {} blocks, the log {}", image.len(), self.nblocks);
        let garbage: Vec<usize> = (0..self.nblocks).filter(|b| image[*b].is_none()).collect();
        if !garbage.is_empty() {
            return Err(format!(
                "{} blocks hold neither zeroes nor a stamped block of this run at their offset, e.g. blocks {:?}",
                garbage.len(),
                &garbage[..garbage.len().min(8)]
            ));
        }
        let mut state = vec![0u64; self.nblocks];
        let mut fitting = Vec::new();
        let mut last_fit = None;
        // The closest miss: (mismatching blocks, k, a sample of (block, version after k,
        // versions epoch k + 1 wrote there)).
        type Miss = (usize, usize, Vec<(usize, u64, Vec<u64>)>);
        let mut closest: Option<Miss> = None;
        for k in 0..=self.epochs.len() {
            let mut next: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
            if let Some(e) = self.epochs.get(k) {
                for &(b, ver) in e {
                    next.entry(b).or_default().insert(ver);
                }
            }
            let mut bad = Vec::new();
            let mut applied = 0;
            for (b, img) in image.iter().enumerate() {
                let img = img.expect("garbage handled above");
                let in_next = next.get(&b).is_some_and(|s| s.contains(&img));
                if in_next && img != state[b] {
                    applied += 1;
                }
                if img != state[b] && !in_next {
                    bad.push(b);
                }
            }
            if bad.is_empty() {
                fitting.push(k);
                last_fit = Some((k, applied, next.len()));
            } else if closest.as_ref().is_none_or(|c| bad.len() < c.0) {
                let sample = bad
                    .iter()
                    .take(6)
                    .map(|&b| {
                        (b, state[b], next.get(&b).map(|s| s.iter().copied().collect()).unwrap_or_default())
                    })
                    .collect();
                closest = Some((bad.len(), k, sample));
            }
            if let Some(e) = self.epochs.get(k) {
                for &(b, ver) in e {
                    state[b] = ver;
                }
            }
        }
        if let Some((k, next_applied, next_blocks)) = last_fit {
            return Ok(PrefixFit { k, fitting, next_applied, next_blocks });
        }
        let (n, k, sample) = closest.expect("at least epoch 0 was tried");
        let written_in = |b: usize, v: u64| {
            self.epochs
                .iter()
                .position(|e| e.contains(&(b, v)))
                .map_or("no epoch".to_string(), |i| format!("epoch {}", i + 1))
        };
        let details: Vec<String> = sample
            .into_iter()
            .map(|(b, after_k, next)| {
                let img = image[b].expect("not garbage");
                format!(
                    "block {b}: image v{img} (written in {}), after epoch {k} v{after_k}, epoch {} wrote {next:?}",
                    written_in(b, img),
                    k + 1
                )
            })
            .collect();
        Err(format!(
            "no epoch fits: the closest, k = {k} of {} epochs, has {n} blocks that hold neither their state \
             after epoch {k} nor a version epoch {} wrote: {}",
            self.epochs.len(),
            k + 1,
            details.join("; ")
        ))
    }
}

/// The version of every block of the region `[base, base + nblocks * BLOCK)` of `image`:
/// `Some(0)` for a zero block, `Some(v)` for the stamped block of `run` at that offset with
/// version `v`, `None` for anything else.
pub fn read_versions(image: &Path, base: u64, nblocks: usize, run: u64) -> Vec<Option<u64>> {
    let f = std::fs::File::open(image).unwrap_or_else(|e| panic!("open {}: {e}", image.display()));
    let mut buf = vec![0u8; nblocks * BLOCK];
    f.read_exact_at(&mut buf, base).unwrap_or_else(|e| panic!("read {}: {e}", image.display()));
    buf.chunks(BLOCK)
        .enumerate()
        .map(|(i, b)| {
            let off = base + (i * BLOCK) as u64;
            if b.iter().all(|x| *x == 0) {
                return Some(0);
            }
            let v = u64::from_le_bytes(b[24..32].try_into().unwrap());
            (v > 0 && b == stamped_block(off, run, v).as_slice()).then_some(v)
        })
        .collect()
}

/// The writer's side: the epoch log, and a pause at epoch boundaries.
#[derive(Default)]
pub struct EpochWriter {
    pub log: Mutex<EpochLog>,
    /// The epoch being written or flushed (0 before the first).
    pub current: AtomicUsize,
    pause: AtomicBool,
    paused: AtomicBool,
    pub stop: AtomicBool,
}

impl EpochWriter {
    /// A writer over the first `nblocks` blocks of the device.
    pub fn new(nblocks: usize) -> Self {
        Self { log: Mutex::new(EpochLog::new(nblocks)), ..Default::default() }
    }

    /// Asks the writer to stop at the next epoch boundary and waits until it has.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.paused.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the writer did not reach an epoch boundary in 60 s");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.pause.store(false, Ordering::SeqCst);
    }
}

/// Writes epochs until stopped: returns the number of epochs and writes, or the error.
/// Writes epochs of stamped blocks to `dev` until `shared.stop` is set at a pause: each a
/// batch of 1 to 24 writes to random blocks of the log's region (half the epochs from four
/// threads at once, to distinct blocks), then an fsync of the device — the barrier. Returns
/// the number of epochs and writes, or the error.
pub fn write_epochs(
    dev: String,
    run: u64,
    seed: u64,
    shared: Arc<EpochWriter>,
) -> Result<(usize, usize), String> {
    let nblocks = shared.log.lock().unwrap().nblocks();
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .map_err(|e| format!("open {dev}: {e}"))?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut versions = vec![0u64; nblocks];
    let mut writes = 0;
    let write = |f: &File, b: usize, v: u64| -> Result<(), String> {
        let off = (b * BLOCK) as u64;
        let a = Aligned::new(&stamped_block(off, run, v));
        f.write_all_at(a.slice(BLOCK), off).map_err(|e| format!("write block {b} v{v}: {e}"))
    };
    loop {
        while shared.pause.load(Ordering::SeqCst) {
            shared.paused.store(true, Ordering::SeqCst);
            if shared.stop.load(Ordering::SeqCst) {
                return Ok((shared.log.lock().unwrap().epochs(), writes));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The epoch's writes are in the log before they are issued: the standby may have
        // any of them once they are.
        let n = rng.random_range(1..=24);
        let concurrent = rng.random_bool(0.5);
        let batch: Vec<(usize, u64)> = {
            let mut log = shared.log.lock().unwrap();
            let e = log.begin_epoch();
            shared.current.store(e, Ordering::SeqCst);
            let blocks: Vec<usize> = if concurrent {
                // Distinct blocks: concurrent writes to one block would have no defined order.
                sample(&mut rng, nblocks, n).into_vec()
            } else {
                (0..n).map(|_| rng.random_range(0..nblocks)).collect()
            };
            blocks
                .into_iter()
                .map(|b| {
                    versions[b] += 1;
                    log.record(b, versions[b]);
                    (b, versions[b])
                })
                .collect()
        };
        if concurrent {
            std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .chunks(batch.len().div_ceil(4))
                    .map(|part| s.spawn(|| part.iter().try_for_each(|&(b, v)| write(&f, b, v))))
                    .collect();
                handles.into_iter().try_for_each(|h| h.join().expect("writer thread panicked"))
            })?;
        } else {
            batch.iter().try_for_each(|&(b, v)| write(&f, b, v))?;
        }
        writes += batch.len();
        // The barrier: the loop device turns it into a FUSE fsync on the primary.
        f.sync_all().map_err(|e| format!("fsync {dev}: {e}"))?;
    }
}
