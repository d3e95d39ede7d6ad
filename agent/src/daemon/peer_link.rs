//! One QUIC connection to a peer node: handshake, heartbeats, control messages, and the
//! streams each resource opens on it.
//!
//! The node whose name sorts first dials; the other accepts. The dialer opens the control
//! stream; both send a hello at once and check the other's: protocol version, cluster and
//! the node named by the certificate — a mismatch there refuses the connection, with a
//! reason both logs show. Everything about a resource is the resource's own business: the
//! hello carries each side's offer of the resources it shares, and from there on each
//! resource's session with the peer lives and dies on its own (see
//! `tandem_replicator::relation`); a refusal, split brain, timeout or bad frame in one
//! resource never ends the connection the others use.
//!
//! Control messages are never dropped: the queue to the control stream is unbounded, and a
//! peer that cannot keep up with it for [`CONTROL_QUEUE_LIMIT`] messages has its
//! connection closed with that reason (every resource then restarts from a known state).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use quinn::{Connection, VarInt};
use tandem_protocol::{Compression, ControlMsg, Frame, Hello, StreamPurpose, PROTOCOL_VERSION};
use tandem_replicator::Link;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Agent;
use crate::config::Node;
use crate::transport::framed::{spawn_link, FrameReader, FrameWriter, WireCounts};
use crate::transport::{close_code, describe_close, peer_node};

/// Control messages queued for one connection beyond which the peer is declared unable to
/// keep up and the connection is closed (a bound on memory, never a silent drop).
pub const CONTROL_QUEUE_LIMIT: usize = 1 << 20;

/// A handle on a live connection that resources use.
#[derive(Clone)]
pub struct PeerConn {
    pub node: String,
    conn: Connection,
    control: ControlQueue,
}

/// The sending side of a connection's control stream: ordered, unbounded up to
/// [`CONTROL_QUEUE_LIMIT`] queued messages.
#[derive(Clone)]
pub struct ControlQueue {
    tx: mpsc::UnboundedSender<Frame>,
    queued: Arc<AtomicUsize>,
}

impl ControlQueue {
    pub fn new() -> (Self, ControlReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (Self { tx, queued: queued.clone() }, ControlReceiver { rx, queued })
    }

    /// Queues `f`; `Err` with the reason when the connection must be closed instead.
    fn push(&self, f: Frame) -> Result<(), String> {
        let n = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        if n > CONTROL_QUEUE_LIMIT {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(format!("{n} control messages queued: the peer does not keep up"));
        }
        if self.tx.send(f).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err("control stream closed".into());
        }
        Ok(())
    }
}

pub struct ControlReceiver {
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicUsize>,
}

impl ControlReceiver {
    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        Some(f)
    }
}

impl PeerConn {
    pub fn new(node: &str, conn: Connection, control: ControlQueue) -> Self {
        Self { node: node.to_string(), conn, control }
    }

    pub fn id(&self) -> usize {
        self.conn.stable_id()
    }

    /// Queues a control message, in order with every other one on this connection. It is
    /// never dropped: if it cannot be queued, the connection is closed with the reason (and
    /// every resource's session restarts when it is re-established).
    pub fn send_control(&self, msg: ControlMsg) {
        if let Err(why) = self.control.push(Frame::Control(msg)) {
            if self.conn.close_reason().is_none() {
                error!(peer = %self.node, "closing the connection: {why}");
                self.conn.close(VarInt::from_u32(close_code::PROTOCOL_ERROR), why.as_bytes());
            }
        }
    }

