//! Conformance tests of the [`WriteLog`] rules, run against every implementation (see [`Kind`]): what one
//! implementation passes, another must too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk::DiskLog;
use super::memory::MemoryLog;
use super::*;

/// An implementation under test.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Disk,
    /// The disk log with `--encryption-key-file` (the same key at every open).
    Encrypted,
    Memory,
}

impl Kind {
    /// The durable log in `dir`.
    fn open(self, dir: &Path) -> Arc<dyn WriteLog> {
        match self {
            Kind::Disk => Arc::new(DiskLog::open(dir, LIMITS, None).expect("open")),
            Kind::Encrypted => Arc::new(DiskLog::open(dir, LIMITS, Some(keyring(&[KEY_1]))).expect("open")),
            // Nothing survives: the reopen tests are for durable logs only.
            Kind::Memory => unreachable!("the in-memory log has no directory"),
        }
    }

    /// A fresh log (for the disk log, in a new directory).
    fn memory(self) -> Arc<dyn WriteLog> {
        match self {
            Kind::Disk | Kind::Encrypted => self.open(&temp_dir("memory")),
            Kind::Memory => Arc::new(MemoryLog::with_history(LIMITS)),
        }
    }
}

/// Runs each named conformance test against the implementations named.
macro_rules! conformance {
    ($module:ident, $kind:expr, [$($test:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($kind).await;
                }
            )*
        }
    };
}

conformance!(
    disk,
    super::Kind::Disk,
    [
        queues_deliveries_and_dead_letters_survive_a_reopen,
        a_recovery_queues_every_write_since_t_again_in_order,
        a_recovery_leaves_out_writes_every_backend_refused,
        at_start_entries_of_a_removed_backend_become_dead_letters_and_counts_are_given,
        only_the_newest_delivered_records_are_kept,
        dead_letters_redrive_and_discard_by_delivery,
    ]
);
#[tokio::test]
async fn disk_recovery_survives_a_reopen() {
    a_recovery_survives_a_reopen(Kind::Disk).await;
}
conformance!(
    encrypted,
    super::Kind::Encrypted,
    [
        queues_deliveries_and_dead_letters_survive_a_reopen,
        a_recovery_queues_every_write_since_t_again_in_order,
        a_recovery_leaves_out_writes_every_backend_refused,
        at_start_entries_of_a_removed_backend_become_dead_letters_and_counts_are_given,
        only_the_newest_delivered_records_are_kept,
        dead_letters_redrive_and_discard_by_delivery,
        a_recovery_survives_a_reopen,
    ]
);
conformance!(
    memory,
    super::Kind::Memory,
    [
        at_start_entries_of_a_removed_backend_become_dead_letters_and_counts_are_given,
        only_the_newest_delivered_records_are_kept,
        dead_letters_redrive_and_discard_by_delivery,
        a_recovery_queues_every_write_since_t_again_in_order,
        a_recovery_leaves_out_writes_every_backend_refused,
    ]
);

/// History kept by the logs under test (the writes under test were accepted in 1970).
const LIMITS: HistoryLimits = HistoryLimits { window_ms: u64::MAX, max_bytes: 1 << 30 };

fn backend(b: &str) -> DeadFilter {
    DeadFilter { backend: Some(b.to_owned()), id: None }
}

/// A fresh directory path (not created), unique to the call: the same test runs against several kinds at once.
fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("fanout-outbox-{name}-{}-{}", std::process::id(), uuid::Uuid::now_v7()));
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

async fn seqs(outbox: &dyn WriteLog, backend: &str) -> Vec<u64> {
    outbox.pending(&label(backend), HashSet::new(), 100, None).await.expect("load").iter().map(|l| l.seq).collect()
}

