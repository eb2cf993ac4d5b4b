//! The demo backend: one replica of the backend pool behind the fan-out stack (docs/design.md section 10).
//!
//! It keeps the original demo server's environment (`SERVER_NAME`, `SERVER_PORT`, `SKIP_SOME_REQUESTS`), routes
//! and answer texts, and is a real replica rather than a stub: it parses the form or JSON body, keeps users in
//! memory with a salted hash of each password (never the password), applies each `Idempotency-Key` once (a
//! replay gets the stored answer and changes nothing), and shows its state on `GET /users` so that tests can check
//! that every replica converged to the same users.
//!
//! When asked to (`SKIP_SOME_REQUESTS=true`) it drops a share of writes with `500 request dropped by server`,
//! before applying anything, so that the fanout service's retries can be watched.
//!
//! With `--control-port` (env `CONTROL_PORT`) it also serves a control listener, on loopback by default, on which
//! an operator stages an outage at run time: down (connections are closed), slow, flaky, wiped, up again
//! ([`control`]; the README's "Operator recipes" use it).
//!
//! # Layout
//! - [`Settings`]: flags and environment.
//! - [`DemoBackend`]: the replica's state, with the handle tests use; [`DemoBackend::router`] serves it.
//! - [`run`]: serve on a bound listener until a shutdown future resolves.
//! - [`control`]: the control routes and the listener that drops connections while the replica is down.

pub mod control;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::{ArgAction, Parser};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

/// How many `Idempotency-Key`s a replica remembers; the oldest are forgotten first.
pub const IDEMPOTENCY_MEMORY: usize = 100_000;
/// How many received writes [`DemoBackend::received`] keeps (headers only, never bodies).
pub const RECEIVED_MEMORY: usize = 1024;

pub use service_kit::LogFormat;

/// Flags and environment of the `demo-backend` binary. The names of the original demo server are kept.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "demo-backend",
    version,
    about = "A demo replica: an in-memory user store that can drop writes on purpose."
)]
pub struct Settings {
    /// Name shown in every answer (`logged in on NAME`).
    #[arg(long = "name", env = "SERVER_NAME", default_value = "default_name")]
    pub server_name: String,

    /// IP address to listen on.
    #[arg(long = "host", env = "SERVER_HOST", default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long = "port", env = "SERVER_PORT", default_value_t = 8080)]
    pub port: u16,

    /// When true, a share of writes (SKIP_PROBABILITY) is answered `500 request dropped by server`.
    #[arg(long = "skip-some-requests", env = "SKIP_SOME_REQUESTS", default_value = "true", action = ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub skip_some_requests: bool,

    /// Share of writes dropped when SKIP_SOME_REQUESTS is true, in [0, 1].
    #[arg(long = "skip-probability", env = "SKIP_PROBABILITY", default_value_t = 0.2, value_parser = parse_probability)]
    pub skip_probability: f64,

    /// Wait before answering any request but `/healthz` (e.g. `50ms`).
    #[arg(long = "response-delay", env = "RESPONSE_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub response_delay: Duration,

    /// Port of the control listener (outages on demand: `POST /down`, `/up`, `/slow?delay=2s`,
    /// `/flaky?share=0.5`, `/wipe`; `GET /` shows the state). Unset: no control listener.
    #[arg(long = "control-port", env = "CONTROL_PORT")]
    pub control_port: Option<u16>,

    /// IP address of the control listener. Anyone who reaches it can take the replica down: keep it on loopback.
    #[arg(long = "control-host", env = "CONTROL_HOST", default_value = "127.0.0.1")]
    pub control_host: std::net::IpAddr,

    /// Log line format; `RUST_LOG` filters what is logged.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Settings {
    /// Settings for a test replica: no drops, no delay, loopback, port 0.
    pub fn for_test(name: &str) -> Self {
        Settings {
            server_name: name.to_owned(),
            host: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 0,
            skip_some_requests: false,
            skip_probability: 0.2,
            response_delay: Duration::ZERO,
            control_port: None,
            control_host: std::net::Ipv4Addr::LOCALHOST.into(),
            log_format: LogFormat::Text,
        }
    }
}

fn parse_probability(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("expected a number between 0 and 1".to_owned()),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (expected e.g. 50ms, 1s)"))
}

/// One user as shown by `GET /users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    /// The user name.
    pub username: String,
    /// How many writes changed this user (register or changePassword), counting from 1.
    pub version: u64,
    /// The first 12 hex digits of the salted password hash: equal on two replicas iff they hold the same password.
    pub password_fingerprint: String,
}

/// The body of `GET /users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsersView {
    /// The replica's `SERVER_NAME`.
    pub server: String,
    /// Number of users.
    pub count: usize,
    /// Users sorted by name.
    pub users: Vec<UserView>,
}

