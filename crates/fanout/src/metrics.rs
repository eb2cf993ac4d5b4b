//! Every metric of the fanout service, declared once with its HELP text (docs/design.md section 8), and the
//! handles the hot path uses so that no metric is looked up by name per attempt.
//!
//! The four series of the original Python service keep their exact names (they are an interface: dashboards and
//! alerts of its users read them). Our own series follow Prometheus naming: `fanout_` prefix, base units, `_total`
//! on counters. Labels come from bounded sets only: `domain`/`backend` is a backend as written in the pool,
//! `route` is the router's matched path, `status` an HTTP status code, `outcome` and `reason` small enums.
//!
//! Each [`Metrics`] owns its own Prometheus registry (no global recorder), so several services can run in one
//! process, as the tests do.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::backend::Outcome;
use crate::breaker::Trip;

/// Successful attempts (`201`) per backend; name and label from the original service.
pub const TARGET_SUCCESS: &str = "target_domain_success_counter_total";
/// Failed attempts (any other outcome) per backend; name and label from the original service.
pub const TARGET_FAILED: &str = "target_domain_failed_counter_total";
/// Sum of [`TARGET_SUCCESS`] over backends; name from the original service.
pub const TOTAL_SUCCESS: &str = "Total_domains_success_counter_total";
/// Sum of [`TARGET_FAILED`] over backends; name from the original service.
pub const TOTAL_FAILED: &str = "Total_domains_failed_counter_total";
/// Client requests answered by the API listener, by route and status.
pub const REQUESTS: &str = "fanout_requests_total";
/// Time to answer a client request, by route.
pub const REQUEST_DURATION: &str = "fanout_request_duration_seconds";
/// Duration of one attempt to one backend, by outcome.
pub const ATTEMPT_DURATION: &str = "fanout_attempt_duration_seconds";
/// Retries scheduled per backend (attempts after the first).
pub const RETRIES: &str = "fanout_retries_total";
/// Deliveries to a backend that gave up, by reason.
pub const DEAD_LETTERS: &str = "fanout_dead_letters_total";
/// Deliveries not yet finished on every backend (pending somewhere, or a dead letter somewhere).
pub const IN_FLIGHT: &str = "fanout_deliveries_in_flight";
/// Entries in a backend's queue (on disk or in memory).
pub const PENDING: &str = "fanout_pending_deliveries";
/// Age of the oldest entry in a backend's queue, in seconds (0 when empty).
pub const OLDEST_PENDING: &str = "fanout_oldest_pending_seconds";
/// Dead letters a backend holds now (they go when redriven).
pub const DEAD_LETTERS_NOW: &str = "fanout_dead_letters";
/// A backend's circuit breaker: 0 closed, 1 open, 2 half-open.
pub const BREAKER_STATE: &str = "fanout_breaker_state";
/// Times a backend's circuit breaker opened, by the rule that opened it (`reason`: `no_answer`, `failure_rate`).
pub const BREAKER_OPENS: &str = "fanout_breaker_opens_total";
/// Retries a backend's retry budget deferred (each counted once however long it waited).
pub const BUDGET_EXHAUSTED: &str = "fanout_retry_budget_exhausted_total";
/// 1 when the backend's last attempt got an HTTP answer, 0 when it failed to connect, timed out or broke.
pub const BACKEND_UP: &str = "fanout_backend_up";
/// Writes refused because `--max-in-flight` deliveries were already running.
pub const REJECTED: &str = "fanout_rejected_writes_total";
/// Bytes of history the write log keeps (gauge).
pub const HISTORY_BYTES: &str = "fanout_history_bytes";
/// Age of the oldest write the history keeps, in seconds (gauge).
pub const HISTORY_OLDEST: &str = "fanout_history_oldest_seconds";
/// Writes a recovering backend still has to catch up with (gauge, per backend; 0 when none).
pub const RECOVERY_REMAINING: &str = "fanout_recovery_remaining";
/// Writes queued again for a backend by recoveries (counter, per backend).
pub const RECOVERED: &str = "fanout_recovered_writes_total";
/// Connections open now, per listener (`api`, `admin`).
pub const CONNECTIONS: &str = "fanout_connections";
/// Connections fanout closed or refused on its own, per listener and reason.
pub const CONNECTIONS_CLOSED: &str = "fanout_connections_closed_total";
/// Writes refused with 503 because the write log could not store them.
pub const STORE_FAILURES: &str = "fanout_store_failures_total";

