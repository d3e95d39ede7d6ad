//! Threads that run a node's blocking store operations after their ordering dependencies:
//! a replicated write goes from the stream to a thread that waits for any earlier
//! overlapping operation, writes, and acknowledges — with no async hand-off in between.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::latch::Latch;

type Work = Box<dyn FnOnce() + Send>;

struct Job {
    wait_for: Vec<Arc<Latch>>,
    work: Work,
}

pub struct IoPool {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl IoPool {
    /// `threads` threads named `name`-N with stacks of `stack_size` bytes instead of the
    /// default 2 MiB: the pools' work is a store call and a completion, and measured here
    /// each 2 MiB stack cost 2 MiB resident (32 threads, +70 MiB).
    pub fn with_stack_size(threads: usize, name: &str, stack_size: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(stack_size)
                .spawn(move || loop {
                    let job = match rx.lock().unwrap().recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    for dep in &job.wait_for {
                        dep.wait_blocking();
                    }
                    (job.work)();
                })
                .expect("cannot start an I/O thread");
        }
        Self { tx: Mutex::new(tx) }
    }

    /// Runs `work` on a pool thread once every latch in `wait_for` is open.
    pub fn submit(&self, wait_for: Vec<Arc<Latch>>, work: impl FnOnce() + Send + 'static) {
        let _ = self.tx.lock().unwrap().send(Job { wait_for, work: Box::new(work) });
    }
}
