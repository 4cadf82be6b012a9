//! Whether a link still moves: every byte read or written on either side of an end
//! counts, and an end that sees none for its idle timeout gives up. This is what
//! frees a proxy from a peer that stalls on purpose, and what turns a link
//! black-holed after the last byte into a reported failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;

/// When the last progress happened, shared by the futures of one link end.
#[derive(Debug)]
pub(super) struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last progress.
    last: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Notes progress now.
    pub(super) fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`, with the error to end the link with.
    pub(super) async fn stalled(&self, idle: Duration) -> Error {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = self.start + last + idle;
            if Instant::now() >= deadline {
                return Error::Timeout {
                    what: "progress on the link (idle timeout)",
                };
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stalls_only_after_a_whole_idle_period_without_progress() {
        let activity = Activity::new();
        let idle = Duration::from_secs(10);
        let watch = activity.stalled(idle);
        tokio::pin!(watch);
        for _ in 0..5 {
            tokio::select! {
                _ = &mut watch => panic!("stalled while making progress"),
                () = tokio::time::sleep(Duration::from_secs(6)) => activity.touch(),
            }
        }
        let before = Instant::now();
        let err = watch.await;
        assert!(matches!(err, Error::Timeout { .. }));
        assert_eq!(
            before.elapsed(),
            idle,
            "exactly one idle period after the last touch"
        );
    }
}
