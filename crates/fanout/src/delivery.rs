//! Deliveries: one client write on its way to every backend of the pool (DESIGN 3.3 - 3.6).
//!
//! A delivery runs in one tokio task of its own, so a client that hangs up cancels nothing. Inside it, every
//! backend has its own retry loop ([`retry_loop`]), polled together; each loop ends delivered or as a dead letter.
//! As loops finish, a [`Tally`] decides (a pure function of the final results and the [`AckPolicy`]) when the
//! client can be answered, and the task sends the [`Reply`] once over a oneshot channel. Progress per backend
//! (attempts, last outcome) is kept in a [`DeliveryStatus`] that `GET /deliveries/{id}` reads.
//!
//! Bounds: at most `--max-in-flight` deliveries run at once (a semaphore; past it [`Dispatcher::submit`] refuses
//! and the client gets `503`), and the registry of recent deliveries holds at most `--delivery-history` entries.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use crate::backend::{BackendAddr, Outcome};
use crate::backoff::{Backoff, parse_retry_after};
use crate::config::AckPolicy;
use crate::forward::ForwardRequest;
use crate::metrics::{BackendMetrics, DeadLetterReason, Metrics};
use crate::ordering::{KeyQueues, Ticket};
use crate::outbox::{BackendRow, Outbox, StoredDelivery, Unfinished, now_ms};
use crate::replay::{Check, KeyRecord, Replays, StoredAnswer};

/// Largest backend answer body kept to be passed back to the client; longer ones are dropped (the status and
/// content type still are passed back) so that a backend cannot make fanout buffer without bound.
pub const MAX_ANSWER_BODY: usize = 64 * 1024;

/// A backend's answer, as passed back to the client under the `first` policy or for an agreed client error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The backend's status.
    pub status: StatusCode,
    /// The backend's `Content-Type`, if any.
    pub content_type: Option<HeaderValue>,
    /// The backend's body (empty when it exceeded [`MAX_ANSWER_BODY`]).
    pub body: Bytes,
}

/// What one attempt produced.
#[derive(Debug)]
pub struct AttemptResult {
    /// Its class.
    pub outcome: Outcome,
    /// The answer, when the backend sent one.
    pub answer: Option<Answer>,
    /// The backend's `Retry-After` (on `429` or `503`), when it sent one.
    pub retry_after: Option<Duration>,
}

/// How a delivery to one backend ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendResult {
    /// A `201` arrived after `attempts` attempts.
    Delivered {
        /// Attempts made, the successful one included.
        attempts: u32,
        /// The backend's answer.
        answer: Answer,
    },
    /// The backend gave up: a dead letter.
    DeadLetter {
        /// Attempts made.
        attempts: u32,
        /// Why.
        reason: DeadLetterReason,
        /// The last answer, when the last attempt got one.
        answer: Option<Answer>,
    },
}

/// Where a backend's retry loop starts: fresh, or resumed from the outbox after a restart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    /// Attempts already made (they count against `max_attempts`).
    pub attempts: u32,
    /// Wait before the next attempt.
    pub wait: Duration,
}

/// Runs the attempts of one delivery to one backend: attempt 1 at once, then after each transient failure the
/// wait of the [`Backoff`] schedule (or the backend's `Retry-After`, capped), until success, a permanent failure
/// or `max_attempts` attempts. `on_attempt(n, &result)` runs after every attempt, `on_retry(n, wait, outcome)`
/// before every wait, with `n` the attempt just made (1-based). A [`Resume`] continues a schedule where it
/// stopped. Waits use tokio's clock.
pub async fn retry_loop<A, F>(
    backoff: Backoff,
    max_attempts: u32,
    resume: Resume,
    mut attempt: A,
    mut on_attempt: impl FnMut(u32, &AttemptResult),
    mut on_retry: impl FnMut(u32, Duration, Outcome),
) -> BackendResult
where
    A: FnMut(u32) -> F,
    F: Future<Output = AttemptResult>,
{
    let mut n = resume.attempts + 1;
    if n > max_attempts {
        return BackendResult::DeadLetter {
            attempts: resume.attempts,
            reason: DeadLetterReason::Exhausted,
            answer: None,
        };
    }
    if !resume.wait.is_zero() {
        tokio::time::sleep(resume.wait).await;
    }
    loop {
        let result = attempt(n).await;
        on_attempt(n, &result);
        match result.outcome {
            Outcome::Success => {
                let answer = result.answer.unwrap_or(Answer {
                    status: StatusCode::CREATED,
                    content_type: None,
                    body: Bytes::new(),
                });
                return BackendResult::Delivered { attempts: n, answer };
            }
            Outcome::Rejected => {
                return BackendResult::DeadLetter {
                    attempts: n,
                    reason: DeadLetterReason::Rejected,
                    answer: result.answer,
                };
            }
            _ if n >= max_attempts => {
                return BackendResult::DeadLetter {
                    attempts: n,
                    reason: DeadLetterReason::Exhausted,
                    answer: result.answer,
                };
            }
            outcome => {
                let wait = backoff.delay_with_hint(n - 1, result.retry_after, &mut rand::rng());
                on_retry(n, wait, outcome);
                tokio::time::sleep(wait).await;
                n += 1;
            }
        }
    }
}

