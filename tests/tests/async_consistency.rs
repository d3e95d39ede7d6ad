//! Prefix consistency of an `async` standby, checked against an oracle.
//!
//! - `oracle_*`: the oracle itself (`tandem_tests::epochs`) on made-up images — it accepts
//!   every legal state and rejects the illegal ones (no root needed).
//! - `async_standby_killed_at_random_is_always_a_prefix`: alpha, primary in `async` mode,
//!   writes versioned stamped blocks straight to its device (O_DIRECT, no filesystem) in
//!   epochs: a batch of writes to random blocks of a small region (so blocks are
//!   overwritten from epoch to epoch; half the epochs issue their writes concurrently from
//!   four threads), then an fsync of the device — the barrier. At a random instant the
//!   standby's agent (beta) is killed with `kill -9` and its image file is read directly:
//!   there must be a `k` such that every block holds its state after epoch `k`, except
//!   blocks written in epoch `k + 1`, which may hold one of the versions written then —
//!   and nothing from a later epoch. Then beta restarts, is resynced (the primary marked
//!   what it had not acknowledged), must then hold exactly the primary's state, and the
//!   next iteration starts. Only kills of a standby that was replicating (established, 0
//!   out of sync, up to date — not in a resync, which does not keep write order) are
//!   checked; the test fails if more than a quarter are not.
//!
//! `TANDEM_SOAK_ITERATIONS` (default 10) sets the number of kills, `TANDEM_ASYNC_SEED`
//! repeats a run. Figures are printed; see them with `--nocapture`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_agent::status::ResourceStatus;
use tandem_tests::epochs::{read_versions, write_epochs, EpochLog, EpochWriter};
use tandem_tests::lab::LabOptions;
use tandem_tests::*;

const MIB: u64 = 1 << 20;
/// The region the load overwrites: 2 MiB at the start of the device.
const NBLOCKS: usize = 512;

// ---------------------------------------------------------------------------------------
// The oracle on made-up images.

fn log_of(epochs: &[&[(usize, u64)]]) -> EpochLog {
    let mut log = EpochLog::new(4);
    for e in epochs {
        log.begin_epoch();
        for &(b, v) in *e {
            log.record(b, v);
        }
    }
    log
}

fn img(v: &[u64]) -> Vec<Option<u64>> {
    v.iter().map(|x| Some(*x)).collect()
}

#[test]
fn oracle_accepts_every_prefix_and_partial_next_epoch() {
    // Epoch 1: blocks 0 and 1; epoch 2: block 1 twice and block 2; epoch 3: block 0.
    let log = log_of(&[&[(0, 1), (1, 1)], &[(1, 2), (1, 3), (2, 1)], &[(0, 2)]]);
    let k = |v: &[u64]| log.check(&img(v)).map(|f| f.k);
    assert_eq!(k(&[0, 0, 0, 0]), Ok(0));
    assert_eq!(k(&[1, 0, 0, 0]), Ok(0), "part of epoch 1");
    assert_eq!(k(&[1, 1, 0, 0]), Ok(1));
    assert_eq!(k(&[1, 2, 0, 0]), Ok(1), "epoch 2's first write to block 1 only");
    assert_eq!(k(&[1, 1, 1, 0]), Ok(1), "epoch 2's block 2 without its block 1");
    assert_eq!(k(&[1, 3, 1, 0]), Ok(2));
    assert_eq!(k(&[2, 3, 1, 0]), Ok(3));
    let fit = log.check(&img(&[1, 2, 1, 0])).unwrap();
    assert_eq!((fit.k, fit.next_applied, fit.next_blocks), (1, 2, 2));
}

#[test]
fn oracle_rejects_what_no_prefix_explains() {
    let log = log_of(&[&[(0, 1), (1, 1)], &[(1, 2), (1, 3), (2, 1)], &[(0, 2)]]);
    let bad = |v: &[Option<u64>]| log.check(v).expect_err(&format!("{v:?} was accepted"));
    // Epoch 3's write without all of epoch 2 (block 2 missing).
    eprintln!("{}", bad(&img(&[2, 3, 0, 0])));
    // Epoch 3's write without epoch 1's block 1.
    bad(&img(&[2, 0, 0, 0]));
    // A version that was never written, an old version reappearing, garbage.
    bad(&img(&[1, 4, 1, 0]));
    bad(&img(&[0, 0, 0, 1]));
    bad(&[Some(1), Some(3), None, Some(0)]);
    // Two epochs ahead of the state: epoch 1 partial and epoch 2's block 2.
    bad(&img(&[1, 0, 1, 0]));
}

// ---------------------------------------------------------------------------------------
// The real thing.

fn replicating(a: &ResourceStatus) -> bool {
    a.peers.iter().all(|p| {
        p.connection == "connected"
            && p.replication == "established"
            && p.out_of_sync_bytes == 0
            && p.peer_disk == Some(tandem_agent::status::DiskState::UpToDate)
    })
}