async fn queues_deliveries_and_dead_letters_survive_a_reopen(kind: Kind) {
    let dir = temp_dir("reopen");
    {
        let outbox = kind.open(&dir);
        for seq in 0..3u64 {
            outbox.append(u128::from(seq) + 100, write(seq), None).await.expect("accept");
        }
        assert_eq!(outbox.unfinished(), 3);
        let progress = QueueRow { id: 100, attempts: 4, due_ms: 77, last_status: Some(503), last_outcome: None };
        outbox.settle(&label("b:1"), 0, Settlement::DueAgain(progress.clone())).await;
        for (i, b) in POOL.iter().enumerate() {
            let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
            outbox.settle(&label(b), 1, Settlement::Delivered { id: 101, row }).await;
        }
        let dead = DeadRow {
            id: 102,
            attempts: 3,
            reason: "exhausted".into(),
            last_status: Some(503),
            last_outcome: Some("status_5xx".into()),
            at_ms: now_ms(),
        };
        outbox.settle(&label("c:1"), 2, Settlement::Dead(dead)).await;
        // A durable commit after the non-durable ones makes them durable too.
        let key = KeyRecord { delivery_id: 200, body_hash: [1; 32], at_ms: now_ms(), answer: None };
        outbox.append(200, write(9), Some(("client-key", &key))).await.expect("accept");
        assert_eq!(outbox.unfinished(), 3, "101 finished everywhere, 200 added");
        outbox.close().await;
    }
    let outbox = kind.open(&dir);
    assert_eq!(outbox.unfinished(), 3);
    assert_eq!(seqs(&*outbox, "a:1").await, [0, 2, 9]);
    assert_eq!(seqs(&*outbox, "c:1").await, [0, 9], "the dead letter left the queue");
    let loaded = outbox.pending(&label("b:1"), [2].into(), 1, None).await.expect("load");
    assert_eq!(loaded.len(), 1, "limit applies");
    assert_eq!(loaded[0].row.attempts, 4, "progress kept");
    assert_eq!(loaded[0].delivery, write(0));
    let skipped = outbox.pending(&label("b:1"), [0, 2].into(), 10, None).await.expect("load");
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

    let dead = outbox.dead_letters(DeadFilter::default(), 10).await.expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].backend.as_str(), dead[0].seq, dead[0].path.as_str()), ("c:1", 2, "/register"));
    assert!(outbox.dead_letters(backend("a:1"), 10).await.expect("list").is_empty());
    assert_eq!(outbox.redrive(backend("c:1"), pool()).await.expect("redrive"), [("c:1".to_owned(), 2)]);
    assert_eq!(seqs(&*outbox, "c:1").await, [0, 2, 9], "back in its place, by acceptance order");
    assert!(outbox.dead_letters(DeadFilter::default(), 10).await.expect("list").is_empty());
    assert!(outbox.redrive(DeadFilter::default(), pool()).await.expect("redrive").is_empty());

    let keys = outbox.idempotency_keys(60_000, now_ms()).await.expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].0, "client-key");
    assert!(outbox.idempotency_keys(0, now_ms() + 10).await.expect("keys").is_empty(), "expired ones are deleted");
    outbox.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn at_start_entries_of_a_removed_backend_become_dead_letters_and_counts_are_given(kind: Kind) {
    let outbox = kind.memory();
    for seq in [4u64, 7] {
        outbox.append(u128::from(seq), write(seq), None).await.expect("accept");
    }
    // a:1 is now written as a URL: the same backend (found by an attack run: its queue became dead letters).
    let pool = vec!["c:1".to_owned(), "http://a:1".to_owned(), "new:1".to_owned()];
    let start = outbox.startup(pool).await.expect("startup");
    assert_eq!(start.max_seq, Some(7));
    assert_eq!(start.orphaned, 2, "b:1 left the pool");
    assert_eq!(start.backends["http://a:1"], BackendCounts { pending: 2, dead: 0 });
    assert_eq!(seqs(&*outbox, "http://a:1").await, [4, 7]);
    // Found by a second attack run: the deliveries still named the old spelling, so their view called it
    // delivered.
    let view = outbox.view(4).await.expect("view").expect("known");
    let a = view.backends.iter().find(|b| b.backend == "http://a:1").expect("renamed in the view");
    assert_eq!(a.state, BackendState::Pending);
    assert_eq!(start.backends["new:1"], BackendCounts::default());
    let dead = outbox.dead_letters(backend("b:1"), 10).await.expect("list");
    assert_eq!(dead.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>(), ["backend_removed"; 2]);
    assert_eq!(outbox.unfinished(), 2, "a dead letter keeps its delivery");
}

