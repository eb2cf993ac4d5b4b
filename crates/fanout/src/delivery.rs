//! Deliveries: one client write on its way to every backend of the pool (docs/design.md sections 3-6).
//!
//! [`Dispatcher::submit`] gives the write its acceptance order and its place in every backend's queue (one
//! [`crate::queue::Worker`] per backend), stores it in the outbox, and only then lets the workers send it. Each
//! worker reports how the write ended on its backend (delivered, or a dead letter) to the dispatcher, whose
//! [`Tally`] decides (a pure function of the results so far and the [`AckPolicy`]) when the waiting client can be
//! answered; the [`Reply`] is sent once, over a oneshot channel. A client that hangs up cancels nothing.
//!
//! Bounds: writes whose client is still waiting are at most `--max-in-flight`; deliveries stored and not yet
//! finished on every backend are at most `--max-pending` with the outbox, `--max-in-flight` without (past either,
//! [`Dispatcher::submit`] refuses and the client gets `503`). Memory per pending write is the worker's window
//! ([`crate::queue::WINDOW`]), not one task per write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::attempt::{Http, Transport};
use crate::backend::BackendAddr;
use crate::backoff::Backoff;
use crate::config::AckPolicy;
use crate::forward::ForwardRequest;
use crate::jetstream::Cluster;
use crate::log::{
    BackendState, BackendView, DeadFilter, DeadLetter, DeliveryView, LogError, Startup, StoredDelivery, WriteLog,
    id_time_ms, now_ms,
};
use crate::metrics::Metrics;
use crate::queue::{BackendStatus, Event, Events, Msg, NewEntry, QueueSettings, RecoveryStatus, Worker, WorkerContext};
use crate::replay::{Check, KeyRecord, Replays, StoredAnswer};
use crate::tally::{Decision, Tally};

/// Refusals, each kind logged at most once a second with its count (the metrics count every one).
static REFUSED_PENDING: crate::ratelog::Every = crate::ratelog::Every::new();
static REFUSED_IN_FLIGHT: crate::ratelog::Every = crate::ratelog::Every::new();
static NOT_STORED: crate::ratelog::Every = crate::ratelog::Every::new();
static REFUSED_EVERYWHERE: crate::ratelog::Every = crate::ratelog::Every::new();
/// The JSON summary of a delivery (`quorum`/`all` answers, `502`, `202`, `GET /deliveries/{id}`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The delivery id (also in `X-Delivery-Id`).
    pub delivery_id: Uuid,
    /// `pending` while any backend is pending, else `delivered` when all delivered, `refused` when every backend
    /// refused the write, else `failed`.
    pub state: &'static str,
    /// When fanout accepted the write (RFC 3339).
    pub accepted_at: String,
    /// One entry per backend, in pool order.
    pub backends: Vec<BackendView>,
}

impl Summary {
    /// The view for the API port, which faces clients: each backend's part in pool order, without its address
    /// (the admin port's `GET /deliveries/{id}` names them).
    pub fn redacted(mut self) -> Self {
        for b in &mut self.backends {
            b.backend.clear();
        }
        self
    }

    /// The summary of a delivery as stored.
    pub fn from_view(id: Uuid, view: DeliveryView) -> Self {
        let backends = view.backends;
        let state = if backends.iter().any(|b| b.state == BackendState::Pending) {
            "pending"
        } else if backends.iter().all(|b| b.state == BackendState::Delivered) {
            "delivered"
        } else if !backends.is_empty() && backends.iter().all(|b| b.state == BackendState::Refused) {
            "refused"
        } else {
            "failed"
        };
        Summary { delivery_id: id, state, accepted_at: crate::log::rfc3339_ms(view.accepted_at_ms), backends }
    }
}

/// The answer the dispatcher sends to the waiting handler, once.
#[derive(Debug)]
pub struct Reply {
    /// What to tell the client (never [`Decision::Wait`]).
    pub decision: Decision,
    /// The delivery as far as known when decided.
    pub summary: Summary,
}

/// A submitted write: the channel its decision arrives on. Dropping it (the client hung up, or the ack timeout
/// passed) stops the wait, not the delivery.
pub struct Submitted {
    /// Receives the decision once the ack policy is met or can no longer be met.
    pub reply: oneshot::Receiver<Reply>,
    /// Turns true when shutdown's grace is over: answer the client now (`202`) rather than not at all.
    pub answer_now: watch::Receiver<bool>,
    _wait: Box<dyn Send + Sync>,
}

