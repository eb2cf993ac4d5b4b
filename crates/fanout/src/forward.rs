//! What a delivery sends to every backend (docs/design.md section 5): the original method, path and body, and
//! the end-to-end headers. Hop-by-hop headers (RFC 9110 section 7.6.1: `Connection` and every header it names,
//! `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, and the `Proxy-*` family) are dropped, as are
//! `Expect`, `Host` (each backend gets its own) and `Content-Length` (recomputed from the body).

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use bytes::Bytes;

/// The `Idempotency-Key` header (IETF draft-ietf-httpapi-idempotency-key-header).
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The `X-Request-Id` header, set by nginx (`$request_id`) or by fanout.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The `X-Forwarded-For` header; fanout appends its peer's address.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The `X-Delivery-Id` header carried by every answer to a write.
pub static X_DELIVERY_ID: HeaderName = HeaderName::from_static("x-delivery-id");

/// Longest accepted `Idempotency-Key` or `X-Request-Id`, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// Largest total size of a write's headers (names and values), in bytes. Every pending delivery keeps its
/// headers, so they count in its memory like the body; 32 KiB is what nginx accepts by default
/// (`large_client_header_buffers 4 8k`). Larger header sets get `431`.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The total size of `headers`: every name and value, plus 4 bytes per line for `: ` and CRLF.
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum()
}

/// One client write, ready to be sent to every backend. The body is buffered once and shared by every attempt.
#[derive(Debug, Clone)]
pub struct ForwardRequest {
    /// The client's method.
    pub method: Method,
    /// The client's path and query, starting with `/`.
    pub path_and_query: String,
    /// The end-to-end headers plus `Idempotency-Key`, `X-Request-Id` and `X-Forwarded-For`.
    pub headers: HeaderMap,
    /// The body, byte for byte.
    pub body: Bytes,
}

/// A client-supplied header that cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {0} header must be 1 to 255 visible ASCII characters")]
pub struct BadHeader(pub &'static str);

/// True for headers that never cross a proxy, whatever `Connection` says.
fn always_dropped(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::EXPECT
        || name == header::HOST
        || name == header::CONTENT_LENGTH
        || name.as_str() == "keep-alive"
        || name.as_str().starts_with("proxy-")
}

/// Checks an identifier header: 1 to [`MAX_KEY_LEN`] visible ASCII characters (no spaces, no controls).
fn valid_token(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_KEY_LEN && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// The client's value of an identifier header, if any, checked.
///
/// # Errors
/// [`BadHeader`] when it is present but empty, too long or not visible ASCII, or present twice.
pub fn client_token(incoming: &HeaderMap, name: &'static HeaderName) -> Result<Option<HeaderValue>, BadHeader> {
    let mut values = incoming.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        // Copied, like every forwarded value (see forwarded_headers): no slice of the read buffer is kept.
        (Some(v), None) if valid_token(v) => {
            Ok(Some(HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone())))
        }
        _ => Err(BadHeader(canonical(name))),
    }
}

fn canonical(name: &HeaderName) -> &'static str {
    if name == IDEMPOTENCY_KEY {
        "Idempotency-Key"
    } else if name == X_REQUEST_ID {
        "X-Request-Id"
    } else {
        "identifier"
    }
}

/// The string value of `field` in a form (`application/x-www-form-urlencoded`, also assumed when there is no
/// `Content-Type`) or JSON body: the per-user ordering key. `Ok(None)` when the body has no such field, its
/// value is not a string, or the content type is another (the backends will judge it).
///
/// # Errors
/// [`UnorderedBody`] when the body does not parse in its declared format, or names `field` twice: a backend
/// whose parser reads it differently could apply the write under a user fanout did not order it by (found by an
/// attack run: a JSON number out of `f64`'s range made a strict parser give up on the whole body while the
/// backend's, which skips unknown fields, applied it). Other fields are skipped unparsed, like a backend does.
/// `headers` must be the headers as forwarded: a `Content-Type` the client named in `Connection` never reaches a
/// backend, so it must not decide the format here either.
pub fn body_field(headers: &HeaderMap, body: &[u8], field: &str) -> Result<Option<String>, UnorderedBody> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        use serde::Deserializer as _;
        let mut de = serde_json::Deserializer::from_slice(body);
        let found = de.deserialize_map(JsonField(field)).map_err(|_| UnorderedBody("JSON"))?;
        de.end().map_err(|_| UnorderedBody("JSON"))?;
        Ok(found)
    } else if mime.is_empty() || mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).map_err(|_| UnorderedBody("form"))?;
        let mut values = pairs.into_iter().filter(|(k, _)| k == field).map(|(_, v)| v);
        let first = values.next();
        if values.next().is_some() {
            return Err(UnorderedBody("form"));
        }
        Ok(first)
    } else {
        Ok(None)
    }
}

