//! The circuit breaker of one backend (README "Backend health"), as a pure state machine driven by the backend's
//! queue worker with tokio's clock. It tells a **dead** backend from a **flaky** one, the way Envoy's outlier
//! detection does with its two detectors (consecutive local-origin failures, and a failure percentage over an
//! interval with a minimum request volume):
//!
//! - **Closed**: the queue drains normally. Two rules open the breaker:
//!   - *No answer*: `--breaker-failures` consecutive attempts that got no HTTP answer at all (the connection was
//!     refused or broke, or `--attempt-timeout` passed; docs/design.md section 4). Any HTTP answer, even a `5xx`,
//!     resets that count: a backend that answers is reachable. A dead or frozen backend thus opens it within a
//!     few attempts.
//!   - *Failure rate*: over a sliding window of `--breaker-window` (ten buckets of a tenth each, so between 90 %
//!     and 100 % of it is looked at), at least `--breaker-min-requests` attempts of which at least
//!     `--breaker-failure-rate` failed transiently (no answer, `5xx`, `408`, `425`, `429`). A backend that
//!     drops one write in five stays closed (its retries get the writes through); one that answers `503` to
//!     nearly everything opens it once enough attempts were seen. Below the minimum volume the rule does not
//!     judge: a few unlucky attempts prove nothing.
//! - **Open**: the queue pauses. Entries keep their place and their order, and no attempt counts against them.
//!   When the probe is due the worker sends the oldest eligible entry as the single probe: half-open. The probe
//!   schedule is the retry schedule of docs/design.md section 3 by probe number (1 s, 2 s, 4 s ... plus jitter),
//!   capped at `--probe-interval-max` (5 s by default) rather than `--max-backoff`, so that a backend that comes
//!   back is noticed within seconds even after a long outage. A `Retry-After` from the backend replaces the
//!   computed wait, capped at `--max-backoff` (the backend said when to come back).
//! - **Half-open**: one probe on the wire, nothing else. A transient failure of the probe opens the breaker again
//!   with the next wait; any other answer closes it, and the worker makes every waiting entry due at once, so
//!   the queue drains oldest first at its bounded concurrency. Answers to attempts sent before the breaker opened
//!   do not close it: only the probe's does. Closing starts both rules afresh (an empty window, a zero count).
//!
//! Unlike Envoy and Hystrix nothing is failed fast: a paused queue keeps its writes.
//!
//! # The defaults
//! `--breaker-failures 5`, `--breaker-failure-rate 0.8`, `--breaker-window 10s`, `--breaker-min-requests 20`,
//! `--probe-interval-max 5s`. Five attempts without an answer in a row do not happen to a backend that answers.
//! A backend that fails 20 % of its attempts at random shows 16 failures out of 20 with a probability of about
//! 1e-8, and under load its window holds hundreds of attempts, where 80 % is out of reach; one failing half of
//! them is still not paused under load (its retries get through, the retry budget bounds their cost). One probe
//! every 5 s is no load for a backend, and bounds how long a recovered one waits for its queue.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

/// The breaker's state; the gauge `fanout_breaker_state` shows [`State::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Attempts flow; `failures` consecutive attempts without an answer so far.
    Closed {
        /// Consecutive attempts that got no answer.
        failures: u32,
    },
    /// Paused until `next_probe`; `probes` probes failed since it opened.
    Open {
        /// Failed probes since the breaker opened.
        probes: u32,
        /// When the next probe may go.
        next_probe: Instant,
    },
    /// One probe is on the wire.
    HalfOpen {
        /// Failed probes since the breaker opened.
        probes: u32,
    },
}

impl State {
    /// 0 closed, 1 open, 2 half-open.
    pub fn code(self) -> f64 {
        match self {
            State::Closed { .. } => 0.0,
            State::Open { .. } => 1.0,
            State::HalfOpen { .. } => 2.0,
        }
    }
}

/// Which rule opened the breaker (the `reason` label of `fanout_breaker_opens_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// `--breaker-failures` consecutive attempts got no answer: the backend looks dead.
    NoAnswer,
    /// The window's failure rate reached `--breaker-failure-rate`: the backend answers, but mostly with failures.
    FailureRate {
        /// Attempts in the window.
        requests: u32,
        /// Of which failed transiently.
        failures: u32,
    },
}

impl Trip {
    /// The label value: `no_answer` or `failure_rate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trip::NoAnswer => "no_answer",
            Trip::FailureRate { .. } => "failure_rate",
        }
    }
}

