//! A userspace UDP relay that puts an emulated WAN link between two QUIC endpoints: one-way
//! delay, jitter, random loss and a rate cap (token bucket with a drop-tail queue), each
//! configurable per direction. This kernel has no netem; QUIC is plain UDP, so a relay in
//! the middle is all it takes.
//!
//! ```text
//!   client ──► listen (A) ─[to_server profile]─► upstream socket (B) ──► server
//!   client ◄── listen (A) ◄─[to_client profile]─ upstream socket (B) ◄── server
//! ```
//!
//! The client sends to [`Relay::addr`]; the relay forwards to the server from its upstream
//! socket, and the server's replies go back to the client's address, learned from (the
//! latest) packet it sent. Datagrams from anyone but the server on the upstream socket are
//! ignored. Each direction runs on a thread of its own; dropping the relay stops and joins
//! them.
//!
//! To put a relay between two Tandem nodes, the node that dials (the one whose name sorts
//! first) must see the relay's address as its peer's `address`, while the peer still listens
//! on its real one: see `Lab::route_via`.

use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The longest a worker sleeps before it looks at the stop flag again.
const POLL: Duration = Duration::from_millis(20);
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// What one direction of the emulated link does to the datagrams crossing it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// One-way propagation delay added to every datagram.
    pub delay: Duration,
    /// A further delay drawn uniformly from `[0, jitter]` per datagram.
    pub jitter: Duration,
    /// Probability that a datagram is dropped (0.0–1.0).
    pub loss: f64,
    /// Rate cap in bytes per second (`None`: unlimited).
    pub rate: Option<u64>,
    /// Token-bucket depth: bytes that may leave back to back after an idle period.
    pub burst: u64,
    /// Bytes that may wait for the rate cap; a datagram that would queue more is dropped
    /// (drop-tail, like a router's buffer).
    pub queue_limit: u64,
    /// Whether jitter may reorder datagrams (`false`: a datagram never overtakes an earlier
    /// one, as on a single path).
    pub reorder: bool,
}

impl Default for LinkProfile {
    /// A perfect link: no delay, no loss, no cap.
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate: None,
            burst: 64 << 10,
            queue_limit: 1 << 20,
            reorder: false,
        }
    }
}

