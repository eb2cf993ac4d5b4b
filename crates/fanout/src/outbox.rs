//! The durable outbox: every accepted write is on disk, with each backend's part of it, before the client is
//! told anything, and stays there until every backend has it (or gave up), so that a crash or restart of fanout
//! loses no write (issue "no lost, duplicated or reordered writes").
//!
//! Storage is [redb](https://docs.rs/redb): an embedded, pure-Rust, ACID key-value store in one file
//! (`DATA_DIR/outbox.redb`). It was chosen over SQLite (a C dependency and a SQL layer we do not need) and fjall
//! (an LSM tree, built for write volumes far above ours): fanout needs small transactional updates of a few keys
//! and range scans at start.
//!
//! One writer thread owns every write transaction and **groups commits**: it takes every operation waiting in its
//! queue (up to [`MAX_BATCH`]) into one transaction, so that many concurrent writes share one fsync. Acceptances
//! are committed durably and their senders are answered only then; progress and completion records are
//! committed without fsync (redb's `Durability::None`), so they reach the disk with the next durable commit, or
//! within a second (the service's tick asks for an empty durable commit when there are any): after a crash, a
//! backend's delivery may be attempted again, which the `Idempotency-Key` makes harmless.
//!
//! The writer thread alone holds the database: after a failed commit (a full disk, an I/O error) redb refuses
//! every transaction until the database is reopened, so the writer closes it and reopens it for the next batch.
//! Expired idempotency records are deleted at start and then every minute.
//!
//! Tables:
//! - `deliveries`: delivery id (u128) -> [`StoredDelivery`] (postcard): order, method, path, headers, body, key.
//! - `pending`: (delivery id, backend index) -> [`BackendRow`] (postcard): attempts so far, next due time. A
//!   row exists while that backend still needs the write.
//! - `idempotency`: client `Idempotency-Key` -> [`KeyRecord`] (postcard), kept for the replay window.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::forward::ForwardRequest;
use crate::replay::KeyRecord;

/// Operations taken into one write transaction at most.
pub const MAX_BATCH: usize = 1024;
/// Operations waiting for the writer thread at most; senders wait beyond (back-pressure, not memory).
const QUEUE: usize = 8192;

const DELIVERIES: TableDefinition<u128, &[u8]> = TableDefinition::new("deliveries");
const PENDING: TableDefinition<(u128, u16), &[u8]> = TableDefinition::new("pending");
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

/// One backend's progress on one delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due, milliseconds since the Unix epoch (0: at once).
    pub next_due_ms: u64,
}

/// A delivery found in the outbox at start: what it is and which backends still need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    /// The delivery id.
    pub id: u128,
    /// The stored write.
    pub delivery: StoredDelivery,
    /// (backend index, its progress) for every backend that still needs it.
    pub pending: Vec<(u16, BackendRow)>,
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