/// What the client of a write is told (DESIGN 3.6), decided by [`Tally::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not yet known: keep waiting.
    Wait,
    /// The ack policy is met. Under `first` the client gets `answer` (the first `201`); otherwise a summary.
    Acked {
        /// The first `201` answer.
        answer: Answer,
    },
    /// Every backend rejected the write with the same client error: it is passed back as is.
    PassBack {
        /// One of the agreeing answers.
        answer: Answer,
    },
    /// The policy can no longer be met: `502` with a summary.
    Unmet,
    /// The write could not be stored in the outbox: `503`, and nothing was sent.
    Refused,
}

/// The final results of one delivery so far, and the pure rule of when to answer.
#[derive(Debug)]
pub struct Tally {
    required: usize,
    results: Vec<Option<BackendResult>>,
}

impl Tally {
    /// A tally for `pool_size` backends under `policy`.
    pub fn new(policy: AckPolicy, pool_size: usize) -> Self {
        Self { required: policy.required(pool_size), results: vec![None; pool_size] }
    }

    /// Records the final result of backend `index`.
    pub fn record(&mut self, index: usize, result: BackendResult) {
        self.results[index] = Some(result);
    }

    /// The decision given the results recorded so far.
    ///
    /// - Acked as soon as `required` backends delivered.
    /// - While enough backends are still pending to reach `required`: wait.
    /// - Otherwise, if every backend that finished rejected the write with the same `4xx`: wait for the others,
    ///   and when all agree pass that answer back (the client sent something every replica refuses).
    /// - Otherwise: unmet (`502`).
    pub fn decide(&self) -> Decision {
        let n = self.results.len();
        let mut delivered = 0;
        let mut dead = 0;
        let mut first_success = None;
        for r in self.results.iter().flatten() {
            match r {
                BackendResult::Delivered { answer, .. } => {
                    delivered += 1;
                    first_success.get_or_insert(answer);
                }
                BackendResult::DeadLetter { .. } => dead += 1,
            }
        }
        if delivered >= self.required
            && let Some(answer) = first_success
        {
            return Decision::Acked { answer: answer.clone() };
        }
        if n - dead >= self.required {
            return Decision::Wait;
        }
        let mut agreed: Option<&Answer> = None;
        for r in self.results.iter().flatten() {
            let BackendResult::DeadLetter { reason: DeadLetterReason::Rejected, answer: Some(answer), .. } = r else {
                return Decision::Unmet;
            };
            if !answer.status.is_client_error() || agreed.is_some_and(|a| a.status != answer.status) {
                return Decision::Unmet;
            }
            agreed.get_or_insert(answer);
        }
        match agreed {
            Some(answer) if dead == n => Decision::PassBack { answer: answer.clone() },
            Some(_) => Decision::Wait,
            None => Decision::Unmet,
        }
    }
}

/// The final state of a delivery to one backend, as shown in summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Attempts are still going on.
    Pending,
    /// A `201` arrived.
    Delivered,
    /// The backend gave up.
    DeadLetter,
    /// Finished (delivered or dead letter) before fanout restarted; the outbox does not keep which.
    Finished,
}

/// The progress of a delivery to one backend.
#[derive(Debug, Clone, Serialize)]
pub struct BackendProgress {
    /// The backend as written in the pool (shared with the pool, not copied per delivery).
    pub backend: Arc<str>,
    /// Where it stands.
    pub state: BackendState,
    /// The status of the last answer, if any.
    pub status: Option<u16>,
    /// Attempts made so far.
    pub attempts: u32,
    /// The class of the last attempt, if any.
    pub outcome: Option<&'static str>,
    /// Why it became a dead letter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// When the next attempt is due (RFC 3339), while waiting in backoff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

/// The JSON summary of a delivery (`quorum`/`all` answers, `502`, `202`, `GET /deliveries/{id}`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The delivery id (also in `X-Delivery-Id`).
    pub delivery_id: Uuid,
    /// `pending` while any backend is pending, else `delivered` when all delivered, else `failed`.
    pub state: &'static str,
    /// When fanout accepted the write (RFC 3339).
    pub accepted_at: String,
    /// One entry per backend, in pool order.
    pub backends: Vec<BackendProgress>,
}

/// Live progress of one delivery, shared by its task and the registry.
#[derive(Debug)]
pub struct DeliveryStatus {
    id: Uuid,
    accepted_at: SystemTime,
    backends: Mutex<Vec<BackendProgress>>,
}

impl DeliveryStatus {
    fn lock(&self) -> MutexGuard<'_, Vec<BackendProgress>> {
        // A panic while holding this lock cannot leave the progress inconsistent (plain field writes).
        self.backends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot as JSON-ready summary.
    pub fn summary(&self) -> Summary {
        let backends = self.lock().clone();
        let state = if backends.iter().any(|b| b.state == BackendState::Pending) {
            "pending"
        } else if backends.iter().all(|b| b.state == BackendState::Delivered) {
            "delivered"
        } else {
            "failed"
        };
        Summary {
            delivery_id: self.id,
            state,
            accepted_at: humantime::format_rfc3339_millis(self.accepted_at).to_string(),
            backends,
        }
    }

    /// The delivery id.
    pub fn id(&self) -> Uuid {
        self.id
    }
}

