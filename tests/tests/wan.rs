//! Replication across an emulated WAN: real agents on loopback, the primary reaching its
//! peer through the userspace UDP relay (`tandem_tests::relay`) with 25 ms one-way delay
//! (50 ms RTT) and 1 % random loss each way — this kernel has no netem.
//!
//! - `async_peer_over_a_lossy_50ms_link_catches_up`: an `async` peer behind the relay falls
//!   behind under a write load of stamped blocks with periodic flushes, catches up once
//!   the load stops (0 pending requests, 0 out-of-sync bytes), and after demotion both
//!   images are byte-identical and hold every block's newest version.
//!
//! Knobs: `TANDEM_WAN_SEED` (relay loss draws, block choice), `TANDEM_WAN_MIB` (MiB of 4 KiB
//! writes in the load, default 8), `TANDEM_WAN_WRITE_MIBS` (write pacing in MiB/s, default 2,
//! so the load lasts about 4 s; 0 = as fast as the device takes them), `TANDEM_WAN_DELAY_MS` (one way, default 25) and
//! `TANDEM_WAN_LOSS_PCT` (each way, default 1), `TANDEM_WAN_FLUSH_EVERY` (writes per epoch,
//! default 32). Figures are printed; see them with `--nocapture`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_tests::lab::LabOptions;
use tandem_tests::relay::{Direction, LinkProfile, Relay, RelayConfig};
use tandem_tests::*;

