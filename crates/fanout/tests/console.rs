//! The operator console in a real browser (README "Console"; issue 15): Debian's headless chromium, driven over
//! WebDriver by `chromedriver` ([`common::webdriver`]), opens the console on fanout's admin port while an outage
//! is staged through the demo backends' control routes, and the test checks that the page shows it (breaker
//! open, queue depth, dead letters with their total, a recovery, a delivery looked up), then that a redrive
//! clicked on the page delivers (the demo backend has the user), that a delete clicked on the page gives the
//! write up on that backend, per letter and per backend, and that a missing or wrong token is refused plainly.
//!
//! Every wait polls for a condition with a generous deadline; nothing depends on how fast this machine is.
//! With `CONSOLE_SCREENSHOT=path` the test also writes a PNG of the console with the staged outage there
//! (`make console-screenshot` writes `docs/console.png`). Without chromium and chromedriver the test fails and
//! says how to install them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::webdriver::{ChromeDriver, Session};
use common::{ADMIN_TOKEN, Fanout, Replica, admin_client, eventually, fanout, post_form, replicas};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Deadline of every wait: generous, for a shared 2-core machine running a browser.
const WAIT: Duration = Duration::from_secs(90);

/// Serves `replica`'s control routes (`demo_backend::control`) on a fresh loopback port; returns its base URL.
async fn control(replica: &Replica) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind control");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    tokio::spawn(demo_backend::run_control(replica.backend.clone(), listener, std::future::pending()));
    format!("http://{addr}")
}

/// Stages a fault through a control route (`/down`, `/up`, `/flaky?share=1`, `/wipe`).
async fn stage(control: &str, route: &str) {
    let r = reqwest::Client::new().post(format!("{control}{route}")).send().await.expect("control");
    assert!(r.status().is_success(), "{route}: {}", r.status());
}

/// Registers `user`; returns the delivery id.
async fn register(lb: &Fanout, user: &str) -> String {
    let r = post_form(&lb.url("/register"), &format!("username={user}&password=pw-{user}")).await;
    assert_eq!(r.status(), reqwest::StatusCode::CREATED, "{user}");
    r.headers()["x-delivery-id"].to_str().expect("id").to_owned()
}

fn has_user(replica: &Replica, user: &str) -> bool {
    replica.backend.users().users.iter().any(|u| u.username == user)
}

/// The state of delivery `id` on backend number `index`, from the admin port.
async fn state_on(lb: &Fanout, id: &str, index: usize) -> String {
    let v: Value =
        reqwest::get(format!("http://{}/deliveries/{id}", lb.metrics)).await.expect("get").json().await.expect("json");
    v["backends"][index]["state"].as_str().unwrap_or_default().to_owned()
}

/// True (in the page) when the backend row of `arguments[0]` shows breaker `arguments[1]` and a queue
/// `arguments[2]` (`"empty"` or `"busy"`).
const BACKEND_ROW: &str = r#"
    const r = document.querySelector(`#backends tr[data-backend="${arguments[0]}"]`);
    if (!r) return false;
    const queue = Number(r.cells[2].textContent);
    return r.dataset.breaker === arguments[1] && (arguments[2] === 'busy' ? queue > 0 : queue === 0);
"#;

/// True when the dead-letter badge shows `arguments[0]` and the table holds that many rows (all on one page).
const DEAD_TOTAL: &str = r#"
    const t = document.getElementById('dead-total');
    return !!t && t.textContent === String(arguments[0])
        && document.querySelectorAll('#dead tbody tr').length === arguments[0];
"#;

