//! End-to-end tests through real nginx: the `fanout` and `demo-backend` binaries as processes on port 0, nginx
//! rendered from `nginx/default.conf.template` by `nginx/render.sh` (what `make run` does) on a free loopback
//! port. They fail with a clear message when nginx is missing; they never skip.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use common::procs::{self, Prefix, Proc};
use common::{eventually, sample};
use demo_backend::UsersView;

/// A whole local stack: three backends (the third one flaky when asked), fanout and nginx.
struct Stack {
    backends: Vec<(Proc, SocketAddr)>,
    fanout: Proc,
    metrics: SocketAddr,
    _nginx: (Proc, Prefix),
    nginx: SocketAddr,
}

impl Stack {
    fn start(flaky_third: bool, fanout_args: &[&str]) -> Stack {
        let backends = vec![
            procs::demo_backend("server1", false),
            procs::demo_backend("server2", false),
            procs::demo_backend("server3", flaky_third),
        ];
        let addrs: Vec<SocketAddr> = backends.iter().map(|(_, a)| *a).collect();
        let (fanout, api, metrics) = procs::fanout(&addrs, fanout_args);
        let (nginx_proc, prefix, nginx) = procs::nginx([addrs[0], addrs[1], addrs[2]], api, metrics);
        Stack { backends, fanout, metrics, _nginx: (nginx_proc, prefix), nginx }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.nginx)
    }

    async fn users(&self, backend: SocketAddr) -> UsersView {
        let text = reqwest::get(format!("http://{backend}/users")).await.expect("users").text().await.expect("text");
        serde_json::from_str(&text).expect("users json")
    }
}

const FAST: &[&str] = &["--initial-backoff", "20ms", "--max-backoff", "200ms", "--max-jitter", "10ms"];

