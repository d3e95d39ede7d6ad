/// Checksum of a block payload as carried in data frames and used by resync and verify.
///
/// crc32 (IEEE, via crc32fast's PCLMUL path): it detects corruption between the copy out of
/// the request buffer and the peer's disk. TLS already protects the bytes in flight; this
/// protects against our own bugs and memory errors end to end.
pub fn block_checksum(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}