/// The answer a delivery task sends to the waiting handler, once.
#[derive(Debug)]
pub struct Reply {
    /// What to tell the client (never [`Decision::Wait`]).
    pub decision: Decision,
}

/// A submitted delivery: its id, its live status, and the channel its decision arrives on.
#[derive(Debug)]
pub struct Submitted {
    /// The live status (for summaries).
    pub status: Arc<DeliveryStatus>,
    /// Receives the decision once the ack policy is met or can no longer be met.
    pub reply: oneshot::Receiver<Reply>,
}

/// Why a write was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// `--max-in-flight` deliveries are running.
    #[error("too many deliveries in flight")]
    Busy,
    /// The service is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

/// One backend of the pool with its metric handles and its per-user queues.
struct Backend {
    addr: BackendAddr,
    label: Arc<str>,
    metrics: BackendMetrics,
    order: Arc<KeyQueues>,
}

/// Settings of the dispatcher, from [`crate::Config`].
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// The backend pool.
    pub pool: Vec<BackendAddr>,
    /// The retry schedule.
    pub backoff: Backoff,
    /// Attempts per backend per delivery.
    pub max_attempts: u32,
    /// One attempt's deadline.
    pub attempt_timeout: Duration,
    /// When the client is answered.
    pub ack: AckPolicy,
    /// Deliveries in flight at most.
    pub max_in_flight: usize,
    /// Recent deliveries remembered.
    pub history: usize,
    /// Idle keep-alive timeout of backend connections.
    pub pool_idle_timeout: Duration,
}

/// Starts deliveries and remembers recent ones. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
}

struct Shared {
    client: reqwest::Client,
    backends: Vec<Backend>,
    settings: DispatchSettings,
    permits: Arc<Semaphore>,
    registry: Mutex<Registry>,
    metrics: Metrics,
    /// Acceptance order of deliveries, for the per-user queues.
    next_seq: AtomicU64,
    /// Held while a delivery takes its places in every backend's queues, so that two writes for the same user
    /// are queued in the same order on every backend.
    enqueue: Mutex<()>,
    /// Set when shutdown starts: no new delivery is accepted from then on.
    closing: AtomicBool,
    /// Where accepted writes are stored before anything is sent; `None` keeps them in memory only.
    outbox: Option<Outbox>,
    /// Recent client idempotency keys.
    replays: Replays,
}

impl Shared {
    /// Drops a delivery from the recent-deliveries registry (it was never accepted).
    fn forget(&self, id: &Uuid) {
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.by_id.remove(id);
        reg.order.retain(|x| x != id);
    }
}

struct Registry {
    by_id: HashMap<Uuid, Arc<DeliveryStatus>>,
    order: VecDeque<Uuid>,
}

