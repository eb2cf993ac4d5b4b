//! The outbox: every accepted write is stored, with each backend's queue entry for it, before the client is told
//! anything, and stays there until every backend has it (or it became a dead letter there), so that a crash or
//! restart of fanout loses no write and a dead backend costs disk, not memory (issues "no lost, duplicated or
//! reordered writes" and "backend health and retry discipline").
//!
//! Storage is [redb](https://docs.rs/redb): an embedded, pure-Rust, ACID key-value store in one file
//! (`DATA_DIR/outbox.redb`). It was chosen over SQLite (a C dependency and a SQL layer we do not need) and fjall
//! (an LSM tree, built for write volumes far above ours): fanout needs small transactional updates of a few keys
//! and ordered range scans per backend. With `--no-outbox` the same tables live in redb's in-memory backend, so
//! both modes run the same code; only durability differs.
//!
//! One writer thread owns the database and **groups commits**: it takes every operation waiting in its queue (up
//! to [`MAX_BATCH`]) into one transaction, so that many concurrent writes share one fsync. Acceptances and
//! redrives are committed durably and their senders are answered only then; progress and completion records are
//! committed without fsync (redb's `Durability::None`), so they reach the disk with the next durable commit, or
//! within a second (the service's tick asks for an empty durable commit when there are any): after a crash, a
//! backend's delivery may be attempted again, which the `Idempotency-Key` makes harmless. Reads are served after
//! the writes of their batch, so a reader sees every operation sent before it on the same handle.
//!
//! After a failed commit (a full disk, an I/O error) redb refuses every transaction until the database is
//! reopened, so the writer closes it and reopens it for the next batch.
//!
//! Tables:
//! - `deliveries`: delivery id (u128) -> [`StoredDelivery`] (postcard): order, method, path, headers, body, key.
//! - `refs`: delivery id -> how many backends still hold it (queue entries plus dead letters); at 0 the
//!   delivery is removed.
//! - `queue`: (backend, acceptance order) -> [`QueueRow`]: the backend's queue, oldest first.
//! - `dead`: (backend, acceptance order) -> [`DeadRow`]: the backend's dead letters.
//! - `delivered`: (delivery id, backend) -> [`DeliveredRow`], for `GET /deliveries/{id}` after a delivery has
//!   finished; the newest rows are kept (`--delivery-history` deliveries' worth; delivery ids are UUIDv7, so the
//!   oldest come first and are pruned every second).
//! - `idempotency`: client `Idempotency-Key` -> [`KeyRecord`] (postcard), kept for the replay window.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::forward::ForwardRequest;
use crate::replay::KeyRecord;

/// Operations taken into one write transaction at most.
pub const MAX_BATCH: usize = 1024;
/// redb's page cache; its default (1 GiB) would let the memory of a long backlog grow with the file.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Operations waiting for the writer thread at most; senders wait beyond (back-pressure, not memory).
const QUEUE: usize = 8192;

const DELIVERIES: TableDefinition<u128, &[u8]> = TableDefinition::new("deliveries");
const REFS: TableDefinition<u128, u32> = TableDefinition::new("refs");
const QUEUED: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead");
const DELIVERED: TableDefinition<(u128, &str), &[u8]> = TableDefinition::new("delivered");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");

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
    /// The backend pool when it was accepted, as written in `--backends`: the `pending` rows' backend indexes
    /// point into this list, so a restart with the pool reordered or shrunk still knows who needs the write.
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
/// refused by every backend (their `4xx`; see [`Outbox::drop_refused`]), or deleted as a dead letter (status 0).
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
    /// The backend as written in `--backends`.
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

/// What [`Outbox::startup`] found.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    /// Counts per backend of today's pool.
    pub backends: HashMap<String, BackendCounts>,
    /// The highest acceptance order stored (new ones continue after it).
    pub max_seq: Option<u64>,
    /// Queue entries of backends no longer in the pool, moved to their dead letters.
    pub orphaned: u64,
}

/// A failure of the store. The message is for the log; clients get `503`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("outbox: {0}")]
pub struct StoreError(String);

impl StoreError {
    fn from<E: std::fmt::Display>(e: E) -> Self {
        StoreError(e.to_string())
    }
}

type Done<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    Accept {
        id: u128,
        seq: u64,
        record: Vec<u8>,
        backends: Vec<String>,
        key: Option<(String, Vec<u8>)>,
        done: Done<()>,
    },
    Answer {
        key: String,
        record: Vec<u8>,
    },
    Flush {
        done: Done<()>,
    },
    Progress {
        backend: Arc<str>,
        seq: u64,
        row: QueueRow,
    },
    Delivered {
        backend: Arc<str>,
        seq: u64,
        id: u128,
        row: DeliveredRow,
    },
    DeadLetter {
        backend: Arc<str>,
        seq: u64,
        row: DeadRow,
    },
    DropRefused {
        id: u128,
        done: Done<Vec<String>>,
    },
    Tick {
        window_ms: u64,
        keep_delivered: u64,
    },
    /// Made by the writer from a tick: applied with the batch's writes.
    Trim {
        keep_delivered: u64,
    },
    Load {
        backend: Arc<str>,
        skip: HashSet<u64>,
        limit: usize,
        done: Done<Vec<Loaded>>,
    },
    Redrive {
        backend: Option<String>,
        id: Option<u128>,
        pool: Vec<String>,
        done: Done<Vec<(String, u64)>>,
    },
    Discard {
        backend: Option<String>,
        id: Option<u128>,
        done: Done<Vec<(String, u64)>>,
    },
    DeadLetters {
        backend: Option<String>,
        limit: usize,
        done: Done<Vec<DeadLetter>>,
    },
    View {
        id: u128,
        done: Done<Option<DeliveryView>>,
    },
    Startup {
        pool: Vec<String>,
        done: Done<Startup>,
    },
    Keys {
        window_ms: u64,
        now: u64,
        done: Done<Vec<(String, KeyRecord)>>,
    },
}

impl Op {
    /// True for the operations applied together in the batch's write transaction.
    fn is_batched_write(&self) -> bool {
        matches!(
            self,
            Op::Accept { .. }
                | Op::Answer { .. }
                | Op::Flush { .. }
                | Op::Progress { .. }
                | Op::Delivered { .. }
                | Op::DeadLetter { .. }
                | Op::DropRefused { .. }
        )
    }
}

