//! The write log: the one seam between the delivery engine and its storage.
//!
//! Everything durable goes through [`WriteLog`]: the dispatcher appends each accepted write with its
//! per-backend entries; the queue workers read their backend's pending entries in order and settle them
//! (delivered, a dead letter, or due again); the admin routes list, redrive and discard dead letters and show a
//! delivery; the replay cache stores its client idempotency records there. Nothing else in the crate knows how
//! the log is kept. It serves one process's queue workers; the NATS JetStream store, whose queues are consumers
//! shared by every instance, sits one level up behind the dispatcher ([`crate::jetstream`]).
//!
//! # Implementations
//! - [`disk::DiskLog`]: append-only segment files in `DATA_DIR/log/` with group commit ([`segments`]) and an
//!   in-memory [`index`] rebuilt from them at start; the log is also the history a recovery replays.
//!   With a key file ([`seal`]) the records that carry what clients sent are encrypted.
//! - [`memory::MemoryLog`]: plain maps under one lock, for `--no-outbox`: nothing survives the process, and no
//!   store work is paid for.
//!
//! # Rules every implementation keeps
//! - [`WriteLog::append`] resolves only once the write and its entries are durable (for a durable log): only then
//!   may anything be sent, and only then may its client be told anything.
//! - A backend's entries come back from [`WriteLog::pending`] in acceptance order (`seq`), which is what per-user
//!   order on every backend rests on: the workers rebuild each user's FIFO from it.
//! - Settlements ([`WriteLog::settle`]) may be made durable lazily: after a crash an entry may be attempted again,
//!   which the `Idempotency-Key` every attempt carries makes harmless. A late settlement never revives an entry
//!   that is already finished.
//! - Reads see every operation sent before them on the same handle.

pub mod disk;
pub mod index;
pub mod memory;
pub mod seal;
pub mod segments;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::forward::ForwardRequest;
use crate::replay::KeyRecord;

/// A failure of the write log. Clients get `503` for it; the cause goes to the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The log's directory or file cannot be created, opened or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The segment files of the disk log failed: an I/O error, a damaged sealed segment, or the log is closed.
    #[error("segment files: {0}")]
    Segment(#[source] Arc<segments::SegmentError>),
    /// A task doing the log's blocking work (reads, a history scan, deleting segments) failed.
    #[error("a write log task failed: {0}")]
    Task(#[source] Arc<tokio::task::JoinError>),
    /// A record is not what its place says it must be (a damaged or foreign file).
    #[error("the write log is inconsistent: {0}")]
    Corrupt(String),
    /// A stored record does not decode (a file written by an incompatible version, or damaged).
    #[error("a stored record does not decode: {0}")]
    Decode(#[from] postcard::Error),
    /// An encrypted record cannot be opened: its key is not in `--encryption-key-file` (or no key file is
    /// given), or it does not authenticate (see [`seal`]). At start this refuses the start, naming the flag.
    #[error("--encryption-key-file (ENCRYPTION_KEY_FILE): {0}")]
    Sealed(String),
    /// The NATS JetStream store failed (`--store nats://...`): what was being done, and the client's error.
    #[error("NATS store: {0}")]
    Nats(String),
    /// The NATS store refused the write for good (the stream is at `--history-max-bytes`): not stored.
    #[error("NATS store refused it: {0}")]
    NatsRefused(String),
    /// The operation cannot run now (the reason says why); try again later.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// The log's writer is gone (the process is stopping).
    #[error("the write log is closed")]
    Closed,
}

impl LogError {
    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LogError::Io { what: what.into(), source: Arc::new(source) }
    }
}

/// Where one backend's entry for a write ended, as a queue worker reports it to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settlement {
    /// The backend answered `2xx`: the entry leaves the queue; the delivery's record keeps its outcome.
    Delivered {
        /// The delivery.
        id: u128,
        /// What is kept of it for `GET /deliveries/{id}`.
        row: DeliveredRow,
    },
    /// The entry moves to the backend's dead letters.
    Dead(DeadRow),
    /// The attempt failed and the entry waits for its next one: its progress (advisory: may be dropped when the
    /// log is busy, at the cost of an attempt or two repeated after a restart).
    DueAgain(QueueRow),
}

/// Which dead letters an admin operation applies to: those of one backend, of one delivery, of both, or all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadFilter {
    /// The backend, as written in `--backends`.
    pub backend: Option<String>,
    /// The delivery.
    pub id: Option<u128>,
}