/// What a transition means for the worker (it logs it once and updates its gauges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing to report.
    None,
    /// The breaker just opened, by this rule: the backend is considered down.
    Opened(Trip),
    /// The breaker just closed: the backend answers again.
    Closed,
}

/// How a transient failure ended, for the rules: did the backend send an HTTP answer?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer: refused or broken connection, or a timeout. Counts for both rules.
    NoAnswer,
    /// A transient status (`5xx`, `408`, `425`, `429`). Counts for the failure rate only.
    Answered,
}

/// The breaker's settings, from `--breaker-*` and `--probe-interval-max` (README "Backend health").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Consecutive attempts without an answer that open the breaker; 0 disables the whole breaker.
    pub failures: u32,
    /// Share of failed attempts in the window, in (0, 1], that opens the breaker.
    pub failure_rate: f64,
    /// Length of the sliding window of the failure rate.
    pub window: Duration,
    /// Attempts the window must hold before the failure rate may open the breaker (at least 1).
    pub min_requests: u32,
    /// The probe schedule: the retry schedule with `max` lowered to `--probe-interval-max`.
    pub probes: Backoff,
    /// Cap of a backend's `Retry-After` (`--max-backoff`).
    pub max_hint: Duration,
}

impl BreakerSettings {
    /// The settings built from the retry schedule `retry` and the breaker's flags: probes follow `retry` with its
    /// cap lowered to `probe_interval_max`; a `Retry-After` stays capped at `retry.max`.
    pub fn new(
        retry: Backoff,
        failures: u32,
        failure_rate: f64,
        window: Duration,
        min_requests: u32,
        probe_interval_max: Duration,
    ) -> Self {
        let probes = Backoff { max: retry.max.min(probe_interval_max), ..retry };
        Self { failures, failure_rate, window, min_requests: min_requests.max(1), probes, max_hint: retry.max }
    }
}

/// Buckets of the sliding window.
const BUCKETS: u64 = 10;

/// The failure-rate window: per bucket of `window / 10`, attempts and transient failures.
#[derive(Debug, Clone)]
struct Window {
    origin: Instant,
    bucket: Duration,
    /// (bucket number since `origin`, attempts, failures), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
    requests: u32,
    failures: u32,
}

impl Window {
    fn new(window: Duration, now: Instant) -> Self {
        let bucket = (window / BUCKETS as u32).max(Duration::from_millis(1));
        Self { origin: now, bucket, buckets: VecDeque::new(), requests: 0, failures: 0 }
    }

    /// Records one attempt at `now` and returns the window's (attempts, failures).
    fn record(&mut self, now: Instant, failed: bool) -> (u32, u32) {
        let index = u64::try_from(now.saturating_duration_since(self.origin).as_nanos() / self.bucket.as_nanos())
            .unwrap_or(u64::MAX);
        while let Some(&(i, r, f)) = self.buckets.front() {
            if i.saturating_add(BUCKETS) > index {
                break;
            }
            self.requests -= r;
            self.failures -= f;
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some((i, r, f)) if *i == index => {
                *r += 1;
                *f += u32::from(failed);
            }
            _ => self.buckets.push_back((index, 1, u32::from(failed))),
        }
        self.requests += 1;
        self.failures += u32::from(failed);
        (self.requests, self.failures)
    }

    fn clear(&mut self) {
        self.buckets.clear();
        self.requests = 0;
        self.failures = 0;
    }
}

/// One backend's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    settings: BreakerSettings,
    window: Window,
}