/// Handle to the outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    ops: mpsc::Sender<Op>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    healthy: Arc<AtomicBool>,
    unfinished: Arc<AtomicU64>,
    durable: bool,
}

impl Outbox {
    /// Opens (or creates) `dir/outbox.redb` and starts the writer thread.
    ///
    /// # Errors
    /// When the directory cannot be created or the file cannot be opened for writing.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::from)?;
        let path = dir.join("outbox.redb");
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(&path).map_err(StoreError::from)?;
        Self::start(db, Some(path))
    }

    /// The same tables in memory (`--no-outbox`): nothing survives the process.
    ///
    /// # Errors
    /// When the writer thread cannot be started.
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(StoreError::from)?;
        Self::start(db, None)
    }

    fn start(db: Database, path: Option<PathBuf>) -> Result<Self, StoreError> {
        // Create the tables (and prove the file is writable) before accepting anything.
        let txn = db.begin_write().map_err(StoreError::from)?;
        txn.open_table(DELIVERIES).map_err(StoreError::from)?;
        let unfinished = txn.open_table(REFS).map_err(StoreError::from)?.len().map_err(StoreError::from)?;
        txn.open_table(QUEUED).map_err(StoreError::from)?;
        txn.open_table(DEAD).map_err(StoreError::from)?;
        txn.open_table(DELIVERED).map_err(StoreError::from)?;
        txn.open_table(IDEMPOTENCY).map_err(StoreError::from)?;
        txn.commit().map_err(StoreError::from)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let unfinished = Arc::new(AtomicU64::new(unfinished));
        let durable = path.is_some();
        let writer_state = Writer {
            db: Some(db),
            path,
            healthy: healthy.clone(),
            unfinished: unfinished.clone(),
            dirty: false,
            trim_due: false,
            ticks: 0,
        };
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer_state.run(rx))
            .map_err(StoreError::from)?;
        Ok(Self { ops: tx, writer: Arc::new(std::sync::Mutex::new(Some(handle))), healthy, unfinished, durable })
    }

    /// True when the store is a file (not `--no-outbox`).
    pub fn durable(&self) -> bool {
        self.durable
    }

    /// False after a failed commit, until one succeeds again (readiness reports it).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Deliveries stored and not yet finished on every backend (dead letters count as not finished).
    pub fn unfinished(&self) -> u64 {
        self.unfinished.load(Ordering::Relaxed)
    }

    /// Once a second: makes recent progress durable when there was any, keeps only the newest `keep_delivered`
    /// delivered records, and (every minute) deletes expired idempotency records, so that none of it waits for
    /// the next write.
    pub fn tick(&self, window_ms: u64, keep_delivered: u64) {
        let _ = self.ops.try_send(Op::Tick { window_ms, keep_delivered });
    }

    /// Waits until every operation sent so far is committed, and closes the file. Call on the last handle: the
    /// writer stops when every handle is gone.
    pub fn close(self) {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(self.ops);
        if let Some(handle) = writer {
            let _ = handle.join();
        }
    }

    async fn call<T>(&self, op: impl FnOnce(Done<T>) -> Op) -> Result<T, StoreError> {
        let (done, wait) = oneshot::channel();
        self.ops.send(op(done)).await.map_err(|_| gone())?;
        wait.await.map_err(|_| gone())?
    }

    /// Stores a new delivery with acceptance order `seq` and one queue entry per backend of `backends` (labels),
    /// durably: resolves once it is on disk.
    ///
    /// # Errors
    /// When the store fails or its writer is gone; nothing must be sent then.
    pub async fn accept(
        &self,
        id: u128,
        delivery: &StoredDelivery,
        key: Option<(&str, &KeyRecord)>,
    ) -> Result<(), StoreError> {
        let record = postcard::to_allocvec(delivery).map_err(StoreError::from)?;
        let key = match key {
            Some((k, r)) => Some((k.to_owned(), postcard::to_allocvec(r).map_err(StoreError::from)?)),
            None => None,
        };
        let backends = delivery.backends.clone();
        let seq = delivery.seq;
        self.call(|done| Op::Accept { id, seq, record, backends, key, done }).await
    }

    /// Records a queue entry's progress (not fsynced on its own). Advisory: dropped when the writer's queue is
    /// full (a restart then repeats an attempt or two, which the schedule and `Idempotency-Key` absorb).
    pub fn progress(&self, backend: &Arc<str>, seq: u64, row: QueueRow) {
        let _ = self.ops.try_send(Op::Progress { backend: backend.clone(), seq, row });
    }

    /// Removes a backend's queue entry after a `201`; removes the delivery once no backend holds it.
    pub async fn delivered(&self, backend: &Arc<str>, seq: u64, id: u128, row: DeliveredRow) {
        let _ = self.ops.send(Op::Delivered { backend: backend.clone(), seq, id, row }).await;
    }

    /// When every backend refused delivery `id` (each holds it as a `rejected` dead letter), removes those dead
    /// letters and the delivery: the write was applied nowhere, so no backend diverged and there is nothing to
    /// redrive (its client was told). Returns the backends whose dead letter was removed (empty otherwise).
    pub async fn drop_refused(&self, id: u128) -> Vec<String> {
        self.call(|done| Op::DropRefused { id, done }).await.unwrap_or_default()
    }

    /// Moves a backend's queue entry to its dead letters.
    pub async fn dead_letter(&self, backend: &Arc<str>, seq: u64, row: DeadRow) {
        let _ = self.ops.send(Op::DeadLetter { backend: backend.clone(), seq, row }).await;
    }

    /// Up to `limit` queue entries of `backend`, oldest first, leaving out the orders in `skip` (the entries the
    /// caller holds already), each with its write.
    ///
    /// # Errors
    /// When the store cannot be read, or a record does not decode.
    pub async fn load(&self, backend: &Arc<str>, skip: HashSet<u64>, limit: usize) -> Result<Vec<Loaded>, StoreError> {
        let backend = backend.clone();
        self.call(|done| Op::Load { backend, skip, limit, done }).await
    }

    /// Moves dead letters back to their backend's queue with fresh attempts, durably: those of one backend, of
    /// one delivery, of both, or all; only those of backends in `pool` (a queue with no worker would keep them
    /// for good). Returns the (backend, order) of every entry moved.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn redrive(
        &self,
        backend: Option<String>,
        id: Option<u128>,
        pool: Vec<String>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.call(|done| Op::Redrive { backend, id, pool, done }).await
    }

    /// Deletes dead letters for good (of one backend, of one delivery, of both, or all), durably; a delivery no
    /// backend holds any more is removed. Returns the (backend, order) of every dead letter deleted.
    ///
    /// # Errors
    /// When the store fails; nothing is deleted then.
    pub async fn discard(&self, backend: Option<String>, id: Option<u128>) -> Result<Vec<(String, u64)>, StoreError> {
        self.call(|done| Op::Discard { backend, id, done }).await
    }

    /// Up to `limit` dead letters, of one backend or all, oldest first per backend.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn dead_letters(&self, backend: Option<String>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.call(|done| Op::DeadLetters { backend, limit, done }).await
    }

    /// A delivery as stored, if it is known.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn view(&self, id: u128) -> Result<Option<DeliveryView>, StoreError> {
        self.call(|done| Op::View { id, done }).await
    }

    /// At start: counts what each backend of `pool` holds, and moves the queue entries of backends no longer in
    /// the pool to their dead letters (reason `backend_removed`), so that nothing is dropped silently.
    ///
    /// # Errors
    /// When the store cannot be read or written.
    pub async fn startup(&self, pool: Vec<String>) -> Result<Startup, StoreError> {
        self.call(|done| Op::Startup { pool, done }).await
    }

    /// Makes everything recorded so far durable (one fsync); used at shutdown.
    ///
    /// # Errors
    /// When the store fails or its writer is gone.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(|done| Op::Flush { done }).await
    }

    /// Records the answer given under an idempotency key (not fsynced on its own; advisory like progress).
    pub fn answer(&self, key: &str, record: &KeyRecord) {
        if let Ok(record) = postcard::to_allocvec(record) {
            let _ = self.ops.try_send(Op::Answer { key: key.to_owned(), record });
        }
    }

    /// The idempotency records younger than `window_ms`, oldest first; older ones are deleted.
    ///
    /// # Errors
    /// When the store cannot be read or written.
    pub async fn idempotency_keys(&self, window_ms: u64, now: u64) -> Result<Vec<(String, KeyRecord)>, StoreError> {
        self.call(|done| Op::Keys { window_ms, now, done }).await
    }
}