const MIB: u64 = 1 << 20;
/// The load overwrites random blocks of this region.
const REGION: u64 = 16 * MIB;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn async_peer_over_a_lossy_50ms_link_catches_up() {
    let seed = env_u64("TANDEM_WAN_SEED", rand::random());
    let load_mib = env_u64("TANDEM_WAN_MIB", 8).max(1);
    let pace = env_u64("TANDEM_WAN_WRITE_MIBS", 2) * MIB;
    let flush_every = env_u64("TANDEM_WAN_FLUSH_EVERY", 32).max(1);
    let one_way = Duration::from_millis(env_u64("TANDEM_WAN_DELAY_MS", 25));
    let loss: f64 =
        std::env::var("TANDEM_WAN_LOSS_PCT").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0) / 100.0;
    println!(
        "TANDEM_WAN_SEED={seed} (load {load_mib} MiB, pacing {} MiB/s; link {one_way:?} each way, {:.1} % loss each way)",
        pace / MIB,
        loss * 100.0
    );
    // BBR: loss-based congestion control cannot fill a lossy long path (see docs/wan.md).
    let congestion = std::env::var("TANDEM_WAN_CONGESTION").unwrap_or_else(|_| "bbr".into());
    println!("congestion control: {congestion}");
    let opts = LabOptions {
        size: 64 * MIB,
        mode: "async".into(),
        timeout: Duration::from_secs(5),
        extra_options: format!("congestion = \"{congestion}\""),
        ..Default::default()
    };
    let mut lab = new_lab(&["alpha", "beta"], &opts);
    let link = LinkProfile::default().with_delay(one_way).with_loss(loss);
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        lab.node_addr("beta").unwrap(),
        RelayConfig::symmetric(link, seed),
    )
    .expect("start relay");
    // alpha dials beta (its name sorts first): it is the one that must see the relay.
    lab.route_via("alpha", "beta", relay.addr()).unwrap();
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    let t = Instant::now();
    lab.wait_connected("alpha", secs(60)).unwrap();
    println!("connected through the relay in {:?}", t.elapsed());
    assert!(lab.promote("alpha", false).unwrap().ok);
    let dev = wait_until(&lab, "alpha", "in sync", secs(60), all_caught_up).device.expect("device");
    let connected = lab.log_text("alpha");
    assert!(
        connected.contains(&format!("remote={}", relay.addr())),
        "alpha's connection to beta does not go through the relay at {}:\n{connected}",
        relay.addr()
    );
    let before = relay.stats(Direction::ToServer);

    // Watch the peer's backlog while the load runs.
    let stop = Arc::new(AtomicBool::new(false));
    let max_pending = Arc::new(AtomicUsize::new(0));
    let max_lag = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, max_pending, max_lag) = (stop.clone(), max_pending.clone(), max_lag.clone());
        let sock = lab.dir.join("alpha").join("control.sock");
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = tandem_agent::control::call(
                    &sock,
                    &tandem_agent::control::Request::Status,
                    Duration::from_secs(10),
                );
                if let Some(st) = r.ok().and_then(|r| r.status) {
                    for p in st.resources.iter().flat_map(|r| &r.peers) {
                        max_pending.fetch_max(p.pending_requests, Ordering::Relaxed);
                        max_lag.fetch_max(p.lag_bytes, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // The load: random blocks of the region, a flush every `flush_every` writes, paced.
    let run = seed;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = BlockWriter::open(&dev, run, false);
    let (mut writes, mut flushes) = (0u64, 0u64);
    let t0 = Instant::now();
    // A fixed volume, so a stalled device cannot pass for a load; a stall fails the test.
    while writes < load_mib * MIB / BLOCK as u64 {
        assert!(
            t0.elapsed() < secs(300),
            "the load stalled: {writes} writes in {:.1?}\nlog of alpha:\n{}",
            t0.elapsed(),
            lab.log_text("alpha")
        );
        w.write(rng.random_range(0..REGION / BLOCK as u64) * BLOCK as u64).expect("write");
        writes += 1;
        if writes % flush_every == 0 {
            w.sync();
            flushes += 1;
        }
        if pace > 0 {
            let due = Duration::from_secs_f64((writes * BLOCK as u64) as f64 / pace as f64);
            if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
    w.sync();
    flushes += 1;
    let load_time = t0.elapsed();
    let at_end = lab.resource_status("alpha").unwrap();
    let t1 = Instant::now();
    let done = wait_until(&lab, "alpha", "peer caught up", secs(600), all_caught_up);
    let converge = t1.elapsed();
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();

    let written = writes * BLOCK as u64;
    let up = relay.stats(Direction::ToServer);
    let moved = up.bytes_forwarded - before.bytes_forwarded;
    println!(
        "load: {writes} writes ({:.1} MiB, {} distinct blocks) and {flushes} flushes in {load_time:.2?}: {:.2} MiB/s; \
         at its end {} requests pending at beta (max seen {}), lag {} KiB / {:.2} s (max seen {} KiB); beta caught up {converge:.2?} later; \
         relay carried {:.1} MiB towards beta in {:.2?}: {:.2} MiB/s",
        written as f64 / MIB as f64,
        w.written.len(),
        written as f64 / MIB as f64 / load_time.as_secs_f64(),
        at_end.peers[0].pending_requests,
        max_pending.load(Ordering::Relaxed),
        at_end.peers[0].lag_bytes / 1024,
        at_end.peers[0].lag_secs,
        max_lag.load(Ordering::Relaxed) / 1024,
        moved as f64 / MIB as f64,
        load_time + converge,
        moved as f64 / MIB as f64 / (load_time + converge).as_secs_f64(),
    );
    println!("{}", relay.summary());
    println!("alpha's view of beta when caught up: {:?}", done.peers[0]);
    if !one_way.is_zero() {
        assert!(
            max_pending.load(Ordering::Relaxed) > 0,
            "beta never had a request pending behind a slow link"
        );
    }
    if loss >= 0.005 {
        assert!(up.dropped_loss > 0, "the relay dropped nothing: the link was not lossy");
    }
    assert!(moved >= w.written.len() as u64 * BLOCK as u64, "less data crossed the relay than was written");
    // Status reports the lag while data is pending (pending count and lag are read apart, so
    // only the samples taken under the load, not one snapshot, are compared), and none once
    // the peer caught up.
    assert_eq!(done.peers[0].lag_bytes, 0, "lag reported for a peer that caught up: {:?}", done.peers[0]);

    assert!(lab.demote("alpha").unwrap().ok, "demote");
    let clean = lab.stop_all();
    assert!(clean.values().all(|c| *c), "unclean stop: {clean:?}");
    for n in ["alpha", "beta"] {
        let stale = stale_blocks(&lab.image(n), run, &w.written);
        assert!(
            stale.is_empty(),
            "{n} lacks the newest version of {} blocks, e.g. {:?}",
            stale.len(),
            &stale[..5.min(stale.len())]
        );
    }
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
    drop(relay);
}

/// The primary's sequential-write rate (1 MiB writes) with an `async` peer behind the relay
/// (50 ms RTT, 1 % loss) against the rate with no peer connected, and, for contrast, with the
/// same peer in `sync`. Figures are printed, not asserted (not a timed test); the data is
/// checked on both images.
#[test]
fn sequential_write_rate_with_a_wan_peer_async_against_none_and_sync() {
    let mut lab = new_lab(
        &["alpha", "beta"],
        &LabOptions {
            size: 64 * MIB,
            mode: "sync".into(),
            timeout: Duration::from_secs(5),
            extra_options: "congestion = \"bbr\"".into(),
            ..Default::default()
        },
    );
    let base = std::fs::read_to_string(&lab.config).unwrap();
    std::fs::write(&lab.config, with_disk_keys(&base, "beta", "mode = \"async\"\nbacklog = \"512MiB\""))
        .unwrap();
    let link = LinkProfile::default().with_delay(Duration::from_millis(25)).with_loss(0.01);
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        lab.node_addr("beta").unwrap(),
        RelayConfig::symmetric(link, 11),
    )
    .expect("relay");
    let alpha_cfg = lab.route_via("alpha", "beta", relay.addr()).unwrap();
    let up = |lab: &mut tandem_tests::lab::Lab| -> String {
        start_and_promote_alpha(lab, &["alpha", "beta"], |r| r.peers[0].replication == "established")
    };
    let dev = up(&mut lab);
    let run = rand::random();
    let mut written = Default::default();
    let with_async = sequential_mib(&dev, run, 64, &mut written);
    let st = lab.resource_status("alpha").unwrap();
    let t = Instant::now();
    wait_until(&lab, "alpha", "caught up", secs(600), all_caught_up);
    let caught_up_after = t.elapsed();
    tandem_ok(&lab, "alpha", &["disconnect", "mail"]);
    wait_until(&lab, "alpha", "disconnected", secs(30), |r| r.peers[0].replication == "off");
    let alone = sequential_mib(&dev, run, 64, &mut written);
    tandem_ok(&lab, "alpha", &["connect", "mail"]);
    wait_until(&lab, "alpha", "resynced", secs(600), all_caught_up);
    assert!(lab.demote("alpha").unwrap().ok);
    assert!(lab.stop_all().values().all(|c| *c));
    // The same peer in sync mode (both configs: alpha dials beta through the relay).
    for cfg in [&lab.config, &alpha_cfg] {
        let text = std::fs::read_to_string(cfg)
            .unwrap()
            .replace("mode = \"async\"\nbacklog", "mode = \"sync\"\nbacklog");
        std::fs::write(cfg, text).unwrap();
    }
    let dev = up(&mut lab);
    assert_eq!(lab.resource_status("alpha").unwrap().peers[0].mode, "sync");
    let with_sync = sequential_mib(&dev, run, 8, &mut written);
    println!(
        "sequential 1 MiB writes on the primary, peer behind 50 ms RTT / 1 % loss: no peer {alone:.0} MB/s; \
         async peer {with_async:.0} MB/s ({:.0} % of no peer; lag at the end {:.1} MiB / {:.2} s, caught up {caught_up_after:.1?} later); \
         sync peer {with_sync:.1} MB/s ({:.1} %)",
        with_async * 100.0 / alone,
        st.peers[0].lag_bytes as f64 / MIB as f64,
        st.peers[0].lag_secs,
        with_sync * 100.0 / alone
    );
    assert!(lab.demote("alpha").unwrap().ok);
    assert!(lab.stop_all().values().all(|c| *c));
    for n in ["alpha", "beta"] {
        assert_eq!(stale_blocks(&lab.image(n), run, &written), Vec::<u64>::new(), "{n}");
    }
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
    drop(relay);
}
