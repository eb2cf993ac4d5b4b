//! The durable outbox across a crash: real `fanout` and `demo-backend` processes, a real outbox file, and
//! `kill -9` (docs/write-log.md section 4).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::procs;
use common::{eventually, sample};

const FAST: &[&str] = &["--initial-backoff", "50ms", "--max-backoff", "300ms", "--max-jitter", "10ms"];

/// Three demo backends on free ports, and their addresses.
fn three_backends() -> ([(procs::Proc, SocketAddr); 3], Vec<SocketAddr>) {
    let backends = [
        procs::demo_backend("server1", false),
        procs::demo_backend("server2", false),
        procs::demo_backend("server3", false),
    ];
    let addrs = backends.iter().map(|(_, a)| *a).collect();
    (backends, addrs)
}

/// Waits until the fanout with this metrics address has no delivery in flight.
async fn drained(metrics: SocketAddr, within: Duration, what: &str) {
    let metrics_url = format!("http://{metrics}/metrics");
    eventually(within, what, || async {
        let text = reqwest::get(&metrics_url).await.expect("scrape").text().await.expect("text");
        sample(&text, "fanout_deliveries_in_flight") == Some(0.0)
    })
    .await;
}

async fn users(addr: SocketAddr) -> demo_backend::UsersView {
    let text = reqwest::get(format!("http://{addr}/users")).await.expect("users").text().await.expect("text");
    serde_json::from_str(&text).expect("json")
}