fn gone() -> StoreError {
    StoreError("the writer thread is gone".into())
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

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(StoreError::from)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(StoreError::from)
}

/// The writer thread's state: it alone holds the database, so that it can close and reopen it after an I/O
/// error (redb refuses every transaction after one until then).
struct Writer {
    db: Option<Database>,
    /// The file; `None` for the in-memory store (which is never reopened: it cannot fail on I/O).
    path: Option<PathBuf>,
    healthy: Arc<AtomicBool>,
    unfinished: Arc<AtomicU64>,
    /// A commit without fsync happened since the last one with.
    dirty: bool,
    /// Delivered records were added since the last trim.
    trim_due: bool,
    ticks: u64,
}

impl Writer {
    /// One transaction per batch of waiting operations.
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.handle(batch);
        }
    }

    /// The database, reopened if a failure closed it.
    fn db(&mut self) -> Result<&Database, StoreError> {
        if self.db.is_none()
            && let Some(path) = &self.path
        {
            self.db = Some(Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(StoreError::from)?);
            tracing::info!(path = %path.display(), "outbox reopened");
        }
        self.db.as_ref().ok_or_else(gone)
    }

    fn failed(&mut self, e: &StoreError) {
        tracing::error!(error = %e, "outbox failure: the database is closed and will be reopened");
        self.healthy.store(false, Ordering::Relaxed);
        if self.path.is_some() {
            self.db = None;
        }
    }

    /// Runs `f` in a write transaction of its own (durable), handling a failure like a failed batch.
    fn own_txn<T>(
        &mut self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = self.db().and_then(|db| {
            let txn = db.begin_write().map_err(StoreError::from)?;
            let out = f(&txn)?;
            txn.commit().map_err(StoreError::from)?;
            Ok(out)
        });
        match &r {
            Ok(_) => self.dirty = false,
            Err(e) => self.failed(e),
        }
        r
    }

    fn handle(&mut self, batch: Vec<Op>) {
        let (mut writes, others): (Vec<Op>, Vec<Op>) = batch.into_iter().partition(Op::is_batched_write);
        for op in &others {
            if let Op::Tick { keep_delivered, .. } = op {
                if std::mem::take(&mut self.trim_due) {
                    writes.push(Op::Trim { keep_delivered: *keep_delivered });
                }
                if self.dirty {
                    // An empty commit with fsync makes every earlier commit without it durable.
                    let (done, _) = oneshot::channel();
                    writes.push(Op::Flush { done });
                }
            }
        }
        self.trim_due |= writes.iter().any(|op| matches!(op, Op::Delivered { .. }));
        if !writes.is_empty() {
            let durable = writes.iter().any(|op| matches!(op, Op::Accept { .. } | Op::Flush { .. }));
            let result = self.db().and_then(|db| apply(db, &writes, durable));
            let mut dropped = HashMap::new();
            let result = match result {
                Ok(delta) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    self.dirty = !durable;
                    let (added, removed, gone) = delta;
                    dropped = gone;
                    self.unfinished.fetch_add(added, Ordering::Relaxed);
                    self.unfinished.fetch_sub(removed.min(self.unfinished.load(Ordering::Relaxed)), Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => {
                    self.failed(&e);
                    Err(e)
                }
            };
            for op in writes {
                match op {
                    Op::Accept { done, .. } | Op::Flush { done } => {
                        let _ = done.send(result.clone());
                    }
                    Op::DropRefused { id, done } => {
                        let r = result.clone().map(|()| dropped.remove(&id).unwrap_or_default());
                        let _ = done.send(r);
                    }
                    _ => {}
                }
            }
        }
        // Reads and admin operations come after the batch's writes: they see every operation sent before them.
        for op in others {
            match op {
                Op::Tick { window_ms, .. } => {
                    self.ticks += 1;
                    if self.ticks.is_multiple_of(60) {
                        let now = now_ms();
                        let _ = self.own_txn(|txn| prune(txn, window_ms, now).map(|_| ()));
                    }
                }
                Op::Keys { window_ms, now, done } => {
                    let r = self.own_txn(|txn| prune(txn, window_ms, now));
                    let _ = done.send(r);
                }
                Op::Load { backend, skip, limit, done } => {
                    let r = self.db().and_then(|db| load(db, &backend, &skip, limit));
                    let _ = done.send(r);
                }
                Op::DeadLetters { backend, limit, done } => {
                    let r = self.db().and_then(|db| list_dead(db, backend.as_deref(), limit));
                    let _ = done.send(r);
                }
                Op::View { id, done } => {
                    let r = self.db().and_then(|db| view(db, id));
                    let _ = done.send(r);
                }
                Op::Redrive { backend, id, pool, done } => {
                    let r = self.own_txn(|txn| redrive(txn, backend.as_deref(), id, &pool));
                    let _ = done.send(r);
                }
                Op::Discard { backend, id, done } => {
                    let r = self.own_txn(|txn| discard(txn, backend.as_deref(), id));
                    if let Ok((_, removed)) = &r {
                        let removed = (*removed).min(self.unfinished.load(Ordering::Relaxed));
                        self.unfinished.fetch_sub(removed, Ordering::Relaxed);
                    }
                    let _ = done.send(r.map(|(gone, _)| gone));
                }
                Op::Startup { pool, done } => {
                    let r = self.own_txn(|txn| startup(txn, &pool));
                    let _ = done.send(r);
                }
                _ => {}
            }
        }
    }
}

