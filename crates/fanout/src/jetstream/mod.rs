//! The NATS JetStream store (`--store nats://...`): several fanout instances share one distributed log, any
//! instance takes any write and any instance delivers any write (README "Scaling out").
//!
//! # What lives where
//! - **Stream `FANOUT_WRITES`**, subjects `fanout.writes.{p}`: every accepted write, published to the partition
//!   `p` of its ordering key (the user; [`partition`]) and acknowledged by the servers (a quorum of them with
//!   `--store-replicas 3`) before anything is sent. It is also the history a recovery replays.
//! - **One durable pull consumer per (backend, partition)**, `b{backend hash}-p{p}`, filtered on
//!   `fanout.writes.{p}`, with `max_ack_pending = 1`, pulled by every instance ([`deliver`]). A delivered write
//!   is acked, a failed attempt is NAKed with the backoff as its delay, a dead letter is acked once copied to
//!   `FANOUT_DEAD`.
//! - **Stream `FANOUT_DEAD`**, subjects `fanout.dead.{backend hash}`: dead letters, each with its write, listed,
//!   redriven and deleted from any instance.
//! - **KV bucket `fanout-keys`**: client idempotency records, for `--idempotency-window` (the bucket's max age).
//! - **KV bucket `fanout-deliveries`**: each delivery's acceptance (`{id}.a`) and each backend's part
//!   (`{id}.{backend hash}`), for `GET /deliveries/{id}` from any instance, for `--history-window`.
//! - **Core subject `fanout.outcomes.{instance}`**: whichever instance delivers a write tells the instance whose
//!   client waits how that backend ended, so that the ack policy is decided where the client is.
//!
//! # Per-user order across instances
//! A user's writes all go to one partition subject, in the order the stream stored them. A client is answered
//! only after the stream acknowledged its write, so two writes of one user that follow each other at the client
//! are stored in that order, through whichever instances. A backend's consumer of that partition hands out one
//! write at a time (`max_ack_pending = 1`), to any instance: the next is handed out only once this one is acked
//! (delivered, or copied to the dead letters). A NAKed write stays the one outstanding until it is acked, so
//! the next write of the partition waits behind its backoff. `ack_wait` is `--attempt-timeout` plus
//! [`ACK_MARGIN`]: an attempt is abandoned by its instance before the server would hand the write to another
//! one, so two attempts of one write never overlap (an instance that dies mid-attempt is the exception: its
//! attempt may still land after the server handed the write on, which the `Idempotency-Key` makes harmless).
//!
//! The cost: a user waiting in backoff on a backend holds back the other users of its partition on that backend,
//! and a backend takes at most `--partitions` writes at a time across all instances.
//!
//! The client crate is `async-nats`, NATS's official one, with the features Debian's nats-server 2.9 serves.

pub mod deliver;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{HeaderMap as NatsHeaders, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::attempt::{Answer, Transport};
use crate::delivery::{DispatchSettings, Reply, SubmitError, Submitted, Summary};
use crate::forward::ForwardRequest;
use crate::log::seal::{Keyring, Sealed};
use crate::log::{
    BackendState, BackendView, DeadFilter, DeadLetter, DeadRow, DeliveryView, HistoryStats, LogError, StoredDelivery,
    id_time_ms, now_ms, rfc3339_ms,
};
use crate::metrics::{DeadLetterReason, Metrics};
use crate::queue::RecoveryStatus;
use crate::replay::{Check, KeyRecord, StoredAnswer};
use crate::tally::{BackendResult, Decision, Tally};

/// The stream of accepted writes.
pub const WRITES: &str = "FANOUT_WRITES";
/// The stream of dead letters.
pub const DEAD: &str = "FANOUT_DEAD";
/// The KV bucket of client idempotency records.
pub const KEYS: &str = "fanout-keys";
/// The KV bucket of deliveries' progress.
pub const DELIVERIES: &str = "fanout-deliveries";
/// Added to `--attempt-timeout` for the consumers' `ack_wait`: time for the attempt's settlement (a dead
/// letter's copy, the ack) after the attempt gave up.
pub const ACK_MARGIN: Duration = Duration::from_secs(10);
/// The oldest server accepted: consumer NAK delays, direct gets and KV as used here are 2.9's.
const MIN_SERVER: (u64, u64) = (2, 9);
/// How often consumer lag, dead letters and the history are read from the servers.
const STATS_INTERVAL: Duration = Duration::from_secs(2);
/// How often the history is trimmed.
const TRIM_INTERVAL: Duration = Duration::from_secs(30);
/// How long a write's publication is tried again before its client gets `503`.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(10);
/// How far back from the newest dead letter those of a write refused everywhere are looked for.
const RECENT_DEAD: u64 = 1_000;
/// Most dead letters one admin call reads.
const MAX_DEAD_SCAN: usize = 10_000;

static STATS_FAILED: crate::ratelog::Every = crate::ratelog::Every::new();
static REFUSED_EVERYWHERE: crate::ratelog::Every = crate::ratelog::Every::new();
static NOT_STORED: crate::ratelog::Every = crate::ratelog::Every::new();

/// Settings of the NATS store, from [`crate::Config`].
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// The servers (`nats://host:port`).
    pub urls: Vec<String>,
    /// Replicas of the streams, consumers and buckets.
    pub replicas: usize,
    /// Partitions users are hashed into.
    pub partitions: u32,
    /// This instance's name (a subject token).
    pub instance: String,
    /// `--idempotency-window`: the age of the idempotency records.
    pub idempotency_window: Duration,
    /// `--history-window`: how long delivered writes and deliveries' progress are kept.
    pub history_window: Duration,
    /// `--history-max-bytes`: the writes stream's size bound (writes are refused with `503` past it).
    pub history_max_bytes: u64,
    /// Keys of `fanout-deliveries` kept at most: `--delivery-history` deliveries, each with a key per backend
    /// that has a part and one for its acceptance.
    pub keep_deliveries: u64,
}

