//! The write log in memory, for `--no-outbox`: the same rules as the durable log (see the module doc of
//! [`super`]), kept in plain maps under one lock, with no thread, no encoding and no copy-on-write pages.
//! Nothing survives the process: that is what `--no-outbox` asks for, and why it pays for no store work.
//!
//! Every call does its work at once under the lock (a few map operations) and returns a future that is already
//! resolved, so a write costs no hand-off to another thread. The maps mirror what a durable log keeps:
//! - the unfinished deliveries, each with how many backends still hold it (queue entries plus dead letters);
//! - each backend's queue, by acceptance order;
//! - the dead letters, by (backend, acceptance order);
//! - the outcomes of finished backends, by delivery id (UUIDv7, so oldest first), the newest ones kept;
//! - the client idempotency records.
//!
//! Memory is bounded by the dispatcher: without an outbox, deliveries not finished everywhere are at most
//! `--max-in-flight`, and the finished outcomes kept are trimmed to `--delivery-history` deliveries' worth.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::{BoxFuture, ready};

use super::{
    BackendCounts, BackendState, BackendView, DeadFilter, DeadLetter, DeadRow, DeliveredRow, DeliveryView, Loaded,
    LogError, QueueRow, Settlement, Startup, StoredDelivery, WriteLog, backend_url, delivered_view, id_time_ms, now_ms,
    rfc3339_ms,
};
use crate::replay::KeyRecord;

/// An unfinished delivery and how many backends still hold it.
struct Held {
    write: Arc<StoredDelivery>,
    refs: u32,
}

#[derive(Default)]
struct State {
    deliveries: HashMap<u128, Held>,
    queues: HashMap<Arc<str>, BTreeMap<u64, QueueRow>>,
    dead: BTreeMap<(Arc<str>, u64), DeadRow>,
    finished: BTreeMap<u128, Vec<(Arc<str>, DeliveredRow)>>,
    finished_rows: u64,
    keys: HashMap<String, KeyRecord>,
    /// Interned backend labels, so that rows share one allocation per backend.
    labels: HashMap<String, Arc<str>>,
    closed: bool,
}

