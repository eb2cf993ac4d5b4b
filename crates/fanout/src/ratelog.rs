//! Log lines that stay readable under overload (README "Logs"): an event that can happen thousands of times a
//! second (a refused write, a failed batch of the write log, a connection cut at a timeout) is logged at most once
//! per [`INTERVAL`] per kind, with how many times it happened since the last line. The metrics count every one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// At most one line per kind per this long.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// One kind of event. `const`-constructible, for a `static` per call site.
#[derive(Debug, Default)]
pub struct Every {
    /// When the last line was logged, in ms since [`epoch`] plus one (0: never).
    last_ms: AtomicU64,
    /// Events since that line, not yet reported.
    pending: AtomicU64,
}

/// The process's reference instant for [`Every`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Every {
    /// An event kind that has not happened yet.
    pub const fn new() -> Self {
        Self { last_ms: AtomicU64::new(0), pending: AtomicU64::new(0) }
    }

    /// Records one event. Returns `Some(n)` when a line is due now (n: the events it reports, this one
    /// included), `None` when the line would come less than [`INTERVAL`] after the previous one.
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1)
    }

    /// [`Every::hit`] at `now` (ms since [`epoch`], plus one).
    fn hit_at(&self, now: u64) -> Option<u64> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let last = self.last_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < interval {
            return None;
        }
        // One caller wins the line; the others' events are reported by the next one.
        if self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return None;
        }
        Some(self.pending.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_gives_one_line_then_the_next_reports_the_rest() {
        let kind = Every::new();
        assert_eq!(kind.hit_at(5), Some(1), "the first event is logged at once");
        for t in 0..10_000 {
            assert_eq!(kind.hit_at(5 + t / 10), None, "within the interval");
        }
        assert_eq!(kind.hit_at(1005), Some(10_001), "the suppressed events and this one");
        assert_eq!(kind.hit_at(1006), None);
        assert_eq!(Every::new().hit(), Some(1), "on the real clock too");
    }
}
