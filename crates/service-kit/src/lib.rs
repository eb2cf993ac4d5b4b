//! The edge shared by the `fanout` and `demo-backend` binaries, so that both behave alike for an operator:
//! the same log formats and filter (`--log-format`, `RUST_LOG`), the same stop signals (SIGTERM, Ctrl-C), and
//! the same one-line answer to an invalid flag (exit code 2).
//!
//! # Layout
//! - [`LogFormat`] and [`init_tracing`]: logs to stderr, text (colours only on a terminal) or JSON lines.
//! - [`shutdown_signal`]: resolves on SIGTERM or Ctrl-C; a second one exits at once.
//! - [`parse_or_exit`]: clap parsing whose errors are one line.

use std::future::Future;
use std::io::IsTerminal;

use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber: stderr, `RUST_LOG` filter (default `info`, with the NATS client's own
/// connection chatter at `warn`: fanout logs what matters of it in its own words), in `format`.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A future that resolves on the first Ctrl-C (SIGINT) or SIGTERM (what `docker stop` and Kubernetes send).
/// The handlers are installed when this is called (call it first thing inside the runtime, so that no early
/// signal kills the process unannounced). A second signal after the first exits the process at once with code
/// 130: the operator's way out of a drain they do not want to wait for.
pub fn shutdown_signal(program: &'static str) -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async move {
        either(&mut term, &mut int).await;
        tokio::spawn(async move {
            either(&mut term, &mut int).await;
            eprintln!("{program}: second stop signal: exiting now");
            std::process::exit(130);
        });
    }
}

/// Resolves when either stream delivers a signal (never, for a stream that could not be installed).
async fn either(a: &mut Option<tokio::signal::unix::Signal>, b: &mut Option<tokio::signal::unix::Signal>) {
    async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        () = one(a) => {},
        () = one(b) => {},
    }
}

/// Parses the command line and environment into `C`. `--help` and `--version` print and exit 0; any error prints
/// one line, `PROGRAM: message` (clap's message names the flag), and exits with code 2.
pub fn parse_or_exit<C: Parser>(program: &str) -> C {
    match C::try_parse() {
        Ok(config) => config,
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            let text = err.to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
            eprintln!("{program}: {}", line.trim_start_matches("error: "));
            std::process::exit(2);
        }
    }
}
