//! The NATS JetStream store end to end (README "Scaling out"): real `nats-server` processes clustered on loopback,
//! three `fanout` processes on one store, real nginx over them, demo backends as processes. They fail with a clear
//! message when nats-server or nginx is missing; they never skip.
//!
//! - Under load through nginx, one fanout instance and one NATS node are killed for good (`SIGKILL`): every write
//!   answered `201`/`202` is on every backend, each user's password and version agree everywhere (nothing lost,
//!   nothing applied twice), and no consumer holds anything afterwards.
//! - A key replayed through another instance gets the original answer; with another body, `422`.
//! - A backend that refuses every write is probed, not hammered (attempts counted by the backend itself), and
//!   catches up once it serves again.
//!
//! Every wait is a condition polled against a generous deadline; nothing asserts how fast this machine is.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::procs::{self, NatsNode, Prefix, Proc};
use common::{ADMIN_TOKEN, eventually, sample};
use demo_backend::UsersView;
use demo_backend::control::FaultsView;

/// Partitions in these tests: fewer consumers than the default, for a quicker three-node start.
const PARTITIONS: &str = "4";

/// One demo backend process with its control port.
struct Backend {
    _proc: Proc,
    addr: SocketAddr,
    control: SocketAddr,
}

fn backend(name: &str, flaky: bool) -> Backend {
    let control_port = procs::free_port().to_string();
    let mut proc = procs::spawn(
        name,
        &procs::demo_backend_bin(),
        &["--host", "127.0.0.1", "--port", "0", "--log-format", "json", "--control-port", &control_port],
        &[("SERVER_NAME", name), ("SKIP_SOME_REQUESTS", if flaky { "true" } else { "false" })],
    );
    let fields = proc.wait_for_log("demo backend listening", Duration::from_secs(20));
    let addr = fields["addr"].as_str().expect("addr").parse().expect("addr");
    let control = format!("127.0.0.1:{control_port}").parse().expect("addr");
    Backend { _proc: proc, addr, control }
}

/// One fanout instance on the NATS store.
struct Instance {
    proc: Proc,
    api: SocketAddr,
    metrics: SocketAddr,
}

