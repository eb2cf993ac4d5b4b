//! The circuit breaker of one backend (README "Backend health"), as a pure state machine
//! driven by the backend's queue worker with tokio's clock.
//!
//! - **Closed**: the queue drains normally. Every transient failure (docs/design.md section 4: no connection, a
//!   timeout, `5xx`, `429`) adds one to a count of consecutive failures; any HTTP answer that is not transient (a
//!   `201`, a permanent `4xx`) resets it. At `--breaker-failures` the breaker opens.
//! - **Open**: the queue pauses. Entries keep their place and their order, and no attempt counts against them.
//!   When the probe is due (the retry schedule of docs/design.md section 3, by probe number: 1 s, 2 s, 4 s ...
//!   capped at `--max-backoff`, with jitter) the worker sends the oldest eligible entry as the single probe: half-open.
//! - **Half-open**: one probe on the wire, nothing else. A transient failure opens the breaker again with the next,
//!   longer probe wait; any other answer closes it, and the worker makes every waiting entry due at once, so the
//!   queue drains oldest first at its bounded concurrency. Answers to attempts sent before the breaker opened do
//!   not close it: only the probe's does.
//!
//! The same shape as Envoy's outlier detection (consecutive 5xx ejection) and Hystrix's breaker, except that
//! nothing is failed fast: a paused queue keeps its writes.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

/// The breaker's state; the gauge `fanout_breaker_state` shows [`State::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Attempts flow; `failures` consecutive transient failures so far.
    Closed {
        /// Consecutive transient failures.
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

/// What a transition means for the worker (it logs it once and updates its gauges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing to report.
    None,
    /// The breaker just opened: the backend is considered down.
    Opened,
    /// The breaker just closed: the backend answers again.
    Closed,
}

/// One backend's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    threshold: u32,
    schedule: Backoff,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive transient failures (0 disables it) and probes
    /// on `schedule`.
    pub fn new(threshold: u32, schedule: Backoff) -> Self {
        Self { state: State::Closed { failures: 0 }, threshold, schedule }
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

    /// The backend answered with something other than a transient failure. While closed, that resets the count;
    /// while open or half-open only the probe's answer closes the breaker: an attempt sent before it opened
    /// proves little (a flaky backend would otherwise open and close it over and over).
    pub fn answered(&mut self, probe: bool) -> Change {
        match self.state {
            State::Closed { .. } => {
                self.state = State::Closed { failures: 0 };
                Change::None
            }
            State::HalfOpen { .. } if probe => {
                self.state = State::Closed { failures: 0 };
                Change::Closed
            }
            State::Open { .. } | State::HalfOpen { .. } => Change::None,
        }
    }

    /// A transient failure; `retry_after` is the backend's hint, if it sent one. A probe's failure reopens the
    /// breaker with a longer wait; an ordinary attempt's failure counts towards opening it.
    pub fn failed(&mut self, probe: bool, now: Instant, retry_after: Option<Duration>) -> Change {
        let mut rng = rand::rng();
        match self.state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if self.threshold > 0 && failures >= self.threshold {
                    let wait = self.schedule.delay_with_hint(0, retry_after, &mut rng);
                    self.state = State::Open { probes: 0, next_probe: now + wait };
                    Change::Opened
                } else {
                    self.state = State::Closed { failures };
                    Change::None
                }
            }
            State::HalfOpen { probes } if probe => {
                let probes = probes + 1;
                let wait = self.schedule.delay_with_hint(probes, retry_after, &mut rng);
                self.state = State::Open { probes, next_probe: now + wait };
                Change::None
            }
            // An attempt sent before the breaker opened failed too: nothing new.
            State::HalfOpen { .. } | State::Open { .. } => Change::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXACT: Backoff =
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(64), max_jitter: Duration::ZERO };

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_on_the_schedule() {
        let now = Instant::now();
        let mut b = Breaker::new(3, EXACT);
        assert_eq!(b.failed(false, now, None), Change::None);
        assert_eq!(b.answered(false), Change::None, "an answer resets the count");
        assert_eq!(b.failed(false, now, None), Change::None);
        assert_eq!(b.failed(false, now, None), Change::None);
        assert_eq!(b.failed(false, now, None), Change::Opened);
        assert_eq!(b.probe_due(), Some(now + Duration::from_secs(1)));
        assert_eq!(b.failed(false, now, None), Change::None, "late failures change nothing");
        assert_eq!(b.answered(false), Change::None, "nor does a late success: only the probe closes it");
        assert!(!b.is_closed());
        let mut waits = Vec::new();
        for _ in 0..8 {
            let due = b.probe_due().expect("open");
            b.probing();
            assert_eq!(b.state(), State::HalfOpen { probes: waits.len() as u32 });
            assert!(b.probe_due().is_none(), "one probe at a time");
            b.failed(true, due, None);
            waits.push((b.probe_due().expect("open again") - due).as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 64, 64]);
        b.probing();
        assert_eq!(b.answered(false), Change::None, "an older attempt's answer while the probe is out");
        assert_eq!(b.answered(true), Change::Closed);
        assert!(b.is_closed());
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let now = Instant::now();
        let mut b = Breaker::new(0, EXACT);
        for _ in 0..1000 {
            assert_eq!(b.failed(false, now, None), Change::None);
        }
        assert!(b.is_closed());
    }
}