async fn only_the_newest_delivered_records_are_kept(kind: Kind) {
    let outbox = kind.memory();
    let ids: Vec<u128> = (0..4u64).map(|_| uuid::Uuid::now_v7().as_u128()).collect();
    for (seq, id) in ids.iter().enumerate() {
        outbox.append(*id, write(seq as u64), None).await.expect("accept");
        for (i, b) in POOL.iter().enumerate() {
            let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
            outbox.settle(&label(b), seq as u64, Settlement::Delivered { id: *id, row }).await;
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
    outbox.append(pending, write(10), None).await.expect("accept");
    for (i, b) in POOL.iter().enumerate().take(2) {
        let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
        outbox.settle(&label(b), 10, Settlement::Delivered { id: pending, row }).await;
    }
    outbox.flush().await.expect("flush");
    outbox.tick(60_000, 0);
    let view = outbox.view(pending).await.expect("view").expect("pending");
    let states: Vec<_> = view.backends.iter().map(|b| b.state).collect();
    assert_eq!(states, [BackendState::Delivered, BackendState::Delivered, BackendState::Pending]);
}

#[test]
fn an_unwritable_directory_is_refused() {
    let err = DiskLog::open(Path::new("/proc/fanout-cannot-write-here"), LIMITS, None).err().expect("refused");
    assert!(matches!(err, LogError::Segment(_)), "{err}");
    assert!(err.to_string().contains("/proc/fanout-cannot-write-here"), "{err}");
}

#[test]
fn a_uuid_v7_carries_its_time() {
    let id = uuid::Uuid::now_v7().as_u128();
    assert!(now_ms().abs_diff(id_time_ms(id)) < 5_000);
    assert_eq!(id_time_ms(uuid::Uuid::nil().as_u128()), 0);
}

/// The in-memory half of the reopen test: dead letters listed, redriven and deleted by delivery, the refused
/// outcome of a write every backend refused, and the unfinished count through all of it.
async fn dead_letters_redrive_and_discard_by_delivery(kind: Kind) {
    let log = kind.memory();
    for seq in 0..3u64 {
        log.append(u128::from(seq) + 100, write(seq), None).await.expect("append");
    }
    let dead = |id: u128, reason: &str| DeadRow {
        id,
        attempts: 1,
        reason: reason.into(),
        last_status: Some(400),
        last_outcome: Some("rejected".into()),
        at_ms: now_ms(),
    };
    log.settle(&label("a:1"), 0, Settlement::Dead(dead(100, "exhausted"))).await;
    log.settle(&label("b:1"), 0, Settlement::Dead(dead(100, "exhausted"))).await;
    let by_id = DeadFilter { backend: None, id: Some(100) };
    assert_eq!(log.dead_letters(by_id.clone(), 10).await.expect("list").len(), 2);
    assert_eq!(log.redrive(by_id.clone(), vec!["a:1".into()]).await.expect("redrive"), [("a:1".to_owned(), 0)]);
    assert_eq!(seqs(&*log, "a:1").await, [0, 1, 2], "back in its place");
    assert_eq!(log.discard(by_id).await.expect("discard"), [("b:1".to_owned(), 0)]);
    let view = log.view(100).await.expect("view").expect("known");
    let states: Vec<_> = view.backends.iter().map(|b| b.state).collect();
    assert_eq!(states, [BackendState::Pending, BackendState::Discarded, BackendState::Pending]);
    assert_eq!(log.unfinished(), 3);

    // Refused by every backend: its dead letters go, the delivery finishes, its outcome stays.
    for b in POOL {
        log.settle(&label(b), 1, Settlement::Dead(dead(101, "rejected"))).await;
    }
    let mut dropped = log.drop_refused(101).await;
    dropped.sort();
    assert_eq!(dropped, pool());
    assert_eq!(log.unfinished(), 2);
    let view = log.view(101).await.expect("view").expect("kept");
    assert!(view.backends.iter().all(|b| b.state == BackendState::Refused && b.status == Some(400)), "{view:?}");
    assert!(log.drop_refused(102).await.is_empty(), "not refused anywhere");
}

/// Appends writes 0..n (ids 100 + seq) and delivers them on every backend of the pool.
async fn delivered_everywhere(log: &dyn WriteLog, n: u64) {
    for seq in 0..n {
        let mut w = write(seq);
        w.accepted_at_ms = 1_000 + seq;
        log.append(u128::from(seq) + 100, w, None).await.expect("append");
        for (i, b) in POOL.iter().enumerate() {
            let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
            log.settle(&label(b), seq, Settlement::Delivered { id: u128::from(seq) + 100, row }).await;
        }
    }
}

/// A recovery (docs/write-log.md section 5): a backend that lost its state gets every write accepted since T again,
/// in acceptance order, with its original request (and so its original `Idempotency-Key`); writes it still has
/// pending are not queued twice; the other backends are untouched.
async fn a_recovery_queues_every_write_since_t_again_in_order(kind: Kind) {
    let log = kind.memory();
    delivered_everywhere(&*log, 6).await;
    assert_eq!(log.unfinished(), 0);
    // One more, still pending everywhere.
    let mut w = write(6);
    w.accepted_at_ms = 1_006;
    log.append(106, w, None).await.expect("append");
    let recovered = log.recover(&label("b:1"), 1_002).await.expect("recover");
    assert_eq!(recovered.queued, 4, "writes 2..5 again; 6 is pending already: {recovered:?}");
    assert_eq!(recovered.upto_seq, Some(6));
    assert_eq!(recovered.pending_upto, 5);
    assert_eq!(seqs(&*log, "b:1").await, [2, 3, 4, 5, 6]);
    assert_eq!(seqs(&*log, "a:1").await, [6], "other backends untouched");
    let loaded = log.pending(&label("b:1"), HashSet::new(), 1, None).await.expect("pending");
    let mut original = write(2);
    original.accepted_at_ms = 1_002;
    assert_eq!(loaded[0].delivery, original, "the original request, headers included");
    assert_eq!(log.unfinished(), 1, "writes held again only for the recovery do not count against the bound");
    let below = log.pending(&label("b:1"), HashSet::new(), 10, Some(4)).await.expect("pending");
    assert_eq!(below.iter().map(|l| l.seq).collect::<Vec<_>>(), [2, 3], "only orders below the bound");
    let view = log.view(102).await.expect("view").expect("held again");
    let states: Vec<_> = view.backends.iter().map(|b| b.state).collect();
    assert_eq!(states, [BackendState::Delivered, BackendState::Pending, BackendState::Delivered]);
    for seq in 2..6u64 {
        let row = DeliveredRow { attempts: 1, status: 201, position: 1 };
        log.settle(&label("b:1"), seq, Settlement::Delivered { id: u128::from(seq) + 100, row }).await;
    }
    assert_eq!(log.unfinished(), 1, "only the write pending everywhere");
    // Asked again: nothing is queued twice.
    let again = log.recover(&label("b:1"), 0).await.expect("recover");
    assert_eq!(again.queued, 6, "0..5 again (6 is pending)");
    assert_eq!(seqs(&*log, "b:1").await, [0, 1, 2, 3, 4, 5, 6]);
}

/// A recovery is recorded: a restart in the middle of one resumes it.
async fn a_recovery_survives_a_reopen(kind: Kind) {
    let dir = temp_dir("recover-reopen");
    {
        let log = kind.open(&dir);
        delivered_everywhere(&*log, 4).await;
        let recovered = log.recover(&label("c:1"), 0).await.expect("recover");
        assert_eq!(recovered.queued, 4);
        let row = DeliveredRow { attempts: 1, status: 201, position: 2 };
        log.settle(&label("c:1"), 0, Settlement::Delivered { id: 100, row }).await;
        log.flush().await.expect("flush");
        log.close().await;
    }
    let log = kind.open(&dir);
    let start = log.startup(pool()).await.expect("startup");
    assert_eq!(start.backends["c:1"].pending, 3);
    assert_eq!(start.max_seq, Some(3), "new writes go after the newest stored, finished or not");
    assert_eq!(seqs(&*log, "c:1").await, [1, 2, 3]);
    log.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Past `--history-max-bytes` the oldest finished writes go, a whole segment at a time; a pending write is
/// never dropped (nor anything after it); idempotency records survive the segments they were in.
#[tokio::test]
async fn disk_history_is_bounded_and_never_drops_a_pending_write() {
    let dir = temp_dir("history-bound");
    let limits = HistoryLimits { window_ms: 3_600_000, max_bytes: 256 * 1024 };
    let log = DiskLog::open(&dir, limits, None).expect("open");
    let key = KeyRecord { delivery_id: 100, body_hash: [7; 32], at_ms: now_ms(), answer: None };
    // Write 0 stays pending on a:1; everything else is delivered everywhere.
    log.append(100, write(0), Some(("client-key", &key))).await.expect("append");
    for b in ["b:1", "c:1"] {
        let row = DeliveredRow { attempts: 1, status: 201, position: 0 };
        log.settle(&label(b), 0, Settlement::Delivered { id: 100, row }).await;
    }
    let body = "x".repeat(400);
    for seq in 1..3000u64 {
        let mut w = write(seq);
        w.body = format!("username=u{seq}&password={body}").into_bytes();
        log.append(u128::from(seq) + 100, w, None).await.expect("append");
        for (i, b) in POOL.iter().enumerate() {
            let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
            log.settle(&label(b), seq, Settlement::Delivered { id: u128::from(seq) + 100, row }).await;
        }
    }
    log.flush().await.expect("flush");
    let full = log.history().bytes;
    assert!(full > 1024 * 1024, "{full} bytes written");
    log.tick(3_600_000, 100);
    tokio::task::yield_now().await;
    assert_eq!(log.history().bytes, full, "the pending write pins the oldest segment, and all after it");

    let row = DeliveredRow { attempts: 1, status: 201, position: 0 };
    log.settle(&label("a:1"), 0, Settlement::Delivered { id: 100, row }).await;
    log.tick(3_600_000, 100);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.history().bytes > limits.max_bytes + SEGMENT_BYTES_UNDER_TEST {
        assert!(tokio::time::Instant::now() < deadline, "history not trimmed: {} bytes", log.history().bytes);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let kept = log.history();
    assert!(kept.oldest_ms.is_some());
    // Found by an attack run: once a checkpoint filled a segment, every tick wrote a new one and dropped the
    // last, so the log churned with no traffic at all. Quiet ticks change nothing now.
    for _ in 0..5 {
        log.tick(3_600_000, 100);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(log.history().bytes, kept.bytes, "quiet ticks leave the history alone");
    log.flush().await.expect("flush");
    log.close().await;
    let log = DiskLog::open(&dir, limits, None).expect("reopen");
    let keys = log.idempotency_keys(3_600_000, now_ms()).await.expect("keys");
    assert_eq!(keys.len(), 1, "the key outlived its segment");
    let start = log.startup(pool()).await.expect("startup");
    assert_eq!(start.max_seq, Some(2999));
    log.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The segment size the disk log picks for the bound above (an eighth, at least 64 KiB).
const SEGMENT_BYTES_UNDER_TEST: u64 = 64 * 1024;

/// Found by a review: a recovery's record names the writes it queued; once they were delivered, retention
/// dropped their segments while the recovery's record stayed, and the next start failed reading them. Also: a
/// checkpoint carried every idempotency record in one frame, which past 16 MiB (answers of up to 64 KiB each)
/// could not be written, so retention stopped for good.
#[tokio::test]
async fn disk_history_after_a_recovery_and_many_large_answers_still_reopens() {
    let dir = temp_dir("recover-retain");
    let limits = HistoryLimits { window_ms: 3_600_000, max_bytes: 256 * 1024 };
    let log = DiskLog::open(&dir, limits, None).expect("open");
    // 300 keys whose answers carry 60 KiB each: 18 MB of idempotency records.
    let answer = crate::replay::StoredAnswer { status: 201, content_type: None, body: vec![b'a'; 60 * 1024] };
    for seq in 0..300u64 {
        let id = u128::from(seq) + 100;
        let key = KeyRecord { delivery_id: id, body_hash: [1; 32], at_ms: now_ms(), answer: None };
        let name = format!("key-{seq}");
        log.append(id, write(seq), Some((&name, &key))).await.expect("append");
        log.answer(&name, &KeyRecord { answer: Some(answer.clone()), ..key });
        for (i, b) in POOL.iter().enumerate() {
            let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
            log.settle(&label(b), seq, Settlement::Delivered { id, row }).await;
        }
    }
    let recovered = log.recover(&label("b:1"), 0).await.expect("recover");
    assert_eq!(recovered.queued, 300);
    for seq in 0..300u64 {
        let row = DeliveredRow { attempts: 1, status: 201, position: 1 };
        log.settle(&label("b:1"), seq, Settlement::Delivered { id: u128::from(seq) + 100, row }).await;
    }
    // More writes, so that the recovery's record sits in a segment after the ones retention may drop.
    let body = "x".repeat(400);
    for seq in 300..1500u64 {
        let mut w = write(seq);
        w.body = format!("username=u{seq}&password={body}").into_bytes();
        let id = u128::from(seq) + 100;
        log.append(id, w, None).await.expect("append");
        for (i, b) in POOL.iter().enumerate() {
            let row = DeliveredRow { attempts: 1, status: 201, position: i as u16 };
            log.settle(&label(b), seq, Settlement::Delivered { id, row }).await;
        }
    }
    let before = log.history().bytes;
    log.tick(3_600_000, 100);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while log.history().bytes >= before {
        assert!(tokio::time::Instant::now() < deadline, "retention never ran: {} bytes", log.history().bytes);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        log.tick(3_600_000, 100);
    }
    log.flush().await.expect("flush");
    log.close().await;
    let log = DiskLog::open(&dir, limits, None).expect("reopens after the recovered writes' segments went");
    assert!(seqs(&log, "b:1").await.is_empty());
    let keys = log.idempotency_keys(3_600_000, now_ms()).await.expect("keys");
    assert_eq!(keys.len(), 300, "every key outlived its segment");
    assert!(keys.iter().all(|(_, r)| r.answer.as_ref().is_some_and(|a| a.body.len() == 60 * 1024)));
    log.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Found by an attack run: a recovery brought back a write every backend had refused (a password change for a
/// user nobody knew), which then stayed a dead letter of the recovered backend for good, holding the history.
async fn a_recovery_leaves_out_writes_every_backend_refused(kind: Kind) {
    let log = kind.memory();
    delivered_everywhere(&*log, 2).await;
    let mut w = write(2);
    w.accepted_at_ms = 1_002;
    log.append(102, w, None).await.expect("append");
    for b in POOL {
        let row = DeadRow {
            id: 102,
            attempts: 1,
            reason: "rejected".into(),
            last_status: Some(404),
            last_outcome: Some("rejected".into()),
            at_ms: now_ms(),
        };
        log.settle(&label(b), 2, Settlement::Dead(row)).await;
    }
    assert_eq!(log.drop_refused(102).await.len(), 3);
    let recovered = log.recover(&label("b:1"), 0).await.expect("recover");
    assert_eq!(recovered.queued, 2, "{recovered:?}");
    assert_eq!(seqs(&*log, "b:1").await, [0, 1]);
    assert!(log.dead_letters(DeadFilter::default(), 10).await.expect("list").is_empty());
}

const KEY_1: [u8; seal::KEY_BYTES] = [1; seal::KEY_BYTES];
const KEY_2: [u8; seal::KEY_BYTES] = [2; seal::KEY_BYTES];

fn keyring(keys: &[[u8; seal::KEY_BYTES]]) -> Arc<seal::Keyring> {
    Arc::new(seal::Keyring::from_keys(keys.to_vec(), Path::new("test-keys")).expect("keys"))
}

/// Every file under `dir` (recursively) with its bytes, as `grep -r` reads them.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            let bytes = std::fs::read(&path).expect("read");
            out.push((path, bytes));
        }
    }
    out
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A write whose body and headers carry secrets, with an idempotency record (whose body hash is the body's).
fn secret_write(seq: u64) -> (StoredDelivery, KeyRecord) {
    let mut w = write(seq);
    w.body = format!("username=u{seq}&password=hunter2-{seq}").into_bytes();
    w.headers.push(("authorization".into(), format!("Bearer token-{seq}").into_bytes()));
    let record = KeyRecord {
        delivery_id: u128::from(seq) + 100,
        body_hash: crate::replay::request_hash(&w.method, &w.path_and_query, &w.body),
        at_ms: now_ms(),
        answer: None,
    };
    (w, record)
}

/// Stores secret writes `seqs` (ids `seq + 100`, idempotency keys `key-{seq}`), with an answer for each, and
/// closes the log.
async fn store_secrets(dir: &Path, keys: Option<Arc<seal::Keyring>>, seqs: std::ops::Range<u64>) {
    let log = DiskLog::open(dir, LIMITS, keys).expect("open");
    log.startup(pool()).await.expect("startup");
    for seq in seqs {
        let (w, mut record) = secret_write(seq);
        let key = format!("key-{seq}");
        log.append(u128::from(seq) + 100, w, Some((&key, &record))).await.expect("append");
        record.answer = Some(crate::replay::StoredAnswer {
            status: 201,
            content_type: None,
            body: format!("welcome u{seq}, token-{seq}").into_bytes(),
        });
        log.answer(&key, &record);
    }
    log.close().await;
}

/// Finding 4 of the attack runs: passwords readable in the outbox file. With a key, no body, forwarded header,
/// body hash or stored answer is in any file of the store, and the writes come back whole after a reopen.
#[tokio::test]
async fn encrypted_bodies_are_not_findable_in_the_files() {
    let dir = temp_dir("sealed");
    store_secrets(&dir, Some(keyring(&[KEY_1])), 0..20).await;
    let files = files_under(&dir);
    assert!(!files.is_empty());
    for (path, bytes) in &files {
        for seq in 0..20 {
            let (w, record) = secret_write(seq);
            for secret in [format!("hunter2-{seq}").as_bytes(), format!("token-{seq}").as_bytes(), &record.body_hash] {
                assert!(!holds(bytes, secret), "{} holds a secret of write {seq}", path.display());
            }
            assert!(!holds(bytes, &w.body));
        }
    }

    let log = DiskLog::open(&dir, LIMITS, Some(keyring(&[KEY_1]))).expect("reopens with its key");
    let loaded = log.pending(&label("a:1"), HashSet::new(), 100, None).await.expect("pending");
    assert_eq!(loaded.len(), 20);
    for l in &loaded {
        assert_eq!(l.delivery, secret_write(l.seq).0, "the write comes back whole");
    }
    let keys = log.idempotency_keys(u64::MAX, now_ms()).await.expect("keys");
    assert_eq!(keys.len(), 20);
    assert!(keys.iter().all(|(_, r)| r.answer.as_ref().is_some_and(|a| a.status == 201)), "answers kept");
    let recovered = log.recover(&label("b:1"), 0).await.expect("recovery reads the encrypted history");
    assert_eq!(recovered.upto_seq, Some(19));
    log.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A start without the key, or with another key only, is refused with one line naming the flag and the key id
/// (not a panic, not a silent drop); with the old key kept below a new one (rotation) it opens, new records
/// are sealed with the new key, and once both are there neither can go.
#[tokio::test]
async fn a_missing_key_refuses_the_start_and_rotation_keeps_the_old_key() {
    let dir = temp_dir("rotate");
    store_secrets(&dir, Some(keyring(&[KEY_1])), 0..3).await;
    let id_1 = seal::KeyId::of(&KEY_1).to_string();
    let id_2 = seal::KeyId::of(&KEY_2).to_string();

    for (keys, needle) in [(None, "no key file is given"), (Some(keyring(&[KEY_2])), "which test-keys does not hold")] {
        let err = DiskLog::open(&dir, LIMITS, keys).err().expect("refused");
        let line = err.to_string();
        assert!(matches!(err, LogError::Sealed(_)), "{line}");
        assert!(line.starts_with("--encryption-key-file (ENCRYPTION_KEY_FILE): "), "{line}");
        assert!(line.contains(needle) && line.contains(&id_1) && !line.contains('\n'), "{line}");
    }

    store_secrets(&dir, Some(keyring(&[KEY_2, KEY_1])), 3..6).await;
    let files = files_under(&dir);
    let segment = &files.iter().find(|(p, _)| p.extension().is_some_and(|e| e == "seg")).expect("a segment").1;
    assert!(holds(segment, &seal::KeyId::of(&KEY_2).0), "new records name the new key");
    let log = DiskLog::open(&dir, LIMITS, Some(keyring(&[KEY_2, KEY_1]))).expect("both keys open everything");
    assert_eq!(seqs(&log, "c:1").await, [0, 1, 2, 3, 4, 5]);
    log.close().await;
    for only in [KEY_1, KEY_2] {
        let err = DiskLog::open(&dir, LIMITS, Some(keyring(&[only]))).err().expect("a key is missing");
        assert!(err.to_string().contains(if only == KEY_1 { &id_2 } else { &id_1 }), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes stored in clear before encryption was turned on are still read (the record's tag says which); they
/// stay in clear until the history drops them, and the writes after are sealed.
#[tokio::test]
async fn writes_stored_in_clear_are_read_once_encryption_is_on() {
    let dir = temp_dir("clear-then-sealed");
    store_secrets(&dir, None, 0..2).await;
    store_secrets(&dir, Some(keyring(&[KEY_1])), 2..4).await;
    let bytes: Vec<u8> = files_under(&dir).into_iter().flat_map(|(_, b)| b).collect();
    assert!(holds(&bytes, b"hunter2-1"), "written before the key: in clear");
    assert!(!holds(&bytes, b"hunter2-2") && !holds(&bytes, b"hunter2-3"), "written with the key: sealed");

    let log = DiskLog::open(&dir, LIMITS, Some(keyring(&[KEY_1]))).expect("opens");
    let loaded = log.pending(&label("a:1"), HashSet::new(), 100, None).await.expect("pending");
    let bodies: Vec<_> = loaded.iter().map(|l| l.delivery.body.clone()).collect();
    assert_eq!(bodies, (0..4).map(|s| secret_write(s).0.body).collect::<Vec<_>>());
    log.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Puts the process's umask back when dropped.
struct Umask(rustix::fs::Mode);

impl Umask {
    fn set(mode: rustix::fs::Mode) -> Self {
        Umask(rustix::process::umask(mode))
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        rustix::process::umask(self.0);
    }
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// Finding 4 of the attack runs: the outbox file was `0644` in a `0755` directory. Under a umask that takes
/// nothing away, every directory the store creates is `0700` and every file `0600` (a torn tail kept aside
/// included); a store left by an earlier version is tightened, and the operator's data directory is not
/// changed.
#[tokio::test]
async fn the_store_is_private_whatever_the_umask() {
    let data = temp_dir("modes");
    let dir = data.join("log");
    {
        let _umask = Umask::set(rustix::fs::Mode::empty());
        store_secrets(&dir, None, 0..2).await;
        // A crash's torn tail: garbage at the end of the last segment, kept aside at the next open.
        let segment = dir.join(format!("{:016x}.seg", 1));
        let mut file = std::fs::OpenOptions::new().append(true).open(&segment).expect("open");
        std::io::Write::write_all(&mut file, &[0xff; 16]).expect("append garbage");
        drop(file);
        store_secrets(&dir, None, 2..3).await;
    }
    let files = files_under(&data);
    assert!(files.iter().any(|(p, _)| p.to_string_lossy().contains(".seg.torn-")), "a torn tail kept aside");
    assert!(files.len() >= 2);
    for (path, _) in &files {
        assert_eq!(mode_of(path), 0o600, "{}", path.display());
    }
    assert_eq!(mode_of(&data), 0o700, "created by the store");
    assert_eq!(mode_of(&dir), 0o700);

    // An earlier version's store: loose modes on the operator's directory, the log's and its files.
    use std::os::unix::fs::PermissionsExt;
    let loose = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    loose(&data, 0o755);
    loose(&dir, 0o755);
    for (path, _) in &files {
        loose(path, 0o644);
    }
    DiskLog::open(&dir, LIMITS, None).expect("opens").close().await;
    assert_eq!(mode_of(&data), 0o755, "the operator's directory is left as it is");
    assert_eq!(mode_of(&dir), 0o700, "the log's own directory is tightened");
    for (path, _) in files_under(&dir) {
        assert_eq!(mode_of(&path), 0o600, "{}", path.display());
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// The encrypted record's tag is documented (docs/write-log.md section 7): the variant after the nine of earlier
/// versions, which keep theirs. Only records with client data are sealed.
#[test]
fn only_records_with_client_data_are_sealed_and_the_tag_is_the_documented_one() {
    use super::disk::{Codec, Record};
    let codec = Codec::new(Some(keyring(&[KEY_1])));
    let (w, record) = secret_write(1);
    let sealed = codec.encode(&Record::Append { id: 101, write: w, key: Some(("k".into(), record.clone())) });
    assert_eq!(sealed.expect("encodes")[0], 9);
    let answer = codec.encode(&Record::Answer { key: "k".into(), record }).expect("encodes");
    assert_eq!(answer[0], 9);
    let settle = Record::DropRefused { id: 101 };
    assert_eq!(codec.encode(&settle).expect("encodes"), Codec::default().encode(&settle).expect("encodes"));
    let counters = Record::Checkpoint { keys: Vec::new(), max_seq: Some(3), dropped_upto_ms: None };
    assert_eq!(codec.encode(&counters).expect("encodes")[0], 8, "a checkpoint of counters only stays in clear");
}
