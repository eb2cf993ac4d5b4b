//! Configuration of the fanout service: one [`Config`] parsed by clap from flags and environment variables
//! (docs/design.md section 2), then checked by [`Config::validate`] before any port is bound.
//!
//! Every flag has an environment variable; the names the original Python service used (`BACKEND_POOL`,
//! `MAX_ATTEMPTS`, ...) are kept. Durations take human units (`250ms`, `64s`, `1m`, via `humantime`) and sizes
//! take byte units (`64KiB`, `1MB`, via `bytesize`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Parser, ValueEnum};

pub use service_kit::LogFormat;

use crate::backend::{BackendAddr, ParseBackendError};

/// When the client of a write is answered (docs/design.md section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckPolicy {
    /// As soon as one backend answered `201` (the original's behaviour): the client gets that backend's answer.
    First,
    /// After a majority of the backend pool (`n / 2 + 1`) answered `201`.
    Quorum,
    /// After every backend answered `201`.
    All,
}

impl AckPolicy {
    /// How many backends out of `pool_size` must answer `201` before the client is answered.
    pub fn required(self, pool_size: usize) -> usize {
        match self {
            AckPolicy::First => 1.min(pool_size),
            AckPolicy::Quorum => pool_size / 2 + 1,
            AckPolicy::All => pool_size,
        }
    }

    /// The name used on the command line and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AckPolicy::First => "first",
            AckPolicy::Quorum => "quorum",
            AckPolicy::All => "all",
        }
    }
}

/// Command line and environment of the `fanout` binary. The doc comments are the `--help` text. Every
/// single-value flag takes a value that starts with `-` as its value, so `--max-attempts -1` is reported as a bad
/// value for `--max-attempts` rather than as an unknown flag `-1`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fanout",
    version,
    about = "Delivers every write to every backend of the pool, retrying each one on its own.",
    after_help = "Required: --backends (BACKEND_POOL). Durations take a unit (250ms, 64s, 1m 30s); a bare \
                  number is seconds (30 = 30s). Sizes take one too (64KiB, 1GiB). Every flag has the environment \
                  variable shown beside it. A bad value stops fanout at start with one line naming the flag."
)]
pub struct Config {
    /// Address of the API listener (writes, health, deliveries).
    #[arg(long, allow_hyphen_values = true, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Port of the metrics and admin listener (`GET /metrics`; the dead-letter routes, which change state: keep
    /// it private), on the same IP as `--listen`. 0 picks a free port.
    #[arg(long, allow_hyphen_values = true, env = "METRICS_PORT", default_value_t = 8000)]
    pub metrics_port: u16,

    /// Required. The backend pool: a comma list of `host:port` or `http://host:port[/prefix]`.
    #[arg(long = "backends", env = "BACKEND_POOL", value_delimiter = ',', num_args = 0..)]
    pub backends: Vec<String>,

    /// Attempts per backend per delivery, the first one included.
    #[arg(long, allow_hyphen_values = true, env = "MAX_ATTEMPTS", default_value_t = 100)]
    pub max_attempts: u32,

    /// Backoff before the first retry; it doubles for every further retry.
    #[arg(long, allow_hyphen_values = true, env = "INITIAL_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub initial_backoff: Duration,

    /// Cap of the exponential part of the backoff (also caps a backend's `Retry-After`).
    #[arg(long, allow_hyphen_values = true, env = "MAX_BACKOFF", default_value = "64s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// Jitter drawn uniformly in [0, max] and added to every backoff, fresh for every retry.
    #[arg(long, allow_hyphen_values = true, env = "MAX_JITTER", default_value = "100ms", value_parser = parse_duration)]
    pub max_jitter: Duration,

    /// Deadline of one attempt: connect, send and the whole response.
    #[arg(long, allow_hyphen_values = true, env = "ATTEMPT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub attempt_timeout: Duration,

    /// When the client is answered: after the first, a majority, or all backends answered 201.
    #[arg(long = "ack", allow_hyphen_values = true, env = "ACK_POLICY", value_enum, default_value_t = AckPolicy::First)]
    pub ack: AckPolicy,

    /// Past this wait the client gets `202 Accepted` and the delivery goes on in the background.
    #[arg(long, allow_hyphen_values = true, env = "ACK_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub ack_timeout: Duration,