/// The write log; see the module doc for the rules every implementation keeps. Methods return boxed futures
/// that own what they need (`'static`), so that callers can hold them across their own awaits and the trait can
/// be used as `Arc<dyn WriteLog>`.
pub trait WriteLog: Send + Sync + 'static {
    /// True when accepted writes survive a restart (not `--no-outbox`).
    fn durable(&self) -> bool;

    /// False after a failed commit, until one succeeds again (readiness reports it).
    fn healthy(&self) -> bool;

    /// Deliveries stored and not yet finished on every backend (dead letters count as not finished).
    fn unfinished(&self) -> u64;

    /// At start: counts what each backend of `pool` (labels as written in `--backends`) holds, lets entries of a
    /// backend written another way follow it, and moves the entries of backends no longer in the pool to their
    /// dead letters (reason `backend_removed`), so that nothing is dropped silently.
    fn startup(&self, pool: Vec<String>) -> BoxFuture<'static, Result<Startup, LogError>>;

    /// Appends an accepted write with one pending entry per backend of `write.backends`, and the client's
    /// idempotency record if any; resolves once durable. Nothing may be sent before, and nothing is stored when
    /// it fails.
    fn append(
        &self,
        id: u128,
        write: StoredDelivery,
        key: Option<(&str, &KeyRecord)>,
    ) -> BoxFuture<'static, Result<(), LogError>>;

    /// Settles backend `backend`'s entry `seq`. Resolves once the log took it (back-pressure), not once durable.
    fn settle(&self, backend: &Arc<str>, seq: u64, settlement: Settlement) -> BoxFuture<'static, ()>;

    /// When every backend refused delivery `id` (each holds it as a `rejected` dead letter), removes those dead
    /// letters and keeps the outcome as `refused`: the write was applied nowhere, so there is nothing to redrive
    /// and it must not hold the bounds. Returns the backends whose dead letter was removed (empty otherwise).
    fn drop_refused(&self, id: u128) -> BoxFuture<'static, Vec<String>>;

    /// Up to `limit` pending entries of `backend`, oldest first, leaving out the orders in `skip` (the entries the
    /// caller holds already) and, when `below` is given, every order from it on; each with its write.
    fn pending(
        &self,
        backend: &Arc<str>,
        skip: HashSet<u64>,
        limit: usize,
        below: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<Loaded>, LogError>>;

    /// Up to `limit` dead letters matching `filter`, oldest first per backend.
    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> BoxFuture<'static, Result<Vec<DeadLetter>, LogError>>;

    /// How many dead letters match `filter`: the total a page of [`WriteLog::dead_letters`] is part of. The
    /// default lists them all and counts; a store with an index overrides it with a count.
    fn dead_letter_count(&self, filter: DeadFilter) -> BoxFuture<'static, Result<u64, LogError>> {
        let all = self.dead_letters(filter, usize::MAX);
        Box::pin(async move { Ok(all.await?.len() as u64) })
    }

    /// Moves the dead letters matching `filter` back to their backend's queue with fresh attempts, durably; only
    /// those of backends in `pool` (a queue with no worker would keep them for good). Returns the (backend,
    /// order) of every entry moved.
    fn redrive(
        &self,
        filter: DeadFilter,
        pool: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>>;

    /// Deletes the dead letters matching `filter` for good, durably; their outcome stays visible as
    /// `discarded`. Returns the (backend, order) of every dead letter deleted.
    fn discard(&self, filter: DeadFilter) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>>;

    /// A delivery as stored, or `None` when it is unknown or forgotten.
    fn view(&self, id: u128) -> BoxFuture<'static, Result<Option<DeliveryView>, LogError>>;

    /// Records the answer given under a client's idempotency key (advisory, like progress).
    fn answer(&self, key: &str, record: &KeyRecord);

    /// The idempotency records younger than `window_ms` at `now` (ms since the epoch), oldest first; older ones
    /// are deleted.
    fn idempotency_keys(
        &self,
        window_ms: u64,
        now: u64,
    ) -> BoxFuture<'static, Result<Vec<(String, KeyRecord)>, LogError>>;

    /// Makes everything recorded so far durable; used at shutdown.
    fn flush(&self) -> BoxFuture<'static, Result<(), LogError>>;

    /// Once a second from the service: makes recent settlements durable, bounds the finished deliveries kept
    /// for `GET /deliveries/{id}` to `keep_delivered` backend outcomes, and now and then deletes idempotency
    /// records older than `window_ms`.
    fn tick(&self, window_ms: u64, keep_delivered: u64);

    /// What the history holds now: see [`HistoryStats`].
    fn history(&self) -> HistoryStats;

    /// Recovery of one backend: every write accepted since `since_ms` (ms since the epoch) that the history
    /// still holds gets an entry in `backend`'s queue at its original acceptance order (unless it has one there
    /// already; a dead letter of the backend goes back to its queue), durably, so that the backend gets it again with its original
    /// `Idempotency-Key`. The backend's worker must not be sending while this runs (see
    /// [`crate::queue::Msg::Recover`]), and must read its queue again afterwards.
    fn recover(&self, backend: &Arc<str>, since_ms: u64) -> BoxFuture<'static, Result<Recovered, LogError>>;

    /// Makes everything recorded so far durable and releases the storage (it can be opened again); later appends
    /// fail with [`LogError::Closed`] (or are not recorded, for the lazy ones); reads may still answer.
    fn close(&self) -> BoxFuture<'static, ()>;
}