#[tokio::test]
async fn login_round_robins_over_every_backend() {
    let stack = Stack::start(false, FAST);
    let mut seen = BTreeSet::new();
    for _ in 0..9 {
        let resp = reqwest::get(stack.url("/login")).await.expect("login");
        assert_eq!(resp.status(), 200);
        seen.insert(resp.text().await.expect("text"));
    }
    let expected: BTreeSet<String> = (1..=3).map(|i| format!("logged in on server{i}\n")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn login_fails_over_when_a_backend_dies() {
    let mut stack = Stack::start(false, FAST);
    stack.backends[1].0.kill();
    for _ in 0..9 {
        let resp = reqwest::get(stack.url("/login")).await.expect("login");
        assert_eq!(resp.status(), 200, "nginx retries the next backend on a refused connection");
        assert_ne!(resp.text().await.expect("text"), "logged in on server2\n");
    }
}

#[tokio::test]
async fn the_originals_curl_lines_work_and_status_pages_answer() {
    let stack = Stack::start(false, FAST);
    let c = common::client();
    // curl localhost/login
    let login = c.get(stack.url("/login")).send().await.expect("login");
    assert_eq!(login.status(), 200);
    assert!(login.headers().contains_key("x-request-id"));
    // curl -X POST -d 'username=schef' -d 'password=example' localhost/register
    let register = common::post_form(&stack.url("/register"), "username=schef&password=example").await;
    assert_eq!(register.status(), 201);
    assert!(register.text().await.expect("text").starts_with("register on server"));
    // curl -X POST -d 'username=schef' -d 'password=example' http://localhost/changePassword
    let change = common::post_form(&stack.url("/changePassword"), "username=schef&password=example").await;
    assert_eq!(change.status(), 201);
    assert!(change.text().await.expect("text").starts_with("password changed on server"));

    let status = c.get(stack.url("/nginx_status")).send().await.expect("status").text().await.expect("text");
    assert!(status.starts_with("Active connections:"), "{status}");
    let metrics = c.get(stack.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("# TYPE target_domain_success_counter_total counter"), "{metrics}");
    let hint = c.get(stack.url("/")).send().await.expect("hint").text().await.expect("text");
    assert!(hint.starts_with("fanout:"), "{hint}");
    // The admin routes live on fanout's metrics port only: nginx sends /dead-letters to fanout's API, which
    // has no such route, so no one can redrive through the front door.
    let dead = c.get(stack.url("/dead-letters")).send().await.expect("dead letters");
    assert_eq!(dead.status(), 404);
    let redrive = c.post(stack.url("/dead-letters/redrive")).send().await.expect("redrive");
    assert_eq!(redrive.status(), 404);
    let direct = c.get(format!("http://{}/dead-letters", stack.metrics)).send().await.expect("direct");
    assert_eq!(direct.status(), 200);

    eventually(Duration::from_secs(10), "schef on every backend, version 2", || async {
        let mut ok = true;
        for (_, addr) in &stack.backends {
            let users = stack.users(*addr).await;
            ok &= users.users.len() == 1 && users.users[0].username == "schef" && users.users[0].version == 2;
        }
        ok
    })
    .await;
}

#[tokio::test]
async fn nginx_refuses_oversized_writes_with_the_same_limit_as_fanout() {
    // The template's client_max_body_size must equal fanout's default --max-body.
    let template = std::fs::read_to_string(procs::repo_root().join("nginx/default.conf.template")).expect("template");
    let limit = template
        .lines()
        .find_map(|l| l.trim().strip_prefix("client_max_body_size "))
        .and_then(|v| v.trim_end_matches(';').strip_suffix('k'))
        .and_then(|k| k.parse::<u64>().ok())
        .expect("client_max_body_size NNk in the template");
    let defaults = <fanout::Config as clap::Parser>::try_parse_from(["fanout"]).expect("defaults");
    assert_eq!(limit * 1024, defaults.max_body.as_u64());

    let stack = Stack::start(false, FAST);
    let big = format!("username=big&password={}", "x".repeat(70 * 1024));
    let resp = common::post_form(&stack.url("/register"), &big).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let error: serde_json::Value = resp.json().await.expect("a JSON error, like fanout's");
    assert!(error["error"].as_str().expect("message").contains("nothing was forwarded"), "{error}");
    for (_, addr) in &stack.backends {
        assert_eq!(stack.users(*addr).await.count, 0);
    }
}

/// Sends `workers` x `per_worker` writes through nginx, concurrently across workers and in order within one.
/// Every fourth write of a worker changes the password of the user it registered just before; the others
/// register new users. Returns the count of each status.
async fn write_load(stack: &Stack, workers: usize, per_worker: usize) -> HashMap<u16, u32> {
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let register = stack.url("/register");
        let change = stack.url("/changePassword");
        tasks.push(tokio::spawn(async move {
            let mut statuses = HashMap::new();
            for i in 0..per_worker {
                let (target, form) = if i % 4 == 3 {
                    (&change, format!("username=u{worker}-{}&password=changed{i}", i - 1))
                } else {
                    (&register, format!("username=u{worker}-{i}&password=p{i}"))
                };
                let status = common::post_form(target, &form).await.status().as_u16();
                *statuses.entry(status).or_insert(0) += 1;
            }
            statuses
        }));
    }
    let mut totals: HashMap<u16, u32> = HashMap::new();
    for t in tasks {
        for (status, n) in t.await.expect("join") {
            *totals.entry(status).or_insert(0) += n;
        }
    }
    totals
}

/// Waits until fanout reports no delivery in flight, checks that the flaky backend really dropped writes, and
/// returns every backend's users.
async fn drained_views(stack: &Stack) -> Vec<Vec<demo_backend::UserView>> {
    let metrics_url = format!("http://{}/metrics", stack.metrics);
    eventually(Duration::from_secs(60), "fanout reports nothing pending", || async {
        let text = reqwest::get(&metrics_url).await.expect("scrape").text().await.expect("text");
        sample(&text, "fanout_deliveries_in_flight") == Some(0.0)
    })
    .await;
    let text = reqwest::get(&metrics_url).await.expect("scrape").text().await.expect("text");
    let flaky = stack.backends[2].1;
    let failed = sample(&text, &format!("target_domain_failed_counter_total{{domain=\"{flaky}\"}}")).expect("series");
    assert!(failed > 0.0, "the flaky backend dropped some writes and they were retried");
    let mut views = Vec::new();
    for (_, addr) in &stack.backends {
        views.push(stack.users(*addr).await.users);
    }
    views
}

/// 200 writes through nginx with server3 dropping one in five, under `ack`: every write is acknowledged and,
/// once fanout has nothing pending, the three backends hold the same users with the same passwords.
async fn mixed_writes_converge(ack: &str) {
    let args = [FAST, &["--ack", ack]].concat();
    let stack = Stack::start(true, &args);
    let totals = write_load(&stack, 10, 20).await;
    assert_eq!(totals.get(&201), Some(&200), "every write acknowledged: {totals:?}");
    let views = drained_views(&stack).await;
    assert_eq!(views[0].len(), 150, "150 registered users, 50 of them changed");
    assert_eq!(views[0].iter().filter(|u| u.version == 2).count(), 50);
    assert_eq!(views[0], views[1], "server1 and server2 differ");
    assert_eq!(views[0], views[2], "server1 and the flaky server3 differ");
}

/// The hard case: under `first` a client sends its changePassword as soon as one backend took the register,
/// while the flaky backend may still be retrying that register; per-user ordering keeps them in order there.
#[tokio::test]
async fn two_hundred_mixed_writes_with_a_flaky_backend_converge_under_ack_first() {
    mixed_writes_converge("first").await;
}

#[tokio::test]
async fn two_hundred_mixed_writes_with_a_flaky_backend_converge_under_ack_all() {
    mixed_writes_converge("all").await;
}

/// SIGTERM with a delivery pending for a dead backend: fanout drains for --shutdown-timeout, then says where
/// the pending delivery is (the outbox, or lost when it runs in memory only).
async fn sigterm_with_a_pending_delivery(data_dir_args: &[&str], expected_log: &str) {
    let args = [FAST, &["--shutdown-timeout", "1s"], data_dir_args].concat();
    let mut stack = Stack::start(false, &args);
    stack.backends[2].0.kill(); // server3 is down: its deliveries stay pending
    let resp = common::post_form(&stack.url("/register"), "username=drain&password=pw").await;
    assert_eq!(resp.status(), 201);
    let status = stack.fanout.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    let fields = stack.fanout.wait_for_log(expected_log, Duration::from_secs(5));
    assert_eq!(fields["pending"], 1);
}

#[tokio::test]
async fn sigterm_drains_then_leaves_pending_deliveries_in_the_outbox() {
    sigterm_with_a_pending_delivery(
        &[],
        "deliveries still pending stay in the outbox and resume at the next start (dead letters included: see GET \
         /dead-letters on the admin port)",
    )
    .await;
}

#[tokio::test]
async fn sigterm_in_memory_mode_says_pending_deliveries_are_lost() {
    sigterm_with_a_pending_delivery(
        &["--no-outbox"],
        "deliveries still pending at exit are lost: their backends may miss these writes",
    )
    .await;
}

/// A long drain: in memory (`--no-outbox`) fanout drains its queues before exiting, and server3 is dead, so the
/// drain lasts the whole --shutdown-timeout. (With the outbox fanout stops at once when no client waits: the
/// backlog stays on disk, and there would be no drain to cut short.)
#[tokio::test]
async fn a_second_stop_signal_ends_the_drain_at_once() {
    let args = [FAST, &["--shutdown-timeout", "60s", "--no-outbox"]].concat();
    let mut stack = Stack::start(false, &args);
    stack.backends[2].0.kill();
    assert_eq!(common::post_form(&stack.url("/register"), "username=impatient&password=pw").await.status(), 201);
    stack.fanout.signal("TERM");
    stack.fanout.wait_for_log("shutting down: no new writes accepted", Duration::from_secs(5));
    stack.fanout.signal("INT");
    let status = stack.fanout.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{status:?}");
}

#[tokio::test]
async fn passwords_never_reach_a_log_even_in_a_query_string() {
    let mut stack = Stack::start(true, FAST);
    let secrets = ["BodySecret41", "QuerySecret99", "JsonSecret17"];
    let form = format!("username=logcheck&password={}", secrets[0]);
    assert_eq!(common::post_form(&stack.url("/register"), &form).await.status(), 201);
    // All three backends refuse this one (no body): a dead letter per backend, logged with its path.
    let query = format!("/register?username=qq&password={}", secrets[1]);
    assert_eq!(common::post_form(&stack.url(&query), "").await.status(), 400);
    let json = common::client()
        .post(stack.url("/changePassword"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"username":"logcheck","password":"{}"}}"#, secrets[2]))
        .send()
        .await
        .expect("post");
    assert_eq!(json.status(), 201);
    eventually(Duration::from_secs(10), "logcheck at version 2 everywhere", || async {
        let mut all = true;
        for (_, addr) in &stack.backends {
            all &= stack.users(*addr).await.users.iter().any(|u| u.username == "logcheck" && u.version == 2);
        }
        all
    })
    .await;
    let mut lines = Vec::new();
    stack.fanout.terminate(Duration::from_secs(10));
    lines.extend(stack.fanout.all_lines(Duration::from_secs(2)));
    for (p, _) in &mut stack.backends {
        p.kill();
        lines.extend(p.all_lines(Duration::from_secs(2)));
    }
    assert!(lines.iter().any(|l| l.contains("dead letter")), "the refused write was logged");
    for secret in secrets {
        assert!(!lines.iter().any(|l| l.contains(secret)), "{secret} appears in a log");
    }
}

/// Sends one raw HTTP/1.1 request (the path exactly as given, no client-side normalisation) and returns the
/// status and the whole answer.
async fn raw(addr: SocketAddr, method: &str, path: &str, extra_headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n{extra_headers}\r\n"
    );
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

fn body_of(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test]
async fn nginx_forwards_only_the_routes_it_means_to_whatever_the_encoding() {
    let args = [FAST, &["--max-attempts", "2", "--breaker-failures", "0"]].concat();
    let mut stack = Stack::start(false, &args);
    // A dead letter on the admin port (server3 is gone), which nothing below may list, redrive or delete.
    stack.backends[2].0.kill();
    let first = common::post_form(&stack.url("/register"), "username=keep&password=pw").await;
    assert_eq!(first.status(), 201);
    let dead_letters = format!("http://{}/dead-letters", stack.metrics);
    eventually(Duration::from_secs(30), "a dead letter", || async {
        let list: serde_json::Value = reqwest::get(&dead_letters).await.expect("get").json().await.expect("json");
        list["count"] == 1
    })
    .await;

    let attempts: &[(&str, &str)] = &[
        ("DELETE", "/dead-letters/..%2Fmetrics"),
        ("DELETE", "/metrics/..%2Fdead-letters?backend=x"),
        ("GET", "/metrics/..%2Fdead-letters"),
        ("GET", "/metrics%2F..%2Fdead-letters"),
        ("POST", "/metrics/../dead-letters/redrive"),
        ("GET", "/%2e%2e/dead-letters"),
        ("GET", "//dead-letters"),
        ("POST", "//dead-letters//redrive"),
        ("POST", "/recoveries?backend=x&since=1h"),
        ("POST", "/register/..%2F..%2Fdead-letters/redrive"),
        ("POST", "/register%2F..%2Fdead-letters%2Fredrive"),
        ("POST", "/changePassword/../dead-letters/redrive"),
        ("GET", "/login/..%2Fdead-letters"),
        ("GET", "/login%2F..%2F..%2Fdead-letters"),
        ("GET", "/deliveries/..%2F..%2Fdead-letters"),
        ("GET", "/deliveries/%2e%2e%2fdead-letters"),
        ("GET", "/deliveries/00000000-0000-0000-0000-000000000000/..%2F..%2Fdead-letters"),
        ("DELETE", "/deliveries/00000000-0000-7000-8000-000000000000"),
        ("GET", "/nginx_status/..%2Fdead-letters"),
        ("GET", "/./dead-letters"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    ];
    for (method, path) in attempts {
        let (status, answer) = raw(stack.nginx, method, path, "").await;
        let body = body_of(&answer);
        // Nothing from the admin routes: no list, no redrive, no delete, not even their "not found".
        for admin_word in ["dead_letters", "redriven", "discarded", "recoveries", "no dead letter", "recover"] {
            assert!(!body.contains(admin_word), "{method} {path} reached an admin route: {answer}");
        }
        if !(200..300).contains(&status) {
            let json: serde_json::Value =
                serde_json::from_str(body).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {answer}"));
            assert!(json["error"].is_string(), "{method} {path}: {answer}");
        } else {
            // Only what the location means: the metrics page (a path that normalises to /metrics).
            assert!(body.contains("# TYPE"), "{method} {path}: {answer}");
        }
    }
    let direct: serde_json::Value = reqwest::get(&dead_letters).await.expect("direct").json().await.expect("json");
    assert_eq!(direct["count"], 1, "the dead letter is still there: {direct}");

    // The API's delivery view passes, without backend addresses.
    let id = first.headers()["x-delivery-id"].to_str().expect("id").to_owned();
    let (status, answer) = raw(stack.nginx, "GET", &format!("/deliveries/{id}"), "").await;
    assert_eq!(status, 200, "{answer}");
    for (_, addr) in &stack.backends {
        assert!(!answer.contains(&addr.to_string()), "{answer}");
    }
}

#[tokio::test]
async fn every_answer_nginx_makes_on_its_own_is_json() {
    let mut stack = Stack::start(false, FAST);
    let huge = format!("X-Huge: {}\r\n", "h".repeat(64 * 1024));
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("GET", "/nope", String::new(), 404),
        ("PUT", "/login", String::new(), 403),
        // nginx's own code for this is 494; the client sees 400 (with the JSON saying why).
        ("GET", "/login", huge, 400),
        // Found by an attack run: nginx's own 501 was HTML.
        ("POST", "/register", "Transfer-Encoding: gzip\r\n".to_owned(), 501),
    ];
    for (method, path, headers, expected) in cases {
        let (status, answer) = raw(stack.nginx, method, path, &headers).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        assert!(answer.to_ascii_lowercase().contains("content-type: application/json"), "{answer}");
        let json: serde_json::Value = serde_json::from_str(body_of(&answer)).expect("json body");
        assert!(json["error"].is_string());
    }
    // fanout down: nginx's own 502 is JSON too.
    stack.fanout.kill();
    let resp = common::post_form(&stack.url("/register"), "username=late&password=pw").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let json: serde_json::Value = resp.json().await.expect("json");
    assert!(json["error"].as_str().expect("error").contains("not answering"), "{json}");
}
