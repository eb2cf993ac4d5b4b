//! Idempotent client replay (IETF draft-ietf-httpapi-idempotency-key-header): a client that repeats a write with
//! the same `Idempotency-Key` and the same body gets the original delivery's answer and creates no second
//! delivery; the same key with a different body is refused with `422 Unprocessable Content`.
//!
//! Records live for `--idempotency-window` (default 24 h) and at most [`MAX_KEYS`] of them are kept, the oldest
//! forgotten first. With an outbox they are stored with the write they belong to (same transaction) and reloaded
//! at start, so a replay after a restart is recognised too.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Most idempotency records kept; past it the oldest are forgotten.
pub const MAX_KEYS: usize = 100_000;

/// The answer a write got, kept to be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAnswer {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// What the store knows of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The delivery the key created.
    pub delivery_id: u128,
    /// [`request_hash`] of the write it came with.
    pub body_hash: [u8; 32],
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The answer the client got, once decided (a `202` is not kept: a replay shows the progress instead).
    pub answer: Option<StoredAnswer>,
}

/// What to do with a write that carries a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// First use: the key is now reserved for this delivery, with this record.
    New(KeyRecord),
    /// A repeat with the same body: answer as the original.
    Replay(KeyRecord),
    /// A repeat while the first use is not yet stored: its fate is unknown, so the client must retry later
    /// (`409`, as the IETF draft has it for concurrent requests).
    InProgress,
    /// The key was used with another body.
    Conflict,
    /// The shared store of keys (`--store nats://...`) cannot be read now: `503`, nothing is stored.
    Unavailable,
}

/// The fingerprint of a write for replays: SHA-256 over its method, path and body, so that a key reused on
/// another route is a conflict, not a replay of the first route's answer.
pub fn request_hash(method: &str, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(method.as_bytes())
        .chain_update([0])
        .chain_update(path_and_query.as_bytes())
        .chain_update([0])
        .chain_update(body)
        .finalize()
        .into()
}

/// The records of recent keys.
#[derive(Debug)]
pub struct Replays {
    window: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each key's record, and whether its write is stored (confirmed).
    by_key: HashMap<String, (KeyRecord, bool)>,
    order: VecDeque<(u64, String)>,
}

impl Replays {
    /// Records kept for `window`, starting from `loaded` (from the outbox; oldest first).
    pub fn new(window: Duration, loaded: Vec<(String, KeyRecord)>, now_ms: u64) -> Self {
        let replays = Self { window, inner: Mutex::new(Inner::default()) };
        {
            let mut inner = replays.lock();
            for (key, record) in loaded {
                inner.order.push_back((record.at_ms, key.clone()));
                inner.by_key.insert(key, (record, true));
            }
            replays.expire(&mut inner, now_ms);
        }
        replays
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
    }

    fn expire(&self, inner: &mut Inner, now_ms: u64) {
        let window = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        while let Some((at, key)) = inner.order.front().cloned() {
            let expired = now_ms.saturating_sub(at) > window;
            if !expired && inner.order.len() <= MAX_KEYS {
                break;
            }
            inner.order.pop_front();
            if inner.by_key.get(&key).is_some_and(|(r, _)| r.at_ms == at) {
                inner.by_key.remove(&key);
            }
        }
    }

    /// Checks `key` and, when new, reserves it for `delivery_id` (atomically: of two concurrent first uses,
    /// one is `New` and the other a `Replay` or `Conflict`).
    pub fn check(&self, key: &str, body_hash: [u8; 32], delivery_id: u128, now_ms: u64) -> Check {
        let mut inner = self.lock();
        self.expire(&mut inner, now_ms);
        match inner.by_key.get(key) {
            Some((r, true)) if r.body_hash == body_hash => Check::Replay(r.clone()),
            Some((r, false)) if r.body_hash == body_hash => Check::InProgress,
            Some(_) => Check::Conflict,
            None => {
                let record = KeyRecord { delivery_id, body_hash, at_ms: now_ms, answer: None };
                inner.order.push_back((now_ms, key.to_owned()));
                inner.by_key.insert(key.to_owned(), (record.clone(), false));
                Check::New(record)
            }
        }
    }

    /// Marks the write reserved under `key` as stored: from now on repeats are replays.
    pub fn confirm(&self, key: &str, delivery_id: u128) {
        let mut inner = self.lock();
        if let Some((r, confirmed)) = inner.by_key.get_mut(key)
            && r.delivery_id == delivery_id
        {
            *confirmed = true;
        }
    }

    /// Releases a reservation whose write was refused (nothing was delivered under it).
    pub fn release(&self, key: &str, delivery_id: u128) {
        let mut inner = self.lock();
        if inner.by_key.get(key).is_some_and(|(r, _)| r.delivery_id == delivery_id) {
            inner.by_key.remove(key);
        }
    }

    /// Keeps the answer given to the first use of `key`.
    pub fn answered(&self, key: &str, delivery_id: u128, answer: StoredAnswer) {
        let mut inner = self.lock();
        if let Some((r, _)) = inner.by_key.get_mut(key)
            && r.delivery_id == delivery_id
        {
            r.answer = Some(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_body_replays_other_body_conflicts() {
        let r = Replays::new(Duration::from_secs(60), Vec::new(), 1_000);
        let h = request_hash("POST", "/register", b"username=a&password=b");
        assert!(matches!(r.check("k", h, 7, 1_000), Check::New(_)));
        assert_eq!(r.check("k", h, 8, 1_000), Check::InProgress, "not stored yet: its fate is unknown");
        r.confirm("k", 7);
        let Check::Replay(rec) = r.check("k", h, 8, 1_001) else { panic!("replay expected") };
        assert_eq!(rec.delivery_id, 7);
        assert_eq!(rec.answer, None);
        r.answered("k", 7, StoredAnswer { status: 201, content_type: None, body: b"ok".to_vec() });
        let Check::Replay(rec) = r.check("k", h, 9, 1_002) else { panic!("replay expected") };
        assert_eq!(rec.answer.map(|a| a.status), Some(201));
        assert_eq!(r.check("k", request_hash("POST", "/register", b"other"), 10, 1_003), Check::Conflict);
        let same_body_other_route = request_hash("POST", "/changePassword", b"username=a&password=b");
        assert_eq!(r.check("k", same_body_other_route, 11, 1_004), Check::Conflict);
    }

    #[test]
    fn records_expire_after_the_window_and_refused_writes_release_their_key() {
        let r = Replays::new(Duration::from_secs(1), Vec::new(), 0);
        let h = request_hash("POST", "/register", b"x");
        assert!(matches!(r.check("k", h, 1, 0), Check::New(_)));
        let other = request_hash("POST", "/register", b"y");
        assert!(matches!(r.check("k", other, 2, 2_000), Check::New(_)), "expired: the key is free again");
        r.release("k", 2);
        assert!(matches!(r.check("k", h, 3, 2_001), Check::New(_)));
    }

    #[test]
    fn loaded_records_are_recognised() {
        let h = request_hash("POST", "/register", b"x");
        let rec = KeyRecord { delivery_id: 5, body_hash: h, at_ms: 10, answer: None };
        let r = Replays::new(Duration::from_secs(60), vec![("k".into(), rec)], 20);
        assert!(matches!(r.check("k", h, 6, 30), Check::Replay(KeyRecord { delivery_id: 5, .. })));
    }
}
