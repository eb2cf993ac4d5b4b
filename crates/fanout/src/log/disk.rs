//! The durable write log: one append-only record per operation in segment files ([`super::segments`]), and the
//! [`Index`] in memory, rebuilt at start by replaying the records through the same functions that built it.
//!
//! # Records
//! Each operation that changes the state is one [`Record`] (postcard-encoded, one segment frame):
//! - an accepted write ([`Record::Append`]: its request, pool, order and idempotency record) is appended with
//!   [`SyncMode::Now`]: the caller is answered once it is on disk (many concurrent writes share one fsync: the
//!   segment writer groups them);
//! - settlements of a backend's entry (delivered, dead letter, due again), a write refused everywhere and the
//!   answer given under an idempotency key are appended lazily: they are written with the next durable append
//!   (under load, within the moment) or by the service's one-second tick. After a crash, what may be missing is
//!   a suffix of those, so an entry may be attempted again, which the `Idempotency-Key` makes harmless;
//! - redrives, discards, recoveries and the start-up's moves are appended with `Now` *before* they are applied,
//!   so that an operator who was told "done" finds it done after a crash.
//!
//! So a write costs one record and one share of a group fsync to accept, and one small lazy record per backend
//! to finish: no per-backend rows, no copy-on-write pages, no transaction. The body lives only in its record:
//! the index keeps its position, and a worker reads it back (a `pread`, usually from the page cache) only for
//! entries past its memory window.
//!
//! # History and retention
//! The log is also the history: every accepted write stays in its segment, delivered or not, which is what
//! [`WriteLog::recover`] replays to a backend. The oldest sealed segments are deleted (once a second, by the
//! tick) while they hold no write still held (pending or a dead letter somewhere) and either every write in them
//! is older than the history window or the log is over its byte bound. Before deleting, a
//! [`Record::Checkpoint`] carries forward what the deleted records still meant (the client idempotency records
//! and the highest acceptance order), so that a restart finds them.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::{BoxFuture, ready};
use serde::{Deserialize, Serialize};

use super::index::{Body, Index};
use super::segments::{Position, SegmentError, Segments, SegmentsConfig, SyncMode};
use super::{
    DeadFilter, DeadLetter, DeliveryView, HistoryLimits, HistoryStats, Loaded, LogError, Recovered, Settlement,
    Startup, StoredDelivery, WriteLog, now_ms,
};
use crate::replay::KeyRecord;

/// Largest segment file; smaller when the history bound is small, so that retention has segments to drop.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// One operation, as stored. See the module doc for when each is made durable.
#[derive(Debug, Serialize, Deserialize)]
pub enum Record {
    /// An accepted write with its idempotency record.
    Append {
        /// The delivery id.
        id: u128,
        /// The write.
        write: StoredDelivery,
        /// The client's idempotency key and record.
        key: Option<(String, KeyRecord)>,
    },
    /// A backend's entry settled.
    Settle {
        /// The backend (label).
        backend: String,
        /// The entry's acceptance order.
        seq: u64,
        /// How.
        settlement: Settlement,
    },
    /// Every backend refused this delivery.
    DropRefused {
        /// The delivery.
        id: u128,
    },
    /// These dead letters (backend, order) went back to their queues.
    Redrive {
        /// The rows.
        rows: Vec<(String, u64)>,
    },
    /// These dead letters (backend, order) were deleted.
    Discard {
        /// The rows.
        rows: Vec<(String, u64)>,
    },
    /// The answer given under an idempotency key.
    Answer {
        /// The key.
        key: String,
        /// Its record, with the answer.
        record: KeyRecord,
    },
    /// The start-up with this pool (its renames and orphan moves are replayed from it), at this time.
    Startup {
        /// The pool (labels).
        pool: Vec<String>,
        /// When, ms since the epoch (stamps orphaned entries' dead letters).
        at_ms: u64,
    },
    /// A recovery of `backend`: the writes (id, position of their append record) queued for it again.
    Recover {
        /// The backend (label).
        backend: String,
        /// The writes, in acceptance order.
        writes: Vec<(u128, Position)>,
    },
    /// What older, deleted segments still meant.
    Checkpoint {
        /// The idempotency records still in their window.
        keys: Vec<(String, KeyRecord)>,
        /// The highest acceptance order so far.
        max_seq: Option<u64>,
        /// The newest acceptance time of the writes dropped from the history so far.
        dropped_upto_ms: Option<u64>,
    },
}

