//! The metrics endpoint with real agents: what it serves passes `promtool check metrics`,
//! and its values follow what happens — roles flip on promote/demote, out-of-sync bytes
//! grow while a peer is disconnected and fall to 0 after the resync, latency histograms
//! count exactly the requests made, traffic counters move — and agree with
//! `status --statistics`. Bad and slow HTTP clients never hold up the agent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tandem_tests::lab::LabOptions;
use tandem_tests::metrics::*;
use tandem_tests::*;

const MAIL: &str = r#"resource="mail""#;
const BETA: &str = r#"resource="mail",peer="beta""#;
const ALPHA: &str = r#"resource="mail",peer="alpha""#;

fn role(text: &str, role: &str) -> f64 {
    must(text, &format!(r#"tandem_resource_role{{{MAIL},role="{role}"}}"#))
}

/// Scrapes `addr` until `pred` holds (60 s at most); returns that scrape.
fn wait_scrape(addr: SocketAddr, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + secs(60);
    loop {
        let t = scrape(addr);
        if pred(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last scrape:\n{t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_statistics(lab: &tandem_tests::lab::Lab, node: &str) -> serde_json::Value {
    let out = tandem_ok(lab, node, &["status", "--json", "--statistics"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

#[test]
fn metrics_follow_reality_and_pass_promtool() {
    require_real_devices();
    promtool();
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions::default());
    let (a, b) = (enable_metrics(&lab, "alpha"), enable_metrics(&lab, "beta"));
    let dev = start_and_promote_alpha(&mut lab, &["alpha", "beta"], all_caught_up);

    let (ta, tb) = (scrape(a), scrape(b));
    promtool_check_metrics(&ta).unwrap_or_else(|e| panic!("alpha: {e}\n{ta}"));
    promtool_check_metrics(&tb).unwrap_or_else(|e| panic!("beta: {e}\n{tb}"));
    assert_eq!((role(&ta, "primary"), role(&ta, "secondary")), (1.0, 0.0), "alpha is primary:\n{ta}");
    assert_eq!((role(&tb, "primary"), role(&tb, "secondary")), (0.0, 1.0), "beta is secondary:\n{tb}");
    assert_eq!(must(&ta, &format!("tandem_peer_connected{{{BETA}}}")), 1.0);
    assert_eq!(must(&ta, &format!(r#"tandem_peer_replication_state{{{BETA},state="established"}}"#)), 1.0);
    assert_eq!(must(&ta, &format!(r#"tandem_disk_state{{{MAIL},state="up_to_date"}}"#)), 1.0);
    // Exactly the series the docs, the dashboard and the alerts are written against.
    for t in [&ta, &tb] {
        let served = series_names(t);
        let documented: std::collections::BTreeSet<String> =
            EXPORTED_METRICS.iter().map(|s| s.to_string()).collect();
        assert_eq!(served, documented, "served vs documented (EXPORTED_METRICS):\n{t}");
    }

    // Latency histograms count exactly the requests made: 40 O_DIRECT writes without a
    // flush, then one O_DSYNC write (a write and a flush).
    let writes = |t: &str| must(t, &format!("tandem_write_latency_seconds_count{{{MAIL}}}"));
    let flushes = |t: &str| must(t, &format!("tandem_flush_latency_seconds_count{{{MAIL}}}"));
    let acks = |t: &str| must(t, &format!("tandem_peer_ack_latency_seconds_count{{{BETA}}}"));
    let sent = |t: &str| must(t, &format!("tandem_peer_sent_bytes_total{{{BETA}}}"));
    let received = |t: &str| must(t, &format!("tandem_peer_received_bytes_total{{{ALPHA}}}"));
    let run = rand::random::<u64>();
    let mut w = BlockWriter::open(&dev, run, false);
    for i in 0..40u64 {
        w.write(i * BLOCK as u64).unwrap();
    }
    let t1 = scrape(a);
    assert_eq!(writes(&t1) - writes(&ta), 40.0, "40 writes made:\n{t1}");
    assert_eq!(flushes(&t1), flushes(&ta), "no flush made");
    assert_eq!(acks(&t1) - acks(&ta), 40.0, "each write acknowledged by beta once (sync mode):\n{t1}");
    assert!(sent(&t1) - sent(&ta) >= 40.0 * BLOCK as f64, "40 blocks sent to beta:\n{t1}");
    let tb1 = scrape(b);
    assert!(received(&tb1) - received(&tb) >= 40.0 * BLOCK as f64, "40 blocks received by beta:\n{tb1}");
    // The connection to beta: each of the 40 writes went out in at least one packet of its
    // own (each waited for beta's ack before the next), over a path MTU discovery measured.
    let packets = |t: &str| must(t, r#"tandem_link_sent_packets_total{peer="beta"}"#);
    assert!(packets(&t1) - packets(&ta) >= 40.0, "40 writes, at least 40 packets to beta:\n{t1}");
    assert!(must(&t1, r#"tandem_link_rtt_seconds{peer="beta"}"#) > 0.0, "{t1}");
    let mtu = must(&t1, r#"tandem_link_path_mtu_bytes{peer="beta"}"#);
    assert!((1200.0..=9000.0).contains(&mtu), "path MTU {mtu} outside QUIC's minimum and max_mtu:\n{t1}");
    assert!(
        must(&tb1, r#"tandem_link_sent_packets_total{peer="alpha"}"#) > 0.0,
        "beta's link to alpha:\n{tb1}"
    );
    let mut ws = BlockWriter::open(&dev, run, true);
    ws.write(100 * BLOCK as u64).unwrap();
    let t2 = scrape(a);
    assert_eq!(writes(&t2) - writes(&t1), 1.0, "one more write:\n{t2}");
    assert!(flushes(&t2) > flushes(&t1), "an O_DSYNC write flushes:\n{t2}");
    // Sum and buckets are consistent with the count; the +Inf bucket is the count.
    let inf = must(&t2, &format!(r#"tandem_write_latency_seconds_bucket{{{MAIL},le="+Inf"}}"#));
    assert_eq!(inf, writes(&t2));
    assert!(must(&t2, &format!("tandem_write_latency_seconds_sum{{{MAIL}}}")) > 0.0);

    // status --statistics shows the same figures (nothing written in between).
    let st = status_statistics(&lab, "alpha");
    let r = &st["resources"][0];
    assert_eq!(r["stats"]["write_latency"]["count"].as_f64(), Some(writes(&t2)), "{st:#}");
    assert_eq!(r["stats"]["flush_latency"]["count"].as_f64(), Some(flushes(&t2)), "{st:#}");
    assert_eq!(r["peers"][0]["ack_latency"]["count"].as_f64(), Some(acks(&t2)), "{st:#}");
    assert_eq!(r["peers"][0]["sent_wire_bytes"].as_f64(), Some(sent(&t2)), "{st:#}");
    let text = tandem_ok(&lab, "alpha", &["status", "--statistics"]);
    assert!(text.contains(&format!("writes: {} requests", writes(&t2))), "{text}");
    assert!(text.contains("acks: "), "{text}");
    assert!(text.contains("link to beta: rtt "), "{text}");
    let link = &st["links"][0];
    assert_eq!(link["node"], "beta", "{st:#}");
    assert!(link["min_rtt_secs"].as_f64().unwrap() <= link["rtt_secs"].as_f64().unwrap(), "{st:#}");
    assert!(link["sent_packets"].as_f64() >= Some(packets(&t1)), "{st:#}");

    // Out of sync grows while beta is disconnected and written past, and falls to 0
    // after the resync on reconnect.
    let oos = |t: &str| must(t, &format!("tandem_peer_out_of_sync_bytes{{{BETA}}}"));
    assert_eq!(oos(&t2), 0.0);
    tandem_ok(&lab, "alpha", &["disconnect", "mail"]);
    wait_scrape(a, "beta disconnected", |t| {
        value(t, &format!("tandem_peer_connected{{{BETA}}}")) == Some(0.0)
    });
    for i in 0..16u64 {
        w.write((200 + i) * BLOCK as u64).unwrap();
    }
    let t3 = scrape(a);
    assert!(oos(&t3) >= 16.0 * BLOCK as f64, "16 blocks written while disconnected:\n{t3}");
    for i in 0..16u64 {
        w.write((400 + i) * BLOCK as u64).unwrap();
    }
    let t4 = scrape(a);
    assert!(oos(&t4) > oos(&t3), "out of sync grows with more writes: {} -> {}", oos(&t3), oos(&t4));
    assert_eq!(must(&t4, &format!(r#"tandem_peer_replication_state{{{BETA},state="off"}}"#)), 1.0);
    tandem_ok(&lab, "alpha", &["connect", "mail"]);
    let t5 = wait_scrape(a, "beta resynced", |t| {
        value(t, &format!("tandem_peer_connected{{{BETA}}}")) == Some(1.0)
            && value(t, &format!("tandem_peer_out_of_sync_bytes{{{BETA}}}")) == Some(0.0)
            && value(t, &format!(r#"tandem_peer_replication_state{{{BETA},state="established"}}"#))
                == Some(1.0)
    });
    assert!(
        must(&t5, &format!("tandem_resync_done_bytes{{{BETA}}}")) >= oos(&t4),
        "the resync did what was out of sync:\n{t5}"
    );
    assert_eq!(must(&t5, &format!("tandem_resync_active{{{BETA}}}")), 0.0);
    promtool_check_metrics(&t5).unwrap_or_else(|e| panic!("after the resync: {e}\n{t5}"));
    // Every block reached beta.
    wait_until(&lab, "alpha", "caught up", secs(30), all_caught_up);
    let lacking = w.lacking(&lab.image("beta"));
    assert!(lacking.is_empty(), "blocks missing on beta after the resync: {lacking:?}");

    // The role gauge flips on demote and promote.
    drop((w, ws));
    let r = lab.demote("alpha").unwrap();
    assert!(r.ok, "{r:?}");
    let t6 = scrape(a);
    assert_eq!((role(&t6, "primary"), role(&t6, "secondary")), (0.0, 1.0), "demoted:\n{t6}");
    assert_eq!(writes(&t6), writes(&t5), "the histogram outlives the promotion");
    let r = lab.promote("alpha", false).unwrap();
    assert!(r.ok, "{r:?}");
    let t7 = scrape(a);
    assert_eq!((role(&t7, "primary"), role(&t7, "secondary")), (1.0, 0.0), "promoted again:\n{t7}");
}

/// Connects and sends `bytes`, keeping the connection open.
fn open_with(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s
}

#[test]
fn bad_and_slow_http_clients_never_block_the_agent() {
    require_real_devices();
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions::default());
    let a = enable_metrics(&lab, "alpha");
    lab.start("alpha").unwrap();
    let r = lab.promote("alpha", false).unwrap();
    assert!(r.ok, "{r:?}");
    let dev = wait_until(&lab, "alpha", "device", secs(30), |r| r.device.is_some()).device.unwrap();

    // Malformed and unexpected requests get an error status, not a crash.
    let cases: [(&[u8], &str); 6] = [
        (b"\x00\x01\x02 garbage\r\n\r\n", "HTTP/1.1 400"),
        (b"GET /metrics HTTP/9.9\r\n\r\n", "HTTP/1.1 "),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", "HTTP/1.1 405"),
        (b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 404"),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "HTTP/1.1 400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 200"),
    ];
    for (req, want) in cases {
        let resp = http_raw(a, req).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(req)));
        assert!(resp.starts_with(want), "{:?} -> {resp:?} (wanted {want})", String::from_utf8_lossy(req));
    }
    // A head larger than the limit is refused (431 or 400), or the connection closed.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 256 << 10));
    huge.extend(b"\r\n\r\n");
    match http_raw(a, &huge) {
        Ok(resp) => assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 431") || resp.starts_with("HTTP/1.1 400"),
            "huge head -> {:?}",
            &resp[..resp.len().min(200)]
        ),
        Err(e) => assert!(
            matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
            "huge head: {e}"
        ),
    }

    // Slow clients: heads that never finish, a client that never reads its answer, and more
    // connections than the server serves at once.
    let mut slow: Vec<TcpStream> =
        (0..8).map(|_| open_with(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")).collect();
    let mut never_reads = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(a).unwrap();
        let small: libc::c_int = 1024;
        // SAFETY: a valid socket and a c_int option value of the size given.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &small as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        s.write_all(&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200)).unwrap();
        never_reads.push(s);
    }
    let flood: Vec<TcpStream> = (0..80).filter_map(|_| TcpStream::connect(a).ok()).collect();

    // Meanwhile the agent serves its control socket and the application's writes...
    let t0 = Instant::now();
    let st = lab.status("alpha").expect("status answers while HTTP clients hang");
    assert_eq!(st.resources[0].role, "primary");
    let mut w = BlockWriter::open(&dev, rand::random(), true);
    for i in 0..32u64 {
        w.write(i * BLOCK as u64).unwrap();
    }
    let lacking = w.lacking(&lab.image("alpha"));
    assert!(lacking.is_empty(), "writes made while HTTP clients hang: {lacking:?}");
    eprintln!("status and 32 writes while 92 HTTP clients hang: {:?}", t0.elapsed());

    // ...and the stuck heads are cut off (after the head timeout), so a scrape gets
    // through again; it counts the writes.
    for s in &mut slow {
        s.set_read_timeout(Some(secs(60))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        let said = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || said.starts_with("HTTP/1.1 408"), "a stuck head is closed: {said:?}");
    }
    drop(flood);
    let deadline = Instant::now() + secs(60);
    let text = loop {
        match http_raw(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") {
            Ok(r) if r.starts_with("HTTP/1.1 200") => break r,
            other => {
                assert!(Instant::now() < deadline, "no scrape got through: {other:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let body = text.split_once("\r\n\r\n").unwrap().1;
    assert!(must(body, &format!("tandem_write_latency_seconds_count{{{MAIL}}}")) >= 32.0);
    drop(never_reads);
    // Still the same agent, and it logged no panic.
    assert!(lab.pid("alpha").is_some());
    assert!(lab.status("alpha").is_ok());
    let log = lab.log_text("alpha");
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
}