/// What a test can see of one write the replica received: its path and headers (never its body).
#[derive(Debug, Clone)]
pub struct ReceivedWrite {
    /// The request path.
    pub path: String,
    /// The request headers as received.
    pub headers: HeaderMap,
    /// The body length in bytes.
    pub body_len: usize,
}

struct User {
    version: u64,
    hash: [u8; 32],
}

#[derive(Default)]
struct Store {
    users: BTreeMap<String, User>,
    /// (path, key) -> the answer given when the write was applied.
    applied: HashMap<(String, String), (StatusCode, String)>,
    applied_order: VecDeque<(String, String)>,
    received: VecDeque<ReceivedWrite>,
    fail_next: Vec<StatusCode>,
    /// While set, every write is answered with this status and nothing is applied (an outage on demand).
    down: Option<StatusCode>,
}

/// One replica: settings and in-memory state. Cheap to clone (shared state).
#[derive(Clone)]
pub struct DemoBackend {
    settings: Arc<Settings>,
    store: Arc<Mutex<Store>>,
    writes: Arc<AtomicU64>,
    faults: Arc<Mutex<control::Faults>>,
    offline: Arc<AtomicBool>,
}

#[derive(Deserialize)]
struct Credentials {
    username: Option<String>,
    password: Option<String>,
}

impl DemoBackend {
    /// A replica with no users.
    pub fn new(settings: Settings) -> Self {
        let faults = control::Faults::from_settings(&settings);
        Self {
            settings: Arc::new(settings),
            store: Arc::default(),
            writes: Arc::default(),
            faults: Arc::new(Mutex::new(faults)),
            offline: Arc::default(),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The router: `GET /`, `GET /login`, `POST /register`, `POST /changePassword`, `GET /users`, `GET /healthz`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/login", get(login))
            .route("/register", post(write))
            .route("/changePassword", post(write))
            .route("/users", get(users))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.clone())
    }

    /// The users, as `GET /users` shows them.
    pub fn users(&self) -> UsersView {
        let store = self.store();
        let users: Vec<UserView> = store
            .users
            .iter()
            .map(|(name, u)| UserView {
                username: name.clone(),
                version: u.version,
                password_fingerprint: fingerprint(&u.hash),
            })
            .collect();
        UsersView { server: self.settings.server_name.clone(), count: users.len(), users }
    }

    /// Makes the next `statuses.len()` writes fail with these statuses, in order, before anything is applied.
    pub fn fail_next(&self, statuses: &[StatusCode]) {
        let mut store = self.store();
        store.fail_next = statuses.iter().rev().copied().collect();
    }

    /// Answers every write with `status` (e.g. `503`) and applies nothing, until called with `None`: an outage
    /// that still counts the attempts it gets ([`DemoBackend::writes_received`]).
    pub fn set_down(&self, status: Option<StatusCode>) {
        self.store().down = status;
    }

    /// Forgets every user and every applied `Idempotency-Key`, as a replica restarted empty would.
    pub fn wipe(&self) {
        let mut store = self.store();
        store.users.clear();
        store.applied.clear();
        store.applied_order.clear();
    }

    /// The last [`RECEIVED_MEMORY`] writes received, oldest first (dropped ones included).
    pub fn received(&self) -> Vec<ReceivedWrite> {
        self.store().received.iter().cloned().collect()
    }

