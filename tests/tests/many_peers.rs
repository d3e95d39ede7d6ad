//! One primary and eight `sync` peers — nine real agents on loopback, every pair of nodes
//! connected (36 QUIC connections).
//!
//! - `one_primary_eight_sync_peers_converge_and_a_killed_peer_takes_a_delta`: alpha is
//!   promoted and writes stamped blocks with flushes; all eight peers must be connected,
//!   established, with nothing pending and nothing out of sync. Then, under a continuing
//!   load, one peer is killed with `kill -9` and restarted: it must converge again by a
//!   delta resync (no more than what was written since it died). At the end alpha demotes,
//!   every agent stops cleanly, and the nine images are byte-identical and hold every
//!   block's newest version.
//!
//! Figures (timings, throughput, bytes resynced) are printed; see them with `--nocapture`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_agent::status::{PeerStatus, ResourceStatus};
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const MIB: u64 = 1 << 20;
const NODES: [&str; 9] = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"];
/// The load writes random blocks of this region.
const REGION: u64 = 16 * MIB;
const TIMEOUT: Duration = Duration::from_secs(2);

fn in_sync(p: &PeerStatus) -> bool {
    p.connection == "connected"
        && p.replication == "established"
        && p.pending_requests == 0
        && p.out_of_sync_bytes == 0
        && p.peer_disk == Some(tandem_agent::status::DiskState::UpToDate)
}

fn all_in_sync(r: &ResourceStatus) -> bool {
    !r.peers.is_empty() && r.peers.iter().all(in_sync)
}

fn peer<'a>(r: &'a ResourceStatus, name: &str) -> &'a PeerStatus {
    r.peers.iter().find(|p| p.node == name).unwrap_or_else(|| panic!("no peer {name} in {r:#?}"))
}

fn not_in_sync(r: &ResourceStatus) -> Vec<String> {
    r.peers.iter().filter(|p| !in_sync(p)).map(|p| p.node.clone()).collect()
}

fn wait_all_in_sync(lab: &Lab, what: &str) -> ResourceStatus {
    lab.wait_for("alpha", what, secs(120), all_in_sync).unwrap_or_else(|e| {
        let st = lab.resource_status("alpha").unwrap();
        let logs: String =
            not_in_sync(&st).iter().map(|n| format!("\nlog of {n}:\n{}", lab.log_text(n))).collect();
        panic!("{e:#}\nlog of alpha:\n{}{logs}", lab.log_text("alpha"))
    })
}

