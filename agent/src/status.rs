//! What `tandem status` reports, shared by the daemon (which fills it) and the CLI (which
//! prints it). The JSON form is an interface: fields are added, never renamed or removed.
//! States are enums, serialised as the snake_case words the JSON has always used.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::meta::DiskState;

/// Declares a status enum: serde as snake_case words, `as_str`, `Display`, and comparison
/// with those words (scripts and tests read the JSON as words).
macro_rules! status_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v),+
        }
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

status_enum! {
    /// A node's role for a resource.
    Role { Primary = "primary", Secondary = "secondary" }
}

status_enum! {
    /// A resource's session with a peer.
    ConnectionState {
        /// The session is up.
        Connected = "connected",
        /// Trying to reach the peer, or waiting for it to offer the resource.
        Connecting = "connecting",
        /// Kept apart: disconnected by the administrator, or refused (split brain,
        /// unrelated data, ...) until an administrator acts.
        StandAlone = "standalone",
    }
}

status_enum! {
    /// What replication does with a peer.
    ReplicationState {
        /// Replicating: every write goes to the peer.
        Established = "established",
        /// The backlog overflowed: data withheld until it drains, then resynced.
        Ahead = "ahead",
        SyncSource = "sync_source",
        SyncTarget = "sync_target",
        SplitBrain = "split_brain",
        Off = "off",
    }
}

impl From<tandem_replicator::relation::ConnectionState> for ConnectionState {
    fn from(c: tandem_replicator::relation::ConnectionState) -> Self {
        use tandem_replicator::relation::ConnectionState as C;
        match c {
            C::Connected => ConnectionState::Connected,
            C::Connecting => ConnectionState::Connecting,
            C::StandAlone => ConnectionState::StandAlone,
        }
    }
}

impl From<tandem_protocol::Role> for Role {
    fn from(r: tandem_protocol::Role) -> Self {
        match r {
            tandem_protocol::Role::Primary => Role::Primary,
            tandem_protocol::Role::Secondary => Role::Secondary,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub cluster: String,
    /// When this agent process started (Unix ms): a restarted agent has a later one.
    #[serde(default)]
    pub agent_started_ms: u64,
    pub resources: Vec<ResourceStatus>,
    /// The QUIC connection to each peer node that is connected now, by node name.
    #[serde(default)]
    pub links: Vec<LinkStatus>,
}

/// One QUIC connection to a peer node, as its congestion controller and loss detection see
/// it; shared by every resource the two nodes replicate. Counters start at zero with each
/// new connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub node: String,
    /// Smoothed round-trip time, and the smallest seen, in seconds.
    pub rtt_secs: f64,
    pub min_rtt_secs: f64,
    /// Largest UDP payload the path carries, as path-MTU discovery found it (bytes).
    pub path_mtu: u16,
    /// Bytes the congestion controller lets be in flight now.
    pub congestion_window_bytes: u64,
    /// Times the congestion controller backed off (loss or ECN).
    pub congestion_events: u64,
    pub sent_packets: u64,
    /// Packets declared lost (and their data sent again).
    pub lost_packets: u64,
}

impl LinkStatus {
    /// Lost packets as a percentage of those sent.
    pub fn loss_percent(&self) -> f64 {
        if self.sent_packets == 0 {
            0.0
        } else {
            100.0 * self.lost_packets as f64 / self.sent_packets as f64
        }
    }

