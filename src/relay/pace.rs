//! The source's credit window sized in time: about two round trips of the pace the
//! destination acknowledges.
//!
//! The source takes no more QEMU bytes in while a window of them is not acknowledged.
//! At the switchover those bytes still have to cross after QEMU stopped the VM, so a
//! window adds window / pace to the downtime; too small, it caps the pace below the
//! link's (pace <= window / round trip). Two round trips of the acknowledged pace sit
//! between: when the window is what limits the pace (pace = window / round trip), the
//! next window is twice as large, so it never locks itself small; when the link or
//! the destination limits it, the proxies hold about two round trips of the stream.
//!
//! The round trip is the shortest delay seen between taking bytes in and their
//! acknowledgement (a minimum: queues only lengthen it). A window of two round trips
//! keeps about one round trip of its own bytes queued ahead of each new one, so once
//! that minimum is [`HORIZON`] old, the window drops to [`MIN_WINDOW`] until bytes
//! taken in with the queue drained are acknowledged, and their delay is the round trip
//! from then on, longer or shorter (as BBR probes its minimum round trip).
//!
//! Sans-IO: the caller tells the instants, so tests give their own.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::dedup::ACK_EVERY;

/// The smallest window: a destination acknowledges every [`ACK_EVERY`] of QEMU bytes,
/// so with two of them unacknowledged an acknowledgement is always on its way.
pub(super) const MIN_WINDOW: u64 = 2 * ACK_EVERY;

/// How long a minimum round trip holds without being seen again.
const HORIZON: Duration = Duration::from_secs(10);

/// Bytes taken in and not acknowledged yet, at most this many marks of them (memory
/// stays bounded whatever a destination acknowledges, or not)...
const MARKS: usize = 64;

/// ... one per this many bytes (64 of them span the default window).
const MARK_EVERY: u64 = ACK_EVERY / 4;

/// The pace is the fastest of this many recent intervals: one slower interval (QEMU
/// pausing, a probe of the round trip) does not shrink the window at once.
const PACE_INTERVALS: usize = 4;

const NANOS_PER_SECOND: u128 = 1_000_000_000;

/// The window of one link: see the [module docs](self).
#[derive(Debug)]
pub(super) struct Pace {
    /// The configured window, the most this one grows to.
    max: u64,
    /// QEMU bytes taken in so far.
    taken: u64,
    /// QEMU bytes acknowledged so far (never more than taken in).
    acked: u64,
    /// Bytes taken in, not acknowledged yet, oldest first.
    marks: VecDeque<Mark>,
    round_trip: Option<RoundTrip>,
    probe: Option<Probe>,
    interval: Option<Interval>,
    /// Bytes per second acknowledged in the last intervals (0: none yet).
    paces: [u64; PACE_INTERVALS],
    /// The slot of `paces` of the current interval.
    current_pace: usize,
}

/// A count of QEMU bytes at an instant.
#[derive(Debug, Clone, Copy)]
struct Mark {
    qemu_bytes: u64,
    at: Instant,
}

/// The acknowledgements the pace is measured over.
#[derive(Debug, Clone, Copy)]
struct Interval {
    /// The last acknowledgement before it.
    start: Mark,
    /// The last acknowledgement in it.
    last: Mark,
}

#[derive(Debug, Clone, Copy)]
struct RoundTrip {
    delay: Duration,
    /// When it was last seen: it holds for [`HORIZON`] from then.
    seen: Instant,
}

/// A new measure of the round trip, the window at its floor meanwhile.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// Until the bytes taken in before it are acknowledged.
    Draining { until: u64 },
    /// Until bytes taken in beyond `from` are acknowledged: their delay is the round
    /// trip.
    Measuring { from: u64 },
}

impl Pace {
    /// A window growing to `max` QEMU bytes at most (never less than
    /// [`MIN_WINDOW`]), and that large until the round trip and the pace are known.
    pub(super) fn new(max: u64) -> Self {
        Self {
            max: max.max(MIN_WINDOW),
            taken: 0,
            acked: 0,
            marks: VecDeque::with_capacity(MARKS),
            round_trip: None,
            probe: None,
            interval: None,
            paces: [0; PACE_INTERVALS],
            current_pace: 0,
        }
    }

    /// The QEMU bytes to hold unacknowledged at most now.
    pub(super) fn window(&self) -> u64 {
        if self.probe.is_some() {
            return MIN_WINDOW;
        }
        let (Some(round_trip), Some(pace)) = (self.round_trip(), self.pace()) else {
            return self.max;
        };
        let bytes = u128::from(pace)
            .saturating_mul(2)
            .saturating_mul(round_trip.as_nanos())
            / NANOS_PER_SECOND;
        u64::try_from(bytes)
            .unwrap_or(u64::MAX)
            .clamp(MIN_WINDOW, self.max)
    }

