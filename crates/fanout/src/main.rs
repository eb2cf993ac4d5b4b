//! The `fanout` binary: parses the configuration, sets up logging, binds the listeners and calls
//! [`fanout::run`] until SIGTERM or Ctrl-C. Invalid configuration exits with code 2 and one line naming the
//! flag, before any port is bound.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use fanout::{Config, LogFormat};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(err) if !err.use_stderr() => err.exit(), // --help, --version
        Err(err) => {
            let text = err.to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
            eprintln!("fanout: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if let Err(err) = config.validate() {
        eprintln!("fanout: {err}");
        return ExitCode::from(2);
    }
    init_tracing(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("fanout: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let api = match TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!("fanout: --listen (LISTEN_ADDR) {}: {err}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let metrics = match TcpListener::bind(config.metrics_addr()).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!("fanout: --metrics-port (METRICS_PORT) {}: {err}", config.metrics_addr());
                return ExitCode::FAILURE;
            }
        };
        match fanout::run(config, api, metrics, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("fanout: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_tracing(format: LogFormat) {
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

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