    /// Largest accepted request body; larger ones get `413` and nothing is forwarded.
    #[arg(long, allow_hyphen_values = true, env = "MAX_BODY", default_value = "64KiB", value_parser = parse_size)]
    pub max_body: ByteSize,

    /// Clients waiting for their answer at most, and with `--no-outbox` also deliveries not yet finished on every
    /// backend; past it writes get `503` with `Retry-After` and nothing is forwarded.
    #[arg(long, allow_hyphen_values = true, env = "MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,

    /// Body field (form or JSON) whose value orders writes: writes with the same value reach each backend in the
    /// order fanout accepted them. Empty disables ordering.
    #[arg(long, allow_hyphen_values = true, env = "ORDERING_KEY", default_value = "username")]
    pub ordering_key: String,

    /// Directory of the durable write log (`DATA_DIR/log/`): every accepted write is stored there before
    /// anything is sent, delivered after a restart if it was not yet, and kept for `--history-window`.
    #[arg(long, allow_hyphen_values = true, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Keep accepted writes in memory only, with no outbox: faster, but writes pending at a crash or restart
    /// are lost.
    #[arg(long, env = "NO_OUTBOX", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_outbox: bool,

    /// Where accepted writes are kept: empty for the embedded write log in `--data-dir` (one instance), or
    /// `nats://host:4222[,nats://host2:4222,...]` for NATS JetStream, shared by every fanout instance pointed at
    /// it (README "Scaling out"). fanout creates or checks its streams, consumers and buckets at start.
    #[arg(long, allow_hyphen_values = true, env = "STORE", default_value = "")]
    pub store: String,

    /// With `--store nats://...`: replicas of fanout's streams, consumers and buckets (1, or 3 on a JetStream
    /// cluster of three or more servers).
    #[arg(long, allow_hyphen_values = true, env = "STORE_REPLICAS", default_value_t = 1)]
    pub store_replicas: usize,

    /// With `--store nats://...`: users are hashed into this many partitions; each backend takes one write of
    /// a partition at a time, so this is a backend's concurrency across all instances. Every instance and every
    /// start must use the same value (checked against the stream).
    #[arg(long, allow_hyphen_values = true, env = "PARTITIONS", default_value_t = 16)]
    pub partitions: u32,

    /// With `--store nats://...`: this instance's name (letters, digits, `-` and `_`), in its logs and in the
    /// subject its clients' results come back on. Default: the host name and a random suffix.
    #[arg(long, allow_hyphen_values = true, env = "INSTANCE", default_value = "")]
    pub instance: String,

    /// How long a client's `Idempotency-Key` is remembered: a repeat with the same body gets the original
    /// answer, with another body `422`.
    #[arg(long, allow_hyphen_values = true, env = "IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_window: Duration,

    /// With the outbox: deliveries stored and not yet finished on every backend (pending or dead-lettered
    /// somewhere) at most; past it writes get `503` with `Retry-After`. They are on disk, so this bounds disk use.
    #[arg(long, allow_hyphen_values = true, env = "MAX_PENDING", default_value_t = 1_000_000)]
    pub max_pending: u64,

    /// Attempts on the wire to one backend at most (its queue worker's concurrency).
    #[arg(long, allow_hyphen_values = true, env = "BACKEND_CONCURRENCY", default_value_t = 64)]
    pub backend_concurrency: usize,

    /// Consecutive attempts that got no answer (refused or broken connection, timeout) after which a backend's
    /// circuit breaker opens: its queue pauses and one probe at a time goes out. 0 disables the breaker. (A `5xx`
    /// or `429` is an answer: such failures open it by `--breaker-failure-rate` only.)
    #[arg(long, allow_hyphen_values = true, env = "BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,

    /// Retry budget: retries to a backend are at most this share of its first attempts over the last 10 s
    /// (plus `--retry-budget-min-per-sec`); a retry past it waits.
    #[arg(long, allow_hyphen_values = true, env = "RETRY_BUDGET_RATIO", default_value_t = 0.2)]
    pub retry_budget_ratio: f32,

    /// Retry budget floor: retries per second a backend may always get.
    #[arg(long, allow_hyphen_values = true, env = "RETRY_BUDGET_MIN_PER_SEC", default_value_t = 10)]
    pub retry_budget_min_per_sec: u32,