impl Submitted {
    /// A submitted write whose waiting client is forgotten when `guard` drops.
    pub(crate) fn new(
        reply: oneshot::Receiver<Reply>,
        answer_now: watch::Receiver<bool>,
        guard: Box<dyn Send + Sync>,
    ) -> Self {
        Submitted { reply, answer_now, _wait: guard }
    }
}

/// Removes a waiting client's tally when its handler is done, and gives back its in-flight permit.
struct WaitGuard {
    shared: Arc<Shared>,
    id: u128,
    _permit: OwnedSemaphorePermit,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.shared.waiting().remove(&self.id);
    }
}

/// Why a write was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// `--max-in-flight` clients are waiting, or the pending bound is reached.
    #[error("too many deliveries in flight")]
    Busy,
    /// The service is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

/// Settings of the dispatcher, from [`crate::Config`].
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// The backend pool.
    pub pool: Vec<BackendAddr>,
    /// The retry schedule (also the breaker's probe schedule).
    pub backoff: Backoff,
    /// Attempts per backend per delivery.
    pub max_attempts: u32,
    /// One attempt's deadline.
    pub attempt_timeout: Duration,
    /// When the client is answered.
    pub ack: AckPolicy,
    /// Clients waiting at most (and, without an outbox, deliveries not finished).
    pub max_in_flight: usize,
    /// Deliveries stored and not finished on every backend at most, with an outbox.
    pub max_pending: u64,
    /// Idle keep-alive timeout of backend connections.
    pub pool_idle_timeout: Duration,
    /// The queue workers' concurrency, breaker and budget.
    pub queue: QueueSettings,
}

/// Accepts writes, runs the backends' queue workers, answers waiting clients. Cheap to clone.
///
/// With the embedded store (the write log in `--data-dir`, or memory) the queues are this process's; with
/// `--store nats://...` they are JetStream's, shared by every instance ([`crate::jetstream`]). The routes see the
/// same calls either way.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    /// The embedded store and this process's queue workers.
    Local(Arc<Shared>),
    /// The NATS JetStream store.
    Nats(Arc<Cluster>),
}

struct Waiter {
    tally: Tally,
    tx: oneshot::Sender<Reply>,
}

/// The dispatcher's state. Its queue workers see none of it: they report through [`Events`].
struct Shared {
    settings: DispatchSettings,
    metrics: Metrics,
    log: Arc<dyn WriteLog>,
    replays: Replays,
    labels: Vec<Arc<str>>,
    queues: Vec<mpsc::UnboundedSender<Msg>>,
    /// Held while a write takes its acceptance order and its places in every queue, so that two writes for the
    /// same user are queued in the same order on every backend.
    enqueue: Mutex<()>,
    next_seq: AtomicU64,
    waiting: Mutex<HashMap<u128, Waiter>>,
    clients: Arc<Semaphore>,
    closing: AtomicBool,
    stop: watch::Sender<bool>,
    answer_now: watch::Sender<bool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Each worker's published status, in pool order.
    statuses: Mutex<Vec<watch::Receiver<BackendStatus>>>,
}

impl Events for Shared {
    fn report(&self, event: Event) {
        match event {
            Event::Finished { index, id, result } => {
                let mut waiting = self.waiting();
                let Some(w) = waiting.get_mut(&id) else { return };
                w.tally.record(index, result);
                let decision = w.tally.decide();
                if decision == Decision::Wait {
                    return;
                }
                if let Some(w) = waiting.remove(&id) {
                    let uuid = Uuid::from_u128(id);
                    let summary = Summary::from_view(uuid, w.tally.view(&self.labels, id_time_ms(id)));
                    // The client may have gone: the delivery went on regardless.
                    let _ = w.tx.send(Reply { decision, summary });
                }
            }
            Event::RefusedEverywhere { id, backends } => {
                if let Some(writes) = REFUSED_EVERYWHERE.hit() {
                    tracing::info!(
                        delivery_id = %Uuid::from_u128(id),
                        writes,
                        "every backend refused this write: applied nowhere, its dead letters are dropped (this one \
                         logged; `writes` since the last line)"
                    );
                }
                // Their workers' dead-letter gauges follow.
                for b in &backends {
                    self.tell(b, Msg::Discarded(1));
                }
            }
        }
    }