/// The series of one listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Closed: the headers did not arrive within `--header-timeout`.
    pub header_timeout: Counter,
    /// Closed: idle longer than `--idle-timeout`.
    pub idle_timeout: Counter,
    /// Answered `408` and closed: the body did not arrive within `--body-timeout`.
    pub body_deadline: Counter,
    /// Refused with `503`: the listener held its most connections.
    pub over_limit: Counter,
}

/// Why a delivery to one backend became a dead letter (label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// `--max-attempts` attempts failed transiently.
    Exhausted,
    /// The backend answered with a permanent failure (docs/design.md section 4).
    Rejected,
}

impl DeadLetterReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Exhausted => "exhausted",
            DeadLetterReason::Rejected => "rejected",
        }
    }
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Histogram buckets in seconds, from 1 ms to 30 s (the default `--ack-timeout`).
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The registry of one fanout service and its process-wide series. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    total_success: Counter,
    total_failed: Counter,
    in_flight: Gauge,
    rejected: Counter,
    store_failures: Counter,
    history_bytes: Gauge,
    history_oldest: Gauge,
    /// Handles of `fanout_requests_total` by (route, status) and of the duration histogram by route, registered
    /// on first use: the hot path then reads a map instead of building and hashing a labelled key.
    request_counters: RwLock<HashMap<(&'static str, u16), Counter>>,
    request_durations: RwLock<HashMap<&'static str, Histogram>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric described.
    pub fn new() -> Self {
        let mut builder = PrometheusBuilder::new();
        for name in [REQUEST_DURATION, ATTEMPT_DURATION] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_owned()), LATENCY_BUCKETS)
                .expect("bucket list is not empty");
        }
        let recorder = builder.build_recorder();
        let describe: &[(&'static str, Kind, Option<Unit>, &'static str)] = &[
            (TARGET_SUCCESS, Kind::Counter, None, "Successful attempts (201) per backend."),
            (TARGET_FAILED, Kind::Counter, None, "Failed attempts (any answer but 201, or no answer) per backend."),
            (TOTAL_SUCCESS, Kind::Counter, None, "Successful attempts over all backends."),
            (TOTAL_FAILED, Kind::Counter, None, "Failed attempts over all backends."),
            (REQUESTS, Kind::Counter, None, "Client requests answered, by route and HTTP status."),
            (REQUEST_DURATION, Kind::Histogram, Some(Unit::Seconds), "Time to answer a client request, by route."),
            (
                ATTEMPT_DURATION,
                Kind::Histogram,
                Some(Unit::Seconds),
                "Duration of one attempt, by backend and outcome.",
            ),
            (RETRIES, Kind::Counter, None, "Retries sent per backend (attempts after an entry's first)."),
            (DEAD_LETTERS, Kind::Counter, None, "Deliveries to a backend that gave up, by reason."),
            (IN_FLIGHT, Kind::Gauge, None, "Deliveries not finished on every backend (pending or dead letter)."),
            (PENDING, Kind::Gauge, None, "Entries in a backend's queue, on disk or in memory."),
            (OLDEST_PENDING, Kind::Gauge, Some(Unit::Seconds), "Age of the oldest entry in a backend's queue."),
            (DEAD_LETTERS_NOW, Kind::Gauge, None, "Dead letters a backend holds now (until redriven)."),
            (BREAKER_STATE, Kind::Gauge, None, "A backend's circuit breaker: 0 closed, 1 open, 2 half-open."),
            (
                BREAKER_OPENS,
                Kind::Counter,
                None,
                "Times a backend's circuit breaker opened, by reason (no_answer, failure_rate).",
            ),
            (
                BUDGET_EXHAUSTED,
                Kind::Counter,
                None,
                "Retries deferred (once each) because the backend's retry budget was spent.",
            ),
            (BACKEND_UP, Kind::Gauge, None, "1 if the backend's last attempt got an HTTP answer, else 0."),
            (REJECTED, Kind::Counter, None, "Writes refused with 503 at --max-in-flight or --max-pending."),
            (HISTORY_BYTES, Kind::Gauge, Some(Unit::Bytes), "Bytes of history (accepted writes) the write log keeps."),
            (HISTORY_OLDEST, Kind::Gauge, Some(Unit::Seconds), "Age of the oldest write the history keeps."),
            (
                RECOVERY_REMAINING,
                Kind::Gauge,
                None,
                "Writes a recovering backend still has to catch up with (0 when it is not recovering).",
            ),
            (RECOVERED, Kind::Counter, None, "Writes queued again for a backend by recoveries."),
            (CONNECTIONS, Kind::Gauge, None, "Connections open now, per listener (api, admin)."),
            (
                CONNECTIONS_CLOSED,
                Kind::Counter,
                None,
                "Connections closed or refused by fanout, per listener and reason (header_timeout, idle_timeout, \
                 body_deadline, over_limit).",
            ),
            (
                STORE_FAILURES,
                Kind::Counter,
                None,
                "Writes refused with 503 because the write log could not store them.",
            ),
        ];
        for (name, kind, unit, help) in describe {
            let key = KeyName::from_const_str(name);
            let help = SharedString::const_str(help);
            match kind {
                Kind::Counter => recorder.describe_counter(key, *unit, help),
                Kind::Gauge => recorder.describe_gauge(key, *unit, help),
                Kind::Histogram => recorder.describe_histogram(key, *unit, help),
            }
        }
        let handle = recorder.handle();
        let inner = Inner {
            total_success: recorder.register_counter(&Key::from_static_name(TOTAL_SUCCESS), &METADATA),
            total_failed: recorder.register_counter(&Key::from_static_name(TOTAL_FAILED), &METADATA),
            in_flight: recorder.register_gauge(&Key::from_static_name(IN_FLIGHT), &METADATA),
            rejected: recorder.register_counter(&Key::from_static_name(REJECTED), &METADATA),
            store_failures: recorder.register_counter(&Key::from_static_name(STORE_FAILURES), &METADATA),
            history_bytes: recorder.register_gauge(&Key::from_static_name(HISTORY_BYTES), &METADATA),
            history_oldest: recorder.register_gauge(&Key::from_static_name(HISTORY_OLDEST), &METADATA),
            request_counters: RwLock::default(),
            request_durations: RwLock::default(),
            recorder,
            handle,
        };
        // Zero-valued series exist from the start, so dashboards and `rate()` see them before any traffic.
        inner.total_success.increment(0);
        inner.total_failed.increment(0);
        inner.in_flight.set(0.0);
        inner.rejected.increment(0);
        inner.store_failures.increment(0);
        inner.history_bytes.set(0.0);
        inner.history_oldest.set(0.0);
        Self { inner: Arc::new(inner) }
    }

    /// The handles of one backend; call once per backend at start.
    pub fn backend(&self, label: &str) -> BackendMetrics {
        let r = &self.inner.recorder;
        let with = |name: &'static str, key: &'static str, extra: Option<(&'static str, &'static str)>| {
            let mut labels = vec![Label::new(key, label.to_owned())];
            if let Some((k, v)) = extra {
                labels.push(Label::new(k, v));
            }
            Key::from_parts(name, labels)
        };
        let attempt = |outcome: &'static str| {
            r.register_histogram(&with(ATTEMPT_DURATION, "backend", Some(("outcome", outcome))), &METADATA)
        };
        let m = BackendMetrics {
            success: r.register_counter(&with(TARGET_SUCCESS, "domain", None), &METADATA),
            failed: r.register_counter(&with(TARGET_FAILED, "domain", None), &METADATA),
            total_success: self.inner.total_success.clone(),
            total_failed: self.inner.total_failed.clone(),
            retries: r.register_counter(&with(RETRIES, "backend", None), &METADATA),
            dead_exhausted: r
                .register_counter(&with(DEAD_LETTERS, "backend", Some(("reason", "exhausted"))), &METADATA),
            dead_rejected: r.register_counter(&with(DEAD_LETTERS, "backend", Some(("reason", "rejected"))), &METADATA),
            pending: r.register_gauge(&with(PENDING, "backend", None), &METADATA),
            oldest_pending: r.register_gauge(&with(OLDEST_PENDING, "backend", None), &METADATA),
            dead_letters: r.register_gauge(&with(DEAD_LETTERS_NOW, "backend", None), &METADATA),
            breaker_state: r.register_gauge(&with(BREAKER_STATE, "backend", None), &METADATA),
            opens_no_answer: r
                .register_counter(&with(BREAKER_OPENS, "backend", Some(("reason", "no_answer"))), &METADATA),
            opens_failure_rate: r
                .register_counter(&with(BREAKER_OPENS, "backend", Some(("reason", "failure_rate"))), &METADATA),
            budget_exhausted: r.register_counter(&with(BUDGET_EXHAUSTED, "backend", None), &METADATA),
            up: r.register_gauge(&with(BACKEND_UP, "backend", None), &METADATA),
            recovery_remaining: r.register_gauge(&with(RECOVERY_REMAINING, "backend", None), &METADATA),
            recovered: r.register_counter(&with(RECOVERED, "backend", None), &METADATA),
            attempt_duration: Outcome::LABELS.map(attempt),
        };
        m.success.increment(0);
        m.failed.increment(0);
        m.retries.increment(0);
        m.dead_exhausted.increment(0);
        m.dead_rejected.increment(0);
        m.pending.set(0.0);
        m.oldest_pending.set(0.0);
        m.dead_letters.set(0.0);
        m.breaker_state.set(0.0);
        m.opens_no_answer.increment(0);
        m.opens_failure_rate.increment(0);
        m.budget_exhausted.increment(0);
        m.recovery_remaining.set(0.0);
        m.recovered.increment(0);
        m
    }

    /// Counts one answered client request. `route` is one of the router's routes (a bounded set).
    pub fn request(&self, route: &'static str, status: u16, elapsed: Duration) {
        let inner = &*self.inner;
        let counter = cached(&inner.request_counters, (route, status), || {
            let labels = vec![Label::new("route", route), Label::new("status", status.to_string())];
            inner.recorder.register_counter(&Key::from_parts(REQUESTS, labels), &METADATA)
        });
        counter.increment(1);
        let histogram = cached(&inner.request_durations, route, || {
            let labels = vec![Label::new("route", route)];
            inner.recorder.register_histogram(&Key::from_parts(REQUEST_DURATION, labels), &METADATA)
        });
        histogram.record(elapsed.as_secs_f64());
    }

    /// The gauge of deliveries in flight.
    pub fn in_flight(&self) -> &Gauge {
        &self.inner.in_flight
    }

    /// Sets the history gauges: `bytes` kept, the oldest write accepted at `oldest_ms` (ms since the epoch).
    pub fn history(&self, bytes: u64, oldest_ms: Option<u64>, now_ms: u64) {
        self.inner.history_bytes.set(bytes as f64);
        let age = oldest_ms.map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
        self.inner.history_oldest.set(age);
    }

    /// The handles of one listener (`listener`: `api` or `admin`).
    pub fn listener(&self, listener: &'static str) -> ListenerMetrics {
        let r = &self.inner.recorder;
        let closed = |reason: &'static str| {
            let labels = vec![Label::new("listener", listener), Label::new("reason", reason)];
            let c = r.register_counter(&Key::from_parts(CONNECTIONS_CLOSED, labels), &METADATA);
            c.increment(0);
            c
        };
        let open = r.register_gauge(&Key::from_parts(CONNECTIONS, vec![Label::new("listener", listener)]), &METADATA);
        open.set(0.0);
        ListenerMetrics {
            open,
            header_timeout: closed("header_timeout"),
            idle_timeout: closed("idle_timeout"),
            body_deadline: closed("body_deadline"),
            over_limit: closed("over_limit"),
        }
    }

    /// Counts one write refused because the write log could not store it.
    pub fn store_failure(&self) {
        self.inner.store_failures.increment(1);
    }

    /// Counts one write refused at the in-flight bound.
    pub fn rejected(&self) {
        self.inner.rejected.increment(1);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.inner.handle.render()
    }

    /// Drains histogram buffers; the service calls it on an interval (the exporter does not on its own).
    pub fn run_upkeep(&self) {
        self.inner.handle.run_upkeep();
    }
}

