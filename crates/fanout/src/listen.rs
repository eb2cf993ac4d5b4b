//! The listeners' accept loop (README "Security", "Limits"): bounded connections on both the API and the admin
//! port, in place of `axum::serve`, which has no timeouts and no connection cap.
//!
//! Every connection is watched by the phase it is in, the way nginx's `client_header_timeout` and
//! `keepalive_timeout` do:
//! - **head**: from the connection's first moment, or from the first byte after an idle spell, the request's
//!   headers must be in within `--header-timeout` (10 s). A client trickling its headers (slowloris) is cut there.
//! - **busy**: a request is being served; the body has its own deadline (`--body-timeout`, counted from the
//!   headers, not per read: see [`body_deadline`]) and the answer its ack timeout.
//! - **idle**: the answer is out and no new request has started; after `--idle-timeout` (75 s, longer than
//!   nginx's 60 s upstream keep-alive so that nginx closes first) the connection is closed.
//!
//! A listener holds at most its cap of connections (`--max-connections` for the API, [`ADMIN_MAX_CONNECTIONS`]
//! for the admin port, so that a flood of one never starves the other); one more is answered `503` in JSON and
//! closed. The cap is lowered at start to what the open-files limit allows ([`raise_open_files_limit`] first
//! raises the soft limit to the hard one, as nginx's `worker_rlimit_nofile` would). Each cut is counted in
//! `fanout_connections_closed_total{listener,reason}` and logged at most once a second ([`crate::ratelog`]).
//!
//! # Dependencies
//! `hyper` (HTTP/1 server connections) and `hyper-util` (tokio adapters), both already under axum; `rlimit` for
//! the open-files limit (the workspace forbids `unsafe`, which `setrlimit` through `libc` needs).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::metrics::ListenerMetrics;
use crate::ratelog::Every;

/// Connections the admin port holds at most (Prometheus, an operator's curl, nginx's `/metrics` pass-through).
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

/// Header fields a request may have (hyper refuses more with an empty `431`).
const MAX_HEADER_FIELDS: usize = 1000;

/// Open files kept for what is not a client connection: the backends' connection pools are added to it.
const RESERVED_FILES: u64 = 128;

/// How long a refused connection's `503` may take to write.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Headers must arrive within this long of the first byte.
    pub header_timeout: Duration,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections held at most.
    pub max_connections: usize,
}

/// Raises the soft open-files limit to the hard limit; returns the soft limit now in force (`None` where it
/// cannot be read).
pub fn raise_open_files_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

/// The connection cap that fits the open-files limit `nofile` once `reserved` files are kept for the rest
/// (backend connections, the write log, the other listener): `wanted` or less, at least 1.
pub fn fitting_cap(wanted: usize, nofile: Option<u64>, reserved: u64) -> usize {
    match nofile {
        Some(n) => {
            wanted.min(usize::try_from(n.saturating_sub(reserved + RESERVED_FILES)).unwrap_or(usize::MAX)).max(1)
        }
        None => wanted,
    }
}

/// Where a connection stands (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Busy,
    Idle,
}

/// A connection's phase and since when, shared by its reader, its service and its watchdog.
#[derive(Debug)]
struct Clock {
    state: std::sync::Mutex<(Phase, Instant)>,
    /// `Content-Length` fields in the head of the request being read, as counted on the wire (hyper merges
    /// equal ones into one before the service sees the headers).
    content_lengths: std::sync::atomic::AtomicU32,
}