/// Why the NATS store cannot start; the message names `--store`.
#[derive(Debug, thiserror::Error)]
#[error("--store (STORE): {0}")]
pub struct StoreError(pub String);

impl StoreError {
    /// True for a request that timed out or found no responder (a cluster still electing its leaders), which
    /// may pass by itself; false for a refusal that will not (no server, no JetStream, another partition count).
    pub fn is_transient(&self) -> bool {
        let e = self.0.as_str();
        !e.contains("cannot reach")
            && !e.contains("JetStream is not available")
            && !e.contains("partition count")
            && (e.contains("timed out") || e.contains("no responders") || e.contains("temporarily unavailable"))
    }
}

/// A write as published on `fanout.writes.{p}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WriteMsg {
    /// The delivery.
    pub id: u128,
    /// The instance whose client waits for it (its results go to `fanout.outcomes.{origin}`).
    pub origin: String,
    /// Set for a redrive or a recovery: only this backend (as written in `--backends`) takes it.
    pub only: Option<String>,
    /// The write.
    pub write: Stored,
}

/// A stored value, encrypted with `--encryption-key-file` when one is given (`log::seal`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Stored {
    /// Not encrypted: postcard bytes.
    Plain(Vec<u8>),
    /// Encrypted postcard bytes.
    Sealed(Sealed),
}

/// A dead letter as published on `fanout.dead.{backend hash}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct DeadMsg {
    /// The write, as it was published.
    pub write: WriteMsg,
    /// The backend, as written in `--backends`.
    pub backend: String,
    /// Why, when, after how many attempts.
    pub row: DeadRow,
}

/// How a backend's part of a delivery ended, sent to the instance whose client waits.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OutcomeMsg {
    pub id: u128,
    pub backend: String,
    pub delivered: bool,
    pub attempts: u32,
    pub reason: Option<String>,
    pub status: Option<u16>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// One backend's part of a delivery in `fanout-deliveries`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Part {
    pub state: PartState,
    pub attempts: u32,
    pub status: Option<u16>,
    pub outcome: Option<String>,
    pub reason: Option<String>,
    pub next_attempt_ms: Option<u64>,
}

impl Part {
    /// The part of a dead letter that ended as `state` (deleted, or refused everywhere): its last attempt as the
    /// dead letter kept it.
    fn ended(state: PartState, row: &DeadRow) -> Self {
        Part {
            state,
            attempts: row.attempts,
            status: row.last_status,
            outcome: row.last_outcome.clone(),
            reason: Some(row.reason.clone()),
            next_attempt_ms: None,
        }
    }
}

/// Where a backend's part stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PartState {
    Pending,
    Delivered,
    DeadLetter,
    Discarded,
    /// Every backend refused the write: applied nowhere, its dead letters dropped.
    Refused,
}

/// A delivery's acceptance in `fanout-deliveries`.
#[derive(Debug, Serialize, Deserialize)]
struct Accepted {
    at_ms: u64,
    backends: Vec<String>,
    /// Where the write is in the stream: a backend whose consumer of `partition` has acked past `seq` has it.
    seq: u64,
    partition: u32,
}

/// An idempotency record in `fanout-keys`: the record, and whether its write is stored.
#[derive(Debug, Serialize, Deserialize)]
struct KeyEntry {
    record: KeyRecord,
    stored: bool,
}

/// The partition of a write: of its ordering key (every write of a user in one partition), or of its id when
/// it has none.
pub fn partition(ordering_key: Option<&str>, id: u128, partitions: u32) -> u32 {
    let hash = match ordering_key {
        Some(key) => crc32fast::hash(key.as_bytes()),
        None => crc32fast::hash(&id.to_le_bytes()),
    };
    hash % partitions.max(1)
}

/// A backend's token in subjects, consumer names and keys: 12 hex digits of the SHA-256 of its label (labels
/// hold `.` and `:`, which subjects and names cannot).
pub fn backend_hash(label: &str) -> String {
    let digest = Sha256::digest(label.as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The durable consumer of `backend_hash`'s partition `p`.
pub fn consumer_name(backend_hash: &str, p: u32) -> String {
    format!("b{backend_hash}-p{p}")
}

fn nats_error(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Nats(format!("{what}: {e}"))
}

/// Opens KV bucket `name`, making it first when missing: values kept for `max_age`, one revision per key, at
/// most `max_keys` keys (the oldest go first).
///
/// The bucket's stream is made here after the KV conventions (stream `KV_{name}` on `$KV.{name}.>`, one message
/// per subject, roll-ups, direct gets) because the client's own bucket creation first reads the account's
/// JetStream info in a shape nats-server 2.9 does not send.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
    max_keys: u64,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    let fail = |e: &dyn std::fmt::Display| StoreError(format!("KV bucket {name}: {e}"));
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        description: Some(format!("fanout: KV bucket {name}")),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        // Bounded like the embedded store's maps: past `max_keys`, the oldest keys are forgotten first.
        max_messages: i64::try_from(max_keys).unwrap_or(i64::MAX),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    })
    .await
    .map_err(|e| fail(&e))?;
    js.get_key_value(name).await.map_err(|e| fail(&e))
}

/// A waiting client: its tally and where its answer goes.
struct Waiter {
    tally: Tally,
    tx: oneshot::Sender<Reply>,
}

/// Removes a waiting client's tally when its handler is done, and gives back its permit.
struct WaitGuard {
    cluster: Arc<Cluster>,
    id: u128,
    _permit: OwnedSemaphorePermit,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        crate::lock(&self.cluster.waiting).remove(&self.id);
    }
}