    /// Writes received so far (dropped ones included).
    pub fn writes_received(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn apply(&self, path: &str, headers: &HeaderMap, body: &[u8]) -> (StatusCode, String) {
        let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(|k| (path.to_owned(), k.to_owned()));
        let mut store = self.store();
        if let Some(status) = store.down {
            return (status, "server is down on purpose\n".to_owned());
        }
        if let Some(status) = store.fail_next.pop() {
            return (status, "request dropped by server\n".to_owned());
        }
        let drop_share = self.faults().drop_share;
        if drop_share > 0.0 && rand::rng().random_bool(drop_share) {
            return (StatusCode::INTERNAL_SERVER_ERROR, "request dropped by server\n".to_owned());
        }
        if let Some(k) = &key
            && let Some(answer) = store.applied.get(k)
        {
            return answer.clone();
        }
        let answer = match parse_credentials(headers, body) {
            Err(answer) => answer,
            Ok((username, password)) => {
                let name = &self.settings.server_name;
                let hash = hash_password(&username, &password);
                if path == "/register" {
                    let user = store.users.entry(username).or_insert(User { version: 0, hash });
                    user.version += 1;
                    user.hash = hash;
                    (StatusCode::CREATED, format!("register on {name}\n"))
                } else if let Some(user) = store.users.get_mut(&username) {
                    user.version += 1;
                    user.hash = hash;
                    (StatusCode::CREATED, format!("password changed on {name}\n"))
                } else {
                    (StatusCode::NOT_FOUND, "unknown user\n".to_owned())
                }
            }
        };
        // Only a write that changed something is remembered: a refused one (400, 404) applied nothing, so the same
        // write sent again under its key (a redrive after the cause was fixed) is judged afresh.
        if let Some(k) = key.filter(|_| answer.0 == StatusCode::CREATED) {
            if store.applied_order.len() >= IDEMPOTENCY_MEMORY
                && let Some(old) = store.applied_order.pop_front()
            {
                store.applied.remove(&old);
            }
            store.applied_order.push_back(k.clone());
            store.applied.insert(k, answer.clone());
        }
        answer
    }
}

/// Reads `username` and `password` from a form (the default) or JSON body. Errors are the answer to give.
fn parse_credentials(headers: &HeaderMap, body: &[u8]) -> Result<(String, String), (StatusCode, String)> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let parsed: Result<Credentials, String> = match mime.as_str() {
        "application/json" => serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}")),
        "" | "application/x-www-form-urlencoded" => {
            serde_urlencoded::from_bytes(body).map_err(|e| format!("invalid form body: {e}"))
        }
        other => {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content type {other:?}: send a form or JSON body\n"),
            ));
        }
    };
    let creds = parsed.map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    let field = |value: Option<String>, name: &str| {
        value.filter(|v| !v.is_empty()).ok_or_else(|| (StatusCode::BAD_REQUEST, format!("missing field: {name}\n")))
    };
    Ok((field(creds.username, "username")?, field(creds.password, "password")?))
}

/// SHA-256 of `salt || password`, the salt derived from the user name so that every replica computes the same
/// hash for the same password (a demo choice: a real service uses a slow KDF such as Argon2 with a random salt).
fn hash_password(username: &str, password: &str) -> [u8; 32] {
    let salt = Sha256::new().chain_update(b"demo-backend salt v1\0").chain_update(username.as_bytes()).finalize();
    Sha256::new().chain_update(&salt[..16]).chain_update(password.as_bytes()).finalize().into()
}