    /// The round trip, once an acknowledgement was seen.
    pub(super) fn round_trip(&self) -> Option<Duration> {
        self.round_trip.map(|rt| rt.delay)
    }

    /// The acknowledged pace in QEMU bytes per second, once an interval lasted a
    /// round trip.
    pub(super) fn pace(&self) -> Option<u64> {
        self.paces.iter().copied().max().filter(|&pace| pace > 0)
    }

    /// The source has taken `qemu_bytes` in so far, the last of them since `at` (when
    /// it started taking them: a round trip measured from there is never too short,
    /// and one too short would shrink a window that limits the pace).
    pub(super) fn taken(&mut self, qemu_bytes: u64, at: Instant) {
        self.probe_if_stale(at);
        if qemu_bytes <= self.taken {
            return;
        }
        self.taken = qemu_bytes;
        let newest = self.marks.back().map_or(self.acked, |mark| mark.qemu_bytes);
        if self.marks.len() < MARKS && qemu_bytes - newest >= MARK_EVERY {
            self.marks.push_back(Mark { qemu_bytes, at });
        }
    }

    /// The destination acknowledged `qemu_bytes`, which arrived at `at`.
    pub(super) fn acked(&mut self, qemu_bytes: u64, at: Instant) {
        self.probe_if_stale(at);
        // a destination acknowledging bytes never sent acknowledges what was
        let qemu_bytes = qemu_bytes.min(self.taken);
        if qemu_bytes <= self.acked {
            return;
        }
        self.acked = qemu_bytes;
        let mut newest = None;
        while self
            .marks
            .front()
            .is_some_and(|mark| mark.qemu_bytes <= qemu_bytes)
        {
            newest = self.marks.pop_front();
        }
        if let Some(mark) = newest {
            self.delay_seen(mark, at.saturating_duration_since(mark.at), at);
        }
        if matches!(self.probe, Some(Probe::Draining { until }) if self.acked >= until) {
            self.probe = Some(Probe::Measuring { from: self.taken });
        }
        self.pace_seen(at);
    }

    /// The bytes up to `mark` took `delay` to be acknowledged.
    fn delay_seen(&mut self, mark: Mark, delay: Duration, at: Instant) {
        let measured =
            matches!(self.probe, Some(Probe::Measuring { from }) if mark.qemu_bytes > from);
        let shortest = self.round_trip.is_none_or(|rt| delay <= rt.delay);
        if measured || shortest {
            self.round_trip = Some(RoundTrip { delay, seen: at });
            self.probe = None;
        }
    }

    /// Counts the acknowledgement that arrived `at` in the current interval, whose
    /// pace counts once it lasted a round trip: acknowledgements come in bursts, and
    /// over a shorter interval one burst would make a pace the link never had. An
    /// interval ends with the last acknowledgement of the instant it reached a round
    /// trip (a burst's last), so a burst is never split between two.
    fn pace_seen(&mut self, at: Instant) {
        let now = Mark {
            qemu_bytes: self.acked,
            at,
        };
        let (Some(mut interval), Some(round_trip)) = (self.interval, self.round_trip) else {
            self.interval = Some(Interval {
                start: now,
                last: now,
            });
            return;
        };
        let lasted = interval
            .last
            .at
            .saturating_duration_since(interval.start.at);
        if lasted >= round_trip.delay && at > interval.last.at {
            interval.start = interval.last;
            self.current_pace = (self.current_pace + 1) % PACE_INTERVALS;
        }
        let elapsed = at.saturating_duration_since(interval.start.at);
        if !elapsed.is_zero() && elapsed >= round_trip.delay {
            let bytes = u128::from(now.qemu_bytes - interval.start.qemu_bytes);
            let per_second = bytes * NANOS_PER_SECOND / elapsed.as_nanos();
            self.paces[self.current_pace] = u64::try_from(per_second).unwrap_or(u64::MAX).max(1);
        }
        interval.last = now;
        self.interval = Some(interval);
    }