/// 1000 writes accepted while server3 is down, then fanout is killed with SIGKILL. A new fanout on the same
/// outbox delivers every one of them once server3 is back: every backend ends with the same 1000 users, each
/// applied once (version 1: a write re-sent after the crash is absorbed by its Idempotency-Key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_pending_at_a_crash_are_delivered_after_a_restart() {
    let (mut backends, addrs) = three_backends();
    let outbox = common::temp_dir("restart-outbox");
    let outbox = outbox.to_str().expect("utf-8").to_owned();
    let (mut first, api, _) = procs::fanout_with_outbox(&addrs, FAST, &outbox);
    backends[2].0.kill();

    let mut tasks = Vec::new();
    for worker in 0..10 {
        let url = format!("http://{api}/register");
        tasks.push(tokio::spawn(async move {
            let c = common::client();
            for i in 0..100 {
                let resp = c
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(format!("username=crash-{worker}-{i}&password=pw{i}"))
                    .send()
                    .await
                    .expect("post");
                assert_eq!(resp.status(), 201);
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    first.kill(); // SIGKILL: no drain, nothing flushed on the way out

    let (_second, _, metrics) = procs::fanout_with_outbox(&addrs, FAST, &outbox);
    backends[2] = procs::demo_backend_on("server3", false, addrs[2].port());
    drained(metrics, Duration::from_secs(60), "the resumed deliveries drained").await;
    let views = [users(addrs[0]).await.users, users(addrs[1]).await.users, users(addrs[2]).await.users];
    assert_eq!(views[2].len(), 1000, "server3 got every write accepted while it was down");
    assert_eq!(views[0], views[1]);
    assert_eq!(views[0], views[2]);
    assert!(views[0].iter().all(|u| u.version == 1), "no write applied twice");
}

#[test]
fn an_unwritable_data_dir_stops_fanout_at_start_with_one_line() {
    let out = std::process::Command::new(procs::fanout_bin())
        .env_clear()
        .args(["--listen", "127.0.0.1:0", "--metrics-port", "0", "--backends", "a:1", "--data-dir", "/proc/no-outbox"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--data-dir (DATA_DIR) /proc/no-outbox"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// The store of earlier versions (`outbox.redb`) is not read any more: rather than start beside it and leave
/// what it holds undelivered without a word, fanout refuses to start and says what to do.
#[test]
fn an_outbox_file_of_an_earlier_version_stops_fanout_at_start_with_one_line() {
    let dir = common::temp_dir("old-outbox");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("outbox.redb"), b"an earlier version's store").expect("write");
    let out = std::process::Command::new(procs::fanout_bin())
        .env_clear()
        .args(["--listen", "127.0.0.1:0", "--metrics-port", "0", "--backends", "a:1", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("holds outbox.redb from an earlier version"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!dir.join("log").exists(), "nothing was created beside it");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that repeats a keyed write after fanout restarted still gets the original answer: the key's record
/// is stored with the write and reloaded at start.
#[tokio::test]
async fn an_idempotency_key_is_recognised_after_a_restart() {
    let (_backends, addrs) = three_backends(); // kept alive until the end
    let outbox = common::temp_dir("replay-outbox");
    let outbox = outbox.to_str().expect("utf-8").to_owned();
    let send = |api: SocketAddr| async move {
        common::client()
            .post(format!("http://{api}/register"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("idempotency-key", "restart-key-1")
            .body("username=replayed&password=pw")
            .send()
            .await
            .expect("post")
    };
    let (mut first, api, _) = procs::fanout_with_outbox(&addrs, FAST, &outbox);
    let original = send(api).await;
    assert_eq!(original.status(), 201);
    let id = original.headers()["x-delivery-id"].to_str().expect("id").to_owned();
    let status = first.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");

    let (_second, api, admin) = procs::fanout_with_outbox(&addrs, FAST, &outbox);
    let replay = send(api).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["x-delivery-id"], id.as_str());
    assert!(users(addrs[0]).await.users.iter().all(|u| u.version == 1));
    // The delivery finished before the restart and is still known after it (the admin port names the backends).
    let summary: serde_json::Value =
        reqwest::get(format!("http://{admin}/deliveries/{id}")).await.expect("get").json().await.expect("json");
    assert_eq!(summary["state"], "delivered", "{summary}");
    let backends: Vec<&str> =
        summary["backends"].as_array().expect("array").iter().filter_map(|b| b["backend"].as_str()).collect();
    let expected: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    assert_eq!(backends, expected, "in pool order");
}

/// A small tmpfs, unmounted (lazily) on drop: a real file system that really fills up.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = common::temp_dir("small-disk");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.to_str().expect("utf-8")])
            .status()
            .expect("run mount");
        assert!(status.success(), "this test mounts a small tmpfs to fill a disk for real: it needs root");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// When the outbox cannot store a write (here: its disk is full), the client gets 503 and no backend gets the
/// write; fanout keeps running.
#[tokio::test]
async fn a_write_that_cannot_be_stored_gets_503_and_is_sent_nowhere() {
    let disk = SmallDisk::mount("1m");
    let (backends, addrs) = three_backends();
    let (_fanout, api, _) = procs::fanout_with_outbox(&addrs, FAST, disk.0.to_str().expect("utf-8"));
    // With server3 down, every accepted write stays in the outbox, until the disk is full.
    let mut backends = backends;
    backends[2].0.kill();
    let filler = "x".repeat(60 * 1024);
    let mut refused = None;
    for i in 0..100 {
        let resp =
            common::post_form(&format!("http://{api}/register"), &format!("username=fill{i}&password={filler}")).await;
        match resp.status().as_u16() {
            201 => continue,
            503 => {
                let body: serde_json::Value = resp.json().await.expect("json error");
                assert!(body["error"].as_str().expect("message").contains("could not be stored"), "{body}");
                refused = Some(format!("fill{i}"));
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let refused = refused.expect("the 1 MiB disk filled up within 100 writes of 60 KiB");
    for addr in &addrs[..2] {
        assert!(users(*addr).await.users.iter().all(|u| u.username != refused), "{refused} reached {addr}");
    }
    let health = reqwest::get(format!("http://{api}/healthz")).await.expect("still up");
    assert_eq!(health.status(), 200);

    // Found by an attack run: one failed write used to close the store for good. Once there is room again, the
    // store is reopened and writes are accepted without a restart.
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m", disk.0.to_str().expect("utf-8")])
        .status()
        .expect("remount");
    assert!(status.success());
    // (After a failure the log waits up to a second before it tries the disk again.)
    common::eventually(Duration::from_secs(30), "a write is stored again", || async {
        common::post_form(&format!("http://{api}/register"), "username=after-room&password=pw").await.status() == 201
    })
    .await;
    assert_eq!(reqwest::get(format!("http://{api}/readyz")).await.expect("readyz").status(), 200);
}

/// Found by an attack run: on a full disk every refused write logged several lines and reopened the store, and
/// `/readyz` said ready while the disk still had no room. Now: not ready until a record is really stored again
/// (with or without clients: the log probes on its own), a few lines a second however many writes are refused,
/// every refusal counted.
#[tokio::test]
async fn a_full_disk_keeps_readyz_down_logs_a_few_lines_and_comes_back_on_its_own() {
    let disk = SmallDisk::mount("1m");
    let (mut backends, addrs) = three_backends();
    let (mut fanout, api, admin) = procs::fanout_with_outbox(&addrs, FAST, disk.0.to_str().expect("utf-8"));
    backends[2].0.kill();
    let filler = "x".repeat(60 * 1024);
    let mut i = 0;
    loop {
        i += 1;
        assert!(i < 100, "the 1 MiB disk filled up within 100 writes of 60 KiB");
        let form = format!("username=fill{i}&password={filler}");
        if common::post_form(&format!("http://{api}/register"), &form).await.status() == 503 {
            break;
        }
    }
    let started = tokio::time::Instant::now();
    // Hundreds of refused writes (as large: a small one may still fit), from eight clients at once.
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let clients = (0..8).map(|c| {
        let refused = refused.clone();
        let filler = filler.clone();
        tokio::spawn(async move {
            for n in 0..50 {
                let form = format!("username=more{c}-{n}&password={filler}");
                let status = common::post_form(&format!("http://{api}/register"), &form).await.status();
                assert_eq!(status, 503, "a write was accepted on a full disk");
                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    });
    for c in clients {
        c.await.expect("client");
    }
    // Not ready, and still not ready after the log's periodic probes have had their chance (3 of them).
    for _ in 0..4 {
        assert_eq!(reqwest::get(format!("http://{api}/readyz")).await.expect("readyz").status(), 503);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    let text = reqwest::get(format!("http://{admin}/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(common::sample(&text, "fanout_store_failures_total") >= Some(refused as f64), "{refused} refused");
    let elapsed = started.elapsed().as_secs() + 1;
    let lines = fanout.all_lines(Duration::from_millis(500));
    let noisy =
        lines.iter().filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\"")).count() as u64;
    // Two kinds of line (the refused writes, the log's failures), each at most once a second, and a margin.
    assert!(noisy <= 2 * elapsed + 4, "{noisy} warning/error lines in {elapsed} s for {refused} refused writes");

    // Room again: ready without any client write (the probe stored a record), then writes go through.
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m", disk.0.to_str().expect("utf-8")])
        .status()
        .expect("remount");
    assert!(status.success());
    common::eventually(Duration::from_secs(30), "ready again", || async {
        reqwest::get(format!("http://{api}/readyz")).await.expect("readyz").status() == 200
    })
    .await;
    let again = common::post_form(&format!("http://{api}/register"), "username=after-room&password=pw").await;
    assert_eq!(again.status(), 201);
}

async fn write_all(api: SocketAddr, forms: Vec<(String, String)>) {
    let c = common::client();
    for (path, form) in forms {
        let resp = c
            .post(format!("http://{api}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 201);
    }
}

/// Found by an attack run: pending rows were matched to backends by their place in --backends, so a restart
/// with the pool reordered sent writes to the wrong backends (and lost them for the right one).
#[tokio::test]
async fn a_restart_with_the_pool_reordered_still_delivers_to_the_right_backend() {
    let (mut backends, addrs) = three_backends();
    let outbox = common::temp_dir("reorder-outbox");
    let outbox = outbox.to_str().expect("utf-8").to_owned();
    let (mut first, api, _) = procs::fanout_with_outbox(&addrs, FAST, &outbox);
    backends[2].0.kill();
    write_all(api, (0..5).map(|i| ("/register".to_owned(), format!("username=ro{i}&password=pw"))).collect()).await;
    first.kill();
    backends[2] = procs::demo_backend_on("server3", false, addrs[2].port());
    let reordered = [addrs[2], addrs[0], addrs[1]];
    let (_second, _, metrics) = procs::fanout_with_outbox(&reordered, FAST, &outbox);
    drained(metrics, Duration::from_secs(30), "drained").await;
    assert_eq!(users(addrs[2]).await.count, 5, "server3 got all five, wherever it stands in --backends");
}

/// Found by an attack run: at a restart with a backlog larger than --max-in-flight, later deliveries of a user
/// could hold every in-flight permit while waiting for an earlier one of the same user that had none: a stall.
#[tokio::test]
async fn a_backlog_larger_than_the_in_flight_bound_resumes_without_stalling() {
    let (mut backends, addrs) = three_backends();
    let outbox = common::temp_dir("backlog-outbox");
    let outbox = outbox.to_str().expect("utf-8").to_owned();
    let (mut first, api, _) = procs::fanout_with_outbox(&addrs, FAST, &outbox);
    backends[2].0.kill();
    let mut forms = vec![("/register".to_owned(), "username=one-user&password=p0".to_owned())];
    forms.extend((1..60).map(|i| ("/changePassword".to_owned(), format!("username=one-user&password=p{i}"))));
    forms.extend((0..40).map(|i| ("/register".to_owned(), format!("username=other{}&password=p{i}", i % 5))));
    write_all(api, forms).await;
    first.kill();
    backends[2] = procs::demo_backend_on("server3", false, addrs[2].port());
    let args = [FAST, &["--max-in-flight", "3"]].concat();
    let (_second, _, metrics) = procs::fanout_with_outbox(&addrs, &args, &outbox);
    drained(metrics, Duration::from_secs(60), "the backlog drained through 3 permits").await;
    let views = [users(addrs[0]).await.users, users(addrs[2]).await.users];
    assert_eq!(views[0], views[1], "server3 caught up, in order");
}