/// What a batch changed: deliveries added, deliveries removed, and for each [`Op::DropRefused`] that removed
/// something, the backends it removed from.
type Applied = (u64, u64, HashMap<u128, Vec<String>>);

/// Applies a batch of writes in one transaction.
#[expect(clippy::collapsible_match, reason = "a guard that removes a row would hide a write in a condition")]
fn apply(db: &Database, batch: &[Op], durable: bool) -> Result<Applied, StoreError> {
    let mut txn = db.begin_write().map_err(StoreError::from)?;
    if !durable {
        txn.set_durability(Durability::None).map_err(StoreError::from)?;
    }
    let (mut added, mut removed) = (0, 0);
    let mut dropped = HashMap::new();
    {
        let mut deliveries = txn.open_table(DELIVERIES).map_err(StoreError::from)?;
        let mut refs = txn.open_table(REFS).map_err(StoreError::from)?;
        let mut queue = txn.open_table(QUEUED).map_err(StoreError::from)?;
        let mut dead = txn.open_table(DEAD).map_err(StoreError::from)?;
        let mut delivered = txn.open_table(DELIVERED).map_err(StoreError::from)?;
        let mut keys = txn.open_table(IDEMPOTENCY).map_err(StoreError::from)?;
        for op in batch {
            match op {
                Op::Accept { id, seq, record, backends, key, .. } => {
                    deliveries.insert(*id, record.as_slice()).map_err(StoreError::from)?;
                    refs.insert(*id, u32::try_from(backends.len()).unwrap_or(u32::MAX)).map_err(StoreError::from)?;
                    let fresh = encode(&QueueRow { id: *id, ..QueueRow::default() })?;
                    for b in backends {
                        queue.insert((b.as_str(), *seq), fresh.as_slice()).map_err(StoreError::from)?;
                    }
                    if let Some((k, r)) = key {
                        keys.insert(k.as_str(), r.as_slice()).map_err(StoreError::from)?;
                    }
                    added += 1;
                }
                Op::Answer { key, record } => {
                    if keys.get(key.as_str()).map_err(StoreError::from)?.is_some() {
                        keys.insert(key.as_str(), record.as_slice()).map_err(StoreError::from)?;
                    }
                }
                Op::Progress { backend, seq, row } => {
                    // Only while still queued: a late progress record must not revive a finished entry.
                    if queue.get((&**backend, *seq)).map_err(StoreError::from)?.is_some() {
                        queue.insert((&**backend, *seq), encode(row)?.as_slice()).map_err(StoreError::from)?;
                    }
                }
                Op::Delivered { backend, seq, id, row } => {
                    if queue.remove((&**backend, *seq)).map_err(StoreError::from)?.is_some() {
                        delivered.insert((*id, &**backend), encode(row)?.as_slice()).map_err(StoreError::from)?;
                        let left = refs.get(*id).map_err(StoreError::from)?.map_or(0, |v| v.value()).saturating_sub(1);
                        if left == 0 {
                            refs.remove(*id).map_err(StoreError::from)?;
                            deliveries.remove(*id).map_err(StoreError::from)?;
                            removed += 1;
                        } else {
                            refs.insert(*id, left).map_err(StoreError::from)?;
                        }
                    }
                }
                Op::DeadLetter { backend, seq, row } => {
                    if queue.remove((&**backend, *seq)).map_err(StoreError::from)?.is_some() {
                        dead.insert((&**backend, *seq), encode(row)?.as_slice()).map_err(StoreError::from)?;
                    }
                }
                Op::DropRefused { id, .. } => {
                    let Some(record) = deliveries.get(*id).map_err(StoreError::from)? else { continue };
                    let d: StoredDelivery = decode(record.value())?;
                    drop(record);
                    let mut refused = Vec::new();
                    for b in &d.backends {
                        let b = b.as_str();
                        if queue.get((b, d.seq)).map_err(StoreError::from)?.is_some()
                            || delivered.get((*id, b)).map_err(StoreError::from)?.is_some()
                        {
                            break;
                        }
                        let Some(row) = dead.get((b, d.seq)).map_err(StoreError::from)? else { break };
                        let row: DeadRow = decode(row.value())?;
                        if row.reason != "rejected" {
                            break;
                        }
                        refused.push((b.to_owned(), row));
                    }
                    if refused.len() == d.backends.len() {
                        for (position, (b, row)) in refused.iter().enumerate() {
                            dead.remove((b.as_str(), d.seq)).map_err(StoreError::from)?;
                            // Its outcome stays visible (GET /deliveries/{id}, replays) like a delivered one's.
                            let status = row.last_status.filter(|s| !(200..300).contains(s)).unwrap_or(400);
                            let position = u16::try_from(position).unwrap_or(u16::MAX);
                            let end = DeliveredRow { attempts: row.attempts, status, position };
                            delivered.insert((*id, b.as_str()), encode(&end)?.as_slice()).map_err(StoreError::from)?;
                        }
                        let refused: Vec<String> = refused.into_iter().map(|(b, _)| b).collect();
                        refs.remove(*id).map_err(StoreError::from)?;
                        deliveries.remove(*id).map_err(StoreError::from)?;
                        removed += 1;
                        dropped.insert(*id, refused);
                    }
                }
                Op::Trim { keep_delivered } => {
                    // Ids are UUIDv7, ordered by time: the oldest records come first.
                    let len = delivered.len().map_err(StoreError::from)?;
                    for _ in *keep_delivered..len {
                        delivered.pop_first().map_err(StoreError::from)?;
                    }
                }
                _ => {}
            }
        }
    }
    txn.commit().map_err(StoreError::from)?;
    Ok((added, removed, dropped))
}

