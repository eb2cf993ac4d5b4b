//! The operator console (README "Console"; issue 15): a web page served on the admin port that shows, refreshed
//! every second and a half, each backend's breaker, queue depth, oldest pending age, attempt rate and last error,
//! the dead letters with their real total and a redrive and a delete per letter and per backend, a delivery
//! looked up by id, and the recoveries with their progress.
//!
//! # What it is made of
//! One HTML page, one script and one style sheet, under `src/console/`, compiled into the binary with
//! `include_str!`: no build step, no CDN, nothing fetched from elsewhere. The page reads through
//! `GET /console/api/state` (this module: the backends' published [`BackendStatus`] and the recoveries) and the
//! admin port's own JSON routes (`GET /dead-letters`, `GET /deliveries/{id}`); its actions are those routes'
//! `POST` and `DELETE` ([`crate::routes::admin_router`]), so the console can do nothing curl cannot.
//!
//! # Security
//! - Actions carry the admin token ([`crate::auth`]) in `Authorization: Bearer`, sent by the page's `fetch`. The
//!   page asks for the token once and keeps it in the tab's `sessionStorage` only (gone with the tab; never a
//!   cookie, never in a URL). A browser adds no such header to a cross-site request by itself, and fanout grants
//!   no CORS, so another site cannot act through an operator's browser: there is no ambient credential to forge.
//! - Every answer under `/console` carries `Content-Security-Policy` (scripts, styles and connections from this
//!   origin only, no inline script, no framing, no form posts, no `<base>`), `X-Frame-Options: DENY` (against
//!   clickjacking in browsers without `frame-ancestors`), `Referrer-Policy: no-referrer`,
//!   `X-Content-Type-Options: nosniff` and `Cache-Control: no-store`.
//! - The script never builds HTML from data: everything shown goes through `textContent` (see `console.js`).
//!
//! # Cost
//! A poll reads the workers' `watch` snapshots (a lock each; the workers publish once a second, see
//! [`BackendStatus`]), asks each worker for its recovery status (one message each) and lists a page of at most
//! 100 dead letters with their count; the admin port caps its own connections
//! ([`crate::listen::ADMIN_MAX_CONNECTIONS`]).

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::delivery::Dispatcher;
use crate::queue::{BackendStatus, RecoveryStatus};

/// The page.
const INDEX_HTML: &str = include_str!("console/index.html");
/// The page's script.
const CONSOLE_JS: &str = include_str!("console/console.js");
/// The page's style sheet.
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// The content security policy of every console answer: everything from this origin only, no inline script or
/// style, no plugins, no framing, no form submission, no `<base>` rewriting.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; form-action 'none'; \
     base-uri 'none'";

/// What `GET /console/api/state` answers.
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleState {
    /// When this was read (RFC 3339, the service's clock).
    pub now: String,
    /// True when fanout has an admin token, so that actions can be allowed at all.
    pub admin_actions: bool,
    /// Deliveries not finished on every backend (pending somewhere, or a dead letter somewhere).
    pub unfinished: u64,
    /// True while new writes are accepted (see `GET /readyz`).
    pub ready: bool,
    /// Every backend of the pool, in pool order.
    pub backends: Vec<BackendStatus>,
    /// The latest recovery of every backend that had one, in pool order.
    pub recoveries: Vec<RecoveryStatus>,
}

#[derive(Clone)]
struct Console {
    dispatcher: Dispatcher,
    admin_actions: bool,
}

/// The console's routes, for the admin port: `GET /console` (the page), `GET /console/console.js`,
/// `GET /console/console.css` and `GET /console/api/state` ([`ConsoleState`] as JSON). `admin_actions` says
/// whether an admin token is configured (the page then says so instead of offering actions that cannot pass).
pub fn router(dispatcher: Dispatcher, admin_actions: bool) -> Router {
    Router::new()
        .route("/console", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
        .route("/console/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
        .route("/console/api/state", get(state))
        .layer(axum::middleware::map_response(secure))
        .with_state(Console { dispatcher, admin_actions })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn state(State(console): State<Console>) -> Json<ConsoleState> {
    let d = &console.dispatcher;
    Json(ConsoleState {
        now: crate::log::rfc3339_ms(crate::log::now_ms()),
        admin_actions: console.admin_actions,
        unfinished: d.unfinished(),
        ready: d.ready(),
        backends: d.backend_statuses(),
        recoveries: d.recoveries().await,
    })
}

/// Adds the security headers (see the module docs) to a console answer.
async fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files_and_builds_no_html_from_strings() {
        // The page names its script and style sheet by the routes above, and nothing from elsewhere.
        assert!(INDEX_HTML.contains(r#"src="/console/console.js""#));
        assert!(INDEX_HTML.contains(r#"href="/console/console.css""#));
        for text in [INDEX_HTML, CONSOLE_JS, CONSOLE_CSS] {
            assert!(!text.contains("http://") && !text.contains("https://"), "no outside URL");
        }
        // No inline script or handler (the CSP would block them anyway), no HTML parsing of data.
        assert!(!INDEX_HTML.contains("<script>") && !has_inline_handler(INDEX_HTML), "no inline script");
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!CONSOLE_JS.contains(sink), "console.js uses {sink}");
        }
        // The token lives in the tab's session storage only.
        assert!(!CONSOLE_JS.contains("localStorage") && !CONSOLE_JS.contains("document.cookie"));
    }

    /// True when `html` has an attribute such as ` onclick=`.
    fn has_inline_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    #[test]
    fn inline_handlers_are_recognised() {
        assert!(has_inline_handler(r#"<button onclick="x()">"#));
        assert!(!has_inline_handler("<p>one of them, on time</p>"));
    }
}
