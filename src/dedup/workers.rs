//! A few threads that run one kind of job and give the results back in the order
//! the jobs went in: how the codecs compress and decompress batches on several
//! cores while the frames, and the running digest over them, stay in stream order.
//!
//! Plain threads rather than a runtime's blocking pool: the codecs are sans-IO and
//! used without tokio as well, and a job is a few hundred microseconds of CPU.
//! At most [`Workers::capacity`] jobs are in flight: the caller takes the oldest
//! result before it submits more, so the memory held stays bounded.
//!
//! The caller's thread counts as one of them: `n` threads start `n - 1`, and a job
//! submitted while they all have their next job waiting runs on the caller's
//! thread there and then. On two vCPUs, two threads besides the caller's (which
//! parses and resolves) left three busy threads time-sharing two CPUs, and the
//! caller, the slowest stage, waited its turn; now it works whenever it is not
//! ahead of the others, and a stream that gives the caller little else to do is
//! compressed on every thread.
//!
//! Jobs go round the threads, each with a queue of its own, and both sides look
//! for their next message for a moment before they sleep ([`SPIN`]). A job every
//! few hundred microseconds, handed over through a sleeping thread, ran no faster
//! on two threads than on one here: each wake-up put the woken thread on the
//! waker's vCPU (1.2 vCPUs busy in `perf stat`, 1750 context switches for a
//! 120 MB stream, and 40 % more wall time than one thread). With the caller
//! running jobs itself when the threads fall behind, a short poll is enough: 50 µs
//! took the same wall time as 500 µs on the fill capture and 13 % less CPU (which
//! a proxy shares with the guests and QEMU); not polling at all, 4 % more wall time.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A job and where its result goes.
type Queued<J, R> = (J, SyncSender<R>);

/// How long a side polls for its next message before it sleeps: jobs handed over
/// back to back never sleep, and a pool between jobs costs this much CPU a pause.
const SPIN: Duration = Duration::from_micros(50);

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

/// A job's result, in the order of submission: coming from a thread, or already
/// there (run on the caller's thread).
enum Slot<R> {
    Running(Receiver<R>),
    Done(R),
}

/// `threads` threads, the caller's among them, running `run(&mut state, job)`,
/// each with a state of its own.
pub(crate) struct Workers<J, R, S> {
    /// Each started thread's queue.
    queues: Vec<Sender<Queued<J, R>>>,
    /// The queue of the next job.
    next_queue: usize,
    /// One slot per job in flight, oldest first.
    in_flight: VecDeque<Slot<R>>,
    /// Slots of `in_flight` still [`Slot::Running`].
    running: usize,
    /// The caller's state and the job, for jobs run on the caller's thread.
    own: S,
    run: fn(&mut S, J) -> R,
    threads: Vec<JoinHandle<()>>,
}

impl<J, R, S> std::fmt::Debug for Workers<J, R, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &(self.threads.len() + 1))
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl<J: Send + 'static, R: Send + 'static, S: Send + 'static> Workers<J, R, S> {
    /// `threads` threads in all (at least one: the caller's alone starts none), each
    /// with the state `make_state` gives.
    pub(crate) fn new(threads: usize, make_state: impl Fn() -> S, run: fn(&mut S, J) -> R) -> Self {
        let (queues, threads) = (1..threads.max(1))
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
            running: 0,
            own: make_state(),
            run,
            threads,
        }
    }

    /// How many jobs may be in flight: two per thread, so that a thread finds its
    /// next job waiting while the caller takes the last result.
    pub(crate) fn capacity(&self) -> usize {
        2 * (self.queues.len() + 1)
    }

    /// Whether [`capacity`](Self::capacity) jobs are in flight: take a result first.
    pub(crate) fn is_full(&self) -> bool {
        self.in_flight.len() >= self.capacity()
    }

    /// Queues `job` on the next thread, or runs it here if every thread has its
    /// next job waiting already (or there is none). The caller keeps to
    /// [`capacity`](Self::capacity).
    pub(crate) fn submit(&mut self, job: J) {
        if self.running >= 2 * self.queues.len() {
            let result = (self.run)(&mut self.own, job);
            self.in_flight.push_back(Slot::Done(result));
            return;
        }
        let (done, result) = mpsc::sync_channel(1);
        self.queues[self.next_queue]
            .send((job, done))
            .expect("the workers outlive their queues");
        self.next_queue = (self.next_queue + 1) % self.queues.len();
        self.in_flight.push_back(Slot::Running(result));
        self.running += 1;
    }

    /// The oldest job's result if it is ready, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<R> {
        self.take_oldest(false)
    }

    /// The oldest job's result, waiting for it; `None` with nothing in flight.
    pub(crate) fn next(&mut self) -> Option<R> {
        self.take_oldest(true)
    }

    /// The oldest job's result, if it is done or (with `wait`) once it is.
    fn take_oldest(&mut self, wait: bool) -> Option<R> {
        let result = match self.in_flight.pop_front()? {
            Slot::Done(result) => result,
            Slot::Running(receiver) => {
                let result = match wait {
                    true => receive(&receiver),
                    false => receiver.try_recv().ok(),
                };
                let Some(result) = result else {
                    assert!(!wait, "a worker answers every job");
                    self.in_flight.push_front(Slot::Running(receiver));
                    return None;
                };
                self.running -= 1;
                result
            }
        };
        Some(result)
    }
}

impl<J, R, S> Drop for Workers<J, R, S> {
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
        let mut workers = Workers::new(3, || 0u64, slow_square);
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

    fn which_thread(_: &mut (), n: u64) -> (u64, std::thread::ThreadId) {
        (n, std::thread::current().id())
    }

    #[test]
    fn the_caller_runs_a_job_when_every_thread_has_its_next_one_waiting() {
        let caller = std::thread::current().id();
        let mut workers = Workers::new(2, || (), which_thread);
        assert_eq!(workers.capacity(), 4);
        // the started thread takes two, the third runs here; none is taken meanwhile
        (0..4).for_each(|n| workers.submit(n));
        assert!(workers.is_full());
        let ran: Vec<_> = std::iter::from_fn(|| workers.next()).collect();
        assert_eq!(ran.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_ne!(ran[0].1, caller);
        assert_eq!(ran[1].1, ran[0].1);
        assert_eq!(ran[2].1, caller);
        assert_eq!(ran[3].1, caller);
        // once its results are taken, the started thread has room again
        workers.submit(4);
        assert_ne!(workers.next().unwrap().1, caller);
    }

    #[test]
    fn one_thread_is_the_callers_alone() {
        let caller = std::thread::current().id();
        let mut workers = Workers::new(1, || (), which_thread);
        (0..2).for_each(|n| workers.submit(n));
        assert!(std::iter::from_fn(|| workers.next()).all(|(_, id)| id == caller));
        assert!(workers.threads.is_empty());
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
