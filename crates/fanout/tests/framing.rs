//! Strict HTTP/1.1 framing on fanout's listener (README "Errors"; RFC 9112 sections 3.2, 6.1, 6.3, 7): the
//! request shapes that let two parsers disagree about where a request ends are refused with `400` in JSON, and
//! nothing of them is forwarded. Raw TCP, so that the bytes are exactly what a hostile client sends.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn send(api: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(api).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "not closed after: {}", String::from_utf8_lossy(&out));
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn ambiguous_framing_is_refused_with_400_in_json_and_forwarded_nowhere() {
    let pool = common::replicas(3).await;
    let lb = common::fanout(&pool.iter().collect::<Vec<_>>(), &[]).await;
    let form = "username=smuggled&password=pw";
    let n = form.len();
    let chunked = format!("{n:x}\r\n{form}\r\n0\r\n\r\n");
    let ct = "Content-Type: application/x-www-form-urlencoded\r\n";
    let cases = [
        ("no Host", format!("POST /register HTTP/1.1\r\n{ct}Content-Length: {n}\r\n\r\n{form}")),
        ("two Host", format!("POST /register HTTP/1.1\r\nHost: a\r\nHost: b\r\n{ct}Content-Length: {n}\r\n\r\n{form}")),
        (
            "two equal Content-Length",
            format!(
                "POST /register HTTP/1.1\r\nHost: a\r\n{ct}Content-Length: {n}\r\nContent-Length: {n}\r\n\r\n{form}"
            ),
        ),
        (
            "chunked twice, two fields",
            format!(
                "POST /register HTTP/1.1\r\nHost: a\r\n{ct}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"
            ),
        ),
        (
            "chunked twice, one field",
            format!("POST /register HTTP/1.1\r\nHost: a\r\n{ct}Transfer-Encoding: chunked, chunked\r\n\r\n{chunked}"),
        ),
        (
            "Transfer-Encoding and Content-Length",
            format!(
                "POST /register HTTP/1.1\r\nHost: a\r\n{ct}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}",
                chunked.len()
            ),
        ),
        // Found by an attack run: bare-LF line ends hid the second field from the check.
        (
            "two Content-Length, bare LF",
            format!(
                "POST /register HTTP/1.1\nHost: a\n{}Content-Length: {n}\nContent-Length: {n}\n\n{form}",
                ct.replace("\r\n", "\n")
            ),
        ),
        (
            "Transfer-Encoding and Content-Length, bare LF",
            format!(
                "POST /register HTTP/1.1\nHost: a\n{}Content-Length: {}\nTransfer-Encoding: chunked\n\n{chunked}",
                ct.replace("\r\n", "\n"),
                chunked.len()
            ),
        ),
    ];
    // RFC 9112 section 6.1: a transfer coding fanout does not decode is 501, not silently passed on.
    let gzip = send(
        lb.api,
        &format!("POST /register HTTP/1.1\r\nHost: a\r\n{ct}Transfer-Encoding: gzip, chunked\r\n\r\n{chunked}"),
    )
    .await;
    assert!(gzip.starts_with("HTTP/1.1 501"), "{gzip}");
    assert!(gzip.contains("\"error\""), "{gzip}");
    // A path segment that is not even UTF-8 gets fanout's JSON, not axum's text; an admin action is refused
    // for want of the token before its path is looked at.
    let bad = send(lb.api, "GET /deliveries/%FF HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(bad.starts_with("HTTP/1.1 404") && bad.contains("\"error\""), "{bad}");
    let admin = send(
        lb.metrics,
        "POST /dead-letters/%FF/redrive HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(admin.starts_with("HTTP/1.1 401"), "{admin}");
    for (what, request) in &cases {
        let answer = send(lb.api, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {answer}"));
        assert!(json["error"].as_str().expect("error").contains("RFC 9112"), "{what}: {json}");
    }
    // A well-formed write on the same listener goes through; nothing of the refused ones went anywhere.
    let fine = send(lb.api, &format!("POST /register HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{ct}Content-Length: 22\r\n\r\nusername=ok&password=p")).await;
    assert!(fine.starts_with("HTTP/1.1 201"), "{fine}");
    common::eventually(Duration::from_secs(30), "the good write everywhere", || async {
        pool.iter().all(|r| r.backend.users().users.iter().any(|u| u.username == "ok"))
    })
    .await;
    for r in &pool {
        assert!(r.backend.users().users.iter().all(|u| u.username != "smuggled"), "a refused write was forwarded");
    }
    lb.stop().await;
}
