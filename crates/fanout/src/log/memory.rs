//! The write log in memory, for `--no-outbox`: the same rules as the durable log (see the module doc of
//! [`super`]), kept in the [`Index`] under one lock, with no thread, no encoding and no copy-on-write pages.
//! Nothing survives the process: that is what `--no-outbox` asks for, and why it pays for no store work.
//!
//! Every call does its work at once under the lock (a few map operations) and returns a future that is already
//! resolved, so a write costs no hand-off to another thread. Memory is bounded by the dispatcher (without an
//! outbox, deliveries not finished everywhere are at most `--max-in-flight`), by `--delivery-history` for the
//! finished outcomes kept, and by the [`HistoryLimits`] for the history of accepted writes that a recovery
//! replays (kept encoded, in memory: `--history-max-bytes` is capped at 16 MiB in this mode, about 45 000 writes; 0 keeps none).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::{BoxFuture, ready};

use super::index::{Body, Index};
use super::{
    DeadFilter, DeadLetter, DeliveryView, HistoryLimits, HistoryStats, Loaded, LogError, Recovered, Settlement,
    Startup, StoredDelivery, WriteLog, now_ms,
};
use crate::replay::KeyRecord;

/// One accepted write kept for recoveries: encoded (postcard), so that what it counts against
/// `--history-max-bytes` is what it takes (a decoded request is several times larger, in many allocations).
struct Kept {
    id: u128,
    accepted_at_ms: u64,
    encoded: Box<[u8]>,
}

impl Kept {
    /// What it counts against the bound: its bytes plus the entry itself.
    fn bytes(&self) -> u64 {
        (self.encoded.len() + std::mem::size_of::<Kept>()) as u64
    }
}

#[derive(Default)]
struct State {
    index: Index,
    history: VecDeque<Kept>,
    history_bytes: u64,
    /// The newest acceptance time among the writes the history dropped.
    dropped_upto_ms: Option<u64>,
    /// Writes of the history every backend refused: a recovery leaves them out (applied nowhere).
    refused: HashSet<u128>,
    closed: bool,
}

/// The write log in memory.
#[derive(Default)]
pub struct MemoryLog {
    state: Mutex<State>,
    limits: Option<HistoryLimits>,
}

impl MemoryLog {
    /// An empty log keeping no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty log keeping a history of accepted writes within `limits`.
    pub fn with_history(limits: HistoryLimits) -> Self {
        Self { state: Mutex::default(), limits: Some(limits) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }
}

impl State {
    /// Drops the oldest writes past the limits.
    fn bound(&mut self, limits: HistoryLimits, now: u64) {
        while let Some(oldest) = self.history.front() {
            let expired = now.saturating_sub(oldest.accepted_at_ms) > limits.window_ms;
            if !expired && self.history_bytes <= limits.max_bytes {
                break;
            }
            self.history_bytes -= oldest.bytes();
            self.dropped_upto_ms = self.dropped_upto_ms.max(Some(oldest.accepted_at_ms));
            let id = oldest.id;
            self.history.pop_front();
            self.refused.remove(&id);
        }
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
        self.state().index.unfinished()
    }

    fn startup(&self, pool: Vec<String>) -> BoxFuture<'static, Result<Startup, LogError>> {
        let startup = self.state().index.startup(&pool, now_ms(), false);
        Box::pin(ready(Ok(startup)))
    }

