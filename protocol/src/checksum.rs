/// Checksum of a block payload as carried in data frames and used by resync and verify.
///
/// crc32 (IEEE, via crc32fast's PCLMUL path): it detects corruption between the copy out of
/// the request buffer and the peer's disk. TLS already protects the bytes in flight; this
/// protects against our own bugs and memory errors end to end.
pub fn block_checksum(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// A 128-bit content hash (xxh3-128) for comparing blocks between nodes in checksum-based
/// resync and online verify, where a 32-bit CRC would collide once in ~4·10⁹ comparisons.
pub type BlockHash = [u8; 16];

pub fn block_hash(data: &[u8]) -> BlockHash {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}