    /// One line for `status --statistics`.
    pub fn line(&self) -> String {
        format!(
            "link to {}: rtt {:.2} ms (min {:.2})  path MTU {}  window {}  lost {} of {} packets ({:.3} %)  congestion events {}",
            self.node,
            self.rtt_secs * 1e3,
            self.min_rtt_secs * 1e3,
            self.path_mtu,
            human_bytes(self.congestion_window_bytes),
            self.lost_packets,
            self.sent_packets,
            self.loss_percent(),
            self.congestion_events
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub name: String,
    pub role: Role,
    pub disk: DiskState,
    /// The block device on the primary, e.g. "/dev/loop3" (a volume group's first volume's);
    /// null on a secondary.
    pub device: Option<String>,
    /// A volume group's volumes and, on the primary, their devices (empty otherwise).
    #[serde(default)]
    pub volumes: Vec<VolumeStatus>,
    pub size: u64,
    /// The data generation this node holds (hex).
    pub generation: String,
    /// Taken out of service on this node by `tandem down` (until `tandem up`).
    #[serde(default)]
    pub down: bool,
    /// This copy's snapshots: how many, the space they use, and the recovery point.
    #[serde(default)]
    pub snapshots: SnapshotSummary,
    /// Set when this agent took the primary's device over from the previous agent.
    #[serde(default)]
    pub takeover: Option<TakeoverStatus>,
    pub peers: Vec<PeerStatus>,
    pub stats: ResourceStats,
}

/// How this agent took a primary's device over from the agent before it (which crashed,
/// was killed, or was restarted): the device stayed, its requests waited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverStatus {
    /// How long the device had no agent: from the previous agent's end to this one
    /// answering again.
    pub paused_ms: u64,
    /// Requests the previous agent had read and not answered, queued again by the kernel.
    pub resent: u64,
    /// Requests that waited unread.
    pub waited: u64,
    /// When (Unix ms).
    pub at_ms: u64,
}

/// The copy's snapshots in brief (`tandem snapshot list` has them one by one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub count: u64,
    /// Snapshots that show one instant (the others could not preserve a block).
    pub valid: u64,
    pub bytes_used: u64,
    /// Creation time of the newest valid snapshot (Unix ms): the recovery point.
    pub newest_valid_ms: Option<u64>,
}

impl SnapshotSummary {
    /// Age of the newest valid snapshot, in seconds.
    pub fn newest_age_secs(&self) -> Option<f64> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
        self.newest_valid_ms.map(|ms| now.saturating_sub(ms) as f64 / 1000.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    pub device: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub connection: ConnectionState,
    pub replication: ReplicationState,
    /// "sync" | "memory" | "async"
    pub mode: String,
    /// Bytes this node, as primary, knows the peer is missing.
    pub out_of_sync_bytes: u64,
    pub peer_role: Option<Role>,
    pub peer_disk: Option<DiskState>,
    /// Requests sent to the peer and not yet durably acknowledged.
    pub pending_requests: usize,
    /// Data sent to the peer and not yet on its disk (bytes), and how old the oldest of it
    /// is (seconds): how far the peer lags.
    #[serde(default)]
    pub lag_bytes: u64,
    #[serde(default)]
    pub lag_secs: f64,
    /// Block data sent to the peer (replication and resync), as written and as sent on the
    /// wire after compression.
    #[serde(default)]
    pub sent_data_bytes: u64,
    #[serde(default)]
    pub sent_wire_bytes: u64,
    /// Block data received from the peer, as it came off the wire.
    #[serde(default)]
    pub received_wire_bytes: u64,
    /// Time from a replicated request sent to the peer to its durable ack.
    #[serde(default)]
    pub ack_latency: LatencySummary,
    /// Resync progress with this peer (this node as source), once one has run.
    pub resync: Option<ResyncStatus>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub active: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    pub elapsed_secs: u64,
    /// Cumulative since the agent started: block data sent, hashes sent (checksum mode),
    /// and bytes found equal by checksum and not sent.
    pub data_bytes_sent: u64,
    pub hash_bytes_sent: u64,
    pub equal_bytes: u64,
}

impl ResyncStatus {
    pub fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            100.0
        } else {
            100.0 * self.done_bytes as f64 / self.total_bytes as f64
        }
    }

    /// One line: a bar, done/total, rate and ETA.
    pub fn line(&self) -> String {
        let width = 30;
        let filled = ((self.percent() / 100.0) * width as f64) as usize;
        format!(
            "resync [{}{}] {:.1}%  {} of {}  {}/s  ETA {}",
            "=".repeat(filled),
            " ".repeat(width - filled.min(width)),
            self.percent(),
            human_bytes(self.done_bytes),
            human_bytes(self.total_bytes),
            human_bytes(self.rate_bytes_per_sec),
            self.eta_secs.map_or("-".to_string(), |s| format!("{s}s"))
        )
    }
}

impl From<tandem_replicator::resync::stats::ResyncProgress> for ResyncStatus {
    fn from(p: tandem_replicator::resync::stats::ResyncProgress) -> Self {
        Self {
            active: p.active,
            total_bytes: p.total_bytes,
            done_bytes: p.done_bytes,
            rate_bytes_per_sec: p.rate_bytes_per_sec,
            eta_secs: p.eta_secs,
            elapsed_secs: p.elapsed_secs,
            data_bytes_sent: p.data_bytes_sent,
            hash_bytes_sent: p.hash_bytes_sent,
            equal_bytes: p.equal_bytes,
        }
    }
}

