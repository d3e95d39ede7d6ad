//! Optional compression of block data on the wire (per peer, for WAN links).
//!
//! A compressed data frame carries a flag naming the codec; its fixed part still declares
//! the *uncompressed* length and the checksum of the uncompressed data, so the receiver
//! checks the block it is about to write, not the bytes on the wire. A block is sent
//! compressed only if that saves at least an eighth of it; otherwise it goes as is.
//! Decompression never produces more than the declared length, which is capped.

use bytes::{Bytes, BytesMut};

use crate::frame::{DataFrame, FLAG_LZ4, FLAG_ZSTD};
use crate::header::{Header, HEADER_LEN};
use crate::{DecodeError, FrameKind, MAX_DATA_PAYLOAD};

/// Alignment of decompressed payloads, as for uncompressed ones (O_DIRECT on the standby).
const ALIGN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Lz4,
    /// zstd at the given level (1 is the fast end).
    Zstd(i32),
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(1)),
            other => match other.strip_prefix("zstd:").and_then(|l| l.parse::<i32>().ok()) {
                Some(l) if (1..=19).contains(&l) => Ok(Compression::Zstd(l)),
                _ => Err(format!(
                    "unknown compression {other:?} (none, lz4, zstd or zstd:LEVEL with LEVEL 1-19)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(1) => f.write_str("zstd"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// Compresses `data` with `c`; `None` if it does not pay (or `c` is `None`).
pub fn compress(c: Compression, data: &[u8]) -> Option<(u8, Vec<u8>)> {
    let (flag, out) = match c {
        Compression::None => return None,
        Compression::Lz4 => (FLAG_LZ4, lz4_flex::block::compress(data)),
        Compression::Zstd(level) => (FLAG_ZSTD, zstd::bulk::compress(data, level).ok()?),
    };
    (out.len() + data.len() / 8 <= data.len()).then_some((flag, out))
}

/// The header and fixed part of `d` sent with `compressed` (from [`compress`]) as payload.
pub fn encode_compressed_head(
    d: &DataFrame,
    kind: FrameKind,
    flag: u8,
    compressed: &[u8],
) -> [u8; HEADER_LEN + DataFrame::FIXED_LEN] {
    let mut b = d.encode_head_as(kind);
    let body_len = DataFrame::FIXED_LEN + compressed.len();
    let h = Header { kind, flags: d.flags | flag, body_len: body_len as u32 };
    b[..HEADER_LEN].copy_from_slice(&h.encode());
    b
}

/// The uncompressed length a compressed frame declares must be one a data frame may carry.
pub(crate) fn check_declared(declared: u32) -> Result<(), DecodeError> {
    let n = declared as usize;
    if n == 0 || n > MAX_DATA_PAYLOAD {
        return Err(DecodeError::Decompress(format!("declared length {n} outside 1..={MAX_DATA_PAYLOAD}")));
    }
    Ok(())
}

/// Decompresses a payload sent with `flag` into an aligned buffer of exactly `declared`
/// bytes.
pub(crate) fn decompress(flag: u8, declared: u32, wire: &[u8]) -> Result<Bytes, DecodeError> {
    check_declared(declared)?;
    let n = declared as usize;
    let mut buf = BytesMut::zeroed(n + ALIGN);
    let pad = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
    let _ = buf.split_to(pad);
    buf.truncate(n);
    let got = if flag == FLAG_LZ4 {
        lz4_flex::block::decompress_into(wire, &mut buf)
            .map_err(|e| DecodeError::Decompress(e.to_string()))?
    } else {
        zstd::bulk::decompress_to_buffer(wire, &mut buf[..])
            .map_err(|e| DecodeError::Decompress(e.to_string()))?
    };
    if got != n {
        return Err(DecodeError::Decompress(format!("{got} bytes decompressed, {n} declared")));
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{block_checksum, Frame, FrameDecoder};

    fn mail_block() -> Vec<u8> {
        let mut v = Vec::new();
        let mut i = 0;
        while v.len() < 4096 {
            v.extend_from_slice(
                format!("Received: from mx{i}.example.org by mail.example.net; line {i}\r\n").as_bytes(),
            );
            i += 1;
        }
        v.truncate(4096);
        v
    }

    fn round_trip(c: Compression, data: &[u8]) -> DataFrame {
        let d = DataFrame {
            seq: 7,
            offset: 8192,
            flags: 0,
            checksum: block_checksum(data),
            payload: Bytes::copy_from_slice(data),
        };
        let mut wire = Vec::new();
        match compress(c, data) {
            Some((flag, z)) => {
                wire.extend_from_slice(&encode_compressed_head(&d, FrameKind::Data, flag, &z));
                wire.extend_from_slice(&z);
            }
            None => {
                wire.extend_from_slice(&d.encode_head());
                wire.extend_from_slice(data);
            }
        }
        let mut dec = FrameDecoder::default();
        dec.push(&wire);
        match dec.next_frame().unwrap() {
            Some(Frame::Data(got)) => got,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn compressed_blocks_arrive_as_written_and_aligned() {
        let data = mail_block();
        for c in [Compression::Lz4, Compression::Zstd(1), Compression::Zstd(3)] {
            assert!(compress(c, &data).is_some(), "{c} did not compress mail text");
            let got = round_trip(c, &data);
            assert_eq!(&got.payload[..], &data[..], "{c}");
            assert!(got.checksum_ok());
            assert_eq!(got.flags, 0, "the codec flag is consumed by the decoder");
            assert_eq!(got.payload.as_ptr() as usize % ALIGN, 0, "{c}: payload not aligned");
        }
    }

    #[test]
    fn incompressible_blocks_go_as_they_are() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert_eq!(compress(Compression::Lz4, &noise), None);
        assert_eq!(&round_trip(Compression::Lz4, &noise).payload[..], &noise[..]);
    }

    #[test]
    fn garbage_and_lies_are_errors() {
        assert!(decompress(FLAG_LZ4, 4096, b"not lz4 at all").is_err());
        assert!(decompress(FLAG_ZSTD, 4096, b"not zstd at all").is_err());
        let (_, z) = compress(Compression::Lz4, &mail_block()).unwrap();
        // Declares less or more than the stream holds.
        assert!(decompress(FLAG_LZ4, 1000, &z).is_err());
        assert!(decompress(FLAG_LZ4, 8192, &z).is_err());
        assert!(decompress(FLAG_LZ4, (MAX_DATA_PAYLOAD + 1) as u32, &z).is_err());
    }

    #[test]
    fn decompression_can_be_deferred_to_the_caller() {
        let data = mail_block();
        let d = DataFrame {
            seq: 9,
            offset: 4096,
            flags: 0,
            checksum: block_checksum(&data),
            payload: data.clone().into(),
        };
        let (flag, z) = compress(Compression::Zstd(1), &data).unwrap();
        let mut wire = encode_compressed_head(&d, FrameKind::ResyncData, flag, &z).to_vec();
        wire.extend_from_slice(&z);
        // A garbage payload behind a valid head: the head decodes, the payload does not.
        let mut garbage = encode_compressed_head(&d, FrameKind::Data, flag, &z).to_vec();
        garbage.extend(std::iter::repeat_n(0xa5u8, z.len()));
        let mut dec = FrameDecoder::default();
        dec.push(&wire);
        dec.push(&garbage);
        dec.push(&Frame::Flush { seq: 10, flags: 0 }.encode_to_vec());
        let Some(crate::Decoded::Compressed(c)) = dec.next_decoded().unwrap() else { panic!("not deferred") };
        assert_eq!(c.wire_len(), z.len());
        match c.decompress().unwrap() {
            Frame::ResyncData(got) => {
                assert_eq!(&got.payload[..], &data[..]);
                assert_eq!((got.seq, got.offset, got.flags), (9, 4096, 0));
                assert!(got.checksum_ok());
                assert_eq!(got.payload.as_ptr() as usize % ALIGN, 0);
            }
            other => panic!("{other:?}"),
        }
        let Some(crate::Decoded::Compressed(bad)) = dec.next_decoded().unwrap() else {
            panic!("not deferred")
        };
        assert!(matches!(bad.decompress(), Err(DecodeError::Decompress(_))));
        // The frames after it are still delimited (the caller decides to stop).
        assert_eq!(
            dec.next_decoded().unwrap(),
            Some(crate::Decoded::Frame(Frame::Flush { seq: 10, flags: 0 }))
        );
    }

    #[test]
    fn inline_decompression_failure_is_sticky() {
        let data = mail_block();
        let d =
            DataFrame { seq: 1, offset: 0, flags: 0, checksum: block_checksum(&data), payload: data.into() };
        let mut wire = encode_compressed_head(&d, FrameKind::Data, FLAG_LZ4, b"junk").to_vec();
        wire.extend_from_slice(b"junk");
        wire.extend_from_slice(&Frame::Flush { seq: 2, flags: 0 }.encode_to_vec());
        let mut dec = FrameDecoder::default();
        dec.push(&wire);
        assert!(matches!(dec.next_frame(), Err(DecodeError::Decompress(_))));
        assert!(matches!(dec.next_frame(), Err(DecodeError::Decompress(_))));
    }

    #[test]
    fn names_parse() {
        for (s, c) in [("none", Compression::None), ("lz4", Compression::Lz4), ("zstd", Compression::Zstd(1))]
        {
            assert_eq!(s.parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string(), s);
        }
        assert_eq!("zstd:5".parse::<Compression>().unwrap(), Compression::Zstd(5));
        assert!("zstd:99".parse::<Compression>().is_err());
        assert!("gzip".parse::<Compression>().is_err());
    }
}
