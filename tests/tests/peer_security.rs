//! What a peer can and cannot do: a node with the wrong certificate gets nothing and writes
//! nothing; a corrupted block is never written (the resource's session ends, the connection
//! stays); malformed frames, another protocol version
//! and a disagreeing resource size are refused with a reason in the log.

use std::time::Duration;

use bytes::Bytes;
use tandem_agent::config::Config;
use tandem_agent::tls::Identity;
use tandem_agent::transport::framed::{FrameReader, FrameWriter};
use tandem_agent::transport::{pin_peers, Transport, TransportSettings};
use tandem_protocol::*;
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const SIZE: u64 = 64 << 20;

fn zero_sha(len: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let z = vec![0u8; 1 << 20];
    for _ in 0..len / (1 << 20) {
        h.update(&z);
    }
    format!("{:x}", h.finalize())
}

/// Writes a copy of the lab's config in which `node` uses a freshly generated key pair that
/// no other node has pinned.
fn rogue_config(lab: &Lab, node: &str) -> std::path::PathBuf {
    let rogue_dir = lab.dir.join("rogue");
    tandem_agent::tls::keygen(node, &rogue_dir, false).unwrap();
    let text = std::fs::read_to_string(&lab.config).unwrap();
    let keys = lab.dir.join("keys");
    let text = text
        .replace(&format!("{}/{node}.crt", keys.display()), &format!("{}/{node}.crt", rogue_dir.display()))
        .replace(&format!("{}/{node}.key", keys.display()), &format!("{}/{node}.key", rogue_dir.display()));
    let p = lab.dir.join(format!("rogue-{node}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn wait_log(lab: &Lab, node: &str, needle: &str) -> String {
    for _ in 0..300 {
        let log = lab.log_text(node);
        if log.contains(needle) {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{node}'s log never said {needle:?}:\n{}", lab.log_text(node));
}

/// The primary writes while its peer presents an unknown certificate: the peer is refused
/// with the reason logged, and its image stays all zeroes.
fn wrong_certificate(rogue: &str) {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: SIZE, ..Default::default() });
    let cfg = rogue_config(&lab, rogue);
    let honest = if rogue == "alpha" { "beta" } else { "alpha" };
    lab.start(honest).unwrap();
    lab.start_with_config(rogue, &cfg).unwrap();
    // alpha dials beta: a rogue beta is refused as a server, a rogue alpha as a client.
    let side = if rogue == "beta" { "server" } else { "client" };
    let log = wait_log(&lab, honest, &format!("refused {side} certificate sha256:"));
    assert!(log.contains("it is not the certificate configured"), "{log}");
    // Let the rogue retry a few times; it never connects.
    std::thread::sleep(Duration::from_secs(2));
    for n in ["alpha", "beta"] {
        let st = lab.resource_status(n).unwrap();
        assert_ne!(st.peers[0].connection, "connected", "{n}: {st:#?}");
    }
    // The honest primary (or, with a rogue primary, the rogue) writes; nothing reaches the other.
    let primary = "alpha";
    assert!(lab.promote(primary, false).unwrap().ok);
    let dev = lab.resource_status(primary).unwrap().device.unwrap();
    for i in 0..64u64 {
        write_block_direct(&dev, i * 1_048_576, &stamped_block(i * 1_048_576, 7, 1), true).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(lab.demote(primary).unwrap().ok);
    lab.stop_all();
    assert_eq!(sha256_file(&lab.image("beta")), zero_sha(SIZE), "the refused node's image was written to");
    assert_ne!(sha256_file(&lab.image("alpha")), zero_sha(SIZE));
}

#[test]
fn peer_with_wrong_server_certificate_is_refused() {
    wrong_certificate("beta");
}

#[test]
fn peer_with_wrong_client_certificate_is_refused() {
    wrong_certificate("alpha");
}

/// A test client holding alpha's real key speaks the protocol to beta's agent by hand.
struct FakePrimary {
    rt: tokio::runtime::Runtime,
    transport: Transport,
    cfg: Config,
}

impl FakePrimary {
    fn new(lab: &Lab) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let cfg = Config::load(&lab.config).unwrap();
        let me = cfg.node("alpha").unwrap().clone();
        let transport = rt.block_on(async {
            let id = Identity::load(&me.cert, &me.key).unwrap();
            Transport::bind(
                id,
                pin_peers(&cfg, "alpha").unwrap(),
                TransportSettings::from_config(&cfg),
                "127.0.0.1:0".parse().unwrap(),
            )
            .unwrap()
        });
        Self { rt, transport, cfg }
    }

    fn hello(&self) -> Frame {
        Frame::hello(&Hello {
            cluster: self.cfg.cluster.clone(),
            node: "alpha".into(),
            resources: vec![ResourceHello {
                name: "mail".into(),
                size: SIZE,
                block_size: 4096,
                role: Role::Primary,
                disk: DiskState::UpToDate,
                // The same blank generation as beta's new image: the two are in sync.
                generation: Generation { current: tandem_replicator_blank(), history: vec![] },
                bitmap_uuid: 0,
                out_of_sync_bytes: 0,
                crashed_primary: false,
                generation_started_ms: 0,
                after_split_brain: tandem_protocol::AfterSplitBrain::Disconnect,
                discard_local: false,
            }],
        })
    }

    /// Connects and completes the handshake with `hello`; returns the connection and what
    /// the agent answered.
    async fn connect(&self, hello: Frame) -> (quinn::Connection, FrameWriter, FrameReader, Option<Frame>) {
        let conn = self
            .transport
            .connect(self.cfg.node("beta").unwrap())
            .await
            .expect("TLS with the real key works");
        let (s, r) = conn.open_bi().await.unwrap();
        let (mut w, mut r) = (FrameWriter::new(s), FrameReader::new(r));
        w.send(&hello).await.unwrap();
        let answer =
            tokio::time::timeout(Duration::from_secs(10), r.next()).await.ok().and_then(|x| x.ok().flatten());
        (conn, w, r, answer)
    }
}

/// The generation of a brand-new image (see `tandem_replicator::generation::BLANK`).
fn tandem_replicator_blank() -> u64 {
    1
}

/// Reads the control stream until the agent ends the resource's session; returns its
/// reason (heartbeats are answered by nobody here, so this must come within the timeout).
async fn resource_down(cr: &mut FrameReader) -> String {
    let wait = async {
        loop {
            match cr.next().await {
                Ok(Some(Frame::Control(ControlMsg::ResourceDown { resource, reason, .. }))) => {
                    assert_eq!(resource, "mail");
                    return reason;
                }
                Ok(Some(_)) => continue,
                other => panic!("control stream ended before the session did: {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.expect("beta ends the resource's session")
}

fn data(seq: u64, offset: u64, payload: Vec<u8>, checksum_delta: u32) -> Frame {
    let checksum = block_checksum(&payload) ^ checksum_delta;
    Frame::Data(DataFrame { seq, offset, flags: 0, checksum, payload: Bytes::from(payload) })
}

#[test]
fn corrupted_block_is_not_written_counted_and_the_session_ends() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: SIZE, ..Default::default() });
    lab.start("beta").unwrap();
    let fake = FakePrimary::new(&lab);
    let good = stamped_block(0, 1, 1);
    let bad = stamped_block(4096, 1, 1);
    let (reason, acked) = fake.rt.block_on(async {
        let (conn, _cw, mut cr, answer) = fake.connect(fake.hello()).await;
        assert!(matches!(answer, Some(Frame::Hello { .. })), "no hello from beta: {answer:?}");
        let (s, r) = conn.open_bi().await.unwrap();
        let (mut w, mut r) = (FrameWriter::new(s), FrameReader::new(r));
        w.send(&Frame::Control(ControlMsg::OpenStream {
            resource: "mail".into(),
            purpose: StreamPurpose::Replication,
        }))
        .await
        .unwrap();
        w.send(&data(1, 0, good.clone(), 0)).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(10), r.next()).await.unwrap().unwrap();
        // Checksum computed, then the payload "changed in memory": it no longer matches.
        w.send(&data(2, 4096, bad.clone(), 0x0100_0000)).await.unwrap();
        // The resource's session ends with the reason; the connection (which other
        // resources would share) stays.
        let reason = resource_down(&mut cr).await;
        assert!(conn.close_reason().is_none(), "the connection was closed: {:?}", conn.close_reason());
        (reason, ack)
    });
    assert_eq!(acked, Some(Frame::Ack { seq: 1, level: AckLevel::Durable }));
    assert!(reason.contains("checksum mismatch on seq 2"), "close reason: {reason}");
    let log = wait_log(&lab, "beta", "checksum mismatch on seq 2");
    assert!(log.contains("not written"), "{log}");
    let st = lab.resource_status("beta").unwrap();
    assert_eq!(st.stats.checksum_errors, 1, "{st:#?}");
    assert_eq!(st.stats.replicated_writes, 1);
    lab.stop_all();
    assert_eq!(read_at(&lab.image("beta"), 0, 4096), good, "the good block is on disk");
    assert!(
        read_at(&lab.image("beta"), 4096, 4096).iter().all(|b| *b == 0),
        "the corrupt block reached the disk"
    );
}

#[test]
fn malformed_frame_ends_the_resource_session_with_a_reason() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: SIZE, ..Default::default() });
    lab.start("beta").unwrap();
    let fake = FakePrimary::new(&lab);
    let reason = fake.rt.block_on(async {
        let (conn, _cw, mut cr, _) = fake.connect(fake.hello()).await;
        let (mut s, _r) = conn.open_bi().await.unwrap();
        let mut open = Frame::Control(ControlMsg::OpenStream {
            resource: "mail".into(),
            purpose: StreamPurpose::Replication,
        })
        .encode_to_vec();
        // A data header claiming a 3 GiB payload.
        open.extend_from_slice(
            &tandem_protocol::header::Header { kind: FrameKind::Data, flags: 0, body_len: 3 << 30 }.encode(),
        );
        s.write_all(&open).await.unwrap();
        let reason = resource_down(&mut cr).await;
        assert!(conn.close_reason().is_none(), "the connection was closed: {:?}", conn.close_reason());
        reason
    });
    assert!(
        reason.contains("malformed frame") && reason.contains("exceeds the limit"),
        "close reason: {reason}"
    );
    wait_log(&lab, "beta", "malformed frame from alpha");
    lab.stop_all();
    assert_eq!(sha256_file(&lab.image("beta")), zero_sha(SIZE));
}

