//! Property tests: every frame round-trips through any chunking of the stream, and no byte
//! sequence makes the decoder panic or buffer beyond its cap.

use bytes::Bytes;
use proptest::prelude::*;
use tandem_protocol::*;

fn arb_role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Primary), Just(Role::Secondary)]
}

fn arb_disk() -> impl Strategy<Value = DiskState> {
    prop_oneof![Just(DiskState::UpToDate), Just(DiskState::Outdated), Just(DiskState::Inconsistent)]
}

fn arb_generation() -> impl Strategy<Value = Generation> {
    (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..5))
        .prop_map(|(current, history)| Generation { current, history })
}

fn arb_policy() -> impl Strategy<Value = AfterSplitBrain> {
    prop_oneof![
        Just(AfterSplitBrain::Disconnect),
        Just(AfterSplitBrain::DiscardZeroChanges),
        Just(AfterSplitBrain::DiscardYoungerPrimary),
        Just(AfterSplitBrain::DiscardLeastChanges),
    ]
}

fn arb_resource_hello() -> impl Strategy<Value = ResourceHello> {
    (
        ("[a-z]{1,12}", any::<u64>(), any::<u32>(), arb_role(), arb_disk()),
        (arb_generation(), any::<u64>(), any::<u64>(), any::<bool>()),
        (any::<u64>(), arb_policy(), any::<bool>()),
    )
        .prop_map(
            |(
                (name, size, block_size, role, disk),
                (generation, bitmap_uuid, oos, crashed),
                (started, policy, discard),
            )| {
                ResourceHello {
                    name,
                    size,
                    block_size,
                    role,
                    disk,
                    generation,
                    bitmap_uuid,
                    out_of_sync_bytes: oos,
                    crashed_primary: crashed,
                    generation_started_ms: started,
                    after_split_brain: policy,
                    discard_local: discard,
                }
            },
        )
}

fn arb_control() -> impl Strategy<Value = ControlMsg> {
    prop_oneof![
        ".{0,40}".prop_map(|reason| ControlMsg::Refuse { reason }),
        ".{0,40}".prop_map(|reason| ControlMsg::Error { reason }),
        arb_resource_hello().prop_map(ControlMsg::ResourceState),
        ("[a-z]{1,8}", arb_disk(), any::<u64>()).prop_map(|(resource, your_disk, oos)| {
            ControlMsg::PeerView(PeerView { resource, your_disk, out_of_sync_bytes: oos })
        }),
        "[a-z]{1,8}"
            .prop_map(|resource| ControlMsg::OpenStream { resource, purpose: StreamPurpose::Replication }),
        ("[a-z]{1,8}", proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20), any::<bool>())
            .prop_map(|(resource, runs, last)| ControlMsg::Bitmap { resource, runs, last }),
        ("[a-z]{1,8}", any::<bool>(), any::<bool>(), any::<u64>(), arb_generation()).prop_map(
            |(resource, full, checksum, total, generation)| ControlMsg::ResyncStart {
                resource,
                kind: ResyncKind { full, checksum },
                total_bytes: total,
                generation,
            }
        ),
        ("[a-z]{1,8}", arb_generation())
            .prop_map(|(resource, generation)| ControlMsg::ResyncDone { resource, generation }),
        ("[a-z]{1,8}", any::<bool>())
            .prop_map(|(resource, checksum)| ControlMsg::Invalidate { resource, checksum }),
        (arb_resource_hello(), any::<bool>())
            .prop_map(|(hello, answer)| ControlMsg::ResourceUp { hello, answer }),
        ("[a-z]{1,10}", ".{0,40}", any::<bool>()).prop_map(|(resource, reason, declines_offer)| {
            ControlMsg::ResourceDown { resource, reason, declines_offer }
        }),
        "[a-z]{1,10}".prop_map(|resource| ControlMsg::BarrierRequest { resource }),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), 0u64..(1 << 40), proptest::collection::vec(any::<u8>(), 1..9000), 0u8..2).prop_map(
            |(seq, offset, data, flags)| {
                let checksum = block_checksum(&data);
                Frame::Data(DataFrame { seq, offset, flags, checksum, payload: Bytes::from(data) })
            }
        ),
        (any::<u64>(), 0u8..2).prop_map(|(seq, flags)| Frame::Flush { seq, flags }),
        (any::<u64>(), 0u64..(1 << 40), 0u64..(1 << 40), 0u8..2)
            .prop_map(|(seq, offset, len, flags)| Frame::Discard { seq, offset, len, flags }),
        (any::<u64>(), any::<bool>()).prop_map(|(seq, d)| Frame::Ack {
            seq,
            level: if d { AckLevel::Durable } else { AckLevel::Received }
        }),
        (any::<u64>(), any::<bool>()).prop_map(|(nonce, reply)| Frame::Heartbeat { nonce, reply }),
        ("[a-z]{1,10}", "[a-z]{1,10}", proptest::collection::vec(arb_resource_hello(), 0..4))
            .prop_map(|(cluster, node, resources)| Frame::hello(&Hello { cluster, node, resources })),
        arb_control().prop_map(Frame::Control),
        (any::<u64>(), 0u64..(1 << 40), proptest::collection::vec(any::<u8>(), 1..9000)).prop_map(
            |(seq, offset, data)| {
                let checksum = block_checksum(&data);
                Frame::ResyncData(DataFrame { seq, offset, flags: 0, checksum, payload: Bytes::from(data) })
            }
        ),
        (any::<u64>(), 0u64..(1 << 40), proptest::collection::vec(any::<[u8; 16]>(), 1..64)).prop_map(
            |(seq, offset, hs)| Frame::ResyncCheck { seq, offset, hashes: Bytes::from(hs.concat()) }
        ),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(seq, d)| Frame::CheckReply { seq, differ: Bytes::from(d) }),
        (any::<u64>(), 0u64..(1 << 40), 1u32..(1 << 20)).prop_map(|(seq, offset, len)| Frame::Verify {
            seq,
            offset,
            len
        }),
        (any::<u64>(), proptest::collection::vec(any::<[u8; 16]>(), 0..64))
            .prop_map(|(seq, hs)| { Frame::VerifyReply { seq, hashes: Bytes::from(hs.concat()) } }),
    ]
}

