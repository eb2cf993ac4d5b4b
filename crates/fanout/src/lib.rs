//! The fanout service: it delivers every write it receives to every backend of a pool, each backend retried on
//! its own with truncated exponential backoff and jitter, and answers the client per an ack policy. It rebuilds
//! the aiohttp load balancer of `schefs/load_balancer_service` (see docs/design.md) with bounded memory, clear answers
//! to bad input and the original's Prometheus series.
//!
//! # Layout
//! - [`config`]: the command line and environment ([`Config`]), validated before any port is bound.
//! - [`backoff`]: the retry schedule as pure functions, and `Retry-After` parsing.
//! - [`backend`]: a backend's address and the classification of an attempt's result.
//! - [`forward`]: which headers cross to the backends, and the ids added to them.
//! - [`delivery`]: the dispatcher: accepting a write, its place in every queue, answering its client, the bounds.
//! - [`tally`]: the ack policy's decision for one delivery, a pure function of the backends' results.
//! - [`attempt`]: one attempt on one backend: its result, and the transport (HTTP) that carries it.
//! - [`queue`]: one worker per backend draining its queue: per-user order, retries, breaker, retry budget; it
//!   reports what happened as events.
//! - [`breaker`]: the circuit breaker's state machine.
//! - [`log`]: the write log, the one seam to storage: accepted writes, queues, dead letters, idempotency records.
//! - [`jetstream`]: the NATS JetStream store (`--store nats://...`), shared by several instances, and its
//!   delivery workers.
//! - [`replay`]: idempotent client replay by `Idempotency-Key`.
//! - [`routes`]: the axum routers and the error type clients see.
//! - [`auth`]: the admin token the state-changing admin routes need.
//! - [`console`]: the operator console, a web page on the admin port (its files under `src/console/`).
//! - [`metrics`]: every metric name and HELP text.
//! - [`listen`]: the listeners' accept loop: header, idle and body timeouts, the connection caps.
//! - [`ratelog`]: at most one log line a second per kind of event that can come by the thousand.
//!
//! [`run`] is the seam: `main` and the tests call it with a config and two bound listeners.

pub mod attempt;
pub mod auth;
pub mod backend;
pub mod backoff;
pub mod breaker;
pub mod config;
pub mod console;
pub mod delivery;
pub mod forward;
pub mod jetstream;
pub mod listen;
pub mod log;
pub mod metrics;
pub mod queue;
pub mod ratelog;
pub mod replay;
pub mod routes;
pub mod tally;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use crate::config::{AckPolicy, Config, ConfigError, LogFormat};
use crate::delivery::{DispatchSettings, Dispatcher};
use crate::log::WriteLog;
use crate::metrics::Metrics;
use crate::routes::AppState;

/// How long the listeners get to close once the shutdown deadline has passed.
const FINAL_WAIT: Duration = Duration::from_millis(100);

/// How long fanout waits at start for a NATS store whose requests time out (a cluster electing its leaders).
const STORE_START_PATIENCE: Duration = Duration::from_secs(30);

/// How often histogram buffers are drained into the exposition.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why [`run`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// A listener failed.
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
    /// The data directory holds the outbox file of an earlier version, whose format is not read any more.
    #[error(
        "--data-dir (DATA_DIR) {dir} holds outbox.redb from an earlier version of fanout: let that version deliver \
         what it holds (until fanout_pending_deliveries is 0), then remove the file"
    )]
    OldOutbox {
        /// The directory.
        dir: String,
    },
    /// The NATS store cannot start (`--store`).
    #[error(transparent)]
    Nats(#[from] jetstream::StoreError),
    /// The write log cannot be opened or read.
    #[error("--data-dir (DATA_DIR) {dir}: {error}")]
    Store {
        /// The directory.
        dir: String,
        /// What failed.
        error: log::LogError,
    },
}