impl Dispatcher {
    /// A dispatcher with one pooled HTTP client shared by every delivery. Redirects are never followed.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (its TLS-less builder does not fail in practice).
    pub fn new(
        settings: DispatchSettings,
        metrics: Metrics,
        outbox: Option<Outbox>,
        replays: Replays,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        let backends = settings
            .pool
            .iter()
            .map(|addr| Backend {
                addr: addr.clone(),
                label: addr.label().into(),
                metrics: metrics.backend(addr.label()),
                order: Arc::default(),
            })
            .collect();
        let permits = Arc::new(Semaphore::new(settings.max_in_flight));
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                backends,
                permits,
                registry: Mutex::new(Registry { by_id: HashMap::new(), order: VecDeque::new() }),
                metrics,
                settings,
                next_seq: AtomicU64::new(0),
                enqueue: Mutex::new(()),
                closing: AtomicBool::new(false),
                outbox,
                replays,
            }),
        })
    }

    /// Starts delivering `request` to every backend in a task of its own. With an `ordering_key` (the user), the
    /// delivery to each backend waits until every earlier accepted delivery with the same key has finished on that
    /// backend (see [`crate::ordering`]).
    ///
    /// # Errors
    /// [`SubmitError::Busy`] past `--max-in-flight`, [`SubmitError::ShuttingDown`] once [`Dispatcher::close`] ran.
    /// Nothing is sent in either case.
    pub fn submit(
        &self,
        id: Uuid,
        request: ForwardRequest,
        ordering_key: Option<&str>,
        idempotency: Option<(String, KeyRecord)>,
    ) -> Result<Submitted, SubmitError> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        let permit = match self.shared.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.shared.metrics.rejected();
                return Err(SubmitError::Busy);
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SubmitError::ShuttingDown),
        };
        let plan = vec![Some(Resume::default()); self.shared.backends.len()];
        let (seq, tickets) = self.take_places(None, ordering_key, &plan);
        let status = self.track(id, SystemTime::now(), &plan);
        let (tx, rx) = oneshot::channel();
        let job = Job {
            id,
            seq,
            ordering_key: ordering_key.map(str::to_owned),
            request: Arc::new(request),
            plan,
            status: status.clone(),
            tickets,
            store: self.shared.outbox.is_some(),
            idempotency,
            rows: (0..self.shared.backends.len()).map(|i| u16::try_from(i).unwrap_or(u16::MAX)).collect(),
        };
        let in_flight = GaugeGuard::new(self.shared.metrics.in_flight().clone());
        tokio::spawn(run_delivery(self.shared.clone(), job, Some(tx), (permit, in_flight)));
        Ok(Submitted { status, reply: rx })
    }

    /// Takes this delivery's places in the per-user queues of the backends in `plan`, all at once (see
    /// [`crate::ordering`]), with its acceptance order: `seq`, or the next one when `None`.
    fn take_places(
        &self,
        seq: Option<u64>,
        ordering_key: Option<&str>,
        plan: &[Option<Resume>],
    ) -> (u64, Vec<Option<Ticket>>) {
        let _one_at_a_time = self.shared.enqueue.lock().unwrap_or_else(|e| e.into_inner());
        let seq = seq.unwrap_or_else(|| self.shared.next_seq.fetch_add(1, Ordering::Relaxed));
        let tickets = self
            .shared
            .backends
            .iter()
            .zip(plan)
            .map(|(b, p)| match (ordering_key, p) {
                (Some(key), Some(_)) => Some(b.order.enqueue(key, seq)),
                _ => None,
            })
            .collect();
        (seq, tickets)
    }

    /// A progress record for a delivery, remembered for `GET /deliveries/{id}`.
    fn track(&self, id: Uuid, accepted_at: SystemTime, plan: &[Option<Resume>]) -> Arc<DeliveryStatus> {
        let progress = self
            .shared
            .backends
            .iter()
            .zip(plan)
            .map(|(b, p)| BackendProgress {
                backend: b.label.clone(),
                state: if p.is_some() { BackendState::Pending } else { BackendState::Finished },
                status: None,
                attempts: p.map_or(0, |r| r.attempts),
                outcome: None,
                reason: None,
                next_attempt_at: None,
            })
            .collect();
        let status = Arc::new(DeliveryStatus { id, accepted_at, backends: Mutex::new(progress) });
        self.remember(&status);
        status
    }

    /// Resumes deliveries read from the outbox at start, in acceptance order: each takes its places in the
    /// per-user queues now (before any new write can), and starts once an in-flight permit is free. New
    /// acceptance numbers continue after the highest one stored.
    pub fn resume(&self, unfinished: Vec<Unfinished>) -> usize {
        let count = unfinished.len();
        if let Some(max) = unfinished.iter().map(|u| u.delivery.seq).max() {
            self.shared.next_seq.fetch_max(max + 1, Ordering::Relaxed);
        }
        let now = now_ms();
        let mut jobs = Vec::with_capacity(count);
        for u in unfinished {
            let id = Uuid::from_u128(u.id);
            let mut plan = vec![None; self.shared.backends.len()];
            let mut rows = vec![u16::MAX; self.shared.backends.len()];
            for (stored_index, row) in &u.pending {
                // Pending rows name a backend by its place in the pool at acceptance; find it in today's pool.
                let label = u.delivery.backends.get(usize::from(*stored_index));
                let here = label.and_then(|l| self.shared.backends.iter().position(|b| b.addr.label() == l));
                match here {
                    Some(i) => {
                        let wait = Duration::from_millis(row.next_due_ms.saturating_sub(now));
                        plan[i] = Some(Resume { attempts: row.attempts, wait });
                        rows[i] = *stored_index;
                    }
                    None => {
                        tracing::error!(
                            delivery_id = %id,
                            backend = label.map_or("?", String::as_str),
                            "dead letter: this backend is no longer in --backends and will not get this write"
                        );
                        if let Some(outbox) = &self.shared.outbox {
                            outbox.drop_pending(u.id, *stored_index);
                        }
                    }
                }
            }
            let Some(request) = u.delivery.to_request() else {
                tracing::error!(delivery_id = %id, "outbox record does not decode to a request; skipped");
                continue;
            };
            let seq = u.delivery.seq;
            let ordering_key = u.delivery.ordering_key.clone();
            let (_, tickets) = self.take_places(Some(seq), ordering_key.as_deref(), &plan);
            let accepted_at = std::time::UNIX_EPOCH + Duration::from_millis(u.delivery.accepted_at_ms);
            let status = self.track(id, accepted_at, &plan);
            let pending_here = plan.iter().filter(|p| p.is_some()).count();
            let job = Job {
                id,
                seq,
                ordering_key,
                request: Arc::new(request),
                plan,
                status,
                tickets,
                store: false,
                idempotency: None,
                rows,
            };
            if pending_here == 0 {
                // Every backend that needed it left the pool: the delivery is over.
                if let Some(outbox) = &self.shared.outbox {
                    outbox.drop_delivery(u.id);
                }
                continue;
            }
            jobs.push(job);
        }
        // In-flight permits are taken in acceptance order, one after the other: a later delivery never holds a
        // permit while an earlier one of the same user waits for one (which would stall both for good).
        let shared = self.shared.clone();
        tokio::spawn(async move {
            for job in jobs {
                let Ok(permit) = shared.permits.clone().acquire_owned().await else { return };
                let in_flight = GaugeGuard::new(shared.metrics.in_flight().clone());
                tokio::spawn(run_delivery(shared.clone(), job, None, (permit, in_flight)));
            }
        });
        count
    }

    fn remember(&self, status: &Arc<DeliveryStatus>) {
        let mut reg = self.shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        while reg.order.len() >= self.shared.settings.history {
            if let Some(old) = reg.order.pop_front() {
                reg.by_id.remove(&old);
            }
        }
        reg.order.push_back(status.id);
        reg.by_id.insert(status.id, status.clone());
    }

    /// Checks a client's idempotency key, reserving it for `id` when it is new.
    pub fn check_key(&self, key: &str, body_hash: [u8; 32], id: Uuid) -> Check {
        self.shared.replays.check(key, body_hash, id.as_u128(), now_ms())
    }

    /// Releases a key reserved for a write that was refused.
    pub fn release_key(&self, key: &str, id: Uuid) {
        self.shared.replays.release(key, id.as_u128());
    }

    /// Keeps the answer given under a key, for replays (and in the outbox, for replays after a restart).
    pub fn answered(&self, key: &str, id: Uuid, record: KeyRecord, answer: StoredAnswer) {
        self.shared.replays.answered(key, id.as_u128(), answer.clone());
        if let Some(outbox) = &self.shared.outbox {
            outbox.answer(key, &KeyRecord { answer: Some(answer), ..record });
        }
    }

    /// A recent delivery by id.
    pub fn lookup(&self, id: &Uuid) -> Option<Arc<DeliveryStatus>> {
        self.shared.registry.lock().unwrap_or_else(|e| e.into_inner()).by_id.get(id).cloned()
    }

    /// Deliveries currently in flight.
    pub fn in_flight(&self) -> usize {
        self.shared.settings.max_in_flight - self.shared.permits.available_permits()
    }

    /// True while new writes can be accepted (not shutting down, below the in-flight bound).
    pub fn ready(&self) -> bool {
        !self.shared.closing.load(Ordering::Acquire)
            && self.shared.permits.available_permits() > 0
            && self.shared.outbox.as_ref().is_none_or(Outbox::healthy)
    }

    /// The ack policy.
    pub fn ack_policy(&self) -> AckPolicy {
        self.shared.settings.ack
    }

    /// Stops accepting writes and waits up to `grace` for deliveries in flight; returns how many were still
    /// pending when it gave up (0 when all finished).
    pub async fn close(&self, grace: Duration) -> usize {
        self.shared.closing.store(true, Ordering::Release);
        let all = u32::try_from(self.shared.settings.max_in_flight).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(grace, self.shared.permits.acquire_many(all)).await;
        self.shared.permits.close();
        let pending = match drained {
            Ok(_) => 0,
            Err(_) => self.in_flight(),
        };
        if let Some(outbox) = &self.shared.outbox
            && let Err(err) = outbox.flush().await
        {
            tracing::error!(error = %err, "outbox: final flush failed");
        }
        pending
    }

    /// The outbox, if any.
    pub fn outbox(&self) -> Option<Outbox> {
        self.shared.outbox.clone()
    }

    /// True when accepted writes are kept in a durable outbox.
    pub fn durable(&self) -> bool {
        self.shared.outbox.is_some()
    }
}

