//! Real processes for the end-to-end tests: the `fanout` and `demo-backend` binaries on port 0 (their bound
//! addresses read from their JSON "listening" log line) and a real nginx rendered from `nginx/default.conf.template`
//! by `nginx/render.sh`, the same renderer `make run` uses. Every process is killed when its guard drops.
#![allow(dead_code, missing_docs)]
// These helpers are synchronous (process start-up and tear-down), so a short thread sleep is right here.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

pub fn fanout_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fanout"))
}

/// The demo backend binary, built beside `fanout` by `cargo build --workspace` (which `make test` runs first).
pub fn demo_backend_bin() -> PathBuf {
    let path = fanout_bin().with_file_name("demo-backend");
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (make test does)",
        path.display()
    );
    path
}

/// nginx from `NGINX_BIN`, the PATH or /usr/sbin. Panics with the install line when it is missing: the
/// end-to-end tests never skip silently.
pub fn nginx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NGINX_BIN") {
        return PathBuf::from(p);
    }
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")]);
    for dir in candidates {
        let p = dir.join("nginx");
        if p.is_file() {
            return p;
        }
    }
    panic!("nginx is required by the end-to-end tests and was not found: apt-get install nginx (or set NGINX_BIN)");
}

/// A child process stopped on drop. Its stderr lines are collected.
pub struct Proc {
    pub name: String,
    /// Stop with SIGTERM (and wait) rather than SIGKILL: nginx's workers outlive a SIGKILLed master.
    graceful_stop: bool,
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    /// Waits up to `within` for a JSON log line whose message is `message`; returns its `fields`.
    pub fn wait_for_log(&mut self, message: &str, within: Duration) -> Value {
        let deadline = std::time::SystemTime::now() + within;
        loop {
            let left = deadline.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO);
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && v["fields"]["message"] == message
                    {
                        return v["fields"].clone();
                    }
                }
                Err(_) => {
                    panic!("{}: no {message:?} log line within {within:?}; saw:\n{}", self.name, self.seen.join("\n"))
                }
            }
        }
    }

    /// Waits up to `within` for a stderr line holding `text` (for programs that do not log JSON).
    pub fn wait_for_line(&mut self, text: &str, within: Duration) {
        if !self.saw_line(text, within) {
            panic!("{}: no line with {text:?} within {within:?}; saw:\n{}", self.name, self.seen.join("\n"));
        }
    }

    /// Like [`Proc::wait_for_line`], false when the line did not come (the process exited, or the time is up).
    pub fn saw_line(&mut self, text: &str, within: Duration) -> bool {
        let deadline = std::time::SystemTime::now() + within;
        loop {
            let left = deadline.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO);
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.seen.push(line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Every stderr line seen so far and any still queued, waiting up to `within` for the stream to end (the
    /// process must have exited for that).
    pub fn all_lines(&mut self, within: Duration) -> Vec<String> {
        let deadline = std::time::SystemTime::now() + within;
        loop {
            let left = deadline.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO);
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return self.seen.clone(),
            }
        }
    }

    /// Stops the process and reaps it: SIGTERM first for a graceful stopper (SIGKILL after 5 s), else SIGKILL.
    pub fn kill(&mut self) {
        if self.graceful_stop && self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            for _ in 0..250 {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `within` for a clean exit; returns the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit(within)
    }

    /// Sends a signal by name (`TERM`, `INT` ...).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
    }

    /// Waits up to `within` for the process to exit; returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::SystemTime::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::SystemTime::now() < deadline, "{} did not exit within {within:?}", self.name);
            std::thread::sleep(Duration::from_millis(20)); // a sync wait in a sync helper
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `program` with a clean environment plus `env`, collecting its stderr.
pub fn spawn(name: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.display()));
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc { name: name.to_owned(), graceful_stop: false, child, lines: rx, seen: Vec::new() }
}

const START: Duration = Duration::from_secs(20);

