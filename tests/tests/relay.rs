//! The WAN-emulating UDP relay on its own (no agents, no root): delay, jitter, loss, rate
//! cap, cutting a direction, following the client, and shutdown. Timing assertions hold
//! on a loaded machine: delays are lower bounds, rates upper bounds, loss within wide
//! tolerances of the configured probability over thousands of datagrams.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_tests::relay::{Direction, LinkProfile, Relay, RelayConfig};

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A UDP server on 127.0.0.1 that records every datagram's arrival and, if `echo`, sends
/// it back to its sender.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<(Instant, usize)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(echo: bool) -> Server {
        let s = UdpSocket::bind(localhost()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = s.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (stop2, got2) = (stop.clone(), got.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    got2.lock().unwrap().push((Instant::now(), n));
                    if echo {
                        s.send_to(&buf[..n], from).unwrap();
                    }
                }
            }
        });
        Server { addr, stop, got, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until neither direction of `relay` holds a datagram (at most `max`).
fn drain(relay: &Relay, max: Duration) {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline
        && (relay.stats(Direction::ToServer).in_flight > 0 || relay.stats(Direction::ToClient).in_flight > 0)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    // What the relay sent is on its way through loopback.
    std::thread::sleep(Duration::from_millis(50));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[test]
fn delay_jitter_and_loss_through_an_echo_server() {
    const N: u64 = 2000;
    const LOSS: f64 = 0.05;
    let one_way = Duration::from_millis(10);
    let server = Server::start(true);
    let cfg = RelayConfig {
        to_server: LinkProfile::default()
            .with_delay(one_way)
            .with_jitter(Duration::from_millis(5))
            .with_loss(LOSS),
        to_client: LinkProfile::default().with_delay(one_way),
        seed: 7,
    };
    let relay = Relay::start(localhost(), server.addr, cfg).unwrap();
    let client = UdpSocket::bind(localhost()).unwrap();
    client.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let t0 = Instant::now();

    // The receiver records (sequence number, round-trip time) in arrival order.
    let rx = client.try_clone().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 1500];
        while !done2.load(Ordering::Relaxed) {
            if let Ok(n) = rx.recv(&mut buf) {
                assert_eq!(n, 100, "datagram size changed in transit");
                let seq = u64::from_le_bytes(buf[0..8].try_into().unwrap());
                let sent = Duration::from_nanos(u64::from_le_bytes(buf[8..16].try_into().unwrap()));
                got.push((seq, t0.elapsed() - sent));
            }
        }
        got
    });
    let mut pkt = [0u8; 100];
    for seq in 0..N {
        pkt[0..8].copy_from_slice(&seq.to_le_bytes());
        pkt[8..16].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
        client.send_to(&pkt, relay.addr()).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    drain(&relay, Duration::from_secs(5));
    done.store(true, Ordering::SeqCst);
    let got = receiver.join().unwrap();

    let up = relay.stats(Direction::ToServer);
    let down = relay.stats(Direction::ToClient);
    let lost = N - got.len() as u64;
    let loss = lost as f64 / N as f64;
    let mut rtts: Vec<Duration> = got.iter().map(|g| g.1).collect();
    rtts.sort();
    println!(
        "{N} sent, {} echoed: loss {:.2} % (configured {:.1} % one way); RTT min {:?} median {:?} p99 {:?} max {:?} \
         (configured 2 × {one_way:?} + up to 5 ms jitter)\n{}",
        got.len(),
        loss * 100.0,
        LOSS * 100.0,
        rtts[0],
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99),
        rtts[rtts.len() - 1],
        relay.summary()
    );
    assert_eq!(relay.client(), Some(client.local_addr().unwrap()), "the relay learned the client");
    assert!(
        (0.2 * LOSS..=3.0 * LOSS).contains(&loss),
        "measured loss {loss:.4} is far from the configured {LOSS}"
    );
    // Loopback loses nothing with these buffers and rates: every loss is the relay's.
    assert_eq!(up.dropped_loss, lost, "the relay's loss counter disagrees with what the client saw");
    assert_eq!(down.dropped_loss, 0, "loss was configured one way only");
    assert_eq!((up.packets_in, up.packets_forwarded), (N, N - lost));
    assert_eq!((down.packets_in, down.packets_forwarded), (N - lost, N - lost));
    assert_eq!(up.bytes_forwarded, (N - lost) * 100);
    assert_eq!((up.largest_datagram, down.largest_datagram), (100, 100));
    assert!(up.accounted() && down.accounted(), "{up:?} {down:?}");
    assert!(rtts[0] >= 2 * one_way, "a round trip took {:?}, less than the configured delay", rtts[0]);
    // Jitter never reorders unless asked to.
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "datagrams were reordered");
}

