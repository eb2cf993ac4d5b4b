//! The `fanout` binary's start-up contract: invalid configuration stops it with exit code 2 and one line naming
//! the flag (and its environment variable), before any port is bound (docs/design.md section 2).

mod common;

use std::process::{Command, Output};

use common::procs::fanout_bin;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(fanout_bin());
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run fanout")
}

#[test]
fn bad_configuration_exits_2_with_one_line_naming_the_flag_before_binding() {
    // The listen port is taken: a bind error would say so; the config error must come first.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&[], &[], "--backends (BACKEND_POOL) is required"),
        (&[], &[("BACKEND_POOL", "server1")], "expected host:port"),
        (&["--backends", "a:1"], &[("MAX_ATTEMPTS", "0")], "--max-attempts (MAX_ATTEMPTS) must be at least 1"),
        (&["--backends", "a:1"], &[("MAX_BACKOFF", "soon")], "--max-backoff"),
        (&["--backends", "a:1", "--initial-backoff", "2m"], &[], "--initial-backoff (INITIAL_BACKOFF) must not exceed"),
        (&["--backends", "a:1", "--ack", "most"], &[], "--ack"),
        (&["--backends", "a:1"], &[("ACK_POLICY", "sometimes")], "--ack"),
        (&["--backends", "a:1", "--max-body", "lots"], &[], "--max-body"),
        (&["--backends", "a:1", "--no-such-flag"], &[], "--no-such-flag"),
        (
            &["--backends", "a:1"],
            &[("MAX_ATTEMPTS", "3")],
            "--max-attempts (MAX_ATTEMPTS) must be at least --breaker-failures (BREAKER_FAILURES)",
        ),
        (&["--backends", "a:1"], &[("PROBE_INTERVAL_MAX", "0s")], "--probe-interval-max (PROBE_INTERVAL_MAX)"),
        (&["--backends", "a:1"], &[("BREAKER_FAILURE_RATE", "2")], "--breaker-failure-rate (BREAKER_FAILURE_RATE)"),
        (
            &["--backends", "a:1"],
            &[("STORE", "http://n1:4222")],
            "--store (STORE): \"http://n1:4222\" is not a nats://",
        ),
        (
            &["--backends", "a:1", "--store", "nats://n1"],
            &[],
            "--store (STORE): \"nats://n1\" must be nats://host:port",
        ),
        (&["--backends", "a:1"], &[("STORE", "nats://u:p@n1:4222")], "must be nats://host:port, without user"),
        (&["--backends", "a:1"], &[("PARTITIONS", "0")], "--partitions (PARTITIONS) must be between 1 and 1024"),
        (&["--backends", "a:1"], &[("STORE_REPLICAS", "7")], "--store-replicas (STORE_REPLICAS)"),
        (&["--backends", "a:1"], &[("INSTANCE", "a.b")], "--instance (INSTANCE)"),
    ];
    for (args, env, needle) in cases {
        let mut all = vec!["--listen", listen.as_str(), "--metrics-port", "0"];
        all.extend_from_slice(args);
        let out = run(&all, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("fanout: "), "{stderr}");
    }
}

#[test]
fn a_taken_port_is_reported_with_its_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let out = run(&["--listen", &listen, "--metrics-port", "0", "--backends", "a:1"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--listen (LISTEN_ADDR)"), "{stderr}");
}

#[test]
fn help_lists_every_environment_variable() {
    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "LISTEN_ADDR",
        "METRICS_PORT",
        "BACKEND_POOL",
        "MAX_ATTEMPTS",
        "INITIAL_BACKOFF",
        "MAX_BACKOFF",
        "MAX_JITTER",
        "ATTEMPT_TIMEOUT",
        "ACK_POLICY",
        "ACK_TIMEOUT",
        "MAX_BODY",
        "MAX_IN_FLIGHT",
        "BREAKER_FAILURES",
        "BREAKER_FAILURE_RATE",
        "BREAKER_WINDOW",
        "BREAKER_MIN_REQUESTS",
        "PROBE_INTERVAL_MAX",
    ] {
        assert!(help.contains(&format!("[env: {env}")), "{env} missing from --help");
    }
}