    /// Share of a backend's attempts over `--breaker-window` that failed transiently (any kind), in (0, 1], at
    /// which its breaker opens, once the window holds `--breaker-min-requests` attempts.
    #[arg(long, allow_hyphen_values = true, env = "BREAKER_FAILURE_RATE", default_value_t = 0.8)]
    pub breaker_failure_rate: f64,

    /// Sliding window of `--breaker-failure-rate`.
    #[arg(long, allow_hyphen_values = true, env = "BREAKER_WINDOW", default_value = "10s", value_parser = parse_duration)]
    pub breaker_window: Duration,

    /// Attempts the window must hold before `--breaker-failure-rate` may open the breaker.
    #[arg(long, allow_hyphen_values = true, env = "BREAKER_MIN_REQUESTS", default_value_t = 20)]
    pub breaker_min_requests: u32,

    /// Cap of the wait between two probes of an open breaker (the probe schedule is the retry schedule by probe
    /// number, capped here rather than at `--max-backoff`), so that a backend back up is noticed quickly.
    #[arg(long, allow_hyphen_values = true, env = "PROBE_INTERVAL_MAX", default_value = "5s", value_parser = parse_duration)]
    pub probe_interval_max: Duration,

    /// How long every accepted write is kept in the write log, delivered or not, so that a backend can be
    /// recovered (`POST /recoveries?backend=B&since=T` on the admin port): at most 30 days.
    #[arg(long, allow_hyphen_values = true, env = "HISTORY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub history_window: Duration,

    /// Bytes of history kept at most (the oldest goes first; writes still pending or dead-lettered never go).
    /// With `--no-outbox` the history is kept in memory, and at most 16MiB of it.
    #[arg(long, allow_hyphen_values = true, env = "HISTORY_MAX_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub history_max_bytes: ByteSize,

    /// How many finished deliveries `GET /deliveries/{id}` can still show (their outcomes are kept in the
    /// outbox, the newest first; pending ones are always shown).
    #[arg(long, allow_hyphen_values = true, env = "DELIVERY_HISTORY", default_value_t = 10_000)]
    pub delivery_history: u64,

    /// File of keys to encrypt the write log's records that carry what clients sent (bodies, forwarded headers,
    /// idempotency records) with XChaCha20-Poly1305: one key per line, 32 bytes as 64 hex digits or base64
    /// (`openssl rand -hex 32`). The first key encrypts, every key decrypts (rotation: add the new key first).
    /// Unset: stored in clear for `--history-window` (docs/write-log.md).
    #[arg(long, allow_hyphen_values = true, env = "ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,

    /// Idle keep-alive connections to backends are closed after this long. Keep it below the backends' own idle
    /// timeout so that fanout never sends on a connection the backend is closing.
    #[arg(long, allow_hyphen_values = true, env = "POOL_IDLE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,

    /// On SIGTERM or Ctrl-C, how long to wait for deliveries in flight before exiting.
    #[arg(long, allow_hyphen_values = true, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log line format; `RUST_LOG` filters what is logged.
    #[arg(long, allow_hyphen_values = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// A file holding the admin token (one line, at least 16 characters): the admin routes that change state
    /// (redrive, delete, recover) need `Authorization: Bearer <token>`. Without a token they answer 403.
    #[arg(long, allow_hyphen_values = true, env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// The admin token itself, for where a file is awkward (prefer `--admin-token-file`: a flag's value shows in
    /// `ps`). Read from the environment variable ADMIN_TOKEN.
    #[arg(long, allow_hyphen_values = true, env = "ADMIN_TOKEN", hide_env_values = true, hide = true)]
    pub admin_token: Option<String>,

    /// A connection must send a request's headers within this long of its first byte, or it is closed.
    #[arg(long, allow_hyphen_values = true, env = "HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// A kept-alive connection with no request for this long is closed. Keep it longer than nginx's upstream
    /// `keepalive_timeout` (60s by default), or nginx sends on connections fanout is closing.
    #[arg(long, allow_hyphen_values = true, env = "IDLE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A request's whole body must arrive within this long of its headers (a deadline, not a per-read timeout).
    #[arg(long, allow_hyphen_values = true, env = "BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Connections the API listener holds open at most; one more is answered `503` and closed. Lowered at start
    /// to what the open-files limit allows.
    #[arg(long, allow_hyphen_values = true, env = "MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
}

