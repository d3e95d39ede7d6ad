//! Scraping an agent's metrics endpoint the way Prometheus does, and checking what it
//! serves with Prometheus' own `promtool`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::lab::Lab;

/// Every series name the agent exports (docs/monitoring.md lists their types and labels).
/// A histogram is its three series `_bucket`, `_sum` and `_count`. The docs' table, the
/// dashboard and the alert rules are checked against it (tests/tests/monitoring_docs.rs),
/// and it against what a running agent serves (tests/tests/metrics.rs).
pub const EXPORTED_METRICS: &[&str] = &[
    "tandem_agent_info",
    "tandem_resource_role",
    "tandem_disk_state",
    "tandem_resource_down",
    "tandem_volume_size_bytes",
    "tandem_snapshots",
    "tandem_snapshots_invalid",
    "tandem_snapshot_bytes",
    "tandem_snapshot_newest_timestamp_seconds",
    "tandem_write_latency_seconds_bucket",
    "tandem_write_latency_seconds_sum",
    "tandem_write_latency_seconds_count",
    "tandem_flush_latency_seconds_bucket",
    "tandem_flush_latency_seconds_sum",
    "tandem_flush_latency_seconds_count",
    "tandem_written_bytes_total",
    "tandem_discards_total",
    "tandem_reads_total",
    "tandem_read_bytes_total",
    "tandem_replicated_writes_total",
    "tandem_replicated_bytes_total",
    "tandem_replicated_flushes_total",
    "tandem_resync_received_bytes_total",
    "tandem_checksum_errors_total",
    "tandem_protocol_errors_total",
    "tandem_local_io_errors_total",
    "tandem_standby_io_errors_total",
    "tandem_activity_log_writes_total",
    "tandem_activity_log_hot_extents",
    "tandem_split_brains_total",
    "tandem_handler_runs_total",
    "tandem_handler_failures_total",
    "tandem_peer_connected",
    "tandem_peer_replication_state",
    "tandem_peer_out_of_sync_bytes",
    "tandem_peer_lag_bytes",
    "tandem_peer_lag_seconds",
    "tandem_peer_pending_requests",
    "tandem_peer_sent_bytes_total",
    "tandem_peer_received_bytes_total",
    "tandem_peer_ack_latency_seconds_bucket",
    "tandem_peer_ack_latency_seconds_sum",
    "tandem_peer_ack_latency_seconds_count",
    "tandem_resync_active",
    "tandem_resync_done_bytes",
    "tandem_resync_total_bytes",
    "tandem_resync_rate_bytes_per_second",
    "tandem_link_rtt_seconds",
    "tandem_link_path_mtu_bytes",
    "tandem_link_congestion_window_bytes",
    "tandem_link_sent_packets_total",
    "tandem_link_lost_packets_total",
    "tandem_link_congestion_events_total",
];

/// Turns on `node`'s metrics endpoint in the lab's config (before its agent starts), on a
/// free port of 127.0.0.1; returns the address.
pub fn enable_metrics(lab: &Lab, node: &str) -> SocketAddr {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free TCP port").port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let text = std::fs::read_to_string(&lab.config).unwrap();
    let anchor = format!("name = \"{node}\"\n");
    assert!(text.contains(&anchor), "no [[node]] {node} in the lab config");
    std::fs::write(&lab.config, text.replacen(&anchor, &format!("{anchor}metrics = \"{addr}\"\n"), 1))
        .unwrap();
    addr
}

/// Sends `request` as is and returns everything the server answers until it closes the
/// connection (or 10 s pass).
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        // A server that closes with unread input resets the connection: what came first counts.
        Err(e) if !out.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `GET /metrics`: the body, after checking the status line and content type.
pub fn scrape(addr: SocketAddr) -> String {
    let resp = http_raw(addr, b"GET /metrics HTTP/1.1\r\nHost: tandem\r\nConnection: close\r\n\r\n")
        .unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
    let (head, body) =
        resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head from {addr}: {resp:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "scrape {addr}: {head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (the metric name with its labels, exactly as
/// exposed, e.g. `tandem_peer_connected{resource="mail",peer="beta"}`).
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// [`value`], failing the test with the scrape when the series is missing.
pub fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// `promtool`, from Debian's `prometheus` package; the test fails without it.
pub fn promtool() -> &'static str {
    let ok = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "this test needs promtool: apt-get install -y prometheus");
    "promtool"
}

/// `promtool check metrics` on `text`: Ok, or its complaints.
pub fn promtool_check_metrics(text: &str) -> Result<(), String> {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics ({}): {said}", out.status))
    }
}

/// The names of the series in a scrape (without labels).
pub fn series_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}
