//! Backend health and retry discipline over real HTTP (README "Backend health"): the circuit
//! breaker during an outage, dead letters and their redrive on the admin port, and the retry budget. Replicas
//! and fanout run in this process on `127.0.0.1:0`; attempts are counted at the replicas.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{Fanout, eventually, fanout, post_form, replica, replicas, sample};
use demo_backend::Settings;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn admin(lb: &Fanout, path: &str) -> String {
    format!("http://{}{path}", lb.metrics)
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.expect("get").json().await.expect("json")
}

async fn metric(lb: &Fanout, series: &str) -> Option<f64> {
    sample(&lb.metrics_text().await, series)
}

/// Sends `users` register + changePassword pairs (see [`common::write_users`]); returns how many got `201`.
async fn register_and_change(lb: &Fanout, prefix: &str, users: usize, concurrency: usize) -> usize {
    common::write_users(lb.api, (0..users).map(|i| format!("{prefix}{i}")), &["first", "second"], concurrency).await
}

/// A backend down while 10,000 writes pile up for it. It gets the breaker's probes, not one retry loop per
/// write; fanout's memory stays flat as the backlog grows; once it is back, its queue drains and it holds exactly
/// what the others hold (each user's last password).
///
/// Only what does not depend on this machine's speed is asserted here: the exact probe schedule over an hour is
/// the paused-clock test `queue::tests::an_hour_long_outage_costs_only_probes_then_the_queue_drains_in_order`.
/// (An earlier version counted probes against a compressed real-time schedule and failed on a loaded machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_down_under_load_gets_only_probes_then_drains_in_order() {
    let pool = replicas(3).await;
    let down = &pool[2].backend;
    down.set_down(Some(StatusCode::SERVICE_UNAVAILABLE));
    let args = ["--initial-backoff", "100ms", "--max-backoff", "1s", "--max-jitter", "0s"];
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &args).await;
    let outage = tokio::time::Instant::now();

    assert_eq!(register_and_change(&lb, "warm", 500, 32).await, 1000);
    let rss_after_1k = rss_kib();
    assert_eq!(register_and_change(&lb, "u", 4500, 32).await, 9000);
    let rss_after_10k = rss_kib();
    let label = pool[2].label();
    let pending = metric(&lb, &format!("fanout_pending_deliveries{{backend=\"{label}\"}}")).await;
    assert_eq!(pending, Some(10_000.0), "every write waits for the down backend");
    assert_eq!(metric(&lb, &format!("fanout_breaker_state{{backend=\"{label}\"}}")).await, Some(1.0));

    let attempts_during_outage = down.writes_received();
    // Read after the count, so that it bounds the time the count covers. A `503` is an answer, so the failure
    // rate opens the breaker: 20 failed attempts in its window (--breaker-min-requests), plus what was already on
    // the wire (at most --backend-concurrency), then at most one probe per second (the capped schedule). Without
    // the breaker every one of the 10,000 writes would have had an attempt or more.
    let elapsed = outage.elapsed().as_secs();
    let allowed = 20 + 64 + 5 + elapsed;
    assert!(
        attempts_during_outage <= allowed,
        "{attempts_during_outage} attempts reached the down backend in {elapsed} s; the breaker allows {allowed}"
    );
    // 9,000 more pending writes cost little: they wait on disk; memory holds a window of each queue, and the
    // store's page cache (32 MiB at most) fills. (The old design, one task per pending write, took 6 KiB each.)
    let growth_mib = rss_after_10k.saturating_sub(rss_after_1k) / 1024;
    eprintln!(
        "outage: {attempts_during_outage} attempts in {elapsed} s; RSS {} MiB after 1k pending, {} MiB after 10k",
        rss_after_1k / 1024,
        rss_after_10k / 1024
    );
    assert!(growth_mib < 48, "RSS grew {growth_mib} MiB for 9,000 more pending writes");

    down.set_down(None);
    eventually(WAIT, "the backlog drained", || async {
        metric(&lb, &format!("fanout_pending_deliveries{{backend=\"{label}\"}}")).await == Some(0.0)
            && metric(&lb, "fanout_deliveries_in_flight").await == Some(0.0)
    })
    .await;
    assert_eq!(metric(&lb, &format!("fanout_breaker_state{{backend=\"{label}\"}}")).await, Some(0.0));
    let reference = pool[0].backend.users();
    assert_eq!(reference.count, 5000);
    assert!(reference.users.iter().all(|u| u.version == 2));
    assert_eq!(pool[2].backend.users().users, reference.users, "the recovered backend holds the same passwords");
    lb.stop().await;
}

