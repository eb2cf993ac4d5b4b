//! The write log's state in memory: which deliveries are unfinished, each backend's queue, the dead letters, the
//! outcomes of finished backends, the client idempotency records. Both write logs keep it: [`super::memory`]
//! alone, [`super::disk`] as the index of its segment files (rebuilt at start by replaying them through the same
//! functions, so that what a restart finds is what was there before it).
//!
//! Every mutation is a plain function of the state and its arguments (the disk log records the arguments, not
//! the result), so replaying the same records gives the same state. Nothing here does I/O or waits.
//!
//! A write's body lives either here ([`Body::Memory`]) or in a segment file ([`Body::Disk`]); what the index
//! needs to answer without it (acceptance order and time, the pool it was accepted for, its route) is kept in
//! [`Held`], with the backend labels and routes interned, so a pending write costs about a hundred bytes here
//! plus its queue entry per backend.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::segments::Position;
use super::{
    BackendCounts, BackendState, BackendView, DeadFilter, DeadLetter, DeadRow, DeliveredRow, DeliveryView, QueueRow,
    Settlement, Startup, StoredDelivery, backend_url, delivered_view, id_time_ms, now_ms, rfc3339_ms,
};
use crate::replay::KeyRecord;

/// Where a write's body is.
#[derive(Debug, Clone)]
pub enum Body {
    /// In memory (the in-memory log).
    Memory(Arc<StoredDelivery>),
    /// The append record at this position of the segment files (the disk log).
    Disk(Position),
}

/// An unfinished delivery: what the index keeps of it, and how many backends still hold it (queue entries plus
/// dead letters).
#[derive(Debug, Clone)]
pub struct Held {
    /// Acceptance order.
    pub seq: u64,
    /// When it was accepted, ms since the epoch.
    pub accepted_at_ms: u64,
    /// The pool it was accepted for (labels), in pool order.
    pub backends: Arc<[Arc<str>]>,
    /// Its route, without the query string (for the dead-letter list).
    pub path: Arc<str>,
    /// Its body.
    pub body: Body,
    /// Backends still holding it.
    pub refs: u32,
    /// Held again only for a recovery (it had finished everywhere): not counted by [`Index::unfinished`].
    pub recovered: bool,
}

/// The state; see the module doc.
#[derive(Default)]
pub struct Index {
    deliveries: HashMap<u128, Held>,
    queues: HashMap<Arc<str>, BTreeMap<u64, QueueRow>>,
    dead: BTreeMap<(Arc<str>, u64), DeadRow>,
    finished: BTreeMap<u128, Vec<(Arc<str>, DeliveredRow)>>,
    finished_rows: u64,
    keys: HashMap<String, KeyRecord>,
    labels: HashMap<String, Arc<str>>,
    /// The pools writes were accepted for (one per start-up with a different `--backends`, a handful).
    pools: Vec<Arc<[Arc<str>]>>,
    paths: HashSet<Arc<str>>,
    /// Deliveries held again only for a recovery.
    recovered: u64,
}

impl Index {
    /// Deliveries not finished on every backend, not counting those held again only for a recovery (a
    /// recovery's backlog must not hold back new writes at `--max-pending`; its progress has its own gauge).
    pub fn unfinished(&self) -> u64 {
        self.deliveries.len() as u64 - self.recovered
    }

    /// Removes delivery `id`, keeping the count of recovery-only ones.
    fn remove(&mut self, id: u128) {
        if self.deliveries.remove(&id).is_some_and(|h| h.recovered) {
            self.recovered -= 1;
        }
    }

    fn label(&mut self, label: &str) -> Arc<str> {
        if let Some(l) = self.labels.get(label) {
            return l.clone();
        }
        let l: Arc<str> = Arc::from(label);
        self.labels.insert(label.to_owned(), l.clone());
        l
    }

    fn pool(&mut self, backends: &[String]) -> Arc<[Arc<str>]> {
        // Almost always the one pool of this run: found without building a key.
        let same = |p: &Arc<[Arc<str>]>| p.len() == backends.len() && p.iter().zip(backends).all(|(a, b)| **a == **b);
        if let Some(p) = self.pools.iter().find(|p| same(p)) {
            return p.clone();
        }
        let pool: Arc<[Arc<str>]> = backends.iter().map(|b| self.label(b)).collect();
        self.pools.push(pool.clone());
        pool
    }

    fn path(&mut self, path_and_query: &str) -> Arc<str> {
        let path = path_and_query.split('?').next().unwrap_or_default();
        if let Some(p) = self.paths.get(path) {
            return p.clone();
        }
        let p: Arc<str> = Arc::from(path);
        self.paths.insert(p.clone());
        p
    }

