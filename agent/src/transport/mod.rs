//! QUIC transport: one endpoint per node, one connection per peer node, mutual TLS with
//! pinned certificates, and streams carrying Tandem frames.

pub mod framed;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;

use crate::config::{Config, Node, Options};
use crate::tls::{self, Identity, PinnedPeers};

/// QUIC application error codes used when closing a connection.
pub mod close_code {
    pub const SHUTDOWN: u32 = 0;
    pub const HANDSHAKE_REFUSED: u32 = 1;
    pub const PROTOCOL_ERROR: u32 = 2;
    pub const TIMEOUT: u32 = 3;
    pub const CHECKSUM: u32 = 4;
    pub const DUPLICATE: u32 = 5;
    pub const ROLE_CONFLICT: u32 = 6;
    /// The cluster manager reported the peer down (`tandem peer-lost`).
    pub const PEER_LOST: u32 = 7;
}

/// SNI for every connection: identity is established by the pinned certificate, not by name.
const SERVER_NAME: &str = "tandem";

#[derive(Debug, Clone)]
pub struct TransportSettings {
    pub stream_window: u64,
    pub heartbeat_interval: Duration,
    pub timeout: Duration,
    /// Largest UDP payload MTU discovery may try.
    pub max_mtu: u16,
    /// BBR instead of CUBIC congestion control (lossy WAN links).
    pub bbr: bool,
    /// Receive and send buffer of the endpoint's UDP socket (bytes).
    pub socket_buffer: usize,
}

impl TransportSettings {
    pub fn from_config(c: &Config) -> Self {
        Self::from_options(&c.options)
    }

    pub fn from_options(o: &Options) -> Self {
        Self {
            stream_window: o.stream_window,
            heartbeat_interval: o.heartbeat_interval,
            timeout: o.timeout,
            max_mtu: o.max_mtu,
            bbr: o.congestion == crate::config::Congestion::Bbr,
            socket_buffer: o.socket_buffer as usize,
        }
    }

    fn quinn(&self) -> Result<Arc<TransportConfig>> {
        let mut t = TransportConfig::default();
        let w = self.stream_window;
        t.stream_receive_window(VarInt::from_u64(w).context("stream_window too large")?)
            .receive_window(VarInt::from_u64(w * 4).context("stream_window too large")?)
            .send_window(w * 4)
            .max_concurrent_bidi_streams(VarInt::from_u32(256))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            // Our own heartbeats decide liveness; QUIC's idle timeout is the backstop.
            .max_idle_timeout(Some(IdleTimeout::try_from(self.timeout * 2).context("timeout too large")?))
            .keep_alive_interval(Some(self.heartbeat_interval));
        // Probe for paths larger than Ethernet's 1500 bytes (jumbo frames, loopback): at
        // 1 MiB per write, per-packet costs dominate the CPU spent on replication.
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_mtu);
        t.mtu_discovery_config(Some(mtu));
        if self.bbr {
            // Loss-based control (CUBIC) holds a lossy long path to MSS/RTT x 1.22/sqrt(loss):
            // ~0.35 MB/s at 50 ms and 1 % loss. BBR paces to the measured bottleneck instead.
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Ok(Arc::new(t))
    }
}