fn converged(a: &ResourceStatus) -> bool {
    replicating(a) && a.peers.iter().all(|p| p.pending_requests == 0)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn async_standby_killed_at_random_is_always_a_prefix() {
    let seed = env_u64("TANDEM_ASYNC_SEED").unwrap_or_else(rand::random);
    let iterations = env_u64("TANDEM_SOAK_ITERATIONS").unwrap_or(10) as usize;
    println!("TANDEM_ASYNC_SEED={seed} TANDEM_SOAK_ITERATIONS={iterations}");
    let opts = LabOptions {
        size: 32 * MIB,
        mode: "async".into(),
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let mut lab = new_lab(&["alpha", "beta"], &opts);
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    lab.wait_connected("alpha", secs(30)).unwrap();
    assert!(lab.promote("alpha", false).unwrap().ok);
    let dev = wait_until(&lab, "alpha", "beta replicating", secs(30), converged).device.expect("device");

    let run = seed;
    let shared = Arc::new(EpochWriter::new(NBLOCKS));
    let w = {
        let (dev, shared) = (dev.clone(), shared.clone());
        std::thread::spawn(move || write_epochs(dev, run, seed, shared))
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut checked, mut skipped) = (0usize, Vec::new());
    let mut violations = Vec::new();
    let t_all = Instant::now();
    for it in 1..=iterations {
        shared.resume();
        std::thread::sleep(Duration::from_millis(rng.random_range(150..1500)));
        // Only a standby that is replicating (not being resynced) must be a prefix.
        let a = lab.resource_status("alpha").unwrap();
        let b = lab.resource_status("beta").unwrap();
        let eligible = replicating(&a) && b.disk == "up_to_date";
        let epoch_before = shared.current.load(Ordering::SeqCst);
        lab.kill9("beta").unwrap();
        let epoch_at_kill = shared.current.load(Ordering::SeqCst);
        shared.pause();
        let log = shared.log.lock().unwrap().clone();
        let image = read_versions(&lab.image("beta"), 0, NBLOCKS, run);
        let pending = a.peers[0].pending_requests;
        if !eligible {
            println!(
                "iteration {it}: beta was not replicating before the kill ({:?}, beta disk {}): not checked",
                a.peers[0], b.disk
            );
            skipped.push(it);
        } else {
            match log.check(&image) {
                Ok(fit) => {
                    checked += 1;
                    println!(
                        "iteration {it}: beta killed during primary epoch {epoch_before}..={epoch_at_kill} \
                         ({pending} requests pending just before): image = epoch {} + {}/{} blocks of epoch {} \
                         (fitting k: {:?})",
                        fit.k,
                        fit.next_applied,
                        fit.next_blocks,
                        fit.k + 1,
                        &fit.fitting[..fit.fitting.len().min(5)]
                    );
                    if fit.k > epoch_at_kill {
                        violations.push(format!(
                            "iteration {it}: beta holds epoch {} but the primary was in epoch {epoch_at_kill}",
                            fit.k
                        ));
                    }
                }
                Err(why) => {
                    println!("iteration {it}: VIOLATION: {why}");
                    violations.push(format!("iteration {it} (primary epoch {epoch_at_kill}): {why}"));
                }
            }
        }
        // Beta returns and is resynced; the writer waits, so afterwards beta must hold
        // exactly the primary's state.
        let t = Instant::now();
        lab.start("beta").unwrap();
        wait_until(&lab, "alpha", "beta resynced", secs(120), converged);
        wait_until(&lab, "beta", "up to date", secs(30), |r| r.disk == "up_to_date");
        let after = read_versions(&lab.image("beta"), 0, NBLOCKS, run);
        let want = log.state_after(log.epochs());
        let differ = (0..NBLOCKS).filter(|b| after[*b] != Some(want[*b])).count();
        println!(
            "iteration {it}: beta back in sync {:.2?} after its restart ({} epochs, {} writes so far)",
            t.elapsed(),
            log.epochs(),
            log.writes()
        );
        if differ > 0 {
            violations
                .push(format!("iteration {it}: after the resync {differ} blocks of beta differ from alpha"));
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    let (epochs, writes) = w.join().unwrap().expect("writer failed");
    let flushes = lab.resource_status("alpha").unwrap().stats.flushes;
    println!(
        "{iterations} kills in {:.1?}: {checked} checked, skipped {skipped:?}; {epochs} epochs, {writes} writes, \
         {flushes} flushes seen by alpha",
        t_all.elapsed()
    );
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
    assert!(
        skipped.len() * 4 <= iterations,
        "{} of {iterations} kills hit a standby that was not replicating: too few checked",
        skipped.len()
    );
    assert!(flushes as usize >= epochs, "alpha saw {flushes} flushes for {epochs} epochs: barriers are lost");

    // Finally both images are equal and hold the state after the last epoch.
    assert!(lab.demote("alpha").unwrap().ok, "demote");
    let clean = lab.stop_all();
    assert!(clean.values().all(|c| *c), "unclean stop: {clean:?}");
    let log = shared.log.lock().unwrap().clone();
    for n in ["alpha", "beta"] {
        let fit =
            log.check(&read_versions(&lab.image(n), 0, NBLOCKS, run)).unwrap_or_else(|e| panic!("{n}: {e}"));
        assert_eq!(fit.k, log.epochs(), "{n} does not hold the state after the last epoch");
    }
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
}