fn instance(name: &str, pool: &[SocketAddr], nats: &[NatsNode], replicas: usize, extra: &[&str]) -> Instance {
    let pool = pool.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let store = nats.iter().map(|n| n.url.clone()).collect::<Vec<_>>().join(",");
    let data_dir = common::temp_dir("nats-instance");
    let replicas = replicas.to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--metrics-port",
        "0",
        "--log-format",
        "json",
        "--store",
        &store,
        "--store-replicas",
        &replicas,
        "--partitions",
        PARTITIONS,
        "--instance",
        name,
    ];
    args.extend_from_slice(extra);
    let mut proc = procs::spawn(
        name,
        &procs::fanout_bin(),
        &args,
        &[("BACKEND_POOL", &pool), ("DATA_DIR", data_dir.to_str().expect("utf-8")), ("ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    let fields = proc.wait_for_log("fanout listening", Duration::from_secs(60));
    Instance {
        api: fields["api"].as_str().expect("api").parse().expect("addr"),
        metrics: fields["metrics"].as_str().expect("metrics").parse().expect("addr"),
        proc,
    }
}

/// Posts a form body to `url`; panics when no answer comes.
async fn post_form(c: &reqwest::Client, url: String, body: impl Into<reqwest::Body>) -> reqwest::Response {
    c.post(url).header("content-type", "application/x-www-form-urlencoded").body(body).send().await.expect("write")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).no_proxy().build().expect("client")
}

async fn users(c: &reqwest::Client, b: &Backend) -> UsersView {
    c.get(format!("http://{}/users", b.addr)).send().await.expect("users").json().await.expect("users json")
}

async fn control(c: &reqwest::Client, b: &Backend, action: &str) -> FaultsView {
    let url = format!("http://{}{action}", b.control);
    let r = if action == "/" { c.get(url).send().await } else { c.post(url).send().await };
    r.expect("control").json().await.expect("control json")
}

/// The sum of `fanout_pending_deliveries` (consumer lag) over the pool, as `instance` reports it.
async fn lag(c: &reqwest::Client, instance: &Instance) -> Option<f64> {
    let text = c.get(format!("http://{}/metrics", instance.metrics)).send().await.ok()?.text().await.ok()?;
    let mut total = 0.0;
    for line in text.lines().filter(|l| l.starts_with("fanout_pending_deliveries{")) {
        total += line.rsplit(' ').next()?.parse::<f64>().ok()?;
    }
    Some(total)
}

/// Every consumer of `FANOUT_WRITES` as the NATS servers themselves report it (their monitoring endpoints, not
/// fanout), each as its leader sees it (a follower's copy may lag): (name, writes not yet handed out, writes
/// handed out and not acked).
async fn consumers(c: &reqwest::Client, nodes: &[NatsNode]) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for node in nodes {
        let url = format!("http://{}/jsz?accounts=true&streams=true&consumers=true", node.monitor);
        let Ok(r) = c.get(url).send().await else { continue };
        let jsz: serde_json::Value = r.json().await.unwrap_or_default();
        for account in jsz["account_details"].as_array().into_iter().flatten() {
            for stream in account["stream_detail"].as_array().into_iter().flatten() {
                if stream["name"] != "FANOUT_WRITES" {
                    continue;
                }
                for consumer in stream["consumer_detail"].as_array().into_iter().flatten() {
                    // A single server has no cluster block: it is the leader of everything.
                    let leader = consumer["cluster"]["leader"].as_str().unwrap_or(&node.name);
                    if leader != node.name {
                        continue;
                    }
                    out.push((
                        consumer["name"].as_str().unwrap_or_default().to_owned(),
                        consumer["num_pending"].as_u64().unwrap_or(u64::MAX),
                        consumer["num_ack_pending"].as_u64().unwrap_or(u64::MAX),
                    ));
                }
            }
        }
    }
    out.sort();
    out
}