/// The selector of a button of the dead letter of delivery `id` on `backend`.
fn dead_button(id: &str, backend: &str, button: &str) -> String {
    format!(r#"#dead tbody tr[data-key="{id}|{backend}"] button.{button}"#)
}

async fn notice_says(page: &Session, what: &str, needle: &str) -> String {
    page.wait_text("#notice", WAIT, what, |t| t.contains(needle)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_staged_outage_and_its_redrive_and_delete_buttons_work() {
    let pool = replicas(3).await;
    let controls = [control(&pool[0]).await, control(&pool[1]).await, control(&pool[2]).await];
    let labels: Vec<String> = pool.iter().map(Replica::label).collect();
    // Three attempts make a dead letter; three attempts without an answer open the breaker.
    let lb = fanout(&pool.iter().collect::<Vec<_>>(), &["--max-attempts", "3", "--breaker-failures", "3"]).await;

    // The staged outage: server2 answers every write 500 (dead letters), server3 is down (breaker, queue).
    stage(&controls[1], "/flaky?share=1").await;
    stage(&controls[2], "/down").await;
    let users = ["ann", "bob", "cy", "dee"];
    let mut ids = Vec::new();
    for u in users {
        ids.push(register(&lb, u).await);
    }
    // server1 lost its users and is recovered from the history.
    stage(&controls[0], "/wipe").await;
    let r = admin_client()
        .post(format!("http://{}/recoveries?backend={}&since=1h", lb.metrics, labels[0]))
        .send()
        .await
        .expect("recover");
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);

    // The page's own headers: no framing, no referrer, no cache, a CSP that allows only this origin.
    let console_url = format!("http://{}/console", lb.metrics);
    let r = reqwest::get(&console_url).await.expect("get console");
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let h = r.headers();
    assert!(h["content-type"].to_str().expect("ct").starts_with("text/html"));
    let csp = h["content-security-policy"].to_str().expect("csp");
    assert!(csp.starts_with("default-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["cache-control"], "no-store");

    let mut driver = ChromeDriver::start();
    let page = driver.session(1280, 1100).await;
    page.goto(&console_url).await;

    // The outage shows up: server3's breaker open with a queue, server2's four dead letters, server1 recovered.
    page.wait_script(BACKEND_ROW, json!([labels[2], "open", "busy"]), WAIT, "server3 open with a queue").await;
    page.wait_script(DEAD_TOTAL, json!([4]), WAIT, "four dead letters").await;
    page.wait_text(&format!(r#"#backends tr[data-backend="{}"] td.dead"#, labels[1]), WAIT, "server2's count", |t| {
        t == "4"
    })
    .await;
    page.wait_script(
        r#"const r = document.querySelector(`#recoveries tr[data-backend="${arguments[0]}"]`);
           return !!r && r.dataset.state === 'done';"#,
        json!([labels[0]]),
        WAIT,
        "server1's recovery done",
    )
    .await;
    eventually(WAIT, "server1 recovered", || async { users.iter().all(|u| has_user(&pool[0], u)) }).await;

    // A delivery looked up by id: delivered on server1, a dead letter on server2, pending on server3.
    page.fill("#lookup-id", &ids[0]).await;
    page.click_css("#lookup-go", WAIT).await;
    for (label, state) in labels.iter().zip(["delivered", "dead_letter", "pending"]) {
        page.wait_script(
            r#"const r = document.querySelector(`#lookup-table tr[data-backend="${arguments[0]}"]`);
               return !!r && r.dataset.state === arguments[1];"#,
            json!([label, state]),
            WAIT,
            &format!("the lookup shows {state} on {label}"),
        )
        .await;
    }
    let png = page.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    if let Some(path) = std::env::var_os("CONSOLE_SCREENSHOT") {
        std::fs::write(&path, &png).expect("write the screenshot");
    }

    // What is shown is text, never markup: a lookup of an HTML string shows it as typed.
    let markup = "<img src=x id=injected>";
    page.fill("#lookup-id", markup).await;
    page.click_css("#lookup-go", WAIT).await;
    page.wait_text("#lookup-error", WAIT, "the lookup's error", |t| t.contains(markup)).await;
    assert_eq!(page.script("return document.getElementById('injected') === null;", json!([])).await, true);

    // server2 serves again. Without a token the page sends nothing; with a wrong one the 401 is shown plainly.
    stage(&controls[1], "/up").await;
    page.click_css(&dead_button(&ids[0], &labels[1], "redrive"), WAIT).await;
    notice_says(&page, "no token", "enter the admin token first").await;
    page.fill("#token", "not-the-token").await;
    page.click_css("#token-save", WAIT).await;
    page.click_css(&dead_button(&ids[0], &labels[1], "redrive"), WAIT).await;
    notice_says(&page, "a wrong token", "401 Unauthorized").await;
    assert_eq!(state_on(&lb, &ids[0], 1).await, "dead_letter", "nothing changed");
    assert!(!has_user(&pool[1], "ann"));

    // With the token, a redrive clicked on the page delivers the write to server2.
    page.click_css("#token-forget", WAIT).await;
    page.fill("#token", ADMIN_TOKEN).await;
    page.click_css("#token-save", WAIT).await;
    page.wait_text("#token-state", WAIT, "the token is kept", |t| t.contains("token set")).await;
    page.click_css(&dead_button(&ids[0], &labels[1], "redrive"), WAIT).await;
    notice_says(&page, "the redrive", "1 redriven").await;
    eventually(WAIT, "server2 got ann's write", || async { has_user(&pool[1], "ann") }).await;
    page.wait_script(DEAD_TOTAL, json!([3]), WAIT, "three dead letters left").await;

    // Delete asks for a second click, then gives bob's write up on server2 (and only there).
    page.click_css(&dead_button(&ids[1], &labels[1], "delete"), WAIT).await;
    page.wait_text(&dead_button(&ids[1], &labels[1], "delete"), WAIT, "armed", |t| t.starts_with("Confirm")).await;
    assert_eq!(state_on(&lb, &ids[1], 1).await, "dead_letter", "one click deletes nothing");
    page.click_css(&dead_button(&ids[1], &labels[1], "delete"), WAIT).await;
    notice_says(&page, "the delete", "1 deleted").await;
    assert_eq!(state_on(&lb, &ids[1], 1).await, "discarded");
    page.wait_script(DEAD_TOTAL, json!([2]), WAIT, "two dead letters left").await;

    // "Redrive all" of server2's row: cy and dee reach it.
    let row = |button: &str| format!(r#"#backends tr[data-backend="{}"] button.{button}"#, labels[1]);
    page.click_css(&row("redrive-all"), WAIT).await;
    notice_says(&page, "the redrive of server2's letters", "2 redriven").await;
    eventually(WAIT, "server2 got cy and dee", || async { has_user(&pool[1], "cy") && has_user(&pool[1], "dee") })
        .await;
    page.wait_script(DEAD_TOTAL, json!([0]), WAIT, "no dead letter left").await;
    assert!(!has_user(&pool[1], "bob"), "the deleted write stays given up");

    // "Delete all" of server2's row, on a fresh dead letter.
    stage(&controls[1], "/flaky?share=1").await;
    let eve = register(&lb, "eve").await;
    page.wait_script(DEAD_TOTAL, json!([1]), WAIT, "eve's dead letter").await;
    page.wait_script(
        r#"const b = document.querySelector(`#backends tr[data-backend="${arguments[0]}"] button.delete-all`);
           return !!b && !b.disabled;"#,
        json!([labels[1]]),
        WAIT,
        "server2's delete-all enabled",
    )
    .await;
    page.click_css(&row("delete-all"), WAIT).await;
    page.click_css(&row("delete-all"), WAIT).await;
    notice_says(&page, "the delete of server2's letters", "1 deleted").await;
    assert_eq!(state_on(&lb, &eve, 1).await, "discarded");
    page.wait_script(DEAD_TOTAL, json!([0]), WAIT, "no dead letter left").await;

    // server3 back: the page sees its breaker close and its queue drain, and it has every user.
    stage(&controls[1], "/up").await;
    stage(&controls[2], "/up").await;
    page.wait_script(BACKEND_ROW, json!([labels[2], "closed", "empty"]), WAIT, "server3 closed and drained").await;
    eventually(WAIT, "server3 caught up", || async {
        ["ann", "bob", "cy", "dee", "eve"].iter().all(|u| has_user(&pool[2], u))
    })
    .await;

    page.quit().await;
    drop(driver);
    lb.stop().await;
}
