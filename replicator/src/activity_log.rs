//! The activity log: a small, durable set of "hot" extents of the volume (4 MiB each by
//! default) that may hold writes a peer has not acknowledged.
//!
//! Before a write to an extent that is not hot is issued — locally or to any peer — the
//! extent is added and the new set is written durably. Writes to hot extents cost nothing
//! extra, so a working set that fits the log (default 1000 extents, ~4 GiB) needs no
//! metadata write at all after warm-up. An extent leaves the set only when no request on it
//! is in flight, and only after the dirty-bitmap bits of that extent are on disk.
//!
//! Invariant, for a primary that crashes: every block that may differ between it and a
//! peer is either marked in the persisted bitmap or lies in a persisted hot extent. When it
//! starts again, [`replay_activity_log`] marks the hot extents in every peer's bitmap.

mod replay;

pub use replay::replay_activity_log;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex};

/// Persistence of the activity log and of bitmap bits, implemented by the metadata file.
pub trait ActivityLogStore: Send + Sync {
    /// Durably replaces the recorded set of hot extents.
    fn write_hot_set(&self, extents: &[u32]) -> io::Result<()>;
    /// Durably records every peer's bitmap bits for `extent`, before it leaves the set.
    fn persist_extent(&self, extent: u32) -> io::Result<()>;
}

#[derive(Debug, Default)]
struct State {
    /// Hot extent -> (requests in flight on it, last use for LRU).
    hot: HashMap<u32, (usize, u64)>,
    clock: u64,
    /// A transaction is being written; others wait.
    updating: bool,
    /// Extents the transaction being written removes: they may not be used until it is done.
    leaving: Vec<u32>,
    /// `clock` at the previous [`ActivityLog::cool`].
    cooled_at: u64,
    transactions: u64,
}

pub struct ActivityLog {
    extent_size: u64,
    capacity: usize,
    state: Mutex<State>,
    changed: Condvar,
    store: Arc<dyn ActivityLogStore>,
}

/// Counters for status and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivityLogStats {
    pub hot: usize,
    pub capacity: usize,
    /// Durable activity-log writes so far.
    pub transactions: u64,
}

/// Holds a request's extents hot until it completes.
pub struct AlGuard {
    log: Arc<ActivityLog>,
    extents: Vec<u32>,
}

impl Drop for AlGuard {
    fn drop(&mut self) {
        let mut st = self.log.state.lock().unwrap();
        for e in &self.extents {
            if let Some((refs, _)) = st.hot.get_mut(e) {
                *refs -= 1;
            }
        }
        drop(st);
        self.log.changed.notify_all();
    }
}

