//! Which blocks a peer is missing: one bit per `granularity` bytes of the volume.

/// A dirty bitmap for one peer. A bit is set for every block written that the peer has not
/// durably acknowledged. Counting is kept incrementally so status is O(1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    bits: u64,
    granularity: u64,
    size: u64,
    set_count: u64,
    /// Bumped whenever a bit goes from clear to set. A resync records it when it reads a
    /// chunk and clears the chunk's bits on the peer's ack only if it has not moved: a bit
    /// set in between (a write the peer then missed) is never cleared by an older copy.
    version: u64,
}

impl DirtyBitmap {
    /// `granularity` must be a power of two (default 4096).
    pub fn new(size: u64, granularity: u64) -> Self {
        assert!(granularity.is_power_of_two(), "bitmap granularity must be a power of two");
        let bits = size.div_ceil(granularity);
        Self { words: vec![0; bits.div_ceil(64) as usize], bits, granularity, size, set_count: 0, version: 0 }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn bit_count(&self) -> u64 {
        self.bits
    }

    fn bit_range(&self, offset: u64, len: u64) -> (u64, u64) {
        if len == 0 || offset >= self.size {
            return (0, 0);
        }
        let end = offset.saturating_add(len).min(self.size);
        (offset / self.granularity, end.div_ceil(self.granularity))
    }

    /// Marks every block touching `[offset, offset+len)`.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let (a, b) = self.bit_range(offset, len);
        for bit in a..b {
            self.set_bit(bit);
        }
    }