#[test]
fn other_protocol_version_is_refused_in_words() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: SIZE, ..Default::default() });
    lab.start("beta").unwrap();
    let fake = FakePrimary::new(&lab);
    let answer = fake.rt.block_on(async {
        let future = Frame::Hello {
            version: PROTOCOL_VERSION + 1,
            body: Bytes::from_static(b"\x01\x02 whatever v2 says"),
        };
        // Both sides send their hello at once; the refusal follows beta's hello.
        let (_conn, _w, mut r, answer) = fake.connect(future).await;
        assert!(matches!(answer, Some(Frame::Hello { .. })), "{answer:?}");
        tokio::time::timeout(Duration::from_secs(10), r.next()).await.ok().and_then(|x| x.ok().flatten())
    });
    let want = format!("peer speaks protocol version {}", PROTOCOL_VERSION + 1);
    match answer {
        Some(Frame::Control(ControlMsg::Refuse { reason })) => {
            assert!(reason.contains(&want), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    wait_log(&lab, "beta", &want);
    let st = lab.resource_status("beta").unwrap();
    assert!(st.peers[0].last_error.as_deref().unwrap_or_default().contains(&want), "{st:#?}");
}

#[test]
fn resource_size_mismatch_between_nodes_is_refused() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: SIZE, ..Default::default() });
    let text =
        std::fs::read_to_string(&lab.config).unwrap().replace("size = \"67108864\"", "size = \"134217728\"");
    assert!(text.contains("134217728"));
    let beta_cfg = lab.dir.join("beta-bigger.toml");
    std::fs::write(&beta_cfg, text).unwrap();
    lab.start("alpha").unwrap();
    lab.start_with_config("beta", &beta_cfg).unwrap();
    let want = "size mismatch: alpha has 67108864 bytes, beta has 134217728 bytes";
    wait_log(&lab, "alpha", want);
    let st =
        lab.wait_for("alpha", "standalone", secs(30), |r| r.peers[0].connection == "standalone").unwrap();
    assert!(st.peers[0].last_error.as_deref().unwrap().contains("size mismatch"), "{st:#?}");
    let b = lab.wait_for("beta", "refusal seen", secs(30), |r| r.peers[0].last_error.is_some()).unwrap();
    assert!(b.peers[0].last_error.as_deref().unwrap().contains("size mismatch"), "{b:#?}");
}
