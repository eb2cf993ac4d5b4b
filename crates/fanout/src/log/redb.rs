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

use ::redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{
    BackendCounts, BackendState, BackendView, DeadFilter, DeadLetter, DeadRow, DeliveredRow, DeliveryView, Loaded,
    LogError, QueueRow, Settlement, Startup, StoredDelivery, WriteLog, backend_url, delivered_view, id_time_ms, now_ms,
    rfc3339_ms,
};
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

type Done<T> = oneshot::Sender<Result<T, LogError>>;

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
    /// Closes the database (after the batch's writes) and stops the writer.
    Close {
        done: Done<()>,
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
pub struct RedbLog {
    ops: mpsc::Sender<Op>,
    healthy: Arc<AtomicBool>,
    unfinished: Arc<AtomicU64>,
    durable: bool,
}

impl RedbLog {
    /// Opens (or creates) `dir/outbox.redb` and starts the writer thread.
    ///
    /// # Errors
    /// When the directory cannot be created or the file cannot be opened for writing.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(format!("cannot create {}", dir.display()), e))?;
        let path = dir.join("outbox.redb");
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(&path).map_err(dberr)?;
        Self::start(db, Some(path))
    }

    /// The same tables in memory (`--no-outbox`): nothing survives the process.
    ///
    /// # Errors
    /// When the writer thread cannot be started.
    pub fn in_memory() -> Result<Self, LogError> {
        let db = Database::builder().create_with_backend(::redb::backends::InMemoryBackend::new()).map_err(dberr)?;
        Self::start(db, None)
    }

    fn start(db: Database, path: Option<PathBuf>) -> Result<Self, LogError> {
        // Create the tables (and prove the file is writable) before accepting anything.
        let txn = db.begin_write().map_err(dberr)?;
        txn.open_table(DELIVERIES).map_err(dberr)?;
        let unfinished = txn.open_table(REFS).map_err(dberr)?.len().map_err(dberr)?;
        txn.open_table(QUEUED).map_err(dberr)?;
        txn.open_table(DEAD).map_err(dberr)?;
        txn.open_table(DELIVERED).map_err(dberr)?;
        txn.open_table(IDEMPOTENCY).map_err(dberr)?;
        txn.commit().map_err(dberr)?;
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
            closed: false,
        };
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer_state.run(rx))
            .map_err(|e| LogError::io("cannot start the outbox writer thread", e))?;
        Ok(Self { ops: tx, healthy, unfinished, durable })
    }

    fn call<T: Send + 'static>(&self, op: impl FnOnce(Done<T>) -> Op) -> BoxFuture<'static, Result<T, LogError>> {
        let (done, wait) = oneshot::channel();
        let op = op(done);
        let ops = self.ops.clone();
        Box::pin(async move {
            ops.send(op).await.map_err(|_| gone())?;
            wait.await.map_err(|_| gone())?
        })
    }
}

impl WriteLog for RedbLog {
    fn durable(&self) -> bool {
        self.durable
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn unfinished(&self) -> u64 {
        self.unfinished.load(Ordering::Relaxed)
    }

    fn tick(&self, window_ms: u64, keep_delivered: u64) {
        let _ = self.ops.try_send(Op::Tick { window_ms, keep_delivered });
    }

    fn append(
        &self,
        id: u128,
        delivery: &StoredDelivery,
        key: Option<(&str, &KeyRecord)>,
    ) -> BoxFuture<'static, Result<(), LogError>> {
        let encoded = encode(delivery).and_then(|record| {
            let key = key.map(|(k, r)| encode(r).map(|r| (k.to_owned(), r))).transpose()?;
            Ok((record, key))
        });
        let (record, key) = match encoded {
            Ok(e) => e,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let backends = delivery.backends.clone();
        let seq = delivery.seq;
        self.call(|done| Op::Accept { id, seq, record, backends, key, done })
    }

    fn settle(&self, backend: &Arc<str>, seq: u64, settlement: Settlement) -> BoxFuture<'static, ()> {
        let backend = backend.clone();
        let op = match settlement {
            Settlement::DueAgain(row) => {
                // Advisory: dropped when the writer's queue is full (a restart then repeats an attempt or two,
                // which the schedule and the `Idempotency-Key` absorb).
                let _ = self.ops.try_send(Op::Progress { backend, seq, row });
                return Box::pin(std::future::ready(()));
            }
            Settlement::Delivered { id, row } => Op::Delivered { backend, seq, id, row },
            Settlement::Dead(row) => Op::DeadLetter { backend, seq, row },
        };
        let ops = self.ops.clone();
        Box::pin(async move {
            let _ = ops.send(op).await;
        })
    }

