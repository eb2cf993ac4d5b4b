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
//! - redrives, discards, recoveries and the start-up's moves are appended with `Now`, and their caller is
//!   answered only once they are on disk, so that an operator who was told "done" finds it done after a crash.
//!
//! With `--encryption-key-file`, the [`Codec`] seals the records that carry what clients sent (an append, an
//! answer, a checkpoint with idempotency records) into a [`Record::Sealed`] ([`super::seal`]); records written
//! in clear (before encryption was turned on) are read as before. Every record is decoded at start, so a
//! missing key stops the start ([`LogError::Sealed`]) before any worker could read a write it cannot open.
//!
//! Every record is queued for the segment writer under the same lock as the index change it describes, so the
//! file holds the changes in the order they were applied, and a replay applies them in that order again.
//! Records that may be long (a recovery's writes, a redrive's or a discard's rows, the idempotency records of a
//! checkpoint) are split into several frames of bounded size.
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
//! and the highest acceptance order), so that a restart finds them. A recovery pins the segments it is reading
//! until the writes it found are held again (and so pin their own segments).
//!
//! # Dependency
//! Records are encoded with postcard (already the project's compact binary encoding): `serde` derives, no
//! schema to maintain by hand, varint integers; a record is a few tens of bytes plus the write's own bytes.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, ready};
use serde::{Deserialize, Serialize};

use super::index::{Body, Index};
use super::seal::{KeyId, Keyring, OpenError, Sealed};
use super::segments::{Position, SegmentError, Segments, SegmentsConfig, SyncMode};
use super::{
    DeadFilter, DeadLetter, DeliveryView, HistoryLimits, HistoryStats, Loaded, LogError, Recovered, Settlement,
    Startup, StoredDelivery, WriteLog, now_ms,
};
use crate::lock;
use crate::replay::KeyRecord;

/// Largest segment file; smaller when the history bound is small, so that retention has segments to drop.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Rows (backend and order, or id and position) per record at most, so that a record stays far below a frame's
/// limit (tens of bytes each).
const ROWS_PER_RECORD: usize = 16 * 1024;
/// Idempotency records per checkpoint record at most (each may carry an answer of up to 64 KiB).
const KEYS_PER_RECORD: usize = 64;

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
    /// Another record, encrypted (`--encryption-key-file`): an [`Record::Append`], [`Record::Answer`] or
    /// [`Record::Checkpoint`] with idempotency records, postcard-encoded, then sealed (see [`super::seal`]).
    /// Last of the variants, so that the records of earlier versions keep their tags and decode as before.
    Sealed {
        /// The delivery the record belongs to (0 for a checkpoint), bound to the ciphertext as associated data.
        id: u128,
        /// The encrypted record.
        sealed: Sealed,
    },
    /// Written (durably) once a second while the log is unhealthy, to find out whether records can be stored
    /// again: [`PROBE_BYTES`] of zeros, the size of a large write, so that a disk with a few free bytes does not
    /// pass for one with room. Means nothing when read back. Last, after [`Record::Sealed`].
    Probe {
        /// Zeros.
        padding: Vec<u8>,
    },
}

/// The size of a [`Record::Probe`]: a write with the largest default body (64 KiB, `--max-body`).
const PROBE_BYTES: usize = 64 * 1024;

impl Record {
    /// The delivery id a record is sealed under when encryption is on, or `None` for a record that carries
    /// nothing a client sent (settlements, redrives, ... and checkpoints without idempotency records).
    fn seal_id(&self) -> Option<u128> {
        match self {
            Record::Append { id, .. } => Some(*id),
            Record::Answer { record, .. } => Some(record.delivery_id),
            Record::Checkpoint { keys, .. } if !keys.is_empty() => Some(0),
            _ => None,
        }
    }
}

impl From<SegmentError> for LogError {
    fn from(e: SegmentError) -> Self {
        LogError::Segment(Arc::new(e))
    }
}

/// How records become a frame's bytes and back: postcard, and with a key ring the records that carry what
/// clients sent sealed ([`Record::seal_id`]). Records without a seal are read whatever the key ring: those
/// written before encryption was turned on.
#[derive(Clone, Default)]
pub struct Codec {
    keys: Option<Arc<Keyring>>,
}

