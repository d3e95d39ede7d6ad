//! What one wake-up costs on this machine (`tandem-bench --wakeups`): a message and its
//! reply between two threads, both pinned to one CPU and then to two different CPUs, over
//! the three paths a replicated write crosses —
//!
//! - a std channel: a hand-off between threads of one process (the FUSE thread to the
//!   network thread, the network thread to an apply thread and back);
//! - UDP on loopback: the kernel's part of each wire leg;
//! - the agent's own QUIC transport (`tandem_agent::transport`, mutual TLS, 4 KiB up and
//!   16 bytes back, like a write and its ack): what quinn and the cipher add.
//!
//! On one CPU the woken thread runs on the CPU that woke it; on two, waking it means an
//! inter-processor interrupt and, if the other CPU was idle, bringing it out of halt — on a
//! virtual machine an exit to the host each (see docs/benchmarks.md). A replicated write
//! at queue depth 1 wakes about five threads across the two agents, so the difference
//! between the two columns, times five, is what the machine charges the data path before
//! any of its own work.

use std::net::UdpSocket;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tandem_agent::config::{Node, Options};
use tandem_agent::tls::{self, Identity, PinnedPeers};
use tandem_agent::transport::{Transport, TransportSettings};

const WARMUP: usize = 2_000;
const ROUNDS: usize = 20_000;
/// A 4 KiB write's frame (its head and the block), and its ack.
const REQUEST: usize = 4096 + 16;
const REPLY: usize = 16;

/// Medians and means of one path, in µs.
struct Latency {
    p50: f64,
    p99: f64,
    mean: f64,
}