impl Breaker {
    /// A closed breaker with `settings` (see [`BreakerSettings`]); `failures == 0` never opens.
    pub fn new(settings: BreakerSettings) -> Self {
        let window = Window::new(settings.window, Instant::now());
        Self { state: State::Closed { failures: 0 }, settings, window }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// True while attempts other than a probe may go.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// When a probe may go, while open.
    pub fn probe_due(&self) -> Option<Instant> {
        match self.state {
            State::Open { next_probe, .. } => Some(next_probe),
            _ => None,
        }
    }

    /// A probe was sent.
    pub fn probing(&mut self) {
        if let State::Open { probes, .. } = self.state {
            self.state = State::HalfOpen { probes };
        }
    }

    /// The probe found nothing to send (the NATS store's task that won it had no write in its partition): open
    /// again, with the next probe due at `next_probe`, the failed probes unchanged.
    pub fn probe_unused(&mut self, next_probe: Instant) {
        if let State::HalfOpen { probes } = self.state {
            self.state = State::Open { probes, next_probe };
        }
    }

    /// The backend answered with something other than a transient failure, at `now`. While closed, that resets
    /// the no-answer count and counts as a good attempt in the window; while open or half-open only the probe's
    /// answer closes the breaker: an attempt sent before it opened proves little.
    pub fn answered(&mut self, probe: bool, now: Instant) -> Change {
        match self.state {
            State::Closed { .. } => {
                if self.settings.failures > 0 {
                    self.window.record(now, false);
                }
                self.state = State::Closed { failures: 0 };
                Change::None
            }
            State::HalfOpen { .. } if probe => {
                self.window.clear();
                self.state = State::Closed { failures: 0 };
                Change::Closed
            }
            State::Open { .. } | State::HalfOpen { .. } => Change::None,
        }
    }

    /// A transient failure at `now`; `retry_after` is the backend's hint, if it sent one. A probe's failure
    /// reopens the breaker with a longer wait; an ordinary attempt's failure counts towards opening it.
    pub fn failed(&mut self, probe: bool, kind: Failure, now: Instant, retry_after: Option<Duration>) -> Change {
        match self.state {
            State::Closed { failures } => {
                if self.settings.failures == 0 {
                    return Change::None;
                }
                let failures = match kind {
                    Failure::NoAnswer => failures + 1,
                    Failure::Answered => 0,
                };
                let (requests, failed) = self.window.record(now, true);
                let trip = if failures >= self.settings.failures {
                    Some(Trip::NoAnswer)
                } else if requests >= self.settings.min_requests
                    && f64::from(failed) >= self.settings.failure_rate * f64::from(requests)
                {
                    Some(Trip::FailureRate { requests, failures: failed })
                } else {
                    None
                };
                match trip {
                    Some(trip) => {
                        self.state = State::Open { probes: 0, next_probe: now + self.probe_wait(0, retry_after) };
                        Change::Opened(trip)
                    }
                    None => {
                        self.state = State::Closed { failures };
                        Change::None
                    }
                }
            }
            State::HalfOpen { probes } if probe => {
                let probes = probes + 1;
                self.state = State::Open { probes, next_probe: now + self.probe_wait(probes, retry_after) };
                Change::None
            }
            // An attempt sent before the breaker opened failed too: nothing new.
            State::HalfOpen { .. } | State::Open { .. } => Change::None,
        }
    }

    /// The wait before probe `n`: the capped schedule, or the backend's `Retry-After` capped at `--max-backoff`.
    fn probe_wait(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(wait) => wait.min(self.settings.max_hint),
            None => self.settings.probes.delay(n, &mut rand::rng()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXACT: Backoff =
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(64), max_jitter: Duration::ZERO };

    /// The defaults of the flags, with an exact retry schedule.
    fn settings(failures: u32) -> BreakerSettings {
        BreakerSettings::new(EXACT, failures, 0.8, Duration::from_secs(10), 20, Duration::from_secs(5))
    }

    /// Walks an open breaker through `n` failed probes; returns the waits between them, in seconds.
    fn failed_probes(b: &mut Breaker, n: usize) -> Vec<u64> {
        let mut waits = Vec::new();
        for _ in 0..n {
            let due = b.probe_due().expect("open");
            b.probing();
            assert_eq!(b.state(), State::HalfOpen { probes: waits.len() as u32 });
            assert!(b.probe_due().is_none(), "one probe at a time");
            b.failed(true, Failure::NoAnswer, due, None);
            waits.push((b.probe_due().expect("open again") - due).as_secs());
        }
        waits
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_opens_after_the_threshold_and_probes_on_the_capped_schedule() {
        let now = Instant::now();
        let mut b = Breaker::new(settings(3));
        assert_eq!(b.failed(false, Failure::NoAnswer, now, None), Change::None);
        assert_eq!(b.answered(false, now), Change::None, "an answer resets the count");
        assert_eq!(b.failed(false, Failure::NoAnswer, now, None), Change::None);
        assert_eq!(b.failed(false, Failure::NoAnswer, now, None), Change::None);
        assert_eq!(b.failed(false, Failure::NoAnswer, now, None), Change::Opened(Trip::NoAnswer));
        assert_eq!(b.probe_due(), Some(now + Duration::from_secs(1)));
        assert_eq!(b.failed(false, Failure::NoAnswer, now, None), Change::None, "late failures change nothing");
        assert_eq!(b.answered(false, now), Change::None, "nor does a late success: only the probe closes it");
        assert!(!b.is_closed());
        // 1 s doubling, capped at --probe-interval-max (5 s), not at --max-backoff (64 s).
        assert_eq!(failed_probes(&mut b, 8), [2, 4, 5, 5, 5, 5, 5, 5]);
        b.probing();
        assert_eq!(b.answered(false, now), Change::None, "an older attempt's answer while the probe is out");
        assert_eq!(b.answered(true, now), Change::Closed);
        assert!(b.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_replaces_the_probe_wait_up_to_max_backoff() {
        let now = Instant::now();
        let mut b = Breaker::new(settings(1));
        assert_eq!(
            b.failed(false, Failure::NoAnswer, now, Some(Duration::from_secs(30))),
            Change::Opened(Trip::NoAnswer)
        );
        assert_eq!(b.probe_due(), Some(now + Duration::from_secs(30)));
        b.probing();
        b.failed(true, Failure::Answered, now, Some(Duration::from_secs(3600)));
        assert_eq!(b.probe_due(), Some(now + Duration::from_secs(64)));
    }

    #[tokio::test(start_paused = true)]
    async fn answered_failures_never_make_a_consecutive_run() {
        // 503 after 503: the backend answers. Only the rate may open the breaker, and only past the volume.
        let now = Instant::now();
        let mut b = Breaker::new(settings(2));
        for n in 1..20 {
            assert_eq!(b.failed(false, Failure::Answered, now, None), Change::None, "attempt {n}");
        }
        assert_eq!(
            b.failed(false, Failure::Answered, now, None),
            Change::Opened(Trip::FailureRate { requests: 20, failures: 20 }),
            "20 of 20 failed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_failing_one_attempt_in_five_stays_closed_for_good() {
        // Every fifth attempt fails, in runs as long as the pool's concurrency makes them (here all failures of a
        // window arrive together): a 20 % rate is far below 80 %, so the breaker never opens.
        let start = Instant::now();
        let mut b = Breaker::new(settings(5));
        for step in 0..100_000u64 {
            let now = start + Duration::from_millis(step);
            let change =
                if step % 50 < 10 { b.failed(false, Failure::Answered, now, None) } else { b.answered(false, now) };
            assert_eq!(change, Change::None, "step {step}");
        }
        assert!(b.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_over_the_window_only() {
        let start = Instant::now();
        let mut b = Breaker::new(settings(5));
        // 100 good attempts long ago...
        for _ in 0..100 {
            b.answered(false, start);
        }
        // ... have left the window 10 s later: 20 failures then are 100 % of it.
        let later = start + Duration::from_secs(11);
        for _ in 0..19 {
            assert_eq!(b.failed(false, Failure::Answered, later, None), Change::None);
        }
        assert!(matches!(b.failed(false, Failure::Answered, later, None), Change::Opened(Trip::FailureRate { .. })));
        // While in the window, the same good attempts keep the rate low.
        let mut b = Breaker::new(settings(5));
        for _ in 0..100 {
            b.answered(false, start);
        }
        let soon = start + Duration::from_secs(5);
        // 80 % of the window: 400 failures to 100 answers.
        for _ in 0..399 {
            assert_eq!(b.failed(false, Failure::Answered, soon, None), Change::None);
        }
        assert!(matches!(b.failed(false, Failure::Answered, soon, None), Change::Opened(Trip::FailureRate { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_starts_the_window_afresh() {
        let now = Instant::now();
        let mut b = Breaker::new(settings(5));
        for _ in 0..19 {
            b.failed(false, Failure::Answered, now, None);
        }
        assert!(matches!(b.failed(false, Failure::Answered, now, None), Change::Opened(_)));
        b.probing();
        assert_eq!(b.answered(true, now), Change::Closed);
        // The 20 failures before do not count: one more failure does not reopen it.
        assert_eq!(b.failed(false, Failure::Answered, now, None), Change::None);
        assert!(b.is_closed());
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let now = Instant::now();
        let mut b = Breaker::new(settings(0));
        for _ in 0..1000 {
            assert_eq!(b.failed(false, Failure::NoAnswer, now, None), Change::None);
            assert_eq!(b.failed(false, Failure::Answered, now, None), Change::None);
        }
        assert!(b.is_closed());
    }
}