/// A configuration that parsed but cannot run. The message names the flag and its environment variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--backends` was empty or missing.
    #[error("--backends (BACKEND_POOL) is required: a comma list such as server1:8080,server2:8080")]
    NoBackends,
    /// One entry of `--backends` is not `host:port` or an `http://` URL.
    #[error("--backends (BACKEND_POOL): {0}")]
    BadBackend(#[from] ParseBackendError),
    /// The same backend appears twice.
    #[error("--backends (BACKEND_POOL): {0:?} is listed twice")]
    DuplicateBackend(String),
    /// A numeric flag is out of its range.
    #[error("--{flag} ({env}) must be {rule}")]
    OutOfRange {
        /// The flag without its dashes.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
        /// What it must be.
        rule: &'static str,
    },
    /// `--initial-backoff` is larger than `--max-backoff`.
    #[error("--initial-backoff (INITIAL_BACKOFF) must not exceed --max-backoff (MAX_BACKOFF)")]
    BackoffOrder,
    /// The admin token cannot be read or is too weak; the message names the flag.
    #[error("{0}")]
    AdminToken(String),
    /// `--max-attempts` is below `--breaker-failures`: a refused connection would use up a write's attempts before
    /// the breaker could open.
    #[error(
        "--max-attempts (MAX_ATTEMPTS) must be at least --breaker-failures (BREAKER_FAILURES), or a backend that refuses connections turns writes into dead letters before its breaker opens; lower BREAKER_FAILURES or set it to 0"
    )]
    AttemptsBelowBreaker,
    /// `--store` is not a list of NATS URLs.
    #[error("--store (STORE): {0}")]
    Store(String),
    /// `--metrics-port` is the port of `--listen`.
    #[error("--metrics-port (METRICS_PORT) must differ from the port of --listen (LISTEN_ADDR)")]
    PortClash,
    /// `--encryption-key-file` cannot be read or is not a key file (the message never shows a key).
    #[error("--encryption-key-file (ENCRYPTION_KEY_FILE) {path}: {why}")]
    KeyFile {
        /// The file as given.
        path: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Longest accepted duration for any duration flag: one day. Larger values are typing mistakes, and durations
/// near `u64::MAX` seconds overflow timers.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The shortest admin token accepted, in characters.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// The most history kept in memory with `--no-outbox`, whatever `--history-max-bytes` says.
pub const MEMORY_HISTORY_BYTES: u64 = 16 * 1024 * 1024;

impl Config {
    /// Checks what clap cannot, and returns the parsed backend pool.
    ///
    /// # Errors
    /// The first rule broken, as a [`ConfigError`] naming the flag.
    pub fn validate(&self) -> Result<Vec<BackendAddr>, ConfigError> {
        let range = |ok: bool, flag, env, rule| {
            if ok { Ok(()) } else { Err(ConfigError::OutOfRange { flag, env, rule }) }
        };
        for (value, flag, env) in [
            (self.header_timeout, "header-timeout", "HEADER_TIMEOUT"),
            (self.idle_timeout, "idle-timeout", "IDLE_TIMEOUT"),
            (self.body_timeout, "body-timeout", "BODY_TIMEOUT"),
            (self.initial_backoff, "initial-backoff", "INITIAL_BACKOFF"),
            (self.max_backoff, "max-backoff", "MAX_BACKOFF"),
            (self.max_jitter, "max-jitter", "MAX_JITTER"),
            (self.attempt_timeout, "attempt-timeout", "ATTEMPT_TIMEOUT"),
            (self.ack_timeout, "ack-timeout", "ACK_TIMEOUT"),
            (self.pool_idle_timeout, "pool-idle-timeout", "POOL_IDLE_TIMEOUT"),
            (self.shutdown_timeout, "shutdown-timeout", "SHUTDOWN_TIMEOUT"),
            (self.breaker_window, "breaker-window", "BREAKER_WINDOW"),
            (self.probe_interval_max, "probe-interval-max", "PROBE_INTERVAL_MAX"),
        ] {
            range(value <= MAX_DURATION, flag, env, "at most 1 day (24h)")?;
        }
        range(self.history_window <= 30 * MAX_DURATION, "history-window", "HISTORY_WINDOW", "at most 30 days (30d)")?;
        if self.metrics_port != 0 && self.metrics_port == self.listen.port() {
            return Err(ConfigError::PortClash);
        }
        self.encryption_keys()?;
        range(self.max_attempts >= 1, "max-attempts", "MAX_ATTEMPTS", "at least 1")?;
        range(!self.initial_backoff.is_zero(), "initial-backoff", "INITIAL_BACKOFF", "greater than 0")?;
        if self.initial_backoff > self.max_backoff {
            return Err(ConfigError::BackoffOrder);
        }
        range(!self.attempt_timeout.is_zero(), "attempt-timeout", "ATTEMPT_TIMEOUT", "greater than 0")?;
        range(!self.ack_timeout.is_zero(), "ack-timeout", "ACK_TIMEOUT", "greater than 0")?;
        range(self.max_body.as_u64() >= 1, "max-body", "MAX_BODY", "at least 1 byte")?;
        range(
            self.max_body.as_u64() <= 1 << 30,
            "max-body",
            "MAX_BODY",
            "at most 1GiB (every pending delivery keeps its body in memory)",
        )?;
        // A tokio semaphore holds at most usize::MAX >> 3 permits.
        range((1..=1 << 24).contains(&self.max_in_flight), "max-in-flight", "MAX_IN_FLIGHT", "between 1 and 16777216")?;
        range(
            (1..=10_000_000).contains(&self.delivery_history),
            "delivery-history",
            "DELIVERY_HISTORY",
            "between 1 and 10000000",
        )?;
        range((1..=1 << 32).contains(&self.max_pending), "max-pending", "MAX_PENDING", "between 1 and 4294967296")?;
        range(
            (1..=4096).contains(&self.backend_concurrency),
            "backend-concurrency",
            "BACKEND_CONCURRENCY",
            "between 1 and 4096",
        )?;
        range(
            (0.0..=1000.0).contains(&self.retry_budget_ratio),
            "retry-budget-ratio",
            "RETRY_BUDGET_RATIO",
            "between 0 and 1000",
        )?;
        // At least 1: with no floor, a retry refused by the budget after traffic stopped would wait for good.
        range(
            (1..=1_000_000).contains(&self.retry_budget_min_per_sec),
            "retry-budget-min-per-sec",
            "RETRY_BUDGET_MIN_PER_SEC",
            "between 1 and 1000000 (a floor of 0 would leave retries waiting for good once traffic stops)",
        )?;
        range(
            self.breaker_failure_rate > 0.0 && self.breaker_failure_rate <= 1.0,
            "breaker-failure-rate",
            "BREAKER_FAILURE_RATE",
            "greater than 0 and at most 1 (a share of attempts, e.g. 0.8)",
        )?;
        range(self.breaker_window >= Duration::from_millis(100), "breaker-window", "BREAKER_WINDOW", "at least 100ms")?;
        range(
            (1..=1_000_000).contains(&self.breaker_min_requests),
            "breaker-min-requests",
            "BREAKER_MIN_REQUESTS",
            "between 1 and 1000000",
        )?;
        // Below this an open breaker would probe a dead backend in a tight loop.
        range(
            self.probe_interval_max >= Duration::from_millis(10),
            "probe-interval-max",
            "PROBE_INTERVAL_MAX",
            "at least 10ms",
        )?;
        if self.breaker_failures > 0 && self.max_attempts < self.breaker_failures {
            return Err(ConfigError::AttemptsBelowBreaker);
        }

        for (value, flag, env) in [
            (self.header_timeout, "header-timeout", "HEADER_TIMEOUT"),
            (self.idle_timeout, "idle-timeout", "IDLE_TIMEOUT"),
            (self.body_timeout, "body-timeout", "BODY_TIMEOUT"),
        ] {
            range(!value.is_zero(), flag, env, "greater than 0")?;
        }
        range(
            (1..=1_000_000).contains(&self.max_connections),
            "max-connections",
            "MAX_CONNECTIONS",
            "between 1 and 1000000",
        )?;
        self.admin_token()?;
        self.nats_store()?;
        range((1..=1024).contains(&self.partitions), "partitions", "PARTITIONS", "between 1 and 1024")?;
        range((1..=5).contains(&self.store_replicas), "store-replicas", "STORE_REPLICAS", "between 1 and 5")?;
        range(
            self.instance.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && self.instance.len() <= 64,
            "instance",
            "INSTANCE",
            "letters, digits, - and _ (at most 64)",
        )?;

        let entries: Vec<&str> = self.backends.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
        if entries.is_empty() {
            return Err(ConfigError::NoBackends);
        }
        let mut pool: Vec<BackendAddr> = Vec::with_capacity(entries.len());
        for entry in entries {
            let addr: BackendAddr = entry.parse()?;
            if pool.iter().any(|b| b.url() == addr.url()) {
                return Err(ConfigError::DuplicateBackend(entry.to_owned()));
            }
            pool.push(addr);
        }
        Ok(pool)
    }

    /// The NATS servers of `--store`, or `None` for the embedded write log.
    ///
    /// # Errors
    /// [`ConfigError::Store`] when `--store` is neither empty nor a comma list of `nats://host:port` URLs.
    pub fn nats_store(&self) -> Result<Option<Vec<String>>, ConfigError> {
        let store = self.store.trim();
        if store.is_empty() {
            return Ok(None);
        }
        let mut urls = Vec::new();
        for url in store.split(',').map(str::trim) {
            let rest = url.strip_prefix("nats://").ok_or_else(|| {
                ConfigError::Store(format!("{url:?} is not a nats:// URL (nats://host:4222[,nats://host2:4222])"))
            })?;
            let ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains('/')
                    && !host.contains('@')
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(ConfigError::Store(format!("{url:?} must be nats://host:port, without user or path")));
            }
            urls.push(url.to_owned());
        }
        Ok(Some(urls))
    }

    /// The outbox directory, or `None` for in-memory operation (`--no-outbox`).
    pub fn outbox_dir(&self) -> Option<&std::path::Path> {
        Some(self.data_dir.as_path()).filter(|_| !self.no_outbox)
    }

    /// The keys of `--encryption-key-file`, read and parsed now, or `None` when it is not set. With
    /// `--no-outbox` too: nothing is stored then, but a key file that does not parse is still a mistake.
    ///
    /// # Errors
    /// [`ConfigError::KeyFile`] when the file cannot be read or a line is not a key.
    pub fn encryption_keys(&self) -> Result<Option<crate::log::seal::Keyring>, ConfigError> {
        let Some(path) = &self.encryption_key_file else { return Ok(None) };
        crate::log::seal::Keyring::load(path)
            .map(Some)
            .map_err(|e| ConfigError::KeyFile { path: path.display().to_string(), why: e.to_string() })
    }

    /// How much history the write log keeps (see `--history-window`, `--history-max-bytes`).
    pub fn history_limits(&self) -> crate::log::HistoryLimits {
        let max_bytes = self.history_max_bytes.as_u64();
        crate::log::HistoryLimits {
            window_ms: u64::try_from(self.history_window.as_millis()).unwrap_or(u64::MAX),
            max_bytes: if self.no_outbox { max_bytes.min(MEMORY_HISTORY_BYTES) } else { max_bytes },
        }
    }

    /// The admin token from `--admin-token-file` or `ADMIN_TOKEN` (the file wins when both are set), or `None`.
    ///
    /// # Errors
    /// [`ConfigError::AdminToken`] when the file cannot be read, or the token is shorter than
    /// [`MIN_ADMIN_TOKEN`] characters, spans lines or holds whitespace.
    pub fn admin_token(&self) -> Result<Option<crate::auth::AdminToken>, ConfigError> {
        let (text, flag) = match (&self.admin_token_file, &self.admin_token) {
            (Some(path), _) => (
                std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::AdminToken(format!("--admin-token-file (ADMIN_TOKEN_FILE) {}: {e}", path.display()))
                })?,
                "--admin-token-file (ADMIN_TOKEN_FILE)",
            ),
            (None, Some(token)) => (token.clone(), "ADMIN_TOKEN"),
            (None, None) => return Ok(None),
        };
        // A trailing newline (echo > file) is not part of the token.
        let token = text.strip_suffix('\n').unwrap_or(&text);
        let token = token.strip_suffix('\r').unwrap_or(token);
        if token.chars().any(char::is_whitespace) {
            return Err(ConfigError::AdminToken(format!("{flag}: the token must be one line without spaces")));
        }
        if token.chars().count() < MIN_ADMIN_TOKEN {
            return Err(ConfigError::AdminToken(format!(
                "{flag}: the token must be at least {MIN_ADMIN_TOKEN} characters (e.g. `openssl rand -hex 32`)"
            )));
        }
        Ok(Some(crate::auth::AdminToken::new(token)))
    }

    /// The address of the metrics listener: the IP of `--listen` with `--metrics-port`.
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen.ip(), self.metrics_port)
    }
}