/// Waits until every consumer of the pool is empty, as their leaders report them (and there are `expected`).
async fn drained(c: &reqwest::Client, nodes: &[NatsNode], expected: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(DRAIN_SECS);
    loop {
        let list = consumers(c, nodes).await;
        if list.len() == expected && list.iter().all(|(_, pending, ack_pending)| *pending == 0 && *ack_pending == 0) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "consumers not drained within {DRAIN_SECS} s: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long the consumers get to drain once the load is over.
const DRAIN_SECS: u64 = 180;

/// How one user's writes went at the client.
#[derive(Debug, Default, Clone)]
struct UserLog {
    /// Per write (0 = register, 1..=5 = password changes): the status the client got (0: no answer).
    statuses: Vec<u16>,
}

const CHANGES: usize = 5;

fn password(user: usize, write: usize) -> String {
    format!("pw-{user}-{write}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_a_three_node_cluster_lose_nothing_when_an_instance_and_a_node_die() {
    let nats = procs::nats_cluster(3);
    let backends = [backend("server1", false), backend("server2", false), backend("server3", true)];
    let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let fast = ["--initial-backoff", "50ms", "--max-backoff", "500ms", "--attempt-timeout", "2s"];
    let mut instances: Vec<Instance> = (1..=3).map(|i| instance(&format!("f{i}"), &pool, &nats, 3, &fast)).collect();
    let lb = instances.iter().map(|i| i.api.to_string()).collect::<Vec<_>>().join(",");
    let lb_metrics = instances.iter().map(|i| i.metrics.to_string()).collect::<Vec<_>>().join(",");
    let (_nginx, _prefix, nginx): (Proc, Prefix, SocketAddr) =
        procs::nginx_over([pool[0], pool[1], pool[2]], &lb, &lb_metrics);

    const USERS: usize = 90;
    const CLIENTS: usize = 15;
    let c = client();
    let logs: Arc<std::sync::Mutex<HashMap<usize, UserLog>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (c, logs, next, finished) = (c.clone(), logs.clone(), next.clone(), finished.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let user = next.fetch_add(1, Ordering::SeqCst);
                if user >= USERS {
                    return;
                }
                let mut log = UserLog::default();
                for write in 0..=CHANGES {
                    let route = if write == 0 { "register" } else { "changePassword" };
                    let form = format!("username=user{user}&password={}", password(user, write));
                    let status = c
                        .post(format!("http://{nginx}/{route}"))
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(form)
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16());
                    log.statuses.push(status);
                }
                logs.lock().unwrap().insert(user, log);
                finished.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // A third of the users through: one fanout instance and one NATS node die for good.
    eventually(Duration::from_secs(120), "a third of the users written", || {
        let finished = finished.clone();
        async move { finished.load(Ordering::SeqCst) >= USERS / 3 }
    })
    .await;
    let mut dead_instance = instances.remove(1);
    dead_instance.proc.kill();
    let mut nats = nats;
    let mut dead_node = nats.remove(2);
    dead_node.proc.kill();

    for client in clients {
        client.await.expect("client task");
    }
    let logs = logs.lock().unwrap().clone();
    assert_eq!(logs.len(), USERS);
    let answered: usize = logs.values().flat_map(|l| &l.statuses).filter(|s| matches!(s, 201 | 202)).count();
    let mut by_status: std::collections::BTreeMap<u16, usize> = Default::default();
    for s in logs.values().flat_map(|l| &l.statuses) {
        *by_status.entry(*s).or_default() += 1;
    }
    if answered < USERS * (CHANGES + 1) / 2 {
        for i in &mut instances {
            let lines = i.proc.all_lines(Duration::from_millis(200));
            let errors: Vec<&String> =
                lines.iter().filter(|l| l.contains("ERROR") || l.contains("WARN")).take(8).collect();
            eprintln!("{}: {errors:#?}", i.proc.name);
        }
        panic!("most writes must have been answered: {by_status:?}");
    }

    // Nothing waits in any consumer, as a surviving NATS node reports them, and the instances agree.
    let consumers_expected = 3 * PARTITIONS.parse::<usize>().unwrap();
    drained(&c, &nats, consumers_expected).await;
    for survivor in &instances {
        eventually(Duration::from_secs(30), "the instances see the consumers drained", || {
            let c = c.clone();
            async move { lag(&c, survivor).await == Some(0.0) }
        })
        .await;
    }
    let views: Vec<UsersView> = {
        let mut v = Vec::new();
        for b in &backends {
            v.push(users(&c, b).await);
        }
        v
    };
    for user in 0..USERS {
        let name = format!("user{user}");
        let log = &logs[&user];
        let on: Vec<_> = views.iter().map(|v| v.users.iter().find(|u| u.username == name).cloned()).collect();
        let first = on[0].clone();
        for (i, u) in on.iter().enumerate() {
            assert_eq!(u, &first, "{name}: backend {} differs from backend 1 ({log:?})", i + 1);
        }
        let acked: Vec<usize> = (0..=CHANGES).filter(|w| matches!(log.statuses[*w], 201 | 202)).collect();
        let Some(u) = first else {
            assert!(acked.is_empty(), "{name}: answered {acked:?} but on no backend");
            continue;
        };
        // Applied once each: the version counts the writes applied, at most the six sent, at least those answered.
        assert!(u.version as usize <= CHANGES + 1, "{name}: version {} > writes sent: applied twice", u.version);
        assert!(u.version as usize >= acked.len(), "{name}: version {} < writes answered {acked:?}", u.version);
        if acked.len() == CHANGES + 1 {
            assert_eq!(u.version as usize, CHANGES + 1, "{name}: every write answered, so every write applied once");
        }
        // The password is that of the last write answered, or of a later one that was stored unanswered.
        let last_acked = acked.last().copied().unwrap_or(0);
        let mut holds = None;
        for write in (0..=CHANGES).rev() {
            let url = format!("http://{}/login?username={name}&password={}", backends[0].addr, password(user, write));
            if c.get(url).send().await.expect("login").status().is_success() {
                holds = Some(write);
                break;
            }
        }
        let holds = holds.unwrap_or_else(|| panic!("{name}: no password sent logs in on backend 1"));
        assert!(holds >= last_acked, "{name}: holds write {holds}, older than the last answered {last_acked}");
    }

    // Dead letters: none (the flaky backend's drops are retried).
    for survivor in &instances {
        let text = c.get(format!("http://{}/metrics", survivor.metrics)).send().await.unwrap().text().await.unwrap();
        for b in &pool {
            let dead = sample(&text, &format!("fanout_dead_letters{{backend=\"{b}\"}}"));
            assert_eq!(dead, Some(0.0), "no dead letter on {b}");
        }
    }
    drop(dead_node);
    drop(dead_instance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_replayed_through_another_instance_gets_the_original_answer() {
    let nats = procs::nats_cluster(1);
    let backends = [backend("server1", false), backend("server2", false), backend("server3", false)];
    let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let a = instance("ra", &pool, &nats, 1, &[]);
    let b = instance("rb", &pool, &nats, 1, &[]);
    let c = client();
    let post = |api: SocketAddr, body: &'static str| {
        c.post(format!("http://{api}/register"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("idempotency-key", "replay-key-1")
            .body(body)
            .send()
    };
    let first = post(a.api, "username=replayed&password=one").await.expect("first");
    assert_eq!(first.status(), 201);
    let id = first.headers()["x-delivery-id"].to_str().unwrap().to_owned();
    let body = first.text().await.unwrap();

    let again = post(b.api, "username=replayed&password=one").await.expect("replay");
    assert_eq!(again.status(), 201, "the original answer, through the other instance");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["x-delivery-id"].to_str().unwrap(), id);
    assert_eq!(again.text().await.unwrap(), body);

    let other = post(b.api, "username=replayed&password=two").await.expect("conflict");
    assert_eq!(other.status(), 422, "the same key with another body");
    for be in &backends {
        let u = users(&c, be).await;
        let user = u.users.iter().find(|u| u.username == "replayed").expect("registered");
        assert_eq!(user.version, 1, "applied once on {}", be.addr);
    }
    // The delivery, looked up on the instance that did not take it.
    let view: serde_json::Value =
        c.get(format!("http://{}/deliveries/{id}", b.metrics)).send().await.unwrap().json().await.unwrap();
    assert_eq!(view["state"], "delivered", "{view}");
    assert_eq!(view["backends"].as_array().map(Vec::len), Some(3), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusing_every_write_is_probed_not_hammered_and_catches_up() {
    let nats = procs::nats_cluster(1);
    let backends = [backend("server1", false), backend("server2", false), backend("server3", false)];
    let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let settings = [
        "--initial-backoff",
        "200ms",
        "--max-backoff",
        "2s",
        "--probe-interval-max",
        "1s",
        "--breaker-min-requests",
        "5",
    ];
    let instances: Vec<Instance> = (1..=2).map(|i| instance(&format!("p{i}"), &pool, &nats, 1, &settings)).collect();
    let c = client();
    let down = &backends[2];
    assert_eq!(control(&c, down, "/flaky?share=1").await.mode, "flaky");
    let started = tokio::time::Instant::now();

    const WRITES: usize = 400;
    for i in 0..WRITES {
        let api = instances[i % instances.len()].api;
        let r = post_form(&c, format!("http://{api}/register"), format!("username=probe{i}&password=p{i}")).await;
        assert_eq!(r.status(), 201, "acked by the healthy backends (ack first)");
    }
    // Both instances opened their breaker for it.
    for i in &instances {
        eventually(Duration::from_secs(60), "breaker open", || {
            let c = c.clone();
            async move {
                let text = c.get(format!("http://{}/metrics", i.metrics)).send().await.unwrap().text().await.unwrap();
                sample(&text, &format!("fanout_breaker_state{{backend=\"{}\"}}", down.addr)).is_some_and(|s| s != 0.0)
            }
        })
        .await;
    }
    // The console's state shows it too: this instance's breaker open, the store's lag behind it.
    let state: serde_json::Value =
        c.get(format!("http://{}/console/api/state", instances[0].metrics)).send().await.unwrap().json().await.unwrap();
    let shown = &state["backends"][2];
    assert_eq!(shown["backend"], down.addr.to_string(), "{state}");
    assert_ne!(shown["breaker"], "closed", "{state}");
    assert!(shown["attempts"].as_u64().unwrap_or(0) > 0, "{state}");
    let received = control(&c, down, "/").await.writes_received;
    let elapsed = started.elapsed();
    // Per instance: until its breaker opens, at most --breaker-min-requests (5) attempts plus one per partition on
    // the wire; then one probe at a time, at most one per --initial-backoff (200ms) since the start.
    let probes = (elapsed.as_millis() / 200) as u64 + 1;
    let bound = 2 * (5 + PARTITIONS.parse::<u64>().unwrap() + probes);
    assert!(received <= bound, "{received} attempts reached the refusing backend in {elapsed:?}; at most {bound}");
    assert!(bound < WRITES as u64, "the bound must be below what retrying every write would send");

    let before = consumers(&c, &nats).await;
    let waiting: u64 = before.iter().map(|(_, pending, ack_pending)| pending + ack_pending).sum();
    assert!(waiting > 0, "the refused writes wait in the backend's consumers: {before:?}");

    assert_eq!(control(&c, down, "/up").await.mode, "up");
    eventually(Duration::from_secs(120), "the backend caught up", || {
        let c = c.clone();
        async move { users(&c, down).await.count == WRITES }
    })
    .await;
    drained(&c, &nats, 3 * PARTITIONS.parse::<usize>().unwrap()).await;
}

/// Runs `fanout` on `store` until it exits (it must refuse to start); returns its stderr.
fn refused(store: &str, extra: &[&str]) -> String {
    let mut args =
        vec!["--listen", "127.0.0.1:0", "--metrics-port", "0", "--backends", "127.0.0.1:1", "--store", store];
    args.extend_from_slice(extra);
    let out = std::process::Command::new(procs::fanout_bin()).args(&args).env_clear().output().expect("run fanout");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_refuses_to_start_with_one_line_naming_the_flag() {
    // Nothing listens there.
    let nobody = format!("nats://127.0.0.1:{}", procs::free_port());
    let stderr = refused(&nobody, &[]);
    assert!(stderr.starts_with("fanout: --store (STORE): cannot reach"), "{stderr}");

    // A server without JetStream.
    let port = procs::free_port().to_string();
    let mut plain = procs::spawn("nats-plain", &procs::nats_server_bin(), &["-a", "127.0.0.1", "-p", &port], &[]);
    plain.wait_for_line("Server is ready", Duration::from_secs(20));
    let stderr = refused(&format!("nats://127.0.0.1:{port}"), &[]);
    assert!(stderr.contains("--store (STORE): JetStream is not available"), "{stderr}");

    // Streams made for another partition count.
    let nats = procs::nats_cluster(1);
    let pool = [backend("server1", false).addr];
    let _first = instance("pa", &pool, &nats, 1, &[]);
    let stderr = refused(&nats[0].url, &["--partitions", "8"]);
    assert!(stderr.contains(&format!("--partitions (PARTITIONS) must be {PARTITIONS}")), "{stderr}");
}

async fn admin_call(c: &reqwest::Client, method: reqwest::Method, url: String) -> serde_json::Value {
    let r = c.request(method, url).bearer_auth(ADMIN_TOKEN).send().await.expect("admin call");
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.expect("admin json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_redriven_and_deleted_from_any_instance() {
    let nats = procs::nats_cluster(1);
    let backends = [backend("server1", false), backend("server2", false), backend("server3", false)];
    let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let quick =
        ["--max-attempts", "3", "--breaker-failures", "0", "--initial-backoff", "10ms", "--max-backoff", "40ms"];
    let a = instance("da", &pool, &nats, 1, &quick);
    let b = instance("db", &pool, &nats, 1, &quick);
    let c = client();
    let refusing = &backends[2];
    // A write every backend refuses (a password change for a user nobody has): its client gets their answer,
    // and it leaves no dead letter anywhere (it was applied nowhere).
    let r = post_form(&c, format!("http://{}/changePassword", a.api), "username=nobody&password=p").await;
    assert_eq!(r.status(), 404, "passed back");
    let nobody = r.headers()["x-delivery-id"].to_str().unwrap().to_owned();
    eventually(Duration::from_secs(30), "refused everywhere, its dead letters dropped", || {
        let (c, url) = (c.clone(), format!("http://{}/deliveries/{nobody}", b.metrics));
        async move {
            let v: serde_json::Value = c.get(url).send().await.unwrap().json().await.unwrap();
            v["state"] == "refused"
        }
    })
    .await;
    let all: serde_json::Value =
        c.get(format!("http://{}/dead-letters", b.metrics)).send().await.unwrap().json().await.unwrap();
    assert_eq!(all["total"], 0, "{all}");

    control(&c, refusing, "/flaky?share=1").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = post_form(&c, format!("http://{}/register", a.api), format!("username=dead{i}&password=p")).await;
        assert_eq!(r.status(), 201);
        ids.push(r.headers()["x-delivery-id"].to_str().unwrap().to_owned());
    }
    // Listed by the instance that did not take them.
    let list_url = format!("http://{}/dead-letters?backend={}", b.metrics, refusing.addr);
    eventually(Duration::from_secs(60), "three dead letters", || {
        let (c, url) = (c.clone(), list_url.clone());
        async move {
            let v: serde_json::Value = c.get(url).send().await.unwrap().json().await.unwrap();
            v["total"] == 3 && v["count"] == 3
        }
    })
    .await;
    control(&c, refusing, "/up").await;

    // Redriven through one instance, deleted through the other.
    let redriven = admin_call(
        &c,
        reqwest::Method::POST,
        format!("http://{}/dead-letters/{}/redrive?backend={}", b.metrics, ids[0], refusing.addr),
    )
    .await;
    assert_eq!(redriven["redriven"], 1);
    let discarded = admin_call(
        &c,
        reqwest::Method::DELETE,
        format!("http://{}/dead-letters/{}?backend={}", a.metrics, ids[1], refusing.addr),
    )
    .await;
    assert_eq!(discarded["discarded"], 1);
    eventually(Duration::from_secs(60), "the redriven write delivered", || {
        let c = c.clone();
        async move { users(&c, refusing).await.users.iter().any(|u| u.username == "dead0") }
    })
    .await;
    let names: Vec<String> = users(&c, refusing).await.users.into_iter().map(|u| u.username).collect();
    assert_eq!(names, ["dead0"], "the deleted one and the one left are not there");
    let v: serde_json::Value = c.get(&list_url).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["dead_letters"][0]["delivery_id"], ids[2], "{v}");
    // Each one's part, as any instance shows it.
    for (id, state) in [(&ids[0], "delivered"), (&ids[1], "discarded"), (&ids[2], "dead_letter")] {
        let view: serde_json::Value =
            c.get(format!("http://{}/deliveries/{id}", a.metrics)).send().await.unwrap().json().await.unwrap();
        let part = view["backends"].as_array().unwrap().iter().find(|p| p["backend"] == refusing.addr.to_string());
        assert_eq!(part.map(|p| p["state"].clone()), Some(serde_json::json!(state)), "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_lost_its_state_is_recovered_from_the_stream() {
    let nats = procs::nats_cluster(1);
    let backends = [backend("server1", false), backend("server2", false), backend("server3", false)];
    let pool: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let a = instance("ca", &pool, &nats, 1, &[]);
    let b = instance("cb", &pool, &nats, 1, &[]);
    let c = client();
    for i in 0..20 {
        let api = if i % 2 == 0 { a.api } else { b.api };
        for (route, pw) in [("register", "one"), ("changePassword", "two")] {
            let r = post_form(&c, format!("http://{api}/{route}"), format!("username=rec{i}&password={pw}")).await;
            assert_eq!(r.status(), 201);
        }
    }
    let lost = &backends[2];
    eventually(Duration::from_secs(60), "every backend has the users", || {
        let c = c.clone();
        async move { users(&c, lost).await.users.iter().filter(|u| u.version == 2).count() == 20 }
    })
    .await;
    assert_eq!(control(&c, lost, "/wipe").await.users, 0);

    let status = admin_call(
        &c,
        reqwest::Method::POST,
        format!("http://{}/recoveries?backend={}&since=1h", b.metrics, lost.addr),
    )
    .await;
    assert_eq!(status["backend"], lost.addr.to_string(), "{status}");
    eventually(Duration::from_secs(60), "the backend recovered", || {
        let c = c.clone();
        async move { users(&c, lost).await.users.iter().filter(|u| u.version == 2).count() == 20 }
    })
    .await;
    // In order: each user's last password is the second one.
    for i in 0..20 {
        let url = format!("http://{}/login?username=rec{i}&password=two", lost.addr);
        assert!(c.get(url).send().await.unwrap().status().is_success(), "rec{i} holds its last password");
    }
    let others = users(&c, &backends[0]).await;
    assert!(others.users.iter().all(|u| u.version == 2), "the other backends got nothing twice");

    // A recovery from a later time than writes the backend still waits for keeps them (found by an attack run:
    // the consumers were made again from `since`, and the waiting writes before it were dropped unseen).
    control(&c, lost, "/down").await;
    for i in 0..3 {
        let r = post_form(&c, format!("http://{}/register", a.api), format!("username=waiting{i}&password=p")).await;
        assert_eq!(r.status(), 201);
    }
    // Older than the recovery's `since` (1 s before it starts).
    tokio::time::sleep(Duration::from_secs(2)).await;
    admin_call(&c, reqwest::Method::POST, format!("http://{}/recoveries?backend={}&since=1s", a.metrics, lost.addr))
        .await;
    control(&c, lost, "/up").await;
    eventually(Duration::from_secs(60), "the waiting writes delivered after the recovery", || {
        let c = c.clone();
        async move { users(&c, lost).await.users.iter().filter(|u| u.username.starts_with("waiting")).count() == 3 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_a_longer_attempt_timeout_raises_the_consumers_ack_wait() {
    let nats = procs::nats_cluster(1);
    let pool = [backend("server1", false).addr];
    let _short = instance("wa", &pool, &nats, 1, &["--attempt-timeout", "2s"]);
    let _long = instance("wb", &pool, &nats, 1, &["--attempt-timeout", "20s"]);
    let _short_again = instance("wc", &pool, &nats, 1, &["--attempt-timeout", "2s"]);
    let c = client();
    let url = format!("http://{}/jsz?accounts=true&streams=true&consumers=true&config=true", nats[0].monitor);
    let jsz: serde_json::Value = c.get(url).send().await.unwrap().json().await.unwrap();
    let waits: Vec<u64> = jsz["account_details"][0]["stream_detail"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "FANOUT_WRITES")
        .flat_map(|s| {
            s["consumer_detail"].as_array().unwrap().iter().map(|c| c["config"]["ack_wait"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(waits.len(), PARTITIONS.parse::<usize>().unwrap(), "{jsz}");
    // --attempt-timeout 20s plus the 10 s margin, kept when a shorter one starts again.
    assert!(waits.iter().all(|w| *w == 30_000_000_000), "{waits:?}");
}