impl Clock {
    fn new() -> Self {
        Self {
            state: std::sync::Mutex::new((Phase::Head, Instant::now())),
            content_lengths: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn get(&self) -> (Phase, Instant) {
        *crate::lock(&self.state)
    }

    fn set(&self, phase: Phase) {
        *crate::lock(&self.state) = (phase, Instant::now());
    }

    /// Bytes arrived: after an idle spell they start a new request's head (returns true then).
    fn read_some(&self) -> bool {
        let mut state = crate::lock(&self.state);
        if state.0 == Phase::Idle {
            *state = (Phase::Head, Instant::now());
            return true;
        }
        false
    }
}

/// The longest head [`HeadScan`] looks at (hyper refuses far shorter ones: fanout's headers are bounded at
/// 32 KiB).
const MAX_SCANNED_HEAD: usize = 64 * 1024;

/// Counts the `Content-Length` fields of a request head as the bytes arrive. Only the head of a request read
/// after an idle spell (or the connection's first) is scanned: a request pipelined behind another's body
/// arrives while that one is busy, and nginx never pipelines.
#[derive(Default)]
struct HeadScan {
    buf: Vec<u8>,
    done: bool,
}

impl HeadScan {
    /// Feeds `bytes`; once the head is complete, publishes its count in `clock`.
    fn feed(&mut self, mut bytes: &[u8], clock: &Clock) {
        if self.buf.is_empty() {
            // Empty lines before the request line are skipped (RFC 9112 section 2.2; hyper does too): they must
            // not pass for the end of the head.
            let skip = bytes.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
            bytes = &bytes[skip..];
            if bytes.is_empty() {
                return;
            }
        }
        let from = self.buf.len().saturating_sub(2);
        self.buf.extend_from_slice(&bytes[..bytes.len().min(MAX_SCANNED_HEAD.saturating_sub(self.buf.len()))]);
        // The empty line that ends the head, whether lines end in CRLF or in a bare LF (hyper accepts both).
        let end = (from..self.buf.len()).find(|&i| {
            self.buf[i] == b'\n'
                && (self.buf.get(i + 1) == Some(&b'\n')
                    || (self.buf.get(i + 1) == Some(&b'\r') && self.buf.get(i + 2) == Some(&b'\n')))
        });
        if let Some(end) = end {
            let count = self.buf[..end]
                .split(|b| *b == b'\n')
                .filter(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
                .count();
            clock.content_lengths.store(u32::try_from(count).unwrap_or(u32::MAX), Ordering::Relaxed);
        }
        if end.is_some() || self.buf.len() >= MAX_SCANNED_HEAD {
            self.done = true;
            self.buf = Vec::new();
        }
    }
}

/// The TCP stream, telling the [`Clock`] when bytes arrive and what a head holds.
struct Watched {
    stream: TcpStream,
    clock: Arc<Clock>,
    scan: HeadScan,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let this = &mut *self;
            if this.clock.read_some() {
                this.scan = HeadScan::default();
            }
            if !this.scan.done {
                this.scan.feed(&buf.filled()[before..], &this.clock);
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Resolves with the phase whose limit the connection overstayed.
async fn watchdog(clock: &Clock, limits: Limits) -> Phase {
    loop {
        let (phase, since) = clock.get();
        let limit = match phase {
            Phase::Head => limits.header_timeout,
            Phase::Idle => limits.idle_timeout,
            // The body deadline and the ack timeout bound a request; look again later.
            Phase::Busy => {
                tokio::time::sleep(limits.header_timeout.min(limits.idle_timeout)).await;
                continue;
            }
        };
        let deadline = since + limit;
        if Instant::now() >= deadline && clock.get() == (phase, since) {
            return phase;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

static HEADER_TIMEOUTS: Every = Every::new();
static OVER_LIMIT: Every = Every::new();
static ACCEPT_ERRORS: Every = Every::new();
static BODY_DEADLINES: Every = Every::new();

/// Serves `router` on `listener` within `limits` until `stop` says so; then stops accepting, lets each
/// connection finish its request in progress, and returns once every connection is closed. Handlers can take
/// `ConnectInfo<SocketAddr>`.
///
/// # Errors
/// None in practice: accept errors (out of file descriptors, a connection reset before it was accepted) are
/// logged and the loop goes on.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    name: &'static str,
    limits: Limits,
    metrics: ListenerMetrics,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(64));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    if let Some(n) = ACCEPT_ERRORS.hit() {
                        tracing::warn!(listener = name, %error, errors = n, "cannot accept connections (out of file descriptors?)");
                    }
                    // EMFILE and the like: give closing connections a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = signalled(&mut stop) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.over_limit.increment(1);
            if let Some(n) = OVER_LIMIT.hit() {
                tracing::warn!(
                    listener = name,
                    max_connections = limits.max_connections,
                    refused = n,
                    "connection refused with 503: the listener holds its most connections"
                );
            }
            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream).await;
                    drop(permit);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            metrics.open.increment(1.0);
            connection(stream, peer, router, name, limits, &metrics, stop).await;
            metrics.open.decrement(1.0);
            drop(slot);
        });
    }
    // Every slot back: every connection closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// Serves one connection until it closes, overstays a limit, or `stop` (then gracefully).
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    name: &'static str,
    limits: Limits,
    metrics: &ListenerMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Watched { stream, clock: clock.clone(), scan: HeadScan::default() });
    let service = {
        let clock = clock.clone();
        hyper::service::service_fn(move |mut request: Request<Incoming>| {
            clock.set(Phase::Busy);
            let content_lengths = clock.content_lengths.swap(0, Ordering::Relaxed);
            let refused = framing_error(&request, content_lengths);
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            let clock = clock.clone();
            async move {
                let response = match refused {
                    Some(why) => Ok(bad_framing(why)),
                    None => router.call(request.map(Body::new)).await,
                };
                clock.set(Phase::Idle);
                response
            }
        })
    };
    // More header fields than hyper's default 100 (nginx passes up to its 32 KiB of headers): past them hyper
    // refuses on its own, with an empty 431; below, fanout's own 32 KiB check answers in JSON.
    let conn = hyper::server::conn::http1::Builder::new().max_headers(MAX_HEADER_FIELDS).serve_connection(io, service);
    tokio::pin!(conn);
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let overstayed = tokio::select! {
        _ = conn.as_mut() => return,
        phase = watchdog(&clock, limits) => phase,
        () = stopping => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => return,
                phase = watchdog(&clock, limits) => phase,
            }
        }
    };
    // Dropping the connection closes the socket.
    match overstayed {
        Phase::Head => {
            metrics.header_timeout.increment(1);
            if let Some(n) = HEADER_TIMEOUTS.hit() {
                tracing::info!(
                    listener = name,
                    %peer,
                    header_timeout = ?limits.header_timeout,
                    closed = n,
                    "connection closed: its request headers did not arrive in time"
                );
            }
        }
        Phase::Idle => metrics.idle_timeout.increment(1),
        Phase::Busy => {}
    }
}

