//! One attempt of one write on one backend: what it sends, what it brings back, and how it travels.
//!
//! [`Transport`] is how an attempt reaches a backend: [`Http`] (one pooled reqwest client) in the service, a
//! script in the queue workers' tests, which run on tokio's paused clock where real sockets cannot. reqwest is
//! already the HTTP client of the tests and the demo backend's peers; its pool, timeouts and redirect policy are
//! what an attempt needs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::backend::{BackendAddr, Outcome};
use crate::backoff::parse_retry_after;
use crate::forward::ForwardRequest;

/// Largest backend answer body kept to be passed back to the client; longer ones are dropped (the status and
/// content type still are passed back) so that a backend cannot make fanout buffer without bound.
pub const MAX_ANSWER_BODY: usize = 64 * 1024;

/// A backend's answer, as passed back to the client under the `first` policy or for an agreed client error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The backend's status.
    pub status: StatusCode,
    /// The backend's `Content-Type`, if any.
    pub content_type: Option<HeaderValue>,
    /// The backend's body (empty when it exceeded [`MAX_ANSWER_BODY`]).
    pub body: Bytes,
}

/// What one attempt produced.
#[derive(Debug)]
pub struct AttemptResult {
    /// Its class.
    pub outcome: Outcome,
    /// The answer, when the backend sent one.
    pub answer: Option<Answer>,
    /// The backend's `Retry-After` (on `429` or `503`), when it sent one.
    pub retry_after: Option<Duration>,
}

impl Answer {
    /// The answer assumed for a `201` whose body was not kept.
    pub fn created() -> Self {
        Answer { status: StatusCode::CREATED, content_type: None, body: Bytes::new() }
    }
}
/// How an attempt reaches a backend: HTTP in the service, a script in the queue tests (which run on paused
/// time, where real sockets cannot: the clock would jump past every attempt timeout).
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` to `backend` once and resolves to the attempt's result. Must not panic.
    fn send(&self, backend: &BackendAddr, request: Arc<ForwardRequest>) -> BoxFuture<'static, AttemptResult>;
}

/// The service's transport: one pooled HTTP client for every backend; redirects are never followed.
pub struct Http {
    client: reqwest::Client,
    timeout: Duration,
}

impl Http {
    /// A client whose idle connections close after `pool_idle_timeout`; each attempt is bounded by `timeout`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (its TLS-less builder does not fail in practice).
    pub fn new(pool_idle_timeout: Duration, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(pool_idle_timeout)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        Ok(Self { client, timeout })
    }
}

impl Transport for Http {
    fn send(&self, backend: &BackendAddr, request: Arc<ForwardRequest>) -> BoxFuture<'static, AttemptResult> {
        let client = self.client.clone();
        let url = backend.target(&request.path_and_query);
        let timeout = self.timeout;
        Box::pin(async move { send_attempt(&client, &url, &request, timeout).await })
    }
}
/// One attempt: the request with the shared body, bounded by `timeout` from connect to the last body byte.
async fn send_attempt(
    client: &reqwest::Client,
    url: &reqwest::Url,
    request: &ForwardRequest,
    timeout: Duration,
) -> AttemptResult {
    let result = tokio::time::timeout(timeout, async {
        let response = client
            .request(request.method.clone(), url.clone())
            .headers(request.headers.clone())
            .body(request.body.clone())
            .send()
            .await?;
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now())),
            _ => None,
        };
        let body = read_limited(response, MAX_ANSWER_BODY).await?;
        Ok::<_, reqwest::Error>((status, content_type, body, retry_after))
    })
    .await;
    match result {
        Ok(Ok((status, content_type, body, retry_after))) => AttemptResult {
            outcome: Outcome::from_status(status),
            answer: Some(Answer { status, content_type, body }),
            retry_after,
        },
        Ok(Err(err)) => AttemptResult { outcome: Outcome::from_error(&err), answer: None, retry_after: None },
        Err(_elapsed) => AttemptResult { outcome: Outcome::Timeout, answer: None, retry_after: None },
    }
}

/// Reads a response body, keeping it only if it fits in `limit` bytes (the rest is read and discarded so that
/// the connection can be reused).
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, reqwest::Error> {
    let mut kept = Vec::new();
    let mut overflow = false;
    while let Some(chunk) = response.chunk().await? {
        if !overflow && kept.len() + chunk.len() <= limit {
            kept.extend_from_slice(&chunk);
        } else {
            overflow = true;
        }
    }
    Ok(if overflow { Bytes::new() } else { Bytes::from(kept) })
}
