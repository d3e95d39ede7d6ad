//! Arbitrary bytes as the bincode body of a control frame: decoding must never panic, never
//! allocate past the limit, and round-trip what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_protocol::header::Header;
use tandem_protocol::{FrameDecoder, FrameKind, CONTROL_ENVELOPE_VERSION};

fuzz_target!(|data: &[u8]| {
    let mut body = vec![CONTROL_ENVELOPE_VERSION];
    body.extend_from_slice(data);
    let mut bytes = Header { kind: FrameKind::Control, flags: 0, body_len: body.len() as u32 }.encode().to_vec();
    bytes.extend_from_slice(&body);
    let mut d = FrameDecoder::default();
    d.push(&bytes);
    if let Ok(Some(f)) = d.next_frame() {
        let mut d2 = FrameDecoder::default();
        d2.push(&f.encode_to_vec());
        assert_eq!(d2.next_frame().unwrap().unwrap(), f);
    }
});