/// The handle under `key`, registered with `register` the first time.
fn cached<K: Eq + std::hash::Hash + Copy, H: Clone>(
    map: &RwLock<HashMap<K, H>>,
    key: K,
    register: impl FnOnce() -> H,
) -> H {
    if let Some(h) = map.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return h.clone();
    }
    map.write().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert_with(register).clone()
}

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The series of one backend, registered once. Cheap to clone.
#[derive(Clone)]
pub struct BackendMetrics {
    success: Counter,
    failed: Counter,
    total_success: Counter,
    total_failed: Counter,
    retries: Counter,
    dead_exhausted: Counter,
    dead_rejected: Counter,
    pending: Gauge,
    oldest_pending: Gauge,
    dead_letters: Gauge,
    breaker_state: Gauge,
    opens_no_answer: Counter,
    opens_failure_rate: Counter,
    budget_exhausted: Counter,
    up: Gauge,
    recovery_remaining: Gauge,
    recovered: Counter,
    attempt_duration: [Histogram; Outcome::LABELS.len()],
}

impl BackendMetrics {
    /// Records one finished attempt: the original's success/failed counters, its duration, and `backend_up`.
    pub fn attempt(&self, outcome: Outcome, elapsed: Duration) {
        if outcome == Outcome::Success {
            self.success.increment(1);
            self.total_success.increment(1);
        } else {
            self.failed.increment(1);
            self.total_failed.increment(1);
        }
        self.up.set(if outcome.got_answer() { 1.0 } else { 0.0 });
        self.attempt_duration[outcome.index()].record(elapsed.as_secs_f64());
    }