/// One instance's view of the shared store, and its delivery workers. Cheap to share (`Arc`).
pub struct Cluster {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) writes: stream::Stream,
    pub(crate) dead: stream::Stream,
    keys_kv: kv::Store,
    pub(crate) deliveries: kv::Store,
    pub(crate) settings: NatsSettings,
    pub(crate) dispatch: DispatchSettings,
    pub(crate) labels: Vec<Arc<str>>,
    pub(crate) hashes: Vec<String>,
    pub(crate) metrics: Metrics,
    /// Each backend's series, in pool order (registered once: registering again zeroes them).
    pub(crate) backend_metrics: Vec<crate::metrics::BackendMetrics>,
    pub(crate) seal: Option<Arc<Keyring>>,
    waiting: Mutex<HashMap<u128, Waiter>>,
    clients: Arc<Semaphore>,
    closing: AtomicBool,
    pub(crate) stop: watch::Sender<bool>,
    answer_now: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    background: Mutex<Vec<JoinHandle<()>>>,
    /// This instance's workers per backend, in pool order.
    backends: Mutex<Vec<Arc<deliver::Backend>>>,
    /// Per backend in pool order, as last read from the store: (consumer lag, dead letters).
    counts: Mutex<Vec<(u64, u64)>>,
    /// False after a write the store did not take, until one it takes (readiness reports it).
    store_ok: AtomicBool,
    /// Writes not finished on the backend furthest behind (consumer lag, refreshed every [`STATS_INTERVAL`]).
    lag: AtomicU64,
    history: Mutex<HistoryStats>,
    recoveries: Mutex<HashMap<String, deliver::RecoveryRun>>,
}

