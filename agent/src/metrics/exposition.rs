//! What a scrape returns: the node's state as Prometheus series, in the text format 0.0.4.
//!
//! Everything is read at scrape time from what `tandem status` reports plus the latency
//! histograms, so a metric and the status line that shows the same figure never disagree
//! and the data path pays nothing for being watched beyond its counters. The names follow
//! Prometheus' conventions: `tandem_` prefix, base units in the name, counters end in
//! `_total`; states are one-hot gauge families (`…{state="…"} 1` for the current one, 0 for
//! the others), so an alert can say `== 1` and a graph can stack them. The list is
//! documented in docs/monitoring.md, which a test keeps in step with this file.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tandem_replicator::LatencySnapshot;

use crate::daemon::resource::ResourceLatency;
use crate::status::{ConnectionState, DiskState, NodeStatus, ReplicationState, ResourceStatus, Role};

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One scrape's worth of the node.
#[derive(Debug)]
pub struct Scrape {
    pub status: NodeStatus,
    /// By resource name.
    pub latency: BTreeMap<String, ResourceLatency>,
}

/// The node as Prometheus text.
pub fn encode(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    // Writing to a String fails only if an encoder reports an error, which ours do not.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        out = format!("# metrics encoding failed: {e}\n");
    }
    out
}

type Labels = Vec<(&'static str, String)>;

/// A per-resource counter: name (without `_total`), help, and where its value is.
type Counted = (&'static str, &'static str, fn(&ResourceStatus) -> u64);

/// A histogram as the text encoder wants it.
struct Histogram<'a>(&'a LatencySnapshot);

impl EncodeMetric for Histogram<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self.0.bounded().collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum_secs, self.0.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A counter's current value (the text encoder appends `_total` to the family's name).
struct Total(u64);

impl EncodeMetric for Total {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.0, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Writes families: one descriptor, then every sample of it.
struct Families<'e, 'a> {
    enc: &'e mut DescriptorEncoder<'a>,
}

impl Families<'_, '_> {
    fn family<M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, M)>,
    ) -> Result<(), std::fmt::Error> {
        let mut samples = samples.into_iter().peekable();
        let Some((_, first)) = samples.peek() else { return Ok(()) };
        let kind = first.metric_type();
        let mut m = self.enc.encode_descriptor(name, help, None, kind)?;
        for (labels, v) in samples {
            v.encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) -> Result<(), std::fmt::Error> {
        self.family(name, help, samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v))))
    }

    /// `name` without `_total`: the encoder adds it.
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> Result<(), std::fmt::Error> {
        self.family(name, help, samples.into_iter().map(|(l, v)| (l, Total(v))))
    }
}

fn res(r: &ResourceStatus) -> Labels {
    vec![("resource", r.name.clone())]
}