impl From<SegmentError> for LogError {
    fn from(e: SegmentError) -> Self {
        LogError::Segment(Arc::new(e))
    }
}

fn encode(record: &Record) -> Result<Vec<u8>, LogError> {
    Ok(postcard::to_allocvec(record)?)
}

fn decode(bytes: &[u8]) -> Result<Record, LogError> {
    Ok(postcard::from_bytes(bytes)?)
}

/// The write whose append record is at `at`.
fn read_write(segments: &Segments, at: Position) -> Result<(u128, StoredDelivery), LogError> {
    match decode(&segments.read(at)?)? {
        Record::Append { id, write, .. } => Ok((id, write)),
        _ => Err(LogError::Corrupt(format!("no write at segment {} offset {}", at.segment, at.offset))),
    }
}

struct State {
    index: Index,
    /// Per segment, the oldest and newest acceptance time of its writes (ms).
    times: BTreeMap<u64, (u64, u64)>,
    max_seq: Option<u64>,
    /// The newest acceptance time of the writes dropped from the history.
    dropped_upto_ms: Option<u64>,
}

impl State {
    fn saw_write(&mut self, at: Position, write: &StoredDelivery) {
        let t = write.accepted_at_ms;
        let span = self.times.entry(at.segment).or_insert((t, t));
        span.0 = span.0.min(t);
        span.1 = span.1.max(t);
        self.max_seq = self.max_seq.max(Some(write.seq));
    }

    /// Applies one record, at `at`, during replay.
    fn replay(&mut self, segments: &Segments, at: Position, record: Record) -> Result<(), LogError> {
        match record {
            Record::Append { id, write, key } => {
                self.saw_write(at, &write);
                self.index.append(id, &write, Body::Disk(at), key.as_ref().map(|(k, r)| (k.as_str(), r)));
            }
            Record::Settle { backend, seq, settlement } => {
                self.index.settle(&backend, seq, settlement);
            }
            Record::DropRefused { id } => {
                self.index.drop_refused(id);
            }
            Record::Redrive { rows } => {
                self.index.redrive(&rows);
            }
            Record::Discard { rows } => {
                self.index.discard(&rows);
            }
            Record::Answer { key, record } => self.index.answer(&key, record),
            Record::Startup { pool, at_ms } => {
                self.index.startup(&pool, at_ms);
            }
            Record::Recover { backend, writes } => {
                let mut found = Vec::with_capacity(writes.len());
                for (_, pos) in writes {
                    let (id, write) = read_write(segments, pos)?;
                    found.push((id, write, Body::Disk(pos)));
                }
                self.index.recover(&backend, found);
            }
            Record::Checkpoint { keys, max_seq, dropped_upto_ms } => {
                self.index.restore_keys(keys);
                self.max_seq = self.max_seq.max(max_seq);
                self.dropped_upto_ms = self.dropped_upto_ms.max(dropped_upto_ms);
            }
        }
        Ok(())
    }
}

