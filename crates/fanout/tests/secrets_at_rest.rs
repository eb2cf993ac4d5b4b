//! Secrets at rest (docs/write-log.md, "Encryption at rest"; finding 4 of the attack runs: passwords readable in
//! the outbox file): real `fanout` and `demo-backend` processes over HTTP, the write log on disk, and the key
//! file given with `--encryption-key-file`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::procs;

const FAST: &[&str] =
    &["--initial-backoff", "50ms", "--max-backoff", "300ms", "--max-jitter", "10ms", "--shutdown-timeout", "1s"];

/// Users written, each registered then given a new password.
const USERS: usize = 50;

fn password(user: usize, n: usize) -> String {
    format!("Pw{n}-secret-{user:03}-k9")
}

/// Every file under `dir` with its bytes, as `grep -r` reads them.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            let bytes = std::fs::read(&path).expect("read");
            out.push((path, bytes));
        }
    }
    out
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn users(addr: SocketAddr) -> demo_backend::UsersView {
    let text = reqwest::get(format!("http://{addr}/users")).await.expect("users").text().await.expect("text");
    serde_json::from_str(&text).expect("json")
}

/// Writes a key file of `keys` (hex lines), `0600`.
fn key_file(dir: &Path, name: &str, keys: &[&str]) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, keys.join("\n")).expect("write key file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path.to_str().expect("utf-8").to_owned()
}

/// Starts fanout on `data_dir` with `extra`, expecting it to refuse; returns its whole stderr.
fn refused_start(addrs: &[SocketAddr], data_dir: &str, extra: &[&str]) -> Vec<String> {
    let pool = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec!["--listen", "127.0.0.1:0", "--metrics-port", "0", "--log-format", "json"];
    args.extend_from_slice(extra);
    let mut p = procs::spawn("fanout", &procs::fanout_bin(), &args, &[("BACKEND_POOL", &pool), ("DATA_DIR", data_dir)]);
    let status = p.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "refused: {status:?}");
    p.all_lines(Duration::from_secs(5))
}

/// Users with known passwords are written through a real fanout with a key file while server3 is down, so
/// their writes wait in the write log. No password and no user name is in any file of the data directory, every
/// file is `0600` and every directory `0700`. A start without the key file, or with another key, is refused
/// with one line naming the flag; the start with the key delivers to server3 every write that was pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_writes_are_encrypted_and_delivered_after_a_restart_with_the_key() {
    let backends = [
        procs::demo_backend("server1", false),
        procs::demo_backend("server2", false),
        procs::demo_backend("server3", false),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|(_, a)| *a).collect();
    let mut backends = backends;
    let scratch = common::temp_dir("secrets");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let data_dir = scratch.join("data");
    let data = data_dir.to_str().expect("utf-8").to_owned();
    let keys = key_file(&scratch, "keys", &["6b".repeat(32).as_str()]);
    let other = key_file(&scratch, "other-keys", &["17".repeat(32).as_str()]);
    let mut with_key = FAST.to_vec();
    with_key.extend_from_slice(&["--encryption-key-file", &keys]);

    let (mut first, api, _) = procs::fanout_with_outbox(&addrs, &with_key, &data);
    backends[2].0.kill();
    // Each user has passwords of its own: one call of the helper per user, all at once.
    let writes = (0..USERS).map(|u| async move {
        let pw: Vec<String> = (0..2).map(|n| password(u, n)).collect();
        let pw: Vec<&str> = pw.iter().map(String::as_str).collect();
        common::write_users(api, std::iter::once(format!("user-{u:03}-x7")), &pw, 1).await
    });
    let accepted: usize = futures_util::future::join_all(writes).await.into_iter().sum();
    assert_eq!(accepted, 2 * USERS, "every write answered 201 by the live backends");
    let status = first.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");

    let files = files_under(&data_dir);
    assert!(files.iter().any(|(p, _)| p.extension().is_some_and(|e| e == "seg")), "the write log is on disk");
    for (path, bytes) in &files {
        for u in 0..USERS {
            for n in 0..2 {
                assert!(!holds(bytes, password(u, n).as_bytes()), "{} holds a password", path.display());
            }
            assert!(!holds(bytes, format!("user-{u:03}-x7").as_bytes()), "{} holds a user name", path.display());
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    for dir in [&data_dir, &data_dir.join("log")] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir).expect("metadata").permissions().mode() & 0o777, 0o700);
    }

    for (extra, needle) in [
        (FAST.to_vec(), "no key file is given"),
        ([FAST, &["--encryption-key-file", other.as_str()]].concat(), "does not hold"),
    ] {
        let lines = refused_start(&addrs, &data, &extra);
        assert_eq!(lines.len(), 1, "one line: {lines:?}");
        assert!(lines[0].starts_with("fanout: "), "{lines:?}");
        assert!(lines[0].contains("--encryption-key-file (ENCRYPTION_KEY_FILE)"), "{lines:?}");
        assert!(lines[0].contains(needle), "{lines:?}");
    }

    backends[2] = procs::demo_backend_on("server3", false, addrs[2].port());
    let (_second, _, _) = procs::fanout_with_outbox(&addrs, &with_key, &data);
    common::eventually(Duration::from_secs(60), "server3 got every pending write", || async {
        users(addrs[2]).await.users.iter().filter(|u| u.version == 2).count() == USERS
    })
    .await;
    let (one, three) = (users(addrs[0]).await.users, users(addrs[2]).await.users);
    assert_eq!(one, three, "server3 holds the same users and passwords as server1");
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A key file that is missing, empty or holds a line that is not a 32-byte key stops fanout before it binds,
/// with exit code 2 and one line naming the flag (and never the key).
#[test]
fn a_bad_key_file_stops_fanout_at_start_with_one_line() {
    let scratch = common::temp_dir("bad-keys");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let short = key_file(&scratch, "short", &["ab".repeat(16).as_str()]);
    let empty = key_file(&scratch, "empty", &["# nothing yet"]);
    let missing = scratch.join("missing").to_str().expect("utf-8").to_owned();
    for (file, needle) in
        [(&missing, "cannot read it"), (&empty, "holds no key"), (&short, "line 1: a key must be 32 bytes")]
    {
        let out = std::process::Command::new(procs::fanout_bin())
            .env_clear()
            .args(["--listen", "127.0.0.1:0", "--metrics-port", "0", "--backends", "a:1", "--data-dir"])
            .arg(scratch.join("data"))
            .env("ENCRYPTION_KEY_FILE", file)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with(&format!("fanout: --encryption-key-file (ENCRYPTION_KEY_FILE) {file}")), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert!(!stderr.contains(&"ab".repeat(16)), "never the key: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
    assert!(!scratch.join("data").exists(), "nothing stored");
    let _ = std::fs::remove_dir_all(&scratch);
}