    fn drop_refused(&self, id: u128) -> BoxFuture<'static, Vec<String>> {
        let call = self.call(|done| Op::DropRefused { id, done });
        Box::pin(async move { call.await.unwrap_or_default() })
    }

    fn pending(
        &self,
        backend: &Arc<str>,
        skip: HashSet<u64>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<Loaded>, LogError>> {
        let backend = backend.clone();
        self.call(|done| Op::Load { backend, skip, limit, done })
    }

    fn redrive(
        &self,
        filter: DeadFilter,
        pool: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        self.call(|done| Op::Redrive { backend: filter.backend, id: filter.id, pool, done })
    }

    fn discard(&self, filter: DeadFilter) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        self.call(|done| Op::Discard { backend: filter.backend, id: filter.id, done })
    }

    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> BoxFuture<'static, Result<Vec<DeadLetter>, LogError>> {
        let call = self.call(|done| Op::DeadLetters { backend: filter.backend, limit, done });
        let id = filter.id;
        Box::pin(async move {
            let mut list = call.await?;
            if let Some(id) = id {
                list.retain(|d| d.delivery_id.as_u128() == id);
            }
            Ok(list)
        })
    }

    fn view(&self, id: u128) -> BoxFuture<'static, Result<Option<DeliveryView>, LogError>> {
        self.call(|done| Op::View { id, done })
    }

    fn startup(&self, pool: Vec<String>) -> BoxFuture<'static, Result<Startup, LogError>> {
        self.call(|done| Op::Startup { pool, done })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), LogError>> {
        self.call(|done| Op::Flush { done })
    }

    fn answer(&self, key: &str, record: &KeyRecord) {
        if let Ok(record) = encode(record) {
            let _ = self.ops.try_send(Op::Answer { key: key.to_owned(), record });
        }
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let call = self.call(|done| Op::Close { done });
        Box::pin(async move {
            let _ = call.await;
        })
    }

    fn idempotency_keys(
        &self,
        window_ms: u64,
        now: u64,
    ) -> BoxFuture<'static, Result<Vec<(String, KeyRecord)>, LogError>> {
        self.call(|done| Op::Keys { window_ms, now, done })
    }
}

