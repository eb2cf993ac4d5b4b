//! The edge shared by the `fanout` and `demo-backend` binaries, so that both behave alike for an operator:
//! the same log formats and filter (`--log-format`, `RUST_LOG`), the same stop signals (SIGTERM, Ctrl-C), and
//! the same one-line answer to an invalid flag (exit code 2).
//!
//! # Layout
//! - [`LogFormat`] and [`init_tracing`]: logs to stderr, text (colours only on a terminal) or JSON lines.
//! - [`shutdown_signal`]: resolves on SIGTERM or Ctrl-C.
//! - [`parse_or_exit`]: clap parsing whose errors are one line.

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

/// Installs the global subscriber: stderr, `RUST_LOG` filter (default `info`), in `format`.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what `docker stop` and Kubernetes send).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
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