fn load(db: &Database, backend: &str, skip: &HashSet<u64>, limit: usize) -> Result<Vec<Loaded>, StoreError> {
    let txn = db.begin_read().map_err(StoreError::from)?;
    let queue = txn.open_table(QUEUED).map_err(StoreError::from)?;
    let deliveries = txn.open_table(DELIVERIES).map_err(StoreError::from)?;
    let mut out = Vec::new();
    for entry in queue.range((backend, 0)..=(backend, u64::MAX)).map_err(StoreError::from)? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = entry.map_err(StoreError::from)?;
        let seq = k.value().1;
        if skip.contains(&seq) {
            continue;
        }
        let row: QueueRow = decode(v.value())?;
        let Some(record) = deliveries.get(row.id).map_err(StoreError::from)? else {
            tracing::error!(backend, seq, "outbox: a queue entry without its write; skipped");
            continue;
        };
        out.push(Loaded { seq, delivery: decode(record.value())?, row });
    }
    Ok(out)
}

fn list_dead(db: &Database, backend: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
    let txn = db.begin_read().map_err(StoreError::from)?;
    let dead = txn.open_table(DEAD).map_err(StoreError::from)?;
    let deliveries = txn.open_table(DELIVERIES).map_err(StoreError::from)?;
    let range = match backend {
        Some(b) => dead.range((b, 0)..=(b, u64::MAX)),
        None => dead.range::<(&str, u64)>(..),
    }
    .map_err(StoreError::from)?;
    let mut out = Vec::new();
    for entry in range.take(limit) {
        let (k, v) = entry.map_err(StoreError::from)?;
        let (b, seq) = k.value();
        let row: DeadRow = decode(v.value())?;
        let path = match deliveries.get(row.id).map_err(StoreError::from)? {
            Some(record) => {
                let d: StoredDelivery = decode(record.value())?;
                d.path_and_query.split('?').next().unwrap_or_default().to_owned()
            }
            None => String::new(),
        };
        out.push(DeadLetter {
            delivery_id: uuid::Uuid::from_u128(row.id),
            backend: b.to_owned(),
            seq,
            path,
            attempts: row.attempts,
            reason: row.reason,
            last_status: row.last_status,
            dead_at: rfc3339_ms(row.at_ms),
        });
    }
    Ok(out)
}

fn view(db: &Database, id: u128) -> Result<Option<DeliveryView>, StoreError> {
    let txn = db.begin_read().map_err(StoreError::from)?;
    let deliveries = txn.open_table(DELIVERIES).map_err(StoreError::from)?;
    let queue = txn.open_table(QUEUED).map_err(StoreError::from)?;
    let dead = txn.open_table(DEAD).map_err(StoreError::from)?;
    let delivered = txn.open_table(DELIVERED).map_err(StoreError::from)?;
    let delivered_view = |backend: &str, row: DeliveredRow| {
        let (state, outcome, reason) = match row.status {
            // A dead letter an operator deleted (see `discard`).
            0 => (BackendState::Discarded, None, Some("discarded")),
            200..=299 => (BackendState::Delivered, Some("success"), None),
            // Every backend refused the write (see `drop_refused`).
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
    };
    let Some(record) = deliveries.get(id).map_err(StoreError::from)? else {
        // Finished on every backend: what is left is the delivered rows, while the window keeps them.
        let mut backends = Vec::new();
        for entry in delivered.range((id, "")..).map_err(StoreError::from)? {
            let (k, v) = entry.map_err(StoreError::from)?;
            let (row_id, backend) = k.value();
            if row_id != id {
                break;
            }
            let row: DeliveredRow = decode(v.value())?;
            backends.push((row.position, delivered_view(backend, row)));
        }
        if backends.is_empty() {
            return Ok(None);
        }
        backends.sort_by_key(|(position, _)| *position);
        let backends = backends.into_iter().map(|(_, view)| view).collect();
        return Ok(Some(DeliveryView { accepted_at_ms: id_time_ms(id), backends }));
    };
    let d: StoredDelivery = decode(record.value())?;
    let mut backends = Vec::with_capacity(d.backends.len());
    for b in &d.backends {
        let b = b.as_str();
        let view = if let Some(v) = queue.get((b, d.seq)).map_err(StoreError::from)? {
            let row: QueueRow = decode(v.value())?;
            BackendView {
                backend: b.to_owned(),
                state: BackendState::Pending,
                attempts: row.attempts,
                status: row.last_status,
                outcome: row.last_outcome,
                reason: None,
                next_attempt_at: (row.due_ms > now_ms()).then(|| rfc3339_ms(row.due_ms)),
            }
        } else if let Some(v) = dead.get((b, d.seq)).map_err(StoreError::from)? {
            let row: DeadRow = decode(v.value())?;
            BackendView {
                backend: b.to_owned(),
                state: BackendState::DeadLetter,
                attempts: row.attempts,
                status: row.last_status,
                outcome: row.last_outcome,
                reason: Some(row.reason),
                next_attempt_at: None,
            }
        } else if let Some(v) = delivered.get((id, b)).map_err(StoreError::from)? {
            delivered_view(b, decode(v.value())?)
        } else {
            // Neither queued nor a dead letter: delivered, and its record already trimmed (--delivery-history).
            BackendView {
                backend: b.to_owned(),
                state: BackendState::Delivered,
                attempts: 0,
                status: None,
                outcome: None,
                reason: None,
                next_attempt_at: None,
            }
        };
        backends.push(view);
    }
    Ok(Some(DeliveryView { accepted_at_ms: d.accepted_at_ms, backends }))
}

/// The dead letters matching the filters: (backend, order, delivery id).
fn matching_dead(
    dead: &redb::Table<'_, (&'static str, u64), &'static [u8]>,
    backend: Option<&str>,
    id: Option<u128>,
) -> Result<Vec<(String, u64, u128)>, StoreError> {
    let range = match backend {
        Some(b) => dead.range((b, 0)..=(b, u64::MAX)),
        None => dead.range::<(&str, u64)>(..),
    }
    .map_err(StoreError::from)?;
    let mut out = Vec::new();
    for entry in range {
        let (k, v) = entry.map_err(StoreError::from)?;
        let row: DeadRow = decode(v.value())?;
        if id.is_none_or(|id| id == row.id) {
            let (b, seq) = k.value();
            out.push((b.to_owned(), seq, row.id));
        }
    }
    Ok(out)
}

