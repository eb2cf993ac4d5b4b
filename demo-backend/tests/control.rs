//! The control listener: outages staged at run time, seen by a real HTTP client over loopback (port 0).

use std::time::Duration;

use tokio::time::Instant;

use demo_backend::control::FaultsView;
use demo_backend::{DemoBackend, Settings};
use tokio::net::TcpListener;

async fn start() -> (String, String) {
    let backend = DemoBackend::new(Settings::for_test("s1"));
    let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let control = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (a, c) = (api.local_addr().expect("addr"), control.local_addr().expect("addr"));
    tokio::spawn(demo_backend::run(backend.clone(), api, std::future::pending()));
    tokio::spawn(demo_backend::run_control(backend, control, std::future::pending()));
    (format!("http://{a}"), format!("http://{c}"))
}

async fn control(c: &reqwest::Client, url: String) -> FaultsView {
    let r = c.post(url).send().await.expect("control");
    assert_eq!(r.status(), 200);
    serde_json::from_str(&r.text().await.expect("text")).expect("json")
}

async fn register(c: &reqwest::Client, api: &str, user: &str) -> reqwest::Result<reqwest::StatusCode> {
    let r = c
        .post(format!("{api}/register"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("username={user}&password=p"))
        .send()
        .await?;
    Ok(r.status())
}

#[tokio::test]
async fn down_closes_new_and_kept_alive_connections_and_up_serves_again() {
    let (api, ctl) = start().await;
    let client = reqwest::Client::new(); // keeps its connection alive between requests
    let ops = reqwest::Client::new();
    let state: FaultsView =
        serde_json::from_str(&ops.get(&ctl).send().await.expect("state").text().await.expect("text")).expect("json");
    assert_eq!(state.mode, "up");
    assert_eq!(register(&client, &api, "ann").await.expect("up"), 201);

    let state = control(&ops, format!("{ctl}/down")).await;
    assert_eq!((state.mode.as_str(), state.users), ("down", 1));
    // The kept-alive connection and a fresh one both fail without any HTTP answer.
    let err = register(&client, &api, "bob").await.expect_err("down: no answer on a kept-alive connection");
    assert!(!err.is_status(), "{err}");
    let fresh = reqwest::Client::new();
    let err = fresh.get(format!("{api}/login")).send().await.expect_err("down: no answer on a new connection");
    assert!(!err.is_status(), "{err}");

    assert_eq!(control(&ops, format!("{ctl}/up")).await.mode, "up");
    assert_eq!(register(&client, &api, "bob").await.expect("up again"), 201);
    let users: serde_json::Value = serde_json::from_str(
        &client.get(format!("{api}/users")).send().await.expect("users").text().await.expect("text"),
    )
    .expect("json");
    assert_eq!(users["count"], 2, "the outage kept the users: {users}");
}

#[tokio::test]
async fn slow_flaky_and_wipe() {
    let (api, ctl) = start().await;
    let c = reqwest::Client::new();

    let state = control(&c, format!("{ctl}/slow?delay=300ms")).await;
    assert_eq!((state.mode.as_str(), state.delay_ms), ("slow", 300));
    let t = Instant::now();
    assert_eq!(c.get(format!("{api}/login")).send().await.expect("login").status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(300), "answered before the delay: {:?}", t.elapsed());

    let state = control(&c, format!("{ctl}/flaky?share=1")).await;
    assert_eq!(state.mode, "slow+flaky");
    assert_eq!(register(&c, &api, "ann").await.expect("flaky"), 500);
    let state = control(&c, format!("{ctl}/flaky?share=0")).await;
    assert_eq!(state.mode, "slow");
    assert_eq!(register(&c, &api, "ann").await.expect("not flaky"), 201);

    let state = control(&c, format!("{ctl}/wipe")).await;
    assert_eq!(state.users, 0);
    let state = control(&c, format!("{ctl}/up")).await;
    assert_eq!((state.mode.as_str(), state.delay_ms, state.drop_share), ("up", 0, 0.0));

    for bad in ["/flaky?share=2", "/flaky", "/slow?delay=soon", "/slow"] {
        let r = c.post(format!("{ctl}{bad}")).send().await.expect("bad");
        assert_eq!(r.status(), 400, "{bad}");
        let text = r.text().await.expect("text");
        assert!(text.contains(if bad.starts_with("/flaky") { "share" } else { "delay" }), "{bad}: {text}");
    }
    assert_eq!(control(&c, format!("{ctl}/up")).await.mode, "up", "a bad request changed nothing");
}
