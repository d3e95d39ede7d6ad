//! Where the change stream a copy receives stands relative to its barriers, so that work
//! that must see the copy at one instant — a snapshot — runs exactly at a barrier: after
//! a flush has made every earlier request durable, before any later one is applied.
//!
//! Every request that changes the copy (replicated or resynced write, discard) passes the
//! gate as it is admitted ([`BarrierGate::change_admitted`]), which notes that the copy has
//! moved past its last barrier. The replication applier reports each barrier once the flush
//! is done and before it looks at the next frame ([`BarrierGate::barrier_reached`]). Work
//! queued with [`BarrierGate::at_barrier`] runs under the gate's lock, so no change can be
//! admitted while it runs:
//! - at once, if nothing was admitted since the last barrier, or no replication stream is
//!   running (then the copy is as the last session left it, which `at_barrier: false`
//!   says);
//! - otherwise at the next barrier.

use std::sync::Mutex;

/// The instant queued work runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierPoint {
    /// The sequence number of the last barrier applied (0 before the first).
    pub seq: u64,
    /// Exactly at a barrier (every request up to `seq`, none after). False only when no
    /// stream runs and the last one ended between barriers.
    pub at_barrier: bool,
    /// A resync into this copy is under way: the copy is not consistent.
    pub resyncing: bool,
}

type Work = Box<dyn FnOnce(BarrierPoint) + Send>;

/// Identifies queued work, to take it back ([`BarrierGate::cancel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierTicket(u64);

#[derive(Default)]
struct GateState {
    streams: usize,
    since_barrier: bool,
    last_seq: u64,
    next_ticket: u64,
    waiting: Vec<(u64, Work)>,
}

pub(crate) struct StreamGuard<'a>(&'a BarrierGate);

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.stream_ended();
    }
}

#[derive(Default)]
pub struct BarrierGate {
    state: Mutex<GateState>,
}

impl BarrierGate {
    pub(crate) fn change_admitted(&self) {
        self.state.lock().unwrap().since_barrier = true;
    }

    /// A replication stream runs until the guard is dropped (after its last request
    /// finished, or when its task is dropped).
    pub(crate) fn stream(&self) -> StreamGuard<'_> {
        self.state.lock().unwrap().streams += 1;
        StreamGuard(self)
    }

    fn stream_ended(&self) {
        let mut s = self.state.lock().unwrap();
        s.streams = s.streams.saturating_sub(1);
        if s.streams == 0 {
            // Nothing will reach a barrier now: queued work sees the copy as it is.
            let point = BarrierPoint { seq: s.last_seq, at_barrier: !s.since_barrier, resyncing: false };
            for (_, w) in std::mem::take(&mut s.waiting) {
                w(point);
            }
        }
    }

    /// The barrier `seq` is applied and durable; nothing after it is admitted yet.
    pub(crate) fn barrier_reached(&self, seq: u64, resyncing: bool) {
        let mut s = self.state.lock().unwrap();
        s.since_barrier = false;
        s.last_seq = seq;
        let point = BarrierPoint { seq, at_barrier: true, resyncing };
        for (_, w) in std::mem::take(&mut s.waiting) {
            w(point);
        }
    }

    /// Runs `work` at the next barrier, or at once (see the module docs). Returns `None`
    /// if it ran at once, else a ticket to [`cancel`](Self::cancel) it with.
    pub fn at_barrier(
        &self,
        resyncing: bool,
        work: impl FnOnce(BarrierPoint) + Send + 'static,
    ) -> Option<BarrierTicket> {
        let mut s = self.state.lock().unwrap();
        if s.streams == 0 || !s.since_barrier {
            work(BarrierPoint { seq: s.last_seq, at_barrier: !s.since_barrier, resyncing });
            return None;
        }
        s.next_ticket += 1;
        let t = s.next_ticket;
        s.waiting.push((t, Box::new(work)));
        Some(BarrierTicket(t))
    }

    /// Takes back queued work; false if it has run (or is running) already.
    pub fn cancel(&self, ticket: BarrierTicket) -> bool {
        let mut s = self.state.lock().unwrap();
        let before = s.waiting.len();
        s.waiting.retain(|(t, _)| *t != ticket.0);
        s.waiting.len() < before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    type Seen = Arc<Mutex<Vec<BarrierPoint>>>;

    fn recorder() -> (Seen, impl Fn() -> Work) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, move || {
            let s = s.clone();
            Box::new(move |p| s.lock().unwrap().push(p))
        })
    }

    #[test]
    fn work_waits_for_the_next_barrier_once_the_copy_moved_past_one() {
        let g = BarrierGate::default();
        let (seen, work) = recorder();
        let _s = g.stream();
        assert!(g.at_barrier(false, work()).is_none(), "nothing admitted yet: at once");
        g.change_admitted();
        let t = g.at_barrier(false, work());
        assert!(t.is_some());
        assert_eq!(seen.lock().unwrap().len(), 1);
        g.barrier_reached(17, false);
        assert_eq!(seen.lock().unwrap()[1], BarrierPoint { seq: 17, at_barrier: true, resyncing: false });
        assert!(!g.cancel(t.unwrap()), "ran already");
    }

    #[test]
    fn a_cancelled_request_never_runs_and_a_stream_end_releases_the_rest() {
        let g = BarrierGate::default();
        let (seen, work) = recorder();
        let s = g.stream();
        g.barrier_reached(5, false);
        g.change_admitted();
        let t = g.at_barrier(false, work()).unwrap();
        let _u = g.at_barrier(false, work()).unwrap();
        assert!(g.cancel(t));
        drop(s);
        let seen = seen.lock().unwrap();
        assert_eq!(*seen, vec![BarrierPoint { seq: 5, at_barrier: false, resyncing: false }]);
    }
}