/// Splits `bytes` at the given cut points and feeds them one chunk at a time.
fn decode_all(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, DecodeError> {
    let mut d = FrameDecoder::default();
    let mut out = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut at = 0;
    for p in points {
        d.push(&bytes[at..p]);
        at = p;
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frames_round_trip_under_any_chunking(
        frames in proptest::collection::vec(arb_frame(), 1..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            // encode_chunks and encode_to_vec must agree byte for byte
            let (head, payload) = f.encode_chunks();
            let mut v = head.to_vec();
            if let Some(p) = payload { v.extend_from_slice(&p); }
            prop_assert_eq!(&v, &f.encode_to_vec());
            stream.extend_from_slice(&v);
        }
        let decoded = decode_all(&stream, &cuts).expect("valid stream decodes");
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn hello_body_round_trips(cluster in "[a-z]{1,10}", node in "[a-z]{1,10}",
                              resources in proptest::collection::vec(arb_resource_hello(), 0..4)) {
        let h = Hello { cluster, node, resources };
        match Frame::hello(&h) {
            Frame::Hello { version, body } => {
                prop_assert_eq!(version, PROTOCOL_VERSION);
                prop_assert_eq!(Frame::hello_body(&body).unwrap(), h);
            }
            other => prop_assert!(false, "not a hello: {:?}", other),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                   cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
        let _ = decode_all(&bytes, &cuts);
    }

    #[test]
    fn mutated_frames_never_panic_and_never_decode_to_a_bigger_payload(
        frame in arb_frame(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = frame.encode_to_vec();
        for (pos, val) in flips {
            let i = pos % bytes.len();
            bytes[i] ^= val | 1;
        }
        if let Ok(frames) = decode_all(&bytes, &[]) {
            for f in frames {
                if let Frame::Data(d) = f {
                    prop_assert!(d.payload.len() <= MAX_DATA_PAYLOAD);
                }
            }
        }
    }

    #[test]
    fn corrupted_payload_fails_checksum(data in proptest::collection::vec(any::<u8>(), 1..4096),
                                        pos in any::<usize>(), flip in 1u8..) {
        let checksum = block_checksum(&data);
        let mut bad = data.clone();
        let i = pos % bad.len();
        bad[i] ^= flip;
        let f = DataFrame { seq: 1, offset: 0, flags: 0, checksum, payload: Bytes::from(bad) };
        prop_assert!(!f.checksum_ok());
    }
}

#[test]
fn truncated_stream_waits_instead_of_failing() {
    let f = Frame::Flush { seq: 7, flags: 0 };
    let bytes = f.encode_to_vec();
    let mut d = FrameDecoder::default();
    d.push(&bytes[..bytes.len() - 1]);
    assert_eq!(d.next_frame().unwrap(), None);
    d.push(&bytes[bytes.len() - 1..]);
    assert_eq!(d.next_frame().unwrap(), Some(f));
}

#[test]
fn other_protocol_version_is_reported_not_decoded() {
    // A future peer's hello: version 2 and a body we cannot parse.
    let f = Frame::Hello { version: 2, body: Bytes::from_static(b"\xff\xff\xff future") };
    let mut d = FrameDecoder::default();
    d.push(&f.encode_to_vec());
    match d.next_frame().unwrap() {
        Some(Frame::Hello { version, .. }) => assert_eq!(version, 2),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn control_with_unknown_envelope_version_is_refused() {
    let mut bytes = Frame::Control(ControlMsg::Error { reason: "x".into() }).encode_to_vec();
    bytes[tandem_protocol::HEADER_LEN] = 99;
    let mut d = FrameDecoder::default();
    d.push(&bytes);
    assert!(matches!(d.next_frame(), Err(DecodeError::EnvelopeVersion { found: 99, .. })));
}

#[test]
fn control_with_huge_declared_string_does_not_allocate_it() {
    // envelope v1, variant 0 (Refuse), string length varint claiming ~2^60 bytes
    let mut body = vec![CONTROL_ENVELOPE_VERSION, 0, 0xff];
    body.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let mut bytes =
        tandem_protocol::header::Header { kind: FrameKind::Control, flags: 0, body_len: body.len() as u32 }
            .encode()
            .to_vec();
    bytes.extend_from_slice(&body);
    let mut d = FrameDecoder::default();
    d.push(&bytes);
    assert!(matches!(d.next_frame(), Err(DecodeError::Control(_))));
}