    /// A write accepted with one queue entry per backend of its pool, and its client's idempotency record.
    pub fn append(&mut self, id: u128, write: &StoredDelivery, body: Body, key: Option<(&str, &KeyRecord)>) {
        let backends = self.pool(&write.backends);
        for b in backends.iter() {
            self.queues.entry(b.clone()).or_default().insert(write.seq, QueueRow { id, ..QueueRow::default() });
        }
        let held = Held {
            seq: write.seq,
            accepted_at_ms: write.accepted_at_ms,
            refs: u32::try_from(backends.len()).unwrap_or(u32::MAX),
            backends,
            path: self.path(&write.path_and_query),
            body,
            recovered: false,
        };
        self.deliveries.insert(id, held);
        if let Some((k, r)) = key {
            self.keys.insert(k.to_owned(), r.clone());
        }
    }

    /// Backend `backend`'s entry `seq` settled; its delivery leaves the index when it was the last holder.
    pub fn settle(&mut self, backend: &str, seq: u64, settlement: Settlement) {
        let label = self.label(backend);
        let Some(queue) = self.queues.get_mut(&label) else { return };
        match settlement {
            Settlement::DueAgain(row) => {
                // Only while still queued: a late record must not revive a finished entry.
                if let Some(entry) = queue.get_mut(&seq) {
                    *entry = row;
                }
            }
            Settlement::Delivered { id, row } => {
                if queue.remove(&seq).is_some() {
                    self.finish(id, label, row);
                    self.release(id);
                }
            }
            Settlement::Dead(row) => {
                if queue.remove(&seq).is_some() {
                    self.dead.insert((label, seq), row);
                }
            }
        }
    }

    /// One backend let go of delivery `id`; with none left holding it, it leaves the index.
    fn release(&mut self, id: u128) {
        let Some(held) = self.deliveries.get_mut(&id) else { return };
        held.refs = held.refs.saturating_sub(1);
        if held.refs == 0 {
            self.remove(id);
        }
    }

    fn finish(&mut self, id: u128, backend: Arc<str>, row: DeliveredRow) {
        self.finished.entry(id).or_default().push((backend, row));
        self.finished_rows += 1;
    }

    /// Keeps the newest `keep` finished outcomes (delivery ids are UUIDv7: the oldest come first).
    pub fn trim(&mut self, keep: u64) {
        while self.finished_rows > keep {
            let Some((_, rows)) = self.finished.pop_first() else { break };
            self.finished_rows = self.finished_rows.saturating_sub(rows.len() as u64);
        }
    }

    /// The dead letters matching `filter`, in (backend, order) order.
    pub fn matching_dead(&self, filter: &DeadFilter) -> Vec<(Arc<str>, u64)> {
        self.dead.iter().filter(|(key, row)| dead_matches(filter, key, row)).map(|(k, _)| k.clone()).collect()
    }

    /// How many dead letters match `filter` (all of them, not a page).
    pub fn dead_count(&self, filter: &DeadFilter) -> u64 {
        self.dead.iter().filter(|(key, row)| dead_matches(filter, key, row)).count() as u64
    }