/// The durable write log in a directory. Share it behind an `Arc`.
pub struct DiskLog {
    segments: Segments,
    state: Arc<Mutex<State>>,
    limits: HistoryLimits,
    /// A retention pass is running (one at a time).
    retaining: Arc<AtomicBool>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every critical section leaves the state consistent, so a poisoned lock is still usable.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl DiskLog {
    /// Opens (or creates) the log in `dir` and replays it.
    ///
    /// # Errors
    /// When the directory cannot be created or read, a sealed segment is damaged ([`LogError::Segment`]), or a
    /// record does not decode.
    pub fn open(dir: &Path, limits: HistoryLimits) -> Result<Self, LogError> {
        let segment_bytes = (limits.max_bytes / 8).clamp(64 * 1024, SEGMENT_BYTES);
        let segments = Segments::open(SegmentsConfig { dir: dir.to_owned(), segment_bytes })?;
        let mut state = State { index: Index::default(), times: BTreeMap::new(), max_seq: None, dropped_upto_ms: None };
        for item in segments.replay() {
            let (at, bytes) = item?;
            state.replay(&segments, at, decode(&bytes)?)?;
        }
        Ok(Self { segments, state: Arc::new(Mutex::new(state)), limits, retaining: Arc::new(AtomicBool::new(false)) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Appends a lazy record; a refusal (the disk is far behind) costs only durability, which the log says.
    fn lazy(&self, record: &Record) {
        let result = encode(record).and_then(|bytes| Ok(self.segments.append_lazy(bytes)?));
        if let Err(error) = result {
            tracing::warn!(%error, "write log: a settlement was not recorded; after a restart it may be repeated");
        }
    }

    /// Deletes the oldest segments the history no longer needs (see the module doc).
    fn retain(&self) {
        if self.retaining.swap(true, Ordering::AcqRel) {
            return;
        }
        let infos = self.segments.segments();
        let now = now_ms();
        let (cut, checkpoint) = {
            let state = self.state();
            let pinned = state.index.held_positions().map(|p| p.segment).min().unwrap_or(u64::MAX);
            let mut total: u64 = infos.iter().map(|s| s.bytes).sum();
            let mut cut = None;
            for s in infos.iter().filter(|s| s.sealed) {
                let newest = state.times.get(&s.id).map_or(0, |t| t.1);
                let old = now.saturating_sub(newest) > self.limits.window_ms;
                if s.id >= pinned || !(old || total > self.limits.max_bytes) {
                    break;
                }
                total -= s.bytes;
                cut = Some(s.id + 1);
            }
            let checkpoint = cut.map(|cut| {
                let dropped = state.times.range(..cut).map(|(_, t)| t.1).max();
                // The keys are kept in full (expired ones go at the next prune).
                Record::Checkpoint {
                    keys: state.index.keys_snapshot(),
                    max_seq: state.max_seq,
                    dropped_upto_ms: state.dropped_upto_ms.max(dropped),
                }
            });
            (cut, checkpoint)
        };
        let (Some(cut), Some(checkpoint)) = (cut, checkpoint) else {
            self.retaining.store(false, Ordering::Release);
            return;
        };
        let segments = self.segments.clone();
        let state = self.state.clone();
        let retaining = self.retaining.clone();
        let bytes = encode(&checkpoint);
        tokio::spawn(async move {
            let result = match bytes {
                Ok(bytes) => segments.append(bytes, SyncMode::Now).await.map_err(LogError::from),
                Err(e) => Err(e),
            };
            match result.and_then(|_| Ok(segments.remove_before(cut)?)) {
                Ok(freed) => {
                    let mut state = lock(&state);
                    let dropped = state.times.range(..cut).map(|(_, t)| t.1).max();
                    state.dropped_upto_ms = state.dropped_upto_ms.max(dropped);
                    state.times.retain(|id, _| *id >= cut);
                    tracing::debug!(freed, before = cut, "write log: history segments dropped");
                }
                Err(error) => tracing::warn!(%error, "write log: old segments not dropped; retrying"),
            }
            retaining.store(false, Ordering::Release);
        });
    }
}

impl WriteLog for DiskLog {
    fn durable(&self) -> bool {
        true
    }

    fn healthy(&self) -> bool {
        self.segments.healthy()
    }

    fn unfinished(&self) -> u64 {
        self.state().index.unfinished()
    }

    fn startup(&self, pool: Vec<String>) -> BoxFuture<'static, Result<Startup, LogError>> {
        let at_ms = now_ms();
        let record = encode(&Record::Startup { pool: pool.clone(), at_ms });
        let append = record.map(|bytes| self.segments.append(bytes, SyncMode::Now));
        let state = self.state.clone();
        Box::pin(async move {
            append?.await?;
            let mut state = lock(&state);
            let mut startup = state.index.startup(&pool, at_ms);
            startup.max_seq = startup.max_seq.max(state.max_seq);
            Ok(startup)
        })
    }

    fn append(
        &self,
        id: u128,
        write: StoredDelivery,
        key: Option<(&str, &KeyRecord)>,
    ) -> BoxFuture<'static, Result<(), LogError>> {
        let key = key.map(|(k, r)| (k.to_owned(), r.clone()));
        let record = Record::Append { id, write, key };
        let bytes = match encode(&record) {
            Ok(bytes) => bytes,
            Err(e) => return Box::pin(ready(Err(e))),
        };
        let append = self.segments.append(bytes, SyncMode::Now);
        let state = self.state.clone();
        Box::pin(async move {
            let at = append.await?;
            let Record::Append { id, write, key } = record else { unreachable!("built above") };
            let mut state = lock(&state);
            state.saw_write(at, &write);
            state.index.append(id, &write, Body::Disk(at), key.as_ref().map(|(k, r)| (k.as_str(), r)));
            Ok(())
        })
    }

    fn settle(&self, backend: &Arc<str>, seq: u64, settlement: Settlement) -> BoxFuture<'static, ()> {
        self.state().index.settle(backend, seq, settlement.clone());
        self.lazy(&Record::Settle { backend: backend.to_string(), seq, settlement });
        Box::pin(ready(()))
    }

    fn drop_refused(&self, id: u128) -> BoxFuture<'static, Vec<String>> {
        let (dropped, _) = self.state().index.drop_refused(id);
        if !dropped.is_empty() {
            self.lazy(&Record::DropRefused { id });
        }
        Box::pin(ready(dropped))
    }

