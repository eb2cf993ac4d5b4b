//! The admin token (README "Security"): the admin routes that change state (redrive, delete, recover) need
//! `Authorization: Bearer <token>`, the token given by `--admin-token-file` or `ADMIN_TOKEN`.
//!
//! A browser never adds an `Authorization` header to a cross-site request on its own, so a page on another
//! origin cannot redrive or delete through an operator's browser (a form post or `text/plain` fetch carries no
//! such header, and a fetch that sets it needs a CORS preflight, which fanout never grants).
//!
//! The token is kept only as its SHA-256 digest, and a presented token is compared digest to digest with
//! `subtle`'s constant-time equality: the time taken says nothing about how much of it matched, nor its length.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The configured admin token, as a SHA-256 digest (32 bytes).
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Keeps the digest of `token`.
    pub fn new(token: &str) -> Self {
        Self { digest: Sha256::digest(token.as_bytes()).into() }
    }

    /// True when `headers` carry `Authorization: Bearer <this token>` (the scheme is case-insensitive, per
    /// RFC 9110 section 11.1).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else { return false };
        let Some((scheme, token)) = value.to_str().ok().and_then(|v| v.split_once(' ')) else { return false };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let presented: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        presented.ct_eq(&self.digest).into()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn only_the_bearer_token_itself_passes() {
        let t = AdminToken::new("0123456789abcdef-secret");
        assert!(t.allows(&with(&["Bearer 0123456789abcdef-secret"])));
        assert!(t.allows(&with(&["bearer 0123456789abcdef-secret"])));
        assert!(!t.allows(&with(&[])));
        assert!(!t.allows(&with(&["Bearer 0123456789abcdef-secre"])), "a prefix");
        assert!(!t.allows(&with(&["Bearer 0123456789abcdef-secretX"])));
        assert!(!t.allows(&with(&["Basic 0123456789abcdef-secret"])));
        assert!(!t.allows(&with(&["0123456789abcdef-secret"])));
        assert!(!t.allows(&with(&["Bearer x", "Bearer 0123456789abcdef-secret"])), "two headers");
        assert!(!format!("{t:?}").contains("secret"));
    }
}