/// A `demo-backend` process on `127.0.0.1:0`.
pub fn demo_backend(name: &str, flaky: bool) -> (Proc, SocketAddr) {
    demo_backend_on(name, flaky, 0)
}

/// A `demo-backend` process on `127.0.0.1:port` (0: any free port).
pub fn demo_backend_on(name: &str, flaky: bool, port: u16) -> (Proc, SocketAddr) {
    let port = port.to_string();
    let mut p = spawn(
        name,
        &demo_backend_bin(),
        &["--host", "127.0.0.1", "--port", &port, "--log-format", "json"],
        &[("SERVER_NAME", name), ("SKIP_SOME_REQUESTS", if flaky { "true" } else { "false" })],
    );
    let fields = p.wait_for_log("demo backend listening", START);
    let addr = fields["addr"].as_str().expect("addr").parse().expect("socket addr");
    (p, addr)
}

/// A `fanout` process on `127.0.0.1:0` with its metrics on port 0 and a fresh outbox; returns (process, api,
/// metrics).
pub fn fanout(backends: &[SocketAddr], extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    let data_dir = super::temp_dir("e2e-outbox");
    fanout_with_outbox(backends, extra, data_dir.to_str().expect("utf-8"))
}

/// Like [`fanout`], with the outbox in `data_dir` (to restart on the same one).
pub fn fanout_with_outbox(backends: &[SocketAddr], extra: &[&str], data_dir: &str) -> (Proc, SocketAddr, SocketAddr) {
    let pool = backends.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec!["--listen", "127.0.0.1:0", "--metrics-port", "0", "--log-format", "json"];
    args.extend_from_slice(extra);
    let mut p = spawn("fanout", &fanout_bin(), &args, &[("BACKEND_POOL", &pool), ("DATA_DIR", data_dir)]);
    let fields = p.wait_for_log("fanout listening", START);
    let api = fields["api"].as_str().expect("api").parse().expect("addr");
    let metrics = fields["metrics"].as_str().expect("metrics").parse().expect("addr");
    (p, api, metrics)
}

/// `nats-server` from `NATS_SERVER_BIN`, the PATH or /usr/bin. Panics with the install line when it is missing:
/// the NATS tests never skip silently.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    for dir in dirs.into_iter().chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")]) {
        let p = dir.join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    panic!("nats-server is required by the NATS store tests and was not found: apt-get install nats-server");
}

/// A free loopback port (free when asked: another process may take it before it is used, which the caller
/// reports as a failed start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("probe port").local_addr().expect("addr").port()
}

/// One `nats-server` of a test cluster.
pub struct NatsNode {
    pub proc: Proc,
    /// `nats://127.0.0.1:port` for clients.
    pub url: String,
    /// The HTTP monitoring endpoint (`/jsz` and friends), `127.0.0.1:port`.
    pub monitor: SocketAddr,
    /// Its `--server_name`.
    pub name: String,
    _dir: Prefix,
}

/// `n` nats-server processes with JetStream, clustered over loopback routes (one is a cluster of one), each
/// with its own store directory; returns once every node has seen a JetStream metadata leader elected. Tries
/// again on other ports when a port was taken between choosing it and binding it (tests run side by side).
pub fn nats_cluster(n: usize) -> Vec<NatsNode> {
    for attempt in 0..5 {
        if let Some(nodes) = try_nats_cluster(n) {
            return nodes;
        }
        eprintln!("nats cluster start {attempt} failed (a port taken?); trying other ports");
    }
    panic!("a nats cluster of {n} could not start after 5 tries");
}

