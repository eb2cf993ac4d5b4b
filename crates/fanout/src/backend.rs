//! One backend of the pool: its address as written by the operator, and the classification of an attempt's
//! result into an [`Outcome`] (docs/design.md section 4), as pure code.

use std::fmt;
use std::str::FromStr;

use reqwest::{StatusCode, Url};

/// A backend address from `--backends`: `host:port` (read as `http://host:port`) or an `http://` URL with an
/// optional path prefix. The text as written is kept as the metrics label (the original's `domain` label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    label: String,
    url: Url,
}

/// Why a `--backends` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not a backend: {why}")]
pub struct ParseBackendError {
    entry: String,
    why: &'static str,
}

impl FromStr for BackendAddr {
    type Err = ParseBackendError;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let fail = |why| ParseBackendError { entry: entry.to_owned(), why };
        let url = if entry.contains("://") {
            let url = Url::parse(entry).map_err(|_| fail("not a valid URL"))?;
            match url.scheme() {
                "http" => {}
                "https" => return Err(fail("https is not supported (no TLS stack is built in); use http")),
                _ => return Err(fail("the scheme must be http")),
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(fail("a backend URL takes no query or fragment"));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(fail("a backend URL takes no credentials"));
            }
            url
        } else {
            let (host, port) = entry.rsplit_once(':').ok_or_else(|| fail("expected host:port"))?;
            if host.is_empty() || host.contains('/') {
                return Err(fail("expected host:port"));
            }
            port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| fail("the port must be 1-65535"))?;
            Url::parse(&format!("http://{entry}")).map_err(|_| fail("expected host:port"))?
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(fail("the host is missing"));
        }
        if url.port_or_known_default() == Some(0) {
            return Err(fail("the port must be 1-65535"));
        }
        Ok(BackendAddr { label: entry.to_owned(), url })
    }
}

impl BackendAddr {
    /// The entry as the operator wrote it; used as the `domain` / `backend` label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The parsed base URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The URL of `path_and_query` (which starts with `/`) on this backend, below the base URL's path prefix.
    /// Built from the parsed base, so the host is not parsed (nor IDNA-processed) again for every attempt.
    pub fn target(&self, path_and_query: &str) -> Url {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut url = self.url.clone();
        let prefix = self.url.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        url.set_query(query);
        url
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// The class of one attempt's result (docs/design.md section 4). Its label values are a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// `201 Created`: the write is delivered to this backend.
    Success,
    /// A `5xx` answer: transient, retried.
    Status5xx,
    /// `408`, `425` or `429`: transient, retried (RFC 9110 / RFC 8470 / RFC 6585 say "try again later").
    RetryableStatus,
    /// Any other answer (`200`, `3xx`, other `4xx`): permanent, not retried. Redirects are never followed.
    Rejected,
    /// The attempt exceeded `--attempt-timeout`: transient.
    Timeout,
    /// The TCP connection could not be made: transient.
    Connect,
    /// The connection broke while sending or receiving: transient.
    Transport,
}

impl Outcome {
    /// The `outcome` label values, indexed by [`Outcome::index`].
    pub const LABELS: [&'static str; 7] =
        ["success", "status_5xx", "status_retryable", "rejected", "timeout", "connect_error", "transport_error"];

    /// Classifies an HTTP status.
    pub fn from_status(status: StatusCode) -> Self {
        match status.as_u16() {
            201 => Outcome::Success,
            408 | 425 | 429 => Outcome::RetryableStatus,
            500..=599 => Outcome::Status5xx,
            _ => Outcome::Rejected,
        }
    }

    /// Classifies a request that got no complete answer.
    pub fn from_error(err: &reqwest::Error) -> Self {
        if err.is_timeout() {
            Outcome::Timeout
        } else if err.is_connect() {
            Outcome::Connect
        } else {
            Outcome::Transport
        }
    }

    /// True when another attempt may succeed.
    pub fn is_transient(self) -> bool {
        !matches!(self, Outcome::Success | Outcome::Rejected)
    }

    /// True when the backend answered with a status line (it is up, whatever it said).
    pub fn got_answer(self) -> bool {
        matches!(self, Outcome::Success | Outcome::Status5xx | Outcome::RetryableStatus | Outcome::Rejected)
    }

    /// Position in [`Outcome::LABELS`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_table_of_the_design() {
        let cases: &[(u16, Outcome, bool)] = &[
            (201, Outcome::Success, false),
            (200, Outcome::Rejected, false),
            (202, Outcome::Rejected, false),
            (204, Outcome::Rejected, false),
            (301, Outcome::Rejected, false),
            (302, Outcome::Rejected, false),
            (307, Outcome::Rejected, false),
            (400, Outcome::Rejected, false),
            (401, Outcome::Rejected, false),
            (404, Outcome::Rejected, false),
            (409, Outcome::Rejected, false),
            (413, Outcome::Rejected, false),
            (408, Outcome::RetryableStatus, true),
            (425, Outcome::RetryableStatus, true),
            (429, Outcome::RetryableStatus, true),
            (500, Outcome::Status5xx, true),
            (502, Outcome::Status5xx, true),
            (503, Outcome::Status5xx, true),
            (504, Outcome::Status5xx, true),
            (599, Outcome::Status5xx, true),
        ];
        for (code, outcome, transient) in cases {
            let got = Outcome::from_status(StatusCode::from_u16(*code).expect("status"));
            assert_eq!(got, *outcome, "{code}");
            assert_eq!(got.is_transient(), *transient, "{code}");
            assert!(got.got_answer());
        }
        for o in [Outcome::Timeout, Outcome::Connect, Outcome::Transport] {
            assert!(o.is_transient());
            assert!(!o.got_answer());
        }
        for (i, label) in Outcome::LABELS.iter().enumerate() {
            let all = [
                Outcome::Success,
                Outcome::Status5xx,
                Outcome::RetryableStatus,
                Outcome::Rejected,
                Outcome::Timeout,
                Outcome::Connect,
                Outcome::Transport,
            ];
            assert_eq!(all[i].as_str(), *label);
        }
    }

    #[test]
    fn backend_addresses_parse() {
        let a: BackendAddr = "server1:8080".parse().expect("host:port");
        assert_eq!(a.label(), "server1:8080");
        assert_eq!(a.target("/register").as_str(), "http://server1:8080/register");
        let b: BackendAddr = "http://10.0.0.2:9000/api/".parse().expect("url");
        assert_eq!(b.target("/register?x=1").as_str(), "http://10.0.0.2:9000/api/register?x=1");
        let c: BackendAddr = "[::1]:8080".parse().expect("ipv6");
        assert_eq!(c.target("/a").as_str(), "http://[::1]:8080/a");
        assert_eq!(a.target("/a%20b?q=%C3%A9").as_str(), "http://server1:8080/a%20b?q=%C3%A9");
        for bad in [
            "server1",
            ":8080",
            "server1:0",
            "server1:http",
            "https://s:1",
            "ftp://s:1",
            "http://",
            "a/b:1",
            "http://u:p@s:1",
        ] {
            assert!(bad.parse::<BackendAddr>().is_err(), "{bad}");
        }
    }
}