    /// The gauge of the age of the oldest queue entry.
    pub fn oldest_pending(&self) -> &Gauge {
        &self.oldest_pending
    }

    /// The gauge of dead letters held now.
    pub fn dead_letters(&self) -> &Gauge {
        &self.dead_letters
    }

    /// The gauge of the breaker's state.
    pub fn breaker_state(&self) -> &Gauge {
        &self.breaker_state
    }

    /// Counts one opening of the breaker, by the rule that opened it.
    pub fn breaker_opened(&self, trip: Trip) {
        match trip {
            Trip::NoAnswer => self.opens_no_answer.increment(1),
            Trip::FailureRate { .. } => self.opens_failure_rate.increment(1),
        }
    }

    /// Counts one retry deferred by the retry budget.
    pub fn budget_exhausted(&self) {
        self.budget_exhausted.increment(1);
    }

    /// Counts one retry sent.
    pub fn retry(&self) {
        self.retries.increment(1);
    }

    /// Counts one dead letter.
    pub fn dead_letter(&self, reason: DeadLetterReason) {
        match reason {
            DeadLetterReason::Exhausted => self.dead_exhausted.increment(1),
            DeadLetterReason::Rejected => self.dead_rejected.increment(1),
        }
    }

    /// The gauge of writes a recovery still has to bring this backend.
    pub fn recovery_remaining(&self) -> &Gauge {
        &self.recovery_remaining
    }

