//! The HTTP surface of the fanout service (docs/design.md section 7): the API router (writes, health,
//! deliveries) and the metrics router, and the one place that turns an [`ApiError`] into what a client sees.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;

use crate::attempt::Answer;
use crate::auth::AdminToken;
use crate::config::AckPolicy;
use crate::delivery::{Dispatcher, Reply, SubmitError, Summary};
use crate::forward::{self, ForwardRequest, IDEMPOTENCY_KEY, X_DELIVERY_ID, X_REQUEST_ID};
use crate::metrics::{ListenerMetrics, Metrics};
use crate::replay::{self, Check, KeyRecord, StoredAnswer};
use crate::tally::Decision;

/// Writes answered `502`, logged at most once a second with their count.
static UNMET: crate::ratelog::Every = crate::ratelog::Every::new();

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Starts and remembers deliveries.
    pub dispatcher: Dispatcher,
    /// The service's metrics.
    pub metrics: Metrics,
    /// How long a client waits for its ack policy before `202`.
    pub ack_timeout: Duration,
    /// The body field that orders writes per user (`--ordering-key`), if any.
    pub ordering_key: Option<String>,
}

/// Everything a client can be told instead of a delivery's own answer. Internal detail stays in the log.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body could not be read or is too large (status from axum: 413 or 400).
    #[error("{0}")]
    Body(#[from] BytesRejection),
    /// The body cannot be read for its ordering key.
    #[error(transparent)]
    Unordered(#[from] forward::UnorderedBody),
    /// A malformed identifier header.
    #[error(transparent)]
    BadHeader(#[from] forward::BadHeader),
    /// The headers exceed [`forward::MAX_HEADER_BYTES`].
    #[error("request headers are larger than 32 KiB in total; nothing was forwarded")]
    HeadersTooLarge,
    /// `--max-in-flight` deliveries are running.
    #[error("too many writes pending or waiting for their answer; retry later")]
    Busy,
    /// The service is shutting down.
    #[error("shutting down; retry on another instance")]
    ShuttingDown,
    /// The `Idempotency-Key` was used before with another body.
    #[error("this Idempotency-Key was used with another body; use a new key for a new write")]
    KeyReused,
    /// A request with the same `Idempotency-Key` is being accepted right now.
    #[error("a request with this Idempotency-Key is in progress; retry later")]
    KeyInProgress,
    /// The write could not be stored in the outbox; nothing was sent.
    #[error("the write could not be stored; nothing was sent, retry later")]
    StoreUnavailable,
    /// The NATS store did not confirm the write in time: it may have been stored, and then is delivered.
    #[error(
        "the store did not confirm the write in time: it may still be delivered; retry with the same Idempotency-Key"
    )]
    StoreUnconfirmed,
    /// A delivery id that is unknown or was forgotten.
    #[error("no delivery with this id (finished ones are kept for the newest --delivery-history)")]
    UnknownDelivery,
    /// No dead letter for this delivery id (and backend, if named).
    #[error("no dead letter for this delivery id")]
    NoDeadLetter,
    /// No dead letter for this delivery id on a backend of the pool (only those can be redriven).
    #[error(
        "no dead letter for this delivery id on a backend of --backends (a removed backend's can only be listed \
         and deleted)"
    )]
    NothingToRedrive,
    /// A backend that is not in the pool.
    #[error("no backend {0:?} in --backends")]
    UnknownBackend(String),
    /// An admin operation that conflicts with one in progress.
    #[error("{0}; try again in a moment")]
    Conflict(&'static str),
    /// A bad query string on an admin route.
    #[error("bad query: {0}")]
    BadQuery(String),
    /// A state-changing admin route, and no admin token is configured.
    #[error(
        "admin actions are disabled: start fanout with --admin-token-file (ADMIN_TOKEN_FILE) and send \
         Authorization: Bearer <token>"
    )]
    AdminDisabled,
    /// A state-changing admin route without the admin token.
    #[error("this admin action needs Authorization: Bearer <the token of --admin-token-file>")]
    Unauthorized,
    /// The dispatcher dropped the reply without a decision (a worker panicked); the delivery state is unknown.
    #[error("internal error")]
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Body(rejection) => rejection.status(),
            ApiError::BadHeader(_) | ApiError::Unordered(_) => StatusCode::BAD_REQUEST,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Busy | ApiError::ShuttingDown | ApiError::StoreUnavailable | ApiError::StoreUnconfirmed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::UnknownDelivery
            | ApiError::UnknownBackend(_)
            | ApiError::NoDeadLetter
            | ApiError::NothingToRedrive => StatusCode::NOT_FOUND,
            ApiError::BadQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::KeyInProgress | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::AdminDisabled => StatusCode::FORBIDDEN,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &self {
            ApiError::Body(_) if status == StatusCode::PAYLOAD_TOO_LARGE => {
                "request body is larger than the limit (--max-body); nothing was forwarded".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(json!({ "error": message }))).into_response();
        if matches!(
            self,
            ApiError::Busy | ApiError::ShuttingDown | ApiError::StoreUnavailable | ApiError::KeyInProgress
        ) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The API router: `POST /register`, `POST /changePassword`, `GET /`, `GET /healthz`, `GET /readyz`,
/// `GET /deliveries/{id}`. Bodies larger than `max_body` bytes are refused with `413` before anything is sent.
pub fn api_router(state: AppState, max_body: usize, body_timeout: Duration, listener: ListenerMetrics) -> Router {
    Router::new()
        .route("/register", post(write))
        .route("/changePassword", post(write))
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/deliveries/{id}", get(delivery))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        // A body must be in within --body-timeout of the headers, however it trickles.
        .layer(middleware::from_fn_with_state((body_timeout, listener), crate::listen::body_deadline))
        .layer(middleware::from_fn_with_state(state.clone(), record_request))
        // A 5xx we answer on purpose (503 at a bound or when the log cannot store, 502 when the ack policy cannot
        // be met) is counted in the metrics and logged where it is decided, at most once a second per kind: one
        // line per answer would flood the log under overload. Per request: debug level only.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// The admin router, on the metrics port only (never behind nginx): `GET /metrics` (Prometheus text format
/// 0.0.4), `GET /healthz`, `GET /dead-letters[?backend=B&limit=N]`, `POST /dead-letters/{id}/redrive[?backend=B]`,
/// `POST /dead-letters/redrive[?backend=B]` (every backend without `backend`), `DELETE /dead-letters/{id}
/// [?backend=B]` and `DELETE /dead-letters?backend=B` (a bulk delete must name its backend); `POST
/// /recoveries?backend=B&since=T` (T: RFC 3339, or a duration ago such as `1h`) and `GET /recoveries`;
/// `GET /deliveries/{id}` with every backend's address; the operator console ([`crate::console`]) under
/// `/console`. `GET /dead-letters` answers `count` (this page's size) and `total` (every dead letter matching).
///
/// The routes that change state (`POST`, `DELETE`) need `Authorization: Bearer <token>` ([`AdminToken`]):
/// `401` without it, `403` when fanout has no token configured. The rest only reads and stays open, like
/// `/metrics`, for whoever reaches this private port.
pub fn admin_router(metrics: Metrics, dispatcher: Dispatcher, token: Option<AdminToken>) -> Router {
    let metrics_route = get(|State(a): State<Admin>| async move {
        // Read at scrape time: the store's count is exact, a periodic copy would lag.
        a.metrics.in_flight().set(a.dispatcher.unfinished() as f64);
        let history = a.dispatcher.history();
        a.metrics.history(history.bytes, history.oldest_ms, crate::log::now_ms());
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], a.metrics.render())
    });
    Router::new()
        .route("/metrics", metrics_route)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(admin_readyz))
        .route("/dead-letters", get(list_dead_letters).delete(discard_all))
        .route("/dead-letters/{id}", delete(discard_one))
        .route("/dead-letters/redrive", post(redrive_all))
        .route("/dead-letters/{id}/redrive", post(redrive_one))
        .route("/recoveries", get(list_recoveries).post(start_recovery))
        .route("/deliveries/{id}", get(admin_delivery))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Admin { metrics, dispatcher: dispatcher.clone(), token: token.clone() })
        .merge(crate::console::router(dispatcher, token.is_some()))
}