/// What RFC 9112 says a server must refuse with `400`, and hyper lets through (README "Errors"): an HTTP/1.1
/// request without exactly one `Host` (section 3.2), more than one `Content-Length` field even with equal
/// values (section 6.3: nginx refuses them too), `chunked` applied more than once (section 7), or both
/// `Transfer-Encoding` and `Content-Length` (section 6.1: the classic request-smuggling shape, which a server
/// may refuse and fanout does, as nothing legitimate sends it).
/// `content_lengths` is the count of `Content-Length` fields seen on the wire.
fn framing_error<B>(request: &Request<B>, content_lengths: u32) -> Option<&'static str> {
    let headers = request.headers();
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Some("more than one Host header");
    }
    if hosts == 0 && request.version() == axum::http::Version::HTTP_11 {
        return Some("an HTTP/1.1 request needs a Host header");
    }
    if content_lengths > 1 || headers.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        return Some("more than one Content-Length header");
    }
    let mut chunked = 0;
    let mut encodings = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        encodings += 1;
        let Ok(value) = value.to_str() else { return Some("an unreadable Transfer-Encoding header") };
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                // RFC 9112 section 6.1 says 501 for an unknown coding; fanout decodes none but chunked.
                return Some(UNSUPPORTED_CODING);
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return Some("chunked applied more than once in Transfer-Encoding");
    }
    // hyper drops Content-Length when Transfer-Encoding is present: the wire count says it was there.
    if encodings > 0 && (content_lengths > 0 || headers.contains_key(header::CONTENT_LENGTH)) {
        return Some("both Transfer-Encoding and Content-Length");
    }
    None
}

static BAD_FRAMING: Every = Every::new();

/// The refusal of a transfer coding other than `chunked`, answered `501`.
const UNSUPPORTED_CODING: &str = "a transfer coding other than chunked";

