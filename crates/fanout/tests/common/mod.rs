//! Shared harness of the integration tests: real demo backends and a real fanout service, in this process, each
//! on its own `127.0.0.1:0` listener, talking real HTTP. Config is injected (parsed from an argument list), never
//! read from a mutated environment; waits are conditions with deadlines.
#![allow(dead_code, missing_docs)]

pub mod procs;
pub mod webdriver;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use demo_backend::{DemoBackend, Settings};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One running demo replica.
pub struct Replica {
    pub backend: DemoBackend,
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Replica {
    pub fn label(&self) -> String {
        self.addr.to_string()
    }
}

pub async fn replica(settings: Settings) -> Replica {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind replica");
    let addr = listener.local_addr().expect("addr");
    let backend = DemoBackend::new(settings);
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(demo_backend::run(backend.clone(), listener, async move {
        let _ = rx.await;
    }));
    Replica { backend, addr, _stop: tx }
}

/// Stops `replica` and starts a fresh one on the same address: a backend that restarted and lost its state
/// (the demo backend keeps users in memory).
pub async fn restart(replica: Replica, settings: Settings) -> Replica {
    let addr = replica.addr;
    drop(replica);
    replica_at(addr, settings).await
}

/// A fresh replica on `addr`, waiting (up to 10 s) for the address to be free again once whatever had it stopped.
pub async fn replica_at(addr: SocketAddr, settings: Settings) -> Replica {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "cannot bind {addr} again: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let backend = DemoBackend::new(settings);
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(demo_backend::run(backend.clone(), listener, async move {
        let _ = rx.await;
    }));
    Replica { backend, addr, _stop: tx }
}

pub async fn replicas(n: usize) -> Vec<Replica> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(replica(Settings::for_test(&format!("server{i}"))).await);
    }
    out
}

/// One running fanout service.
pub struct Fanout {
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), fanout::RunError>>>,
}

impl Fanout {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics)).await.expect("scrape").text().await.expect("text")
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("run ok");
        }
    }
}

/// Millisecond backoffs so that retries finish quickly in tests that talk real HTTP (paused time cannot be used
/// with real sockets: the clock would jump past every attempt timeout while a request is on the wire).
pub const FAST: &[&str] = &["--initial-backoff", "10ms", "--max-backoff", "40ms", "--max-jitter", "0s"];

/// fanout with an admin token ([`ADMIN_TOKEN`], unless `extra` gives one).
pub async fn fanout(pool: &[&Replica], extra: &[&str]) -> Fanout {
    fanout_with(pool, extra, Some(ADMIN_TOKEN)).await
}

/// fanout with the admin token `token`, or none at all.
pub async fn fanout_with(pool: &[&Replica], extra: &[&str], token: Option<&str>) -> Fanout {
    let pool_arg = pool.iter().map(|r| r.label()).collect::<Vec<_>>().join(",");
    let data_dir = temp_dir("outbox");
    let data_arg = data_dir.to_str().expect("utf-8 temp dir").to_owned();
    let mut args = vec!["fanout", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--backends", &pool_arg];
    if !extra.contains(&"--data-dir") {
        args.extend_from_slice(&["--data-dir", &data_arg]);
    }
    // FAST's flags, unless the test sets them itself.
    for pair in FAST.chunks(2) {
        if !extra.contains(&pair[0]) {
            args.extend_from_slice(pair);
        }
    }
    if let Some(token) = token.filter(|_| !extra.contains(&"--admin-token") && !extra.contains(&"--admin-token-file")) {
        args.extend_from_slice(&["--admin-token", token]);
    }
    args.extend_from_slice(extra);
    let config = fanout::Config::try_parse_from(args).expect("test config parses");
    let api = TcpListener::bind("127.0.0.1:0").await.expect("bind api");
    let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
    let (api_addr, metrics_addr) = (api.local_addr().expect("addr"), metrics.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(fanout::run(config, api, metrics, async move {
        let _ = rx.await;
    }));
    Fanout { api: api_addr, metrics: metrics_addr, stop: Some(tx), task: Some(task) }
}

/// A fresh directory under the system's temp dir, unique to this process and call.
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fanout-test-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The admin token every test instance of fanout gets (unless the test passes its own `--admin-token`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A client for the admin port that sends `Authorization: Bearer ADMIN_TOKEN`.
pub fn admin_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {ADMIN_TOKEN}")).expect("header"),
    );
    reqwest::Client::builder().default_headers(headers).build().expect("client")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

pub async fn post_form(url: &str, form: &str) -> reqwest::Response {
    client()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_owned())
        .send()
        .await
        .expect("post")
}

/// Sends, for each user of `names`, the writes `passwords` in order (the first a register when there are
/// several, the others password changes), each after the previous one was answered, `concurrency` users at a
/// time, to the fanout API at `api`; returns how many got `201`.
pub async fn write_users(
    api: SocketAddr,
    names: impl Iterator<Item = String>,
    passwords: &[&str],
    concurrency: usize,
) -> usize {
    use futures_util::StreamExt;
    let client = client();
    let passwords: Vec<String> = passwords.iter().map(|p| (*p).to_owned()).collect();
    futures_util::stream::iter(names)
        .map(|name| {
            let client = client.clone();
            let passwords = passwords.clone();
            async move {
                let mut ok = 0;
                for (n, password) in passwords.iter().enumerate() {
                    let route = if n == 0 && passwords.len() > 1 { "/register" } else { "/changePassword" };
                    let r = client
                        .post(format!("http://{api}{route}"))
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(format!("username={name}&password={password}"))
                        .send()
                        .await
                        .expect("post");
                    ok += usize::from(r.status() == reqwest::StatusCode::CREATED);
                }
                ok
            }
        })
        .buffer_unordered(concurrency)
        .fold(0, |a, b| async move { a + b })
        .await
}

/// Polls `check` every 10 ms until it returns true or `within` passes; panics with `what` then.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of one sample `series value` in a Prometheus text exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}