impl ActivityLog {
    /// `recovered`: the set found on disk at start (kept hot until written again).
    pub fn new(
        extent_size: u64,
        capacity: usize,
        store: Arc<dyn ActivityLogStore>,
        recovered: &[u32],
    ) -> Arc<Self> {
        assert!(extent_size.is_power_of_two() && capacity > 0);
        let mut st = State::default();
        for e in recovered {
            st.hot.insert(*e, (0, 0));
        }
        Arc::new(Self { extent_size, capacity, state: Mutex::new(st), changed: Condvar::new(), store })
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    pub fn stats(&self) -> ActivityLogStats {
        let st = self.state.lock().unwrap();
        ActivityLogStats { hot: st.hot.len(), capacity: self.capacity, transactions: st.transactions }
    }

    /// The extents `[offset, offset+len)` touches.
    pub fn extents_of(&self, offset: u64, len: u64) -> std::ops::Range<u32> {
        let first = offset / self.extent_size;
        let last = (offset + len.max(1) - 1) / self.extent_size;
        first as u32..last as u32 + 1
    }

    /// Makes the extents of a request hot (writing the log if needed) and holds them hot
    /// until the returned guard is dropped. Blocks while a log write is in progress.
    pub fn begin(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<AlGuard> {
        let extents: Vec<u32> = self.extents_of(offset, len).collect();
        let mut st = self.state.lock().unwrap();
        loop {
            if extents.iter().all(|e| st.hot.contains_key(e) && !st.leaving.contains(e)) {
                st.clock += 1;
                let now = st.clock;
                for e in &extents {
                    let entry = st.hot.get_mut(e).expect("checked hot");
                    entry.0 += 1;
                    entry.1 = now;
                }
                return Ok(AlGuard { log: self.clone(), extents });
            }
            if st.updating {
                st = self.changed.wait(st).unwrap();
                continue;
            }
            // Make room: the least recently used extents with nothing in flight leave.
            let missing: Vec<u32> = extents.iter().copied().filter(|e| !st.hot.contains_key(e)).collect();
            let need = (st.hot.len() + missing.len()).saturating_sub(self.capacity.max(extents.len()));
            let mut idle: Vec<(u64, u32)> = st
                .hot
                .iter()
                .filter(|(e, (refs, _))| *refs == 0 && !extents.contains(e))
                .map(|(e, (_, t))| (*t, *e))
                .collect();
            if idle.len() < need {
                // Everything hot is busy: wait for requests to finish.
                st = self.changed.wait(st).unwrap();
                continue;
            }
            idle.sort_unstable();
            let evict: Vec<u32> = idle.into_iter().take(need).map(|(_, e)| e).collect();
            st = self.transaction(st, evict, &missing)?;
        }
    }

    /// Writes a new hot set without `evict` and with `add`, persisting the bitmap bits of
    /// the extents that leave first. Called with `updating` false and the lock held.
    fn transaction<'a>(
        &'a self,
        mut st: std::sync::MutexGuard<'a, State>,
        evict: Vec<u32>,
        add: &[u32],
    ) -> io::Result<std::sync::MutexGuard<'a, State>> {
        let mut next: Vec<u32> = st.hot.keys().copied().filter(|e| !evict.contains(e)).collect();
        next.extend(add);
        next.sort_unstable();
        st.updating = true;
        st.leaving = evict;
        let evict = st.leaving.clone();
        drop(st);
        let r = (|| {
            for e in &evict {
                self.store.persist_extent(*e)?;
            }
            self.store.write_hot_set(&next)
        })();
        let mut st = self.state.lock().unwrap();
        st.updating = false;
        st.leaving.clear();
        if r.is_ok() {
            for e in &evict {
                st.hot.remove(e);
            }
            for e in add {
                st.hot.insert(*e, (0, 0));
            }
            st.transactions += 1;
        }
        self.changed.notify_all();
        r.map(|_| st)
    }

    /// Lets the extents that stayed idle since the previous call leave the log (one
    /// transaction, none if nothing is idle). Run periodically, it keeps the log to the
    /// working set of the last interval instead of the last `capacity` extents ever
    /// written, so a primary crash after a burst (a mkfs, a backup restore) resyncs what
    /// was recently written, not everything the burst touched. Returns how many left.
    pub fn cool(&self) -> io::Result<usize> {
        let mut st = self.state.lock().unwrap();
        while st.updating {
            st = self.changed.wait(st).unwrap();
        }
        let clock = st.clock;
        let cutoff = std::mem::replace(&mut st.cooled_at, clock);
        let evict: Vec<u32> = st
            .hot
            .iter()
            .filter(|(_, (refs, last))| *refs == 0 && *last <= cutoff)
            .map(|(e, _)| *e)
            .collect();
        let n = evict.len();
        if n > 0 {
            drop(self.transaction(st, evict, &[])?);
        }
        Ok(n)
    }

    /// The current hot set (what a crash would leave on disk).
    pub fn hot_extents(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.state.lock().unwrap().hot.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        sets: Mutex<Vec<Vec<u32>>>,
        persisted: Mutex<Vec<u32>>,
    }

    impl ActivityLogStore for Recorder {
        fn write_hot_set(&self, extents: &[u32]) -> io::Result<()> {
            self.sets.lock().unwrap().push(extents.to_vec());
            Ok(())
        }
        fn persist_extent(&self, extent: u32) -> io::Result<()> {
            self.persisted.lock().unwrap().push(extent);
            Ok(())
        }
    }

