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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Long enough that a job the pool failed to start is noticed, never needed to pass.
    const PATIENCE: Duration = Duration::from_secs(30);

    #[test]
    fn every_job_runs_exactly_once() {
        let pool = IoPool::with_stack_size(4, "test-pool", 64 << 10);
        let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..5000).map(|_| AtomicUsize::new(0)).collect());
        let (tx, rx) = mpsc::channel();
        for i in 0..runs.len() {
            let (runs, tx) = (runs.clone(), tx.clone());
            pool.submit(Vec::new(), move || {
                runs[i].fetch_add(1, Ordering::SeqCst);
                tx.send(()).unwrap();
            });
        }
        for _ in 0..runs.len() {
            rx.recv_timeout(PATIENCE).expect("a submitted job never ran");
        }
        assert!(runs.iter().all(|r| r.load(Ordering::SeqCst) == 1));
    }

    /// As many jobs as threads run at the same time, and one more waits for a thread.
    #[test]
    fn jobs_run_side_by_side_up_to_the_thread_count() {
        const THREADS: usize = 3;
        let pool = IoPool::with_stack_size(THREADS, "test-pool", 64 << 10);
        let gate = Latch::new();
        let (started_tx, started) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        for i in 0..THREADS + 1 {
            let (gate, started_tx, done_tx) = (gate.clone(), started_tx.clone(), done_tx.clone());
            pool.submit(Vec::new(), move || {
                started_tx.send(i).unwrap();
                if i < THREADS {
                    gate.wait_blocking();
                }
                done_tx.send(i).unwrap();
            });
        }
        let mut first: Vec<usize> = (0..THREADS).map(|_| started.recv_timeout(PATIENCE).unwrap()).collect();
        first.sort();
        assert_eq!(first, (0..THREADS).collect::<Vec<_>>(), "the first jobs must all be running");
        assert!(
            started.recv_timeout(Duration::from_millis(100)).is_err(),
            "a fourth job ran with no free thread"
        );
        gate.open();
        let mut finished: Vec<usize> = (0..=THREADS).map(|_| done.recv_timeout(PATIENCE).unwrap()).collect();
        finished.sort();
        assert_eq!(finished, (0..=THREADS).collect::<Vec<_>>());
    }

    #[test]
    fn a_job_waits_for_its_dependencies() {
        let pool = IoPool::with_stack_size(2, "test-pool", 64 << 10);
        let dep = Latch::new();
        let (tx, rx) = mpsc::channel();
        pool.submit(vec![dep.clone()], move || tx.send(()).unwrap());
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "ran before its dependency");
        dep.open();
        rx.recv_timeout(PATIENCE).expect("never ran after its dependency opened");
    }

    #[test]
    fn jobs_queued_when_the_pool_is_dropped_still_run() {
        let pool = IoPool::with_stack_size(1, "test-pool", 64 << 10);
        let gate = Latch::new();
        let (tx, rx) = mpsc::channel();
        for i in 0..3 {
            let (gate, tx) = (gate.clone(), tx.clone());
            pool.submit(Vec::new(), move || {
                gate.wait_blocking();
                tx.send(i).unwrap();
            });
        }
        drop(pool);
        gate.open();
        let got: Vec<i32> = (0..3).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
        assert_eq!(got, vec![0, 1, 2]);
    }
}
