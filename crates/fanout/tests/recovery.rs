//! Recovering a backend that lost its state, over real HTTP (docs/write-log.md section 5): three demo replicas
//! and fanout in this process on `127.0.0.1:0`; one replica is restarted empty, then recovered from fanout's
//! history with `POST /recoveries` on the admin port. What is asserted does not depend on this machine's speed:
//! the replicas' final state, compared user by user.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use common::{Fanout, Replica, eventually, fanout, replicas, restart, sample};
use demo_backend::Settings;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn admin(lb: &Fanout, path: &str) -> String {
    format!("http://{}{path}", lb.metrics)
}

/// `passwords` for users `user{i}` of `users` (see [`common::write_users`]).
async fn write_users(api: SocketAddr, users: std::ops::Range<usize>, passwords: &[&str], concurrency: usize) -> usize {
    common::write_users(api, users.map(|i| format!("user{i}")), passwords, concurrency).await
}

async fn drained(lb: &Fanout) {
    eventually(WAIT, "every delivery finished", || async {
        sample(&lb.metrics_text().await, "fanout_deliveries_in_flight") == Some(0.0)
    })
    .await;
}

/// Starts a recovery of `replica` since `since`; returns its first status.
async fn recover(lb: &Fanout, replica: &Replica, since: &str) -> Value {
    let url = admin(lb, &format!("/recoveries?backend={}&since={since}", replica.label()));
    let resp = common::admin_client().post(url).send().await.expect("post");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    resp.json().await.expect("json")
}

async fn recovery_done(lb: &Fanout) {
    eventually(WAIT, "the recovery is done", || async {
        let list: Value = reqwest::get(admin(lb, "/recoveries")).await.expect("get").json().await.expect("json");
        list["recoveries"].as_array().is_some_and(|r| !r.is_empty() && r.iter().all(|r| r["state"] == "done"))
    })
    .await;
    drained(lb).await;
}

/// 500 users with register + changePassword; one backend restarts empty;
/// recovered since the start it holds exactly what the others hold, and applied nothing twice (every user at
/// version 2, as on the others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_lost_its_state_is_recovered_from_the_history() {
    let mut pool = replicas(3).await;
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &[]).await;
    assert_eq!(write_users(lb.api, 0..500, &["first", "second"], 32).await, 1000);
    drained(&lb).await;
    let lost = pool.pop().expect("server3");
    let fresh = restart(lost, Settings::for_test("server3")).await;
    assert_eq!(fresh.backend.users().count, 0, "it came back empty");
    pool.push(fresh);

    let status = recover(&lb, &pool[2], "1h").await;
    assert_eq!(status["backend"], pool[2].label());
    assert_eq!(status["queued"], 1000, "{status}");
    assert_eq!(status["complete"], true, "{status}");
    recovery_done(&lb).await;

    let reference = pool[0].backend.users();
    assert_eq!(reference.count, 500);
    assert!(reference.users.iter().all(|u| u.version == 2), "nothing applied twice on the others");
    assert_eq!(pool[1].backend.users().users, reference.users);
    assert_eq!(pool[2].backend.users().users, reference.users, "the recovered backend holds the same, once each");
    let text = lb.metrics_text().await;
    let label = pool[2].label();
    assert_eq!(sample(&text, &format!("fanout_recovered_writes_total{{backend=\"{label}\"}}")), Some(1000.0));
    assert_eq!(sample(&text, &format!("fanout_recovery_remaining{{backend=\"{label}\"}}")), Some(0.0));
    assert!(sample(&text, "fanout_history_bytes").is_some_and(|b| b > 0.0));
    lb.stop().await;
}

/// The same while new writes keep arriving, including password changes of the
/// users being recovered. On the recovering backend a user's new write never overtakes its recovered ones, so
/// each user's last password wins everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_writes_during_a_recovery_never_overtake_the_recovered_ones() {
    let mut pool = replicas(3).await;
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &[]).await;
    assert_eq!(write_users(lb.api, 0..500, &["first", "second"], 32).await, 1000);
    drained(&lb).await;
    let lost = pool.pop().expect("server3");
    pool.push(restart(lost, Settings::for_test("server3")).await);

    // New writes start before the recovery and go on while it runs: a third password for every user, and new
    // users.
    let api = lb.api;
    let writer = tokio::spawn(async move {
        let changed = write_users(api, 0..500, &["third"], 16).await;
        let added = write_users(api, 500..600, &["first", "second"], 16).await;
        changed + added
    });
    let status = recover(&lb, &pool[2], "1h").await;
    assert_eq!(status["complete"], true, "{status}");
    assert_eq!(writer.await.expect("writer"), 700);
    recovery_done(&lb).await;

    let reference = pool[0].backend.users();
    assert_eq!(reference.count, 600);
    for u in &reference.users {
        let n: usize = u.username.trim_start_matches("user").parse().expect("n");
        assert_eq!(u.version, if n < 500 { 3 } else { 2 }, "{u:?}");
    }
    assert_eq!(pool[1].backend.users().users, reference.users);
    assert_eq!(
        pool[2].backend.users().users,
        reference.users,
        "the recovered backend holds every user's last password, each write applied once"
    );
    lb.stop().await;
}