#[test]
fn rate_cap_is_respected_and_excess_is_dropped() {
    const RATE: u64 = 1_000_000;
    const BURST: u64 = 8 << 10;
    const PKT: usize = 1200;
    let server = Server::start(false);
    let p = LinkProfile::default().with_rate(RATE, BURST, 64 << 10);
    let relay = Relay::start(localhost(), server.addr, RelayConfig::symmetric(p, 1)).unwrap();
    let client = UdpSocket::bind(localhost()).unwrap();
    // Offer roughly 4× the cap for a second and a half.
    let t0 = Instant::now();
    let mut sent = 0u64;
    let pkt = [0x5au8; PKT];
    while t0.elapsed() < Duration::from_millis(1500) {
        for _ in 0..4 {
            client.send_to(&pkt, relay.addr()).unwrap();
            sent += PKT as u64;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let offered_for = t0.elapsed();
    drain(&relay, Duration::from_secs(5));
    let got = server.got.lock().unwrap().clone();
    assert!(!got.is_empty(), "nothing crossed the relay");
    let bytes: u64 = got.iter().map(|g| g.1 as u64).sum();
    let window = got[got.len() - 1].0 - got[0].0;
    let offered = sent as f64 / offered_for.as_secs_f64();
    let rate = bytes as f64 / window.as_secs_f64();
    let up = relay.stats(Direction::ToServer);
    println!(
        "offered {:.2} MB/s for {offered_for:?}; delivered {bytes} bytes in {window:?}: {:.3} MB/s (cap {:.1} MB/s)\n{}",
        offered / 1e6,
        rate / 1e6,
        RATE as f64 / 1e6,
        relay.summary()
    );
    // Beyond the first burst, nothing leaves faster than the cap.
    let beyond_burst = bytes.saturating_sub(BURST + PKT as u64) as f64;
    assert!(
        beyond_burst <= 1.2 * RATE as f64 * window.as_secs_f64(),
        "{bytes} bytes delivered in {window:?}: above the {RATE} B/s cap"
    );
    assert_eq!(up.bytes_forwarded, bytes, "the relay's byte counter disagrees with the server");
    assert!(up.accounted(), "{up:?}");
    if offered > 1.5 * RATE as f64 {
        assert!(up.dropped_queue > 0, "the offered load exceeded the cap but the queue never overflowed");
    }
}

#[test]
fn a_cut_direction_drops_everything_and_the_relay_follows_the_client() {
    let server = Server::start(true);
    let relay =
        Relay::start(localhost(), server.addr, RelayConfig::symmetric(LinkProfile::default(), 3)).unwrap();
    let ping = |c: &UdpSocket| -> bool {
        c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        c.send_to(b"ping", relay.addr()).unwrap();
        let mut b = [0u8; 16];
        matches!(c.recv(&mut b), Ok(4) if &b[..4] == b"ping")
    };
    let a = UdpSocket::bind(localhost()).unwrap();
    assert!(ping(&a), "no echo through a perfect relay");
    relay.set_down(Direction::ToServer, true);
    assert!(!ping(&a), "an echo crossed a cut link");
    assert_eq!(relay.stats(Direction::ToServer).dropped_down, 1);
    relay.set_down(Direction::ToServer, false);
    relay.set_down(Direction::ToClient, true);
    assert!(!ping(&a), "an echo crossed a cut link");
    assert_eq!(relay.stats(Direction::ToClient).dropped_down, 1);
    relay.set_down(Direction::ToClient, false);
    // A client that comes back from another port (a restarted process) gets the replies.
    let b = UdpSocket::bind(localhost()).unwrap();
    assert!(ping(&b), "no echo to the new client");
    assert_eq!(relay.client(), Some(b.local_addr().unwrap()));
    // Datagrams to the upstream socket from anyone but the server are ignored.
    let stranger = UdpSocket::bind(localhost()).unwrap();
    stranger.send_to(b"junk", relay.upstream_addr()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(relay.stats(Direction::ToClient).packets_in, 3, "{}", relay.summary());
    // Shutdown: the threads stop and the port is free again.
    let addr = relay.addr();
    assert!(relay.running());
    let t = Instant::now();
    drop(relay);
    println!("relay stopped in {:?}", t.elapsed());
    UdpSocket::bind(addr).expect("the relay's port is still taken after drop");
}
