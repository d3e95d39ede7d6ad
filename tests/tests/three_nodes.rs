//! One primary, a LAN standby in `sync` and a WAN replica in `async` behind the impairment
//! relay (50 ms RTT, 1 % loss each way) — modes set per peer. Under a write load the sync
//! standby is always current, the async replica lags and then converges, and all three
//! images end equal with every block's latest version. Also prints the primary's
//! sequential-write rate with the WAN replica attached against the rate with no peer
//! connected (figures, not assertions: benchmarks are not timed tests).

use std::time::{Duration, Instant};

use tandem_tests::lab::LabOptions;
use tandem_tests::relay::{LinkProfile, Relay, RelayConfig};
use tandem_tests::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

#[test]
fn sync_standby_stays_current_while_async_wan_replica_lags_then_converges() {
    // gamma is the WAN replica: async, compressed, on its own disk entry.
    let opts = LabOptions {
        size: SIZE,
        mode: "sync".into(),
        timeout: Duration::from_secs(5),
        extra_options: "congestion = \"bbr\"".into(),
        ..Default::default()
    };
    let mut lab = new_lab(&["alpha", "beta", "gamma"], &opts);
    let text = std::fs::read_to_string(&lab.config).unwrap();
    std::fs::write(&lab.config, with_disk_keys(&text, "gamma", "mode = \"async\"\nbacklog = \"256MiB\""))
        .unwrap();
    let link = LinkProfile::default().with_delay(Duration::from_millis(25)).with_loss(0.01);
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        lab.node_addr("gamma").unwrap(),
        RelayConfig::symmetric(link, 7),
    )
    .expect("relay");
    // alpha and beta dial gamma (their names sort first): both reach it through the relay.
    lab.route_via("alpha", "gamma", relay.addr()).unwrap();
    lab.route_via("beta", "gamma", relay.addr()).unwrap();
    for n in ["alpha", "beta", "gamma"] {
        lab.start(n).unwrap();
    }
    wait_until(&lab, "alpha", "all connected", secs(60), |r| {
        r.peers.iter().all(|p| p.connection == "connected")
    });
    assert!(lab.promote("alpha", false).unwrap().ok);
    let st = wait_until(&lab, "alpha", "replicating", secs(60), |r| {
        r.device.is_some() && r.peers.iter().all(|p| p.replication == "established")
    });
    let modes: Vec<(String, String)> = st.peers.iter().map(|p| (p.node.clone(), p.mode.clone())).collect();
    assert_eq!(modes, vec![("beta".into(), "sync".into()), ("gamma".into(), "async".into())]);
    let dev = st.device.unwrap();
    let run = rand::random();
    let mut written = Default::default();

    // The primary's sequential rate with the WAN replica attached, then with no peer.
    let with_wan = sequential_mib(&dev, run, 64, &mut written);
    let st = lab.resource_status("alpha").unwrap();
    let peer = |n: &str| st.peers.iter().find(|p| p.node == n).unwrap().clone();
    let (beta, gamma) = (peer("beta"), peer("gamma"));
    println!(
        "64 MiB sequential (1 MiB writes): {with_wan:.0} MB/s with beta (sync, LAN) and gamma (async, 50 ms, 1 % loss); \
         right after: beta lag {} B, gamma lag {} B / {:.2} s, gamma out of sync {} B ({})",
        beta.lag_bytes, gamma.lag_bytes, gamma.lag_secs, gamma.out_of_sync_bytes, gamma.replication
    );
    // Sync: nothing acknowledged is missing on beta, ever.
    assert_eq!(beta.pending_requests, 0, "{beta:?}");
    assert_eq!(beta.out_of_sync_bytes, 0, "{beta:?}");
    assert!(
        gamma.lag_bytes > 0 || gamma.out_of_sync_bytes > 0 || gamma.replication != "established",
        "the WAN replica did not lag at all: {gamma:?}"
    );
    let t = Instant::now();
    let st = wait_until(&lab, "alpha", "gamma converged", secs(300), |r| {
        r.peers.iter().all(|p| {
            p.replication == "established"
                && p.pending_requests == 0
                && p.out_of_sync_bytes == 0
                && p.peer_disk == Some(tandem_agent::status::DiskState::UpToDate)
        })
    });
    println!("gamma converged {:?} later; {:?}", t.elapsed(), st.peers.iter().find(|p| p.node == "gamma"));
    // Baseline: the same writes with the peers disconnected (tracked for a later resync).
    tandem_ok(&lab, "alpha", &["disconnect", "mail"]);
    wait_until(&lab, "alpha", "disconnected", secs(30), |r| r.peers.iter().all(|p| p.replication == "off"));
    let alone = sequential_mib(&dev, run, 64, &mut written);
    println!(
        "no peer connected: {alone:.0} MB/s; with the async WAN replica (and the sync LAN standby): {:.0} %",
        with_wan * 100.0 / alone
    );
    tandem_ok(&lab, "alpha", &["connect", "mail"]);
    wait_until(&lab, "alpha", "resynced", secs(300), |r| {
        r.peers.iter().all(|p| {
            p.connection == "connected"
                && p.replication == "established"
                && p.out_of_sync_bytes == 0
                && p.peer_disk == Some(tandem_agent::status::DiskState::UpToDate)
        })
    });
    assert!(lab.demote("alpha").unwrap().ok);
    let clean = lab.stop_all();
    assert!(clean.values().all(|c| *c), "{clean:?}");
    for n in ["alpha", "beta", "gamma"] {
        assert_eq!(stale_blocks(&lab.image(n), run, &written), Vec::<u64>::new(), "{n}");
    }
    let a = sha256_file(&lab.image("alpha"));
    assert_eq!(a, sha256_file(&lab.image("beta")), "beta differs");
    assert_eq!(a, sha256_file(&lab.image("gamma")), "gamma differs");
}