/// Resident memory of this process (the test, its replicas and fanout), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn a_write_a_backend_rejects_is_a_dead_letter_at_once_and_redrive_delivers_it() {
    let pool = replicas(3).await;
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &[]).await;
    let picky = pool[1].label();
    pool[1].backend.fail_next(&[StatusCode::BAD_REQUEST]);
    let resp = post_form(&lb.url("/register"), "username=refused&password=pw").await;
    assert_eq!(resp.status(), StatusCode::CREATED, "the other backends took it");
    let id = resp.headers()["x-delivery-id"].to_str().expect("id").to_owned();
    // Another user's write is not held back by the dead letter.
    assert_eq!(post_form(&lb.url("/register"), "username=other&password=pw").await.status(), StatusCode::CREATED);
    eventually(WAIT, "the other user reached the picky backend", || async {
        pool[1].backend.users().users.iter().any(|u| u.username == "other")
    })
    .await;

    let list = get_json(&admin(&lb, "/dead-letters")).await;
    assert_eq!(list["count"], 1, "{list}");
    let dl = &list["dead_letters"][0];
    assert_eq!(dl["delivery_id"], id.as_str());
    assert_eq!(dl["backend"], picky.as_str());
    assert_eq!(dl["reason"], "rejected");
    assert_eq!(dl["attempts"], 1, "a permanent failure is not retried");
    assert_eq!(dl["last_status"], 400);
    assert_eq!(dl["path"], "/register");
    assert_eq!(metric(&lb, &format!("fanout_dead_letters{{backend=\"{picky}\"}}")).await, Some(1.0));
    let summary = get_json(&lb.url(&format!("/deliveries/{id}"))).await;
    assert_eq!(summary["state"], "failed");
    assert_eq!(summary["backends"][1]["state"], "dead_letter");

    // The admin routes are not on the API port, and bad input changes nothing.
    let on_api = reqwest::get(lb.url("/dead-letters")).await.expect("get");
    assert_eq!(on_api.status(), StatusCode::NOT_FOUND);
    let client = common::admin_client();
    let unknown = client.post(admin(&lb, "/dead-letters/redrive?backend=nowhere:1")).send().await.expect("post");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let bad = reqwest::get(admin(&lb, "/dead-letters?limit=many")).await.expect("get");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let not_dead = client
        .post(admin(&lb, "/dead-letters/0190a1b2-0000-7000-8000-000000000000/redrive"))
        .send()
        .await
        .expect("post");
    assert_eq!(not_dead.status(), StatusCode::NOT_FOUND);
    assert_eq!(get_json(&admin(&lb, "/dead-letters")).await["count"], 1);

    // The backend is fixed (fail_next is spent): redrive delivers it.
    let redrive = client.post(admin(&lb, &format!("/dead-letters/{id}/redrive"))).send().await.expect("post");
    assert_eq!(redrive.status(), StatusCode::OK);
    assert_eq!(redrive.json::<Value>().await.expect("json")["redriven"], 1);
    eventually(WAIT, "the redriven write was delivered", || async {
        pool[1].backend.users().users.iter().any(|u| u.username == "refused")
    })
    .await;
    assert_eq!(get_json(&admin(&lb, "/dead-letters")).await["count"], 0);
    eventually(WAIT, "the delivery is complete", || async {
        get_json(&lb.url(&format!("/deliveries/{id}"))).await["state"] == "delivered"
    })
    .await;
    assert_eq!(metric(&lb, &format!("fanout_dead_letters{{backend=\"{picky}\"}}")).await, Some(0.0));
    assert_eq!(
        metric(&lb, &format!("fanout_dead_letters_total{{backend=\"{picky}\",reason=\"rejected\"}}")).await,
        Some(1.0)
    );

    // A dead letter that will never be wanted is deleted for good; its delivery is then finished.
    pool[1].backend.fail_next(&[StatusCode::BAD_REQUEST]);
    let resp = post_form(&lb.url("/register"), "username=unwanted&password=pw").await;
    let unwanted = resp.headers()["x-delivery-id"].to_str().expect("id").to_owned();
    eventually(WAIT, "a second dead letter", || async { get_json(&admin(&lb, "/dead-letters")).await["count"] == 1 })
        .await;
    let bulk = client.delete(admin(&lb, "/dead-letters")).send().await.expect("delete");
    assert_eq!(bulk.status(), StatusCode::BAD_REQUEST, "a bulk delete must name its backend");
    let gone = client.delete(admin(&lb, &format!("/dead-letters/{unwanted}"))).send().await.expect("delete");
    assert_eq!(gone.json::<Value>().await.expect("json")["discarded"], 1);
    let again = client.delete(admin(&lb, &format!("/dead-letters/{unwanted}"))).send().await.expect("delete");
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    assert_eq!(get_json(&admin(&lb, "/dead-letters")).await["count"], 0);
    assert_eq!(metric(&lb, &format!("fanout_dead_letters{{backend=\"{picky}\"}}")).await, Some(0.0));
    assert_eq!(metric(&lb, "fanout_deliveries_in_flight").await, Some(0.0), "nothing left unfinished");
    lb.stop().await;
}