/// Serves the API on `api` and `/metrics` on `metrics_listener` until `shutdown` resolves, then stops accepting
/// writes, waits up to `--shutdown-timeout` for the clients still waiting and the attempts on the wire (without
/// an outbox: for the queues to drain), and returns.
///
/// # Errors
/// [`RunError`] when the config is invalid, the HTTP client cannot be built, or a listener fails.
pub async fn run(
    config: Config,
    api: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let pool = config.validate()?;
    let nats = config.nats_store()?;
    let keys = config.encryption_keys()?.map(Arc::new);
    if let Some(mode) = keys.as_ref().and_then(|k| k.loose_mode()) {
        tracing::warn!(
            mode = format!("{mode:o}"),
            "--encryption-key-file (ENCRYPTION_KEY_FILE) can be read by group or others: chmod 600 it"
        );
    }
    let metrics = Metrics::new();
    let pool_size = pool.len();
    let settings = DispatchSettings {
        pool,
        backoff: backoff::Backoff {
            initial: config.initial_backoff,
            max: config.max_backoff,
            max_jitter: config.max_jitter,
        },
        max_attempts: config.max_attempts,
        attempt_timeout: config.attempt_timeout,
        ack: config.ack,
        max_in_flight: config.max_in_flight,
        max_pending: config.max_pending,
        pool_idle_timeout: config.pool_idle_timeout,
        queue: queue::QueueSettings {
            concurrency: config.backend_concurrency,
            breaker_failures: config.breaker_failures,
            budget_ratio: config.retry_budget_ratio,
            budget_min_per_sec: config.retry_budget_min_per_sec,
            breaker_failure_rate: config.breaker_failure_rate,
            breaker_window: config.breaker_window,
            breaker_min_requests: config.breaker_min_requests,
            probe_interval_max: config.probe_interval_max,
        },
    };
    let window_ms = u64::try_from(config.idempotency_window.as_millis()).unwrap_or(u64::MAX);
    let (dispatcher, log, store) = match nats {
        Some(urls) => {
            let instance = instance_name(&config.instance);
            let transport = Arc::new(attempt::Http::new(settings.pool_idle_timeout, settings.attempt_timeout)?);
            let nats = jetstream::NatsSettings {
                urls: urls.clone(),
                replicas: config.store_replicas,
                partitions: config.partitions,
                instance: instance.clone(),
                idempotency_window: config.idempotency_window,
                history_window: config.history_window,
                history_max_bytes: config.history_max_bytes.as_u64(),
                keep_deliveries: config.delivery_history.saturating_mul(pool_size as u64 + 1),
            };
            // A cluster that just started elects its stream leaders in the first seconds: its requests time out
            // meanwhile. Those are waited out (30 s at most); a refusal (partitions, no JetStream) is not.
            let deadline = tokio::time::Instant::now() + STORE_START_PATIENCE;
            let cluster = loop {
                match jetstream::Cluster::start(
                    nats.clone(),
                    settings.clone(),
                    metrics.clone(),
                    keys.clone(),
                    transport.clone(),
                )
                .await
                {
                    Ok(cluster) => break cluster,
                    Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                        tracing::warn!(error = %e.0, "the NATS store is not ready yet (leaders being elected?): trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let store = format!("nats {} (instance {instance}, partitions {})", urls.join(","), config.partitions);
            (Dispatcher::nats(cluster), None, store)
        }
        None => {
            let (dispatcher, log) = embedded(&config, settings, metrics.clone(), keys).await?;
            let store = config.outbox_dir().map_or_else(|| "(in memory)".to_owned(), |d| d.display().to_string());
            (dispatcher, Some(log), store)
        }
    };
    let ordering_key = Some(config.ordering_key.trim()).filter(|k| !k.is_empty()).map(str::to_owned);
    let state = AppState {
        dispatcher: dispatcher.clone(),
        metrics: metrics.clone(),
        ack_timeout: config.ack_timeout,
        ordering_key,
    };
    let max_body = usize::try_from(config.max_body.as_u64()).unwrap_or(usize::MAX);
    let api_metrics = metrics.listener("api");
    let api_router = routes::api_router(state, max_body, config.body_timeout, api_metrics.clone());
    // Open files: the API's connections get what the backends' pools, the admin port and the log leave.
    let nofile = listen::raise_open_files_limit();
    let reserved = (pool_size * config.backend_concurrency + listen::ADMIN_MAX_CONNECTIONS) as u64;
    let max_connections = listen::fitting_cap(config.max_connections, nofile, reserved);
    if max_connections < config.max_connections {
        tracing::warn!(
            max_connections,
            open_files_limit = nofile,
            "--max-connections (MAX_CONNECTIONS) {} lowered to what the open-files limit allows (raise `ulimit -n`)",
            config.max_connections
        );
    }
    let admin_token = config.admin_token()?;
    let limits = |max_connections| listen::Limits {
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
        max_connections,
    };

    tracing::info!(
        api = %api.local_addr()?,
        metrics = %metrics_listener.local_addr()?,
        backends = %config.backends.join(","),
        ack = config.ack.as_str(),
        ack_timeout = ?config.ack_timeout,
        max_attempts = config.max_attempts,
        initial_backoff = ?config.initial_backoff,
        max_backoff = ?config.max_backoff,
        max_jitter = ?config.max_jitter,
        attempt_timeout = ?config.attempt_timeout,
        breaker_failures = config.breaker_failures,
        breaker_failure_rate = config.breaker_failure_rate,
        breaker_window = ?config.breaker_window,
        breaker_min_requests = config.breaker_min_requests,
        probe_interval_max = ?config.probe_interval_max,
        admin_actions = if admin_token.is_some() { "token" } else { "disabled" },
        max_connections,
        header_timeout = ?config.header_timeout,
        idle_timeout = ?config.idle_timeout,
        body_timeout = ?config.body_timeout,
        store = %store,
        "fanout listening"
    );

    let (stop_api, api_stopped) = watch::channel(false);
    let (stop_metrics, metrics_stopped) = watch::channel(false);
    let api_server =
        tokio::spawn(listen::serve(api, api_router, "api", limits(max_connections), api_metrics, api_stopped));
    let admin_router = routes::admin_router(metrics.clone(), dispatcher.clone(), admin_token);
    let metrics_server = tokio::spawn(listen::serve(
        metrics_listener,
        admin_router,
        "admin",
        limits(listen::ADMIN_MAX_CONNECTIONS),
        metrics.listener("admin"),
        metrics_stopped,
    ));
    let keep_delivered = config.delivery_history.saturating_mul(pool_size as u64);
    let upkeep = tokio::spawn({
        let metrics = metrics.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                if let Some(log) = &log {
                    log.tick(window_ms, keep_delivered);
                }
                if n.is_multiple_of(UPKEEP_INTERVAL.as_secs()) {
                    metrics.run_upkeep();
                }
            }
        }
    });

    shutdown.await;
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    tracing::info!(unfinished = dispatcher.unfinished(), "shutting down: no new writes accepted");
    let _ = stop_api.send(true);
    let pending = dispatcher.close(config.shutdown_timeout).await;
    if pending > 0 && dispatcher.durable() {
        tracing::info!(
            pending,
            "deliveries still pending stay in the outbox and resume at the next start (dead letters included: \
             see GET /dead-letters on the admin port)"
        );
    } else if pending > 0 {
        tracing::warn!(pending, "deliveries still pending at exit are lost: their backends may miss these writes");
    } else {
        tracing::info!("every delivery finished");
    }
    // Connections still open at the deadline (a handler waiting for its ack) are dropped with the process.
    let last_moment = deadline.max(tokio::time::Instant::now() + FINAL_WAIT);
    let _ = tokio::time::timeout_at(last_moment, api_server).await;
    let _ = stop_metrics.send(true);
    let _ = tokio::time::timeout(FINAL_WAIT, metrics_server).await;
    upkeep.abort();
    Ok(())
}

/// The embedded store: the write log in `--data-dir` (or memory with `--no-outbox`) and this process's queue
/// workers, resuming what the log holds.
async fn embedded(
    config: &Config,
    settings: DispatchSettings,
    metrics: Metrics,
    keys: Option<Arc<log::seal::Keyring>>,
) -> Result<(Dispatcher, Arc<dyn WriteLog>), RunError> {
    let store_error = |error| RunError::Store { dir: config.data_dir.display().to_string(), error };
    if config.data_dir.join("outbox.redb").exists() {
        // The store of earlier versions; its format is not read any more.
        return Err(RunError::OldOutbox { dir: config.data_dir.display().to_string() });
    }
    if config.no_outbox && config.data_dir.join("log").exists() {
        tracing::warn!(
            data_dir = %config.data_dir.display(),
            "--no-outbox: writes left in this write log by an earlier run are NOT delivered now; start without \
             --no-outbox to deliver them"
        );
    }
    if keys.is_some() && config.no_outbox {
        tracing::info!("--encryption-key-file: nothing is stored with --no-outbox, so nothing is encrypted");
    }
    let history = config.history_limits();
    let log: Arc<dyn WriteLog> = match config.outbox_dir() {
        Some(dir) => Arc::new(log::disk::DiskLog::open(&dir.join("log"), history, keys).map_err(store_error)?),
        None => Arc::new(log::memory::MemoryLog::with_history(history)),
    };
    let labels = settings.pool.iter().map(|b| b.label().to_owned()).collect();
    let startup = log.startup(labels).await.map_err(store_error)?;
    let window_ms = u64::try_from(config.idempotency_window.as_millis()).unwrap_or(u64::MAX);
    let keys = log.idempotency_keys(window_ms, log::now_ms()).await.map_err(store_error)?;
    let replays = replay::Replays::new(config.idempotency_window, keys, log::now_ms());
    let dispatcher = Dispatcher::new(settings, metrics, log.clone(), replays, &startup)?;
    let pending: u64 = startup.backends.values().map(|c| c.pending).sum();
    if pending > 0 || startup.orphaned > 0 {
        tracing::info!(pending, orphaned = startup.orphaned, "resuming the queues left in the outbox");
    }
    Ok((dispatcher, log))
}

/// This instance's name on the NATS store: `--instance`, or the host name (its letters, digits, `-` and `_`)
/// and four random hex digits, so that two instances on one host differ.
fn instance_name(given: &str) -> String {
    if !given.is_empty() {
        return given.to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(40).collect();
    let suffix: u16 = rand::random();
    if host.is_empty() { format!("fanout-{suffix:04x}") } else { format!("{host}-{suffix:04x}") }
}

/// Locks `mutex`, poisoned or not: every critical section of this crate leaves its data consistent (no code
/// panics halfway through an update), so the data behind a poisoned lock is still good.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
