//! The `demo-backend` binary: the original's environment names, and one clear line for a bad value.

use std::process::Command;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo-backend"));
    cmd.env_clear();
    cmd
}

#[test]
fn a_bad_value_exits_2_with_one_line_naming_the_variable() {
    for (k, v, needle) in [
        ("SKIP_PROBABILITY", "1.5", "--skip-probability"),
        ("SKIP_SOME_REQUESTS", "maybe", "--skip-some-requests"),
        ("SERVER_PORT", "http", "--port"),
        ("RESPONSE_DELAY", "later", "--response-delay"),
        ("CONTROL_PORT", "nine", "--control-port"),
        ("CONTROL_HOST", "localhost:1", "--control-host"),
    ] {
        let out = bin().env(k, v).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{k}={v}: {stderr}");
        assert!(stderr.contains(needle), "{k}={v}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn it_serves_the_originals_routes() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_demo-backend"))
            .env_clear()
            .env("SERVER_NAME", "s9")
            .env("SKIP_SOME_REQUESTS", "false")
            .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let addr = loop {
            let line = lines.next_line().await.expect("read").expect("a listening line");
            let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
            if v["fields"]["message"] == "demo backend listening" {
                break v["fields"]["addr"].as_str().expect("addr").to_owned();
            }
        };
        let c = reqwest::Client::new();
        let login = c.get(format!("http://{addr}/login")).send().await.expect("login");
        assert_eq!(login.status(), 200);
        assert_eq!(login.text().await.expect("text"), "logged in on s9\n");
        let reg = c
            .post(format!("http://{addr}/register"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("username=schef&password=example")
            .send()
            .await
            .expect("register");
        assert_eq!(reg.status(), 201);
        assert_eq!(reg.text().await.expect("text"), "register on s9\n");
        let users = c.get(format!("http://{addr}/users")).send().await.expect("users").text().await.expect("text");
        assert!(users.contains(r#""username":"schef""#), "{users}");
        assert!(!users.contains("example"), "the password never shows: {users}");
        child.kill().await.expect("kill");
    });
}