#[tokio::test]
async fn exhausted_attempts_are_dead_letters_the_list_and_metrics_agree_and_redrive_keeps_order() {
    let pool = replicas(3).await;
    let label = pool[2].label();
    pool[2].backend.set_down(Some(StatusCode::SERVICE_UNAVAILABLE));
    let args = ["--max-attempts", "3", "--breaker-failures", "0"];
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &args).await;
    assert_eq!(register_and_change(&lb, "d", 3, 1).await, 6);
    eventually(WAIT, "six dead letters", || async {
        get_json(&admin(&lb, &format!("/dead-letters?backend={label}"))).await["count"] == 6
    })
    .await;
    let list = get_json(&admin(&lb, &format!("/dead-letters?backend={label}&limit=2"))).await;
    assert_eq!(list["count"], 2, "limit applies");
    assert_eq!(list["total"], 6, "the total is every dead letter of the backend, not the page's size");
    assert_eq!(get_json(&admin(&lb, "/dead-letters?limit=1")).await["total"], 6, "every backend's");
    let list = get_json(&admin(&lb, &format!("/dead-letters?backend={label}"))).await;
    for dl in list["dead_letters"].as_array().expect("array") {
        assert_eq!(dl["reason"], "exhausted", "{dl}");
        assert_eq!(dl["attempts"], 3);
        assert_eq!(dl["last_status"], 503);
    }
    assert_eq!(get_json(&admin(&lb, &format!("/dead-letters?backend={}", pool[0].label()))).await["count"], 0);
    assert_eq!(metric(&lb, &format!("fanout_dead_letters{{backend=\"{label}\"}}")).await, Some(6.0));
    assert_eq!(
        metric(&lb, &format!("fanout_dead_letters_total{{backend=\"{label}\",reason=\"exhausted\"}}")).await,
        Some(6.0)
    );
    assert_eq!(pool[2].backend.writes_received(), 18, "3 attempts each, no more");

    pool[2].backend.set_down(None);
    let client = common::admin_client();
    let redrive =
        client.post(admin(&lb, &format!("/dead-letters/redrive?backend={label}"))).send().await.expect("post");
    assert_eq!(redrive.json::<Value>().await.expect("json")["redriven"], 6);
    eventually(WAIT, "redriven writes delivered", || async {
        metric(&lb, &format!("fanout_pending_deliveries{{backend=\"{label}\"}}")).await == Some(0.0)
            && metric(&lb, "fanout_deliveries_in_flight").await == Some(0.0)
    })
    .await;
    // Redriven in their original order: each user's changePassword after its register, so the same passwords.
    assert_eq!(pool[2].backend.users().users, pool[0].backend.users().users);
    assert_eq!(metric(&lb, &format!("fanout_dead_letters{{backend=\"{label}\"}}")).await, Some(0.0));
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_retries_to_a_half_failing_backend_stay_within_the_budget() {
    let mut pool = replicas(2).await;
    let flaky = Settings { skip_some_requests: true, skip_probability: 0.5, ..Settings::for_test("server3") };
    pool.push(replica(flaky).await);
    let label = pool[2].label();
    // Without the breaker, which would otherwise pause the queue now and then (5 failures in a row).
    let args = ["--breaker-failures", "0", "--retry-budget-ratio", "0.2", "--retry-budget-min-per-sec", "10"];
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &args).await;
    let started = tokio::time::Instant::now();
    assert_eq!(register_and_change(&lb, "b", 500, 32).await, 1000);
    let received = pool[2].backend.writes_received();
    let retries = metric(&lb, &format!("fanout_retries_total{{backend=\"{label}\"}}")).await.expect("series");
    // Read after the counts, so that it bounds the time they cover whatever this machine's speed (an earlier
    // version read it before them and failed on a loaded machine, where retries went on in between).
    let elapsed = started.elapsed().as_secs_f64();
    // Tower's TpsBudget: 20% of the first attempts of the last 10 s, plus a reserve of 10/s (with 10 s of it
    // available at the start).
    let budget = 0.2 * 1000.0 + 10.0 * (elapsed + 10.0);
    assert!(
        received as f64 - 1000.0 <= budget + 1.0 && retries <= budget + 1.0,
        "{received} attempts for 1000 writes ({retries} retries) in {elapsed:.1} s; the budget allows {budget}"
    );
    // The healthy backends are not held back. Under `--ack first` a write is answered once one backend has it,
    // so the other healthy one may still be finishing its last writes (a loaded machine showed 492 of 500).
    eventually(WAIT, "the healthy backends have every user", || async {
        pool[0].backend.users().count == 500 && pool[1].backend.users().count == 500
    })
    .await;
    lb.stop().await;
}