/// Parses a human duration (`250ms`, `64s`, `1m 30s`); a bare number is read as seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 250ms, 64s, 1m)"))
}

/// Parses a human size (`64KiB`, `1MB`, `65536`).
fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.trim().parse::<ByteSize>().map_err(|e| format!("{e} (expected e.g. 64KiB, 1MiB, 65536)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let mut argv = vec!["fanout"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv)
    }

    fn valid(args: &[&str]) -> Result<Vec<BackendAddr>, ConfigError> {
        parse(args).expect("parses").validate()
    }

    #[test]
    fn defaults_match_the_design() {
        let c = parse(&["--backends", "server1:8080"]).expect("parses");
        assert_eq!(c.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.metrics_port, 8000);
        assert_eq!(c.max_attempts, 100);
        assert_eq!(c.initial_backoff, Duration::from_secs(1));
        assert_eq!(c.max_backoff, Duration::from_secs(64));
        assert_eq!(c.max_jitter, Duration::from_millis(100));
        assert_eq!(c.attempt_timeout, Duration::from_secs(10));
        assert_eq!(c.ack, AckPolicy::First);
        assert_eq!(c.ack_timeout, Duration::from_secs(30));
        assert_eq!(c.max_body, ByteSize::kib(64));
        assert_eq!(c.max_in_flight, 10_000);
        assert_eq!(c.breaker_failures, 5);
        assert_eq!(c.retry_budget_ratio, 0.2);
        assert_eq!(c.breaker_failure_rate, 0.8);
        assert_eq!(c.breaker_window, Duration::from_secs(10));
        assert_eq!(c.breaker_min_requests, 20);
        assert_eq!(c.probe_interval_max, Duration::from_secs(5));
        assert_eq!(c.metrics_addr(), "0.0.0.0:8000".parse().expect("addr"));
    }

    #[test]
    fn human_units_and_lists_parse() {
        let c = parse(&[
            "--backends",
            "server1:8080, http://server2:9000/api ,server3:8080",
            "--initial-backoff",
            "250ms",
            "--max-backoff",
            "1m",
            "--max-jitter",
            "0s",
            "--max-body",
            "1MiB",
            "--ack",
            "quorum",
            "--ack-timeout",
            "5",
        ])
        .expect("parses");
        assert_eq!(c.initial_backoff, Duration::from_millis(250));
        assert_eq!(c.max_backoff, Duration::from_secs(60));
        assert_eq!(c.max_jitter, Duration::ZERO);
        assert_eq!(c.max_body, ByteSize::mib(1));
        assert_eq!(c.ack, AckPolicy::Quorum);
        assert_eq!(c.ack_timeout, Duration::from_secs(5));
        let pool = c.validate().expect("valid");
        let labels: Vec<&str> = pool.iter().map(|b| b.label()).collect();
        assert_eq!(labels, ["server1:8080", "http://server2:9000/api", "server3:8080"]);
    }

    #[test]
    fn unparsable_values_are_rejected_by_clap_naming_the_flag() {
        for (flag, value) in [
            ("--max-backoff", "soon"),
            ("--max-body", "big"),
            ("--ack", "most"),
            ("--max-attempts", "-1"),
            ("--max-body", "-5"),
            ("--listen", "nowhere"),
            ("--metrics-port", "70000"),
        ] {
            let err = parse(&["--backends", "a:1", flag, value]).expect_err(flag);
            let text = err.to_string();
            assert!(text.contains(flag), "{flag}: {text}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn every_validation_rule_names_its_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--backends"),
            (&["--backends", " , "], "--backends"),
            (&["--backends", "server1"], "--backends"),
            (&["--backends", "ftp://server1:21"], "--backends"),
            (&["--backends", "a:1,a:1"], "listed twice"),
            (&["--backends", "a:1", "--max-attempts", "0"], "--max-attempts"),
            (&["--backends", "a:1", "--initial-backoff", "0s"], "--initial-backoff"),
            (&["--backends", "a:1", "--initial-backoff", "2m"], "--max-backoff"),
            (&["--backends", "a:1", "--attempt-timeout", "0s"], "--attempt-timeout"),
            (&["--backends", "a:1", "--ack-timeout", "0s"], "--ack-timeout"),
            (&["--backends", "a:1", "--max-body", "0"], "--max-body"),
            (&["--backends", "a:1", "--max-body", "2GiB"], "--max-body"),
            (&["--backends", "a:1", "--max-in-flight", "0"], "--max-in-flight"),
            (&["--backends", "a:1", "--max-pending", "0"], "--max-pending"),
            (&["--backends", "a:1", "--delivery-history", "0"], "--delivery-history"),
            (&["--backends", "a:1", "--backend-concurrency", "0"], "--backend-concurrency"),
            (&["--backends", "a:1", "--retry-budget-ratio", "-0.5"], "--retry-budget-ratio"),
            (&["--backends", "a:1", "--retry-budget-ratio", "NaN"], "--retry-budget-ratio"),
            (&["--backends", "a:1", "--retry-budget-min-per-sec", "2000000"], "--retry-budget-min-per-sec"),
            (&["--backends", "a:1", "--retry-budget-min-per-sec", "0"], "--retry-budget-min-per-sec"),
            (&["--backends", "a:1", "--max-backoff", "18446744073709551615s"], "--max-backoff"),
            (&["--backends", "a:1", "--max-jitter", "2d"], "--max-jitter"),
            (&["--backends", "a:1", "--pool-idle-timeout", "100000h"], "--pool-idle-timeout"),
            (&["--backends", "a:1", "--shutdown-timeout", "25h"], "--shutdown-timeout"),
            (&["--backends", "a:1", "--listen", "127.0.0.1:9000", "--metrics-port", "9000"], "--metrics-port"),
            (&["--backends", "http://a:0"], "--backends"),
            (&["--backends", "a:1", "--breaker-failure-rate", "0"], "--breaker-failure-rate"),
            (&["--backends", "a:1", "--breaker-failure-rate", "1.5"], "--breaker-failure-rate"),
            (&["--backends", "a:1", "--breaker-failure-rate", "NaN"], "--breaker-failure-rate"),
            (&["--backends", "a:1", "--breaker-window", "10ms"], "--breaker-window"),
            (&["--backends", "a:1", "--breaker-window", "2d"], "--breaker-window"),
            (&["--backends", "a:1", "--breaker-min-requests", "0"], "--breaker-min-requests"),
            (&["--backends", "a:1", "--probe-interval-max", "1ms"], "--probe-interval-max"),
            (&["--backends", "a:1", "--probe-interval-max", "25h"], "--probe-interval-max"),
            (&["--backends", "a:1", "--max-attempts", "3"], "--breaker-failures"),
            (&["--backends", "a:1", "--max-attempts", "3", "--breaker-failures", "4"], "--max-attempts"),
            (&["--backends", "a:1", "--encryption-key-file", "/nonexistent/keys"], "--encryption-key-file"),
            (&["--backends", "a:1", "--encryption-key-file", "/proc/self/status"], "--encryption-key-file"),
        ];
        for (args, needle) in cases {
            let err = valid(args).expect_err(needle);
            let line = err.to_string();
            assert!(line.contains(needle), "{args:?}: {line}");
            assert!(!line.contains('\n'), "one line: {line}");
        }
    }

    #[test]
    fn attempts_below_the_breaker_are_fine_without_it_or_with_a_lower_threshold() {
        assert!(valid(&["--backends", "a:1", "--max-attempts", "3", "--breaker-failures", "0"]).is_ok());
        assert!(valid(&["--backends", "a:1", "--max-attempts", "3", "--breaker-failures", "3"]).is_ok());
        assert!(valid(&["--backends", "a:1", "--max-attempts", "5"]).is_ok());
    }

    #[test]
    fn ack_policy_thresholds() {
        assert_eq!(AckPolicy::First.required(3), 1);
        assert_eq!(AckPolicy::Quorum.required(3), 2);
        assert_eq!(AckPolicy::Quorum.required(4), 3);
        assert_eq!(AckPolicy::Quorum.required(1), 1);
        assert_eq!(AckPolicy::All.required(3), 3);
    }

    #[test]
    fn help_states_the_required_flag_and_the_duration_syntax() {
        use clap::CommandFactory;
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("Required: --backends (BACKEND_POOL)"), "{help}");
        assert!(help.contains("a bare number is seconds"), "{help}");
        let short = Config::command().render_help().to_string();
        assert!(short.contains("a bare number is seconds"), "{short}");
    }
}