/// Deletes matching dead letters; returns them and how many deliveries were removed with them.
fn discard(
    txn: &redb::WriteTransaction,
    backend: Option<&str>,
    id: Option<u128>,
) -> Result<(Vec<(String, u64)>, u64), StoreError> {
    let mut dead = txn.open_table(DEAD).map_err(StoreError::from)?;
    let mut refs = txn.open_table(REFS).map_err(StoreError::from)?;
    let mut deliveries = txn.open_table(DELIVERIES).map_err(StoreError::from)?;
    let mut delivered = txn.open_table(DELIVERED).map_err(StoreError::from)?;
    let gone = matching_dead(&dead, backend, id)?;
    let mut removed = 0;
    for (b, seq, row_id) in &gone {
        if let Some(row) = dead.remove((b.as_str(), *seq)).map_err(StoreError::from)? {
            let row: DeadRow = decode(row.value())?;
            // Kept like a delivery's outcome, for GET /deliveries/{id}; status 0 marks it deleted.
            let marker = DeliveredRow { attempts: row.attempts, status: 0, position: u16::MAX };
            delivered.insert((*row_id, b.as_str()), encode(&marker)?.as_slice()).map_err(StoreError::from)?;
        }
        let left = refs.get(*row_id).map_err(StoreError::from)?.map_or(0, |v| v.value()).saturating_sub(1);
        if left == 0 {
            refs.remove(*row_id).map_err(StoreError::from)?;
            deliveries.remove(*row_id).map_err(StoreError::from)?;
            removed += 1;
        } else {
            refs.insert(*row_id, left).map_err(StoreError::from)?;
        }
    }
    Ok((gone.into_iter().map(|(b, seq, _)| (b, seq)).collect(), removed))
}

fn redrive(
    txn: &redb::WriteTransaction,
    backend: Option<&str>,
    id: Option<u128>,
    pool: &[String],
) -> Result<Vec<(String, u64)>, StoreError> {
    let mut dead = txn.open_table(DEAD).map_err(StoreError::from)?;
    let mut queue = txn.open_table(QUEUED).map_err(StoreError::from)?;
    let mut moved = matching_dead(&dead, backend, id)?;
    moved.retain(|(b, _, _)| pool.contains(b));
    for (b, seq, row_id) in &moved {
        dead.remove((b.as_str(), *seq)).map_err(StoreError::from)?;
        queue
            .insert((b.as_str(), *seq), encode(&QueueRow { id: *row_id, ..QueueRow::default() })?.as_slice())
            .map_err(StoreError::from)?;
    }
    Ok(moved.into_iter().map(|(b, seq, _)| (b, seq)).collect())
}

/// The backend a label names, as a URL: `host:port` and `http://host:port` name the same backend.
fn backend_url(label: &str) -> Option<String> {
    label.parse::<crate::backend::BackendAddr>().ok().map(|a| a.url().to_string())
}

/// Moves every row of `table` under backend label `from` to label `to`.
fn relabel(
    table: &mut redb::Table<'_, (&'static str, u64), &'static [u8]>,
    from: &str,
    to: &str,
) -> Result<u64, StoreError> {
    let mut rows = Vec::new();
    for entry in table.range((from, 0)..=(from, u64::MAX)).map_err(StoreError::from)? {
        let (k, v) = entry.map_err(StoreError::from)?;
        rows.push((k.value().1, v.value().to_vec()));
    }
    for (seq, value) in &rows {
        table.remove((from, *seq)).map_err(StoreError::from)?;
        table.insert((to, *seq), value.as_slice()).map_err(StoreError::from)?;
    }
    Ok(rows.len() as u64)
}