/// A body whose ordering key cannot be read for sure (see [`body_field`]): its format's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the body is not a valid {0} object with at most one ordering-key field (--ordering-key), so the write could not \
     be kept in order; nothing was forwarded"
)]
pub struct UnorderedBody(pub &'static str);

/// Finds one top-level field of a JSON object, skipping every other value without interpreting it.
struct JsonField<'a>(&'a str);

impl<'de> serde::de::Visitor<'de> for JsonField<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: Option<Option<String>> = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0 {
                if found.is_some() {
                    return Err(serde::de::Error::custom("the field appears twice"));
                }
                let value: serde_json::Value = map.next_value()?;
                found = Some(value.as_str().map(str::to_owned));
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found.flatten())
    }
}

/// The headers every attempt of a delivery carries: the client's end-to-end headers, then `Idempotency-Key`,
/// `X-Request-Id` and `X-Forwarded-For` (the client's chain with `peer` appended, as proxies do).
pub fn forwarded_headers(
    incoming: &HeaderMap,
    idempotency_key: HeaderValue,
    request_id: HeaderValue,
    peer: Option<IpAddr>,
) -> HeaderMap {
    // Token by token from the raw bytes: one malformed token must not hide the valid ones next to it.
    let named_by_connection: Vec<HeaderName> = incoming
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(incoming.len() + 3);
    for (name, value) in incoming {
        if always_dropped(name) || named_by_connection.contains(name) {
            continue;
        }
        if name == IDEMPOTENCY_KEY || name == X_REQUEST_ID || name == X_FORWARDED_FOR {
            continue;
        }
        // A copy, not a clone: hyper's header values are slices of the connection's read buffer, and a pending
        // delivery holding one would pin the whole buffer (8 KiB and more) for as long as it waits.
        let owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        out.append(name.clone(), owned);
    }
    out.insert(IDEMPOTENCY_KEY.clone(), idempotency_key);
    out.insert(X_REQUEST_ID.clone(), request_id);
    let chain: Vec<&str> = incoming.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
    let mut xff = chain.join(", ");
    if let Some(ip) = peer {
        if !xff.is_empty() {
            xff.push_str(", ");
        }
        xff.push_str(&ip.to_string());
    }
    if let Ok(value) = HeaderValue::from_str(&xff)
        && !xff.is_empty()
    {
        out.insert(X_FORWARDED_FOR.clone(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value"));
        }
        m
    }

    #[test]
    fn hop_by_hop_and_named_headers_are_dropped() {
        let incoming = map(&[
            ("host", "lb.example"),
            ("content-length", "10"),
            ("content-type", "application/x-www-form-urlencoded"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "x-other-hop"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-connection", "keep-alive"),
            ("expect", "100-continue"),
            ("x-secret-hop", "1"),
            ("x-other-hop", "1"),
            ("authorization", "Bearer t"),
            ("accept", "text/plain"),
            ("accept", "application/json"),
            ("x-custom", "kept"),
        ]);
        let out =
            forwarded_headers(&incoming, HeaderValue::from_static("key-1"), HeaderValue::from_static("req-1"), None);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        for dropped in [
            "host",
            "content-length",
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "expect",
            "x-secret-hop",
            "x-other-hop",
        ] {
            assert!(!names.contains(&dropped), "{dropped} forwarded: {names:?}");
        }
        assert_eq!(out.get("content-type").expect("kept"), "application/x-www-form-urlencoded");
        assert_eq!(out.get("authorization").expect("kept"), "Bearer t");
        assert_eq!(out.get_all("accept").iter().count(), 2);
        assert_eq!(out.get("x-custom").expect("kept"), "kept");
        assert_eq!(out.get(&IDEMPOTENCY_KEY).expect("set"), "key-1");
        assert_eq!(out.get(&X_REQUEST_ID).expect("set"), "req-1");
        assert!(out.get(&X_FORWARDED_FOR).is_none());
    }

    #[test]
    fn a_malformed_connection_token_does_not_hide_the_others() {
        let mut incoming = map(&[("x-hop", "1"), ("x-kept", "1")]);
        incoming.insert(header::CONNECTION, HeaderValue::from_bytes(b"X-Hop, \xff").expect("opaque bytes"));
        let out = forwarded_headers(&incoming, HeaderValue::from_static("k"), HeaderValue::from_static("r"), None);
        assert!(!out.contains_key("x-hop"));
        assert!(out.contains_key("x-kept"));
    }

    #[test]
    fn header_bytes_count_names_values_and_separators() {
        assert_eq!(header_bytes(&map(&[("ab", "cde"), ("f", "")])), (2 + 3 + 4) + (1 + 4));
    }

    #[test]
    fn forwarded_for_is_appended_and_ids_replace_the_clients() {
        let incoming = map(&[("x-forwarded-for", "203.0.113.7"), ("idempotency-key", "old"), ("x-request-id", "old")]);
        let out = forwarded_headers(
            &incoming,
            HeaderValue::from_static("new-key"),
            HeaderValue::from_static("new-req"),
            Some("10.1.2.3".parse().expect("ip")),
        );
        assert_eq!(out.get(&X_FORWARDED_FOR).expect("set"), "203.0.113.7, 10.1.2.3");
        assert_eq!(out.get_all(&IDEMPOTENCY_KEY).iter().collect::<Vec<_>>(), ["new-key"]);
        assert_eq!(out.get_all(&X_REQUEST_ID).iter().collect::<Vec<_>>(), ["new-req"]);
        let fresh = forwarded_headers(
            &HeaderMap::new(),
            HeaderValue::from_static("k"),
            HeaderValue::from_static("r"),
            Some("::1".parse().expect("ip")),
        );
        assert_eq!(fresh.get(&X_FORWARDED_FOR).expect("set"), "::1");
    }

    #[test]
    fn the_ordering_field_is_read_from_form_and_json_bodies() {
        let form = map(&[("content-type", "application/x-www-form-urlencoded; charset=utf-8")]);
        assert_eq!(body_field(&form, b"password=x&username=ann%20b", "username"), Ok(Some("ann b".into())));
        assert_eq!(body_field(&HeaderMap::new(), b"username=ann", "username"), Ok(Some("ann".into())));
        assert_eq!(body_field(&form, b"password=x", "username"), Ok(None));
        assert_eq!(body_field(&form, b"username=a&username=b", "username"), Err(UnorderedBody("form")));
        let json = map(&[("content-type", "application/json")]);
        assert_eq!(body_field(&json, br#"{"username":"cy","password":"p"}"#, "username"), Ok(Some("cy".into())));
        assert_eq!(body_field(&json, br#"{"username":7}"#, "username"), Ok(None));
        assert_eq!(body_field(&json, b"{broken", "username"), Err(UnorderedBody("JSON")));
        assert_eq!(body_field(&json, br#"{"username":"a","username":"b"}"#, "username"), Err(UnorderedBody("JSON")));
        assert_eq!(body_field(&json, br#"{"username":"a"} trailing"#, "username"), Err(UnorderedBody("JSON")));
        // Found by an attack run: a number no f64 holds, in another field, must not hide the user.
        let padded = br#"{"username":"v","password":"p","pad":1e400,"deep":[{"x":-1e999}]}"#;
        assert_eq!(body_field(&json, padded, "username"), Ok(Some("v".into())));
        let other = map(&[("content-type", "text/plain")]);
        assert_eq!(body_field(&other, b"username=ann", "username"), Ok(None));
    }

    #[test]
    fn identifier_headers_are_checked() {
        assert_eq!(client_token(&HeaderMap::new(), &IDEMPOTENCY_KEY), Ok(None));
        let ok = map(&[("idempotency-key", "abc-123_~")]);
        assert_eq!(client_token(&ok, &IDEMPOTENCY_KEY), Ok(Some(HeaderValue::from_static("abc-123_~"))));
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for bad in [
            map(&[("idempotency-key", "")]),
            map(&[("idempotency-key", "a b")]),
            map(&[("idempotency-key", &long)]),
            map(&[("idempotency-key", "a"), ("idempotency-key", "b")]),
        ] {
            let err = client_token(&bad, &IDEMPOTENCY_KEY).expect_err("bad");
            assert!(err.to_string().contains("Idempotency-Key"));
        }
    }
}