impl Cluster {
    /// Connects to `settings.urls`, checks the server, creates or checks the streams, consumers and buckets,
    /// and starts this instance's delivery workers and its results subscription.
    ///
    /// # Errors
    /// [`StoreError`] (one line naming `--store`) when no server answers, the server is older than 2.9 or has no
    /// JetStream, or the streams were made with another `--partitions`.
    pub async fn start(
        settings: NatsSettings,
        dispatch: DispatchSettings,
        metrics: Metrics,
        seal: Option<Arc<Keyring>>,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<Self>, StoreError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| StoreError(format!("{what}: {e}"));
        let addrs = settings
            .urls
            .iter()
            .map(|u| u.parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail("bad server URL", &e))?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("fanout {}", settings.instance))
            .connection_timeout(Duration::from_secs(5))
            .connect(addrs)
            .await
            .map_err(|e| fail(&format!("cannot reach {}", settings.urls.join(",")), &e))?;
        let info = client.server_info();
        let mut version = info.version.split('.').map(|n| n.parse::<u64>().unwrap_or(0));
        let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
        if (major, minor) < MIN_SERVER {
            return Err(StoreError(format!(
                "nats-server {} is too old: fanout needs 2.9 or newer (JetStream NAK delays, direct gets)",
                info.version
            )));
        }
        let js = jetstream::new(client.clone());
        // The account's JetStream info, read raw: the client's typed answer expects fields 2.9 does not send.
        let no_js = "JetStream is not available on this server (start nats-server with -js)";
        let answer = client.request("$JS.API.INFO", Bytes::new()).await.map_err(|e| fail(no_js, &e))?;
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload).map_err(|e| fail(no_js, &e))?;
        if let Some(error) = answer.get("error") {
            return Err(StoreError(format!("{no_js}: {error}")));
        }

        let replicas = settings.replicas;
        let description = format!("fanout: accepted writes; partitions={}", settings.partitions);
        let writes = js
            .get_or_create_stream(stream::Config {
                name: WRITES.to_owned(),
                description: Some(description.clone()),
                subjects: vec!["fanout.writes.>".to_owned()],
                retention: stream::RetentionPolicy::Limits,
                discard: stream::DiscardPolicy::New,
                max_bytes: i64::try_from(settings.history_max_bytes).unwrap_or(i64::MAX),
                storage: stream::StorageType::File,
                num_replicas: replicas,
                duplicate_window: Duration::from_secs(120),
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&format!("stream {WRITES}"), &e))?;
        let found = writes.cached_info().config.description.clone().unwrap_or_default();
        if found != description {
            return Err(StoreError(format!(
                "stream {WRITES} was made for another partition count ({found:?}): --partitions (PARTITIONS) must be \
                 {} on every instance and every start",
                found.rsplit('=').next().unwrap_or("?")
            )));
        }
        let dead = js
            .get_or_create_stream(stream::Config {
                name: DEAD.to_owned(),
                description: Some("fanout: dead letters".to_owned()),
                subjects: vec!["fanout.dead.>".to_owned()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&format!("stream {DEAD}"), &e))?;
        let keys_kv = bucket(&js, KEYS, settings.idempotency_window, crate::replay::MAX_KEYS as u64, replicas).await?;
        // A write's part holds its attempts so far: it must outlive the longest backoff, so a day at least.
        let parts_age = settings.history_window.max(Duration::from_secs(24 * 3600));
        let deliveries = bucket(&js, DELIVERIES, parts_age, settings.keep_deliveries, replicas).await?;

        let labels: Vec<Arc<str>> = dispatch.pool.iter().map(|a| Arc::from(a.label())).collect();
        let hashes: Vec<String> = labels.iter().map(|l| backend_hash(l)).collect();
        let dispatch_labels_metrics = labels.iter().map(|l| metrics.backend(l)).collect();
        for label in &labels {
            for p in 0..settings.partitions {
                let config = deliver::consumer_config(dispatch.attempt_timeout, label, p, consumer::DeliverPolicy::New);
                let name = config.durable_name.clone().unwrap_or_default();
                let ack_wait = config.ack_wait;
                let mut found: consumer::PullConsumer = writes
                    .get_or_create_consumer(&name, config)
                    .await
                    .map_err(|e| fail(&format!("consumer {name} of {WRITES}"), &e))?;
                // Made by an instance with a shorter --attempt-timeout: an attempt could outlive the server's
                // patience, so the wait is raised (never lowered: a longer one only delays a dead instance's
                // writes). Each instance's attempts must fit the shortest wait, which is then its own.
                let current = found.info().await.map_err(|e| fail(&format!("consumer {name}"), &e))?.config.clone();
                if current.ack_wait < ack_wait {
                    let raised = consumer::Config { ack_wait, ..current };
                    writes
                        .create_consumer(raised)
                        .await
                        .map_err(|e| fail(&format!("raising the ack wait of consumer {name}"), &e))?;
                }
            }
        }
        let outcomes = client
            .subscribe(format!("fanout.outcomes.{}", settings.instance))
            .await
            .map_err(|e| fail("subscribing to the results subject", &e))?;

        let (stop, _) = watch::channel(false);
        let cluster = Arc::new(Cluster {
            client,
            js,
            writes,
            dead,
            keys_kv,
            deliveries,
            clients: Arc::new(Semaphore::new(dispatch.max_in_flight)),
            settings,
            dispatch,
            labels,
            hashes,
            backend_metrics: dispatch_labels_metrics,
            metrics,
            seal,
            waiting: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            store_ok: AtomicBool::new(true),
            stop,
            answer_now: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            background: Mutex::new(Vec::new()),
            backends: Mutex::new(Vec::new()),
            counts: Mutex::new(Vec::new()),
            lag: AtomicU64::new(0),
            history: Mutex::new(HistoryStats::default()),
            recoveries: Mutex::new(HashMap::new()),
        });
        let (tasks, backends) = deliver::start(&cluster, transport);
        *crate::lock(&cluster.tasks) = tasks;
        *crate::lock(&cluster.backends) = backends;
        // These two end with the instance: stopped at the end of `close`, not waited for.
        *crate::lock(&cluster.background) =
            vec![tokio::spawn(cluster.clone().receive_outcomes(outcomes)), tokio::spawn(cluster.clone().keep_stats())];
        cluster.refresh_stats().await;
        Ok(cluster)
    }

    /// Encodes `value`, sealed with the key file's current key (bound to `id`) when there is one.
    pub(crate) fn store_value<T: Serialize>(&self, id: u128, value: &T) -> Result<Stored, LogError> {
        let plain = postcard::to_stdvec(value)?;
        Ok(match &self.seal {
            Some(keys) => Stored::Sealed(keys.seal(id, &plain).map_err(|e| LogError::Sealed(e.to_string()))?),
            None => Stored::Plain(plain),
        })
    }

    /// Decodes a value stored by [`Cluster::store_value`] for `id`.
    pub(crate) fn open_value<T: serde::de::DeserializeOwned>(&self, id: u128, stored: &Stored) -> Result<T, LogError> {
        match stored {
            Stored::Plain(bytes) => Ok(postcard::from_bytes(bytes)?),
            Stored::Sealed(sealed) => {
                let keys = self
                    .seal
                    .as_ref()
                    .ok_or_else(|| LogError::Sealed("a record is encrypted and no key file is given".to_owned()))?;
                let plain = keys.open(id, sealed).map_err(|e| LogError::Sealed(e.to_string()))?;
                Ok(postcard::from_bytes(&plain)?)
            }
        }
    }

    /// Accepts `request` (see [`crate::delivery::Dispatcher::submit`]): it is published to its partition, and
    /// its client waits for the backends' results from whichever instances deliver it.
    pub fn submit(
        self: &Arc<Self>,
        id: Uuid,
        request: ForwardRequest,
        ordering_key: Option<&str>,
        idempotency: Option<(String, KeyRecord)>,
    ) -> Result<Submitted, SubmitError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        if self.unfinished() >= self.dispatch.max_pending {
            self.metrics.rejected();
            return Err(SubmitError::Busy);
        }
        let permit = match self.clients.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.metrics.rejected();
                return Err(SubmitError::Busy);
            }
        };
        let id = id.as_u128();
        let (tx, rx) = oneshot::channel();
        crate::lock(&self.waiting).insert(id, Waiter { tally: Tally::new(self.dispatch.ack, self.labels.len()), tx });
        let labels = self.labels.iter().map(|l| l.to_string()).collect();
        let record = StoredDelivery::from_request(0, &request, ordering_key.map(str::to_owned), labels);
        tokio::spawn(self.clone().publish(id, record, idempotency));
        Ok(Submitted::new(
            rx,
            self.answer_now.subscribe(),
            Box::new(WaitGuard { cluster: self.clone(), id, _permit: permit }),
        ))
    }

    async fn publish(self: Arc<Self>, id: u128, record: StoredDelivery, idempotency: Option<(String, KeyRecord)>) {
        let p = partition(record.ordering_key.as_deref(), id, self.settings.partitions);
        let (at_ms, backends) = (record.accepted_at_ms, record.backends.clone());
        let result = async {
            let write = WriteMsg {
                id,
                origin: self.settings.instance.clone(),
                only: None,
                write: self.store_value(id, &record)?,
            };
            let payload = Bytes::from(postcard::to_stdvec(&write)?);
            self.publish_patiently(format!("fanout.writes.{p}"), format!("{id:032x}"), payload).await
        }
        .await;
        match result {
            Ok(seq) => {
                self.store_ok.store(true, Ordering::Relaxed);
                if let Some((key, record)) = idempotency {
                    self.put_key(&key, KeyEntry { record, stored: true }).await;
                }
                let accepted = Accepted { at_ms, backends, seq, partition: p };
                if let Ok(value) = postcard::to_stdvec(&accepted) {
                    let _ = self.deliveries.put(format!("{id:032x}.a"), value.into()).await;
                }
            }
            Err(err) => {
                self.metrics.store_failure();
                self.store_ok.store(false, Ordering::Relaxed);
                // A full stream refused it for good; any other failure leaves its fate unknown.
                let decision =
                    if matches!(err, LogError::NatsRefused(_)) { Decision::Refused } else { Decision::Unconfirmed };
                if let Some(n) = NOT_STORED.hit() {
                    tracing::error!(error = %err, n, "writes not confirmed by the store: answered 503");
                }
                if let Some(w) = crate::lock(&self.waiting).remove(&id) {
                    let summary = Summary::from_view(Uuid::from_u128(id), w.tally.view(&[], 0));
                    let _ = w.tx.send(Reply { decision, summary });
                }
            }
        }
    }

    /// Publishes to a stream and waits for the servers' acknowledgement, trying again for up to
    /// [`PUBLISH_PATIENCE`] when the stream cannot take it now (a server lost, a stream leader being elected, a
    /// reconnect): a client waits a few seconds through a failover rather than getting `503`. The message id
    /// makes the stream store it once however many tries reach it (its duplicate window is 2 minutes). Returns
    /// the stream sequence it got.
    pub(crate) async fn publish_patiently(
        &self,
        subject: String,
        msg_id: String,
        payload: Bytes,
    ) -> Result<u64, LogError> {
        let deadline = tokio::time::Instant::now() + PUBLISH_PATIENCE;
        let mut wait = Duration::from_millis(50);
        loop {
            let mut headers = NatsHeaders::new();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            let tried = async {
                self.js
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await
                    .map_err(|e| nats_error("publishing", e))?
                    .await
                    .map_err(|e| nats_error("storing", e))
            }
            .await;
            match tried {
                Ok(ack) => return Ok(ack.sequence),
                // The stream is full (JetStream error 10077): definite, no use trying again.
                Err(LogError::Nats(e)) if e.contains("maximum bytes") || e.contains("10077") => {
                    return Err(LogError::NatsRefused(e));
                }
                Err(e) if tokio::time::Instant::now() + wait >= deadline => return Err(e),
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Feeds each backend's result, from whichever instance delivered it, to the tally of the waiting client.
    async fn receive_outcomes(self: Arc<Self>, mut outcomes: async_nats::Subscriber) {
        while let Some(msg) = outcomes.next().await {
            let Ok(o) = postcard::from_bytes::<OutcomeMsg>(&msg.payload) else { continue };
            let Some(index) = self.labels.iter().position(|l| **l == *o.backend) else { continue };
            let answer = o.status.and_then(|s| axum::http::StatusCode::from_u16(s).ok()).map(|status| Answer {
                status,
                content_type: o.content_type.as_deref().and_then(|c| axum::http::HeaderValue::from_str(c).ok()),
                body: Bytes::from(o.body),
            });
            let result = if o.delivered {
                BackendResult::Delivered { attempts: o.attempts, answer: answer.unwrap_or_else(Answer::created) }
            } else {
                let reason = match o.reason.as_deref() {
                    Some("rejected") => DeadLetterReason::Rejected,
                    _ => DeadLetterReason::Exhausted,
                };
                BackendResult::DeadLetter { attempts: o.attempts, reason, answer }
            };
            let mut waiting = crate::lock(&self.waiting);
            let Some(w) = waiting.get_mut(&o.id) else { continue };
            w.tally.record(index, result);
            let decision = w.tally.decide();
            if decision == Decision::Wait {
                continue;
            }
            if let Some(w) = waiting.remove(&o.id) {
                if matches!(decision, Decision::PassBack { .. }) {
                    // Refused by every backend with the same client error: applied nowhere, nothing to redrive.
                    tokio::spawn(self.clone().drop_refused(o.id));
                }
                let summary = Summary::from_view(Uuid::from_u128(o.id), w.tally.view(&self.labels, id_time_ms(o.id)));
                let _ = w.tx.send(Reply { decision, summary });
            }
        }
    }

    fn key_name(key: &str) -> String {
        Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    async fn put_key(&self, key: &str, entry: KeyEntry) {
        let value = self.store_value(0, &entry).and_then(|v| Ok(postcard::to_stdvec(&v)?));
        match value {
            Ok(value) => {
                if let Err(e) = self.keys_kv.put(Self::key_name(key), value.into()).await {
                    tracing::warn!(error = %e, "an idempotency record was not stored: a replay may not be recognised");
                }
            }
            Err(e) => tracing::warn!(error = %e, "an idempotency record was not encoded"),
        }
    }

    async fn get_key(&self, key: &str) -> Result<Option<KeyEntry>, LogError> {
        let Some(bytes) = self.keys_kv.get(Self::key_name(key)).await.map_err(|e| nats_error("reading a key", e))?
        else {
            return Ok(None);
        };
        let stored: Stored = postcard::from_bytes(&bytes)?;
        Ok(Some(self.open_value(0, &stored)?))
    }

    /// Checks a client's idempotency key across instances, reserving it for `id` when it is new (a KV create:
    /// of two instances reserving one key at once, one wins).
    pub async fn check_key(&self, key: &str, body_hash: [u8; 32], id: u128) -> Check {
        let record = KeyRecord { delivery_id: id, body_hash, at_ms: now_ms(), answer: None };
        let entry = KeyEntry { record: record.clone(), stored: false };
        let Ok(value) = self.store_value(0, &entry).and_then(|v| Ok(postcard::to_stdvec(&v)?)) else {
            return Check::Unavailable;
        };
        let value = Bytes::from(value);
        let deadline = tokio::time::Instant::now() + PUBLISH_PATIENCE;
        let mut wait = Duration::from_millis(50);
        loop {
            match self.keys_kv.create(Self::key_name(key), value.clone()).await {
                Ok(_) => return Check::New(record),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => break,
                Err(e) if tokio::time::Instant::now() + wait >= deadline => {
                    tracing::warn!(error = %e, "an idempotency key could not be checked: 503");
                    return Check::Unavailable;
                }
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
        match self.get_key(key).await {
            // Our own reservation, whose first answer was lost on the way back.
            Ok(Some(KeyEntry { record: found, stored: false })) if found.delivery_id == id => Check::New(record),
            Ok(Some(KeyEntry { record, stored })) if record.body_hash == body_hash => {
                if stored {
                    Check::Replay(record)
                } else {
                    Check::InProgress
                }
            }
            Ok(Some(_)) => Check::Conflict,
            // Expired or released between the two calls.
            Ok(None) => Check::InProgress,
            Err(_) => Check::Unavailable,
        }
    }

    /// Releases a key reserved for a write that was refused.
    pub fn release_key(self: &Arc<Self>, key: &str, id: u128) {
        let this = self.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            if let Ok(Some(entry)) = this.get_key(&key).await
                && entry.record.delivery_id == id
            {
                let _ = this.keys_kv.delete(Self::key_name(&key)).await;
            }
        });
    }

    /// Keeps the answer given under a key, so that a replay through any instance gets it.
    pub async fn answered(&self, key: &str, record: KeyRecord, answer: StoredAnswer) {
        self.put_key(key, KeyEntry { record: KeyRecord { answer: Some(answer), ..record }, stored: true }).await;
    }

    pub(crate) async fn put_part(&self, id: u128, hash: &str, part: &Part) {
        if let Ok(value) = postcard::to_stdvec(part)
            && let Err(e) = self.deliveries.put(format!("{id:032x}.{hash}"), value.into()).await
        {
            tracing::debug!(error = %e, "a delivery's progress was not stored");
        }
    }

    /// A delivery as stored, from any instance.
    ///
    /// # Errors
    /// When the bucket cannot be read.
    pub async fn lookup(&self, id: Uuid) -> Result<Option<Summary>, LogError> {
        let id = id.as_u128();
        let read = |e| nats_error("reading a delivery", e);
        let Some(bytes) = self.deliveries.get(format!("{id:032x}.a")).await.map_err(read)? else {
            return Ok(None);
        };
        let accepted: Accepted = postcard::from_bytes(&bytes)?;
        let mut backends = Vec::with_capacity(accepted.backends.len());
        for label in accepted.backends {
            let part = match self.deliveries.get(format!("{id:032x}.{}", backend_hash(&label))).await.map_err(read)? {
                Some(bytes) => Some(postcard::from_bytes::<Part>(&bytes)?),
                None => None,
            };
            // No part: the write went through on its first attempt (only then is none written), or it waits.
            let part = match part {
                None if self.acked(&label, accepted.partition, accepted.seq).await? => Some(Part {
                    state: PartState::Delivered,
                    attempts: 1,
                    status: Some(201),
                    outcome: Some(crate::backend::Outcome::Success.as_str().to_owned()),
                    reason: None,
                    next_attempt_ms: None,
                }),
                part => part,
            };
            backends.push(match part {
                None => BackendView::pending(label),
                Some(p) => BackendView {
                    backend: label,
                    state: match p.state {
                        PartState::Pending => BackendState::Pending,
                        PartState::Delivered => BackendState::Delivered,
                        PartState::DeadLetter => BackendState::DeadLetter,
                        PartState::Discarded => BackendState::Discarded,
                        PartState::Refused => BackendState::Refused,
                    },
                    attempts: p.attempts,
                    status: p.status,
                    outcome: p.outcome,
                    reason: p.reason,
                    next_attempt_at: p.next_attempt_ms.map(rfc3339_ms),
                },
            });
        }
        let view = DeliveryView { accepted_at_ms: accepted.at_ms, backends };
        Ok(Some(Summary::from_view(Uuid::from_u128(id), view)))
    }

    /// True when backend `label`'s consumer of `partition` has acked the write at stream sequence `seq` (it hands
    /// out one write at a time, so everything up to its ack floor is finished there).
    async fn acked(&self, label: &str, partition: u32, seq: u64) -> Result<bool, LogError> {
        let name = consumer_name(&backend_hash(label), partition);
        let info = self.writes.consumer_info(&name).await.map_err(|e| nats_error("reading a consumer", e))?;
        Ok(info.ack_floor.stream_sequence >= seq)
    }

    /// The dead letters matching `filter` (at most `limit`), oldest first, each with its stream sequence.
    async fn scan_dead(&self, filter: &DeadFilter, limit: usize) -> Result<Vec<(u64, DeadMsg)>, LogError> {
        let subject = match &filter.backend {
            Some(b) => format!("fanout.dead.{}", backend_hash(b)),
            None => "fanout.dead.>".to_owned(),
        };
        let mut out = Vec::new();
        let mut seq = 1;
        while out.len() < limit {
            let msg = match self.dead.direct_get_next_for_subject(subject.as_str(), Some(seq)).await {
                Ok(msg) => msg,
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(nats_error("reading the dead letters", e)),
            };
            seq = msg.sequence + 1;
            let dead: DeadMsg = postcard::from_bytes(&msg.payload)?;
            if filter.id.is_none_or(|id| id == dead.write.id) {
                out.push((msg.sequence, dead));
            }
        }
        Ok(out)
    }

    /// Up to `want` dead letters of write `id` among the newest [`RECENT_DEAD`] of the stream, newest first: a
    /// write's dead letters were just published when every backend refused it, so this reads a few messages
    /// where [`Cluster::scan_dead`] would read every dead letter.
    async fn recent_dead(&self, id: u128, want: usize) -> Result<Vec<(u64, DeadMsg)>, LogError> {
        let info = self.dead.get_info().await.map_err(|e| nats_error("reading the dead letters", e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut out = Vec::new();
        let mut seq = last;
        while seq >= first.max(1) && last - seq < RECENT_DEAD && out.len() < want {
            match self.dead.direct_get(seq).await {
                Ok(msg) => {
                    let dead: DeadMsg = postcard::from_bytes(&msg.payload)?;
                    if dead.write.id == id {
                        out.push((seq, dead));
                    }
                }
                // Deleted since (redriven or discarded).
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(nats_error("reading the dead letters", e)),
            }
            seq -= 1;
        }
        Ok(out)
    }

    fn dead_letter_view(&self, dead: &DeadMsg) -> DeadLetter {
        let path = self
            .open_value::<StoredDelivery>(dead.write.id, &dead.write.write)
            .map(|w| w.path_and_query.split('?').next().unwrap_or_default().to_owned())
            .unwrap_or_default();
        DeadLetter {
            delivery_id: Uuid::from_u128(dead.write.id),
            backend: dead.backend.clone(),
            seq: 0,
            path,
            attempts: dead.row.attempts,
            reason: dead.row.reason.clone(),
            last_status: dead.row.last_status,
            dead_at: rfc3339_ms(dead.row.at_ms),
        }
    }

    /// Up to `limit` dead letters, of one backend or all, oldest first.
    ///
    /// # Errors
    /// When the dead letters cannot be read.
    pub async fn dead_letters(&self, backend: Option<String>, limit: usize) -> Result<Vec<DeadLetter>, LogError> {
        let found = self.scan_dead(&DeadFilter { backend, id: None }, limit).await?;
        Ok(found.iter().map(|(seq, d)| DeadLetter { seq: *seq, ..self.dead_letter_view(d) }).collect())
    }

    /// Puts the dead letters matching `filter` back to their backend, for that backend only; returns
    /// (backend, dead-letter sequence) of each. Each is published before its dead letter is deleted, so a
    /// failure halfway leaves a dead letter that is also queued (delivered twice at worst, which its
    /// `Idempotency-Key` makes harmless), never one that is neither.
    ///
    /// # Errors
    /// When the store fails; those moved so far stay moved.
    pub async fn redrive(&self, filter: DeadFilter) -> Result<Vec<(String, u64)>, LogError> {
        let mut moved = Vec::new();
        for (seq, dead) in self.scan_dead(&filter, MAX_DEAD_SCAN).await? {
            if !self.labels.iter().any(|l| **l == *dead.backend) {
                continue;
            }
            let record: StoredDelivery = self.open_value(dead.write.id, &dead.write.write)?;
            let p = partition(record.ordering_key.as_deref(), dead.write.id, self.settings.partitions);
            let write = WriteMsg {
                id: dead.write.id,
                origin: String::new(),
                only: Some(dead.backend.clone()),
                write: dead.write.write,
            };
            // Its part first: once published, the write may be delivered (and its part say so) at once.
            let part = Part {
                state: PartState::Pending,
                attempts: 0,
                status: dead.row.last_status,
                outcome: dead.row.last_outcome.clone(),
                reason: None,
                next_attempt_ms: None,
            };
            self.put_part(write.id, &backend_hash(&dead.backend), &part).await;
            let payload = Bytes::from(postcard::to_stdvec(&write)?);
            self.publish_patiently(format!("fanout.writes.{p}"), format!("{:032x}.r{seq}", write.id), payload).await?;
            self.dead.delete_message(seq).await.map_err(|e| nats_error("deleting a redriven dead letter", e))?;
            moved.push((dead.backend, seq));
        }
        Ok(moved)
    }

    /// Deletes the dead letters matching `filter` for good; their parts show `discarded`.
    ///
    /// # Errors
    /// When the store fails; those deleted so far stay deleted.
    pub async fn discard(&self, filter: DeadFilter) -> Result<Vec<(String, u64)>, LogError> {
        let mut gone = Vec::new();
        for (seq, dead) in self.scan_dead(&filter, MAX_DEAD_SCAN).await? {
            self.dead.delete_message(seq).await.map_err(|e| nats_error("deleting a dead letter", e))?;
            self.put_part(dead.write.id, &backend_hash(&dead.backend), &Part::ended(PartState::Discarded, &dead.row))
                .await;
            tracing::warn!(backend = %dead.backend, "a dead letter was discarded: this write will not reach this backend");
            gone.push((dead.backend, seq));
        }
        Ok(gone)
    }

    /// When every backend refused write `id` (the client got their common `4xx`), deletes its dead letters and
    /// marks its parts `refused`, as the embedded store does: it was applied nowhere, so there is nothing to
    /// redrive, and it must not hold `--max-pending`. Decided where the client waited; a write whose client had
    /// stopped waiting keeps its dead letters.
    async fn drop_refused(self: Arc<Self>, id: u128) {
        let found = match self.recent_dead(id, self.labels.len()).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "the dead letters of a write every backend refused are kept");
                return;
            }
        };
        for (seq, dead) in found {
            if self.dead.delete_message(seq).await.is_err() {
                continue;
            }
            self.put_part(id, &backend_hash(&dead.backend), &Part::ended(PartState::Refused, &dead.row)).await;
        }
        if let Some(writes) = REFUSED_EVERYWHERE.hit() {
            tracing::info!(
                delivery_id = %Uuid::from_u128(id),
                writes,
                "every backend refused this write: applied nowhere, its dead letters are dropped (this one logged; \
                 `writes` since the last line)"
            );
        }
    }

    /// Recovers backend `label`: its consumers start again from `since_ms`, see [`deliver::recover`].
    ///
    /// # Errors
    /// When the consumers cannot be made again.
    pub async fn recover(&self, label: &str, since_ms: u64) -> Result<RecoveryStatus, LogError> {
        deliver::recover(self, label, since_ms).await
    }

    /// The latest recovery this instance started, per backend.
    pub async fn recoveries(&self) -> Vec<RecoveryStatus> {
        deliver::recoveries(self).await
    }

    /// Every backend as this instance sees it, in pool order (see [`deliver::Backend::status`]).
    pub fn backend_statuses(&self) -> Vec<crate::queue::BackendStatus> {
        let counts = crate::lock(&self.counts).clone();
        crate::lock(&self.backends)
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (pending, dead) = counts.get(i).copied().unwrap_or_default();
                b.status(pending, dead)
            })
            .collect()
    }

    /// How many dead letters there are, of one backend or all (one request: the stream's count per subject).
    ///
    /// # Errors
    /// When the dead-letter stream cannot be read.
    pub async fn dead_letter_total(&self, backend: Option<String>) -> Result<u64, LogError> {
        let filter = match &backend {
            Some(b) => format!("fanout.dead.{}", backend_hash(b)),
            None => "fanout.dead.>".to_owned(),
        };
        let mut subjects = self
            .dead
            .info_builder()
            .subjects(filter)
            .fetch()
            .await
            .map_err(|e| nats_error("counting dead letters", e))?;
        let mut total = 0u64;
        while let Some(entry) = subjects.next().await {
            let (_, n) = entry.map_err(|e| nats_error("counting dead letters", e))?;
            total += n as u64;
        }
        Ok(total)
    }

    /// What the writes stream holds.
    pub fn history(&self) -> HistoryStats {
        *crate::lock(&self.history)
    }

    /// True when `label` is a backend of the pool.
    pub fn knows_backend(&self, label: &str) -> bool {
        self.labels.iter().any(|l| &**l == label)
    }

    /// Writes not yet finished on the backend furthest behind (from the consumers' lag).
    pub fn unfinished(&self) -> u64 {
        self.lag.load(Ordering::Relaxed)
    }

    /// True while new writes can be taken: connected, not shutting down, below the bounds.
    pub fn ready(&self) -> bool {
        !self.closing.load(Ordering::Acquire)
            && self.clients.available_permits() > 0
            && self.unfinished() < self.dispatch.max_pending
            && self.client.connection_state() == async_nats::connection::State::Connected
            && self.store_ok.load(Ordering::Relaxed)
    }

    /// Stops taking writes, lets the workers finish their attempts for most of `grace`, answers the clients
    /// still waiting, and stops. Returns the writes still unfinished (they stay in the stream for the other
    /// instances or the next start).
    pub async fn close(&self, grace: Duration) -> u64 {
        self.closing.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *crate::lock(&self.tasks));
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let work = grace.saturating_sub((grace / 10).min(Duration::from_secs(1)));
        let _ = tokio::time::timeout(work, futures_util::future::join_all(tasks)).await;
        let _ = self.answer_now.send(true);
        for a in aborts {
            a.abort();
        }
        for task in std::mem::take(&mut *crate::lock(&self.background)) {
            task.abort();
        }
        let _ = self.client.flush().await;
        self.unfinished()
    }

    /// Every [`STATS_INTERVAL`]: consumer lag per backend, dead letters, the history; every [`TRIM_INTERVAL`]:
    /// trims the history.
    async fn keep_stats(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut tick = tokio::time::interval(STATS_INTERVAL);
        let mut last_trim = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.refresh_stats().await;
            if last_trim.elapsed() >= TRIM_INTERVAL {
                last_trim = tokio::time::Instant::now();
                if let Err(e) = deliver::trim_history(&self).await {
                    tracing::debug!(error = %e, "the history was not trimmed this time");
                }
            }
        }
    }

    async fn refresh_stats(&self) {
        let infos = match deliver::consumer_infos(self).await {
            Ok(infos) => infos,
            Err(e) => {
                if let Some(n) = STATS_FAILED.hit() {
                    tracing::warn!(error = %e, n, "NATS store: the consumers' lag cannot be read");
                }
                return;
            }
        };
        let mut per_backend: HashMap<&str, u64> = HashMap::new();
        for info in &infos {
            if let Some(hash) = info.name.strip_prefix('b').and_then(|n| n.split('-').next()) {
                *per_backend.entry(hash).or_default() += info.num_pending + info.num_ack_pending as u64;
            }
        }
        let mut lag = 0;
        let mut counts = Vec::with_capacity(self.hashes.len());
        for (m, hash) in self.backend_metrics.iter().zip(&self.hashes) {
            let n = per_backend.get(hash.as_str()).copied().unwrap_or(0);
            m.pending().set(n as f64);
            lag = lag.max(n);
            counts.push((n, 0));
        }
        self.lag.store(lag, Ordering::Relaxed);
        if let Ok(mut subjects) = self.dead.info_builder().subjects("fanout.dead.>").fetch().await {
            let mut dead: HashMap<String, usize> = HashMap::new();
            while let Some(Ok((subject, n))) = subjects.next().await {
                dead.insert(subject, n);
            }
            for (i, (m, hash)) in self.backend_metrics.iter().zip(&self.hashes).enumerate() {
                let n = dead.get(&format!("fanout.dead.{hash}")).copied().unwrap_or(0);
                m.dead_letters().set(n as f64);
                counts[i].1 = n as u64;
            }
        }
        *crate::lock(&self.counts) = counts;
        if let Ok(info) = self.writes.get_info().await {
            let oldest_ms = (info.state.messages > 0)
                .then(|| u64::try_from(info.state.first_timestamp.unix_timestamp_nanos() / 1_000_000).unwrap_or(0));
            *crate::lock(&self.history) = HistoryStats { bytes: info.state.bytes, oldest_ms };
        }
    }
}