    /// Starts a probe once the round trip is [`HORIZON`] old.
    fn probe_if_stale(&mut self, at: Instant) {
        let stale = self
            .round_trip
            .is_some_and(|rt| at.saturating_duration_since(rt.seen) > HORIZON);
        if stale && self.probe.is_none() {
            self.probe = Some(match self.acked >= self.taken {
                true => Probe::Measuring { from: self.taken },
                false => Probe::Draining { until: self.taken },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    /// QEMU bytes a source takes in at a time.
    const CHUNK: u64 = MIB / 4;
    const UNLIMITED: u64 = u64::MAX;

    /// A source taking QEMU's stream in as its window allows, over a link of
    /// `round_trip` carrying `link` QEMU bytes per second, to a destination that
    /// acknowledges every [`ACK_EVERY`], or holds them until the next multiple of
    /// `burst` since the start.
    struct Migration {
        pace: Pace,
        now: Instant,
        taken: u64,
        acked: u64,
        /// QEMU bytes per second QEMU writes at most.
        qemu: u64,
        link: u64,
        round_trip: Duration,
        burst: Option<Duration>,
        start: Instant,
        next_take: Instant,
        link_free: Instant,
        acks: VecDeque<(u64, Instant)>,
    }

    impl Migration {
        fn new(max: u64, qemu: u64, link: u64, round_trip: Duration) -> Self {
            let now = Instant::now();
            Self {
                pace: Pace::new(max),
                now,
                taken: 0,
                acked: 0,
                qemu,
                link,
                round_trip,
                burst: None,
                start: now,
                next_take: now,
                link_free: now,
                acks: VecDeque::new(),
            }
        }

        fn time_for(bytes: u64, per_second: u64) -> Duration {
            match per_second {
                UNLIMITED => Duration::ZERO,
                rate => Duration::from_nanos(bytes * 1_000_000_000 / rate),
            }
        }

        /// Runs for `duration`; returns the QEMU bytes acknowledged meanwhile.
        fn run(&mut self, duration: Duration) -> u64 {
            let (end, before) = (self.now + duration, self.acked);
            while self.now < end {
                let may_take = self.taken <= self.acked + self.pace.window();
                let take_at = self.next_take.max(self.now);
                match self.acks.front().copied() {
                    Some((bytes, at)) if !may_take || at <= take_at => {
                        self.acks.pop_front();
                        self.now = self.now.max(at);
                        self.acked = bytes;
                        self.pace.acked(bytes, at);
                    }
                    _ => {
                        assert!(may_take, "the window is spent and no ack is on its way");
                        self.now = take_at;
                        self.take();
                    }
                }
            }
            self.acked - before
        }

        fn take(&mut self) {
            self.taken += CHUNK;
            self.pace.taken(self.taken, self.now);
            self.next_take = self.now + Self::time_for(CHUNK, self.qemu);
            self.link_free = self.link_free.max(self.now) + Self::time_for(CHUNK, self.link);
            if self.taken % ACK_EVERY == 0 {
                let mut at = self.link_free + self.round_trip;
                if let Some(burst) = self.burst {
                    let ticks = (at - self.start).as_nanos().div_ceil(burst.as_nanos());
                    at = self.start + burst * u32::try_from(ticks).unwrap();
                }
                self.acks.push_back((self.taken, at));
            }
        }

        fn window_mib(&self) -> f64 {
            self.pace.window() as f64 / MIB as f64
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The window, in MiB, within `tolerance` (a fraction) of `wanted`.
    fn assert_window_near(m: &Migration, wanted: f64, tolerance: f64) {
        let window = m.window_mib();
        assert!(
            (window - wanted).abs() < wanted * tolerance,
            "window {window} MiB, wanted {wanted}"
        );
    }

    #[test]
    fn unknown_until_acknowledged_the_window_is_the_maximum() {
        let mut m = Migration::new(16 * MIB, UNLIMITED, 100 * MIB, ms(20));
        assert_eq!(m.pace.window(), 16 * MIB);
        m.take();
        assert_eq!(m.pace.window(), 16 * MIB);
    }

    #[test]
    fn a_steady_pace_makes_a_window_of_two_round_trips_of_it() {
        // QEMU writes slower than the link carries: the window does not limit it
        let mut m = Migration::new(64 * MIB, 200 * MIB, UNLIMITED, ms(20));
        m.run(Duration::from_secs(2));
        assert_window_near(&m, 2.0 * 200.0 * 0.020, 0.02);
    }

    #[test]
    fn a_window_that_limits_the_pace_grows_to_the_maximum() {
        // QEMU slow: the window shrinks to its floor
        let mut m = Migration::new(256 * MIB, 10 * MIB, UNLIMITED, ms(20));
        m.run(Duration::from_secs(1));
        assert_eq!(m.pace.window(), MIN_WINDOW);
        // then QEMU as fast as the window lets it: pace = window / round trip
        m.qemu = UNLIMITED;
        let mut windows = vec![m.pace.window()];
        for _ in 0..20 {
            m.run(ms(20));
            windows.push(m.pace.window());
        }
        assert!(windows.windows(2).all(|w| w[1] >= w[0]), "{windows:?}");
        // 7 doublings from 2 MiB to 256 MiB, within 10 round trips
        assert_eq!(windows[10], 256 * MIB, "{windows:?}");
    }

    #[test]
    fn the_window_is_clamped_at_both_ends() {
        let mut slow = Migration::new(16 * MIB, MIB, UNLIMITED, ms(1));
        slow.run(Duration::from_secs(2));
        assert_eq!(slow.pace.window(), MIN_WINDOW);
        let mut fast = Migration::new(16 * MIB, 10 << 30, 10 << 30, ms(100));
        fast.run(Duration::from_secs(2));
        assert_eq!(fast.pace.window(), 16 * MIB);
        assert_eq!(Pace::new(0).window(), MIN_WINDOW);
    }

    #[test]
    fn acknowledgements_in_bursts_do_not_blow_the_pace_up() {
        // eight acknowledgements at once, every 40 ms: still 200 MiB/s
        let mut m = Migration::new(256 * MIB, 200 * MIB, UNLIMITED, ms(20));
        m.burst = Some(ms(40));
        let acked = m.run(Duration::from_secs(2));
        let pace = acked as f64 / MIB as f64 / 2.0;
        // the longest delay of a byte is the round trip and a burst's 40 ms
        let most = 2.0 * pace * (0.020 + 0.040);
        let window = m.window_mib();
        assert!(
            window <= most * 1.05,
            "window {window} MiB, pace {pace} MiB/s"
        );
        assert!(window >= 2.0 * pace * 0.020 * 0.95, "window {window} MiB");
    }

    #[test]
    fn a_link_that_limits_the_pace_keeps_the_window_near_two_round_trips() {
        // without a new measure of the round trip every horizon, the window's own
        // queue would lengthen every delay seen and the window grow to its maximum
        let mut m = Migration::new(64 * MIB, UNLIMITED, 100 * MIB, ms(20));
        m.run(Duration::from_secs(2));
        // a round trip, plus the wait for an acknowledgement of 1 MiB at 100 MiB/s
        let wanted = 2.0 * 100.0 * (0.020 + 0.010);
        assert_window_near(&m, wanted, 0.1);
        let mut windows = Vec::new();
        for _ in 0..6 {
            let acked = m.run(Duration::from_secs(5));
            let pace = acked as f64 / MIB as f64 / 5.0;
            assert!(pace > 95.0, "the link stays busy: {pace} MiB/s");
            windows.push(m.window_mib());
        }
        assert!(windows.iter().all(|&w| w < wanted * 1.5), "{windows:?}");
    }

    #[test]
    fn the_round_trip_rises_again_when_the_path_lengthens() {
        let mut m = Migration::new(64 * MIB, UNLIMITED, 100 * MIB, ms(20));
        m.run(Duration::from_secs(2));
        m.round_trip = ms(100);
        m.run(Duration::from_secs(12));
        let acked = m.run(Duration::from_secs(3));
        let pace = acked as f64 / MIB as f64 / 3.0;
        assert!(pace > 95.0, "the link stays busy: {pace} MiB/s");
        assert_window_near(&m, 2.0 * 100.0 * (0.100 + 0.010), 0.2);
    }

    #[test]
    fn memory_stays_bounded_whatever_a_destination_acknowledges() {
        let mut pace = Pace::new(u64::MAX);
        let capacity = pace.marks.capacity();
        let start = Instant::now();
        for i in 1..100_000u64 {
            pace.taken(i * CHUNK, start + Duration::from_micros(i));
            if i % 1000 == 0 {
                // acknowledgements far behind, backwards, beyond what was taken
                pace.acked(i * 7, start);
                pace.acked(1, start);
                pace.acked(u64::MAX, start + Duration::from_micros(i));
            }
            assert!(pace.marks.len() <= MARKS);
        }
        assert_eq!(pace.marks.capacity(), capacity);
    }

    #[test]
    fn hostile_or_odd_acknowledgements_panic_nothing() {
        let start = Instant::now();
        let mut pace = Pace::new(16 * MIB);
        // before anything was taken in: nothing acknowledged
        pace.acked(5 * MIB, start);
        assert_eq!(pace.acked, 0);
        assert_eq!(pace.window(), 16 * MIB);
        // beyond what was taken in: acknowledges what was
        pace.taken(3 * MIB, start);
        pace.acked(u64::MAX, start + ms(5));
        assert_eq!(pace.acked, 3 * MIB);
        // everything at one instant: no division by zero
        let mut pace = Pace::new(16 * MIB);
        for i in 1..1000 {
            pace.taken(i * MIB, start);
            pace.acked(i * MIB, start);
            pace.acked(i * MIB, start);
            let window = pace.window();
            assert!((MIN_WINDOW..=16 * MIB).contains(&window));
        }
        // instants going backwards
        let mut pace = Pace::new(16 * MIB);
        pace.taken(MIB, start + ms(10));
        pace.acked(MIB, start);
        pace.taken(2 * MIB, start + Duration::from_secs(100));
        pace.acked(2 * MIB, start);
        assert!((MIN_WINDOW..=16 * MIB).contains(&pace.window()));
    }
}