    fn pending(
        &self,
        backend: &Arc<str>,
        skip: HashSet<u64>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<Loaded>, LogError>> {
        let rows = self.state().index.pending(backend, &skip, limit);
        let segments = self.segments.clone();
        Box::pin(async move {
            let read = tokio::task::spawn_blocking(move || {
                rows.into_iter()
                    .map(|(seq, row, body)| {
                        let delivery = match body {
                            Body::Disk(at) => read_write(&segments, at)?.1,
                            Body::Memory(write) => (*write).clone(),
                        };
                        Ok(Loaded { seq, row, delivery })
                    })
                    .collect::<Result<Vec<_>, LogError>>()
            });
            read.await.map_err(|e| LogError::Corrupt(format!("the read task failed: {e}")))?
        })
    }

    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> BoxFuture<'static, Result<Vec<DeadLetter>, LogError>> {
        Box::pin(ready(Ok(self.state().index.dead_letters(&filter, limit))))
    }

    fn redrive(
        &self,
        filter: DeadFilter,
        pool: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        let rows = self.state().index.redrivable(&filter, &pool);
        self.durably_then(Record::Redrive { rows }, |index, record| match record {
            Record::Redrive { rows } => index.redrive(&rows),
            _ => Vec::new(),
        })
    }

    fn discard(&self, filter: DeadFilter) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        let rows: Vec<(String, u64)> =
            self.state().index.matching_dead(&filter).into_iter().map(|(b, seq)| (b.to_string(), seq)).collect();
        self.durably_then(Record::Discard { rows }, |index, record| match record {
            Record::Discard { rows } => index.discard(&rows).0,
            _ => Vec::new(),
        })
    }

    fn view(&self, id: u128) -> BoxFuture<'static, Result<Option<DeliveryView>, LogError>> {
        Box::pin(ready(Ok(self.state().index.view(id))))
    }

    fn answer(&self, key: &str, record: &KeyRecord) {
        self.state().index.answer(key, record.clone());
        self.lazy(&Record::Answer { key: key.to_owned(), record: record.clone() });
    }

    fn idempotency_keys(
        &self,
        window_ms: u64,
        now: u64,
    ) -> BoxFuture<'static, Result<Vec<(String, KeyRecord)>, LogError>> {
        Box::pin(ready(Ok(self.state().index.keys(window_ms, now))))
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), LogError>> {
        let flush = self.segments.flush();
        Box::pin(async move { Ok(flush.await?) })
    }

    fn tick(&self, window_ms: u64, keep_delivered: u64) {
        {
            let mut state = self.state();
            state.index.trim(keep_delivered);
            state.index.keys(window_ms, now_ms());
        }
        // The lazy records of a quiet second become durable now rather than with the next write.
        let flush = self.segments.flush();
        tokio::spawn(async move {
            if let Err(error) = flush.await {
                tracing::warn!(%error, "write log: the periodic flush failed");
            }
        });
        self.retain();
    }

    fn history(&self) -> HistoryStats {
        let state = self.state();
        HistoryStats { bytes: self.segments.bytes(), oldest_ms: state.times.values().map(|t| t.0).min() }
    }

    fn recover(&self, backend: &Arc<str>, since_ms: u64) -> BoxFuture<'static, Result<Recovered, LogError>> {
        let segments = self.segments.clone();
        let state = self.state.clone();
        let backend = backend.clone();
        let oldest_ms = self.history().oldest_ms;
        Box::pin(async move {
            // Every write the history holds since `since_ms`, without its body (read back when sent).
            let scan = {
                let segments = segments.clone();
                tokio::task::spawn_blocking(move || {
                    let mut found = Vec::new();
                    for item in segments.replay() {
                        let (at, bytes) = item?;
                        if let Record::Append { id, mut write, .. } = decode(&bytes)?
                            && write.accepted_at_ms >= since_ms
                        {
                            write.body = Vec::new();
                            write.headers = Vec::new();
                            found.push((id, write, at));
                        }
                    }
                    Ok::<_, LogError>(found)
                })
            };
            let mut found = scan.await.map_err(|e| LogError::Corrupt(format!("the scan task failed: {e}")))??;
            found.sort_by_key(|(_, w, _)| w.seq);
            let upto_seq = found.last().map(|(_, w, _)| w.seq);
            let writes = found.iter().map(|(id, _, at)| (*id, *at)).collect();
            segments.append(encode(&Record::Recover { backend: backend.to_string(), writes })?, SyncMode::Now).await?;
            let mut state = lock(&state);
            let (queued, from_dead_letters) =
                state.index.recover(&backend, found.into_iter().map(|(id, w, at)| (id, w, Body::Disk(at))).collect());
            let queued = queued.len() as u64;
            let pending_upto = upto_seq.map_or(0, |upto| state.index.pending_upto(&backend, upto));
            let dropped_upto_ms = state.dropped_upto_ms;
            Ok(Recovered { queued, from_dead_letters, upto_seq, pending_upto, oldest_ms, dropped_upto_ms })
        })
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let segments = self.segments.clone();
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || segments.close()).await;
        })
    }
}

impl DiskLog {
    /// Appends `record` durably, then applies it to the index with `apply`; resolves with what `apply` returned.
    fn durably_then<T: Send + 'static>(
        &self,
        record: Record,
        apply: impl FnOnce(&mut Index, Record) -> T + Send + 'static,
    ) -> BoxFuture<'static, Result<T, LogError>> {
        let bytes = match encode(&record) {
            Ok(bytes) => bytes,
            Err(e) => return Box::pin(ready(Err(e))),
        };
        let append = self.segments.append(bytes, SyncMode::Now);
        let state = self.state.clone();
        Box::pin(async move {
            append.await?;
            Ok(apply(&mut lock(&state).index, record))
        })
    }
}