enum Op {
    Accept {
        id: u128,
        record: Vec<u8>,
        backends: u16,
        key: Option<(String, Vec<u8>)>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Answer {
        key: String,
        record: Vec<u8>,
    },
    Flush {
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Unfinished {
        done: oneshot::Sender<Result<Vec<Unfinished>, StoreError>>,
    },
    Keys {
        window_ms: u64,
        now: u64,
        done: oneshot::Sender<Result<Vec<(String, KeyRecord)>, StoreError>>,
    },
    Tick {
        window_ms: u64,
    },
    Progress {
        id: u128,
        backend: u16,
        row: BackendRow,
    },
    Finish {
        id: u128,
        backend: u16,
        last: bool,
    },
}

/// Handle to the outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    ops: mpsc::Sender<Op>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    healthy: Arc<AtomicBool>,
}

impl Outbox {
    /// Opens (or creates) `dir/outbox.redb` and starts the writer thread.
    ///
    /// # Errors
    /// When the directory cannot be created or the file cannot be opened for writing.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::from)?;
        let path = dir.join("outbox.redb");
        let db = Database::create(&path).map_err(StoreError::from)?;
        // Create the tables (and prove the file is writable) before accepting anything.
        let txn = db.begin_write().map_err(StoreError::from)?;
        txn.open_table(DELIVERIES).map_err(StoreError::from)?;
        txn.open_table(PENDING).map_err(StoreError::from)?;
        txn.open_table(IDEMPOTENCY).map_err(StoreError::from)?;
        txn.commit().map_err(StoreError::from)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let writer_state =
            Writer { db: Some(db), path: path.clone(), healthy: healthy.clone(), dirty: false, ticks: 0 };
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer_state.run(rx))
            .map_err(StoreError::from)?;
        Ok(Self { ops: tx, writer: Arc::new(std::sync::Mutex::new(Some(handle))), healthy })
    }

    /// False after a failed commit, until one succeeds again (readiness reports it).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Once a second: makes recent progress durable when there was any, and (every minute) deletes expired
    /// idempotency records, so that neither waits for the next write.
    pub fn tick(&self, window_ms: u64) {
        let _ = self.ops.try_send(Op::Tick { window_ms });
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

    /// Stores a new delivery for `backends` backends (all pending), durably: resolves once it is on disk.
    ///
    /// # Errors
    /// When the store fails or its writer is gone; nothing must be sent then.
    pub async fn accept(
        &self,
        id: u128,
        delivery: &StoredDelivery,
        backends: u16,
        key: Option<(&str, &KeyRecord)>,
    ) -> Result<(), StoreError> {
        let record = postcard::to_allocvec(delivery).map_err(StoreError::from)?;
        let key = match key {
            Some((k, r)) => Some((k.to_owned(), postcard::to_allocvec(r).map_err(StoreError::from)?)),
            None => None,
        };
        let (done, wait) = oneshot::channel();
        self.ops
            .send(Op::Accept { id, record, backends, key, done })
            .await
            .map_err(|_| StoreError("the writer thread is gone".into()))?;
        wait.await.map_err(|_| StoreError("the writer thread is gone".into()))?
    }

    /// Records a backend's progress (not fsynced on its own). Advisory: dropped when the writer's queue is full
    /// (a restart then repeats an attempt or two, which the schedule and `Idempotency-Key` absorb).
    pub fn progress(&self, id: u128, backend: u16, row: BackendRow) {
        let _ = self.ops.try_send(Op::Progress { id, backend, row });
    }

    /// Makes everything recorded so far durable (one fsync); used at shutdown.
    ///
    /// # Errors
    /// When the store fails or its writer is gone.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.ops.send(Op::Flush { done }).await.map_err(|_| StoreError("the writer thread is gone".into()))?;
        wait.await.map_err(|_| StoreError("the writer thread is gone".into()))?
    }

    /// Records the answer given under an idempotency key (not fsynced on its own; advisory like progress).
    pub fn answer(&self, key: &str, record: &KeyRecord) {
        if let Ok(record) = postcard::to_allocvec(record) {
            let _ = self.ops.try_send(Op::Answer { key: key.to_owned(), record });
        }
    }

    /// Removes one backend's pending row without waiting (a backend that left the pool).
    pub fn drop_pending(&self, id: u128, backend: u16) {
        let _ = self.ops.try_send(Op::Finish { id, backend, last: false });
    }

    /// Removes a delivery that no backend of the pool needs any more.
    pub fn drop_delivery(&self, id: u128) {
        let _ = self.ops.try_send(Op::Finish { id, backend: u16::MAX, last: true });
    }

    /// Records that a backend is done with a delivery (delivered or dead letter); `last` when it was the last
    /// backend pending, which removes the delivery itself.
    pub async fn finish(&self, id: u128, backend: u16, last: bool) {
        let _ = self.ops.send(Op::Finish { id, backend, last }).await;
    }

    /// Every delivery still pending for some backend, in acceptance order.
    ///
    /// # Errors
    /// When the store cannot be read, or a record does not decode.
    pub async fn unfinished(&self) -> Result<Vec<Unfinished>, StoreError> {
        let (done, wait) = oneshot::channel();
        self.ops.send(Op::Unfinished { done }).await.map_err(|_| gone())?;
        wait.await.map_err(|_| gone())?
    }

    /// The idempotency records younger than `window_ms`, oldest first; older ones are deleted.
    ///
    /// # Errors
    /// When the store cannot be read or written.
    pub async fn idempotency_keys(&self, window_ms: u64, now: u64) -> Result<Vec<(String, KeyRecord)>, StoreError> {
        let (done, wait) = oneshot::channel();
        self.ops.send(Op::Keys { window_ms, now, done }).await.map_err(|_| gone())?;
        wait.await.map_err(|_| gone())?
    }
}

fn gone() -> StoreError {
    StoreError("the writer thread is gone".into())
}

