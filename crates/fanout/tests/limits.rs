//! Bounded connections over real TCP (README "Limits"): half-open and trickling clients are cut at the header
//! timeout, a trickled body at its deadline, an idle keep-alive connection at the idle timeout, and a connection
//! over the cap gets `503` in JSON, while a normal write still gets `201` and the admin port keeps answering.
//! fanout runs as its own process (its own open-files limit); the replicas run in this one.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::procs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(60);

async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.ok()?.text().await.ok()?;
    common::sample(&text, series)
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn stack(extra: &[&str]) -> (Vec<common::Replica>, procs::Proc, SocketAddr, SocketAddr) {
    let pool = common::replicas(3).await;
    let addrs: Vec<SocketAddr> = pool.iter().map(|r| r.addr).collect();
    let (p, api, admin) = procs::fanout(&addrs, extra);
    (pool, p, api, admin)
}

#[tokio::test]
async fn a_thousand_half_open_connections_neither_starve_a_write_nor_stay_past_the_header_timeout() {
    // This process holds the client side of every connection.
    fanout::listen::raise_open_files_limit();
    let (pool, mut lb, api, admin) = stack(&["--header-timeout", "3s"]).await;
    let mut half_open = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(api).await.expect("connect");
        s.write_all(b"POST /register HTTP/1.1\r\nHost: fanout\r\nContent-Le").await.expect("write");
        half_open.push(s);
    }
    // A normal write and the admin port, while they are held.
    let resp = common::post_form(&format!("http://{api}/register"), "username=normal&password=pw").await;
    assert_eq!(resp.status(), 201);
    common::eventually(WAIT, "the write reached every backend", || async {
        pool.iter().all(|r| r.backend.users().users.iter().any(|u| u.username == "normal"))
    })
    .await;
    assert_eq!(reqwest::get(format!("http://{admin}/healthz")).await.expect("healthz").status(), 200);

    // Every one of them is closed by fanout (the bound is the header timeout; the wait only caps a hang).
    let closed = futures_util::future::join_all(
        half_open.iter_mut().map(|s| async move { tokio::time::timeout(WAIT, read_to_close(s)).await.is_ok() }),
    )
    .await;
    assert!(closed.iter().all(|c| *c), "{} still open", closed.iter().filter(|c| !**c).count());
    common::eventually(Duration::from_secs(10), "the closes are counted", || async {
        metric(admin, "fanout_connections_closed_total{listener=\"api\",reason=\"header_timeout\"}").await
            >= Some(1000.0)
    })
    .await;
    // A thousand cuts, a few log lines: at most one a second, each with its count.
    let lines = lb.all_lines(Duration::from_secs(1));
    let cut_lines: Vec<&String> = lines.iter().filter(|l| l.contains("its request headers did not arrive")).collect();
    assert!(!cut_lines.is_empty() && cut_lines.len() <= 10, "{} lines", cut_lines.len());
}

#[tokio::test]
async fn over_the_connection_cap_a_connection_gets_503_in_json_and_the_admin_port_still_answers() {
    let (_pool, _lb, api, admin) = stack(&["--max-connections", "20", "--header-timeout", "2s"]).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(api).await.expect("connect"));
    }
    common::eventually(Duration::from_secs(10), "20 connections held", || async {
        metric(admin, "fanout_connections{listener=\"api\"}").await == Some(20.0)
    })
    .await;
    let mut extra = TcpStream::connect(api).await.expect("connect");
    let answer = tokio::time::timeout(WAIT, read_to_close(&mut extra)).await.expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("application/json") && answer.contains("\"error\":\"too many connections"), "{answer}");
    assert_eq!(
        metric(admin, "fanout_connections_closed_total{listener=\"api\",reason=\"over_limit\"}").await,
        Some(1.0)
    );
    // The silent connections are cut at the header timeout; then writes get through again.
    for s in &mut held {
        tokio::time::timeout(WAIT, read_to_close(s)).await.expect("closed by fanout");
    }
    common::eventually(Duration::from_secs(10), "a write gets through", || async {
        common::post_form(&format!("http://{api}/register"), "username=after&password=pw").await.status() == 201
    })
    .await;
}

