//! Outages on demand: the demo backend's control listener, and the listener wrapper that makes "down" a dead
//! backend as fanout sees one (README, "Operator recipes").
//!
//! The control routes, on their own port (`--control-port`, env `CONTROL_PORT`; loopback unless
//! `--control-host` says otherwise), each answer the state after the change as JSON ([`FaultsView`]):
//! - `GET /`: the state, changing nothing.
//! - `POST /down`: the replica stops serving at the connection level: every connection, new or kept alive, is
//!   closed without an answer (fanout's circuit breaker counts that as "no answer", docs/design.md). Its users
//!   are kept.
//! - `POST /up`: serves normally again: not down, no delay, no drops (the start-up `SKIP_SOME_REQUESTS` and
//!   `RESPONSE_DELAY` included).
//! - `POST /slow?delay=2s`: waits this long before answering any request but `/healthz` (`delay=0s` ends it).
//! - `POST /flaky?share=0.5`: answers this share of writes `500 request dropped by server`, in [0, 1]
//!   (`share=1` refuses every write with an answer; `share=0` ends it).
//! - `POST /wipe`: forgets every user and every `Idempotency-Key`, as a replica restarted empty would.
//!
//! A bad query answers `400` with one line naming the parameter; nothing changes.
//!
//! Being down is a flag read on every read and write of every connection ([`FaultyListener`]): a connection
//! kept alive from before the outage fails at its next request, not only new ones.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::{DemoBackend, Settings};

/// The faults staged at run time, besides "down" (an atomic flag read by [`FaultyIo`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Wait before answering any request but `/healthz`.
    pub delay: Duration,
    /// Share of writes answered `500 request dropped by server`, in [0, 1].
    pub drop_share: f64,
}

impl Faults {
    /// The faults the settings ask for at start: `RESPONSE_DELAY`, and `SKIP_PROBABILITY` when
    /// `SKIP_SOME_REQUESTS` is true.
    pub fn from_settings(s: &Settings) -> Self {
        Faults { delay: s.response_delay, drop_share: if s.skip_some_requests { s.skip_probability } else { 0.0 } }
    }
}

/// The body of every control answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultsView {
    /// The replica's `SERVER_NAME`.
    pub server: String,
    /// `down` (connections closed), `slow`, `flaky`, `slow+flaky`, or `up`.
    pub mode: String,
    /// The delay before each answer, in milliseconds.
    pub delay_ms: u64,
    /// The share of writes dropped with `500`.
    pub drop_share: f64,
    /// Users held.
    pub users: usize,
    /// Writes received since start, those refused on purpose included (not those cut while down): what a
    /// client such as fanout sent.
    pub writes_received: u64,
}

impl DemoBackend {
    pub(crate) fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the replica down (`true`: every connection is closed without an answer) or brings it back.
    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
    }

    /// The state the control routes show.
    pub fn faults_view(&self) -> FaultsView {
        let f = *self.faults();
        let down = self.offline.load(Ordering::SeqCst);
        let mode = match (down, !f.delay.is_zero(), f.drop_share > 0.0) {
            (true, _, _) => "down",
            (false, true, true) => "slow+flaky",
            (false, true, false) => "slow",
            (false, false, true) => "flaky",
            (false, false, false) => "up",
        };
        FaultsView {
            server: self.settings.server_name.clone(),
            mode: mode.to_owned(),
            delay_ms: u64::try_from(f.delay.as_millis()).unwrap_or(u64::MAX),
            drop_share: f.drop_share,
            users: self.users().count,
            writes_received: self.writes_received(),
        }
    }

    /// The control routes (see the module docs).
    pub fn control_router(&self) -> Router {
        Router::new()
            .route("/", get(|State(b): State<DemoBackend>| async move { Json(b.faults_view()) }))
            .route("/down", post(down))
            .route("/up", post(up))
            .route("/slow", post(slow))
            .route("/flaky", post(flaky))
            .route("/wipe", post(wipe))
            .with_state(self.clone())
    }
}

fn bad(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
}

async fn down(State(b): State<DemoBackend>) -> Json<FaultsView> {
    b.set_offline(true);
    tracing::warn!("staged outage: down (connections are closed)");
    Json(b.faults_view())
}

async fn up(State(b): State<DemoBackend>) -> Json<FaultsView> {
    b.set_offline(false);
    *b.faults() = Faults { delay: Duration::ZERO, drop_share: 0.0 };
    tracing::warn!("staged outage over: up");
    Json(b.faults_view())
}

#[derive(Deserialize)]
struct SlowQuery {
    delay: Option<String>,
}

async fn slow(State(b): State<DemoBackend>, Query(q): Query<SlowQuery>) -> Response {
    let Some(raw) = q.delay else {
        return bad("slow: give the delay, e.g. /slow?delay=2s".to_owned());
    };
    let delay = match humantime::parse_duration(raw.trim()) {
        Ok(d) => d,
        Err(e) => return bad(format!("slow: delay={raw:?}: {e} (expected e.g. 500ms, 2s)")),
    };
    b.faults().delay = delay;
    tracing::warn!(delay = ?delay, "staged outage: slow");
    Json(b.faults_view()).into_response()
}

#[derive(Deserialize)]
struct FlakyQuery {
    share: Option<String>,
}

async fn flaky(State(b): State<DemoBackend>, Query(q): Query<FlakyQuery>) -> Response {
    let Some(raw) = q.share else {
        return bad("flaky: give the share of writes to drop, e.g. /flaky?share=0.5".to_owned());
    };
    let share = match raw.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => p,
        _ => return bad(format!("flaky: share={raw:?}: expected a number between 0 and 1")),
    };
    b.faults().drop_share = share;
    tracing::warn!(share, "staged outage: flaky");
    Json(b.faults_view()).into_response()
}

async fn wipe(State(b): State<DemoBackend>) -> Json<FaultsView> {
    b.wipe();
    tracing::warn!("staged loss of state: every user forgotten");
    Json(b.faults_view())
}

/// A TCP listener whose connections fail while `offline` is set: new ones are closed as soon as accepted, and
/// those already open fail their next read or write (a kept-alive connection included), so the client gets no
/// answer at all.
pub struct FaultyListener {
    inner: TcpListener,
    offline: Arc<AtomicBool>,
}

impl FaultyListener {
    /// Wraps `inner`; `offline` is the replica's "down" flag.
    pub fn new(inner: TcpListener, offline: Arc<AtomicBool>) -> Self {
        Self { inner, offline }
    }
}

impl axum::serve::Listener for FaultyListener {
    type Io = FaultyIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            if self.offline.load(Ordering::SeqCst) {
                drop(stream);
                continue;
            }
            return (FaultyIo { inner: stream, offline: self.offline.clone() }, addr);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One connection of a [`FaultyListener`].
pub struct FaultyIo {
    inner: TcpStream,
    offline: Arc<AtomicBool>,
}

impl FaultyIo {
    fn check(&self) -> io::Result<()> {
        if self.offline.load(Ordering::SeqCst) {
            Err(io::Error::new(io::ErrorKind::ConnectionAborted, "demo backend is down on purpose"))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for FaultyIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FaultyIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