/// Asks the kernel for `bytes` of receive and of send buffer on the endpoint's socket (past
/// `net.core.rmem_max`/`wmem_max` when the agent may, as root), and says what it got.
///
/// The default buffers (`rmem_default`, ~208 KiB) hold a few milliseconds of replication
/// traffic: when the network thread is busy for longer the kernel drops what arrives, QUIC
/// counts it lost, backs its congestion window off and, losing large packets, decides the
/// path cannot carry them and falls back to 1200-byte packets (docs/benchmarks.md).
/// Returns the receive and send buffer granted.
fn size_buffers(socket: &std::net::UdpSocket, bytes: usize) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let set = |force: libc::c_int, plain: libc::c_int| -> usize {
        let v = bytes.min(libc::c_int::MAX as usize / 2) as libc::c_int;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let p = &v as *const libc::c_int as *const libc::c_void;
        // SAFETY: setsockopt/getsockopt on a socket we own, with an int-sized option value.
        unsafe {
            if libc::setsockopt(fd, libc::SOL_SOCKET, force, p, len) != 0 {
                libc::setsockopt(fd, libc::SOL_SOCKET, plain, p, len);
            }
            let mut got: libc::c_int = 0;
            let mut got_len = len;
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                plain,
                &mut got as *mut libc::c_int as *mut libc::c_void,
                &mut got_len,
            );
            // The kernel reports twice what it grants (the other half is its bookkeeping).
            (got.max(0) as usize) / 2
        }
    };
    let rcv = set(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    let snd = set(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    if rcv < bytes || snd < bytes {
        tracing::warn!(
            wanted = bytes,
            receive = rcv,
            send = snd,
            "UDP socket buffers smaller than options.socket_buffer (not root? raise net.core.rmem_max and wmem_max): \
             bursts may be dropped and count as loss"
        );
    } else {
        tracing::debug!(receive = rcv, send = snd, "UDP socket buffers");
    }
    (rcv, snd)
}

pub struct Transport {
    endpoint: Endpoint,
    identity: Identity,
    pinned: PinnedPeers,
    settings: TransportSettings,
}

/// Loads the certificates of every peer of `me` and pins them.
pub fn pin_peers(cfg: &Config, me: &str) -> Result<PinnedPeers> {
    let mut pinned = PinnedPeers::default();
    for n in cfg.peers_of(me) {
        let certs = tls::load_certs(&n.cert).with_context(|| format!("node {}", n.name))?;
        pinned.insert(&n.name, &certs[0]);
    }
    Ok(pinned)
}

impl Transport {
    /// Binds the node's QUIC endpoint on `bind`.
    pub fn bind(
        identity: Identity,
        pinned: PinnedPeers,
        settings: TransportSettings,
        bind: SocketAddr,
    ) -> Result<Self> {
        let server_tls = tls::server_config(&identity, &pinned)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).map_err(|e| anyhow!("QUIC TLS setup: {e}"))?,
        ));
        server.transport_config(settings.quinn()?);
        // The endpoint's own packet-size limit (1472 by default) caps what MTU discovery may
        // reach: raise it to the configured maximum.
        let mut endpoint_cfg = quinn::EndpointConfig::default();
        endpoint_cfg.max_udp_payload_size(settings.max_mtu).map_err(|e| anyhow!("max_mtu: {e}"))?;
        let socket = std::net::UdpSocket::bind(bind).with_context(|| format!("cannot listen on {bind}"))?;
        size_buffers(&socket, settings.socket_buffer);
        let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for QUIC"))?;
        let endpoint = Endpoint::new(endpoint_cfg, Some(server), socket, runtime)
            .with_context(|| format!("cannot listen on {bind}"))?;
        Ok(Self { endpoint, identity, pinned, settings })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    pub fn pinned(&self) -> &PinnedPeers {
        &self.pinned
    }

    /// Connects to `peer`, which must present its configured certificate.
    pub async fn connect(&self, peer: &Node) -> Result<Connection> {
        let tls = tls::client_config(&self.identity, &self.pinned, &peer.name)?;
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls).map_err(|e| anyhow!("QUIC TLS setup: {e}"))?,
        ));
        client.transport_config(self.settings.quinn()?);
        let connecting = self.endpoint.connect_with(client, peer.address, SERVER_NAME)?;
        let conn = connecting.await.map_err(|e| anyhow!("{e}"))?;
        Ok(conn)
    }

    pub async fn accept(&self) -> Option<quinn::Incoming> {
        self.endpoint.accept().await
    }

    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(close_code::SHUTDOWN), b"agent shutting down");
    }

    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await
    }
}

/// The node a connection's peer authenticated as, by its pinned certificate.
pub fn peer_node(conn: &Connection, pinned: &PinnedPeers) -> Option<String> {
    let id = conn.peer_identity()?;
    let certs = id.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    pinned.node_of(certs.first()?).map(|s| s.to_string())
}

/// What `tandem status` reports of the connection to `node`.
pub fn link_status(node: &str, conn: &Connection) -> crate::status::LinkStatus {
    let path = conn.stats().path;
    crate::status::LinkStatus {
        node: node.to_string(),
        rtt_secs: path.rtt.as_secs_f64(),
        min_rtt_secs: path.min_rtt.as_secs_f64(),
        path_mtu: path.current_mtu,
        congestion_window_bytes: path.cwnd,
        congestion_events: path.congestion_events,
        sent_packets: path.sent_packets,
        lost_packets: path.lost_packets,
    }
}

/// Human-readable reason a connection ended.
pub fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!("closed by peer: {}", String::from_utf8_lossy(&c.reason))
        }
        quinn::ConnectionError::LocallyClosed => "closed locally".into(),
        quinn::ConnectionError::TimedOut => "timed out (no packets from peer)".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within `net.core.rmem_max` (4 MiB by default) no privilege is needed; the kernel's
    /// default is ~208 KiB, so the size granted shows the call took effect.
    #[test]
    fn the_socket_gets_the_buffers_asked_for() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (rcv, snd) = size_buffers(&s, 1 << 20);
        assert!(rcv >= 1 << 20 && snd >= 1 << 20, "granted {rcv} / {snd} bytes");
    }
}
