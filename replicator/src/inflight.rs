//! Requests admitted but not yet finished on this node, used to order overlapping writes by
//! sequence number and to let a flush wait for everything admitted before it.
//!
//! The set is small (bounded by the requests in flight, tens to a few hundred), so a linear
//! scan beats an interval tree here and is obviously correct.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::latch::Latch;

#[derive(Debug)]
struct Entry {
    start: u64,
    end: u64,
    done: Arc<Latch>,
}

#[derive(Debug, Default)]
pub struct InflightRanges {
    by_seq: BTreeMap<u64, Entry>,
}

/// What a newly admitted request must wait for before it touches the disk: the earlier
/// requests overlapping it.
#[derive(Debug)]
pub struct Admitted {
    pub wait_for: Vec<Arc<Latch>>,
}

impl InflightRanges {
    /// Registers request `seq` on `[start, end)`. Sequence numbers must increase.
    pub fn admit(&mut self, seq: u64, start: u64, end: u64) -> Admitted {
        let wait_for =
            self.by_seq.values().filter(|e| e.start < end && start < e.end).map(|e| e.done.clone()).collect();
        self.by_seq.insert(seq, Entry { start, end, done: Latch::new() });
        Admitted { wait_for }
    }

    /// Everything admitted so far (a flush waits for all of it).
    pub fn all(&self) -> Vec<Arc<Latch>> {
        self.by_seq.values().map(|e| e.done.clone()).collect()
    }

    pub fn finish(&mut self, seq: u64) {
        if let Some(e) = self.by_seq.remove(&seq) {
            e.done.open();
        }
    }

    pub fn len(&self) -> usize {
        self.by_seq.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_only() {
        let mut r = InflightRanges::default();
        let a = r.admit(1, 0, 4096);
        assert!(a.wait_for.is_empty());
        let first = r.all().pop().unwrap();
        let b = r.admit(2, 4096, 8192);
        assert!(b.wait_for.is_empty());
        let c = r.admit(3, 4000, 4100);
        assert_eq!(c.wait_for.len(), 2);
        r.finish(1);
        assert!(first.is_open());
        let d = r.admit(4, 0, 10);
        assert!(d.wait_for.is_empty());
        assert_eq!(r.all().len(), 3);
    }
}
