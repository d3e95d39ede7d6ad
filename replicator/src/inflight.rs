//! Requests admitted but not yet finished on this node, used to order overlapping
//! operations by admission order and to let a flush wait for everything admitted before it.
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
    next_id: u64,
    by_id: BTreeMap<u64, Entry>,
}

/// A newly admitted operation: its id (for [`InflightRanges::finish`]) and the earlier
/// overlapping operations it must wait for before it touches the disk.
#[derive(Debug)]
pub struct Admitted {
    pub id: u64,
    pub wait_for: Vec<Arc<Latch>>,
}

impl InflightRanges {
    /// Registers an operation on `[start, end)`, ordered after everything admitted before.
    pub fn admit(&mut self, start: u64, end: u64) -> Admitted {
        let wait_for =
            self.by_id.values().filter(|e| e.start < end && start < e.end).map(|e| e.done.clone()).collect();
        let id = self.next_id;
        self.next_id += 1;
        self.by_id.insert(id, Entry { start, end, done: Latch::new() });
        Admitted { id, wait_for }
    }

    /// Everything admitted so far (a flush waits for all of it).
    pub fn all(&self) -> Vec<Arc<Latch>> {
        self.by_id.values().map(|e| e.done.clone()).collect()
    }

    pub fn finish(&mut self, id: u64) {
        if let Some(e) = self.by_id.remove(&id) {
            e.done.open();
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_only() {
        let mut r = InflightRanges::default();
        let a = r.admit(0, 4096);
        assert!(a.wait_for.is_empty());
        let first = r.all().pop().unwrap();
        let b = r.admit(4096, 8192);
        assert!(b.wait_for.is_empty());
        let c = r.admit(4000, 4100);
        assert_eq!(c.wait_for.len(), 2);
        r.finish(a.id);
        assert!(first.is_open());
        let d = r.admit(0, 10);
        assert!(d.wait_for.is_empty());
        assert_eq!(r.all().len(), 3);
    }
}