#[derive(Clone)]
struct Admin {
    metrics: Metrics,
    dispatcher: Dispatcher,
    token: Option<AdminToken>,
}

/// Dead letters listed per call at most, and by default.
const MAX_LIST: usize = 10_000;
const DEFAULT_LIST: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    backend: Option<String>,
    limit: Option<usize>,
}

impl Admin {
    /// Lets a state-changing request through only with the admin token.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match &self.token {
            None => Err(ApiError::AdminDisabled),
            Some(token) if token.allows(headers) => Ok(()),
            Some(_) => Err(ApiError::Unauthorized),
        }
    }

    /// The backend filter, checked against the pool.
    fn backend(&self, backend: Option<String>) -> Result<Option<String>, ApiError> {
        match backend {
            Some(b) if !self.dispatcher.knows_backend(&b) => Err(ApiError::UnknownBackend(b)),
            other => Ok(other),
        }
    }
}

fn query<T: serde::de::DeserializeOwned>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::BadQuery(e.body_text()))
}

async fn list_dead_letters(
    State(admin): State<Admin>,
    q: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST);
    // Any backend name: a backend removed from the pool keeps its dead letters (reason `backend_removed`).
    let backend = q.backend;
    let list = admin.dispatcher.dead_letters(backend.clone(), limit).await.map_err(|_| ApiError::StoreUnavailable)?;
    let total = admin.dispatcher.dead_letter_total(backend).await.map_err(|_| ApiError::StoreUnavailable)?;
    Ok(Json(json!({ "count": list.len(), "total": total, "dead_letters": list })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveQuery {
    backend: Option<String>,
}

async fn redrive_all(
    State(admin): State<Admin>,
    headers: HeaderMap,
    q: Result<Query<RedriveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin.authorize(&headers)?;
    let backend = admin.backend(query(q)?.backend)?;
    let n = admin.dispatcher.redrive(backend, None).await.map_err(|_| ApiError::StoreUnavailable)?;
    Ok(Json(json!({ "redriven": n })).into_response())
}

async fn redrive_one(
    State(admin): State<Admin>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<RedriveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin.authorize(&headers)?;
    let id = delivery_id(id).ok_or(ApiError::NoDeadLetter)?;
    let backend = admin.backend(query(q)?.backend)?;
    let n = admin.dispatcher.redrive(backend, Some(id)).await.map_err(|_| ApiError::StoreUnavailable)?;
    if n == 0 {
        return Err(ApiError::NothingToRedrive);
    }
    Ok(Json(json!({ "redriven": n })).into_response())
}

async fn discard_all(
    State(admin): State<Admin>,
    headers: HeaderMap,
    q: Result<Query<RedriveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin.authorize(&headers)?;
    let backend = query(q)?.backend.ok_or_else(|| {
        ApiError::BadQuery("name the backend whose dead letters to delete: ?backend=host:port".to_owned())
    })?;
    // Any backend name, removed ones included.
    let backend = Some(backend);
    let n = admin.dispatcher.discard(backend, None).await.map_err(|_| ApiError::StoreUnavailable)?;
    Ok(Json(json!({ "discarded": n })).into_response())
}

async fn discard_one(
    State(admin): State<Admin>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<RedriveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin.authorize(&headers)?;
    let id = delivery_id(id).ok_or(ApiError::NoDeadLetter)?;
    let backend = query(q)?.backend;
    let n = admin.dispatcher.discard(backend, Some(id)).await.map_err(|_| ApiError::StoreUnavailable)?;
    if n == 0 {
        return Err(ApiError::NoDeadLetter);
    }
    Ok(Json(json!({ "discarded": n })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverQuery {
    backend: Option<String>,
    since: Option<String>,
}

/// `since` as ms since the epoch: an RFC 3339 time, or a duration before now (`90m`, `1h`, `2d`).
fn since_ms(since: &str, now_ms: u64) -> Result<u64, ApiError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(since) {
        let ms = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let ms = u64::try_from(ms).unwrap_or(u64::MAX);
        if ms > now_ms {
            return Err(ApiError::BadQuery(format!("since={since:?} is in the future: nothing to recover yet")));
        }
        return Ok(ms);
    }
    match humantime::parse_duration(since) {
        Ok(ago) => Ok(now_ms.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX))),
        Err(_) => Err(ApiError::BadQuery(format!(
            "since={since:?}: give an RFC 3339 time (2026-12-02T05:00:00Z) or a duration before now (1h, 90m)"
        ))),
    }
}

/// Starts recovering a backend: `202` with its status once the writes since `since` are queued for it.
async fn start_recovery(
    State(admin): State<Admin>,
    headers: HeaderMap,
    q: Result<Query<RecoverQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin.authorize(&headers)?;
    let q = query(q)?;
    let backend = admin
        .backend(q.backend)?
        .ok_or_else(|| ApiError::BadQuery("name the backend to recover: ?backend=host:port".to_owned()))?;
    let since = q.since.ok_or_else(|| {
        ApiError::BadQuery("say since when: ?since=2026-12-02T05:00:00Z or ?since=1h (a duration before now)".into())
    })?;
    let since = since_ms(&since, crate::log::now_ms())?;
    match admin.dispatcher.recover(&backend, since).await {
        Ok(status) => Ok((StatusCode::ACCEPTED, Json(status)).into_response()),
        Err(crate::log::LogError::Busy(why)) => Err(ApiError::Conflict(why)),
        Err(err) => {
            tracing::error!(backend, error = %err, "recovery not started");
            Err(ApiError::StoreUnavailable)
        }
    }
}

async fn list_recoveries(State(admin): State<Admin>) -> Response {
    let list = admin.dispatcher.recoveries().await;
    Json(json!({ "count": list.len(), "recoveries": list })).into_response()
}

/// Counts every answered request by matched route and status, and times it.
async fn record_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| match p.as_str() {
        "/register" => "/register",
        "/changePassword" => "/changePassword",
        "/" => "/",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/deliveries/{id}" => "/deliveries/{id}",
        _ => "other",
    });
    let response = next.run(request).await;
    state.metrics.request(route, response.status().as_u16(), started.elapsed());
    response
}

