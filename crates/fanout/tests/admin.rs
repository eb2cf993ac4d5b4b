//! The admin port's access rules over real HTTP (README "Security"): the routes that change state need the admin
//! token, a cross-site request cannot pass, and without a configured token they are refused with a line that says
//! how to enable them; what only reads stays open. Replicas and fanout run in this process on `127.0.0.1:0`.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{Fanout, eventually, fanout, fanout_with, post_form, replicas};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn admin(lb: &Fanout, path: &str) -> String {
    format!("http://{}{path}", lb.metrics)
}

async fn dead_letters(lb: &Fanout) -> Value {
    reqwest::get(admin(lb, "/dead-letters")).await.expect("get").json().await.expect("json")
}

/// One dead letter on the second replica (it answers `400` once).
async fn one_dead_letter(lb: &Fanout, pool: &[common::Replica]) -> String {
    pool[1].backend.fail_next(&[StatusCode::BAD_REQUEST]);
    let resp = post_form(&lb.url("/register"), "username=victim&password=old").await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    eventually(WAIT, "a dead letter", || async { dead_letters(lb).await["count"] == 1 }).await;
    resp.headers()["x-delivery-id"].to_str().expect("id").to_owned()
}

#[tokio::test]
async fn a_cross_site_redrive_or_delete_without_the_token_changes_nothing() {
    let pool = replicas(3).await;
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &[]).await;
    let id = one_dead_letter(&lb, &pool).await;
    let backend = pool[1].label();
    let c = common::client();

    // What a foreign page can make a browser send: a "simple" request, text/plain, its Origin, no Authorization.
    let forged = [
        c.post(admin(&lb, &format!("/dead-letters/redrive?backend={backend}"))),
        c.post(admin(&lb, &format!("/dead-letters/{id}/redrive"))),
        c.delete(admin(&lb, &format!("/dead-letters?backend={backend}"))),
        c.delete(admin(&lb, &format!("/dead-letters/{id}"))),
        c.post(admin(&lb, &format!("/recoveries?backend={backend}&since=1h"))),
    ];
    for request in forged {
        let resp = request
            .header("content-type", "text/plain")
            .header("origin", "http://attacker.example")
            .body("x")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        assert!(resp.headers().get("access-control-allow-origin").is_none(), "no CORS grant");
        let body: Value = resp.json().await.expect("json error");
        assert!(body["error"].as_str().expect("error").contains("Authorization: Bearer"), "{body}");
    }
    // A wrong token, another scheme, or the token as a query parameter do not pass either.
    for auth in ["Bearer wrong-token-0123456789", &format!("Basic {}", common::ADMIN_TOKEN), common::ADMIN_TOKEN] {
        let resp = c
            .post(admin(&lb, &format!("/dead-letters/{id}/redrive")))
            .header("authorization", auth)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth}");
    }
    let resp = c
        .post(admin(&lb, &format!("/dead-letters/{id}/redrive?token={}", common::ADMIN_TOKEN)))
        .send()
        .await
        .expect("send");
    assert_ne!(resp.status(), StatusCode::OK);

    // Nothing changed: the dead letter is still there, and the backend never got the write.
    assert_eq!(dead_letters(&lb).await["count"], 1);
    assert!(!pool[1].backend.users().users.iter().any(|u| u.username == "victim"));

    // With the token, the same redrive goes through.
    let resp = common::admin_client()
        .post(admin(&lb, &format!("/dead-letters/{id}/redrive")))
        .header("content-type", "text/plain")
        .header("origin", "http://attacker.example")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.expect("json")["redriven"], 1);
    eventually(WAIT, "the redriven write was delivered", || async {
        pool[1].backend.users().users.iter().any(|u| u.username == "victim")
    })
    .await;
    lb.stop().await;
}

#[tokio::test]
async fn without_a_configured_token_admin_actions_are_refused_and_reads_stay_open() {
    let pool = replicas(3).await;
    let lb = fanout_with(&pool.iter().collect::<Vec<_>>(), &[], None).await;
    let id = one_dead_letter(&lb, &pool).await;
    let resp =
        common::admin_client().post(admin(&lb, &format!("/dead-letters/{id}/redrive"))).send().await.expect("post");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "any token is wrong when none is configured");
    let body: Value = resp.json().await.expect("json");
    assert!(body["error"].as_str().expect("error").contains("--admin-token-file"), "{body}");
    let resp = common::client().delete(admin(&lb, &format!("/dead-letters/{id}"))).send().await.expect("delete");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(dead_letters(&lb).await["count"], 1, "nothing changed");

    // Reads stay open on the private port: metrics, health, the list, a delivery with its backends named.
    assert_eq!(reqwest::get(admin(&lb, "/metrics")).await.expect("get").status(), StatusCode::OK);
    assert_eq!(reqwest::get(admin(&lb, "/healthz")).await.expect("get").status(), StatusCode::OK);
    // Readiness on the private port too, for probes that reach only it (compose, Kubernetes).
    assert_eq!(reqwest::get(admin(&lb, "/readyz")).await.expect("get").status(), StatusCode::OK);
    let full: Value =
        reqwest::get(admin(&lb, &format!("/deliveries/{id}"))).await.expect("get").json().await.expect("json");
    assert_eq!(full["backends"][1]["backend"], pool[1].label().as_str(), "{full}");
    // The API port's view has the same states, without the addresses.
    let public: Value =
        reqwest::get(lb.url(&format!("/deliveries/{id}"))).await.expect("get").json().await.expect("json");
    assert_eq!(public["backends"][1]["state"], "dead_letter", "{public}");
    assert!(!public.to_string().contains(&pool[1].label()), "{public}");
    assert!(public["backends"][1].get("backend").is_none());
    lb.stop().await;
}
