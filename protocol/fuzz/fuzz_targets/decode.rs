//! Arbitrary bytes, cut into chunks chosen by the input itself, through the frame decoder.
//! The decoder must never panic; whatever it accepts must re-encode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_protocol::{Frame, FrameDecoder, MAX_DATA_PAYLOAD, PROTOCOL_VERSION};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let step = (cut as usize % 64) + 1;
    let mut d = FrameDecoder::default();
    for chunk in rest.chunks(step) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => check(&f),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

fn check(f: &Frame) {
    if let Frame::Data(d) | Frame::ResyncData(d) = f {
        assert!(d.payload.len() <= MAX_DATA_PAYLOAD);
    }
    if let Frame::Hello { version, body } = f {
        if *version == PROTOCOL_VERSION {
            let _ = Frame::hello_body(body);
        }
    }
    let bytes = f.encode_to_vec();
    let mut d = FrameDecoder::default();
    d.push(&bytes);
    let again = d.next_frame().expect("re-encoded frame decodes").expect("complete");
    assert_eq!(&again, f);
}