async fn index() -> &'static str {
    "fanout: POST /register or /changePassword (form or JSON body) to write to every backend; \
     GET /deliveries/{id} for a delivery's progress; metrics on the metrics port at /metrics\n"
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "no such route; writes are POST /register and POST /changePassword" })),
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, Json(json!({ "error": "method not allowed on this route" }))).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    readiness(&state.dispatcher)
}

/// `GET /readyz` on the admin port: the same answer, for probes that reach only the private port (the compose
/// health checks, Kubernetes readiness probes).
async fn admin_readyz(State(admin): State<Admin>) -> Response {
    readiness(&admin.dispatcher)
}

/// `200 ready` while writes can be taken, else `503` in JSON saying what can make it so.
fn readiness(dispatcher: &Dispatcher) -> Response {
    if dispatcher.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": "not ready: at --max-in-flight or --max-pending, the store failing or unreachable, or shutting down"
            })),
        )
            .into_response()
    }
}

/// The delivery id of a `{id}` path segment; `None` for a segment that is not a UUID or not even valid
/// percent-encoded UTF-8 (axum's own rejection of the latter would be plain text, not JSON).
fn delivery_id(id: Result<Path<String>, PathRejection>) -> Option<Uuid> {
    id.ok().and_then(|Path(id)| Uuid::parse_str(&id).ok())
}