    fn clients_waiting(&self) -> bool {
        !self.waiting().is_empty()
    }
}

impl Shared {
    /// The pending bound: `--max-pending` with a durable log, `--max-in-flight` without.
    fn pending_limit(&self) -> u64 {
        if self.log.durable() {
            self.settings.max_pending
        } else {
            u64::try_from(self.settings.max_in_flight).unwrap_or(u64::MAX)
        }
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<u128, Waiter>> {
        crate::lock(&self.waiting)
    }

    /// Sends `msg` to the worker of backend `label`, if it is in the pool.
    fn tell(&self, label: &str, msg: Msg) {
        if let Some(i) = self.labels.iter().position(|l| &**l == label) {
            let _ = self.queues[i].send(msg);
        }
    }

    fn broadcast(&self, msg: impl Fn() -> Msg) {
        for q in &self.queues {
            let _ = q.send(msg());
        }
    }

    /// Stores an accepted write, then lets the workers send it; or, when it cannot be stored, makes them forget
    /// it and answers its client `503`.
    async fn store(
        self: Arc<Self>,
        id: u128,
        seq: u64,
        record: StoredDelivery,
        idempotency: Option<(String, KeyRecord)>,
    ) {
        let key = idempotency.as_ref().map(|(k, r)| (k.as_str(), r));
        match self.log.append(id, record, key).await {
            Ok(()) => {
                // Stored: repeats of its idempotency key are replays from now on.
                if let Some((key, _)) = &idempotency {
                    self.replays.confirm(key, id);
                }
                self.broadcast(|| Msg::Stored(seq));
            }
            Err(err) => {
                self.metrics.store_failure();
                if let Some(refused) = NOT_STORED.hit() {
                    tracing::error!(error = %err, refused, "writes not stored: refused with 503, nothing sent");
                }
                self.broadcast(|| Msg::Dropped(seq));
                if let Some(w) = self.waiting().remove(&id) {
                    let summary = Summary::from_view(Uuid::from_u128(id), w.tally.view(&[], 0));
                    let _ = w.tx.send(Reply { decision: Decision::Refused, summary });
                }
            }
        }
    }
}

impl Dispatcher {
    /// A dispatcher sending over HTTP ([`Http`]), with one queue worker per backend started on the current
    /// runtime. `startup` is what the log holds (see [`WriteLog::startup`]).
    ///
    /// # Errors
    /// When the HTTP client cannot be built (its TLS-less builder does not fail in practice).
    pub fn new(
        settings: DispatchSettings,
        metrics: Metrics,
        log: Arc<dyn WriteLog>,
        replays: Replays,
        startup: &Startup,
    ) -> Result<Self, reqwest::Error> {
        let http = Http::new(settings.pool_idle_timeout, settings.attempt_timeout)?;
        Ok(Self::with_transport(settings, metrics, log, replays, startup, Arc::new(http)))
    }