    fn append(
        &self,
        id: u128,
        write: StoredDelivery,
        key: Option<(&str, &KeyRecord)>,
    ) -> BoxFuture<'static, Result<(), LogError>> {
        let write = Arc::new(write);
        let mut state = self.state();
        if state.closed {
            return Box::pin(ready(Err(LogError::Closed)));
        }
        state.index.append(id, &write, Body::Memory(write.clone()), key);
        if let Some(limits) = self.limits.filter(|l| l.max_bytes > 0)
            && let Ok(encoded) = postcard::to_allocvec(&*write)
        {
            let kept = Kept { id, accepted_at_ms: write.accepted_at_ms, encoded: encoded.into_boxed_slice() };
            state.history_bytes += kept.bytes();
            state.history.push_back(kept);
            state.bound(limits, now_ms());
        }
        Box::pin(ready(Ok(())))
    }

    fn settle(&self, backend: &Arc<str>, seq: u64, settlement: Settlement) -> BoxFuture<'static, ()> {
        self.state().index.settle(backend, seq, settlement);
        Box::pin(ready(()))
    }

    fn drop_refused(&self, id: u128) -> BoxFuture<'static, Vec<String>> {
        let mut state = self.state();
        let dropped = state.index.drop_refused(id);
        if !dropped.is_empty() && self.limits.is_some_and(|l| l.max_bytes > 0) {
            state.refused.insert(id);
        }
        Box::pin(ready(dropped))
    }

    fn pending(
        &self,
        backend: &Arc<str>,
        skip: HashSet<u64>,
        limit: usize,
        below: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<Loaded>, LogError>> {
        let rows = self.state().index.pending(backend, &skip, limit, below);
        let loaded = rows
            .into_iter()
            .filter_map(|(seq, row, body)| match body {
                Body::Memory(write) => Some(Loaded { seq, row, delivery: (*write).clone() }),
                Body::Disk(_) => None,
            })
            .collect();
        Box::pin(ready(Ok(loaded)))
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
        Box::pin(ready(Ok(state.index.redrive(&rows))))
    }

    fn discard(&self, filter: DeadFilter) -> BoxFuture<'static, Result<Vec<(String, u64)>, LogError>> {
        let mut state = self.state();
        let rows = state.index.discardable(&filter);
        Box::pin(ready(Ok(state.index.discard(&rows))))
    }

    fn view(&self, id: u128) -> BoxFuture<'static, Result<Option<DeliveryView>, LogError>> {
        Box::pin(ready(Ok(self.state().index.view(id))))
    }

    fn answer(&self, key: &str, record: &KeyRecord) {
        self.state().index.answer(key, record.clone());
    }

    fn idempotency_keys(
        &self,
        window_ms: u64,
        now: u64,
    ) -> BoxFuture<'static, Result<Vec<(String, KeyRecord)>, LogError>> {
        Box::pin(ready(Ok(self.state().index.keys(window_ms, now))))
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), LogError>> {
        Box::pin(ready(Ok(())))
    }

    fn tick(&self, window_ms: u64, keep_delivered: u64) {
        let mut state = self.state();
        state.index.trim(keep_delivered);
        state.index.prune_keys(window_ms, now_ms());
        if let Some(limits) = self.limits {
            state.bound(limits, now_ms());
        }
    }

    fn history(&self) -> HistoryStats {
        let state = self.state();
        HistoryStats { bytes: state.history_bytes, oldest_ms: state.history.front().map(|k| k.accepted_at_ms) }
    }

    fn recover(&self, backend: &Arc<str>, since_ms: u64) -> BoxFuture<'static, Result<Recovered, LogError>> {
        let mut state = self.state();
        let oldest_ms = state.history.front().map(|k| k.accepted_at_ms);
        let mut writes = Vec::new();
        for k in state.history.iter().filter(|k| k.accepted_at_ms >= since_ms && !state.refused.contains(&k.id)) {
            let write: StoredDelivery = match postcard::from_bytes(&k.encoded) {
                Ok(w) => w,
                Err(e) => return Box::pin(ready(Err(LogError::from(e)))),
            };
            let body = Body::Memory(Arc::new(write.clone()));
            writes.push((k.id, write, body));
        }
        let dropped_upto_ms = state.dropped_upto_ms;
        Box::pin(ready(Ok(state.index.recover_report(backend, writes, oldest_ms, dropped_upto_ms))))
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        self.state().closed = true;
        Box::pin(ready(()))
    }
}