/// The result of `tandem verify` for one peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub peer: String,
    pub checked_bytes: u64,
    pub differing_bytes: u64,
    /// Byte ranges `(offset, length)` that differ.
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResourceStats {
    /// Application requests completed on this node as primary.
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub reads: u64,
    pub local_io_errors: u64,
    /// Replicated requests applied on this node as secondary.
    pub replicated_writes: u64,
    pub replicated_bytes: u64,
    pub replicated_flushes: u64,
    /// Resync data written on this node as target.
    pub resync_received_bytes: u64,
    pub checksum_errors: u64,
    pub protocol_errors: u64,
    pub standby_io_errors: u64,
    /// Activity-log transactions (metadata writes) so far, and extents now hot.
    pub al_writes: u64,
    pub al_hot_extents: u64,
    #[serde(default)]
    pub read_bytes: u64,
    /// Application writes and flushes as the frontend sees them (request to reply).
    #[serde(default)]
    pub write_latency: LatencySummary,
    #[serde(default)]
    pub flush_latency: LatencySummary,
    /// Split brains detected with any peer since the agent started.
    #[serde(default)]
    pub split_brains: u64,
    /// Event handlers run and failed since the agent started, per handler.
    #[serde(default)]
    pub handlers: Vec<HandlerStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HandlerStats {
    /// The handler's event, e.g. "split-brain".
    pub handler: String,
    pub runs: u64,
    /// Non-zero exit, timeout, or could not start.
    pub failures: u64,
}

/// A latency histogram in brief: what `status --statistics` shows of what the metrics
/// export in full (`tandem_*_latency_seconds`). Quantiles are estimated from the buckets
/// as Prometheus' `histogram_quantile` does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub sum_secs: f64,
    pub mean_secs: Option<f64>,
    pub p50_secs: Option<f64>,
    pub p99_secs: Option<f64>,
}

impl From<&tandem_replicator::LatencySnapshot> for LatencySummary {
    fn from(s: &tandem_replicator::LatencySnapshot) -> Self {
        Self {
            count: s.count,
            sum_secs: s.sum_secs,
            mean_secs: s.mean_secs(),
            p50_secs: s.quantile(0.5),
            p99_secs: s.quantile(0.99),
        }
    }
}

impl LatencySummary {
    /// `N requests, mean … p50 … p99 …` in human units.
    pub fn line(&self) -> String {
        let t = |v: Option<f64>| v.map_or("-".to_string(), human_secs);
        format!(
            "{} requests  mean {}  p50 {}  p99 {}",
            self.count,
            t(self.mean_secs),
            t(self.p50_secs),
            t(self.p99_secs)
        )
    }
}