/// The write log in memory. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct MemoryLog {
    state: Mutex<State>,
    unfinished: AtomicU64,
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn label(&mut self, label: &str) -> Arc<str> {
        if let Some(l) = self.labels.get(label) {
            return l.clone();
        }
        let l: Arc<str> = Arc::from(label);
        self.labels.insert(label.to_owned(), l.clone());
        l
    }

    /// One backend let go of delivery `id`; returns true when no backend holds it any more (it is removed).
    fn release(&mut self, id: u128) -> bool {
        let Some(held) = self.deliveries.get_mut(&id) else { return false };
        held.refs = held.refs.saturating_sub(1);
        if held.refs == 0 {
            self.deliveries.remove(&id);
            return true;
        }
        false
    }

    fn finish(&mut self, id: u128, backend: Arc<str>, row: DeliveredRow) {
        self.finished.entry(id).or_default().push((backend, row));
        self.finished_rows += 1;
    }

    fn matching_dead(&self, filter: &DeadFilter) -> Vec<(Arc<str>, u64)> {
        self.dead
            .iter()
            .filter(|((b, _), row)| {
                filter.backend.as_deref().is_none_or(|f| f == &**b) && filter.id.is_none_or(|id| id == row.id)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn startup(&mut self, pool: &[String]) -> Startup {
        let mut out = Startup::default();
        for b in pool {
            out.backends.insert(b.clone(), BackendCounts::default());
        }
        // A backend of the pool written another way is the same backend: its rows follow the new spelling.
        let stored: HashSet<Arc<str>> =
            self.queues.keys().cloned().chain(self.dead.keys().map(|(b, _)| b.clone())).collect();
        let pool_urls: Vec<(Option<String>, &String)> = pool.iter().map(|b| (backend_url(b), b)).collect();
        let mut renamed: HashMap<String, String> = HashMap::new();
        for from in stored.iter().filter(|l| !out.backends.contains_key(&***l)) {
            let url = backend_url(from);
            let Some((_, to)) = pool_urls.iter().find(|(u, _)| u.is_some() && *u == url) else { continue };
            let to_label = self.label(to);
            let queue = self.queues.remove(from).unwrap_or_default();
            let mut n = queue.len();
            self.queues.entry(to_label.clone()).or_default().extend(queue);
            let dead: Vec<_> = self.dead.keys().filter(|(b, _)| b == from).cloned().collect();
            n += dead.len();
            for key in dead {
                if let Some(row) = self.dead.remove(&key) {
                    self.dead.insert((to_label.clone(), key.1), row);
                }
            }
            tracing::info!(from = %from, to = %to, rows = n, "the same backend, written another way: its queue follows");
            renamed.insert(from.to_string(), (*to).clone());
        }
        if !renamed.is_empty() {
            for held in self.deliveries.values_mut() {
                if held.write.backends.iter().any(|b| renamed.contains_key(b)) {
                    let mut w = (*held.write).clone();
                    for b in &mut w.backends {
                        if let Some(to) = renamed.get(b.as_str()) {
                            b.clone_from(to);
                        }
                    }
                    held.write = Arc::new(w);
                }
            }
        }
        let mut orphans = Vec::new();
        for (b, queue) in &self.queues {
            out.max_seq = out.max_seq.max(queue.keys().next_back().copied());
            match out.backends.get_mut(&**b) {
                Some(counts) => counts.pending += queue.len() as u64,
                None => orphans.push(b.clone()),
            }
        }
        for (b, seq) in self.dead.keys() {
            out.max_seq = out.max_seq.max(Some(*seq));
            if let Some(counts) = out.backends.get_mut(&**b) {
                counts.dead += 1;
            }
        }
        for b in orphans {
            let queue = self.queues.remove(&b).unwrap_or_default();
            let writes = queue.len();
            for (seq, row) in queue {
                let dead = DeadRow {
                    id: row.id,
                    attempts: row.attempts,
                    reason: "backend_removed".to_owned(),
                    last_status: row.last_status,
                    last_outcome: row.last_outcome,
                    at_ms: now_ms(),
                };
                self.dead.insert((b.clone(), seq), dead);
                out.orphaned += 1;
            }
            tracing::error!(
                backend = %b,
                writes,
                "dead letters: this backend is no longer in --backends and will not get these writes; \
                 GET /dead-letters?backend=... lists them, DELETE drops them"
            );
        }
        out
    }

    fn view(&self, id: u128) -> Option<DeliveryView> {
        let finished = self.finished.get(&id);
        let Some(held) = self.deliveries.get(&id) else {
            // Finished on every backend: what is left is the outcomes, while they are kept.
            let rows = finished?;
            let mut backends: Vec<_> = rows.iter().map(|(b, row)| (row.position, delivered_view(b, *row))).collect();
            backends.sort_by_key(|(position, _)| *position);
            return Some(DeliveryView {
                accepted_at_ms: id_time_ms(id),
                backends: backends.into_iter().map(|(_, v)| v).collect(),
            });
        };
        let w = &held.write;
        let backends = w
            .backends
            .iter()
            .map(|b| {
                let queued = self.queues.get(b.as_str()).and_then(|q| q.get(&w.seq));
                let dead =
                    self.dead.get(&(self.labels.get(b).cloned().unwrap_or_else(|| Arc::from(b.as_str())), w.seq));
                let done = finished.and_then(|rows| rows.iter().find(|(l, _)| &**l == b.as_str()));
                if let Some(row) = queued {
                    BackendView {
                        backend: b.clone(),
                        state: BackendState::Pending,
                        attempts: row.attempts,
                        status: row.last_status,
                        outcome: row.last_outcome.clone(),
                        reason: None,
                        next_attempt_at: (row.due_ms > now_ms()).then(|| rfc3339_ms(row.due_ms)),
                    }
                } else if let Some(row) = dead {
                    BackendView {
                        backend: b.clone(),
                        state: BackendState::DeadLetter,
                        attempts: row.attempts,
                        status: row.last_status,
                        outcome: row.last_outcome.clone(),
                        reason: Some(row.reason.clone()),
                        next_attempt_at: None,
                    }
                } else if let Some((_, row)) = done {
                    delivered_view(b, *row)
                } else {
                    // Neither queued nor a dead letter: delivered, its outcome already trimmed.
                    BackendView {
                        backend: b.clone(),
                        state: BackendState::Delivered,
                        attempts: 0,
                        status: None,
                        outcome: None,
                        reason: None,
                        next_attempt_at: None,
                    }
                }
            })
            .collect();
        Some(DeliveryView { accepted_at_ms: w.accepted_at_ms, backends })
    }

    /// See [`WriteLog::drop_refused`].
    fn drop_refused(&mut self, id: u128) -> Vec<String> {
        let Some(held) = self.deliveries.get(&id) else { return Vec::new() };
        let w = held.write.clone();
        let mut refused = Vec::new();
        for b in &w.backends {
            let label = self.label(b);
            let Some(row) = self.dead.get(&(label.clone(), w.seq)) else { return Vec::new() };
            if row.reason != "rejected" {
                return Vec::new();
            }
            refused.push((label, row.clone()));
        }
        for (position, (b, row)) in refused.iter().enumerate() {
            self.dead.remove(&(b.clone(), w.seq));
            let status = row.last_status.filter(|s| !(200..300).contains(s)).unwrap_or(400);
            let position = u16::try_from(position).unwrap_or(u16::MAX);
            self.finish(id, b.clone(), DeliveredRow { attempts: row.attempts, status, position });
        }
        self.deliveries.remove(&id);
        refused.into_iter().map(|(b, _)| b.to_string()).collect()
    }
}

impl WriteLog for MemoryLog {
    fn durable(&self) -> bool {
        false
    }

    fn healthy(&self) -> bool {
        true
    }

    fn unfinished(&self) -> u64 {
        self.unfinished.load(Ordering::Relaxed)
    }

    fn startup(&self, pool: Vec<String>) -> BoxFuture<'static, Result<Startup, LogError>> {
        let startup = self.state().startup(&pool);
        Box::pin(ready(Ok(startup)))
    }

    fn append(
        &self,
        id: u128,
        write: &StoredDelivery,
        key: Option<(&str, &KeyRecord)>,
    ) -> BoxFuture<'static, Result<(), LogError>> {
        let mut state = self.state();
        if state.closed {
            return Box::pin(ready(Err(LogError::Closed)));
        }
        for b in &write.backends {
            let label = state.label(b);
            state.queues.entry(label).or_default().insert(write.seq, QueueRow { id, ..QueueRow::default() });
        }
        let refs = u32::try_from(write.backends.len()).unwrap_or(u32::MAX);
        state.deliveries.insert(id, Held { write: Arc::new(write.clone()), refs });
        if let Some((k, r)) = key {
            state.keys.insert(k.to_owned(), r.clone());
        }
        self.unfinished.fetch_add(1, Ordering::Relaxed);
        Box::pin(ready(Ok(())))
    }

    fn settle(&self, backend: &Arc<str>, seq: u64, settlement: Settlement) -> BoxFuture<'static, ()> {
        let mut state = self.state();
        let label = state.label(backend);
        let queue = state.queues.get_mut(&label);
        match settlement {
            Settlement::DueAgain(row) => {
                // Only while still queued: a late record must not revive a finished entry.
                if let Some(entry) = queue.and_then(|q| q.get_mut(&seq)) {
                    *entry = row;
                }
            }
            Settlement::Delivered { id, row } => {
                if queue.and_then(|q| q.remove(&seq)).is_some() {
                    state.finish(id, label, row);
                    if state.release(id) {
                        self.unfinished.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
            Settlement::Dead(row) => {
                if queue.and_then(|q| q.remove(&seq)).is_some() {
                    state.dead.insert((label, seq), row);
                }
            }
        }
        Box::pin(ready(()))
    }

    fn drop_refused(&self, id: u128) -> BoxFuture<'static, Vec<String>> {
        let dropped = self.state().drop_refused(id);
        if !dropped.is_empty() {
            self.unfinished.fetch_sub(1, Ordering::Relaxed);
        }
        Box::pin(ready(dropped))
    }

    fn pending(
        &self,
        backend: &Arc<str>,
        skip: HashSet<u64>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<Loaded>, LogError>> {
        let state = self.state();
        let mut out = Vec::new();
        if let Some(queue) = state.queues.get(backend) {
            for (seq, row) in queue.iter().filter(|(seq, _)| !skip.contains(seq)).take(limit) {
                let Some(held) = state.deliveries.get(&row.id) else { continue };
                out.push(Loaded { seq: *seq, row: row.clone(), delivery: (*held.write).clone() });
            }
        }
        Box::pin(ready(Ok(out)))
    }

    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> BoxFuture<'static, Result<Vec<DeadLetter>, LogError>> {
        let state = self.state();
        let list = state
            .matching_dead(&filter)
            .into_iter()
            .take(limit)
            .filter_map(|key| {
                let row = state.dead.get(&key)?;
                let path = state.deliveries.get(&row.id).map_or_else(String::new, |h| {
                    h.write.path_and_query.split('?').next().unwrap_or_default().to_owned()
                });
                Some(DeadLetter {
                    delivery_id: uuid::Uuid::from_u128(row.id),
                    backend: key.0.to_string(),
                    seq: key.1,
                    path,
                    attempts: row.attempts,
                    reason: row.reason.clone(),
                    last_status: row.last_status,
                    dead_at: rfc3339_ms(row.at_ms),
                })
            })
            .collect();
        Box::pin(ready(Ok(list)))
    }

    fn redrive(
        &self,
        filter: DeadFilter,
        pool: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        let mut state = self.state();
        let mut moved = Vec::new();
        for (b, seq) in state.matching_dead(&filter) {
            if !pool.iter().any(|p| p.as_str() == &*b) {
                continue;
            }
            if let Some(row) = state.dead.remove(&(b.clone(), seq)) {
                state.queues.entry(b.clone()).or_default().insert(seq, QueueRow { id: row.id, ..QueueRow::default() });
                moved.push((b.to_string(), seq));
            }
        }
        Box::pin(ready(Ok(moved)))
    }

    fn discard(&self, filter: DeadFilter) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        let mut state = self.state();
        let mut gone = Vec::new();
        for (b, seq) in state.matching_dead(&filter) {
            let Some(row) = state.dead.remove(&(b.clone(), seq)) else { continue };
            // Kept like a delivery's outcome; status 0 marks it deleted.
            state.finish(row.id, b.clone(), DeliveredRow { attempts: row.attempts, status: 0, position: u16::MAX });
            if state.release(row.id) {
                self.unfinished.fetch_sub(1, Ordering::Relaxed);
            }
            gone.push((b.to_string(), seq));
        }
        Box::pin(ready(Ok(gone)))
    }

    fn view(&self, id: u128) -> BoxFuture<'static, Result<Option<DeliveryView>, LogError>> {
        Box::pin(ready(Ok(self.state().view(id))))
    }

    fn answer(&self, key: &str, record: &KeyRecord) {
        if let Some(r) = self.state().keys.get_mut(key) {
            *r = record.clone();
        }
    }

    fn idempotency_keys(
        &self,
        window_ms: u64,
        now: u64,
    ) -> BoxFuture<'static, Result<Vec<(String, KeyRecord)>, LogError>> {
        let mut state = self.state();
        state.keys.retain(|_, r| now.saturating_sub(r.at_ms) <= window_ms);
        let mut keep: Vec<_> = state.keys.iter().map(|(k, r)| (k.clone(), r.clone())).collect();
        keep.sort_by_key(|(_, r)| r.at_ms);
        Box::pin(ready(Ok(keep)))
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), LogError>> {
        Box::pin(ready(Ok(())))
    }

    fn tick(&self, window_ms: u64, keep_delivered: u64) {
        let mut state = self.state();
        // Delivery ids are UUIDv7, ordered by time: the oldest outcomes come first.
        while state.finished_rows > keep_delivered {
            let Some((_, rows)) = state.finished.pop_first() else { break };
            state.finished_rows = state.finished_rows.saturating_sub(rows.len() as u64);
        }
        let now = now_ms();
        state.keys.retain(|_, r| now.saturating_sub(r.at_ms) <= window_ms);
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        self.state().closed = true;
        Box::pin(ready(()))
    }
}