#[test]
fn one_primary_eight_sync_peers_converge_and_a_killed_peer_takes_a_delta() {
    let seed: u64 =
        std::env::var("TANDEM_MANY_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    let n_nodes: usize = std::env::var("TANDEM_MANY_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(9);
    assert!((3..=NODES.len()).contains(&n_nodes), "TANDEM_MANY_NODES must be 3..=9");
    let nodes = &NODES[..n_nodes];
    // The peer killed under load: one that dials others (its name sorts before theirs).
    let victim = if nodes.contains(&"eta") { "eta" } else { "beta" };
    println!("TANDEM_MANY_SEED={seed} TANDEM_MANY_NODES={n_nodes}");
    let opts = LabOptions { size: 32 * MIB, mode: "sync".into(), timeout: TIMEOUT, ..Default::default() };
    let mut lab = new_lab(nodes, &opts);
    let t = Instant::now();
    for n in nodes {
        lab.start(n).unwrap();
    }
    println!("{n_nodes} agents started in {:.2?}", t.elapsed());
    let t = Instant::now();
    let st = lab.wait_connected("alpha", secs(60)).unwrap();
    assert_eq!(st.peers.len(), n_nodes - 1, "alpha's peers: {:?}", st.peers);
    println!("alpha connected to its {} peers in {:.2?}", n_nodes - 1, t.elapsed());
    let t = Instant::now();
    assert!(lab.promote("alpha", false).unwrap().ok, "promote");
    let dev = wait_all_in_sync(&lab, "all peers in sync after promotion").device.expect("device");
    println!("promoted, all {} peers in sync in {:.2?}", n_nodes - 1, t.elapsed());

    // Phase 1: 4 MiB of stamped blocks, a flush every 32.
    let run = seed;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = BlockWriter::open(&dev, run, false);
    let t = Instant::now();
    for i in 1..=1024u64 {
        w.write(rng.random_range(0..REGION / BLOCK as u64) * BLOCK as u64).expect("write");
        if i % 32 == 0 {
            w.sync();
        }
    }
    let load = t.elapsed();
    let t = Instant::now();
    wait_all_in_sync(&lab, "all peers in sync after the load");
    println!(
        "phase 1: 1024 writes of 4 KiB + 32 flushes to {} sync peers in {load:.2?} ({:.2} MiB/s, {:.0} µs per write); \
         all in sync {:.2?} later",
        n_nodes - 1,
        4.0 / load.as_secs_f64(),
        load.as_micros() as f64 / 1024.0,
        t.elapsed()
    );

    // Phase 2: a load that runs while one peer is killed and restarted.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let loader = {
        let (stop, count) = (stop.clone(), count.clone());
        std::thread::spawn(move || {
            let mut order = Vec::new();
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let off = rng.random_range(0..REGION / BLOCK as u64) * BLOCK as u64;
                let t = Instant::now();
                w.write(off).expect("write");
                order.push(off);
                if order.len() % 32 == 0 {
                    w.sync();
                }
                slowest = slowest.max(t.elapsed());
                count.store(order.len(), Ordering::SeqCst);
                // A steady trickle, not a flood: the volume stays small.
                std::thread::sleep(Duration::from_millis(2));
            }
            w.sync();
            (w, order, slowest)
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let at_kill = count.load(Ordering::SeqCst);
    lab.kill9(victim).unwrap();
    let t_kill = Instant::now();
    lab.wait_for("alpha", "victim noticed", secs(30), |r| peer(r, victim).replication != "established")
        .unwrap();
    let noticed = t_kill.elapsed();
    // Writes go on without the victim for a while.
    std::thread::sleep(Duration::from_millis(1000));
    let at_restart = count.load(Ordering::SeqCst);
    let t_restart = Instant::now();
    lab.start(victim).unwrap();
    let st = lab
        .wait_for("alpha", "victim back in sync", secs(120), |r| in_sync(peer(r, victim)))
        .unwrap_or_else(|e| panic!("{e:#}\nlog of {victim}:\n{}", lab.log_text(victim)));
    let back = t_restart.elapsed();
    let at_back = count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (w, order, slowest) = loader.join().unwrap();
    wait_all_in_sync(&lab, "all peers in sync after the kill");

    let moved = peer(&lab.resource_status("alpha").unwrap(), victim)
        .resync
        .clone()
        .unwrap_or_default()
        .data_bytes_sent;
    // What the victim can have missed: every block written from (just before) its death on. A
    // block the load writes again while it is being resynced is sent again, so the bound
    // counts writes, not distinct blocks.
    let since_kill = &order[at_kill.saturating_sub(1)..];
    let distinct = since_kill.iter().collect::<std::collections::BTreeSet<_>>().len() as u64 * BLOCK as u64;
    let missed_at_most = since_kill.len() as u64 * BLOCK as u64;
    println!(
        "phase 2: {} writes; {victim} killed after {at_kill}, noticed in {noticed:.2?} (timeout {TIMEOUT:?}), \
         slowest write {slowest:.2?}; restarted and back in sync in {back:.2?}; resync moved {moved} bytes \
         ({} KiB); since the kill {missed_at_most} bytes were written to {distinct} bytes of distinct blocks; \
         alpha's view: {:?}",
        order.len(),
        moved / 1024,
        peer(&st, victim)
    );
    assert!(moved > 0, "{victim} missed writes but nothing was resynced to it");
    assert!(
        moved <= missed_at_most,
        "resync moved {moved} bytes, more than the {missed_at_most} bytes written since {victim} died: not a delta"
    );
    assert!(
        moved < opts.size / 2,
        "resync moved {moved} bytes of a {} byte volume: a full resync",
        opts.size
    );

    // Phase 3: demote, stop everything, compare all nine images.
    assert!(lab.demote("alpha").unwrap().ok, "demote");
    let t = Instant::now();
    let clean = lab.stop_all();
    println!("all agents stopped in {:.2?}", t.elapsed());
    assert!(clean.values().all(|c| *c), "unclean stop: {clean:?}");
    let t = Instant::now();
    let want = sha256_file(&lab.image("alpha"));
    let mut bad = Vec::new();
    for &n in nodes {
        let stale = stale_blocks(&lab.image(n), run, &w.written);
        if !stale.is_empty() {
            // When was each stale block last written: phase 1, or which part of phase 2?
            let when = |off: u64| match order.iter().rposition(|o| *o == off) {
                None => "in phase 1".to_string(),
                Some(i) if i < at_kill => format!("as phase-2 write #{i}, before {victim} was killed"),
                Some(i) if i < at_restart => format!("as phase-2 write #{i}, while {victim} was down"),
                Some(i) if i < at_back => format!("as phase-2 write #{i}, while {victim} was resyncing"),
                Some(i) => format!("as phase-2 write #{i}, after {victim} was back in sync"),
            };
            let detail: Vec<String> = stale
                .iter()
                .take(10)
                .map(|off| {
                    let b = read_at(&lab.image(n), *off, BLOCK);
                    let v = u64::from_le_bytes(b[24..32].try_into().unwrap());
                    format!("offset {off}: v{v} instead of v{}, last written {}", w.written[off], when(*off))
                })
                .collect();
            bad.push(format!(
                "{n} lacks the newest version of {} blocks (phase-2 writes: {victim} killed at #{at_kill}, \
                 restarted at #{at_restart}, back in sync at #{at_back}):\n  {}",
                stale.len(),
                detail.join("\n  ")
            ));
        }
        let h = sha256_file(&lab.image(n));
        if h != want {
            bad.push(format!("{n}'s image differs from alpha's ({h} vs {want})"));
        }
    }
    println!(
        "{} distinct blocks checked on {} images and hashed in {:.2?}",
        w.written.len(),
        n_nodes,
        t.elapsed()
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