    pub fn close(&self, code: u32, reason: &str) {
        self.conn.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Opens a stream for `resource` (replication or resync). Block data on it is
    /// compressed with `compression` where that pays. `cancel` ends the stream (and only
    /// it) when the resource's session with the peer ends.
    pub async fn open_stream(
        &self,
        resource: &str,
        purpose: StreamPurpose,
        compression: Compression,
        counts: Arc<WireCounts>,
        cancel: CancellationToken,
    ) -> Result<Link> {
        let (send, recv) = self.conn.open_bi().await?;
        let mut w = FrameWriter::new(send).with_compression(compression, counts);
        w.send(&Frame::Control(ControlMsg::OpenStream { resource: resource.to_string(), purpose })).await?;
        Ok(spawn_link(w, FrameReader::new(recv), self.node.clone(), cancel))
    }
}

/// Whether `me` dials `peer` (the lower name dials).
pub fn dials(me: &str, peer: &str) -> bool {
    me < peer
}

/// Dials `peer` for as long as the agent runs, re-establishing lost connections.
pub async fn dial_loop(agent: Arc<Agent>, peer: Node) {
    let retry = agent.cfg.options.connect_retry;
    let mut backoff = retry;
    loop {
        if agent.stopping() {
            return;
        }
        match agent.transport.connect(&peer).await {
            Ok(conn) => match serve(agent.clone(), conn, &peer.name, true).await {
                Ok(()) => backoff = retry,
                Err(e) => {
                    // A refused handshake will be refused again: back off harder.
                    warn!(peer = %peer.name, "connection refused: {e:#}");
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            },
            Err(e) => {
                tracing::debug!(peer = %peer.name, "connect failed: {e:#}");
                backoff = retry;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = agent.redial.notified() => backoff = retry,
            _ = agent.shutdown.cancelled() => return,
        }
    }
}

/// Handles an incoming connection attempt.
pub async fn accept(agent: Arc<Agent>, incoming: quinn::Incoming) {
    let from = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            warn!(%from, "refused connection: TLS handshake failed: {e}");
            return;
        }
    };
    let Some(node) = peer_node(&conn, agent.transport.pinned()) else {
        warn!(%from, "refused connection: peer certificate not configured");
        conn.close(VarInt::from_u32(close_code::HANDSHAKE_REFUSED), b"certificate not configured");
        return;
    };
    if !dials(&node, &agent.me.name) {
        let reason = format!("{} dials {node}, not the other way round", agent.me.name);
        warn!(%from, "refused connection from {node}: {reason}");
        conn.close(VarInt::from_u32(close_code::HANDSHAKE_REFUSED), reason.as_bytes());
        return;
    }
    if let Err(e) = serve(agent, conn, &node, false).await {
        warn!(peer = %node, "connection refused: {e:#}");
    }
}

async fn read_hello(r: &mut FrameReader, timeout: Duration) -> Result<Hello> {
    let f = tokio::time::timeout(timeout, r.next())
        .await
        .map_err(|_| anyhow!("no hello within {timeout:?}"))??
        .ok_or_else(|| anyhow!("stream closed before hello"))?;
    match f {
        Frame::Hello { version, body } => {
            if version != PROTOCOL_VERSION {
                bail!(
                    "peer speaks protocol version {version}, this node speaks version {PROTOCOL_VERSION}; \
                     run the same tandem version on both nodes"
                );
            }
            Ok(Frame::hello_body(&body)?)
        }
        Frame::Control(ControlMsg::Refuse { reason }) => {
            bail!("peer refused the handshake: {reason}")
        }
        other => bail!("expected hello, got a {} frame", other.kind().name()),
    }
}

/// Checks the peer's hello against our configuration; returns the reason to refuse the
/// connection. Only what concerns the connection as a whole: resources are checked by
/// their own sessions.
fn check_hello(agent: &Agent, node: &str, h: &Hello) -> Result<(), String> {
    if h.cluster != agent.cfg.cluster {
        return Err(format!("peer is in cluster {:?}, this node in {:?}", h.cluster, agent.cfg.cluster));
    }
    if h.node != node {
        return Err(format!("peer says it is node {:?} but presented the certificate of {node:?}", h.node));
    }
    Ok(())
}

/// Runs a connection from handshake to its end. `Err` means the handshake was refused.
async fn serve(agent: Arc<Agent>, conn: Connection, node: &str, dialed: bool) -> Result<()> {
    let timeout = agent.cfg.options.timeout;
    let shared: Vec<_> = agent.resources.values().filter(|r| r.has_peer(node)).cloned().collect();
    // Each resource's side as this node offers it; resources disconnected by the
    // administrator are not offered (the peer then waits for an offer).
    let sent: BTreeMap<String, _> = shared.iter().map(|r| (r.name.clone(), r.hello_for(node))).collect();
    let hello = Hello {
        cluster: agent.cfg.cluster.clone(),
        node: agent.me.name.clone(),
        resources: shared.iter().filter(|r| r.offers(node)).map(|r| sent[&r.name].clone()).collect(),
    };
    let (send, recv) = if dialed {
        conn.open_bi().await?
    } else {
        tokio::time::timeout(timeout, conn.accept_bi()).await.map_err(|_| anyhow!("no control stream"))??
    };
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    w.send(&Frame::hello(&hello)).await?;
    let checked = match read_hello(&mut r, timeout).await {
        Ok(h) => check_hello(&agent, node, &h).map(|_| h),
        Err(e) => Err(format!("{e:#}")),
    };
    let theirs = match checked {
        Ok(h) => h,
        Err(why) => {
            let reason = format!("handshake with {node} refused: {why}");
            error!("{reason}");
            for res in &shared {
                res.peer_refused(node, &reason);
            }
            let _ = w.send(&Frame::Control(ControlMsg::Refuse { reason: why })).await;
            // Give the refusal a moment to reach the peer before closing.
            tokio::time::sleep(Duration::from_millis(100)).await;
            conn.close(VarInt::from_u32(close_code::HANDSHAKE_REFUSED), reason.as_bytes());
            bail!(reason);
        }
    };
    if let Some(old) = agent.register_connection(node, conn.clone()) {
        old.close(VarInt::from_u32(close_code::DUPLICATE), b"replaced by a newer connection");
    }
    info!(peer = %node, remote = %conn.remote_address(), "connected");

    let (control_tx, mut control_rx) = ControlQueue::new();
    let pc = PeerConn::new(node, conn.clone(), control_tx.clone());
    let mut offered: BTreeMap<String, _> =
        theirs.resources.into_iter().map(|r| (r.name.clone(), r)).collect();
    for res in &shared {
        res.link_up(pc.clone(), sent[&res.name].clone(), offered.remove(&res.name));
    }
    for name in offered.keys() {
        warn!(peer = %node, "the peer offers resource {name:?}, which this node does not share with it");
    }

    let started = Instant::now();
    let last_heard = Arc::new(AtomicU64::new(0));
    let heard = || started.elapsed().as_millis() as u64;
    let writer = async {
        while let Some(f) = control_rx.recv().await {
            if w.send(&f).await.is_err() {
                break;
            }
        }
    };
    let heartbeat = async {
        let mut nonce = 0u64;
        loop {
            tokio::time::sleep(agent.cfg.options.heartbeat_interval).await;
            nonce += 1;
            if control_tx.push(Frame::Heartbeat { nonce, reply: false }).is_err() {
                return;
            }
        }
    };
    // A resource's control message; `None` for a resource this node does not share with the
    // peer (a configuration difference, logged once per message).
    let resource = |name: &str| {
        let r = agent.resources.get(name).filter(|r| r.has_peer(node)).cloned();
        if r.is_none() {
            warn!(peer = %node, "control message for resource {name:?}, which this node does not share with it");
        }
        r
    };
    let reader = async {
        loop {
            let f = match r.next().await {
                Ok(Some(f)) => f,
                Ok(None) => return "control stream closed".to_string(),
                Err(e) => {
                    let reason = format!("control stream from {node}: {e}");
                    conn.close(VarInt::from_u32(close_code::PROTOCOL_ERROR), reason.as_bytes());
                    return reason;
                }
            };
            last_heard.store(heard(), Ordering::Relaxed);
            match f {
                Frame::Heartbeat { nonce, reply: false } => {
                    if control_tx.push(Frame::Heartbeat { nonce, reply: true }).is_err() {
                        return "control stream closed".to_string();
                    }
                }
                Frame::Heartbeat { reply: true, .. } => {}
                Frame::Control(ControlMsg::ResourceUp { hello, answer }) => {
                    if let Some(res) = resource(&hello.name) {
                        res.on_offer(node, hello, answer);
                    }
                }
                Frame::Control(ControlMsg::ResourceDown { resource: name, reason, declines_offer }) => {
                    if let Some(res) = resource(&name) {
                        res.on_withdraw(node, reason, declines_offer);
                    }
                }
                Frame::Control(ControlMsg::ResourceState(rh)) => {
                    if let Some(res) = resource(&rh.name) {
                        res.on_remote_state(node, rh);
                    }
                }
                Frame::Control(ControlMsg::Bitmap { resource: name, runs, last }) => {
                    if let Some(res) = resource(&name) {
                        res.on_bitmap(node, runs, last);
                    }
                }
                Frame::Control(ControlMsg::Invalidate { resource: name, checksum }) => {
                    if let Some(res) = resource(&name) {
                        res.on_invalidate(node, checksum);
                    }
                }
                Frame::Control(ControlMsg::ResyncStart { resource: name, kind, total_bytes, generation }) => {
                    if let Some(res) = resource(&name) {
                        res.on_resync_start(node, kind, total_bytes, generation);
                    }
                }
                Frame::Control(ControlMsg::ResyncDone { resource: name, generation }) => {
                    if let Some(res) = resource(&name) {
                        res.on_resync_done(node, generation);
                    }
                }
                Frame::Control(ControlMsg::BarrierRequest { resource: name }) => {
                    if let Some(res) = resource(&name) {
                        res.on_barrier_request(node);
                    }
                }
                Frame::Control(ControlMsg::Error { reason }) => return format!("peer reported: {reason}"),
                other => {
                    let reason = format!("unexpected {} frame on the control stream", other.kind().name());
                    conn.close(VarInt::from_u32(close_code::PROTOCOL_ERROR), reason.as_bytes());
                    return reason;
                }
            }
        }
    };
    let watchdog = async {
        loop {
            tokio::time::sleep(agent.cfg.options.heartbeat_interval / 2).await;
            let silent = heard().saturating_sub(last_heard.load(Ordering::Relaxed));
            if silent > timeout.as_millis() as u64 {
                let reason = format!("no heartbeat from {node} for {:.1}s", silent as f64 / 1000.0);
                conn.close(VarInt::from_u32(close_code::TIMEOUT), reason.as_bytes());
                return reason;
            }
        }
    };
    let streams = async {
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => return describe_close(&e),
            };
            let (agent, pc, node) = (agent.clone(), pc.clone(), node.to_string());
            tokio::spawn(async move {
                let mut r = FrameReader::new(recv);
                match tokio::time::timeout(Duration::from_secs(10), r.next()).await {
                    Ok(Ok(Some(Frame::Control(ControlMsg::OpenStream { resource, purpose })))) => {
                        match agent.resources.get(&resource).filter(|res| res.has_peer(&node)) {
                            Some(res) => {
                                res.accept_stream(&node, &pc, purpose, FrameWriter::new(send), r).await
                            }
                            None => warn!(peer = %node, "stream for unknown resource {resource:?} ignored"),
                        }
                    }
                    other => {
                        warn!(peer = %node, "stream without a valid opening frame ignored: {other:?}")
                    }
                }
            });
        }
    };
    let reason = tokio::select! {
        _ = writer => "control writer ended".to_string(),
        _ = heartbeat => "heartbeat ended".to_string(),
        r = reader => r,
        r = watchdog => r,
        r = streams => r,
        e = conn.closed() => describe_close(&e),
        _ = agent.shutdown.cancelled() => "agent shutting down".to_string(),
    };
    if conn.close_reason().is_none() {
        conn.close(VarInt::from_u32(close_code::SHUTDOWN), reason.as_bytes());
    }
    agent.unregister_connection(node, &conn);
    warn!(peer = %node, "disconnected: {reason}");
    for res in &shared {
        res.link_down(node, pc.id(), &reason);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Node;
    use crate::tls::{self, Identity, PinnedPeers};
    use crate::transport::{Transport, TransportSettings};

    fn node(dir: &std::path::Path, name: &str, port: u16) -> Node {
        let (cert, key) = tls::keygen(name, dir, false).unwrap();
        Node {
            name: name.into(),
            address: format!("127.0.0.1:{port}").parse().unwrap(),
            control: dir.join(format!("{name}.sock")),
            run_dir: dir.join(name),
            device_dir: dir.join(name).join("dev"),
            metrics: None,
            cert,
            key,
        }
    }

    fn transport(me: &Node, peer: &Node) -> Transport {
        let mut pinned = PinnedPeers::default();
        pinned.insert(&peer.name, &tls::load_certs(&peer.cert).unwrap()[0]);
        let settings = TransportSettings {
            stream_window: 16 << 20,
            heartbeat_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            max_mtu: 1452,
            bbr: false,
            socket_buffer: 1 << 20,
        };
        Transport::bind(Identity::load(&me.cert, &me.key).unwrap(), pinned, settings, me.address).unwrap()
    }

    /// A burst of control messages far larger than any channel a sender could wait on,
    /// queued synchronously (as resources do, under their locks) over a real QUIC
    /// connection: every one arrives, in order. (The queue used to be a bounded channel fed
    /// with `try_send`, which dropped what did not fit — `Bitmap{last}`, `ResyncStart` and
    /// `ResyncDone` included.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_flood_of_control_messages_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let port = |_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (a, b) = (node(dir.path(), "alpha", port(0)), node(dir.path(), "beta", port(1)));
        let (ta, tb) = (transport(&a, &b), transport(&b, &a));
        let dial = async {
            let c = ta.connect(&b).await.unwrap();
            let (send, _) = c.open_bi().await.unwrap();
            let mut w = FrameWriter::new(send);
            // The stream exists for the peer once something is sent on it.
            w.send(&Frame::Heartbeat { nonce: 0, reply: false }).await.unwrap();
            (c, w)
        };
        let accept = async {
            let c = tb.accept().await.unwrap().await.unwrap();
            let (_, recv) = c.accept_bi().await.unwrap();
            let mut r = FrameReader::new(recv);
            assert!(matches!(r.next().await.unwrap(), Some(Frame::Heartbeat { .. })));
            (c, r)
        };
        let ((conn, mut w), (_server, mut reader)) = tokio::join!(dial, accept);
        let (queue, mut rx) = ControlQueue::new();
        let pc = PeerConn::new("beta", conn.clone(), queue);
        const N: u64 = 100_000;
        for i in 0..N {
            pc.send_control(ControlMsg::Bitmap {
                resource: "r".into(),
                runs: vec![(i, 1)],
                last: i == N - 1,
            });
        }
        let writer = async move {
            while let Some(f) = rx.recv().await {
                w.send(&f).await.unwrap();
            }
        };
        let check = async move {
            for want in 0..N {
                match reader.next().await.unwrap() {
                    Some(Frame::Control(ControlMsg::Bitmap { runs, last, .. })) => {
                        assert_eq!(runs, vec![(want, 1)], "message {want} lost or out of order");
                        assert_eq!(last, want == N - 1);
                    }
                    other => panic!("message {want}: unexpected {other:?}"),
                }
            }
        };
        let run = async {
            tokio::select! {
                _ = writer => panic!("the control writer ended early"),
                _ = check => {}
            }
        };
        // Generous: a broken queue must fail the test, not hang it.
        tokio::time::timeout(Duration::from_secs(60), run).await.expect("the flood did not arrive");
        assert!(conn.close_reason().is_none(), "the connection was closed: {:?}", conn.close_reason());
    }
}