    /// Counts writes queued again by a recovery.
    pub fn recovered(&self, n: u64) {
        self.recovered.increment(n);
    }

    /// The gauge of entries in this backend's queue.
    pub fn pending(&self) -> &Gauge {
        &self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of one sample line `name{labels} value`, or of `name value` when `labels` is empty.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn original_series_keep_their_names_and_sum() {
        let m = Metrics::new();
        let a = m.backend("server1:8080");
        let b = m.backend("server2:8080");
        a.attempt(Outcome::Success, Duration::from_millis(3));
        a.attempt(Outcome::Status5xx, Duration::from_millis(3));
        a.attempt(Outcome::Status5xx, Duration::from_millis(3));
        b.attempt(Outcome::Success, Duration::from_millis(3));
        b.attempt(Outcome::Timeout, Duration::from_millis(3));
        let text = m.render();
        assert_eq!(sample(&text, r#"target_domain_success_counter_total{domain="server1:8080"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"target_domain_failed_counter_total{domain="server1:8080"}"#), Some(2.0));
        assert_eq!(sample(&text, r#"target_domain_failed_counter_total{domain="server2:8080"}"#), Some(1.0));
        assert_eq!(sample(&text, "Total_domains_success_counter_total"), Some(2.0));
        assert_eq!(sample(&text, "Total_domains_failed_counter_total"), Some(3.0));
        assert_eq!(sample(&text, r#"fanout_backend_up{backend="server2:8080"}"#), Some(0.0));
        assert!(text.contains("# HELP target_domain_success_counter_total"), "{text}");
        assert!(
            text.contains(
                r#"fanout_attempt_duration_seconds_bucket{backend="server1:8080",outcome="status_5xx",le="0.005"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn request_series_are_labelled_by_route_and_status() {
        let m = Metrics::new();
        m.request("/register", 201, Duration::from_millis(2));
        m.request("/register", 201, Duration::from_millis(2));
        m.request("/register", 413, Duration::from_millis(1));
        let text = m.render();
        assert_eq!(sample(&text, r#"fanout_requests_total{route="/register",status="201"}"#), Some(2.0));
        assert_eq!(sample(&text, r#"fanout_requests_total{route="/register",status="413"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"fanout_request_duration_seconds_count{route="/register"}"#), Some(3.0));
    }
}