    /// Up to `limit` dead letters matching `filter`.
    pub fn dead_letters(&self, filter: &DeadFilter, limit: usize) -> Vec<DeadLetter> {
        self.matching_dead(filter)
            .into_iter()
            .take(limit)
            .filter_map(|key| {
                let row = self.dead.get(&key)?;
                let path = self.deliveries.get(&row.id).map_or_else(String::new, |h| h.path.to_string());
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
            .collect()
    }

    /// Moves the given dead letters back to their queues with fresh attempts; returns those moved. (The rows
    /// come from [`Index::redrivable`], so that the disk log can record exactly what moved.)
    pub fn redrive(&mut self, rows: &[(String, u64)]) -> Vec<(String, u64)> {
        let mut moved = Vec::new();
        for (b, seq) in rows {
            let label = self.label(b);
            if let Some(row) = self.dead.remove(&(label.clone(), *seq)) {
                self.queues.entry(label).or_default().insert(*seq, QueueRow { id: row.id, ..QueueRow::default() });
                moved.push((b.clone(), *seq));
            }
        }
        moved
    }

    /// The dead letters matching `filter` on backends of `pool`.
    pub fn redrivable(&self, filter: &DeadFilter, pool: &[String]) -> Vec<(String, u64)> {
        self.matching_dead(filter)
            .into_iter()
            .filter(|(b, _)| pool.iter().any(|p| p.as_str() == &**b))
            .map(|(b, seq)| (b.to_string(), seq))
            .collect()
    }

    /// The dead letters matching `filter`, as (backend, order).
    pub fn discardable(&self, filter: &DeadFilter) -> Vec<(String, u64)> {
        self.matching_dead(filter).into_iter().map(|(b, seq)| (b.to_string(), seq)).collect()
    }

    /// Deletes the given dead letters (their outcome stays, as discarded); returns those deleted.
    pub fn discard(&mut self, rows: &[(String, u64)]) -> Vec<(String, u64)> {
        let mut gone = Vec::new();
        for (b, seq) in rows {
            let label = self.label(b);
            let Some(row) = self.dead.remove(&(label.clone(), *seq)) else { continue };
            // Kept like a delivery's outcome; status 0 marks it deleted.
            // Its place in the delivery's pool, so that a finished delivery lists its backends in pool order.
            let position = self
                .deliveries
                .get(&row.id)
                .and_then(|h| h.backends.iter().position(|b| *b == label))
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(u16::MAX);
            self.finish(row.id, label, DeliveredRow { attempts: row.attempts, status: 0, position });
            self.release(row.id);
            gone.push((b.clone(), *seq));
        }
        gone
    }

    /// When every backend refused delivery `id`, drops its dead letters and keeps the refusals as its outcome;
    /// returns the backends (empty when it was not refused everywhere).
    pub fn drop_refused(&mut self, id: u128) -> Vec<String> {
        let Some(held) = self.deliveries.get(&id) else { return Vec::new() };
        let (seq, backends) = (held.seq, held.backends.clone());
        let mut refused = Vec::new();
        for b in backends.iter() {
            let Some(row) = self.dead.get(&(b.clone(), seq)) else { return Vec::new() };
            if row.reason != "rejected" {
                return Vec::new();
            }
            refused.push((b.clone(), row.clone()));
        }
        for (position, (b, row)) in refused.iter().enumerate() {
            self.dead.remove(&(b.clone(), seq));
            let status = row.last_status.filter(|s| !(200..300).contains(s)).unwrap_or(400);
            let position = u16::try_from(position).unwrap_or(u16::MAX);
            self.finish(id, b.clone(), DeliveredRow { attempts: row.attempts, status, position });
        }
        self.remove(id);
        refused.into_iter().map(|(b, _)| b.to_string()).collect()
    }

    /// Up to `limit` pending entries of `backend` not in `skip` and with an order below `below` (if given),
    /// oldest first, with their bodies.
    pub fn pending(
        &self,
        backend: &str,
        skip: &HashSet<u64>,
        limit: usize,
        below: Option<u64>,
    ) -> Vec<(u64, QueueRow, Body)> {
        let Some(queue) = self.queues.get(backend) else { return Vec::new() };
        queue
            .range(..below.unwrap_or(u64::MAX))
            .filter(|(seq, _)| !skip.contains(seq))
            .filter_map(|(seq, row)| Some((*seq, row.clone(), self.deliveries.get(&row.id)?.body.clone())))
            .take(limit)
            .collect()
    }

    /// Sets the answer of an idempotency record that exists.
    pub fn answer(&mut self, key: &str, record: KeyRecord) {
        if let Some(r) = self.keys.get_mut(key) {
            *r = record;
        }
    }

    /// Deletes the idempotency records older than `window_ms` at `now`, and the oldest past
    /// [`crate::replay::MAX_KEYS`] (the replay cache keeps no more, so a restart needs no more).
    pub fn prune_keys(&mut self, window_ms: u64, now: u64) {
        self.keys.retain(|_, r| now.saturating_sub(r.at_ms) <= window_ms);
        if self.keys.len() > crate::replay::MAX_KEYS {
            let mut by_age: Vec<(u64, String)> = self.keys.iter().map(|(k, r)| (r.at_ms, k.clone())).collect();
            by_age.sort_unstable();
            let gone = by_age.len() - crate::replay::MAX_KEYS;
            for (_, k) in by_age.into_iter().take(gone) {
                self.keys.remove(&k);
            }
        }
    }

    /// [`Index::prune_keys`], then the records left, oldest first.
    pub fn keys(&mut self, window_ms: u64, now: u64) -> Vec<(String, KeyRecord)> {
        self.prune_keys(window_ms, now);
        let mut keep: Vec<_> = self.keys.iter().map(|(k, r)| (k.clone(), r.clone())).collect();
        keep.sort_by_key(|(_, r)| r.at_ms);
        keep
    }

    /// Every idempotency record, as it is.
    pub fn keys_snapshot(&self) -> Vec<(String, KeyRecord)> {
        self.keys.iter().map(|(k, r)| (k.clone(), r.clone())).collect()
    }

    /// Puts every idempotency record of `keys` back (a snapshot the disk log wrote before dropping old segments).
    pub fn restore_keys(&mut self, keys: Vec<(String, KeyRecord)>) {
        self.keys.extend(keys);
    }

    /// A delivery as held, or its finished outcomes while they are kept.
    pub fn view(&self, id: u128) -> Option<DeliveryView> {
        let finished = self.finished.get(&id);
        let Some(held) = self.deliveries.get(&id) else {
            let rows = finished?;
            let mut backends: Vec<_> = rows.iter().map(|(b, row)| (row.position, delivered_view(b, *row))).collect();
            backends.sort_by_key(|(position, _)| *position);
            return Some(DeliveryView {
                accepted_at_ms: id_time_ms(id),
                backends: backends.into_iter().map(|(_, v)| v).collect(),
            });
        };
        let backends = held
            .backends
            .iter()
            .map(|b| {
                let queued = self.queues.get(b).and_then(|q| q.get(&held.seq));
                let dead = self.dead.get(&(b.clone(), held.seq));
                let done = finished.and_then(|rows| rows.iter().rev().find(|(l, _)| l == b));
                let backend = b.to_string();
                if let Some(row) = queued {
                    BackendView {
                        backend,
                        state: BackendState::Pending,
                        attempts: row.attempts,
                        status: row.last_status,
                        outcome: row.last_outcome.clone(),
                        reason: None,
                        next_attempt_at: (row.due_ms > now_ms()).then(|| rfc3339_ms(row.due_ms)),
                    }
                } else if let Some(row) = dead {
                    BackendView {
                        backend,
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
                        backend,
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
        Some(DeliveryView { accepted_at_ms: held.accepted_at_ms, backends })
    }

    /// At start: counts what each backend of `pool` holds; rows of a backend written another way follow its new
    /// spelling; queue entries of backends no longer in the pool become dead letters (`backend_removed`).
    /// `now` stamps those dead letters. `quiet` (a replay of an earlier start) logs none of it again.
    pub fn startup(&mut self, pool: &[String], now: u64, quiet: bool) -> Startup {
        let mut out = Startup::default();
        for b in pool {
            out.backends.insert(b.clone(), BackendCounts::default());
        }
        let stored: HashSet<Arc<str>> =
            self.queues.keys().cloned().chain(self.dead.keys().map(|(b, _)| b.clone())).collect();
        let pool_urls: Vec<(Option<String>, &String)> = pool.iter().map(|b| (backend_url(b), b)).collect();
        let mut renamed: HashMap<Arc<str>, Arc<str>> = HashMap::new();
        for from in stored.iter().filter(|l| !out.backends.contains_key(&***l)) {
            let url = backend_url(from);
            let Some((_, to)) = pool_urls.iter().find(|(u, _)| u.is_some() && *u == url) else { continue };
            let to = self.label(to);
            let queue = self.queues.remove(from).unwrap_or_default();
            let mut n = queue.len();
            self.queues.entry(to.clone()).or_default().extend(queue);
            let dead: Vec<_> = self.dead.keys().filter(|(b, _)| b == from).cloned().collect();
            n += dead.len();
            for key in dead {
                if let Some(row) = self.dead.remove(&key) {
                    self.dead.insert((to.clone(), key.1), row);
                }
            }
            if !quiet {
                tracing::info!(from = %from, to = %to, rows = n, "the same backend, written another way: its queue follows");
            }
            renamed.insert(from.clone(), to);
        }
        if !renamed.is_empty() {
            for held in self.deliveries.values_mut() {
                if held.backends.iter().any(|b| renamed.contains_key(b)) {
                    held.backends =
                        held.backends.iter().map(|b| renamed.get(b).cloned().unwrap_or_else(|| b.clone())).collect();
                }
            }
        }
        let mut orphans = Vec::new();
        for (b, queue) in &self.queues {
            out.max_seq = out.max_seq.max(queue.keys().next_back().copied());
            match out.backends.get_mut(&**b) {
                Some(counts) => counts.pending += queue.len() as u64,
                None if !queue.is_empty() => orphans.push(b.clone()),
                None => {}
            }
        }
        for (b, seq) in self.dead.keys() {
            out.max_seq = out.max_seq.max(Some(*seq));
            if let Some(counts) = out.backends.get_mut(&**b) {
                counts.dead += 1;
            }
        }
        out.max_seq = out.max_seq.max(self.deliveries.values().map(|h| h.seq).max());
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
                    at_ms: now,
                };
                self.dead.insert((b.clone(), seq), dead);
                out.orphaned += 1;
            }
            if !quiet {
                tracing::error!(
                    backend = %b,
                    writes,
                    "dead letters: this backend is no longer in --backends and will not get these writes; \
                     GET /dead-letters?backend=... lists them, DELETE drops them"
                );
            }
        }
        out
    }

    /// Recovery of `backend`: every write of `writes` (id, its record, where its body is) gets an entry in the
    /// backend's queue at its original order, with fresh attempts, unless it is queued there already. A dead
    /// letter of the backend goes back to its queue (the backend lost what made it refuse, or fail: say a
    /// password change for a user it no longer knew). A write no longer held (finished everywhere) is held
    /// again, for this backend only. Returns the orders queued and how many of them were dead letters.
    pub fn recover(&mut self, backend: &str, writes: Vec<(u128, StoredDelivery, Body)>) -> (Vec<u64>, u64) {
        let label = self.label(backend);
        let mut queued = Vec::new();
        let mut from_dead = 0;
        for (id, write, body) in writes {
            let seq = write.seq;
            let in_queue = self.queues.get(&label).is_some_and(|q| q.contains_key(&seq));
            if in_queue {
                continue;
            }
            if self.dead.remove(&(label.clone(), seq)).is_some() {
                self.queues.entry(label.clone()).or_default().insert(seq, QueueRow { id, ..QueueRow::default() });
                queued.push(seq);
                from_dead += 1;
                continue;
            }
            match self.deliveries.get_mut(&id) {
                Some(held) => {
                    held.refs += 1;
                    if !held.backends.contains(&label) {
                        let mut backends = held.backends.to_vec();
                        backends.push(label.clone());
                        held.backends = backends.into();
                    }
                }
                None => {
                    let mut backends = write.backends.clone();
                    if !backends.iter().any(|b| b == backend) {
                        backends.push(backend.to_owned());
                    }
                    let held = Held {
                        seq,
                        accepted_at_ms: write.accepted_at_ms,
                        backends: self.pool(&backends),
                        path: self.path(&write.path_and_query),
                        body,
                        refs: 1,
                        recovered: true,
                    };
                    self.deliveries.insert(id, held);
                    self.recovered += 1;
                }
            }
            self.queues.entry(label.clone()).or_default().insert(seq, QueueRow { id, ..QueueRow::default() });
            queued.push(seq);
        }
        (queued, from_dead)
    }

    /// A recovery of `backend` over `writes` (in any order), with what the history says of itself; see
    /// [`super::WriteLog::recover`].
    pub fn recover_report(
        &mut self,
        backend: &str,
        mut writes: Vec<(u128, StoredDelivery, Body)>,
        oldest_ms: Option<u64>,
        dropped_upto_ms: Option<u64>,
    ) -> super::Recovered {
        writes.sort_by_key(|(_, w, _)| w.seq);
        let upto_seq = writes.last().map(|(_, w, _)| w.seq);
        let (queued, from_dead_letters) = self.recover(backend, writes);
        super::Recovered {
            queued: queued.len() as u64,
            from_dead_letters,
            upto_seq,
            pending_upto: upto_seq.map_or(0, |upto| self.pending_upto(backend, upto)),
            oldest_ms,
            dropped_upto_ms,
        }
    }

    /// Entries of `backend` still pending with an order at most `upto`.
    pub fn pending_upto(&self, backend: &str, upto: u64) -> u64 {
        self.queues.get(backend).map_or(0, |q| q.range(..=upto).count() as u64)
    }

    /// The positions of the bodies of the deliveries still held (the disk log keeps their segments).
    pub fn held_positions(&self) -> impl Iterator<Item = Position> + '_ {
        self.deliveries.values().filter_map(|h| match h.body {
            Body::Disk(at) => Some(at),
            Body::Memory(_) => None,
        })
    }
}

/// True when the dead letter `(backend, order)` with `row` matches `filter`.
fn dead_matches(filter: &DeadFilter, (backend, _): &(Arc<str>, u64), row: &DeadRow) -> bool {
    filter.backend.as_deref().is_none_or(|f| f == &**backend) && filter.id.is_none_or(|id| id == row.id)
}
