//! The retry schedule: truncated exponential backoff with jitter (docs/design.md section 3), as pure functions.
//!
//! Before retry `n` (n = 0 for the second attempt) a backend worker waits
//! `min(initial * 2^n, max) + jitter`, with `jitter` drawn uniformly in `[0, max_jitter]` anew for every retry.
//! With the defaults (1 s, 64 s, 100 ms) that is 1 s, 2 s, 4 s, ... 64 s, 64 s, ... each plus up to 100 ms: the
//! original service's `min(2^n s + r, max_backoff + r)`, which follows Google Cloud's "exponential backoff"
//! guidance. A `Retry-After` answer (RFC 9110 section 10.2.3) replaces the computed wait, capped at `max`.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// The parameters of the schedule. All durations are wall-clock waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Wait before the first retry (n = 0), before jitter.
    pub initial: Duration,
    /// Cap of the exponential part.
    pub max: Duration,
    /// Upper bound (inclusive) of the uniform jitter added to every wait.
    pub max_jitter: Duration,
}

impl Backoff {
    /// The exponential part before retry `n`: `min(initial * 2^n, max)`, without overflow for any `n`.
    pub fn base(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n).filter(|f| *f != 0);
        factor.and_then(|f| self.initial.checked_mul(f)).map_or(self.max, |d| d.min(self.max))
    }

    /// A jitter drawn uniformly in `[0, max_jitter]`, at nanosecond resolution.
    pub fn jitter<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let max = u64::try_from(self.max_jitter.as_nanos()).unwrap_or(u64::MAX);
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rng.random_range(0..=max))
    }

    /// The whole wait before retry `n`: [`Backoff::base`] plus a fresh [`Backoff::jitter`].
    pub fn delay<R: Rng + ?Sized>(&self, n: u32, rng: &mut R) -> Duration {
        self.base(n).saturating_add(self.jitter(rng))
    }

    /// The wait before retry `n` when the backend may have sent `Retry-After`: the backend's wait, capped at
    /// `max`, replaces the computed one (no jitter is added to an explicit wait).
    pub fn delay_with_hint<R: Rng + ?Sized>(&self, n: u32, retry_after: Option<Duration>, rng: &mut R) -> Duration {
        match retry_after {
            Some(wait) => wait.min(self.max),
            None => self.delay(n, rng),
        }
    }
}

/// Parses a `Retry-After` header value (RFC 9110 section 10.2.3): either delay-seconds or an HTTP-date, read
/// against `now`. A date in the past means "now" (zero). Anything else is ignored (`None`).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const DEFAULTS: Backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(64),
        max_jitter: Duration::from_millis(100),
    };

    #[test]
    fn base_doubles_then_is_truncated() {
        let expected = [1, 2, 4, 8, 16, 32, 64, 64, 64, 64, 64];
        for (n, secs) in expected.iter().enumerate() {
            assert_eq!(DEFAULTS.base(n as u32), Duration::from_secs(*secs), "n = {n}");
        }
        for n in [31, 32, 33, 64, 1000, u32::MAX] {
            assert_eq!(DEFAULTS.base(n), Duration::from_secs(64), "n = {n}");
        }
    }

    #[test]
    fn seeded_schedule_is_exact() {
        // The same seed gives the same schedule; each wait is the base plus its own draw from the same stream.
        let mut rng = StdRng::seed_from_u64(7);
        let waits: Vec<Duration> = (0..=10).map(|n| DEFAULTS.delay(n, &mut rng)).collect();
        let mut reference = StdRng::seed_from_u64(7);
        for (n, wait) in waits.iter().enumerate() {
            let jitter = Duration::from_nanos(reference.random_range(0..=100_000_000u64));
            assert_eq!(*wait, DEFAULTS.base(n as u32) + jitter, "n = {n}");
        }
        let mut again = StdRng::seed_from_u64(7);
        let replay: Vec<Duration> = (0..=10).map(|n| DEFAULTS.delay(n, &mut again)).collect();
        assert_eq!(waits, replay);
        // The jitter is drawn anew each time: not all eleven draws are equal.
        let jitters: Vec<Duration> = waits.iter().enumerate().map(|(n, w)| *w - DEFAULTS.base(n as u32)).collect();
        assert!(jitters.windows(2).any(|w| w[0] != w[1]), "{jitters:?}");
    }

    #[test]
    fn zero_jitter_means_exact_base() {
        let b = Backoff { max_jitter: Duration::ZERO, ..DEFAULTS };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(b.delay(3, &mut rng), Duration::from_secs(8));
    }

    #[test]
    fn retry_after_replaces_and_is_capped() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(DEFAULTS.delay_with_hint(0, Some(Duration::from_secs(5)), &mut rng), Duration::from_secs(5));
        assert_eq!(DEFAULTS.delay_with_hint(0, Some(Duration::from_secs(3600)), &mut rng), Duration::from_secs(64));
        assert_eq!(DEFAULTS.delay_with_hint(0, Some(Duration::ZERO), &mut rng), Duration::ZERO);
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    proptest! {
        #[test]
        fn every_wait_is_within_its_bounds(
            initial_ms in 1u64..10_000,
            extra_ms in 0u64..100_000,
            jitter_ms in 0u64..5_000,
            n in 0u32..200,
            seed: u64,
        ) {
            let b = Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(initial_ms + extra_ms),
                max_jitter: Duration::from_millis(jitter_ms),
            };
            let mut rng = StdRng::seed_from_u64(seed);
            let wait = b.delay(n, &mut rng);
            let base = b.base(n);
            prop_assert!(base >= b.initial.min(b.max));
            prop_assert!(base <= b.max);
            prop_assert!(wait >= base);
            prop_assert!(wait <= base + b.max_jitter);
            // Monotone in n before jitter.
            prop_assert!(b.base(n) <= b.base(n.saturating_add(1)));
        }
    }
}