fn with(mut l: Labels, k: &'static str, v: impl Into<String>) -> Labels {
    l.push((k, v.into()));
    l
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

const ROLES: [Role; 2] = [Role::Primary, Role::Secondary];
const DISK_STATES: [DiskState; 3] = [DiskState::UpToDate, DiskState::Outdated, DiskState::Inconsistent];
const REPLICATION_STATES: [ReplicationState; 6] = [
    ReplicationState::Established,
    ReplicationState::Ahead,
    ReplicationState::SyncSource,
    ReplicationState::SyncTarget,
    ReplicationState::SplitBrain,
    ReplicationState::Off,
];

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut f = Families { enc: &mut enc };
        let rs = &self.status.resources;
        let node = &self.status;
        f.gauge(
            "tandem_agent_info",
            "The agent serving these metrics: node, cluster and version (always 1).",
            [(
                vec![
                    ("node", node.node.clone()),
                    ("cluster", node.cluster.clone()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
                1.0,
            )],
        )?;

        // ---- resources
        f.gauge(
            "tandem_resource_role",
            "This node's role for the resource: 1 for the current role.",
            rs.iter()
                .flat_map(|r| ROLES.map(|role| (with(res(r), "role", role.as_str()), flag(r.role == role)))),
        )?;
        f.gauge(
            "tandem_disk_state",
            "This node's copy of the resource: 1 for the current disk state.",
            rs.iter()
                .flat_map(|r| DISK_STATES.map(|d| (with(res(r), "state", d.as_str()), flag(r.disk == d)))),
        )?;
        f.gauge(
            "tandem_resource_down",
            "1 while the resource is out of service on this node (`tandem down`).",
            rs.iter().map(|r| (res(r), flag(r.down))),
        )?;
        f.gauge(
            "tandem_volume_size_bytes",
            "Size of each volume (a one-volume resource's volume is named after the resource).",
            rs.iter().flat_map(|r| {
                let vols: Vec<(String, u64)> = if r.volumes.is_empty() {
                    vec![(r.name.clone(), r.size)]
                } else {
                    r.volumes.iter().map(|v| (v.name.clone(), v.size)).collect()
                };
                vols.into_iter().map(|(v, size)| (with(res(r), "volume", v), size as f64))
            }),
        )?;
        f.gauge(
            "tandem_snapshots",
            "Snapshots of this copy (valid and invalid).",
            rs.iter().map(|r| (res(r), r.snapshots.count as f64)),
        )?;
        f.gauge(
            "tandem_snapshots_invalid",
            "Snapshots that could not preserve a block (e.g. no space) and no longer show one instant.",
            rs.iter().map(|r| (res(r), (r.snapshots.count - r.snapshots.valid) as f64)),
        )?;
        f.gauge(
            "tandem_snapshot_bytes",
            "Space the copy's snapshots take on disk.",
            rs.iter().map(|r| (res(r), r.snapshots.bytes_used as f64)),
        )?;
        f.gauge(
            "tandem_snapshot_newest_timestamp_seconds",
            "Creation time (Unix) of the newest valid snapshot, 0 if none: the recovery point is \
             time() minus this.",
            rs.iter().map(|r| (res(r), r.snapshots.newest_valid_ms.map_or(0.0, |ms| ms as f64 / 1000.0))),
        )?;
        let lat = |r: &ResourceStatus| self.latency.get(&r.name);
        f.family(
            "tandem_write_latency_seconds",
            "Application writes as the frontend sees them: request received to reply sent \
             (local write and every ack the peers' modes wait for).",
            rs.iter().filter_map(|r| lat(r).map(|l| (res(r), Histogram(&l.write)))),
        )?;
        f.family(
            "tandem_flush_latency_seconds",
            "Application flushes (fsync) as the frontend sees them: request received to reply sent.",
            rs.iter().filter_map(|r| lat(r).map(|l| (res(r), Histogram(&l.flush)))),
        )?;
        let counters: [Counted; 14] = [
            ("tandem_written_bytes", "Bytes written by the application as primary.", |r| r.stats.write_bytes),
            ("tandem_discards", "Discards by the application as primary.", |r| r.stats.discards),
            ("tandem_reads", "Reads by the application as primary.", |r| r.stats.reads),
            ("tandem_read_bytes", "Bytes read by the application as primary.", |r| r.stats.read_bytes),
            ("tandem_replicated_writes", "Replicated writes applied as secondary.", |r| {
                r.stats.replicated_writes
            }),
            ("tandem_replicated_bytes", "Replicated bytes applied as secondary.", |r| {
                r.stats.replicated_bytes
            }),
            ("tandem_replicated_flushes", "Replicated flushes applied as secondary.", |r| {
                r.stats.replicated_flushes
            }),
            ("tandem_resync_received_bytes", "Resync data written as resync target.", |r| {
                r.stats.resync_received_bytes
            }),
            ("tandem_checksum_errors", "Received blocks whose checksum did not match.", |r| {
                r.stats.checksum_errors
            }),
            ("tandem_protocol_errors", "Frames from a peer that broke the protocol.", |r| {
                r.stats.protocol_errors
            }),
            ("tandem_local_io_errors", "I/O errors of the local image serving the application.", |r| {
                r.stats.local_io_errors
            }),
            ("tandem_standby_io_errors", "I/O errors writing replicated or resync data as secondary.", |r| {
                r.stats.standby_io_errors
            }),
            ("tandem_activity_log_writes", "Activity-log transactions written to the metadata.", |r| {
                r.stats.al_writes
            }),
            ("tandem_split_brains", "Split brains detected with any peer.", |r| r.stats.split_brains),
        ];
        for (name, help, value) in counters {
            f.counter(name, help, rs.iter().map(|r| (res(r), value(r))))?;
        }
        f.gauge(
            "tandem_activity_log_hot_extents",
            "Activity-log extents now hot (resynced after a crash of this node as primary).",
            rs.iter().map(|r| (res(r), r.stats.al_hot_extents as f64)),
        )?;
        let handlers = || rs.iter().flat_map(|r| r.stats.handlers.iter().map(move |h| (r, h)));
        f.counter(
            "tandem_handler_runs",
            "Event handlers started.",
            handlers().map(|(r, h)| (with(res(r), "handler", h.handler.clone()), h.runs)),
        )?;
        f.counter(
            "tandem_handler_failures",
            "Event handlers that failed: non-zero exit, timeout, or could not start.",
            handlers().map(|(r, h)| (with(res(r), "handler", h.handler.clone()), h.failures)),
        )?;

        // ---- peers
        let peers = || {
            rs.iter().flat_map(|r| r.peers.iter().map(move |p| (r, p, with(res(r), "peer", p.node.clone()))))
        };
        f.gauge(
            "tandem_peer_connected",
            "1 while the resource's session with the peer is up.",
            peers().map(|(_, p, l)| (l, flag(p.connection == ConnectionState::Connected))),
        )?;
        f.gauge(
            "tandem_peer_replication_state",
            "What replication does with the peer: 1 for the current state.",
            peers().flat_map(|(_, p, l)| {
                REPLICATION_STATES.map(|s| (with(l.clone(), "state", s.as_str()), flag(p.replication == s)))
            }),
        )?;
        f.gauge(
            "tandem_peer_out_of_sync_bytes",
            "Bytes this node knows the peer is missing (resynced when it connects).",
            peers().map(|(_, p, l)| (l, p.out_of_sync_bytes as f64)),
        )?;
        f.gauge(
            "tandem_peer_lag_bytes",
            "Data sent to the peer and not yet on its disk.",
            peers().map(|(_, p, l)| (l, p.lag_bytes as f64)),
        )?;
        f.gauge(
            "tandem_peer_lag_seconds",
            "Age of the oldest data sent to the peer and not yet on its disk.",
            peers().map(|(_, p, l)| (l, p.lag_secs)),
        )?;
        f.gauge(
            "tandem_peer_pending_requests",
            "Requests sent to the peer and not yet durably acknowledged.",
            peers().map(|(_, p, l)| (l, p.pending_requests as f64)),
        )?;
        f.counter(
            "tandem_peer_sent_bytes",
            "Block data (replication and resync) sent to the peer, as on the wire after compression.",
            peers().map(|(_, p, l)| (l, p.sent_wire_bytes)),
        )?;
        f.counter(
            "tandem_peer_received_bytes",
            "Block data (replication and resync) received from the peer, as on the wire.",
            peers().map(|(_, p, l)| (l, p.received_wire_bytes)),
        )?;
        f.family(
            "tandem_peer_ack_latency_seconds",
            "A replicated request sent to the peer until its durable ack: what replication adds.",
            peers()
                .filter_map(|(r, p, l)| lat(r).and_then(|x| x.ack.get(&p.node)).map(|h| (l, Histogram(h)))),
        )?;
        let resync = |p: &crate::status::PeerStatus| p.resync.clone().unwrap_or_default();
        f.gauge(
            "tandem_resync_active",
            "1 while this node resyncs the peer (as resync source).",
            peers().map(|(_, p, l)| (l, flag(resync(p).active))),
        )?;
        f.gauge(
            "tandem_resync_done_bytes",
            "Bytes of the current (or last) resync to the peer done.",
            peers().map(|(_, p, l)| (l, resync(p).done_bytes as f64)),
        )?;
        f.gauge(
            "tandem_resync_total_bytes",
            "Bytes the current (or last) resync to the peer has to do.",
            peers().map(|(_, p, l)| (l, resync(p).total_bytes as f64)),
        )?;
        f.gauge(
            "tandem_resync_rate_bytes_per_second",
            "Rate of the current resync to the peer (0 when none runs).",
            peers().map(|(_, p, l)| {
                let r = resync(p);
                (l, if r.active { r.rate_bytes_per_sec as f64 } else { 0.0 })
            }),
        )?;

        // ---- links: one QUIC connection per peer node, shared by its resources
        let links = || node.links.iter().map(|l| (vec![("peer", l.node.clone())], l));
        f.gauge(
            "tandem_link_rtt_seconds",
            "Smoothed round-trip time of the connection to the peer node.",
            links().map(|(k, l)| (k, l.rtt_secs)),
        )?;
        f.gauge(
            "tandem_link_path_mtu_bytes",
            "Largest UDP payload the path to the peer node carries, as path-MTU discovery found it.",
            links().map(|(k, l)| (k, l.path_mtu as f64)),
        )?;
        f.gauge(
            "tandem_link_congestion_window_bytes",
            "Bytes the congestion controller lets be in flight to the peer node now.",
            links().map(|(k, l)| (k, l.congestion_window_bytes as f64)),
        )?;
        f.counter(
            "tandem_link_sent_packets",
            "QUIC packets sent to the peer node on this connection.",
            links().map(|(k, l)| (k, l.sent_packets)),
        )?;
        f.counter(
            "tandem_link_lost_packets",
            "QUIC packets to the peer node declared lost (their data is sent again).",
            links().map(|(k, l)| (k, l.lost_packets)),
        )?;
        f.counter(
            "tandem_link_congestion_events",
            "Times the congestion controller backed off on the connection to the peer node.",
            links().map(|(k, l)| (k, l.congestion_events)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{LinkStatus, PeerStatus, ResourceStats, ResyncStatus};
    use std::time::Duration;
    use tandem_replicator::LatencyHistogram;

    fn peer(node: &str, replication: ReplicationState) -> PeerStatus {
        PeerStatus {
            node: node.into(),
            connection: ConnectionState::Connected,
            replication,
            mode: "sync".into(),
            out_of_sync_bytes: 8192,
            peer_role: None,
            peer_disk: None,
            pending_requests: 2,
            lag_bytes: 4096,
            lag_secs: 0.5,
            sent_data_bytes: 100,
            sent_wire_bytes: 60,
            received_wire_bytes: 7,
            ack_latency: Default::default(),
            resync: Some(ResyncStatus {
                active: true,
                total_bytes: 10,
                done_bytes: 4,
                rate_bytes_per_sec: 3,
                ..Default::default()
            }),
            last_error: None,
        }
    }

    fn scrape() -> Scrape {
        let write = LatencyHistogram::default();
        for us in [30, 40, 300, 2_000_000] {
            write.observe(Duration::from_micros(us));
        }
        let status = NodeStatus {
            node: "alpha".into(),
            cluster: "c".into(),
            agent_started_ms: 0,
            resources: vec![ResourceStatus {
                name: "mail".into(),
                role: Role::Primary,
                disk: DiskState::UpToDate,
                device: Some("/dev/loop0".into()),
                volumes: vec![],
                size: 1 << 20,
                generation: "0".into(),
                down: false,
                snapshots: Default::default(),
                takeover: None,
                peers: vec![peer("beta", ReplicationState::SyncSource)],
                stats: ResourceStats { write_bytes: 12288, split_brains: 1, ..Default::default() },
            }],
            links: vec![LinkStatus {
                node: "beta".into(),
                rtt_secs: 0.00025,
                min_rtt_secs: 0.0001,
                path_mtu: 8952,
                congestion_window_bytes: 1 << 20,
                congestion_events: 2,
                sent_packets: 1000,
                lost_packets: 3,
            }],
        };
        let latency = ResourceLatency {
            write: write.snapshot(),
            flush: Default::default(),
            ack: [("beta".to_string(), LatencySnapshot { buckets: vec![0; 18], ..Default::default() })]
                .into(),
        };
        Scrape { status, latency: [("mail".to_string(), latency)].into() }
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn states_are_one_hot_and_counters_end_in_total() {
        let t = encode(scrape());
        assert_eq!(sample(&t, r#"tandem_resource_role{resource="mail",role="primary"}"#), Some(1.0), "{t}");
        assert_eq!(sample(&t, r#"tandem_resource_role{resource="mail",role="secondary"}"#), Some(0.0));
        assert_eq!(sample(&t, r#"tandem_disk_state{resource="mail",state="up_to_date"}"#), Some(1.0));
        assert_eq!(sample(&t, r#"tandem_disk_state{resource="mail",state="outdated"}"#), Some(0.0));
        assert_eq!(
            sample(&t, r#"tandem_peer_replication_state{resource="mail",peer="beta",state="sync_source"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, r#"tandem_peer_replication_state{resource="mail",peer="beta",state="established"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&t, r#"tandem_written_bytes_total{resource="mail"}"#), Some(12288.0));
        assert_eq!(sample(&t, r#"tandem_split_brains_total{resource="mail"}"#), Some(1.0));
        assert_eq!(sample(&t, r#"tandem_peer_sent_bytes_total{resource="mail",peer="beta"}"#), Some(60.0));
        assert_eq!(sample(&t, r#"tandem_peer_out_of_sync_bytes{resource="mail",peer="beta"}"#), Some(8192.0));
        assert_eq!(
            sample(&t, r#"tandem_resync_rate_bytes_per_second{resource="mail",peer="beta"}"#),
            Some(3.0)
        );
        assert_eq!(sample(&t, r#"tandem_volume_size_bytes{resource="mail",volume="mail"}"#), Some(1048576.0));
        assert!(t.contains("# TYPE tandem_written_bytes_total counter"), "{t}");
        assert_eq!(sample(&t, r#"tandem_link_rtt_seconds{peer="beta"}"#), Some(0.00025), "{t}");
        assert_eq!(sample(&t, r#"tandem_link_path_mtu_bytes{peer="beta"}"#), Some(8952.0));
        assert_eq!(sample(&t, r#"tandem_link_congestion_window_bytes{peer="beta"}"#), Some(1048576.0));
        assert_eq!(sample(&t, r#"tandem_link_lost_packets_total{peer="beta"}"#), Some(3.0));
        assert_eq!(sample(&t, r#"tandem_link_sent_packets_total{peer="beta"}"#), Some(1000.0));
        assert_eq!(sample(&t, r#"tandem_link_congestion_events_total{peer="beta"}"#), Some(2.0));
    }

    #[test]
    fn histograms_are_cumulative_with_count_and_sum() {
        let t = encode(scrape());
        let b = |le: &str| {
            sample(&t, &format!(r#"tandem_write_latency_seconds_bucket{{resource="mail",le="{le}"}}"#))
        };
        assert_eq!(b("5e-05"), Some(2.0), "{t}");
        assert_eq!(b("0.0005"), Some(3.0));
        assert_eq!(b("1"), Some(3.0));
        assert_eq!(b("2.5"), Some(4.0));
        assert_eq!(b("+Inf"), Some(4.0));
        assert_eq!(sample(&t, r#"tandem_write_latency_seconds_count{resource="mail"}"#), Some(4.0));
        let sum = sample(&t, r#"tandem_write_latency_seconds_sum{resource="mail"}"#).unwrap();
        assert!((sum - 2.00037).abs() < 1e-9, "{sum}");
        assert_eq!(
            sample(&t, r#"tandem_peer_ack_latency_seconds_count{resource="mail",peer="beta"}"#),
            Some(0.0)
        );
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        let t = encode(scrape());
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {l}"));
            assert!(series.starts_with("tandem_"), "{l}");
            assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{l}");
        }
    }
}