    /// Clears blocks fully covered by `[offset, offset+len)`.
    pub fn clear_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        let a = offset.div_ceil(self.granularity);
        // A partial block at the very end of the volume counts as covered.
        let b = if end == self.size { self.bits } else { end / self.granularity };
        for bit in a..b {
            self.clear_bit(bit);
        }
    }

    pub fn set_bit(&mut self, bit: u64) {
        let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if self.words[w] & m == 0 {
            self.words[w] |= m;
            self.set_count += 1;
            self.version += 1;
        }
    }

    pub fn clear_bit(&mut self, bit: u64) {
        let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if self.words[w] & m != 0 {
            self.words[w] &= !m;
            self.set_count -= 1;
        }
    }

    pub fn is_set(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1u64 << (bit % 64)) != 0
    }

    /// Whether any block touching the range is marked.
    pub fn any_in(&self, offset: u64, len: u64) -> bool {
        let (a, b) = self.bit_range(offset, len);
        (a..b).any(|bit| self.is_set(bit))
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Clears the range if no bit was set since `version` was read; returns whether it did.
    pub fn clear_range_if_unchanged(&mut self, offset: u64, len: u64, version: u64) -> bool {
        if self.version != version {
            return false;
        }
        self.clear_range(offset, len);
        true
    }

    /// The first run of set bits at or after byte `from`, at most `max_len` bytes long.
    pub fn next_dirty(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let mut bit = from / self.granularity;
        while bit < self.bits {
            let w = self.words[(bit / 64) as usize];
            if w == 0 && bit.is_multiple_of(64) {
                bit += 64;
                continue;
            }
            if w & (1u64 << (bit % 64)) == 0 {
                bit += 1;
                continue;
            }
            let start = bit;
            let max_bits = (max_len / self.granularity).max(1);
            while bit < self.bits && bit - start < max_bits && self.is_set(bit) {
                bit += 1;
            }
            let off = start * self.granularity;
            return Some((off, (bit * self.granularity).min(self.size) - off));
        }
        None
    }

    pub fn set_all(&mut self) {
        for bit in 0..self.bits {
            self.set_bit(bit);
        }
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.set_count = 0;
    }

    pub fn count(&self) -> u64 {
        self.set_count
    }

    /// Bytes of the volume covered by set bits (the last block may be partial).
    pub fn dirty_bytes(&self) -> u64 {
        if self.set_count == 0 {
            return 0;
        }
        let mut bytes = self.set_count * self.granularity;
        let tail = self.size % self.granularity;
        if tail != 0 && self.is_set(self.bits - 1) {
            bytes -= self.granularity - tail;
        }
        bytes
    }

    /// Merges another bitmap of the same geometry into this one.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        assert_eq!((self.bits, self.granularity), (other.bits, other.granularity));
        for bit in 0..self.bits {
            if other.is_set(bit) {
                self.set_bit(bit);
            }
        }
    }

    /// Raw words, for persistence.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Overwrites bits `[first_bit, first_bit + 64 * words.len())` from persisted words.
    pub fn load_words(&mut self, first_word: usize, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            for b in 0..64u64 {
                let bit = (first_word + i) as u64 * 64 + b;
                if bit >= self.bits {
                    return;
                }
                if w & (1u64 << b) != 0 {
                    self.set_bit(bit);
                } else {
                    self.clear_bit(bit);
                }
            }
        }
    }

    /// Rebuilds from persisted words; bits beyond the volume are ignored.
    pub fn from_words(size: u64, granularity: u64, words: &[u64]) -> Self {
        let mut b = Self::new(size, granularity);
        for bit in 0..b.bits {
            let w = (bit / 64) as usize;
            if w < words.len() && words[w] & (1u64 << (bit % 64)) != 0 {
                b.set_bit(bit);
            }
        }
        b
    }

    /// Byte ranges `(offset, len)` of maximal runs of set bits.
    pub fn dirty_runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut bit = 0;
        while bit < self.bits {
            if !self.is_set(bit) {
                bit += 1;
                continue;
            }
            let start = bit;
            while bit < self.bits && self.is_set(bit) {
                bit += 1;
            }
            let off = start * self.granularity;
            let end = (bit * self.granularity).min(self.size);
            out.push((off, end - off));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partial_tail_block() {
        let mut b = DirtyBitmap::new(10_000, 4096);
        assert_eq!(b.bit_count(), 3);
        b.set_range(9_000, 10);
        assert_eq!(b.dirty_bytes(), 10_000 - 8192);
        b.clear_range(8192, 10_000 - 8192);
        assert_eq!(b.count(), 0);
    }

    proptest! {
        #[test]
        fn set_covers_and_count_matches(ops in proptest::collection::vec((0u64..1<<20, 1u64..70_000, any::<bool>()), 1..40)) {
            let size = 1u64 << 20;
            let mut b = DirtyBitmap::new(size, 4096);
            let mut model = vec![false; (size / 4096) as usize];
            for (off, len, set) in ops {
                if set {
                    b.set_range(off, len);
                    let end = (off + len).min(size);
                    for blk in off / 4096..end.div_ceil(4096) { model[blk as usize] = true; }
                    prop_assert!(b.any_in(off, len));
                } else {
                    b.clear_range(off, len);
                    let end = (off + len).min(size);
                    let a = off.div_ceil(4096);
                    let z = if end == size { size / 4096 } else { end / 4096 };
                    for blk in a..z { model[blk as usize] = false; }
                }
                prop_assert_eq!(b.count(), model.iter().filter(|x| **x).count() as u64);
            }
            let runs: u64 = b.dirty_runs().iter().map(|r| r.1).sum();
            prop_assert_eq!(runs, b.dirty_bytes());
            let mut copy = DirtyBitmap::from_words(size, 4096, b.words());
            copy.version = b.version;
            prop_assert_eq!(&copy, &b);
            let mut walked = 0;
            let mut at = 0;
            while let Some((off, len)) = b.next_dirty(at, 1 << 16) {
                prop_assert!(off >= at && len > 0 && len <= 1 << 16);
                prop_assert!(b.any_in(off, len));
                walked += len;
                at = off + len;
            }
            prop_assert_eq!(walked, b.dirty_bytes());
        }
    }
}