/// A delivery ready to run: the write, which backends still need it and from where, its queue places.
struct Job {
    id: Uuid,
    seq: u64,
    ordering_key: Option<String>,
    request: Arc<ForwardRequest>,
    plan: Vec<Option<Resume>>,
    status: Arc<DeliveryStatus>,
    tickets: Vec<Option<Ticket>>,
    /// Store it in the outbox before anything is sent (a new write, with an outbox).
    store: bool,
    /// The client's idempotency key and its record, stored with the write.
    idempotency: Option<(String, KeyRecord)>,
    /// For each backend of today's pool, the index its outbox row has (its place in the pool at acceptance).
    rows: Vec<u16>,
}

/// The task of one delivery: the write is stored first (with an outbox), then every pending backend's retry
/// loop runs, polled together; the reply is sent once decided, and each backend's end is recorded in the outbox.
async fn run_delivery(
    shared: Arc<Shared>,
    job: Job,
    reply: Option<oneshot::Sender<Reply>>,
    // Released when the task ends, however it ends.
    _held: (OwnedSemaphorePermit, GaugeGuard),
) {
    let Job { id, seq, ordering_key, request, plan, status, tickets, store, idempotency, rows } = job;
    let mut reply = reply;
    if store && let Some(outbox) = &shared.outbox {
        let labels = shared.backends.iter().map(|b| b.addr.label().to_owned()).collect();
        let stored = StoredDelivery::from_request(seq, &request, ordering_key, labels);
        let backends = u16::try_from(plan.len()).unwrap_or(u16::MAX);
        let key = idempotency.as_ref().map(|(k, r)| (k.as_str(), r));
        if let Err(err) = outbox.accept(id.as_u128(), &stored, backends, key).await {
            tracing::error!(delivery_id = %id, error = %err, "write not stored: refused, nothing sent");
            shared.forget(&id);
            if let Some(tx) = reply.take() {
                let _ = tx.send(Reply { decision: Decision::Refused });
            }
            return;
        }
    }
    // Stored (or nothing to store): repeats of its idempotency key are replays from now on.
    if let Some((key, _)) = &idempotency {
        shared.replays.confirm(key, id.as_u128());
    }
    // The tally (and the answers it holds) lives only until the client is answered.
    let mut tally = reply.as_ref().map(|_| Tally::new(shared.settings.ack, shared.backends.len()));
    let mut remaining = plan.iter().filter(|p| p.is_some()).count();
    let mut loops: FuturesUnordered<_> = plan
        .into_iter()
        .zip(tickets)
        .enumerate()
        .filter_map(|(index, (resume, ticket))| resume.map(|r| (index, r, ticket)))
        .map(|(index, resume, ticket)| {
            let shared = &shared;
            let request = &request;
            let status = &status;
            let row = rows[index];
            async move { (index, deliver_to(shared, index, row, request, status, resume, ticket).await) }
        })
        .collect();
    while let Some((index, result)) = loops.next().await {
        remaining -= 1;
        if let Some(outbox) = &shared.outbox {
            outbox.finish(id.as_u128(), rows[index], remaining == 0).await;
        }
        if let Some(t) = tally.as_mut() {
            t.record(index, result);
            let decision = t.decide();
            if decision != Decision::Wait
                && let Some(tx) = reply.take()
            {
                // The client may have gone: the delivery goes on regardless.
                let _ = tx.send(Reply { decision });
                tally = None;
            }
        }
    }
}