fn fingerprint(hash: &[u8; 32]) -> String {
    hash[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn text(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn delay(backend: &DemoBackend) {
    let delay = backend.faults().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

async fn index(State(b): State<DemoBackend>) -> Response {
    delay(&b).await;
    text(
        StatusCode::OK,
        format!(
            "demo backend {}: GET /login, POST /register and POST /changePassword (username, password), GET /users\n",
            b.settings.server_name
        ),
    )
}

async fn login(State(b): State<DemoBackend>) -> Response {
    delay(&b).await;
    text(StatusCode::OK, format!("logged in on {}\n", b.settings.server_name))
}

async fn users(State(b): State<DemoBackend>) -> Json<UsersView> {
    Json(b.users())
}

async fn write(State(b): State<DemoBackend>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    b.writes.fetch_add(1, Ordering::Relaxed);
    {
        let mut store = b.store();
        if store.received.len() >= RECEIVED_MEMORY {
            store.received.pop_front();
        }
        store.received.push_back(ReceivedWrite {
            path: uri.path().to_owned(),
            headers: headers.clone(),
            body_len: body.len(),
        });
    }
    delay(&b).await;
    let (status, answer) = b.apply(uri.path(), &headers, &body);
    tracing::info!(path = uri.path(), status = status.as_u16(), body_len = body.len(), "write");
    text(status, answer)
}

/// Serves `backend` on `listener` until `shutdown` resolves.
///
/// # Errors
/// When the listener fails.
pub async fn run(
    backend: DemoBackend,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(
        addr = %listener.local_addr()?,
        name = %backend.settings.server_name,
        skip_some_requests = backend.settings.skip_some_requests,
        "demo backend listening"
    );
    let router = backend.router();
    let listener = control::FaultyListener::new(listener, backend.offline.clone());
    axum::serve(listener, router).with_graceful_shutdown(shutdown).into_future().await
}

/// Serves `backend`'s control routes ([`control`]) on `listener` until `shutdown` resolves.
///
/// # Errors
/// When the listener fails.
pub async fn run_control(
    backend: DemoBackend,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "demo backend control listening");
    axum::serve(listener, backend.control_router()).with_graceful_shutdown(shutdown).into_future().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> (HeaderMap, Vec<u8>) {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        (h, body.as_bytes().to_vec())
    }

    #[test]
    fn register_change_and_errors() {
        let b = DemoBackend::new(Settings::for_test("s1"));
        let (h, body) = form("username=ann&password=one");
        assert_eq!(b.apply("/register", &h, &body), (StatusCode::CREATED, "register on s1\n".to_owned()));
        let first = b.users().users[0].clone();
        let (h2, body2) = form("username=ann&password=two");
        assert_eq!(b.apply("/changePassword", &h2, &body2).0, StatusCode::CREATED);
        let second = b.users().users[0].clone();
        assert_eq!(second.version, 2);
        assert_ne!(first.password_fingerprint, second.password_fingerprint);
        let (h3, body3) = form("username=bob&password=x");
        assert_eq!(b.apply("/changePassword", &h3, &body3).0, StatusCode::NOT_FOUND);
        let (h4, body4) = form("username=bob");
        assert_eq!(
            b.apply("/register", &h4, &body4),
            (StatusCode::BAD_REQUEST, "missing field: password\n".to_owned())
        );
        let mut json = HeaderMap::new();
        json.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        assert_eq!(b.apply("/register", &json, br#"{"username":"cy","password":"p"}"#).0, StatusCode::CREATED);
        assert_eq!(b.apply("/register", &json, b"{not json").0, StatusCode::BAD_REQUEST);
        let mut xml = HeaderMap::new();
        xml.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
        assert_eq!(b.apply("/register", &xml, b"<a/>").0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(b.users().count, 2);
    }

    #[test]
    fn same_password_same_fingerprint_on_every_replica() {
        let a = DemoBackend::new(Settings::for_test("a"));
        let b = DemoBackend::new(Settings::for_test("b"));
        let (h, body) = form("username=ann&password=secret");
        a.apply("/register", &h, &body);
        b.apply("/register", &h, &body);
        assert_eq!(a.users().users, b.users().users);
        // The fingerprint does not show the password, and differs between users with the same password.
        let (h2, body2) = form("username=bob&password=secret");
        a.apply("/register", &h2, &body2);
        let users = a.users().users;
        assert_ne!(users[0].password_fingerprint, users[1].password_fingerprint);
    }

    #[test]
    fn an_idempotency_key_is_applied_once() {
        let b = DemoBackend::new(Settings::for_test("s1"));
        let (mut h, body) = form("username=ann&password=one");
        h.insert("idempotency-key", HeaderValue::from_static("k1"));
        assert_eq!(b.apply("/register", &h, &body).0, StatusCode::CREATED);
        assert_eq!(b.apply("/register", &h, &body).0, StatusCode::CREATED);
        assert_eq!(b.users().users[0].version, 1);
        // A dropped attempt is not remembered: the retry with the same key applies.
        let (mut h2, body2) = form("username=ann&password=two");
        h2.insert("idempotency-key", HeaderValue::from_static("k2"));
        b.fail_next(&[StatusCode::INTERNAL_SERVER_ERROR]);
        assert_eq!(b.apply("/changePassword", &h2, &body2).0, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(b.apply("/changePassword", &h2, &body2).0, StatusCode::CREATED);
        assert_eq!(b.apply("/changePassword", &h2, &body2).0, StatusCode::CREATED);
        assert_eq!(b.users().users[0].version, 2);
        // A refused write is not remembered either: once its cause is gone, the same key applies.
        let (mut h3, body3) = form("username=ghost&password=x");
        h3.insert("idempotency-key", HeaderValue::from_static("k3"));
        assert_eq!(b.apply("/changePassword", &h3, &body3).0, StatusCode::NOT_FOUND);
        let (h4, body4) = form("username=ghost&password=y");
        assert_eq!(b.apply("/register", &h4, &body4).0, StatusCode::CREATED);
        assert_eq!(b.apply("/changePassword", &h3, &body3).0, StatusCode::CREATED);
    }

    #[test]
    fn skip_probability_one_drops_everything_and_applies_nothing() {
        let mut s = Settings::for_test("s1");
        s.skip_some_requests = true;
        s.skip_probability = 1.0;
        let b = DemoBackend::new(s);
        let (h, body) = form("username=ann&password=one");
        assert_eq!(
            b.apply("/register", &h, &body),
            (StatusCode::INTERNAL_SERVER_ERROR, "request dropped by server\n".to_owned())
        );
        assert_eq!(b.users().count, 0);
    }

    #[test]
    fn environment_names_of_the_original() {
        let s = Settings::try_parse_from(["demo-backend"]).expect("defaults");
        assert_eq!(s.server_name, "default_name");
        assert_eq!(s.port, 8080);
        assert!(s.skip_some_requests);
        assert!((s.skip_probability - 0.2).abs() < f64::EPSILON);
        // No control listener unless asked for, and on loopback when it is.
        assert_eq!(s.control_port, None);
        assert_eq!(s.control_host, std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST));
        let s = Settings::try_parse_from(["demo-backend", "--skip-some-requests", "false", "--response-delay", "50ms"])
            .expect("flags");
        assert!(!s.skip_some_requests);
        assert_eq!(s.response_delay, Duration::from_millis(50));
        assert!(Settings::try_parse_from(["demo-backend", "--skip-probability", "1.5"]).is_err());
    }
}