fn startup(txn: &redb::WriteTransaction, pool: &[String]) -> Result<Startup, StoreError> {
    let mut out = Startup::default();
    for b in pool {
        out.backends.insert(b.clone(), BackendCounts::default());
    }
    let mut queue = txn.open_table(QUEUED).map_err(StoreError::from)?;
    let mut dead = txn.open_table(DEAD).map_err(StoreError::from)?;
    // A backend of the pool written another way than when the rows were stored (`http://a:1` for `a:1`) is the
    // same backend: its rows follow the new spelling.
    let mut stored_labels = std::collections::BTreeSet::new();
    for table in [&queue, &dead] {
        let mut next: Option<String> = None;
        loop {
            let first = match &next {
                None => table.first().map_err(StoreError::from)?.map(|(k, _)| k.value().0.to_owned()),
                Some(after) => table
                    .range((after.as_str(), u64::MAX)..)
                    .map_err(StoreError::from)?
                    .find_map(|e| e.ok().map(|(k, _)| k.value().0.to_owned()).filter(|l| l != after)),
            };
            let Some(label) = first else { break };
            stored_labels.insert(label.clone());
            next = Some(label);
        }
    }
    let pool_urls: Vec<(Option<String>, &String)> = pool.iter().map(|b| (backend_url(b), b)).collect();
    let mut renamed: HashMap<String, String> = HashMap::new();
    for label in stored_labels.iter().filter(|l| !out.backends.contains_key(l.as_str())) {
        let url = backend_url(label);
        if let Some((_, to)) = pool_urls.iter().find(|(u, _)| u.is_some() && *u == url) {
            let n = relabel(&mut queue, label, to)? + relabel(&mut dead, label, to)?;
            tracing::info!(from = %label, to = %to, rows = n, "the same backend, written another way: its queue follows");
            renamed.insert(label.clone(), (*to).clone());
        }
    }
    if !renamed.is_empty() {
        // The deliveries name their backends too (GET /deliveries/{id}, and the check for writes every backend
        // refused): they follow the new spelling.
        let mut deliveries = txn.open_table(DELIVERIES).map_err(StoreError::from)?;
        let mut rewritten = Vec::new();
        for entry in deliveries.iter().map_err(StoreError::from)? {
            let (k, v) = entry.map_err(StoreError::from)?;
            let mut d: StoredDelivery = decode(v.value())?;
            let mut changed = false;
            for b in &mut d.backends {
                if let Some(to) = renamed.get(b.as_str()) {
                    b.clone_from(to);
                    changed = true;
                }
            }
            if changed {
                rewritten.push((k.value(), encode(&d)?));
            }
        }
        for (id, record) in rewritten {
            deliveries.insert(id, record.as_slice()).map_err(StoreError::from)?;
        }
    }
    let mut orphans = Vec::new();
    for entry in queue.iter().map_err(StoreError::from)? {
        let (k, v) = entry.map_err(StoreError::from)?;
        let (b, seq) = k.value();
        out.max_seq = out.max_seq.max(Some(seq));
        match out.backends.get_mut(b) {
            Some(counts) => counts.pending += 1,
            None => orphans.push((b.to_owned(), seq, decode::<QueueRow>(v.value())?)),
        }
    }
    for entry in dead.iter().map_err(StoreError::from)? {
        let (k, _) = entry.map_err(StoreError::from)?;
        let (b, seq) = k.value();
        out.max_seq = out.max_seq.max(Some(seq));
        if let Some(counts) = out.backends.get_mut(b) {
            counts.dead += 1;
        }
    }
    let mut removed: HashMap<String, u64> = HashMap::new();
    for (b, seq, row) in orphans {
        queue.remove((b.as_str(), seq)).map_err(StoreError::from)?;
        let row = DeadRow {
            id: row.id,
            attempts: row.attempts,
            reason: "backend_removed".to_owned(),
            last_status: row.last_status,
            last_outcome: row.last_outcome,
            at_ms: now_ms(),
        };
        dead.insert((b.as_str(), seq), encode(&row)?.as_slice()).map_err(StoreError::from)?;
        *removed.entry(b).or_default() += 1;
        out.orphaned += 1;
    }
    for (backend, writes) in removed {
        tracing::error!(
            backend = %backend,
            writes,
            "dead letters: this backend is no longer in --backends and will not get these writes; \
             GET /dead-letters?backend=... lists them, DELETE drops them"
        );
    }
    Ok(out)
}

