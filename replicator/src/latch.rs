//! A one-shot event that async tasks and blocking threads can both wait for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Latch {
    open: AtomicBool,
    notify: Notify,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Latch {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.notify.notify_waiters();
        // Taking the lock orders this notify after any blocking waiter's flag check.
        let _g = self.lock.lock().unwrap();
        self.cv.notify_all();
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    pub async fn wait(&self) {
        loop {
            // Register interest before checking the flag so an open() in between is seen.
            let notified = self.notify.notified();
            if self.is_open() {
                return;
            }
            notified.await;
        }
    }

    /// Blocks the calling (non-async) thread until the latch opens.
    pub fn wait_blocking(&self) {
        if self.is_open() {
            return;
        }
        let mut g = self.lock.lock().unwrap();
        while !self.is_open() {
            g = self.cv.wait(g).unwrap();
        }
    }
}
