//! The circuit breaker over real HTTP (README "Backend health"; issue 14, finding 9): a backend that drops one
//! write in five under load never opens it, while a dead one (refused connections) opens it within a few attempts
//! and, once back, gets its queue within `--probe-interval-max` however long the outage was. Replicas and fanout
//! run in this process on `127.0.0.1:0`. What is asserted comes from fanout's metrics and the replicas' state;
//! the one time bound is derived from the configuration (the exact schedules are the paused-clock tests in
//! `breaker.rs` and `queue.rs`).

mod common;

use std::time::Duration;

use common::{Fanout, Replica, eventually, fanout, replica, replicas, sample};
use demo_backend::Settings;

const WAIT: Duration = Duration::from_secs(60);

async fn metric(lb: &Fanout, series: &str) -> Option<f64> {
    sample(&lb.metrics_text().await, series)
}

async fn opens(lb: &Fanout, backend: &str, reason: &str) -> Option<f64> {
    metric(lb, &format!("fanout_breaker_opens_total{{backend=\"{backend}\",reason=\"{reason}\"}}")).await
}

/// Waits until `backend`'s queue is empty and no delivery is unfinished.
async fn drained(lb: &Fanout, backend: &str) {
    eventually(WAIT, "the queues drained", || async {
        metric(lb, &format!("fanout_pending_deliveries{{backend=\"{backend}\"}}")).await == Some(0.0)
            && metric(lb, "fanout_deliveries_in_flight").await == Some(0.0)
    })
    .await;
}

/// A 20 %-flaky backend (the demo backend's `SKIP_PROBABILITY=0.2`, which answers `500` to one write in five)
/// under 600 writes, 32 clients at a time. Before, any three `500`s in a row (with `--breaker-failures 3`: about
/// six runs expected in this many attempts) opened the breaker and paused the queue. A `500` is an answer: it
/// counts only towards the failure rate, far below `--breaker-failure-rate` (0.8), so the breaker never opens,
/// and the retries deliver every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dropping_one_write_in_five_under_load_never_opens_its_breaker() {
    let mut pool = replicas(2).await;
    let flaky = Settings { skip_some_requests: true, skip_probability: 0.2, ..Settings::for_test("server3") };
    pool.push(replica(flaky).await);
    let label = pool[2].label();
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &["--breaker-failures", "3"]).await;
    let users = 300;
    let ok = common::write_users(lb.api, (0..users).map(|i| format!("f{i}")), &["first", "second"], 32).await;
    assert_eq!(ok, 2 * users);
    drained(&lb, &label).await;

    let failed = metric(&lb, &format!("target_domain_failed_counter_total{{domain=\"{label}\"}}")).await;
    let failed = failed.expect("series");
    assert!(failed >= 30.0, "the backend dropped writes: {failed} failed attempts");
    assert_eq!(opens(&lb, &label, "no_answer").await, Some(0.0));
    assert_eq!(opens(&lb, &label, "failure_rate").await, Some(0.0));
    assert_eq!(metric(&lb, &format!("fanout_breaker_state{{backend=\"{label}\"}}")).await, Some(0.0));
    let reference = pool[0].backend.users();
    assert_eq!(reference.count, users);
    assert_eq!(pool[2].backend.users().users, reference.users, "every write reached the flaky backend, in order");
    lb.stop().await;
}

/// A backend that refuses connections while writes arrive: three attempts without an answer open its breaker
/// (`no_answer`), and with `--max-attempts` equal to `--breaker-failures` no write becomes a dead letter. After
/// 13 s down, the retry schedule (50 ms doubling, `--max-backoff` 60 s) would put the next probe 12.8 s after the
/// previous one; `--probe-interval-max 1s` caps it, so the first write reaches the backend at most
/// `probe-interval-max + max-jitter (0) + 2 x attempt-timeout` after it is back (a probe that failed just before
/// may still be on the wire, and the delivering attempt takes its time too): 5 s, where the uncapped schedule
/// would take up to 12.8 s. Then the whole queue drains, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_opens_its_breaker_quickly_and_is_noticed_within_the_probe_cap_once_back() {
    let mut pool = replicas(2).await;
    let dead: Replica = pool.pop().expect("two");
    let addr = dead.addr;
    let label = dead.label();
    let probe_cap = Duration::from_secs(1);
    let attempt_timeout = Duration::from_secs(2);
    let args = [
        "--initial-backoff",
        "50ms",
        "--max-backoff",
        "60s",
        "--max-jitter",
        "0s",
        "--probe-interval-max",
        "1s",
        "--attempt-timeout",
        "2s",
        "--breaker-failures",
        "3",
        "--max-attempts",
        "3",
    ];
    let lb = fanout(&[&pool[0], &dead], &args).await;
    drop(dead);
    eventually(WAIT, "the stopped backend refuses connections", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let down_since = tokio::time::Instant::now();

    let users = 50;
    let ok = common::write_users(lb.api, (0..users).map(|i| format!("d{i}")), &["first", "second"], 8).await;
    assert_eq!(ok, 2 * users, "the live backend acknowledges");
    eventually(WAIT, "the breaker opened", || async {
        metric(&lb, &format!("fanout_breaker_state{{backend=\"{label}\"}}")).await == Some(1.0)
    })
    .await;
    assert_eq!(opens(&lb, &label, "no_answer").await, Some(1.0), "refused connections: the no-answer rule");
    assert_eq!(opens(&lb, &label, "failure_rate").await, Some(0.0));

    // Long enough for the uncapped probe schedule to reach 12.8 s between probes.
    tokio::time::sleep(Duration::from_secs(13).saturating_sub(down_since.elapsed())).await;
    assert_eq!(metric(&lb, &format!("fanout_dead_letters{{backend=\"{label}\"}}")).await, Some(0.0));
    assert_eq!(
        metric(&lb, &format!("fanout_pending_deliveries{{backend=\"{label}\"}}")).await,
        Some(2.0 * users as f64),
        "every write waits for the dead backend"
    );

    let back = common::replica_at(addr, Settings::for_test("server2")).await;
    let returned = tokio::time::Instant::now();
    eventually(WAIT, "a write reached the backend", || async { back.backend.writes_received() > 0 }).await;
    let gap = returned.elapsed();
    let bound = probe_cap + 2 * attempt_timeout;
    eprintln!("the first write reached the returned backend {gap:?} after it was back (bound {bound:?})");
    assert!(gap <= bound, "the first write came {gap:?} after the backend was back; the probe cap allows {bound:?}");

    drained(&lb, &label).await;
    assert_eq!(metric(&lb, &format!("fanout_breaker_state{{backend=\"{label}\"}}")).await, Some(0.0));
    assert_eq!(
        metric(&lb, &format!("fanout_dead_letters_total{{backend=\"{label}\",reason=\"exhausted\"}}")).await,
        Some(0.0),
        "a down backend makes no dead letter"
    );
    assert_eq!(back.backend.users().users, pool[0].backend.users().users, "the same passwords, in order");
    lb.stop().await;
}