/// The stored summary of the delivery named by a `{id}` path segment.
async fn summary(dispatcher: &Dispatcher, id: Result<Path<String>, PathRejection>) -> Result<Summary, ApiError> {
    let id = delivery_id(id).ok_or(ApiError::UnknownDelivery)?;
    dispatcher.lookup(id).await.map_err(|_| ApiError::StoreUnavailable)?.ok_or(ApiError::UnknownDelivery)
}

/// `GET /deliveries/{id}` on the API port: the delivery's progress without the backends' addresses (this
/// port faces clients; the admin port's route shows them).
async fn delivery(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    Ok(Json(summary(&state.dispatcher, id).await?.redacted()).into_response())
}

/// `GET /deliveries/{id}` on the admin port: the whole view, every backend named.
async fn admin_delivery(
    State(admin): State<Admin>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    Ok(Json(summary(&admin.dispatcher, id).await?).into_response())
}

/// `POST /register` and `POST /changePassword`: deliver to every backend, answer per the ack policy.
async fn write(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    OriginalUri(uri): OriginalUri,
    method: Method,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if forward::header_bytes(&headers) > forward::MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge);
    }
    let body = body?;
    let client_key = forward::client_token(&headers, &IDEMPOTENCY_KEY)?;
    let request_id = forward::client_token(&headers, &X_REQUEST_ID)?;
    let id = Uuid::now_v7();
    let id_text = HeaderValue::from_str(&id.to_string()).map_err(|_| ApiError::Internal)?;

    // A repeat of a keyed write: the original's answer, or 422 for another body; nothing new is delivered.
    let key = client_key.as_ref().and_then(|k| k.to_str().ok()).map(str::to_owned);
    let path_and_query = uri.path_and_query().map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let idempotency = match &key {
        None => None,
        Some(k) => {
            let hash = replay::request_hash(method.as_str(), &path_and_query, &body);
            match state.dispatcher.check_key(k, hash, id).await {
                Check::New(record) => Some((k.clone(), record)),
                Check::Replay(record) => return Ok(replayed(&state, record).await),
                Check::Conflict => return Err(ApiError::KeyReused),
                Check::InProgress => return Err(ApiError::KeyInProgress),
                Check::Unavailable => return Err(ApiError::StoreUnavailable),
            }
        }
    };
    let refused = |e: ApiError| {
        if let Some(k) = &key {
            state.dispatcher.release_key(k, id);
        }
        e
    };

    let request = ForwardRequest {
        method,
        path_and_query,
        headers: forward::forwarded_headers(
            &headers,
            client_key.unwrap_or_else(|| id_text.clone()),
            request_id.unwrap_or_else(|| id_text.clone()),
            Some(peer.ip()),
        ),
        // A small body parsed by hyper is a slice of the connection's read buffer (8 KiB and more); a pending
        // delivery holding that slice would pin the whole buffer. Its own exact-size copy costs one memcpy.
        body: Bytes::copy_from_slice(&body),
    };
    // Read from the headers as forwarded: the format a backend will parse the body in.
    let ordering_key = match state.ordering_key.as_deref() {
        Some(field) => {
            forward::body_field(&request.headers, &request.body, field).map_err(|e| refused(ApiError::Unordered(e)))?
        }
        None => None,
    };
    let submitted =
        state.dispatcher.submit(id, request, ordering_key.as_deref(), idempotency.clone()).map_err(|e| {
            refused(match e {
                SubmitError::Busy => ApiError::Busy,
                SubmitError::ShuttingDown => ApiError::ShuttingDown,
            })
        })?;
    let mut answer_now = submitted.answer_now.clone();
    let decided = tokio::select! {
        decided = tokio::time::timeout(state.ack_timeout, submitted.reply) => decided.ok(),
        // Shutting down and out of time: a 202 with the progress, rather than a connection closed unanswered.
        _ = answer_now.wait_for(|now| *now) => None,
    };
    let mut response = match decided {
        Some(Ok(Reply { decision: Decision::Refused, .. })) => return Err(refused(ApiError::StoreUnavailable)),
        Some(Ok(Reply { decision: Decision::Unconfirmed, .. })) => return Err(refused(ApiError::StoreUnconfirmed)),
        Some(Ok(reply)) => {
            let answer = answer(reply.decision, state.dispatcher.ack_policy(), &reply.summary);
            if answer.status == StatusCode::BAD_GATEWAY.as_u16()
                && let Some(answered) = UNMET.hit()
            {
                tracing::warn!(
                    answered,
                    ack = state.dispatcher.ack_policy().as_str(),
                    "writes answered 502: the ack policy could not be met"
                );
            }
            if let Some((k, record)) = idempotency {
                state.dispatcher.answered(&k, id, record, answer.clone()).await;
            }
            stored_response(answer)
        }
        Some(Err(_)) => return Err(ApiError::Internal),
        None => progress(&state, id).await,
    };
    response.headers_mut().insert(X_DELIVERY_ID.clone(), id_text);
    Ok(response)
}