#[tokio::test]
async fn a_header_trickled_a_byte_at_a_time_is_cut_at_the_header_timeout() {
    let (_pool, _lb, api, admin) = stack(&["--header-timeout", "2s"]).await;
    let stream = TcpStream::connect(api).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let closed = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out).await;
    });
    // 400 bytes at 4 a second would take 100 s; fanout must cut it long before.
    let header = format!("POST /register HTTP/1.1\r\nHost: fanout\r\nX-Slow: {}\r\n\r\n", "a".repeat(350));
    let mut sent = 0;
    for byte in header.as_bytes() {
        if closed.is_finished() || writer.write_all(&[*byte]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(sent < header.len(), "the whole header went through a byte at a time");
    assert!(
        metric(admin, "fanout_connections_closed_total{listener=\"api\",reason=\"header_timeout\"}").await >= Some(1.0)
    );
}

#[tokio::test]
async fn a_body_trickled_a_byte_at_a_time_gets_408_at_its_deadline_and_is_sent_nowhere() {
    let (pool, _lb, api, admin) = stack(&["--body-timeout", "2s"]).await;
    let body = format!("username=trickle&password={}", "p".repeat(300));
    let head = format!(
        "POST /register HTTP/1.1\r\nHost: fanout\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let stream = TcpStream::connect(api).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head.as_bytes()).await.expect("head");
    let answer = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    let mut sent = 0;
    for byte in body.as_bytes() {
        if answer.is_finished() || writer.write_all(&[*byte]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let answer = tokio::time::timeout(WAIT, answer).await.expect("answered").expect("join");
    assert!(sent < body.len(), "the whole body went through a byte at a time");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");
    assert_eq!(
        metric(admin, "fanout_connections_closed_total{listener=\"api\",reason=\"body_deadline\"}").await,
        Some(1.0)
    );
    assert!(pool.iter().all(|r| r.backend.users().users.is_empty()), "nothing was forwarded");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let (_pool, _lb, api, admin) = stack(&["--idle-timeout", "6s", "--header-timeout", "1s"]).await;
    let mut s = TcpStream::connect(api).await.expect("connect");
    // "GET /healthz" answers "ok\n": 3 bytes of body.
    let mut answer = [0u8; 12];
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: fanout\r\n\r\n").await.expect("write");
    s.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"HTTP/1.1 200");
    // Idle longer than the header timeout is fine: the connection is still good for the next request.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rest = vec![0u8; 256];
    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut rest)).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: fanout\r\n\r\n").await.expect("write");
    let again = String::from_utf8_lossy(&rest).into_owned();
    let mut second = [0u8; 12];
    s.read_exact(&mut second).await.unwrap_or_else(|e| panic!("second answer: {e} ({again})"));
    assert_eq!(&second, b"HTTP/1.1 200");
    // Then the idle timeout closes it.
    tokio::time::timeout(WAIT, read_to_close(&mut s)).await.expect("closed by fanout");
    assert_eq!(
        metric(admin, "fanout_connections_closed_total{listener=\"api\",reason=\"idle_timeout\"}").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn overload_refusals_are_counted_each_and_logged_a_few_lines_a_second() {
    // server3 is gone: every write stays pending there, so after 5 writes every new one is refused (503).
    let pool = common::replicas(2).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let addrs = vec![pool[0].addr, pool[1].addr, dead];
    let (mut lb, api, admin) = procs::fanout(&addrs, &["--max-pending", "5"]);
    let started = tokio::time::Instant::now();
    let clients = (0..16).map(|c| {
        tokio::spawn(async move {
            let mut refused = 0u64;
            for n in 0..100 {
                let form = format!("username=load{c}-{n}&password=pw");
                let resp = common::post_form(&format!("http://{api}/register"), &form).await;
                if resp.status() == 503 {
                    refused += 1;
                }
            }
            refused
        })
    });
    let mut refused = 0;
    for c in clients {
        refused += c.await.expect("client");
    }
    assert!(refused >= 1500, "only {refused} of 1600 refused");
    let counted = metric(admin, "fanout_rejected_writes_total").await.expect("counter");
    assert!(counted >= refused as f64, "{counted} counted, {refused} refused");
    let elapsed = started.elapsed().as_secs() + 1;
    let lines = lb.all_lines(Duration::from_millis(500));
    let noisy =
        lines.iter().filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\"")).count() as u64;
    // One kind of refusal line at most once a second, the breaker's "backend down" and a margin.
    assert!(noisy <= elapsed + 4, "{noisy} warning/error lines in {elapsed} s for {refused} refused writes");
}