/// `400` in JSON for a request refused by [`framing_error`]; the connection is closed after it (the rest of
/// the stream cannot be trusted to start a request).
fn bad_framing(why: &'static str) -> Response {
    if let Some(n) = BAD_FRAMING.hit() {
        tracing::info!(why, refused = n, "request refused with 400: its framing breaks RFC 9112");
    }
    let status = if why == UNSUPPORTED_CODING { StatusCode::NOT_IMPLEMENTED } else { StatusCode::BAD_REQUEST };
    let body = serde_json::json!({ "error": format!("bad request: {why} (RFC 9112); nothing was forwarded") });
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Resolves once `stop` says stop (or its sender is gone).
async fn signalled(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Answers a connection over the cap with `503` in JSON and closes it.
async fn refuse(mut stream: TcpStream) {
    const BODY: &str = "{\"error\":\"too many connections open (--max-connections); retry later\"}\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(REFUSAL_WRITE, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// A request body that fails once its deadline has passed, however the bytes trickle in.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    expired: Arc<AtomicBool>,
}

/// The error a [`DeadlineBody`] fails with.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within --body-timeout")]
struct BodyDeadlineExceeded;

impl http_body::Body for DeadlineBody {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyDeadlineExceeded.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

/// Middleware: the request body must be in within `limit` of the headers (nginx reads bodies per
/// `client_body_timeout` between two reads; this is a deadline for the whole). A late body gets `408` in JSON
/// and the connection is closed.
pub async fn body_deadline(
    axum::extract::State((limit, metrics)): axum::extract::State<(Duration, ListenerMetrics)>,
    request: Request,
    next: Next,
) -> Response {
    let expired = Arc::new(AtomicBool::new(false));
    let request = request.map(|inner| {
        Body::new(DeadlineBody { inner, deadline: Box::pin(tokio::time::sleep(limit)), expired: expired.clone() })
    });
    let response = next.run(request).await;
    if !expired.load(Ordering::Relaxed) {
        return response;
    }
    metrics.body_deadline.increment(1);
    if let Some(n) = BODY_DEADLINES.hit() {
        tracing::info!(body_timeout = ?limit, cut = n, "request refused with 408: its body did not arrive in time");
    }
    let mut response = (
        StatusCode::REQUEST_TIMEOUT,
        axum::Json(serde_json::json!({
            "error": "the request body did not arrive within the body timeout (--body-timeout); nothing was forwarded"
        })),
    )
        .into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_open_files_limit() {
        assert_eq!(fitting_cap(10_000, None, 0), 10_000);
        assert_eq!(fitting_cap(10_000, Some(1_048_576), 500), 10_000);
        assert_eq!(fitting_cap(10_000, Some(1024), 200), 1024 - 200 - RESERVED_FILES as usize);
        assert_eq!(fitting_cap(10_000, Some(100), 200), 1, "never 0");
    }

    #[test]
    fn the_head_scan_counts_content_length_fields_across_reads() {
        let clock = Clock::new();
        let mut scan = HeadScan::default();
        let head = b"POST /r HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 3\r\nX: y\r\nContent-Length: 3\r\n\r\nabc";
        for piece in head.chunks(5) {
            scan.feed(piece, &clock);
        }
        assert!(scan.done);
        assert_eq!(clock.content_lengths.load(Ordering::Relaxed), 2);
        // A field that only ends in "content-length" is another field.
        let mut scan = HeadScan::default();
        scan.feed(b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nContent-Length: 0\r\n\r\n", &clock);
        assert_eq!(clock.content_lengths.load(Ordering::Relaxed), 1);
        // Found by an attack run: bare-LF line ends, and empty lines before the request line.
        let mut scan = HeadScan::default();
        for piece in
            [&b"\r\n\r\n"[..], b"\n", b"POST / HTTP/1.1\nHost: a\nContent-Length: 2\n", b"Content-Length: 2\n\nab"]
        {
            scan.feed(piece, &clock);
        }
        assert!(scan.done);
        assert_eq!(clock.content_lengths.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_follows_the_phases() {
        let limits = Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 1,
        };
        let clock = Arc::new(Clock::new());
        let start = Instant::now();
        assert_eq!(watchdog(&clock, limits).await, Phase::Head, "a silent new connection");
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        // Busy for long, then idle: the idle limit counts from the answer.
        clock.set(Phase::Busy);
        let c = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(100)).await;
            c.set(Phase::Idle);
        });
        let start = Instant::now();
        assert_eq!(watchdog(&clock, limits).await, Phase::Idle);
        assert!(start.elapsed() >= Duration::from_secs(175), "{:?}", start.elapsed());

        // A byte after idling starts a head; the header limit applies from it.
        clock.set(Phase::Idle);
        tokio::time::sleep(Duration::from_secs(30)).await;
        clock.read_some();
        let start = Instant::now();
        assert_eq!(watchdog(&clock, limits).await, Phase::Head);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }
}
