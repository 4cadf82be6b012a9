//! A few threads that run one kind of job and give the results back in the order
//! the jobs went in: how the codecs compress and decompress batches on several
//! cores while the frames, and the running digest over them, stay in stream order.
//!
//! Plain threads rather than a runtime's blocking pool: the codecs are sans-IO and
//! used without tokio as well, and a job is a few hundred microseconds of CPU.
//! At most [`Workers::capacity`] jobs are in flight: the caller takes the oldest
//! result before it submits more, so the memory held stays bounded.
//!
//! Jobs go round the threads, each with a queue of its own, and both sides look
//! for their next message for a moment before they sleep ([`SPIN`]). A job every
//! few hundred microseconds, handed over through a sleeping thread, ran no faster
//! on two threads than on one here: each wake-up put the woken thread on the
//! waker's vCPU (1.2 vCPUs busy in `perf stat`, 1750 context switches for a
//! 120 MB stream, and 40 % more wall time than one thread).

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A job and where its result goes.
type Queued<J, R> = (J, SyncSender<R>);

/// How long a side polls for its next message before it sleeps: a few jobs' time,
/// so a steady stream of jobs never sleeps, and an idle pool costs this much CPU
/// once per pause.
const SPIN: Duration = Duration::from_micros(500);

/// The next message on `from`, polled for [`SPIN`] before sleeping; `None` once the
/// sender is gone.
fn receive<T>(from: &Receiver<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < SPIN {
        match from.try_recv() {
            Ok(message) => return Some(message),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    from.recv().ok()
}

/// Threads running `run(&mut state, job)`, each with a state of its own.
pub(crate) struct Workers<J, R> {
    /// Each thread's queue.
    queues: Vec<Sender<Queued<J, R>>>,
    /// The queue of the next job.
    next_queue: usize,
    /// One receiver per job in flight, oldest first.
    in_flight: VecDeque<Receiver<R>>,
    threads: Vec<JoinHandle<()>>,
}

impl<J, R> std::fmt::Debug for Workers<J, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.threads.len())
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl<J: Send + 'static, R: Send + 'static> Workers<J, R> {
    /// `threads` threads (at least one), each with the state `make_state` gives.
    pub(crate) fn new<S>(
        threads: usize,
        make_state: impl Fn() -> S,
        run: fn(&mut S, J) -> R,
    ) -> Self
    where
        S: Send + 'static,
    {
        let (queues, threads) = (0..threads.max(1))
            .map(|i| {
                let (queue, jobs) = mpsc::channel::<Queued<J, R>>();
                let mut state = make_state();
                let thread = std::thread::Builder::new()
                    .name(format!("migstream-batch-{i}"))
                    .spawn(move || {
                        while let Some((job, done)) = receive(&jobs) {
                            // the caller may have gone: nothing waits for the result then
                            let _ = done.send(run(&mut state, job));
                        }
                    })
                    .expect("the OS starts a thread");
                (queue, thread)
            })
            .unzip();
        Self {
            queues,
            next_queue: 0,
            in_flight: VecDeque::new(),
            threads,
        }
    }

    /// How many jobs may be in flight: two per thread, so that a thread finds its
    /// next job waiting while the caller takes the last result.
    pub(crate) fn capacity(&self) -> usize {
        2 * self.threads.len()
    }

    /// Whether [`capacity`](Self::capacity) jobs are in flight: take a result first.
    pub(crate) fn is_full(&self) -> bool {
        self.in_flight.len() >= self.capacity()
    }

    /// Queues `job`. The caller keeps to [`capacity`](Self::capacity).
    pub(crate) fn submit(&mut self, job: J) {
        let (done, result) = mpsc::sync_channel(1);
        self.queues[self.next_queue]
            .send((job, done))
            .expect("the workers outlive their queues");
        self.next_queue = (self.next_queue + 1) % self.queues.len();
        self.in_flight.push_back(result);
    }

    /// The oldest job's result if it is ready, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<R> {
        let result = self.in_flight.front()?.try_recv().ok()?;
        self.in_flight.pop_front();
        Some(result)
    }

    /// The oldest job's result, waiting for it; `None` with nothing in flight.
    pub(crate) fn next(&mut self) -> Option<R> {
        let result = self.in_flight.pop_front()?;
        Some(receive(&result).expect("a worker answers every job"))
    }
}

impl<J, R> Drop for Workers<J, R> {
    fn drop(&mut self) {
        // closing the queues ends each thread after its current job
        self.queues.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow_square(calls: &mut u64, n: u64) -> (u64, u64) {
        *calls += 1;
        // later jobs finish first: the order must come from the queue, not the threads
        std::thread::sleep(std::time::Duration::from_micros(200 * (8 - n % 8)));
        (n * n, *calls)
    }

    #[test]
    fn results_come_back_in_submission_order() {
        let mut workers = Workers::new(3, || 0u64, slow_square);
        let mut results = Vec::new();
        for n in 0..40 {
            if workers.is_full() {
                results.push(workers.next().unwrap().0);
            }
            workers.submit(n);
        }
        while let Some((square, _)) = workers.next() {
            results.push(square);
        }
        assert_eq!(results, (0..40).map(|n| n * n).collect::<Vec<_>>());
        assert!(workers.try_next().is_none());
    }

    #[test]
    fn try_next_never_skips_the_oldest_job() {
        let mut workers = Workers::new(2, || 0u64, slow_square);
        workers.submit(0); // the slowest
        workers.submit(7); // the fastest
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut taken = Vec::new();
        while taken.len() < 2 && std::time::Instant::now() < deadline {
            match workers.try_next() {
                Some((square, _)) => taken.push(square),
                None => std::thread::yield_now(),
            }
        }
        assert_eq!(taken, [0, 49]);
    }

    #[test]
    fn a_thread_keeps_its_state_from_job_to_job() {
        let mut workers = Workers::new(1, || 0u64, slow_square);
        (0..2).for_each(|n| workers.submit(n));
        let calls: Vec<u64> = std::iter::from_fn(|| workers.next())
            .map(|(_, c)| c)
            .collect();
        assert_eq!(calls, [1, 2]);
    }
}