/// Found by an attack run: writes every backend refuses (a password change for an unknown user) stayed as dead
/// letters and counted as unfinished, so a client could fill `--max-pending` with bad input and every later
/// write got `503`, even after a restart. A write refused everywhere was applied nowhere: its dead letters go.
#[tokio::test]
async fn writes_every_backend_refuses_leave_nothing_behind_and_cannot_fill_the_bound() {
    let pool = replicas(3).await;
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &["--max-pending", "5"]).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let resp = post_form(&lb.url("/changePassword"), &format!("username=nobody{i}&password=x")).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "the backends' own answer is passed back");
        ids.push(resp.headers()["x-delivery-id"].to_str().expect("id").to_owned());
    }
    eventually(WAIT, "nothing unfinished", || async { metric(&lb, "fanout_deliveries_in_flight").await == Some(0.0) })
        .await;
    assert_eq!(get_json(&admin(&lb, "/dead-letters")).await["count"], 0);
    for p in &pool {
        assert_eq!(metric(&lb, &format!("fanout_dead_letters{{backend=\"{}\"}}", p.label())).await, Some(0.0));
    }
    let resp = post_form(&lb.url("/register"), "username=real&password=pw").await;
    assert_eq!(resp.status(), StatusCode::CREATED, "the bound is not held by refused writes");
    // Found by a second attack run: the delivery could no longer be looked up once its dead letters went.
    let summary = get_json(&lb.url(&format!("/deliveries/{}", ids[0]))).await;
    assert_eq!(summary["state"], "refused", "{summary}");
    assert_eq!(summary["backends"][2]["status"], 404);
    lb.stop().await;
}
