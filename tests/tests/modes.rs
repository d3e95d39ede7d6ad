//! Where `memory` and `async` writes complete, per peer, with a real standby frozen by
//! SIGSTOP; an async backlog that overflows leaves the peer behind (`ahead`) and resyncs it
//! once it has drained.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const SIZE: u64 = 64 << 20;

/// alpha primary, beta a peer in `mode` (set per peer, on beta's disk), connection timeout
/// long enough that a few seconds of SIGSTOP do not drop the connection.
fn pair(mode: &str, backlog: &str) -> (Lab, String) {
    pair_with(mode, &format!("backlog = \"{backlog}\""))
}

fn pair_with(mode: &str, disk_extra: &str) -> (Lab, String) {
    let mut lab = new_lab(
        &["alpha", "beta"],
        &LabOptions {
            size: SIZE,
            mode: "sync".into(),
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
    );
    // Per-peer settings live on the peer's disk entry.
    let text = std::fs::read_to_string(&lab.config)
        .unwrap()
        .replace("meta = \"", &format!("mode = \"{mode}\"\n{disk_extra}\nmeta = \""));
    std::fs::write(&lab.config, text).unwrap();
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    lab.wait_connected("alpha", secs(30)).unwrap();
    assert!(lab.promote("alpha", false).unwrap().ok);
    let dev = wait_until(&lab, "alpha", "replicating", secs(30), |r| {
        r.device.is_some() && r.peers[0].replication == "established"
    })
    .device
    .unwrap();
    assert_eq!(lab.resource_status("alpha").unwrap().peers[0].mode, mode);
    (lab, dev)
}

fn finish(lab: &mut Lab, run: u64, written: &std::collections::BTreeMap<u64, u64>) {
    wait_until(lab, "alpha", "peer caught up", secs(60), |r| {
        r.peers[0].replication == "established"
            && r.peers[0].out_of_sync_bytes == 0
            && r.peers[0].pending_requests == 0
            && r.peers[0].peer_disk == Some(tandem_agent::status::DiskState::UpToDate)
    });
    assert!(lab.demote("alpha").unwrap().ok);
    let clean = lab.stop_all();
    assert!(clean.values().all(|c| *c), "{clean:?}");
    for n in ["alpha", "beta"] {
        assert_eq!(stale_blocks(&lab.image(n), run, written), Vec::<u64>::new(), "{n}");
    }
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
}

#[test]
fn async_writes_complete_with_the_standby_frozen_and_overflow_goes_ahead_then_resyncs() {
    let (mut lab, dev) = pair("async", "1MiB");
    let run = rand::random();
    let mut w = BlockWriter::open(&dev, run, true);
    lab.signal("beta", Signal::SIGSTOP).unwrap();
    // 4 MiB of synchronous (O_DSYNC) writes: each completes without the frozen peer.
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    for b in 0..1024u64 {
        let s = Instant::now();
        w.write(b * BLOCK as u64).unwrap();
        slowest = slowest.max(s.elapsed());
    }
    println!("async, standby frozen: 1024 writes in {:?}, slowest {slowest:?}", t.elapsed());
    assert!(slowest < Duration::from_secs(5), "an async write waited for the frozen peer: {slowest:?}");
    let st = lab.resource_status("alpha").unwrap();
    println!("while frozen: {:?}", st.peers[0]);
    assert_eq!(st.peers[0].replication, "ahead", "a 1 MiB backlog overflowed by 4 MiB of writes");
    assert!(st.peers[0].out_of_sync_bytes >= 2 << 20, "{:?}", st.peers[0]);
    assert!(st.peers[0].lag_bytes > 0 && st.peers[0].lag_bytes <= 1 << 20, "{:?}", st.peers[0]);
    lab.signal("beta", Signal::SIGCONT).unwrap();
    // Drains, resyncs what it missed, and is replicated to normally again.
    for b in 2000..2064u64 {
        w.write(b * BLOCK as u64).unwrap();
    }
    let written = w.written.clone();
    drop(w);
    finish(&mut lab, run, &written);
    assert!(lab.log_text("alpha").contains("backlog drained"), "no drain logged");
}

#[test]
fn memory_writes_wait_for_the_frozen_standby_to_receive_them() {
    let (mut lab, dev) = pair("memory", "64MiB");
    let run = rand::random();
    let mut w = BlockWriter::open(&dev, run, false);
    w.write(0).unwrap();
    lab.signal("beta", Signal::SIGSTOP).unwrap();
    let writer = std::thread::spawn(move || {
        let t = Instant::now();
        w.write(4096).unwrap();
        (t.elapsed(), w)
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!writer.is_finished(), "a memory-mode write completed while the peer was frozen");
    lab.signal("beta", Signal::SIGCONT).unwrap();
    let (took, w) = writer.join().unwrap();
    println!("memory, standby frozen for 1.5 s: the write took {took:?}");
    assert!(took >= Duration::from_millis(1400));
    let written = w.written.clone();
    drop(w);
    finish(&mut lab, run, &written);
}

/// Block data compressed on the wire (zstd) arrives as written: mail-like blocks that
/// compress and random blocks that do not, checked on both images.
#[test]
fn compressed_replication_delivers_the_same_blocks() {
    let (mut lab, dev) = pair_with("sync", "compression = \"zstd\"");
    let run = rand::random();
    let mut w = BlockWriter::open(&dev, run, true);
    // Stamped blocks are mostly a repeating pattern (compressible).
    for b in 0..512u64 {
        w.write(b * BLOCK as u64).unwrap();
    }
    let mut written = w.written.clone();
    drop(w);
    // Random blocks (incompressible), checked byte for byte afterwards.
    let mut noise = vec![0u8; BLOCK];
    let mut randoms = Vec::new();
    for b in 1000..1064u64 {
        rand::fill(&mut noise[..]);
        write_block_direct(&dev, b * BLOCK as u64, &noise, true).unwrap();
        randoms.push((b, noise.clone()));
    }
    let st = lab.resource_status("alpha").unwrap();
    assert_eq!(st.peers[0].replication, "established");
    let (data, wire) = (st.peers[0].sent_data_bytes, st.peers[0].sent_wire_bytes);
    println!("zstd: {data} bytes of block data went as {wire} bytes");
    assert!(data >= 576 * BLOCK as u64, "{data}");
    // 512 stamped blocks shrink, 64 random ones do not.
    assert!(wire < data / 2 && wire > 64 * BLOCK as u64, "data {data} wire {wire}");
    finish(&mut lab, run, &written);
    for (b, data) in &randoms {
        for n in ["alpha", "beta"] {
            assert_eq!(&read_at(&lab.image(n), b * BLOCK as u64, BLOCK), data, "{n} block {b}");
        }
    }
    written.clear();
}