/// How much history the log keeps: every accepted write, delivered or not, for `window_ms` and at most
/// `max_bytes` (the oldest go first); writes still pending or dead-lettered are never dropped for either bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// How long, in milliseconds (`--history-window`).
    pub window_ms: u64,
    /// How many bytes at most (`--history-max-bytes`; encoded writes, or segment files on disk).
    pub max_bytes: u64,
}

/// What the history holds, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Bytes kept.
    pub bytes: u64,
    /// When the oldest write kept was accepted, ms since the epoch (`None`: nothing kept).
    pub oldest_ms: Option<u64>,
}

/// What [`WriteLog::recover`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Entries added to the backend's queue (dead letters of the backend included).
    pub queued: u64,
    /// Of those, how many were the backend's dead letters.
    pub from_dead_letters: u64,
    /// The newest acceptance order the recovery covers (later writes reach the backend as usual).
    pub upto_seq: Option<u64>,
    /// The backend's entries pending with an order up to `upto_seq`, after the recovery (what it has left to
    /// catch up with).
    pub pending_upto: u64,
    /// When the oldest write the history held was accepted.
    pub oldest_ms: Option<u64>,
    /// The newest acceptance time of the writes the history has dropped (`None`: it never dropped any). A
    /// recovery since a time at or before it could not bring every write back.
    pub dropped_upto_ms: Option<u64>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The acceptance time in a UUIDv7 delivery id, milliseconds since the Unix epoch (0 for another version).
pub fn id_time_ms(id: u128) -> u64 {
    uuid::Uuid::from_u128(id).get_timestamp().map_or(0, |t| {
        let (secs, nanos) = t.to_unix();
        secs * 1000 + u64::from(nanos / 1_000_000)
    })
}

/// The backend a label names, as a URL: `host:port` and `http://host:port` name the same backend.
fn backend_url(label: &str) -> Option<String> {
    label.parse::<crate::backend::BackendAddr>().ok().map(|a| a.url().to_string())
}

/// How a finished backend outcome shows in `GET /deliveries/{id}`: a `2xx` is delivered, status 0 a dead letter
/// an operator deleted (see [`WriteLog::discard`]), any other status a write every backend refused (see
/// [`WriteLog::drop_refused`]).
fn delivered_view(backend: &str, row: DeliveredRow) -> BackendView {
    let (state, outcome, reason) = match row.status {
        0 => (BackendState::Discarded, None, Some("discarded")),
        200..=299 => (BackendState::Delivered, Some("success"), None),
        _ => (BackendState::Refused, Some("rejected"), Some("refused_everywhere")),
    };
    BackendView {
        backend: backend.to_owned(),
        state,
        attempts: row.attempts,
        status: (row.status != 0).then_some(row.status),
        outcome: outcome.map(str::to_owned),
        reason: reason.map(str::to_owned),
        next_attempt_at: None,
    }
}

/// `ms` since the epoch as RFC 3339 with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// A write as stored: everything needed to deliver it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDelivery {
    /// Acceptance order (per-user ordering is rebuilt from it at start).
    pub seq: u64,
    /// When it was accepted, milliseconds since the Unix epoch.
    pub accepted_at_ms: u64,
    /// The client's method.
    pub method: String,
    /// The client's path and query.
    pub path_and_query: String,
    /// The forwarded headers, names and raw values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// The per-user ordering key, if any.
    pub ordering_key: Option<String>,
    /// The backend pool when it was accepted, as written in `--backends`: who needs the write, whatever the pool
    /// is at a later start (reordered, shrunk, a backend written another way).
    pub backends: Vec<String>,
}

impl StoredDelivery {
    /// The record of `request`, accepted now with acceptance order `seq`.
    pub fn from_request(
        seq: u64,
        request: &ForwardRequest,
        ordering_key: Option<String>,
        backends: Vec<String>,
    ) -> Self {
        StoredDelivery {
            seq,
            accepted_at_ms: now_ms(),
            method: request.method.as_str().to_owned(),
            path_and_query: request.path_and_query.clone(),
            headers: request.headers.iter().map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec())).collect(),
            body: request.body.to_vec(),
            ordering_key,
            backends,
        }
    }

    /// The request again, or `None` when a stored method or header is not valid HTTP any more.
    pub fn to_request(&self) -> Option<ForwardRequest> {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            headers.append(HeaderName::from_bytes(name.as_bytes()).ok()?, HeaderValue::from_bytes(value).ok()?);
        }
        Some(ForwardRequest {
            method: Method::from_bytes(self.method.as_bytes()).ok()?,
            path_and_query: self.path_and_query.clone(),
            headers,
            body: Bytes::from(self.body.clone()),
        })
    }
}