impl Latency {
    fn of(mut rtts: Vec<f64>, total: Duration) -> Self {
        let mean = total.as_secs_f64() * 1e6 / rtts.len() as f64;
        rtts.sort_by(f64::total_cmp);
        Self { p50: rtts[rtts.len() / 2], p99: rtts[rtts.len() * 99 / 100], mean }
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity are given a
    // set of the right size for the calling thread (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!("cannot pin a thread to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `server` on a thread pinned to `server_cpu` and `client` on one pinned to
/// `client_cpu`; the client returns its round-trip times.
fn pair<S, C>(server_cpu: usize, client_cpu: usize, server: S, client: C) -> Result<Latency>
where
    S: FnOnce() -> Result<()> + Send + 'static,
    C: FnOnce() -> Result<(Vec<f64>, Duration)> + Send + 'static,
{
    let s = std::thread::spawn(move || pin(server_cpu).and_then(|_| server()));
    let c = std::thread::spawn(move || pin(client_cpu).and_then(|_| client()));
    let (rtts, total) = c.join().map_err(|_| anyhow!("the client thread panicked"))??;
    s.join().map_err(|_| anyhow!("the server thread panicked"))??;
    Ok(Latency::of(rtts, total))
}

/// `round` once per warm-up and timed round; the timed rounds' times and their total.
fn time_rounds(mut round: impl FnMut() -> Result<()>) -> Result<(Vec<f64>, Duration)> {
    for _ in 0..WARMUP {
        round()?;
    }
    let mut rtts = Vec::with_capacity(ROUNDS);
    let start = Instant::now();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        round()?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((rtts, start.elapsed()))
}

fn channel(server_cpu: usize, client_cpu: usize) -> Result<Latency> {
    let (to_server, requests) = mpsc::channel::<Vec<u8>>();
    let (to_client, replies) = mpsc::channel::<Vec<u8>>();
    pair(
        server_cpu,
        client_cpu,
        move || {
            while let Ok(req) = requests.recv() {
                if to_client.send(req).is_err() {
                    break;
                }
            }
            Ok(())
        },
        move || {
            let r = time_rounds(|| {
                to_server.send(vec![0u8; REPLY]).map_err(|_| anyhow!("the channel's server ended"))?;
                replies.recv().map(drop).map_err(|_| anyhow!("the channel's server ended"))
            });
            drop(to_server);
            r
        },
    )
}

fn udp(server_cpu: usize, client_cpu: usize) -> Result<Latency> {
    let server = UdpSocket::bind("127.0.0.1:0").context("UDP on loopback")?;
    let client = UdpSocket::bind("127.0.0.1:0").context("UDP on loopback")?;
    server.connect(client.local_addr()?)?;
    client.connect(server.local_addr()?)?;
    // The server ends when no request comes for this long (the client is done).
    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    pair(
        server_cpu,
        client_cpu,
        move || {
            let mut buf = vec![0u8; REQUEST];
            while server.recv(&mut buf).is_ok() {
                server.send(&buf[..REPLY])?;
            }
            Ok(())
        },
        move || {
            let req = vec![7u8; REQUEST];
            let mut buf = vec![0u8; REQUEST];
            time_rounds(|| {
                client.send(&req)?;
                let n = client.recv(&mut buf).context("no UDP reply within 10 s")?;
                if n != REPLY {
                    bail!("UDP reply of {n} bytes, not {REPLY}");
                }
                Ok(())
            })
        },
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The agent's default transport settings.
fn settings() -> TransportSettings {
    TransportSettings::from_options(&Options::default())
}

/// Two nodes' identities in `dir`, each pinning the other, as the agent's are.
fn identities(dir: &std::path::Path) -> Result<[(Identity, PinnedPeers); 2]> {
    let (a_crt, a_key) = tls::keygen("alpha", dir, true)?;
    let (b_crt, b_key) = tls::keygen("beta", dir, true)?;
    let a_cert = tls::load_certs(&a_crt)?.remove(0);
    let b_cert = tls::load_certs(&b_crt)?.remove(0);
    let mut a_pins = PinnedPeers::default();
    a_pins.insert("beta", &b_cert);
    let mut b_pins = PinnedPeers::default();
    b_pins.insert("alpha", &a_cert);
    Ok([(Identity::load(&a_crt, &a_key)?, a_pins), (Identity::load(&b_crt, &b_key)?, b_pins)])
}

fn quic(server_cpu: usize, client_cpu: usize, dir: &std::path::Path) -> Result<Latency> {
    let [(a_id, a_pins), (b_id, b_pins)] = identities(dir)?;
    let (addr_tx, addr_rx) = mpsc::channel();
    let run_dir = dir.to_path_buf();
    pair(
        server_cpu,
        client_cpu,
        move || {
            runtime()?.block_on(async move {
                let t = Transport::bind(b_id, b_pins, settings(), "127.0.0.1:0".parse()?)?;
                addr_tx.send(t.local_addr()?).map_err(|_| anyhow!("the QUIC client ended"))?;
                let conn = t.accept().await.ok_or_else(|| anyhow!("endpoint closed"))?.await?;
                let (mut send, mut recv) = conn.accept_bi().await?;
                let mut buf = vec![0u8; REQUEST];
                while recv.read_exact(&mut buf).await.is_ok() {
                    send.write_all(&buf[..REPLY]).await?;
                }
                Ok(())
            })
        },
        move || {
            let server =
                addr_rx.recv_timeout(Duration::from_secs(10)).context("the QUIC server did not start")?;
            let rt = runtime()?;
            rt.block_on(async move {
                let t = Transport::bind(a_id, a_pins, settings(), "127.0.0.1:0".parse()?)?;
                let beta = Node {
                    name: "beta".into(),
                    address: server,
                    control: run_dir.join("control"),
                    run_dir: run_dir.clone(),
                    device_dir: run_dir.clone(),
                    metrics: None,
                    cert: run_dir.join("beta.crt"),
                    key: run_dir.join("beta.key"),
                };
                let conn = t.connect(&beta).await?;
                let (mut send, mut recv) = conn.open_bi().await?;
                let req = vec![7u8; REQUEST];
                let mut reply = [0u8; REPLY];
                for _ in 0..WARMUP {
                    send.write_all(&req).await?;
                    recv.read_exact(&mut reply).await?;
                }
                // As `time_rounds`, awaiting on this thread's runtime.
                let mut rtts = Vec::with_capacity(ROUNDS);
                let start = Instant::now();
                for _ in 0..ROUNDS {
                    let t = Instant::now();
                    send.write_all(&req).await?;
                    recv.read_exact(&mut reply).await?;
                    rtts.push(t.elapsed().as_secs_f64() * 1e6);
                }
                let total = start.elapsed();
                send.finish()?;
                conn.close(0u32.into(), b"done");
                t.wait_idle().await;
                Ok((rtts, total))
            })
        },
    )
}

/// One path's measurement, given the server's and the client's CPU.
type Measure<'a> = Box<dyn Fn(usize, usize) -> Result<Latency> + 'a>;

/// The table `--wakeups` prints.
pub fn run(work: &std::path::Path) -> Result<String> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cpus < 2 {
        bail!("--wakeups compares one CPU with two; this machine offers {cpus}");
    }
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    // The probe's keys; removed when dropped, on every path out.
    let keys = tempfile::tempdir_in(work)
        .with_context(|| format!("cannot create a directory in {}", work.display()))?;
    let dir = keys.path();
    let mut out = String::from(
        "| path (message and reply) | one CPU: p50 µs | p99 | mean | two CPUs: p50 µs | p99 | mean |\n|---|---|---|---|---|---|---|\n",
    );
    let rows: [(&str, Measure); 3] = [
        ("std channel between two threads", Box::new(channel)),
        ("UDP on loopback, 4 KiB and 16 B", Box::new(udp)),
        ("the agent's QUIC (mutual TLS), 4 KiB and 16 B", Box::new(|s, c| quic(s, c, dir))),
    ];
    for (name, measure) in &rows {
        let same = measure(0, 0).with_context(|| format!("{name}, one CPU"))?;
        let cross = measure(0, 1).with_context(|| format!("{name}, two CPUs"))?;
        out.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            same.p50, same.p99, same.mean, cross.p50, cross.p99, cross.mean
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each path carries its messages and replies end to end (sizes checked on the way);
    /// no figure is asserted — they are the machine's, not the code's.
    #[test]
    fn every_path_completes_its_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        for (name, l) in [("channel", channel(0, 0)), ("udp", udp(0, 0)), ("quic", quic(0, 0, dir.path()))] {
            let l = l.unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert!(l.p50 > 0.0 && l.p50 <= l.p99, "{name}: p50 {} p99 {}", l.p50, l.p99);
        }
    }
}