impl Codec {
    /// A codec that seals with `keys` (`None`: writes in clear, and refuses sealed records).
    pub fn new(keys: Option<Arc<Keyring>>) -> Self {
        Codec { keys }
    }

    /// The bytes of `record`.
    ///
    /// # Errors
    /// [`LogError::Decode`] when postcard cannot encode it, [`LogError::Sealed`] when it cannot be encrypted.
    pub fn encode(&self, record: &Record) -> Result<Vec<u8>, LogError> {
        let plain = postcard::to_allocvec(record)?;
        match (&self.keys, record.seal_id()) {
            (Some(keys), Some(id)) => {
                let sealed = keys.seal(id, &plain).map_err(|e| LogError::Sealed(e.to_string()))?;
                Ok(postcard::to_allocvec(&Record::Sealed { id, sealed })?)
            }
            _ => Ok(plain),
        }
    }

    /// The record in `bytes`, opened if sealed.
    ///
    /// # Errors
    /// [`LogError::Sealed`] when a sealed record's key is not in the ring (or there is no ring) or it does not
    /// authenticate; [`LogError::Decode`] or [`LogError::Corrupt`] for bytes that are no record.
    pub fn decode(&self, bytes: &[u8]) -> Result<Record, LogError> {
        Ok(self.decode_keyed(bytes)?.0)
    }

    /// Like [`Codec::decode`], with the id of the key that had sealed it.
    fn decode_keyed(&self, bytes: &[u8]) -> Result<(Record, Option<KeyId>), LogError> {
        let (id, sealed) = match postcard::from_bytes(bytes)? {
            Record::Sealed { id, sealed } => (id, sealed),
            record => return Ok((record, None)),
        };
        let Some(keys) = &self.keys else {
            return Err(LogError::Sealed(format!(
                "the write log holds encrypted records (key id {}) and no key file is given: start with the key \
                 file that holds that key",
                sealed.key
            )));
        };
        let plain = keys.open(id, &sealed).map_err(|e| match e {
            OpenError::UnknownKey(key) => LogError::Sealed(format!(
                "the write log holds records encrypted with key id {key}, which {} does not hold (its key ids: \
                 {}): put that key back below the first; a key may leave the file only once the history holds no \
                 record it encrypted",
                keys.path().display(),
                keys.ids().iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )),
            forged @ OpenError::Forged(_) => LogError::Sealed(forged.to_string()),
        })?;
        let record: Record = postcard::from_bytes(&plain)?;
        if record.seal_id() != Some(id) {
            return Err(LogError::Corrupt(format!("a record sealed for delivery {id:032x} is not that delivery's")));
        }
        Ok((record, Some(sealed.key)))
    }
}

/// Warns when `data_dir`, the directory that holds the log's own and is the operator's (`--data-dir`), exists
/// and lets group or others in. The log's directory is `0700` whatever it is, but the operator may keep other
/// things there; it is not changed.
fn warn_if_open(data_dir: Option<&Path>) {
    use std::os::unix::fs::PermissionsExt;
    let Some(data_dir) = data_dir.filter(|d| !d.as_os_str().is_empty()) else { return };
    if let Ok(meta) = std::fs::metadata(data_dir)
        && meta.is_dir()
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            data_dir = %data_dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "--data-dir (DATA_DIR) lets group or others in; the write log in it is 0700 (files 0600), but consider \
             chmod 700 on the directory"
        );
    }
}