fn try_nats_cluster(n: usize) -> Option<Vec<NatsNode>> {
    let bin = nats_server_bin();
    let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let monitor_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let routes = route_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let mut nodes = Vec::new();
    for i in 0..n {
        let dir = std::env::temp_dir().join(format!("fanout-nats-{}-{}-{i}", std::process::id(), client_ports[i]));
        std::fs::create_dir_all(&dir).expect("nats store dir");
        let port = client_ports[i].to_string();
        let name = format!("n{i}");
        let store = dir.to_str().expect("utf-8").to_owned();
        let cluster = format!("nats://127.0.0.1:{}", route_ports[i]);
        let monitor = monitor_ports[i].to_string();
        let mut args =
            vec!["-js", "-a", "127.0.0.1", "-p", &port, "-m", &monitor, "-sd", &store, "--server_name", &name];
        if n > 1 {
            args.extend_from_slice(&["--cluster_name", "fanout-test", "--cluster", &cluster, "--routes", &routes]);
        }
        let mut proc = spawn(&format!("nats-{i}"), &bin, &args, &[]);
        let dir = Prefix(dir);
        if !proc.saw_line("Server is ready", START) {
            eprintln!("{} did not start:\n{}", proc.name, proc.seen.join("\n"));
            return None;
        }
        let monitor = format!("127.0.0.1:{monitor}").parse().expect("addr");
        nodes.push(NatsNode { proc, url: format!("nats://127.0.0.1:{port}"), monitor, name, _dir: dir });
    }
    if n > 1 {
        for node in &mut nodes {
            node.proc.wait_for_line("metadata leader", Duration::from_secs(60));
        }
    }
    Some(nodes)
}

/// A private nginx prefix directory, removed on drop.
pub struct Prefix(pub PathBuf);

impl Drop for Prefix {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Renders the template with `nginx/render.sh` and starts nginx from a private prefix on a free loopback port;
/// returns (process, prefix, address). Retries with another port if the chosen one was taken meanwhile.
pub fn nginx(backends: [SocketAddr; 3], lb: SocketAddr, lb_metrics: SocketAddr) -> (Proc, Prefix, SocketAddr) {
    nginx_over(backends, &lb.to_string(), &lb_metrics.to_string())
}

/// Like [`nginx`], with `lb` and `lb_metrics` comma lists of fanout instances (the NATS store).
pub fn nginx_over(backends: [SocketAddr; 3], lb: &str, lb_metrics: &str) -> (Proc, Prefix, SocketAddr) {
    let nginx = nginx_bin();
    for attempt in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port").local_addr().expect("addr").port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let dir = std::env::temp_dir().join(format!("fanout-e2e-nginx-{}-{port}-{attempt}", std::process::id()));
        let prefix = Prefix(dir.clone());
        let listen = addr.to_string();
        let (b1, b2, b3, lbs, lbm) = (
            backends[0].to_string(),
            backends[1].to_string(),
            backends[2].to_string(),
            lb.to_owned(),
            lb_metrics.to_owned(),
        );
        let rendered = Command::new(repo_root().join("nginx/render.sh"))
            .arg(&dir)
            .env("BACKEND_1", &b1)
            .env("BACKEND_2", &b2)
            .env("BACKEND_3", &b3)
            .env("LB", &lbs)
            .env("LB_METRICS", &lbm)
            .env("NGINX_LISTEN", &listen)
            .status()
            .expect("run nginx/render.sh");
        assert!(rendered.success(), "nginx/render.sh failed");
        let conf = dir.join("nginx.conf");
        let err = dir.join("logs/error.log");
        let mut p = spawn(
            "nginx",
            &nginx,
            &[
                "-p",
                dir.to_str().expect("utf-8"),
                "-c",
                conf.to_str().expect("utf-8"),
                "-e",
                err.to_str().expect("utf-8"),
            ],
            &[],
        );
        p.graceful_stop = true;
        // Ready when it answers on its port, or failed when the process exits (port taken).
        let deadline = std::time::SystemTime::now() + START;
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return (p, prefix, addr);
            }
            if p.child.try_wait().expect("try_wait").is_some() {
                let log = std::fs::read_to_string(&err).unwrap_or_default();
                eprintln!("nginx exited on attempt {attempt}: {log}");
                break;
            }
            assert!(
                std::time::SystemTime::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("nginx could not start on a free port after 5 tries");
}