    /// A dispatcher sending through `transport`; see [`Dispatcher::new`].
    pub fn with_transport(
        settings: DispatchSettings,
        metrics: Metrics,
        log: Arc<dyn WriteLog>,
        replays: Replays,
        startup: &Startup,
        transport: Arc<dyn Transport>,
    ) -> Self {
        let labels: Vec<Arc<str>> = settings.pool.iter().map(|a| Arc::from(a.label())).collect();
        let (senders, receivers): (Vec<_>, Vec<_>) = settings.pool.iter().map(|_| mpsc::unbounded_channel()).unzip();
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            clients: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            metrics: metrics.clone(),
            log,
            replays,
            labels,
            queues: senders,
            enqueue: Mutex::new(()),
            next_seq: AtomicU64::new(startup.max_seq.map_or(0, |s| s + 1)),
            waiting: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            stop,
            answer_now: watch::channel(false).0,
            workers: Mutex::new(Vec::new()),
            statuses: Mutex::new(Vec::new()),
        });
        let mut workers = Vec::new();
        let mut statuses = Vec::new();
        for (index, rx) in receivers.into_iter().enumerate() {
            let addr = shared.settings.pool[index].clone();
            let counts = startup.backends.get(addr.label()).cloned().unwrap_or_default();
            let ctx = WorkerContext {
                index,
                metrics: metrics.backend(addr.label()),
                addr,
                log: shared.log.clone(),
                transport: transport.clone(),
                backoff: shared.settings.backoff,
                max_attempts: shared.settings.max_attempts,
                settings: shared.settings.queue,
                events: shared.clone(),
            };
            let worker = Worker::new(ctx, rx, stopped.clone(), counts);
            statuses.push(worker.status());
            workers.push(tokio::spawn(worker.run()));
        }
        *crate::lock(&shared.workers) = workers;
        *crate::lock(&shared.statuses) = statuses;
        Self { inner: Inner::Local(shared) }
    }

    /// A dispatcher on the NATS JetStream store, whose workers `cluster` runs.
    pub fn nats(cluster: Arc<Cluster>) -> Self {
        Self { inner: Inner::Nats(cluster) }
    }

    /// Accepts `request` for delivery to every backend: it takes its places in the backends' queues now (with
    /// its `ordering_key`, behind every earlier write of that key), and is sent once stored.
    ///
    /// # Errors
    /// [`SubmitError::Busy`] past `--max-in-flight` waiting clients or the pending bound,
    /// [`SubmitError::ShuttingDown`] once [`Dispatcher::close`] ran. Nothing is stored or sent in either case.
    pub fn submit(
        &self,
        id: Uuid,
        request: ForwardRequest,
        ordering_key: Option<&str>,
        idempotency: Option<(String, KeyRecord)>,
    ) -> Result<Submitted, SubmitError> {
        let shared = match &self.inner {
            Inner::Local(shared) => shared,
            Inner::Nats(cluster) => return cluster.submit(id, request, ordering_key, idempotency),
        };
        if shared.closing.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        if shared.log.unfinished() >= shared.pending_limit() {
            shared.metrics.rejected();
            if let Some(refused) = REFUSED_PENDING.hit() {
                tracing::warn!(
                    refused,
                    max_pending = shared.pending_limit(),
                    "writes refused with 503: --max-pending writes are pending"
                );
            }
            return Err(SubmitError::Busy);
        }
        let permit = match shared.clients.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                shared.metrics.rejected();
                if let Some(refused) = REFUSED_IN_FLIGHT.hit() {
                    tracing::warn!(
                        refused,
                        "writes refused with 503: --max-in-flight clients are waiting for their answer"
                    );
                }
                return Err(SubmitError::Busy);
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SubmitError::ShuttingDown),
        };
        let id = id.as_u128();
        let (tx, rx) = oneshot::channel();
        shared.waiting().insert(id, Waiter { tally: Tally::new(shared.settings.ack, shared.labels.len()), tx });
        let request = Arc::new(request);
        let key: Option<Arc<str>> = ordering_key.map(Arc::from);
        let accepted_at_ms = now_ms();
        let seq = {
            let _one_at_a_time = crate::lock(&shared.enqueue);
            let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
            shared.broadcast(|| {
                Msg::New(NewEntry { seq, id, request: request.clone(), key: key.clone(), accepted_at_ms })
            });
            seq
        };
        let labels = shared.labels.iter().map(|l| l.to_string()).collect();
        let record = StoredDelivery::from_request(seq, &request, ordering_key.map(str::to_owned), labels);
        tokio::spawn(shared.clone().store(id, seq, record, idempotency));
        Ok(Submitted {
            reply: rx,
            answer_now: shared.answer_now.subscribe(),
            _wait: Box::new(WaitGuard { shared: shared.clone(), id, _permit: permit }),
        })
    }

    /// Checks a client's idempotency key, reserving it for `id` when it is new.
    pub async fn check_key(&self, key: &str, body_hash: [u8; 32], id: Uuid) -> Check {
        match &self.inner {
            Inner::Local(shared) => shared.replays.check(key, body_hash, id.as_u128(), now_ms()),
            Inner::Nats(cluster) => cluster.check_key(key, body_hash, id.as_u128()).await,
        }
    }

    /// Releases a key reserved for a write that was refused.
    pub fn release_key(&self, key: &str, id: Uuid) {
        match &self.inner {
            Inner::Local(shared) => shared.replays.release(key, id.as_u128()),
            Inner::Nats(cluster) => cluster.release_key(key, id.as_u128()),
        }
    }

    /// Keeps the answer given under a key, for replays (and in the outbox, for replays after a restart).
    pub async fn answered(&self, key: &str, id: Uuid, record: KeyRecord, answer: StoredAnswer) {
        match &self.inner {
            Inner::Local(shared) => {
                shared.replays.answered(key, id.as_u128(), answer.clone());
                shared.log.answer(key, &KeyRecord { answer: Some(answer), ..record });
            }
            Inner::Nats(cluster) => cluster.answered(key, record, answer).await,
        }
    }

    /// A delivery as stored, or `None` when it is unknown (or older than the idempotency window).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn lookup(&self, id: Uuid) -> Result<Option<Summary>, LogError> {
        let shared = match &self.inner {
            Inner::Local(shared) => shared,
            Inner::Nats(cluster) => return cluster.lookup(id).await,
        };
        Ok(shared.log.view(id.as_u128()).await?.map(|v| Summary::from_view(id, v)))
    }

    /// Up to `limit` dead letters, of one backend (as written in `--backends`) or all.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn dead_letters(&self, backend: Option<String>, limit: usize) -> Result<Vec<DeadLetter>, LogError> {
        let shared = match &self.inner {
            Inner::Local(shared) => shared,
            Inner::Nats(cluster) => return cluster.dead_letters(backend, limit).await,
        };
        shared.log.dead_letters(DeadFilter { backend, id: None }, limit).await
    }

    /// How many dead letters there are, of one backend (as written in `--backends`) or all: the total that
    /// [`Dispatcher::dead_letters`] gives a page of.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn dead_letter_total(&self, backend: Option<String>) -> Result<u64, LogError> {
        match &self.inner {
            Inner::Local(shared) => shared.log.dead_letter_count(DeadFilter { backend, id: None }).await,
            Inner::Nats(cluster) => cluster.dead_letter_total(backend).await,
        }
    }

    /// Every backend's state in pool order: as its worker last published it (at most about a second old; see
    /// [`BackendStatus`]), or with the NATS store as this instance sees it (its own breaker and attempts; the
    /// lag and dead letters of the shared store, read every 2 s).
    pub fn backend_statuses(&self) -> Vec<BackendStatus> {
        match &self.inner {
            Inner::Local(shared) => crate::lock(&shared.statuses).iter().map(|rx| rx.borrow().clone()).collect(),
            Inner::Nats(cluster) => cluster.backend_statuses(),
        }
    }

    /// Puts dead letters (of one backend, of one delivery, or all) back in their queues with fresh attempts, in
    /// their original order; returns how many. Dead letters of backends no longer in the pool stay.
    ///
    /// # Errors
    /// When the store fails; nothing moved then.
    pub async fn redrive(&self, backend: Option<String>, id: Option<Uuid>) -> Result<usize, LogError> {
        let filter = DeadFilter { backend, id: id.map(|i| i.as_u128()) };
        let shared = match &self.inner {
            Inner::Local(shared) => shared,
            Inner::Nats(cluster) => return Ok(cluster.redrive(filter).await?.len()),
        };
        let pool = shared.labels.iter().map(|l| l.to_string()).collect();
        let moved = shared.log.redrive(filter, pool).await?;
        for (b, n) in per_backend(&moved) {
            shared.tell(b, Msg::Redriven(n));
        }
        Ok(moved.len())
    }

    /// Deletes dead letters for good (of one backend, of one delivery, or both); returns how many. The writes
    /// they held will not reach those backends.
    ///
    /// # Errors
    /// When the store fails; nothing is deleted then.
    pub async fn discard(&self, backend: Option<String>, id: Option<Uuid>) -> Result<usize, LogError> {
        let filter = DeadFilter { backend, id: id.map(|i| i.as_u128()) };
        let shared = match &self.inner {
            Inner::Local(shared) => shared,
            Inner::Nats(cluster) => return Ok(cluster.discard(filter).await?.len()),
        };
        let gone = shared.log.discard(filter).await?;
        for (b, n) in per_backend(&gone) {
            tracing::warn!(backend = b, n, "dead letters discarded: these writes will not reach this backend");
            shared.tell(b, Msg::Discarded(n));
        }
        Ok(gone.len())
    }

    /// Recovers backend `label` (of the pool): every write the history holds since `since_ms` is delivered to it
    /// again, in acceptance order, without holding back the other backends (see [`Msg::Recover`]). Resolves
    /// once the writes are queued, with the recovery's first status.
    ///
    /// # Errors
    /// When the log cannot read its history or record the recovery ([`LogError::Busy`] while another recovery of
    /// this backend is being started), or the worker is gone (shutting down).
    pub async fn recover(&self, label: &str, since_ms: u64) -> Result<RecoveryStatus, LogError> {
        let shared = match &self.inner {
            Inner::Local(shared) => shared,
            Inner::Nats(cluster) => return cluster.recover(label, since_ms).await,
        };
        let (done, answer) = oneshot::channel();
        shared.tell(label, Msg::Recover { since_ms, done });
        answer.await.map_err(|_| LogError::Closed)?
    }

    /// The latest recovery of every backend that had one, in pool order.
    pub async fn recoveries(&self) -> Vec<RecoveryStatus> {
        let shared = match &self.inner {
            Inner::Local(shared) => shared,
            Inner::Nats(cluster) => return cluster.recoveries().await,
        };
        let mut out = Vec::new();
        for q in &shared.queues {
            let (reply, answer) = oneshot::channel();
            if q.send(Msg::RecoveryStatus(reply)).is_ok()
                && let Ok(Some(status)) = answer.await
            {
                out.push(status);
            }
        }
        out
    }

    /// What the write log's history holds.
    pub fn history(&self) -> crate::log::HistoryStats {
        match &self.inner {
            Inner::Local(shared) => shared.log.history(),
            Inner::Nats(cluster) => cluster.history(),
        }
    }

    /// True when `label` is a backend of the pool.
    pub fn knows_backend(&self, label: &str) -> bool {
        match &self.inner {
            Inner::Local(shared) => shared.labels.iter().any(|l| &**l == label),
            Inner::Nats(cluster) => cluster.knows_backend(label),
        }
    }

    /// Deliveries not finished on every backend (pending, or a dead letter somewhere).
    pub fn unfinished(&self) -> u64 {
        match &self.inner {
            Inner::Local(shared) => shared.log.unfinished(),
            Inner::Nats(cluster) => cluster.unfinished(),
        }
    }

    /// True while new writes can be accepted (not shutting down, below the bounds, the store healthy).
    pub fn ready(&self) -> bool {
        match &self.inner {
            Inner::Local(shared) => {
                !shared.closing.load(Ordering::Acquire)
                    && shared.clients.available_permits() > 0
                    && shared.log.unfinished() < shared.pending_limit()
                    && shared.log.healthy()
            }
            Inner::Nats(cluster) => cluster.ready(),
        }
    }

    /// The ack policy.
    pub fn ack_policy(&self) -> AckPolicy {
        match &self.inner {
            Inner::Local(shared) => shared.settings.ack,
            Inner::Nats(cluster) => cluster.dispatch.ack,
        }
    }

    /// Stops accepting writes, lets the workers go on for most of `grace` (see [`Worker::run`]), then tells the
    /// clients still waiting to take a `202` now (so that each gets an answer before its connection closes),
    /// stops the workers, and makes the outbox durable. Returns the deliveries not finished on every backend.
    pub async fn close(&self, grace: Duration) -> u64 {
        let shared = match &self.inner {
            Inner::Local(shared) => shared,
            Inner::Nats(cluster) => return cluster.close(grace).await,
        };
        shared.closing.store(true, Ordering::Release);
        let _ = shared.stop.send(true);
        let workers = std::mem::take(&mut *crate::lock(&shared.workers));
        let aborts: Vec<_> = workers.iter().map(JoinHandle::abort_handle).collect();
        // The last tenth (at most a second) is for answering the clients still waiting.
        let work = grace.saturating_sub((grace / 10).min(Duration::from_secs(1)));
        let drained = tokio::time::timeout(work, futures_util::future::join_all(workers)).await.is_ok();
        let _ = shared.answer_now.send(true);
        if !drained {
            for a in aborts {
                a.abort();
            }
        }
        if let Err(err) = shared.log.flush().await {
            tracing::error!(error = %err, "outbox: final flush failed");
        }
        shared.log.unfinished()
    }

    /// True when accepted writes are kept in a durable outbox.
    pub fn durable(&self) -> bool {
        match &self.inner {
            Inner::Local(shared) => shared.log.durable(),
            Inner::Nats(_) => true,
        }
    }
}

/// How many of `rows` (backend, order) each backend has.
fn per_backend(rows: &[(String, u64)]) -> HashMap<&str, u64> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for (b, _) in rows {
        *counts.entry(b.as_str()).or_default() += 1;
    }
    counts
}