/// A duration in seconds as µs, ms or s.
pub fn human_secs(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

impl NodeStatus {
    /// The human form of `tandem status`. Each running resync is drawn once: as a text
    /// line here unless `bars` says the caller draws it as a progress bar instead.
    /// `statistics` adds latency, traffic and ack lines (`status --statistics`).
    pub fn render(&self, bars: bool, statistics: bool) -> String {
        let mut out = format!("node {} (cluster {})\n", self.node, self.cluster);
        for r in &self.resources {
            out += &format!(
                "  {}  role:{}  disk:{}  size:{}{}\n",
                r.name,
                r.role,
                r.disk,
                human_bytes(r.size),
                r.device
                    .as_ref()
                    .filter(|_| r.volumes.is_empty())
                    .map(|d| format!("  device:{d}"))
                    .unwrap_or_default()
            );
            for v in &r.volumes {
                out += &format!(
                    "    volume {}  size:{}{}\n",
                    v.name,
                    human_bytes(v.size),
                    v.device.as_ref().map(|d| format!("  device:{d}")).unwrap_or_default()
                );
            }
            if r.snapshots.count > 0 {
                out += &format!(
                    "    snapshots:{} ({} valid)  used:{}  newest:{}\n",
                    r.snapshots.count,
                    r.snapshots.valid,
                    human_bytes(r.snapshots.bytes_used),
                    r.snapshots.newest_age_secs().map_or("-".to_string(), |a| format!("{a:.0}s ago"))
                );
            }
            if let Some(t) = r.takeover {
                out += &format!(
                    "    taken over from the previous agent: device paused {} ms, {} requests re-sent\n",
                    t.paused_ms, t.resent
                );
            }
            for p in &r.peers {
                out += &format!(
                    "    {}  connection:{}  replication:{}  mode:{}  out-of-sync:{}",
                    p.node,
                    p.connection,
                    p.replication,
                    p.mode,
                    human_bytes(p.out_of_sync_bytes)
                );
                if let (Some(role), Some(disk)) = (&p.peer_role, &p.peer_disk) {
                    out += &format!("  peer:{role}/{disk}");
                }
                if p.lag_bytes > 0 {
                    out += &format!("  lag:{} ({:.1}s)", human_bytes(p.lag_bytes), p.lag_secs);
                }
                out += "\n";
                if statistics {
                    out += &format!(
                        "      sent:{} (wire {})  received:{}  pending:{}  lag:{} ({:.1}s)\n      acks: {}\n",
                        human_bytes(p.sent_data_bytes),
                        human_bytes(p.sent_wire_bytes),
                        human_bytes(p.received_wire_bytes),
                        p.pending_requests,
                        human_bytes(p.lag_bytes),
                        p.lag_secs,
                        p.ack_latency.line()
                    );
                }
                if let Some(r) = p.resync.as_ref().filter(|r| r.active && !bars) {
                    out += &format!("      {}\n", r.line());
                }
                if let Some(e) = &p.last_error {
                    out += &format!("      last error: {e}\n");
                }
            }
            let s = &r.stats;
            if r.role == Role::Primary {
                out += &format!(
                    "    writes:{} ({})  flushes:{}  discards:{}  local I/O errors:{}\n",
                    s.writes,
                    human_bytes(s.write_bytes),
                    s.flushes,
                    s.discards,
                    s.local_io_errors
                );
            } else {
                out += &format!(
                    "    replicated writes:{} ({})  flushes:{}  checksum errors:{}  protocol errors:{}\n",
                    s.replicated_writes,
                    human_bytes(s.replicated_bytes),
                    s.replicated_flushes,
                    s.checksum_errors,
                    s.protocol_errors
                );
            }
            if statistics {
                out += &format!(
                    "    writes: {}\n    flushes: {}\n    reads:{} ({})  discards:{}  local I/O errors:{}  standby I/O errors:{}\n    activity log: {} writes, {} hot extents\n",
                    s.write_latency.line(),
                    s.flush_latency.line(),
                    s.reads,
                    human_bytes(s.read_bytes),
                    s.discards,
                    s.local_io_errors,
                    s.standby_io_errors,
                    s.al_writes,
                    s.al_hot_extents
                );
            }
        }
        if statistics {
            for l in &self.links {
                out += &format!("  {}\n", l.line());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(links: Vec<LinkStatus>) -> NodeStatus {
        NodeStatus {
            node: "alpha".into(),
            cluster: "c".into(),
            agent_started_ms: 0,
            resources: vec![],
            links,
        }
    }

    #[test]
    fn links_are_shown_with_statistics_only() {
        let l = LinkStatus {
            node: "beta".into(),
            rtt_secs: 0.00031,
            min_rtt_secs: 0.00009,
            path_mtu: 8952,
            congestion_window_bytes: 1_258_291,
            congestion_events: 1,
            sent_packets: 2000,
            lost_packets: 5,
        };
        let n = node(vec![l]);
        let text = n.render(false, true);
        assert!(
            text.contains(
                "  link to beta: rtt 0.31 ms (min 0.09)  path MTU 8952  window 1.2 MiB  lost 5 of 2000 packets (0.250 %)  congestion events 1\n"
            ),
            "{text}"
        );
        assert!(!n.render(false, false).contains("link to"), "plain status stays short");
        assert_eq!(LinkStatus::default().loss_percent(), 0.0, "nothing sent, nothing lost");
    }

    #[test]
    fn a_status_without_links_from_an_older_agent_still_parses() {
        let old = r#"{"node":"alpha","cluster":"c","agent_started_ms":1,"resources":[]}"#;
        let n: NodeStatus = serde_json::from_str(old).unwrap();
        assert!(n.links.is_empty());
        let again: NodeStatus =
            serde_json::from_str(&serde_json::to_string(&node(vec![LinkStatus::default()])).unwrap())
                .unwrap();
        assert_eq!(again.links, vec![LinkStatus::default()]);
    }
}