/// One backend's queue entry for one delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRow {
    /// The delivery.
    pub id: u128,
    /// Attempts made so far (probes of an open breaker are not counted).
    pub attempts: u32,
    /// When the next attempt is due, milliseconds since the Unix epoch (0: at once).
    pub due_ms: u64,
    /// The status of the last answer, if any.
    pub last_status: Option<u16>,
    /// The class of the last attempt ([`crate::backend::Outcome::as_str`]), if any.
    pub last_outcome: Option<String>,
}

/// One backend's dead letter for one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadRow {
    /// The delivery.
    pub id: u128,
    /// Attempts made.
    pub attempts: u32,
    /// Why ([`crate::metrics::DeadLetterReason::as_str`]).
    pub reason: String,
    /// The status of the last answer, if any.
    pub last_status: Option<u16>,
    /// The class of the last attempt, if known.
    pub last_outcome: Option<String>,
    /// When it became a dead letter, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// How one backend's part of a delivery ended, kept for `GET /deliveries/{id}`: delivered (a `2xx` status),
/// refused by every backend (their `4xx`; see [`WriteLog::drop_refused`]), or deleted as a dead letter (status 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredRow {
    /// Attempts made, the last one included.
    pub attempts: u32,
    /// The backend's last status: `201` when delivered, its refusal, or 0 for a deleted dead letter.
    pub status: u16,
    /// The backend's place in the pool, to list a finished delivery's backends in pool order.
    pub position: u16,
}

/// A queue entry read back from the store, with its write.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Acceptance order.
    pub seq: u64,
    /// The entry.
    pub row: QueueRow,
    /// The write.
    pub delivery: StoredDelivery,
}

/// Where a delivery stands on one backend, as `GET /deliveries/{id}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// In the backend's queue.
    Pending,
    /// The backend answered `201`.
    Delivered,
    /// In the backend's dead letters.
    DeadLetter,
    /// Was a dead letter, deleted by an operator: the backend will not get it.
    Discarded,
    /// Every backend refused the write: applied nowhere, nothing to redrive.
    Refused,
}

/// One backend's part of a delivery, as stored.
#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    /// The backend as written in `--backends`; empty (and left out of the JSON) in the view clients get.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub backend: String,
    /// Where it stands.
    pub state: BackendState,
    /// Attempts made so far.
    pub attempts: u32,
    /// The status of the last answer, if any.
    pub status: Option<u16>,
    /// The class of the last attempt, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Why it became a dead letter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the next attempt is due (RFC 3339), while it waits in backoff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

impl BackendView {
    /// Backend `backend`'s part of a delivery not attempted yet: pending, nothing known.
    pub fn pending(backend: String) -> Self {
        BackendView {
            backend,
            state: BackendState::Pending,
            attempts: 0,
            status: None,
            outcome: None,
            reason: None,
            next_attempt_at: None,
        }
    }
}

/// A delivery as stored: when it was accepted and each backend's part.
#[derive(Debug, Clone)]
pub struct DeliveryView {
    /// When it was accepted, milliseconds since the Unix epoch.
    pub accepted_at_ms: u64,
    /// One entry per backend of the pool at acceptance, in that order.
    pub backends: Vec<BackendView>,
}

/// One dead letter, as `GET /dead-letters` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The delivery id.
    pub delivery_id: uuid::Uuid,
    /// The backend that did not get the write.
    pub backend: String,
    /// Acceptance order (redrive keeps it).
    pub seq: u64,
    /// The route of the write (without its query string).
    pub path: String,
    /// Attempts made.
    pub attempts: u32,
    /// Why.
    pub reason: String,
    /// The status of the last answer, if any.
    pub last_status: Option<u16>,
    /// When it became a dead letter (RFC 3339).
    pub dead_at: String,
}

/// What the store holds per backend at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendCounts {
    /// Queue entries.
    pub pending: u64,
    /// Dead letters.
    pub dead: u64,
}

/// What [`WriteLog::startup`] found.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    /// Counts per backend of today's pool.
    pub backends: HashMap<String, BackendCounts>,
    /// The highest acceptance order stored (new ones continue after it).
    pub max_seq: Option<u64>,
    /// Queue entries of backends no longer in the pool, moved to their dead letters.
    pub orphaned: u64,
}