fn gone() -> LogError {
    LogError::Closed
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, LogError> {
    Ok(postcard::from_bytes(bytes)?)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, LogError> {
    Ok(postcard::to_allocvec(value)?)
}

/// A failure of the database, kept with its cause.
fn dberr(e: impl Into<::redb::Error>) -> LogError {
    LogError::Database(Arc::new(e.into()))
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
    /// [`Op::Close`] was handled: the writer stops.
    closed: bool,
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
            if self.closed {
                return;
            }
        }
    }

    /// The database, reopened if a failure closed it.
    fn db(&mut self) -> Result<&Database, LogError> {
        if self.db.is_none()
            && let Some(path) = &self.path
        {
            self.db = Some(Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(dberr)?);
            tracing::info!(path = %path.display(), "outbox reopened");
        }
        self.db.as_ref().ok_or_else(gone)
    }

    fn failed(&mut self, e: &LogError) {
        tracing::error!(error = %e, "outbox failure: the database is closed and will be reopened");
        self.healthy.store(false, Ordering::Relaxed);
        if self.path.is_some() {
            self.db = None;
        }
    }

    /// Runs `f` in a write transaction of its own (durable), handling a failure like a failed batch.
    fn own_txn<T>(&mut self, f: impl FnOnce(&::redb::WriteTransaction) -> Result<T, LogError>) -> Result<T, LogError> {
        let r = self.db().and_then(|db| {
            let txn = db.begin_write().map_err(dberr)?;
            let out = f(&txn)?;
            txn.commit().map_err(dberr)?;
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
                Op::Close { done } => {
                    self.db = None;
                    self.closed = true;
                    let _ = done.send(Ok(()));
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
fn apply(db: &Database, batch: &[Op], durable: bool) -> Result<Applied, LogError> {
    let mut txn = db.begin_write().map_err(dberr)?;
    if !durable {
        txn.set_durability(Durability::None).map_err(dberr)?;
    }
    let (mut added, mut removed) = (0, 0);
    let mut dropped = HashMap::new();
    {
        let mut deliveries = txn.open_table(DELIVERIES).map_err(dberr)?;
        let mut refs = txn.open_table(REFS).map_err(dberr)?;
        let mut queue = txn.open_table(QUEUED).map_err(dberr)?;
        let mut dead = txn.open_table(DEAD).map_err(dberr)?;
        let mut delivered = txn.open_table(DELIVERED).map_err(dberr)?;
        let mut keys = txn.open_table(IDEMPOTENCY).map_err(dberr)?;
        for op in batch {
            match op {
                Op::Accept { id, seq, record, backends, key, .. } => {
                    deliveries.insert(*id, record.as_slice()).map_err(dberr)?;
                    refs.insert(*id, u32::try_from(backends.len()).unwrap_or(u32::MAX)).map_err(dberr)?;
                    let fresh = encode(&QueueRow { id: *id, ..QueueRow::default() })?;
                    for b in backends {
                        queue.insert((b.as_str(), *seq), fresh.as_slice()).map_err(dberr)?;
                    }
                    if let Some((k, r)) = key {
                        keys.insert(k.as_str(), r.as_slice()).map_err(dberr)?;
                    }
                    added += 1;
                }
                Op::Answer { key, record } => {
                    if keys.get(key.as_str()).map_err(dberr)?.is_some() {
                        keys.insert(key.as_str(), record.as_slice()).map_err(dberr)?;
                    }
                }
                Op::Progress { backend, seq, row } => {
                    // Only while still queued: a late progress record must not revive a finished entry.
                    if queue.get((&**backend, *seq)).map_err(dberr)?.is_some() {
                        queue.insert((&**backend, *seq), encode(row)?.as_slice()).map_err(dberr)?;
                    }
                }
                Op::Delivered { backend, seq, id, row } => {
                    if queue.remove((&**backend, *seq)).map_err(dberr)?.is_some() {
                        delivered.insert((*id, &**backend), encode(row)?.as_slice()).map_err(dberr)?;
                        let left = refs.get(*id).map_err(dberr)?.map_or(0, |v| v.value()).saturating_sub(1);
                        if left == 0 {
                            refs.remove(*id).map_err(dberr)?;
                            deliveries.remove(*id).map_err(dberr)?;
                            removed += 1;
                        } else {
                            refs.insert(*id, left).map_err(dberr)?;
                        }
                    }
                }
                Op::DeadLetter { backend, seq, row } => {
                    if queue.remove((&**backend, *seq)).map_err(dberr)?.is_some() {
                        dead.insert((&**backend, *seq), encode(row)?.as_slice()).map_err(dberr)?;
                    }
                }
                Op::DropRefused { id, .. } => {
                    let Some(record) = deliveries.get(*id).map_err(dberr)? else { continue };
                    let d: StoredDelivery = decode(record.value())?;
                    drop(record);
                    let mut refused = Vec::new();
                    for b in &d.backends {
                        let b = b.as_str();
                        if queue.get((b, d.seq)).map_err(dberr)?.is_some()
                            || delivered.get((*id, b)).map_err(dberr)?.is_some()
                        {
                            break;
                        }
                        let Some(row) = dead.get((b, d.seq)).map_err(dberr)? else { break };
                        let row: DeadRow = decode(row.value())?;
                        if row.reason != "rejected" {
                            break;
                        }
                        refused.push((b.to_owned(), row));
                    }
                    if refused.len() == d.backends.len() {
                        for (position, (b, row)) in refused.iter().enumerate() {
                            dead.remove((b.as_str(), d.seq)).map_err(dberr)?;
                            // Its outcome stays visible (GET /deliveries/{id}, replays) like a delivered one's.
                            let status = row.last_status.filter(|s| !(200..300).contains(s)).unwrap_or(400);
                            let position = u16::try_from(position).unwrap_or(u16::MAX);
                            let end = DeliveredRow { attempts: row.attempts, status, position };
                            delivered.insert((*id, b.as_str()), encode(&end)?.as_slice()).map_err(dberr)?;
                        }
                        let refused: Vec<String> = refused.into_iter().map(|(b, _)| b).collect();
                        refs.remove(*id).map_err(dberr)?;
                        deliveries.remove(*id).map_err(dberr)?;
                        removed += 1;
                        dropped.insert(*id, refused);
                    }
                }
                Op::Trim { keep_delivered } => {
                    // Ids are UUIDv7, ordered by time: the oldest records come first.
                    let len = delivered.len().map_err(dberr)?;
                    for _ in *keep_delivered..len {
                        delivered.pop_first().map_err(dberr)?;
                    }
                }
                _ => {}
            }
        }
    }
    txn.commit().map_err(dberr)?;
    Ok((added, removed, dropped))
}

fn load(db: &Database, backend: &str, skip: &HashSet<u64>, limit: usize) -> Result<Vec<Loaded>, LogError> {
    let txn = db.begin_read().map_err(dberr)?;
    let queue = txn.open_table(QUEUED).map_err(dberr)?;
    let deliveries = txn.open_table(DELIVERIES).map_err(dberr)?;
    let mut out = Vec::new();
    for entry in queue.range((backend, 0)..=(backend, u64::MAX)).map_err(dberr)? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = entry.map_err(dberr)?;
        let seq = k.value().1;
        if skip.contains(&seq) {
            continue;
        }
        let row: QueueRow = decode(v.value())?;
        let Some(record) = deliveries.get(row.id).map_err(dberr)? else {
            tracing::error!(backend, seq, "outbox: a queue entry without its write; skipped");
            continue;
        };
        out.push(Loaded { seq, delivery: decode(record.value())?, row });
    }
    Ok(out)
}

fn list_dead(db: &Database, backend: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, LogError> {
    let txn = db.begin_read().map_err(dberr)?;
    let dead = txn.open_table(DEAD).map_err(dberr)?;
    let deliveries = txn.open_table(DELIVERIES).map_err(dberr)?;
    let range = match backend {
        Some(b) => dead.range((b, 0)..=(b, u64::MAX)),
        None => dead.range::<(&str, u64)>(..),
    }
    .map_err(dberr)?;
    let mut out = Vec::new();
    for entry in range.take(limit) {
        let (k, v) = entry.map_err(dberr)?;
        let (b, seq) = k.value();
        let row: DeadRow = decode(v.value())?;
        let path = match deliveries.get(row.id).map_err(dberr)? {
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

fn view(db: &Database, id: u128) -> Result<Option<DeliveryView>, LogError> {
    let txn = db.begin_read().map_err(dberr)?;
    let deliveries = txn.open_table(DELIVERIES).map_err(dberr)?;
    let queue = txn.open_table(QUEUED).map_err(dberr)?;
    let dead = txn.open_table(DEAD).map_err(dberr)?;
    let delivered = txn.open_table(DELIVERED).map_err(dberr)?;
    let Some(record) = deliveries.get(id).map_err(dberr)? else {
        // Finished on every backend: what is left is the delivered rows, while the window keeps them.
        let mut backends = Vec::new();
        for entry in delivered.range((id, "")..).map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
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
        let view = if let Some(v) = queue.get((b, d.seq)).map_err(dberr)? {
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
        } else if let Some(v) = dead.get((b, d.seq)).map_err(dberr)? {
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
        } else if let Some(v) = delivered.get((id, b)).map_err(dberr)? {
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
    dead: &::redb::Table<'_, (&'static str, u64), &'static [u8]>,
    backend: Option<&str>,
    id: Option<u128>,
) -> Result<Vec<(String, u64, u128)>, LogError> {
    let range = match backend {
        Some(b) => dead.range((b, 0)..=(b, u64::MAX)),
        None => dead.range::<(&str, u64)>(..),
    }
    .map_err(dberr)?;
    let mut out = Vec::new();
    for entry in range {
        let (k, v) = entry.map_err(dberr)?;
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
    txn: &::redb::WriteTransaction,
    backend: Option<&str>,
    id: Option<u128>,
) -> Result<(Vec<(String, u64)>, u64), LogError> {
    let mut dead = txn.open_table(DEAD).map_err(dberr)?;
    let mut refs = txn.open_table(REFS).map_err(dberr)?;
    let mut deliveries = txn.open_table(DELIVERIES).map_err(dberr)?;
    let mut delivered = txn.open_table(DELIVERED).map_err(dberr)?;
    let gone = matching_dead(&dead, backend, id)?;
    let mut removed = 0;
    for (b, seq, row_id) in &gone {
        if let Some(row) = dead.remove((b.as_str(), *seq)).map_err(dberr)? {
            let row: DeadRow = decode(row.value())?;
            // Kept like a delivery's outcome, for GET /deliveries/{id}; status 0 marks it deleted.
            let marker = DeliveredRow { attempts: row.attempts, status: 0, position: u16::MAX };
            delivered.insert((*row_id, b.as_str()), encode(&marker)?.as_slice()).map_err(dberr)?;
        }
        let left = refs.get(*row_id).map_err(dberr)?.map_or(0, |v| v.value()).saturating_sub(1);
        if left == 0 {
            refs.remove(*row_id).map_err(dberr)?;
            deliveries.remove(*row_id).map_err(dberr)?;
            removed += 1;
        } else {
            refs.insert(*row_id, left).map_err(dberr)?;
        }
    }
    Ok((gone.into_iter().map(|(b, seq, _)| (b, seq)).collect(), removed))
}

fn redrive(
    txn: &::redb::WriteTransaction,
    backend: Option<&str>,
    id: Option<u128>,
    pool: &[String],
) -> Result<Vec<(String, u64)>, LogError> {
    let mut dead = txn.open_table(DEAD).map_err(dberr)?;
    let mut queue = txn.open_table(QUEUED).map_err(dberr)?;
    let mut moved = matching_dead(&dead, backend, id)?;
    moved.retain(|(b, _, _)| pool.contains(b));
    for (b, seq, row_id) in &moved {
        dead.remove((b.as_str(), *seq)).map_err(dberr)?;
        queue
            .insert((b.as_str(), *seq), encode(&QueueRow { id: *row_id, ..QueueRow::default() })?.as_slice())
            .map_err(dberr)?;
    }
    Ok(moved.into_iter().map(|(b, seq, _)| (b, seq)).collect())
}

/// Moves every row of `table` under backend label `from` to label `to`.
fn relabel(
    table: &mut ::redb::Table<'_, (&'static str, u64), &'static [u8]>,
    from: &str,
    to: &str,
) -> Result<u64, LogError> {
    let mut rows = Vec::new();
    for entry in table.range((from, 0)..=(from, u64::MAX)).map_err(dberr)? {
        let (k, v) = entry.map_err(dberr)?;
        rows.push((k.value().1, v.value().to_vec()));
    }
    for (seq, value) in &rows {
        table.remove((from, *seq)).map_err(dberr)?;
        table.insert((to, *seq), value.as_slice()).map_err(dberr)?;
    }
    Ok(rows.len() as u64)
}

fn startup(txn: &::redb::WriteTransaction, pool: &[String]) -> Result<Startup, LogError> {
    let mut out = Startup::default();
    for b in pool {
        out.backends.insert(b.clone(), BackendCounts::default());
    }
    let mut queue = txn.open_table(QUEUED).map_err(dberr)?;
    let mut dead = txn.open_table(DEAD).map_err(dberr)?;
    // A backend of the pool written another way than when the rows were stored (`http://a:1` for `a:1`) is the
    // same backend: its rows follow the new spelling.
    let mut stored_labels = std::collections::BTreeSet::new();
    for table in [&queue, &dead] {
        let mut next: Option<String> = None;
        loop {
            let first = match &next {
                None => table.first().map_err(dberr)?.map(|(k, _)| k.value().0.to_owned()),
                Some(after) => table
                    .range((after.as_str(), u64::MAX)..)
                    .map_err(dberr)?
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
        let mut deliveries = txn.open_table(DELIVERIES).map_err(dberr)?;
        let mut rewritten = Vec::new();
        for entry in deliveries.iter().map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
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
            deliveries.insert(id, record.as_slice()).map_err(dberr)?;
        }
    }
    let mut orphans = Vec::new();
    for entry in queue.iter().map_err(dberr)? {
        let (k, v) = entry.map_err(dberr)?;
        let (b, seq) = k.value();
        out.max_seq = out.max_seq.max(Some(seq));
        match out.backends.get_mut(b) {
            Some(counts) => counts.pending += 1,
            None => orphans.push((b.to_owned(), seq, decode::<QueueRow>(v.value())?)),
        }
    }
    for entry in dead.iter().map_err(dberr)? {
        let (k, _) = entry.map_err(dberr)?;
        let (b, seq) = k.value();
        out.max_seq = out.max_seq.max(Some(seq));
        if let Some(counts) = out.backends.get_mut(b) {
            counts.dead += 1;
        }
    }
    let mut removed: HashMap<String, u64> = HashMap::new();
    for (b, seq, row) in orphans {
        queue.remove((b.as_str(), seq)).map_err(dberr)?;
        let row = DeadRow {
            id: row.id,
            attempts: row.attempts,
            reason: "backend_removed".to_owned(),
            last_status: row.last_status,
            last_outcome: row.last_outcome,
            at_ms: now_ms(),
        };
        dead.insert((b.as_str(), seq), encode(&row)?.as_slice()).map_err(dberr)?;
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
fn prune(txn: &::redb::WriteTransaction, window_ms: u64, now: u64) -> Result<Vec<(String, KeyRecord)>, LogError> {
    let mut keep = Vec::new();
    {
        let mut table = txn.open_table(IDEMPOTENCY).map_err(dberr)?;
        let mut expired = Vec::new();
        for row in table.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let record: KeyRecord = decode(v.value())?;
            if now.saturating_sub(record.at_ms) > window_ms {
                expired.push(k.value().to_owned());
            } else {
                keep.push((k.value().to_owned(), record));
            }
        }
        for k in expired {
            table.remove(k.as_str()).map_err(dberr)?;
        }
    }
    keep.sort_by_key(|(_, r)| r.at_ms);
    Ok(keep)
}