fn read_unfinished(db: &Database) -> Result<Vec<Unfinished>, StoreError> {
    let txn = db.begin_read().map_err(StoreError::from)?;
    let deliveries = txn.open_table(DELIVERIES).map_err(StoreError::from)?;
    let pending = txn.open_table(PENDING).map_err(StoreError::from)?;
    let mut out = Vec::new();
    for entry in deliveries.iter().map_err(StoreError::from)? {
        let (id, record) = entry.map_err(StoreError::from)?;
        let id = id.value();
        let delivery: StoredDelivery = postcard::from_bytes(record.value()).map_err(StoreError::from)?;
        let mut rows = Vec::new();
        for row in pending.range((id, 0)..=(id, u16::MAX)).map_err(StoreError::from)? {
            let (key, value) = row.map_err(StoreError::from)?;
            rows.push((key.value().1, postcard::from_bytes(value.value()).map_err(StoreError::from)?));
        }
        if !rows.is_empty() {
            out.push(Unfinished { id, delivery, pending: rows });
        }
    }
    out.sort_by_key(|u| u.delivery.seq);
    Ok(out)
}

/// Deletes the idempotency records older than `window_ms`; returns the others, oldest first.
fn prune_keys(db: &Database, window_ms: u64, now: u64) -> Result<Vec<(String, KeyRecord)>, StoreError> {
    let txn = db.begin_write().map_err(StoreError::from)?;
    let mut keep = Vec::new();
    {
        let mut table = txn.open_table(IDEMPOTENCY).map_err(StoreError::from)?;
        let mut expired = Vec::new();
        for row in table.iter().map_err(StoreError::from)? {
            let (k, v) = row.map_err(StoreError::from)?;
            let record: KeyRecord = postcard::from_bytes(v.value()).map_err(StoreError::from)?;
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
    txn.commit().map_err(StoreError::from)?;
    keep.sort_by_key(|(_, r)| r.at_ms);
    Ok(keep)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The writer thread's state: it alone holds the database, so that it can close and reopen it after an I/O
/// error (redb refuses every transaction after one until then).
struct Writer {
    db: Option<Database>,
    path: PathBuf,
    healthy: Arc<AtomicBool>,
    /// A commit without fsync happened since the last one with.
    dirty: bool,
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
        if self.db.is_none() {
            self.db = Some(Database::create(&self.path).map_err(StoreError::from)?);
            tracing::info!(path = %self.path.display(), "outbox reopened");
        }
        self.db.as_ref().ok_or_else(gone)
    }

    fn failed(&mut self, e: &StoreError) {
        tracing::error!(error = %e, "outbox failure: the database is closed and will be reopened");
        self.healthy.store(false, Ordering::Relaxed);
        self.db = None;
    }

    fn handle(&mut self, batch: Vec<Op>) {
        let mut writes = Vec::with_capacity(batch.len());
        for op in batch {
            match op {
                Op::Unfinished { done } => {
                    let r = self.db().and_then(read_unfinished);
                    let _ = done.send(r);
                }
                Op::Keys { window_ms, now, done } => {
                    let r = self.db().and_then(|db| prune_keys(db, window_ms, now));
                    if let Err(e) = &r {
                        self.failed(e);
                    }
                    let _ = done.send(r);
                }
                Op::Tick { window_ms } => {
                    self.ticks += 1;
                    if self.ticks.is_multiple_of(60) {
                        let r = self.db().and_then(|db| prune_keys(db, window_ms, now_ms()));
                        if let Err(e) = &r {
                            self.failed(e);
                        }
                    }
                    if self.dirty {
                        // An empty commit with fsync makes every earlier commit without it durable.
                        let (done, _) = oneshot::channel();
                        writes.push(Op::Flush { done });
                    }
                }
                other => writes.push(other),
            }
        }
        if writes.is_empty() {
            return;
        }
        let durable = writes.iter().any(|op| matches!(op, Op::Accept { .. } | Op::Flush { .. }));
        let result = self.db().and_then(|db| apply(db, &writes, durable));
        match &result {
            Ok(()) => {
                self.healthy.store(true, Ordering::Relaxed);
                self.dirty = !durable;
            }
            Err(e) => self.failed(e),
        }
        for op in writes {
            if let Op::Accept { done, .. } | Op::Flush { done } = op {
                let _ = done.send(result.clone());
            }
        }
    }
}

fn apply(db: &Database, batch: &[Op], durable: bool) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(StoreError::from)?;
    if !durable {
        txn.set_durability(Durability::None).map_err(StoreError::from)?;
    }
    {
        let mut deliveries = txn.open_table(DELIVERIES).map_err(StoreError::from)?;
        let mut pending = txn.open_table(PENDING).map_err(StoreError::from)?;
        let mut keys = txn.open_table(IDEMPOTENCY).map_err(StoreError::from)?;
        let fresh = postcard::to_allocvec(&BackendRow::default()).map_err(StoreError::from)?;
        for op in batch {
            match op {
                Op::Accept { id, record, backends, key, .. } => {
                    deliveries.insert(*id, record.as_slice()).map_err(StoreError::from)?;
                    for b in 0..*backends {
                        pending.insert((*id, b), fresh.as_slice()).map_err(StoreError::from)?;
                    }
                    if let Some((k, r)) = key {
                        keys.insert(k.as_str(), r.as_slice()).map_err(StoreError::from)?;
                    }
                }
                Op::Flush { .. } | Op::Unfinished { .. } | Op::Keys { .. } | Op::Tick { .. } => {}
                Op::Answer { key, record } => {
                    if keys.get(key.as_str()).map_err(StoreError::from)?.is_some() {
                        keys.insert(key.as_str(), record.as_slice()).map_err(StoreError::from)?;
                    }
                }
                Op::Progress { id, backend, row } => {
                    // Only while still pending: a late progress record must not revive a finished backend.
                    if pending.get((*id, *backend)).map_err(StoreError::from)?.is_some() {
                        let value = postcard::to_allocvec(row).map_err(StoreError::from)?;
                        pending.insert((*id, *backend), value.as_slice()).map_err(StoreError::from)?;
                    }
                }
                Op::Finish { id, backend, last } => {
                    pending.remove((*id, *backend)).map_err(StoreError::from)?;
                    if *last {
                        deliveries.remove(*id).map_err(StoreError::from)?;
                    }
                }
            }
        }
    }
    txn.commit().map_err(StoreError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fanout-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn write(seq: u64) -> StoredDelivery {
        StoredDelivery {
            seq,
            accepted_at_ms: 1,
            method: "POST".into(),
            path_and_query: "/register".into(),
            headers: vec![("content-type".into(), b"application/x-www-form-urlencoded".to_vec())],
            body: format!("username=u{seq}&password=p").into_bytes(),
            ordering_key: Some(format!("u{seq}")),
            backends: vec!["a:1".into(), "b:1".into(), "c:1".into()],
        }
    }

    #[tokio::test]
    async fn accepted_writes_survive_a_reopen_until_every_backend_finished() {
        let dir = temp_dir("reopen");
        {
            let outbox = Outbox::open(&dir).expect("open");
            for seq in 0..3u64 {
                outbox.accept(u128::from(seq) + 100, &write(seq), 3, None).await.expect("accept");
            }
            outbox.progress(100, 1, BackendRow { attempts: 4, next_due_ms: 77 });
            outbox.finish(100, 0, false).await;
            outbox.finish(101, 0, false).await;
            outbox.finish(101, 1, false).await;
            outbox.finish(101, 2, true).await;
            // A durable commit after the non-durable ones makes them durable too.
            let key = KeyRecord { delivery_id: 200, body_hash: [1; 32], at_ms: now_ms(), answer: None };
            outbox.accept(200, &write(9), 3, Some(("client-key", &key))).await.expect("accept");
            outbox.close();
        }
        let outbox = Outbox::open(&dir).expect("reopen");
        let left = outbox.unfinished().await.expect("read");
        let ids: Vec<u128> = left.iter().map(|u| u.id).collect();
        assert_eq!(ids, [100, 102, 200], "in acceptance order, the finished one gone");
        assert_eq!(left[0].pending, [(1, BackendRow { attempts: 4, next_due_ms: 77 }), (2, BackendRow::default())]);
        assert_eq!(left[0].delivery, write(0));
        assert_eq!(left.last().map(|u| u.delivery.seq), Some(9));
        let keys = outbox.idempotency_keys(60_000, now_ms()).await.expect("keys");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, "client-key");
        assert!(outbox.idempotency_keys(0, now_ms() + 10).await.expect("keys").is_empty(), "expired ones are deleted");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_directory_is_refused() {
        let err = Outbox::open(Path::new("/proc/fanout-cannot-write-here")).err().expect("refused");
        assert!(err.to_string().starts_with("outbox: "), "{err}");
    }
}