impl LinkProfile {
    pub fn with_delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    pub fn with_jitter(mut self, d: Duration) -> Self {
        self.jitter = d;
        self
    }
    pub fn with_loss(mut self, p: f64) -> Self {
        assert!((0.0..=1.0).contains(&p), "loss {p} is not a probability");
        self.loss = p;
        self
    }
    /// Rate cap in bytes/s, with a burst of `burst` bytes and `queue_limit` bytes of queue.
    pub fn with_rate(mut self, bytes_per_sec: u64, burst: u64, queue_limit: u64) -> Self {
        assert!(bytes_per_sec > 0, "a rate cap of 0 bytes/s");
        self.rate = Some(bytes_per_sec);
        self.burst = burst;
        self.queue_limit = queue_limit;
        self
    }
    pub fn with_reorder(mut self, reorder: bool) -> Self {
        self.reorder = reorder;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (whoever sends to the relay's address) to the server.
    ToServer,
    /// From the server back to the client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    pub to_server: LinkProfile,
    pub to_client: LinkProfile,
    /// Seeds the loss and jitter draws (each direction its own stream).
    pub seed: u64,
}

impl RelayConfig {
    /// The same profile both ways.
    pub fn symmetric(p: LinkProfile, seed: u64) -> Self {
        Self { to_server: p, to_client: p, seed }
    }
}

/// Counters of one direction (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams (and their bytes) the relay received for this direction.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Datagrams (and bytes) sent on towards their destination.
    pub packets_forwarded: u64,
    pub bytes_forwarded: u64,
    /// Dropped by the random loss.
    pub dropped_loss: u64,
    /// Dropped because the rate cap's queue was full.
    pub dropped_queue: u64,
    /// Dropped because the direction was cut ([`Relay::set_down`]).
    pub dropped_down: u64,
    /// Replies dropped because no client had sent anything yet.
    pub dropped_no_client: u64,
    /// Datagrams the kernel refused to send (e.g. a full socket buffer).
    pub send_errors: u64,
    /// Datagrams waiting in the relay (delayed or queued) at the time of the snapshot.
    pub in_flight: u64,
    /// The largest datagram received (bytes of UDP payload): shows what path MTU the
    /// endpoints settled on.
    pub largest_datagram: u64,
}

impl DirectionStats {
    /// Every datagram received is forwarded, dropped for a reason, or still in flight.
    pub fn accounted(&self) -> bool {
        self.packets_in
            == self.packets_forwarded
                + self.dropped_loss
                + self.dropped_queue
                + self.dropped_down
                + self.dropped_no_client
                + self.send_errors
                + self.in_flight
    }
}

#[derive(Default)]
struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    packets_forwarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_down: AtomicU64,
    dropped_no_client: AtomicU64,
    send_errors: AtomicU64,
    in_flight: AtomicU64,
    largest_datagram: AtomicU64,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Shared {
    stop: AtomicBool,
    profiles: Mutex<[LinkProfile; 2]>,
    down: [AtomicBool; 2],
    client: Mutex<Option<SocketAddr>>,
    counters: [Counters; 2],
}

/// A running relay. Dropping it stops its threads (within [`POLL`]) and closes its sockets.
pub struct Relay {
    listen: SocketAddr,
    upstream: SocketAddr,
    server: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `listen` (port 0: any free port) and relays to `server`. The upstream
    /// socket binds an ephemeral port on `listen`'s IP.
    pub fn start(listen: SocketAddr, server: SocketAddr, cfg: RelayConfig) -> io::Result<Relay> {
        let a = UdpSocket::bind(listen)?;
        let b = UdpSocket::bind(SocketAddr::new(listen.ip(), 0))?;
        for s in [&a, &b] {
            s.set_nonblocking(true)?;
            grow_buffers(s);
        }
        let (listen, upstream) = (a.local_addr()?, b.local_addr()?);
        let (a, b) = (Arc::new(a), Arc::new(b));
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            profiles: Mutex::new([cfg.to_server, cfg.to_client]),
            down: [AtomicBool::new(false), AtomicBool::new(false)],
            client: Mutex::new(None),
            counters: [Counters::default(), Counters::default()],
        });
        let mut threads = Vec::new();
        for dir in [Direction::ToServer, Direction::ToClient] {
            let (rx, tx) = match dir {
                Direction::ToServer => (a.clone(), b.clone()),
                Direction::ToClient => (b.clone(), a.clone()),
            };
            let w = Worker {
                dir,
                rx,
                tx,
                server,
                shared: shared.clone(),
                rng: StdRng::seed_from_u64(
                    cfg.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(dir.index() as u64 + 1)),
                ),
                heap: BinaryHeap::new(),
                next_seq: 0,
                link_free_at: None,
                last_due: None,
            };
            let name = format!("relay-{}", if dir == Direction::ToServer { "up" } else { "down" });
            threads.push(std::thread::Builder::new().name(name).spawn(move || w.run())?);
        }
        Ok(Relay { listen, upstream, server, shared, threads })
    }

    /// The address clients send to (put it where the server's address would be).
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The address the server sees the relayed traffic come from.
    pub fn upstream_addr(&self) -> SocketAddr {
        self.upstream
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The client the relay currently answers to (the source of the latest datagram).
    pub fn client(&self) -> Option<SocketAddr> {
        *self.shared.client.lock().unwrap()
    }

    pub fn profile(&self, dir: Direction) -> LinkProfile {
        self.shared.profiles.lock().unwrap()[dir.index()]
    }

    /// Changes a direction's profile; it applies to datagrams received from now on.
    pub fn set_profile(&self, dir: Direction, p: LinkProfile) {
        self.shared.profiles.lock().unwrap()[dir.index()] = p;
    }

    /// Cuts (`true`) or restores one direction: while cut, every datagram is dropped.
    pub fn set_down(&self, dir: Direction, down: bool) {
        self.shared.down[dir.index()].store(down, Ordering::SeqCst);
    }

    pub fn stats(&self, dir: Direction) -> DirectionStats {
        let c = &self.shared.counters[dir.index()];
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirectionStats {
            packets_in: g(&c.packets_in),
            bytes_in: g(&c.bytes_in),
            packets_forwarded: g(&c.packets_forwarded),
            bytes_forwarded: g(&c.bytes_forwarded),
            dropped_loss: g(&c.dropped_loss),
            dropped_queue: g(&c.dropped_queue),
            dropped_down: g(&c.dropped_down),
            dropped_no_client: g(&c.dropped_no_client),
            send_errors: g(&c.send_errors),
            in_flight: g(&c.in_flight),
            largest_datagram: g(&c.largest_datagram),
        }
    }

    /// Whether both worker threads are still running (they stop only on drop, or if one
    /// panicked).
    pub fn running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// One line per direction, for test output.
    pub fn summary(&self) -> String {
        let line = |d: Direction| {
            let s = self.stats(d);
            format!(
                "{d:?}: {} pkts in (largest {} bytes), {} forwarded ({} bytes), dropped {} loss / {} queue / {} down / {} no client, {} send errors",
                s.packets_in,
                s.largest_datagram,
                s.packets_forwarded,
                s.bytes_forwarded,
                s.dropped_loss,
                s.dropped_queue,
                s.dropped_down,
                s.dropped_no_client,
                s.send_errors
            )
        };
        format!("{}\n{}", line(Direction::ToServer), line(Direction::ToClient))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Bigger socket buffers, so bursts at QUIC's pace are not dropped by the kernel before
/// the relay reads them (SO_*BUFFORCE as root, else the capped variant; best effort).
fn grow_buffers(s: &UdpSocket) {
    let size: libc::c_int = 8 << 20;
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        for opt in [force, plain] {
            // SAFETY: a valid socket and a pointer to a c_int of the length given.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &size as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
}

/// A datagram waiting for its departure.
struct Queued {
    due: Instant,
    seq: u64,
    data: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest departure must come first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

struct Worker {
    dir: Direction,
    rx: Arc<UdpSocket>,
    tx: Arc<UdpSocket>,
    server: SocketAddr,
    shared: Arc<Shared>,
    rng: StdRng,
    heap: BinaryHeap<Queued>,
    next_seq: u64,
    /// When the emulated bottleneck has sent everything admitted so far (token bucket as
    /// a virtual clock: it may lag `now` by up to the burst's worth of time).
    link_free_at: Option<Instant>,
    /// The latest departure scheduled, so that without `reorder` nothing overtakes.
    last_due: Option<Instant>,
}

impl Worker {
    fn counters(&self) -> &Counters {
        &self.shared.counters[self.dir.index()]
    }

    fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.send_due();
            let wait = match self.heap.peek() {
                Some(q) => q.due.saturating_duration_since(Instant::now()).min(POLL),
                None => POLL,
            };
            if !wait.is_zero() && !wait_readable(&self.rx, wait) {
                continue;
            }
            // Read what is there (a bounded batch, so departures are not held up).
            for _ in 0..256 {
                match self.rx.recv_from(&mut buf) {
                    Ok((n, from)) => self.received(&buf[..n], from),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // E.g. ECONNREFUSED reported for an earlier send: nothing to do.
                    Err(_) => break,
                }
            }
        }
    }

    fn received(&mut self, data: &[u8], from: SocketAddr) {
        match self.dir {
            Direction::ToServer => {
                let mut c = self.shared.client.lock().unwrap();
                if *c != Some(from) {
                    *c = Some(from);
                }
            }
            // Only the server's datagrams are relayed back.
            Direction::ToClient if from != self.server => return,
            Direction::ToClient => {}
        }
        let len = data.len() as u64;
        inc(&self.counters().packets_in, 1);
        inc(&self.counters().bytes_in, len);
        self.counters().largest_datagram.fetch_max(len, Ordering::Relaxed);
        if self.shared.down[self.dir.index()].load(Ordering::Relaxed) {
            inc(&self.counters().dropped_down, 1);
            return;
        }
        let p = self.shared.profiles.lock().unwrap()[self.dir.index()];
        if p.loss > 0.0 && self.rng.random::<f64>() < p.loss {
            inc(&self.counters().dropped_loss, 1);
            return;
        }
        let now = Instant::now();
        let mut depart = now;
        if let Some(rate) = p.rate {
            let per_byte = |b: u64| Duration::from_secs_f64(b as f64 / rate as f64);
            // Tokens accumulate up to `burst`: the virtual clock may lag `now` by that much.
            let earliest = now.checked_sub(per_byte(p.burst)).unwrap_or(now);
            let start = self.link_free_at.map_or(earliest, |f| f.max(earliest));
            let free_at = start + per_byte(len);
            let queued = free_at.saturating_duration_since(now);
            if queued.as_secs_f64() * rate as f64 > p.queue_limit as f64 {
                inc(&self.counters().dropped_queue, 1);
                return;
            }
            self.link_free_at = Some(free_at);
            depart = free_at.max(now);
        }
        let jitter =
            if p.jitter.is_zero() { Duration::ZERO } else { p.jitter.mul_f64(self.rng.random::<f64>()) };
        let mut due = depart + p.delay + jitter;
        if !p.reorder {
            if let Some(last) = self.last_due {
                due = due.max(last);
            }
            self.last_due = Some(due);
        }
        self.next_seq += 1;
        inc(&self.counters().in_flight, 1);
        self.heap.push(Queued { due, seq: self.next_seq, data: data.to_vec() });
    }

    fn send_due(&mut self) {
        let now = Instant::now();
        while self.heap.peek().is_some_and(|q| q.due <= now) {
            let q = self.heap.pop().expect("peeked");
            self.counters().in_flight.fetch_sub(1, Ordering::Relaxed);
            let dest = match self.dir {
                Direction::ToServer => Some(self.server),
                Direction::ToClient => *self.shared.client.lock().unwrap(),
            };
            let Some(dest) = dest else {
                inc(&self.counters().dropped_no_client, 1);
                continue;
            };
            match self.tx.send_to(&q.data, dest) {
                Ok(_) => {
                    inc(&self.counters().packets_forwarded, 1);
                    inc(&self.counters().bytes_forwarded, q.data.len() as u64);
                }
                Err(_) => inc(&self.counters().send_errors, 1),
            }
        }
    }
}

/// Waits up to `timeout` (nanosecond resolution, unlike SO_RCVTIMEO's jiffies) until `s`
/// has a datagram; false on timeout.
fn wait_readable(s: &UdpSocket, timeout: Duration) -> bool {
    let mut fds = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    let r = unsafe { libc::ppoll(&mut fds, 1, &ts, std::ptr::null()) };
    r > 0
}