/// The write whose append record is at `at`.
fn read_write(segments: &Segments, codec: &Codec, at: Position) -> Result<(u128, StoredDelivery), LogError> {
    match codec.decode(&segments.read(at)?)? {
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
    /// Recoveries reading the history now, and the oldest segment each reads: retention keeps those.
    recovering_from: Vec<u64>,
}

impl State {
    fn saw_write(&mut self, at: Position, write: &StoredDelivery) {
        let t = write.accepted_at_ms;
        let span = self.times.entry(at.segment).or_insert((t, t));
        span.0 = span.0.min(t);
        span.1 = span.1.max(t);
        self.max_seq = self.max_seq.max(Some(write.seq));
    }

    /// An accepted write is in the log at `at`: into the index.
    fn append(&mut self, at: Position, id: u128, write: &StoredDelivery, key: Option<&(String, KeyRecord)>) {
        self.saw_write(at, write);
        self.index.append(id, write, Body::Disk(at), key.map(|(k, r)| (k.as_str(), r)));
    }

    /// Applies one record, at `at`, during replay.
    fn replay(&mut self, segments: &Segments, codec: &Codec, at: Position, record: Record) -> Result<(), LogError> {
        match record {
            Record::Append { id, write, key } => self.append(at, id, &write, key.as_ref()),
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
                self.index.startup(&pool, at_ms, true);
            }
            Record::Recover { backend, writes } => {
                let mut found = Vec::with_capacity(writes.len());
                for (_, pos) in writes {
                    match read_write(segments, codec, pos) {
                        Ok((id, write)) => found.push((id, write, Body::Disk(pos))),
                        // Its segment was dropped, which retention only does once no write in it is held: this
                        // one was delivered after the recovery, and there is nothing left to do for it.
                        Err(LogError::Segment(e)) if matches!(*e, SegmentError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                self.index.recover(&backend, found);
            }
            Record::Checkpoint { keys, max_seq, dropped_upto_ms } => {
                self.index.restore_keys(keys);
                self.max_seq = self.max_seq.max(max_seq);
                self.dropped_upto_ms = self.dropped_upto_ms.max(dropped_upto_ms);
            }
            Record::Probe { .. } => {}
            // The codec opened it: what it decoded to is never sealed again.
            Record::Sealed { .. } => return Err(LogError::Corrupt("a sealed record inside a sealed record".into())),
        }
        Ok(())
    }
}

/// A recovery's pin on the segments it reads (see `DiskLog::retain`), released when dropped.
struct Pinned {
    state: Arc<Mutex<State>>,
    segment: u64,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if let Some(i) = state.recovering_from.iter().position(|p| *p == self.segment) {
            state.recovering_from.swap_remove(i);
        }
    }
}

/// The durable write log in a directory. Share it behind an `Arc`.
pub struct DiskLog {
    segments: Segments,
    codec: Codec,
    state: Arc<Mutex<State>>,
    limits: HistoryLimits,
    /// A retention pass is running (one at a time).
    retaining: Arc<AtomicBool>,
    /// Appends queued and not yet in the index, by ticket: the active segment when each was queued (its record
    /// is there or later). Retention keeps those segments: the index does not know yet that they hold a write.
    appending: Arc<Mutex<BTreeMap<u64, u64>>>,
    next_ticket: Arc<std::sync::atomic::AtomicU64>,
}

impl DiskLog {
    /// Opens (or creates) the log in `dir` and replays it. With `keys` (`--encryption-key-file`), the records
    /// that carry what clients sent are written encrypted from now on; either way records written in clear are
    /// read. Logs what the history holds at rest (writes in clear, records per key id) when it holds anything.
    ///
    /// # Errors
    /// When the directory cannot be created or read, a sealed segment is damaged ([`LogError::Segment`]), a
    /// record does not decode, or an encrypted one does not open ([`LogError::Sealed`]: its key is missing).
    pub fn open(dir: &Path, limits: HistoryLimits, keys: Option<Arc<Keyring>>) -> Result<Self, LogError> {
        let codec = Codec::new(keys);
        warn_if_open(dir.parent());
        let segment_bytes = (limits.max_bytes / 8).clamp(64 * 1024, SEGMENT_BYTES);
        let segments = Segments::open(SegmentsConfig { dir: dir.to_owned(), segment_bytes })?;
        let mut state = State {
            index: Index::default(),
            times: BTreeMap::new(),
            max_seq: None,
            dropped_upto_ms: None,
            recovering_from: Vec::new(),
        };
        let mut clear_writes = 0_u64;
        let mut per_key: BTreeMap<KeyId, u64> = BTreeMap::new();
        for item in segments.replay() {
            let (at, bytes) = item?;
            let (record, key) = codec.decode_keyed(&bytes)?;
            match key {
                Some(key) => *per_key.entry(key).or_default() += 1,
                None => clear_writes += u64::from(matches!(record, Record::Append { .. })),
            }
            state.replay(&segments, &codec, at, record)?;
        }
        if clear_writes > 0 || !per_key.is_empty() {
            // What rotating a key, or turning encryption on, waits for: the counts to reach 0.
            let encrypted = per_key.iter().map(|(k, n)| format!("{k}:{n}")).collect::<Vec<_>>().join(",");
            tracing::info!(clear_writes, encrypted = %encrypted, "write log: records at rest");
        }
        Ok(Self {
            segments,
            codec,
            state: Arc::new(Mutex::new(state)),
            limits,
            retaining: Arc::new(AtomicBool::new(false)),
            appending: Arc::default(),
            next_ticket: Arc::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Queues `record` lazily. Call it under the state lock, right after the index change it records, so that
    /// the file keeps the order of the changes. When the writer is far behind (the disk is slow), the record is
    /// queued as an awaited append instead, and the returned future waits for it: back-pressure, not a hole.
    fn lazy(segments: &Segments, codec: &Codec, record: &Record) -> BoxFuture<'static, ()> {
        let bytes = match codec.encode(record) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::error!(%error, "write log: a record does not encode; after a restart it may be repeated");
                return Box::pin(ready(()));
            }
        };
        match segments.append_lazy(bytes.clone()) {
            Ok(()) => Box::pin(ready(())),
            Err(SegmentError::Backlog) => {
                let append = segments.append(bytes, SyncMode::Lazy);
                Box::pin(async move {
                    if let Err(error) = append.await {
                        tracing::warn!(%error, "write log: a settlement was not written; it may be repeated");
                    }
                })
            }
            Err(error) => {
                tracing::warn!(%error, "write log: a settlement was not recorded; after a restart it may be repeated");
                Box::pin(ready(()))
            }
        }
    }

    /// Queues `records` durably (under the state lock, like [`DiskLog::lazy`]); the future resolves once they
    /// are on disk.
    fn durable(segments: &Segments, codec: &Codec, records: &[Record]) -> BoxFuture<'static, Result<(), LogError>> {
        let encoded: Result<Vec<Vec<u8>>, LogError> = records.iter().map(|r| codec.encode(r)).collect();
        let append = match encoded {
            Ok(bytes) => segments.append_many(bytes, SyncMode::Now),
            Err(e) => return Box::pin(ready(Err(e))),
        };
        Box::pin(async move {
            append.await?;
            Ok(())
        })
    }

    /// Deletes the oldest segments the history no longer needs (see the module doc).
    fn retain(&self) {
        if self.retaining.swap(true, Ordering::AcqRel) {
            return;
        }
        let infos = self.segments.segments();
        let now = now_ms();
        let planned = {
            let state = self.state();
            let held = state.index.held_positions().map(|p| p.segment).min().unwrap_or(u64::MAX);
            let appending = lock(&self.appending).values().copied().min().unwrap_or(u64::MAX);
            let pinned = state.recovering_from.iter().copied().min().unwrap_or(u64::MAX).min(held).min(appending);
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
            // Only when some write leaves the history: segments of other records alone (an earlier checkpoint)
            // go with the next such cut, else each checkpoint would make the next one due.
            let cut = cut.filter(|cut| state.times.range(..cut).next().is_some());
            cut.map(|cut| {
                // What the dropped records still meant goes first, queued now (after every change so far).
                let dropped = state.times.range(..cut).map(|(_, t)| t.1).max();
                let keys = state.index.keys_snapshot();
                let mut records = vec![Record::Checkpoint {
                    keys: Vec::new(),
                    max_seq: state.max_seq,
                    dropped_upto_ms: state.dropped_upto_ms.max(dropped),
                }];
                for chunk in keys.chunks(KEYS_PER_RECORD) {
                    records.push(Record::Checkpoint { keys: chunk.to_vec(), max_seq: None, dropped_upto_ms: None });
                }
                (cut, Self::durable(&self.segments, &self.codec, &records))
            })
        };
        let Some((cut, checkpoint)) = planned else {
            self.retaining.store(false, Ordering::Release);
            return;
        };
        let segments = self.segments.clone();
        let state = self.state.clone();
        let retaining = self.retaining.clone();
        tokio::spawn(async move {
            let removed = match checkpoint.await {
                Ok(()) => tokio::task::spawn_blocking(move || segments.remove_before(cut))
                    .await
                    .map_err(|e| LogError::Task(Arc::new(e)))
                    .and_then(|r| Ok(r?)),
                Err(e) => Err(e),
            };
            match removed {
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
        let record = self.codec.encode(&Record::Startup { pool: pool.clone(), at_ms });
        let append = record.map(|bytes| self.segments.append(bytes, SyncMode::Now));
        let state = self.state.clone();
        Box::pin(async move {
            append?.await?;
            let mut state = lock(&state);
            let mut startup = state.index.startup(&pool, at_ms, false);
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
        let bytes = match self.codec.encode(&record) {
            Ok(bytes) => bytes,
            Err(e) => return Box::pin(ready(Err(e))),
        };
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        lock(&self.appending).insert(ticket, self.segments.active_id());
        let append = self.segments.append(bytes, SyncMode::Now);
        let state = self.state.clone();
        let appending = self.appending.clone();
        Box::pin(async move {
            let result = append.await;
            if let Ok(at) = &result {
                let Record::Append { id, write, key } = record else { unreachable!("built above") };
                lock(&state).append(*at, id, &write, key.as_ref());
            }
            lock(&appending).remove(&ticket);
            result.map(|_| ()).map_err(LogError::from)
        })
    }

    fn settle(&self, backend: &Arc<str>, seq: u64, settlement: Settlement) -> BoxFuture<'static, ()> {
        let mut state = self.state();
        state.index.settle(backend, seq, settlement.clone());
        Self::lazy(&self.segments, &self.codec, &Record::Settle { backend: backend.to_string(), seq, settlement })
    }

    fn drop_refused(&self, id: u128) -> BoxFuture<'static, Vec<String>> {
        let mut state = self.state();
        let dropped = state.index.drop_refused(id);
        if dropped.is_empty() {
            return Box::pin(ready(dropped));
        }
        let written = Self::lazy(&self.segments, &self.codec, &Record::DropRefused { id });
        drop(state);
        Box::pin(async move {
            written.await;
            dropped
        })
    }

    fn pending(
        &self,
        backend: &Arc<str>,
        skip: HashSet<u64>,
        limit: usize,
        below: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<Loaded>, LogError>> {
        let rows = self.state().index.pending(backend, &skip, limit, below);
        let segments = self.segments.clone();
        let codec = self.codec.clone();
        Box::pin(async move {
            let read = tokio::task::spawn_blocking(move || {
                rows.into_iter()
                    .map(|(seq, row, body)| {
                        let delivery = match body {
                            Body::Disk(at) => read_write(&segments, &codec, at)?.1,
                            Body::Memory(write) => (*write).clone(),
                        };
                        Ok(Loaded { seq, row, delivery })
                    })
                    .collect::<Result<Vec<_>, LogError>>()
            });
            read.await.map_err(|e| LogError::Task(Arc::new(e)))?
        })
    }

    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> BoxFuture<'static, Result<Vec<DeadLetter>, LogError>> {
        Box::pin(ready(Ok(self.state().index.dead_letters(&filter, limit))))
    }

    fn dead_letter_count(&self, filter: DeadFilter) -> BoxFuture<'static, Result<u64, LogError>> {
        Box::pin(ready(Ok(self.state().index.dead_count(&filter))))
    }

    fn redrive(
        &self,
        filter: DeadFilter,
        pool: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        let mut state = self.state();
        let rows = state.index.redrivable(&filter, &pool);
        let moved = state.index.redrive(&rows);
        let records: Vec<Record> =
            moved.chunks(ROWS_PER_RECORD).map(|c| Record::Redrive { rows: c.to_vec() }).collect();
        let written = Self::durable(&self.segments, &self.codec, &records);
        drop(state);
        Box::pin(async move {
            written.await?;
            Ok(moved)
        })
    }

    fn discard(&self, filter: DeadFilter) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        let mut state = self.state();
        let rows = state.index.discardable(&filter);
        let gone = state.index.discard(&rows);
        let records: Vec<Record> = gone.chunks(ROWS_PER_RECORD).map(|c| Record::Discard { rows: c.to_vec() }).collect();
        let written = Self::durable(&self.segments, &self.codec, &records);
        drop(state);
        Box::pin(async move {
            written.await?;
            Ok(gone)
        })
    }

    fn view(&self, id: u128) -> BoxFuture<'static, Result<Option<DeliveryView>, LogError>> {
        Box::pin(ready(Ok(self.state().index.view(id))))
    }

    fn answer(&self, key: &str, record: &KeyRecord) {
        let mut state = self.state();
        state.index.answer(key, record.clone());
        // Advisory, like the trait says: a slow disk's back-pressure is not waited for here.
        drop(Self::lazy(&self.segments, &self.codec, &Record::Answer { key: key.to_owned(), record: record.clone() }));
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
            state.index.prune_keys(window_ms, now_ms());
        }
        // The lazy records of a quiet second become durable now rather than with the next write. While the log
        // is unhealthy, a probe record instead: only a durable write of some size proves it works again (and
        // makes `/readyz` say ready), with or without clients writing.
        if self.segments.healthy() {
            let flush = self.segments.flush();
            tokio::spawn(async move {
                if let Err(error) = flush.await {
                    tracing::warn!(%error, "write log: the periodic flush failed");
                }
            });
        } else if let Ok(probe) = postcard::to_allocvec(&Record::Probe { padding: vec![0; PROBE_BYTES] }) {
            // Its failure is the writer's to log (at most once a second).
            drop(self.segments.append(probe, SyncMode::Now));
        }
        self.retain();
    }

    fn history(&self) -> HistoryStats {
        let state = self.state();
        HistoryStats { bytes: self.segments.bytes(), oldest_ms: state.times.values().map(|t| t.0).min() }
    }

    fn recover(&self, backend: &Arc<str>, since_ms: u64) -> BoxFuture<'static, Result<Recovered, LogError>> {
        let segments = self.segments.clone();
        let codec = self.codec.clone();
        let state = self.state.clone();
        let backend = backend.clone();
        let oldest_ms = self.history().oldest_ms;
        // Retention keeps what the scan reads until the writes it finds are held again.
        let pin = segments.segments().first().map_or(u64::MAX, |s| s.id);
        self.state().recovering_from.push(pin);
        // Unpinned however this ends: done, failed, or dropped unfinished (a worker stopping at shutdown).
        let pinned = Pinned { state: state.clone(), segment: pin };
        let flushed = self.segments.flush();
        Box::pin(async move {
            let _pinned = pinned;
            // The lazy records so far (writes refused everywhere among them) are in the files before the scan.
            if let Err(e) = flushed.await {
                return Err(e.into());
            }
            // Every write the history holds since `since_ms`, without its body (read back when sent).
            let scan = {
                let segments = segments.clone();
                let codec = codec.clone();
                tokio::task::spawn_blocking(move || {
                    let mut found = Vec::new();
                    let mut refused = HashSet::new();
                    for item in segments.replay() {
                        let (at, bytes) = item?;
                        match codec.decode(&bytes)? {
                            Record::Append { id, mut write, .. } if write.accepted_at_ms >= since_ms => {
                                write.body = Vec::new();
                                write.headers = Vec::new();
                                found.push((id, write, at));
                            }
                            Record::DropRefused { id } => {
                                refused.insert(id);
                            }
                            _ => {}
                        }
                    }
                    // A write every backend refused was applied nowhere: there is nothing to bring back.
                    found.retain(|(id, _, _)| !refused.contains(id));
                    Ok::<_, LogError>(found)
                })
            };
            let found = match scan.await.map_err(|e| LogError::Task(Arc::new(e))).and_then(|r| r) {
                Ok(found) => found,
                Err(e) => return Err(e),
            };
            let mut found = found;
            found.sort_by_key(|(_, w, _)| w.seq);
            let (report, written) = {
                let mut state = lock(&state);
                let writes: Vec<(u128, Position)> = found.iter().map(|(id, _, at)| (*id, *at)).collect();
                let found = found.into_iter().map(|(id, w, at)| (id, w, Body::Disk(at))).collect();
                let dropped_upto_ms = state.dropped_upto_ms;
                let report = state.index.recover_report(&backend, found, oldest_ms, dropped_upto_ms);
                let records: Vec<Record> = writes
                    .chunks(ROWS_PER_RECORD)
                    .map(|c| Record::Recover { backend: backend.to_string(), writes: c.to_vec() })
                    .collect();
                let written = Self::durable(&segments, &codec, &records);
                // The writes found are held now, and pin their own segments.
                drop(state);
                drop(_pinned);
                (report, written)
            };
            written.await?;
            Ok(report)
        })
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let segments = self.segments.clone();
        let retaining = self.retaining.clone();
        Box::pin(async move {
            // A retention pass on its way finishes first (it deletes files: never under a later opener).
            while retaining.swap(true, Ordering::AcqRel) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let _ = tokio::task::spawn_blocking(move || segments.close()).await;
        })
    }
}
