//! This instance's delivery workers on the NATS store: for each backend, one task per partition pulls that
//! partition's consumer one write at a time, attempts it, and settles it on the stream (the module doc of
//! [`crate::jetstream`] gives the order argument).
//!
//! # Attempts, retries, dead letters
//! A delivered write is acked and its result sent to the instance whose client waits. A permanent refusal, or
//! `--max-attempts` transient failures, copies the write to `FANOUT_DEAD` and acks it. Any other transient
//! failure NAKs it with the backoff (or the backend's `Retry-After`) as the redelivery delay; the attempts made so
//! far are kept in the delivery's part in `fanout-deliveries`, so that they count whichever instance makes them.
//!
//! # Breaker
//! Each instance keeps one [`Breaker`] per backend, fed by its own attempts. While it is open this instance
//! stops pulling the backend's consumers: one task at a time, when the probe is due, pulls one write and
//! attempts it as the probe (a failure judged by the breaker NAKs its write to the next probe and uses up no
//! attempt). A probe that finds nothing to send in its partition hands the probe to the next task shortly after.
//!
//! # Recovery
//! [`recover`] deletes a backend's consumers and makes them again from the time asked: the stream hands that
//! backend every write since then again, partition by partition in stream order, and the other backends'
//! consumers are not touched. Redriven writes carry `only` (the one backend that takes them); the others ack
//! them unseen.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Cluster, DeadMsg, OutcomeMsg, Part, PartState, WriteMsg, backend_hash, consumer_name};
use crate::attempt::Transport;
use crate::backend::{BackendAddr, Outcome};
use crate::breaker::{Breaker, Change, Failure, State, Trip};
use crate::log::{DeadRow, LogError, StoredDelivery, now_ms, rfc3339_ms};
use crate::metrics::{BackendMetrics, DeadLetterReason};
use crate::queue::{BackendStatus, LastError, RecoveryStatus};
use crate::ratelog::Every;

/// How long one pull waits for a write before asking again.
const FETCH_WAIT: Duration = Duration::from_secs(2);
/// How long past its expiry a pull is waited for before it is given up (its server may have died).
const PULL_GRACE: Duration = Duration::from_secs(3);
/// The wait before a task tries its consumer again after the store failed.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// How soon the next task may probe after a probe found nothing to send.
const PROBE_HANDOFF: Duration = Duration::from_millis(200);

static STORE_FAILED: Every = Every::new();
static RETRIES: Every = Every::new();
static DEAD_LETTERS: Every = Every::new();

/// A recovery this instance started.
#[derive(Debug, Clone)]
pub struct RecoveryRun {
    since_ms: u64,
    started_ms: u64,
    total: u64,
    history_from: Option<u64>,
}

/// What this instance's workers did on one backend lately, for the console ([`status`]).
#[derive(Default)]
struct Activity {
    attempts: u64,
    in_flight: usize,
    last_error: Option<LastError>,
    last_success_ms: Option<u64>,
    /// (when, attempts by then), at most one per [`STATUS_MARK`], over the last [`RATE_WINDOW`].
    marks: VecDeque<(Instant, u64)>,
}

/// The window of [`BackendStatus::attempts_per_sec`].
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How often a mark of the attempt count is kept for the rate.
const STATUS_MARK: Duration = Duration::from_secs(1);

/// One backend's workers on this instance: its breaker, shared by its partition tasks.
pub(crate) struct Backend {
    cluster: Arc<Cluster>,
    addr: BackendAddr,
    label: Arc<str>,
    hash: String,
    metrics: BackendMetrics,
    transport: Arc<dyn Transport>,
    breaker: Mutex<Breaker>,
    /// Bumped on every breaker change, so that waiting tasks look again.
    changed: watch::Sender<u64>,
    activity: Mutex<Activity>,
}