/// Deletes the idempotency records older than `window_ms`; returns the others, oldest first.
fn prune(txn: &redb::WriteTransaction, window_ms: u64, now: u64) -> Result<Vec<(String, KeyRecord)>, StoreError> {
    let mut keep = Vec::new();
    {
        let mut table = txn.open_table(IDEMPOTENCY).map_err(StoreError::from)?;
        let mut expired = Vec::new();
        for row in table.iter().map_err(StoreError::from)? {
            let (k, v) = row.map_err(StoreError::from)?;
            let record: KeyRecord = decode(v.value())?;
            if now.saturating_sub(record.at_ms) > window_ms {
                expired.push(k.value().to_owned());
            } else {
                keep.push((k.value().to_owned(), record));
            }
        }
        for k in expired {
            table.remove(k.as_str()).map_err(StoreError::from)?;
        }
    }
    keep.sort_by_key(|(_, r)| r.at_ms);
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fanout-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    const POOL: [&str; 3] = ["a:1", "b:1", "c:1"];

    fn write(seq: u64) -> StoredDelivery {
        StoredDelivery {
            seq,
            accepted_at_ms: 1,
            method: "POST".into(),
            path_and_query: "/register?x=1".into(),
            headers: vec![("content-type".into(), b"application/x-www-form-urlencoded".to_vec())],
            body: format!("username=u{seq}&password=p").into_bytes(),
            ordering_key: Some(format!("u{seq}")),
            backends: POOL.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn pool() -> Vec<String> {
        POOL.iter().map(|s| (*s).to_owned()).collect()
    }

    fn label(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    async fn seqs(outbox: &Outbox, backend: &str) -> Vec<u64> {
        outbox.load(&label(backend), HashSet::new(), 100).await.expect("load").iter().map(|l| l.seq).collect()
    }

    #[tokio::test]
    async fn queues_deliveries_and_dead_letters_survive_a_reopen() {
        let dir = temp_dir("reopen");
        {
            let outbox = Outbox::open(&dir).expect("open");
            for seq in 0..3u64 {
                outbox.accept(u128::from(seq) + 100, &write(seq), None).await.expect("accept");
            }
            assert_eq!(outbox.unfinished(), 3);
            let progress = QueueRow { id: 100, attempts: 4, due_ms: 77, last_status: Some(503), last_outcome: None };
            outbox.progress(&label("b:1"), 0, progress.clone());
            for (i, b) in POOL.iter().enumerate() {
                let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
                outbox.delivered(&label(b), 1, 101, row).await;
            }
            let dead = DeadRow {
                id: 102,
                attempts: 3,
                reason: "exhausted".into(),
                last_status: Some(503),
                last_outcome: Some("status_5xx".into()),
                at_ms: now_ms(),
            };
            outbox.dead_letter(&label("c:1"), 2, dead).await;
            // A durable commit after the non-durable ones makes them durable too.
            let key = KeyRecord { delivery_id: 200, body_hash: [1; 32], at_ms: now_ms(), answer: None };
            outbox.accept(200, &write(9), Some(("client-key", &key))).await.expect("accept");
            assert_eq!(outbox.unfinished(), 3, "101 finished everywhere, 200 added");
            outbox.close();
        }
        let outbox = Outbox::open(&dir).expect("reopen");
        assert_eq!(outbox.unfinished(), 3);
        assert_eq!(seqs(&outbox, "a:1").await, [0, 2, 9]);
        assert_eq!(seqs(&outbox, "c:1").await, [0, 9], "the dead letter left the queue");
        let loaded = outbox.load(&label("b:1"), [2].into(), 1).await.expect("load");
        assert_eq!(loaded.len(), 1, "limit applies");
        assert_eq!(loaded[0].row.attempts, 4, "progress kept");
        assert_eq!(loaded[0].delivery, write(0));
        let skipped = outbox.load(&label("b:1"), [0, 2].into(), 10).await.expect("load");
        assert_eq!(skipped.iter().map(|l| l.seq).collect::<Vec<_>>(), [9], "skip applies");

        let finished = outbox.view(101).await.expect("view").expect("kept for the window");
        let states: Vec<_> = finished.backends.iter().map(|b| (b.backend.as_str(), b.state)).collect();
        assert_eq!(
            states,
            [("a:1", BackendState::Delivered), ("b:1", BackendState::Delivered), ("c:1", BackendState::Delivered)]
        );
        let mixed = outbox.view(102).await.expect("view").expect("known");
        assert_eq!(mixed.backends[0].state, BackendState::Pending);
        assert_eq!(mixed.backends[2].state, BackendState::DeadLetter);
        assert_eq!(mixed.backends[2].reason.as_deref(), Some("exhausted"));
        assert!(outbox.view(999).await.expect("view").is_none());

        let dead = outbox.dead_letters(None, 10).await.expect("list");
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].backend.as_str(), dead[0].seq, dead[0].path.as_str()), ("c:1", 2, "/register"));
        assert!(outbox.dead_letters(Some("a:1".into()), 10).await.expect("list").is_empty());
        assert_eq!(outbox.redrive(Some("c:1".into()), None, pool()).await.expect("redrive"), [("c:1".to_owned(), 2)]);
        assert_eq!(seqs(&outbox, "c:1").await, [0, 2, 9], "back in its place, by acceptance order");
        assert!(outbox.dead_letters(None, 10).await.expect("list").is_empty());
        assert!(outbox.redrive(None, None, pool()).await.expect("redrive").is_empty());

        let keys = outbox.idempotency_keys(60_000, now_ms()).await.expect("keys");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, "client-key");
        assert!(outbox.idempotency_keys(0, now_ms() + 10).await.expect("keys").is_empty(), "expired ones are deleted");
        outbox.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn at_start_entries_of_a_removed_backend_become_dead_letters_and_counts_are_given() {
        let outbox = Outbox::in_memory().expect("in memory");
        assert!(!outbox.durable());
        for seq in [4u64, 7] {
            outbox.accept(u128::from(seq), &write(seq), None).await.expect("accept");
        }
        // a:1 is now written as a URL: the same backend (found by an attack run: its queue became dead letters).
        let pool = vec!["c:1".to_owned(), "http://a:1".to_owned(), "new:1".to_owned()];
        let start = outbox.startup(pool).await.expect("startup");
        assert_eq!(start.max_seq, Some(7));
        assert_eq!(start.orphaned, 2, "b:1 left the pool");
        assert_eq!(start.backends["http://a:1"], BackendCounts { pending: 2, dead: 0 });
        assert_eq!(seqs(&outbox, "http://a:1").await, [4, 7]);
        // Found by a second attack run: the deliveries still named the old spelling, so their view called it
        // delivered.
        let view = outbox.view(4).await.expect("view").expect("known");
        let a = view.backends.iter().find(|b| b.backend == "http://a:1").expect("renamed in the view");
        assert_eq!(a.state, BackendState::Pending);
        assert_eq!(start.backends["new:1"], BackendCounts::default());
        let dead = outbox.dead_letters(Some("b:1".into()), 10).await.expect("list");
        assert_eq!(dead.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>(), ["backend_removed"; 2]);
        assert_eq!(outbox.unfinished(), 2, "a dead letter keeps its delivery");
    }

    #[tokio::test]
    async fn only_the_newest_delivered_records_are_kept() {
        let outbox = Outbox::in_memory().expect("in memory");
        let ids: Vec<u128> = (0..4u64).map(|_| uuid::Uuid::now_v7().as_u128()).collect();
        for (seq, id) in ids.iter().enumerate() {
            outbox.accept(*id, &write(seq as u64), None).await.expect("accept");
            for (i, b) in POOL.iter().enumerate() {
                let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
                outbox.delivered(&label(b), seq as u64, *id, row).await;
            }
        }
        outbox.flush().await.expect("flush");
        outbox.tick(60_000, 6); // two deliveries of three backends
        let known = futures_util::future::join_all(ids.iter().map(|id| outbox.view(*id))).await;
        let known: Vec<bool> = known.into_iter().map(|v| v.expect("view").is_some()).collect();
        assert_eq!(known, [false, false, true, true], "the two oldest were trimmed");
        assert_eq!(outbox.unfinished(), 0);

        // Found by an attack run: a delivery still pending somewhere lost its delivered backends from its view
        // once their records were trimmed.
        let pending = uuid::Uuid::now_v7().as_u128();
        outbox.accept(pending, &write(10), None).await.expect("accept");
        for (i, b) in POOL.iter().enumerate().take(2) {
            outbox
                .delivered(&label(b), 10, pending, DeliveredRow { attempts: 1, status: 201, position: i as u16 })
                .await;
        }
        outbox.flush().await.expect("flush");
        outbox.tick(60_000, 0);
        let view = outbox.view(pending).await.expect("view").expect("pending");
        let states: Vec<_> = view.backends.iter().map(|b| b.state).collect();
        assert_eq!(states, [BackendState::Delivered, BackendState::Delivered, BackendState::Pending]);
    }

    #[test]
    fn an_unwritable_directory_is_refused() {
        let err = Outbox::open(Path::new("/proc/fanout-cannot-write-here")).err().expect("refused");
        assert!(err.to_string().starts_with("outbox: "), "{err}");
    }

    #[test]
    fn a_uuid_v7_carries_its_time() {
        let id = uuid::Uuid::now_v7().as_u128();
        assert!(now_ms().abs_diff(id_time_ms(id)) < 5_000);
        assert_eq!(id_time_ms(uuid::Uuid::nil().as_u128()), 0);
    }
}