/// `202 Accepted` with the delivery's progress as stored (or just its id when it cannot be read) and
/// `Location: /deliveries/{id}`.
async fn progress(state: &AppState, id: Uuid) -> Response {
    let body = match state.dispatcher.lookup(id).await {
        Ok(Some(summary)) => serde_json::to_value(summary.redacted()).unwrap_or_default(),
        _ => json!({ "delivery_id": id, "state": "pending" }),
    };
    let mut r = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/deliveries/{id}")) {
        r.headers_mut().insert(header::LOCATION, location);
    }
    r
}

/// The answer to a repeated keyed write: the original answer when there was one, else the original delivery's
/// progress (`202`). Marked `Idempotent-Replayed: true`, with the original `X-Delivery-Id`.
async fn replayed(state: &AppState, record: KeyRecord) -> Response {
    let id = Uuid::from_u128(record.delivery_id);
    let mut response = match record.answer {
        Some(answer) => stored_response(answer),
        None => progress(state, id).await,
    };
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(X_DELIVERY_ID.clone(), v);
    }
    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// The client's answer for a decided delivery (docs/design.md section 6), in a form that can be kept for replays.
fn answer(decision: Decision, policy: AckPolicy, progress: &Summary) -> StoredAnswer {
    let summary = |code: StatusCode| StoredAnswer {
        status: code.as_u16(),
        content_type: Some("application/json".to_owned()),
        body: serde_json::to_vec(&progress.clone().redacted()).unwrap_or_default(),
    };
    let backend = |a: Answer| StoredAnswer {
        status: a.status.as_u16(),
        content_type: a.content_type.and_then(|v| v.to_str().ok().map(str::to_owned)),
        body: a.body.to_vec(),
    };
    match decision {
        Decision::Acked { answer } if policy == AckPolicy::First => backend(answer),
        Decision::Acked { .. } => summary(StatusCode::CREATED),
        Decision::PassBack { answer } => backend(answer),
        Decision::Unmet | Decision::Wait | Decision::Refused | Decision::Unconfirmed => {
            summary(StatusCode::BAD_GATEWAY)
        }
    }
}

fn stored_response(answer: StoredAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, answer.body).into_response();
    match answer.content_type.and_then(|ct| HeaderValue::from_str(&ct).ok()) {
        Some(ct) => response.headers_mut().insert(header::CONTENT_TYPE, ct),
        None => response.headers_mut().remove(header::CONTENT_TYPE),
    };
    response
}