impl Backend {
    /// This backend as the console shows it: this instance's breaker, attempts and last error; the lag and the
    /// dead letters (`pending`, `dead_letters`) are the store's, as of the last read ([`super::Cluster`] reads
    /// them every 2 s). The oldest pending write's age is not known here (0).
    pub(crate) fn status(&self, pending: u64, dead_letters: u64) -> BackendStatus {
        let now = Instant::now();
        let breaker = match crate::lock(&self.breaker).state() {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        };
        let mut a = crate::lock(&self.activity);
        while a.marks.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > RATE_WINDOW) {
            a.marks.pop_front();
        }
        if a.marks.back().is_none_or(|(at, _)| now.saturating_duration_since(*at) >= STATUS_MARK) {
            let attempts = a.attempts;
            a.marks.push_back((now, attempts));
        }
        let rate = match a.marks.front() {
            Some(&(since, base)) if now > since => (a.attempts - base) as f64 / (now - since).as_secs_f64(),
            _ => 0.0,
        };
        BackendStatus {
            backend: self.label.clone(),
            breaker,
            pending,
            in_flight: a.in_flight,
            dead_letters,
            oldest_pending_seconds: 0.0,
            attempts_per_sec: (rate * 10.0).round() / 10.0,
            attempts: a.attempts,
            last_error: a.last_error.clone(),
            last_success_at: a.last_success_ms.map(rfc3339_ms),
        }
    }
}

/// The pull consumer settings of backend `label`'s partition `p`, handing out writes from `deliver_policy` on.
pub(crate) fn consumer_config(
    cluster_attempt_timeout: Duration,
    label: &str,
    p: u32,
    deliver_policy: consumer::DeliverPolicy,
) -> consumer::pull::Config {
    let name = consumer_name(&backend_hash(label), p);
    consumer::pull::Config {
        durable_name: Some(name),
        description: Some(format!("fanout: backend {label}, partition {p}")),
        deliver_policy,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: cluster_attempt_timeout + super::ACK_MARGIN,
        max_deliver: -1,
        filter_subject: format!("fanout.writes.{p}"),
        max_ack_pending: 1,
        max_waiting: 512,
        ..Default::default()
    }
}

/// Starts this instance's partition tasks for every backend; returns them and the backends' handles (pool order).
pub(crate) fn start(cluster: &Arc<Cluster>, transport: Arc<dyn Transport>) -> (Vec<JoinHandle<()>>, Vec<Arc<Backend>>) {
    let mut tasks = Vec::new();
    let mut backends = Vec::new();
    for (i, addr) in cluster.dispatch.pool.iter().enumerate() {
        let backend = Arc::new(Backend {
            cluster: cluster.clone(),
            addr: addr.clone(),
            label: cluster.labels[i].clone(),
            hash: cluster.hashes[i].clone(),
            metrics: cluster.backend_metrics[i].clone(),
            transport: transport.clone(),
            breaker: Mutex::new(Breaker::new(cluster.dispatch.queue.breaker(cluster.dispatch.backoff))),
            changed: watch::channel(0).0,
            activity: Mutex::new(Activity::default()),
        });
        backends.push(backend.clone());
        backend.metrics.breaker_state().set(0.0);
        for p in 0..cluster.settings.partitions {
            tasks.push(tokio::spawn(backend.clone().run(p, cluster.stop.subscribe())));
        }
    }
    (tasks, backends)
}

