//! Completion of one application request on the primary: the local I/O and every peer ack
//! the mode requires are parts; whichever part finishes last completes the request, on the
//! thread it runs on. No task is spawned per request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::activity_log::AlGuard;
use crate::error::VolumeError;

/// Called once with the request's sequence number or its local error.
pub type Done = Box<dyn FnOnce(Result<u64, VolumeError>) + Send>;

pub struct Request {
    seq: u64,
    remaining: AtomicUsize,
    error: Mutex<Option<VolumeError>>,
    done: Mutex<Option<Done>>,
    /// Keeps the request's activity-log extents hot until it completes; every peer session
    /// it was sent to holds a clone until that peer has it on disk.
    al: Mutex<Option<Arc<AlGuard>>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("seq", &self.seq).field("remaining", &self.remaining).finish()
    }
}

impl Request {
    /// A request with `parts` outstanding parts.
    pub fn new(seq: u64, parts: usize, done: Done, al: Option<AlGuard>) -> Self {
        Self {
            seq,
            remaining: AtomicUsize::new(parts),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
            al: Mutex::new(al.map(Arc::new)),
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn al_guard(&self) -> Option<Arc<AlGuard>> {
        self.al.lock().unwrap().clone()
    }

    /// Adds a part (a peer the request must now wait for).
    pub fn add_part(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }

    /// Finishes one part; the last one completes the request.
    pub fn part_done(&self, r: Result<(), VolumeError>) {
        if let Err(e) = r {
            self.error.lock().unwrap().get_or_insert(e);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            drop(self.al.lock().unwrap().take());
            let done = self.done.lock().unwrap().take();
            let err = self.error.lock().unwrap().take();
            crate::stage_trace::mark(crate::stage_trace::Stage::Completed, self.seq);
            if let Some(done) = done {
                done(match err {
                    Some(e) => Err(e),
                    None => Ok(self.seq),
                });
            }
        }
    }
}