/// Adds 1 to a gauge for as long as it lives (so that a task that ends early, even by a panic, gives it back).
struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// One backend's retry loop within a delivery, with its logging, metrics and progress updates. With a ticket, the
/// first attempt waits for the ticket's turn; the ticket is released when this backend's delivery ends.
async fn deliver_to(
    shared: &Shared,
    index: usize,
    row: u16,
    request: &ForwardRequest,
    status: &DeliveryStatus,
    resume: Resume,
    mut ticket: Option<Ticket>,
) -> BackendResult {
    let backend = &shared.backends[index];
    let settings = &shared.settings;
    let _pending = GaugeGuard::new(backend.metrics.pending().clone());
    if let Some(ticket) = ticket.as_mut() {
        ticket.ready().await;
    }
    let url = backend.addr.target(&request.path_and_query);
    let record = |attempts: u32, wait: Duration| {
        if let Some(outbox) = &shared.outbox {
            let next_due_ms = if wait.is_zero() { 0 } else { now_ms() + u64::try_from(wait.as_millis()).unwrap_or(0) };
            outbox.progress(status.id.as_u128(), row, BackendRow { attempts, next_due_ms });
        }
    };
    let result = retry_loop(
        settings.backoff,
        settings.max_attempts,
        resume,
        // Boxed: the attempt's future (the HTTP client's, the largest part) exists only during an attempt,
        // not inline in a loop that mostly sleeps in backoff.
        |_| Box::pin(send_attempt(&shared.client, &url, request, settings.attempt_timeout, &backend.metrics)),
        |n, r| {
            let mut progress = status.lock();
            let p = &mut progress[index];
            p.attempts = n;
            p.status = r.answer.as_ref().map(|a| a.status.as_u16());
            p.outcome = Some(r.outcome.as_str());
            p.next_attempt_at = None;
        },
        |n, wait, outcome| {
            record(n, wait);
            status.lock()[index].next_attempt_at =
                Some(humantime::format_rfc3339_millis(SystemTime::now() + wait).to_string());
            backend.metrics.retry();
            tracing::info!(
                backend = %backend.addr,
                delivery_id = %status.id,
                attempt = n,
                outcome = outcome.as_str(),
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "attempt failed, retrying"
            );
        },
    )
    .await;
    {
        let mut progress = status.lock();
        let p = &mut progress[index];
        match &result {
            BackendResult::Delivered { .. } => p.state = BackendState::Delivered,
            BackendResult::DeadLetter { attempts, reason, .. } => {
                p.state = BackendState::DeadLetter;
                p.reason = Some(reason.as_str());
                backend.metrics.dead_letter(*reason);
                tracing::error!(
                    backend = %backend.addr,
                    delivery_id = %status.id,
                    attempts,
                    reason = reason.as_str(),
                    last_status = p.status,
                    // The path only: a query string may carry credentials.
                    path = request.path_and_query.split('?').next().unwrap_or_default(),
                    "dead letter: the backend did not get this write"
                );
            }
        }
    }
    drop(ticket);
    result
}

/// One attempt: the request with the shared body, bounded by `timeout` from connect to the last body byte.
async fn send_attempt(
    client: &reqwest::Client,
    url: &reqwest::Url,
    request: &ForwardRequest,
    timeout: Duration,
    metrics: &BackendMetrics,
) -> AttemptResult {
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, async {
        let response = client
            .request(request.method.clone(), url.clone())
            .headers(request.headers.clone())
            .body(request.body.clone())
            .send()
            .await?;
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now())),
            _ => None,
        };
        let body = read_limited(response, MAX_ANSWER_BODY).await?;
        Ok::<_, reqwest::Error>((status, content_type, body, retry_after))
    })
    .await;
    let attempt = match result {
        Ok(Ok((status, content_type, body, retry_after))) => AttemptResult {
            outcome: Outcome::from_status(status),
            answer: Some(Answer { status, content_type, body }),
            retry_after,
        },
        Ok(Err(err)) => AttemptResult { outcome: Outcome::from_error(&err), answer: None, retry_after: None },
        Err(_elapsed) => AttemptResult { outcome: Outcome::Timeout, answer: None, retry_after: None },
    };
    metrics.attempt(attempt.outcome, started.elapsed());
    attempt
}