impl Backend {
    /// Pulls partition `p` until the instance stops.
    async fn run(self: Arc<Self>, p: u32, mut stop: watch::Receiver<bool>) {
        let name = consumer_name(&self.hash, p);
        let mut consumer: Option<PullConsumer> = None;
        let mut changes = self.changed.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let Some(probe) = self.gate(&mut changes, &mut stop).await else { return };
            let c = match &consumer {
                Some(c) => c.clone(),
                None => match self.cluster.writes.get_consumer::<consumer::pull::Config>(&name).await {
                    Ok(c) => {
                        consumer = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        self.store_failed(probe, "finding its consumer", &e);
                        if !pause(STORE_RETRY, &mut stop).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let fetched = c.fetch().max_messages(1).expires(FETCH_WAIT).messages().await;
            let mut batch = match fetched {
                Ok(batch) => batch,
                Err(e) => {
                    consumer = None;
                    self.store_failed(probe, "pulling its consumer", &e);
                    if !pause(STORE_RETRY, &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            // The server ends a pull at its expiry; a pull held by a server that died is never ended, so this
            // task gives up on it a little later on its own.
            let next = tokio::select! {
                next = tokio::time::timeout(FETCH_WAIT + PULL_GRACE, batch.next()) => match next {
                    Ok(next) => next,
                    Err(_) => {
                        consumer = None;
                        if probe {
                            self.probe_unused();
                        }
                        continue;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            match next {
                Some(Ok(msg)) => self.handle(msg, probe).await,
                Some(Err(e)) => {
                    consumer = None;
                    self.store_failed(probe, "pulling its consumer", &e);
                    if !pause(STORE_RETRY, &mut stop).await {
                        return;
                    }
                }
                None => {
                    if probe {
                        self.probe_unused();
                    }
                }
            }
        }
    }

    fn store_failed(&self, probe: bool, what: &str, e: &dyn std::fmt::Display) {
        if probe {
            self.probe_unused();
        }
        if let Some(n) = STORE_FAILED.hit() {
            tracing::warn!(backend = %self.addr, error = %e, n, "NATS store: {what} failed; trying again");
        }
    }

    /// Waits until this task may pull: `Some(false)` while the breaker is closed, `Some(true)` when it is open and
    /// this task won the due probe, `None` when the instance stops.
    async fn gate(&self, changes: &mut watch::Receiver<u64>, stop: &mut watch::Receiver<bool>) -> Option<bool> {
        loop {
            let due = {
                let mut breaker = crate::lock(&self.breaker);
                if breaker.is_closed() {
                    return Some(false);
                }
                match breaker.probe_due() {
                    Some(due) if due <= Instant::now() => {
                        breaker.probing();
                        self.metrics.breaker_state().set(breaker.state().code());
                        return Some(true);
                    }
                    Some(due) => due,
                    // Half-open: another task's probe is on the wire.
                    None => Instant::now() + Duration::from_secs(1),
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = changes.changed() => {}
                _ = stop.wait_for(|s| *s) => return None,
            }
        }
    }

    /// The probe found nothing to send: the next task may probe shortly.
    fn probe_unused(&self) {
        let mut breaker = crate::lock(&self.breaker);
        breaker.probe_unused(Instant::now() + PROBE_HANDOFF);
        self.metrics.breaker_state().set(breaker.state().code());
        drop(breaker);
        self.changed.send_modify(|n| *n += 1);
    }

    fn breaker_changed(&self, change: Change) {
        let state = crate::lock(&self.breaker).state();
        self.metrics.breaker_state().set(state.code());
        match change {
            Change::None => {}
            Change::Opened(trip) => {
                self.metrics.breaker_opened(trip);
                let reason = match trip {
                    Trip::NoAnswer => "consecutive attempts got no answer",
                    Trip::FailureRate { .. } => "the failure rate passed --breaker-failure-rate",
                };
                tracing::warn!(
                    backend = %self.addr,
                    reason = trip.as_str(),
                    "backend down ({reason}): breaker open, this instance stops pulling its writes and probes it"
                );
            }
            Change::Closed => {
                tracing::info!(backend = %self.addr, "backend up: breaker closed, this instance pulls its writes again");
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Attempts one write handed out by the consumer, and settles it.
    async fn handle(&self, msg: Message, probe: bool) {
        let cluster = &self.cluster;
        let (seq, delivered) = msg.info().map_or((0, 0), |i| (i.stream_sequence, i.delivered));
        let write = match postcard::from_bytes::<WriteMsg>(&msg.payload) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(seq, error = %e, "a message of the writes stream does not decode: skipped");
                let _ = msg.ack_with(AckKind::Term).await;
                return self.after_unsent(probe);
            }
        };
        if write.only.as_deref().is_some_and(|only| only != &*self.label) {
            let _ = msg.ack().await;
            return self.after_unsent(probe);
        }
        let record: StoredDelivery = match cluster.open_value(write.id, &write.write) {
            Ok(r) => r,
            Err(e) => {
                // A key missing from --encryption-key-file: keep it for an instance that has it.
                if let Some(n) = STORE_FAILED.hit() {
                    tracing::error!(backend = %self.addr, error = %e, n, "a write cannot be opened: left for later");
                }
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(30)))).await;
                return self.after_unsent(probe);
            }
        };
        if !probe {
            // The breaker opened while this task waited for the write: it goes back until the next probe.
            let due = crate::lock(&self.breaker).probe_due();
            if let Some(due) =
                due.or_else(|| (!crate::lock(&self.breaker).is_closed()).then(|| Instant::now() + PROBE_HANDOFF))
            {
                let _ = msg.ack_with(AckKind::Nak(Some(due.saturating_duration_since(Instant::now())))).await;
                return;
            }
        }
        // Handed out for the first time, and not a redrive (which has a part of its own).
        let first = delivered == 1 && write.only.is_none();
        let Some(request) = record.to_request() else {
            tracing::error!(seq, "a stored write is not valid HTTP any more: skipped");
            let _ = msg.ack_with(AckKind::Term).await;
            return self.after_unsent(probe);
        };
        let started = Instant::now();
        crate::lock(&self.activity).in_flight += 1;
        let result = self.transport.send(&self.addr, Arc::new(request)).await;
        let now = Instant::now();
        self.metrics.attempt(result.outcome, now - started);
        {
            let mut a = crate::lock(&self.activity);
            a.in_flight -= 1;
            a.attempts += 1;
            if result.outcome == Outcome::Success {
                a.last_success_ms = Some(now_ms());
            } else {
                a.last_error = Some(LastError {
                    outcome: result.outcome.as_str(),
                    status: result.answer.as_ref().map(|x| x.status.as_u16()),
                    at: rfc3339_ms(now_ms()),
                });
            }
        }
        let status = result.answer.as_ref().map(|a| a.status.as_u16());
        let hash = &self.hash;
        match result.outcome {
            Outcome::Success | Outcome::Rejected => {
                let change = crate::lock(&self.breaker).answered(probe, now);
                self.breaker_changed(change);
                let prior = self.prior_attempts(write.id, first).await;
                let attempts = prior + 1;
                if result.outcome == Outcome::Success {
                    if let Err(e) = msg.double_ack().await {
                        // Not acked: the write comes again after ack_wait, and its Idempotency-Key makes the
                        // backend ignore it.
                        tracing::debug!(error = %e, "an ack was not confirmed");
                    }
                    // A first attempt that delivered leaves no part: the consumer's ack floor says it (see
                    // `Cluster::lookup`), which saves a replicated write per backend per write.
                    if !first {
                        let part = Part {
                            state: PartState::Delivered,
                            attempts,
                            status,
                            outcome: Some(Outcome::Success.as_str().to_owned()),
                            reason: None,
                            next_attempt_ms: None,
                        };
                        cluster.put_part(write.id, hash, &part).await;
                    }
                    self.tell_origin(&write, true, attempts, None, result.answer);
                } else {
                    self.dead_letter(
                        msg,
                        write,
                        attempts,
                        DeadLetterReason::Rejected,
                        Outcome::Rejected,
                        result.answer,
                    )
                    .await;
                }
            }
            outcome => {
                let kind = if outcome.got_answer() { Failure::Answered } else { Failure::NoAnswer };
                let (change, closed_before, next_probe) = {
                    let mut breaker = crate::lock(&self.breaker);
                    let closed_before = breaker.is_closed();
                    let change = breaker.failed(probe, kind, now, result.retry_after);
                    (change, closed_before, breaker.probe_due())
                };
                self.breaker_changed(change);
                // A failure that opened the breaker, or came while it was open, was the backend's, not the write's.
                let counted = closed_before && !probe && !matches!(change, Change::Opened(_));
                let prior = self.prior_attempts(write.id, first).await;
                let attempts = if counted { prior + 1 } else { prior };
                if counted && attempts >= cluster.dispatch.max_attempts {
                    self.dead_letter(msg, write, attempts, DeadLetterReason::Exhausted, outcome, result.answer).await;
                    return;
                }
                let delay = match next_probe {
                    Some(due) => due.saturating_duration_since(now),
                    None => cluster.dispatch.backoff.delay_with_hint(
                        attempts.saturating_sub(1),
                        result.retry_after,
                        &mut rand::rng(),
                    ),
                };
                if counted {
                    self.metrics.retry();
                }
                if let Some(n) = RETRIES.hit() {
                    tracing::debug!(backend = %self.addr, outcome = outcome.as_str(), n, "attempt failed: retried later");
                }
                let part = Part {
                    state: PartState::Pending,
                    attempts,
                    status,
                    outcome: Some(outcome.as_str().to_owned()),
                    reason: None,
                    next_attempt_ms: Some(now_ms() + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
                };
                cluster.put_part(write.id, hash, &part).await;
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }

    /// A write this task pulled but did not attempt: a probe that sent nothing hands over.
    fn after_unsent(&self, probe: bool) {
        if probe {
            self.probe_unused();
        }
    }

    /// Attempts made so far on this backend, from the delivery's part (any instance may have made them); none
    /// on the write's `first` delivery (nothing was attempted, and no part read).
    async fn prior_attempts(&self, id: u128, first: bool) -> u32 {
        if first {
            return 0;
        }
        match self.cluster.deliveries.get(format!("{id:032x}.{}", self.hash)).await {
            Ok(Some(bytes)) => postcard::from_bytes::<Part>(&bytes)
                .ok()
                .filter(|p| p.state == PartState::Pending)
                .map_or(0, |p| p.attempts),
            _ => 0,
        }
    }

    /// Copies the write to the backend's dead letters, then acks it (so it is never in neither place).
    async fn dead_letter(
        &self,
        msg: Message,
        write: WriteMsg,
        attempts: u32,
        reason: DeadLetterReason,
        outcome: Outcome,
        answer: Option<crate::attempt::Answer>,
    ) {
        let cluster = &self.cluster;
        // The copy may take the store a while (it is tried again through a failover): the server is told the
        // write is still being worked on, so that it is not handed to another instance meanwhile.
        let _ = msg.ack_with(AckKind::Progress).await;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let status = answer.as_ref().map(|a| a.status.as_u16());
        let row = DeadRow {
            id: write.id,
            attempts,
            reason: reason.as_str().to_owned(),
            last_status: status,
            last_outcome: Some(outcome.as_str().to_owned()),
            at_ms: now_ms(),
        };
        let id = write.id;
        let origin = write.origin.clone();
        let only = write.only.clone();
        let dead = DeadMsg { write, backend: self.label.to_string(), row };
        let published = match postcard::to_stdvec(&dead) {
            Ok(payload) => {
                let msg_id = format!("{id:032x}.{}.{seq}", self.hash);
                cluster.publish_patiently(format!("fanout.dead.{}", self.hash), msg_id, payload.into()).await
            }
            Err(e) => Err(LogError::from(e)),
        };
        if let Err(e) = published {
            self.store_failed(false, "storing a dead letter", &e);
            let _ = msg.ack_with(AckKind::Nak(Some(STORE_RETRY))).await;
            return;
        }
        let _ = msg.double_ack().await;
        self.metrics.dead_letter(reason);
        if let Some(n) = DEAD_LETTERS.hit() {
            tracing::warn!(
                backend = %self.addr,
                reason = reason.as_str(),
                attempts,
                n,
                "a write became a dead letter (GET /dead-letters on the admin port)"
            );
        }
        let part = Part {
            state: PartState::DeadLetter,
            attempts,
            status,
            outcome: Some(outcome.as_str().to_owned()),
            reason: Some(reason.as_str().to_owned()),
            next_attempt_ms: None,
        };
        cluster.put_part(id, &self.hash, &part).await;
        if only.is_none() {
            let w = WriteMsg { id, origin, only: None, write: super::Stored::Plain(Vec::new()) };
            self.tell_origin(&w, false, attempts, Some(reason), answer);
        }
    }

    /// Sends this backend's result to the instance whose client waits (at most once: a lost one makes that
    /// client's answer a `202` at its ack timeout).
    fn tell_origin(
        &self,
        write: &WriteMsg,
        delivered: bool,
        attempts: u32,
        reason: Option<DeadLetterReason>,
        answer: Option<crate::attempt::Answer>,
    ) {
        if write.only.is_some() || write.origin.is_empty() {
            return;
        }
        let (status, content_type, body) = match answer {
            Some(a) => (
                Some(a.status.as_u16()),
                a.content_type.and_then(|v| v.to_str().ok().map(str::to_owned)),
                a.body.to_vec(),
            ),
            None => (None, None, Vec::new()),
        };
        let outcome = OutcomeMsg {
            id: write.id,
            backend: self.label.to_string(),
            delivered,
            attempts,
            reason: reason.map(|r| r.as_str().to_owned()),
            status,
            content_type,
            body,
        };
        if let Ok(payload) = postcard::to_stdvec(&outcome) {
            let client = self.cluster.client.clone();
            let subject = format!("fanout.outcomes.{}", write.origin);
            tokio::spawn(async move {
                let _ = client.publish(subject, payload.into()).await;
            });
        }
    }
}

/// Sleeps `wait` unless the instance stops first (then false).
async fn pause(wait: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Every consumer of the writes stream, with its lag.
pub(crate) async fn consumer_infos(cluster: &Cluster) -> Result<Vec<consumer::Info>, LogError> {
    let mut list = cluster.writes.consumers();
    let mut out = Vec::new();
    while let Some(info) = list.next().await {
        out.push(info.map_err(|e| super::nats_error("listing the consumers", e))?);
    }
    Ok(out)
}

/// Deletes the oldest writes of the history while both hold: no consumer still needs them (each consumer with
/// work left pins everything after its ack floor), and they are older than `--history-window` or the stream is
/// past three quarters of `--history-max-bytes`. So the bounds never drop a write a backend still needs; a
/// stream full of needed writes refuses new ones (`503`) instead.
pub(crate) async fn trim_history(cluster: &Cluster) -> Result<(), LogError> {
    let infos = consumer_infos(cluster).await?;
    let info = cluster.writes.get_info().await.map_err(|e| super::nats_error("reading the stream", e))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    if info.state.messages == 0 {
        return Ok(());
    }
    let mut needed_from = last + 1;
    for c in &infos {
        if c.num_pending > 0 || c.num_ack_pending > 0 {
            needed_from = needed_from.min(c.ack_floor.stream_sequence + 1);
        }
    }
    let full = info.state.bytes.saturating_mul(4) > cluster.settings.history_max_bytes.saturating_mul(3);
    let bound = if full {
        needed_from
    } else {
        let window_ms = u64::try_from(cluster.settings.history_window.as_millis()).unwrap_or(u64::MAX);
        let cutoff_ms = now_ms().saturating_sub(window_ms);
        needed_from.min(first_newer_than(cluster, first, last, cutoff_ms).await?)
    };
    if bound > first {
        cluster.writes.purge().sequence(bound).await.map_err(|e| super::nats_error("trimming the history", e))?;
    }
    Ok(())
}

/// The first sequence in `[first, last]` stored at or after `cutoff_ms` (`last + 1` when none), by bisection
/// over direct gets.
async fn first_newer_than(cluster: &Cluster, first: u64, last: u64, cutoff_ms: u64) -> Result<u64, LogError> {
    let (mut lo, mut hi) = (first, last + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let msg = match cluster.writes.direct_get_next_for_subject("fanout.writes.>", Some(mid)).await {
            Ok(m) => m,
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                hi = mid;
                continue;
            }
            Err(e) => return Err(super::nats_error("reading the history", e)),
        };
        let at_ms = u64::try_from(msg.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        if at_ms >= cutoff_ms {
            hi = mid;
        } else {
            lo = msg.sequence + 1;
        }
    }
    Ok(lo)
}

/// Recovers backend `label`: its consumers are made again, handing out every write stored since `since_ms`,
/// in stream order per partition (see the module doc). Other instances pulling them pick up the new ones.
pub(crate) async fn recover(cluster: &Cluster, label: &str, since_ms: u64) -> Result<RecoveryStatus, LogError> {
    let info = cluster.writes.get_info().await.map_err(|e| super::nats_error("reading the stream", e))?;
    let since_seq = first_newer_than(cluster, info.state.first_sequence, info.state.last_sequence, since_ms).await?;
    let hash = backend_hash(label);
    for p in 0..cluster.settings.partitions {
        let name = consumer_name(&hash, p);
        // The new consumer starts at the first write since `since_ms`, or earlier where the old one still had
        // writes to hand out: a recovery adds writes, it never drops one the backend was waiting for. The wait
        // another instance raised is kept (see `Cluster::start`).
        let old = cluster.writes.consumer_info(&name).await.ok();
        let start = match &old {
            Some(c) => since_seq.min(c.ack_floor.stream_sequence + 1),
            None => since_seq,
        }
        .max(1);
        let _ = cluster.writes.delete_consumer(&name).await;
        let mut config = consumer_config(
            cluster.dispatch.attempt_timeout,
            label,
            p,
            consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
        );
        config.ack_wait = config.ack_wait.max(old.map(|c| c.config.ack_wait).unwrap_or_default());
        cluster.writes.create_consumer(config).await.map_err(|e| super::nats_error("making a recovery consumer", e))?;
    }
    let history_from = crate::lock(&cluster.history).oldest_ms;
    let total = backend_lag(cluster, &hash).await.unwrap_or(0);
    let run = RecoveryRun { since_ms, started_ms: now_ms(), total, history_from };
    crate::lock(&cluster.recoveries).insert(label.to_owned(), run.clone());
    tracing::info!(backend = label, since = %rfc3339_ms(since_ms), total, "recovery started: the backend gets every write since then again");
    Ok(status(label, &run, total))
}

/// The latest recovery this instance started, per backend, with what remains now.
pub(crate) async fn recoveries(cluster: &Cluster) -> Vec<RecoveryStatus> {
    let runs: Vec<(String, RecoveryRun)> =
        crate::lock(&cluster.recoveries).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut out = Vec::new();
    for (label, run) in runs {
        let remaining = backend_lag(cluster, &backend_hash(&label)).await.unwrap_or(run.total);
        out.push(status(&label, &run, remaining));
    }
    out.sort_by(|a, b| a.backend.cmp(&b.backend));
    out
}

async fn backend_lag(cluster: &Cluster, hash: &str) -> Result<u64, LogError> {
    let prefix = format!("b{hash}-");
    Ok(consumer_infos(cluster)
        .await?
        .iter()
        .filter(|c| c.name.starts_with(&prefix))
        .map(|c| c.num_pending + c.num_ack_pending as u64)
        .sum())
}

fn status(label: &str, run: &RecoveryRun, remaining: u64) -> RecoveryStatus {
    RecoveryStatus {
        backend: label.to_owned(),
        state: if remaining == 0 { "done" } else { "recovering" },
        since: rfc3339_ms(run.since_ms),
        started_at: rfc3339_ms(run.started_ms),
        queued: run.total,
        total: run.total,
        remaining,
        history_from: run.history_from.map(rfc3339_ms),
        complete: run.history_from.is_none_or(|from| from <= run.since_ms),
        eta_seconds: None,
    }
}