    #[test]
    fn hot_extents_cost_nothing_and_eviction_persists_first() {
        let rec = Arc::new(Recorder::default());
        let al = ActivityLog::new(1 << 22, 2, rec.clone(), &[]);
        let g0 = al.begin(0, 4096).unwrap();
        drop(al.begin(100, 4096).unwrap()); // same extent: no transaction
        assert_eq!(al.stats().transactions, 1);
        let g1 = al.begin(1 << 22, 4096).unwrap();
        assert_eq!(rec.sets.lock().unwrap().last().unwrap(), &vec![0, 1]);
        drop(g0);
        // Extent 2 evicts the idle LRU extent 0 (1 is busy), persisting its bits first.
        let _g2 = al.begin(2 << 22, 4096).unwrap();
        assert_eq!(rec.persisted.lock().unwrap().as_slice(), &[0]);
        assert_eq!(rec.sets.lock().unwrap().last().unwrap(), &vec![1, 2]);
        drop(g1);
        assert_eq!(al.hot_extents(), vec![1, 2]);
        // A request spanning two extents holds both.
        let g = al.begin((2 << 22) - 10, 20).unwrap();
        assert_eq!(g.extents, vec![1, 2]);
    }

    #[test]
    fn cooling_drops_extents_idle_for_a_whole_interval() {
        let rec = Arc::new(Recorder::default());
        let al = ActivityLog::new(1 << 22, 100, rec.clone(), &[]);
        for e in 0..10u64 {
            drop(al.begin(e << 22, 4096).unwrap());
        }
        let busy = al.begin(3 << 22, 4096).unwrap();
        // Everything was used in the first interval; in the second only 3 (busy) was.
        assert_eq!(al.cool().unwrap(), 0);
        assert_eq!(al.cool().unwrap(), 9);
        assert_eq!(al.hot_extents(), vec![3]);
        assert_eq!(rec.persisted.lock().unwrap().len(), 9, "bits persisted before leaving");
        drop(al.begin(5 << 22, 4096).unwrap());
        // 5 was used in this interval; 3 is busy.
        assert_eq!(al.cool().unwrap(), 0);
        drop(busy);
        assert_eq!(al.cool().unwrap(), 2);
        assert!(al.hot_extents().is_empty());
        assert_eq!(rec.sets.lock().unwrap().last().unwrap(), &Vec::<u32>::new());
    }

    #[test]
    fn an_extent_being_evicted_is_not_used_until_the_transaction_is_durable() {
        // A store whose hot-set writes are slow: a request on an extent that is leaving
        // must wait and then re-add it, never write to it while the durable set lacks it.
        struct Slow(Mutex<Vec<Vec<u32>>>);
        impl ActivityLogStore for Slow {
            fn write_hot_set(&self, extents: &[u32]) -> io::Result<()> {
                std::thread::sleep(std::time::Duration::from_millis(50));
                self.0.lock().unwrap().push(extents.to_vec());
                Ok(())
            }
            fn persist_extent(&self, _: u32) -> io::Result<()> {
                Ok(())
            }
        }
        let store = Arc::new(Slow(Mutex::new(Vec::new())));
        let al = ActivityLog::new(1 << 22, 100, store.clone(), &[]);
        drop(al.begin(0, 4096).unwrap());
        let al2 = al.clone();
        let cooler = std::thread::spawn(move || {
            al2.cool().unwrap();
            al2.cool().unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _g = al.begin(0, 4096).unwrap();
        cooler.join().unwrap();
        // Whatever order the threads ran in, the last durable set holds the busy extent.
        assert_eq!(store.0.lock().unwrap().last().unwrap(), &vec![0]);
        assert_eq!(al.hot_extents(), vec![0]);
    }

    #[test]
    fn busy_extents_are_never_evicted() {
        let rec = Arc::new(Recorder::default());
        let al = ActivityLog::new(1 << 22, 1, rec.clone(), &[]);
        let g0 = al.begin(0, 4096).unwrap();
        let al2 = al.clone();
        let t = std::thread::spawn(move || {
            let _g = al2.begin(1 << 22, 4096).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished(), "evicted an extent with a request in flight");
        assert_eq!(al.hot_extents(), vec![0]);
        drop(g0);
        t.join().unwrap();
        assert_eq!(rec.persisted.lock().unwrap().as_slice(), &[0]);
    }
}