/// Reads a response body, keeping it only if it fits in `limit` bytes (the rest is read and discarded so that
/// the connection can be reused).
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, reqwest::Error> {
    let mut kept = Vec::new();
    let mut overflow = false;
    while let Some(chunk) = response.chunk().await? {
        if !overflow && kept.len() + chunk.len() <= limit {
            kept.extend_from_slice(&chunk);
        } else {
            overflow = true;
        }
    }
    Ok(if overflow { Bytes::new() } else { Bytes::from(kept) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn answer(code: u16) -> Answer {
        Answer {
            status: StatusCode::from_u16(code).expect("status"),
            content_type: None,
            body: Bytes::from_static(b"x"),
        }
    }
    fn ok() -> BackendResult {
        BackendResult::Delivered { attempts: 1, answer: answer(201) }
    }
    fn rejected(code: u16) -> BackendResult {
        BackendResult::DeadLetter { attempts: 1, reason: DeadLetterReason::Rejected, answer: Some(answer(code)) }
    }
    fn exhausted() -> BackendResult {
        BackendResult::DeadLetter { attempts: 100, reason: DeadLetterReason::Exhausted, answer: None }
    }
    fn tally(policy: AckPolicy, results: &[(usize, BackendResult)]) -> Decision {
        let mut t = Tally::new(policy, 3);
        for (i, r) in results {
            t.record(*i, r.clone());
        }
        t.decide()
    }

    #[test]
    fn first_policy() {
        assert_eq!(tally(AckPolicy::First, &[]), Decision::Wait);
        assert_eq!(tally(AckPolicy::First, &[(1, ok())]), Decision::Acked { answer: answer(201) });
        assert_eq!(tally(AckPolicy::First, &[(0, exhausted()), (1, exhausted())]), Decision::Wait);
        assert_eq!(tally(AckPolicy::First, &[(0, exhausted()), (1, exhausted()), (2, exhausted())]), Decision::Unmet);
        assert_eq!(tally(AckPolicy::First, &[(0, rejected(400)), (1, rejected(400))]), Decision::Wait);
        assert_eq!(
            tally(AckPolicy::First, &[(0, rejected(400)), (1, rejected(400)), (2, rejected(400))]),
            Decision::PassBack { answer: answer(400) }
        );
        assert_eq!(
            tally(AckPolicy::First, &[(0, rejected(400)), (1, rejected(404)), (2, rejected(400))]),
            Decision::Unmet
        );
        assert_eq!(
            tally(AckPolicy::First, &[(0, rejected(302)), (1, rejected(302)), (2, rejected(302))]),
            Decision::Unmet
        );
        assert_eq!(tally(AckPolicy::First, &[(0, rejected(400)), (1, ok())]), Decision::Acked { answer: answer(201) });
    }

    #[test]
    fn quorum_and_all_policies() {
        assert_eq!(tally(AckPolicy::Quorum, &[(0, ok())]), Decision::Wait);
        assert!(matches!(tally(AckPolicy::Quorum, &[(0, ok()), (2, ok())]), Decision::Acked { .. }));
        assert_eq!(tally(AckPolicy::Quorum, &[(0, exhausted())]), Decision::Wait);
        assert_eq!(tally(AckPolicy::Quorum, &[(0, exhausted()), (1, exhausted())]), Decision::Unmet);
        assert_eq!(tally(AckPolicy::All, &[(0, ok()), (1, ok())]), Decision::Wait);
        assert!(matches!(tally(AckPolicy::All, &[(0, ok()), (1, ok()), (2, ok())]), Decision::Acked { .. }));
        assert_eq!(tally(AckPolicy::All, &[(0, exhausted())]), Decision::Unmet);
        // One replica refuses what the others took: unmet, not passed back.
        assert_eq!(tally(AckPolicy::All, &[(0, ok()), (1, rejected(404))]), Decision::Unmet);
        // A refusal while others are pending: wait to see whether they all agree.
        assert_eq!(tally(AckPolicy::All, &[(1, rejected(400))]), Decision::Wait);
        assert_eq!(
            tally(AckPolicy::All, &[(0, rejected(400)), (1, rejected(400)), (2, rejected(400))]),
            Decision::PassBack { answer: answer(400) }
        );
    }

    fn result(outcome: Outcome) -> AttemptResult {
        let code = match outcome {
            Outcome::Success => Some(201),
            Outcome::Status5xx => Some(500),
            Outcome::Rejected => Some(400),
            _ => None,
        };
        AttemptResult { outcome, answer: code.map(answer), retry_after: None }
    }

    /// Runs `retry_loop` under paused time with scripted outcomes; returns the result and the instants (relative
    /// to the start) at which each attempt began.
    async fn scripted(
        backoff: Backoff,
        max_attempts: u32,
        script: Vec<AttemptResult>,
    ) -> (BackendResult, Vec<Duration>) {
        let start = Instant::now();
        let times = RefCell::new(Vec::new());
        let script = RefCell::new(script.into_iter());
        let result = retry_loop(
            backoff,
            max_attempts,
            Resume::default(),
            |_| {
                times.borrow_mut().push(start.elapsed());
                let next = script.borrow_mut().next().expect("script long enough");
                async move { next }
            },
            |_, _| {},
            |_, _, _| {},
        )
        .await;
        (result, times.into_inner())
    }

    const EXACT: Backoff =
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(64), max_jitter: Duration::ZERO };

    #[tokio::test(start_paused = true)]
    async fn third_attempt_succeeds_after_one_and_two_seconds() {
        let script = vec![result(Outcome::Status5xx), result(Outcome::Connect), result(Outcome::Success)];
        let (r, times) = scripted(EXACT, 100, script).await;
        assert!(matches!(r, BackendResult::Delivered { attempts: 3, .. }), "{r:?}");
        assert_eq!(times, [Duration::ZERO, Duration::from_secs(1), Duration::from_secs(3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_schedule_is_truncated_at_max_backoff_and_attempts_run_out() {
        let script = (0..10).map(|_| result(Outcome::Timeout)).collect();
        let (r, times) = scripted(EXACT, 10, script).await;
        assert_eq!(r, BackendResult::DeadLetter { attempts: 10, reason: DeadLetterReason::Exhausted, answer: None });
        let gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_stays_within_bounds_on_the_clock() {
        let backoff = Backoff { max_jitter: Duration::from_millis(100), ..EXACT };
        let script = (0..5).map(|_| result(Outcome::Status5xx)).collect();
        let (_, times) = scripted(backoff, 5, script).await;
        for (n, w) in times.windows(2).enumerate() {
            let gap = w[1] - w[0];
            let base = EXACT.base(n as u32);
            assert!(gap >= base && gap <= base + Duration::from_millis(100), "retry {n}: {gap:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_replaces_the_schedule() {
        let mut throttled = result(Outcome::RetryableStatus);
        throttled.retry_after = Some(Duration::from_secs(7));
        let mut too_long = result(Outcome::Status5xx);
        too_long.retry_after = Some(Duration::from_secs(3600));
        let (_, times) = scripted(EXACT, 3, vec![throttled, too_long, result(Outcome::Success)]).await;
        assert_eq!(times, [Duration::ZERO, Duration::from_secs(7), Duration::from_secs(7 + 64)]);
    }

    /// A dispatcher whose backends refuse connections and retry only after a minute: deliveries stay pending.
    fn stuck_dispatcher(backends: u16, max_in_flight: usize) -> Dispatcher {
        let settings = DispatchSettings {
            pool: (1..=backends).map(|p| format!("127.0.0.1:{p}").parse().expect("addr")).collect(),
            backoff: Backoff {
                initial: Duration::from_secs(60),
                max: Duration::from_secs(60),
                max_jitter: Duration::ZERO,
            },
            max_attempts: 5,
            attempt_timeout: Duration::from_secs(1),
            ack: AckPolicy::First,
            max_in_flight,
            history: 10,
            pool_idle_timeout: Duration::from_secs(1),
        };
        Dispatcher::new(settings, Metrics::new(), None, Replays::new(Duration::from_secs(60), Vec::new(), 0))
            .expect("client")
    }

    fn write() -> ForwardRequest {
        ForwardRequest {
            method: axum::http::Method::POST,
            path_and_query: "/register".to_owned(),
            headers: axum::http::HeaderMap::new(),
            body: Bytes::from_static(b"username=a&password=b"),
        }
    }

    /// Found by an attack run: writes for one user submitted at the same moment from several threads were queued
    /// in one order on a backend and in another on the next, so backends applied them in different orders.
    #[test]
    fn concurrent_submits_queue_a_user_in_the_same_order_on_every_backend() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let dispatcher = stuck_dispatcher(3, 10_000);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let d = &dispatcher;
                let handle = runtime.handle().clone();
                scope.spawn(move || {
                    let _in_runtime = handle.enter();
                    for _ in 0..300 {
                        d.submit(Uuid::now_v7(), write(), Some("same-user"), None).expect("accepted");
                    }
                });
            }
        });
        let orders: Vec<Vec<u64>> = dispatcher.shared.backends.iter().map(|b| b.order.order("same-user")).collect();
        assert_eq!(orders[0].len(), 2400);
        assert!(orders.windows(2).all(|w| w[0] == w[1]), "backends queued the user's writes in different orders");
        runtime.shutdown_background();
    }

    #[tokio::test]
    async fn once_shutdown_starts_no_write_is_accepted_and_pending_ones_are_counted() {
        let dispatcher = stuck_dispatcher(1, 10);
        let request = write();
        let _pending = dispatcher.submit(Uuid::now_v7(), request.clone(), None, None).expect("accepted");
        let closing = tokio::spawn({
            let d = dispatcher.clone();
            async move { d.close(Duration::from_millis(300)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!dispatcher.ready());
        assert_eq!(dispatcher.submit(Uuid::now_v7(), request, None, None).err(), Some(SubmitError::ShuttingDown));
        assert_eq!(closing.await.expect("join"), 1, "the delivery to the dead backend is still pending");
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_failure_is_not_retried() {
        let (r, times) = scripted(EXACT, 100, vec![result(Outcome::Rejected)]).await;
        assert!(matches!(r, BackendResult::DeadLetter { attempts: 1, reason: DeadLetterReason::Rejected, .. }));
        assert_eq!(times.len(), 1);
    }
}
