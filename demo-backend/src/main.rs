//! The `demo-backend` binary: parses [`demo_backend::Settings`], sets up logging, binds
//! `SERVER_HOST:SERVER_PORT` and serves until SIGTERM or Ctrl-C. Invalid settings exit with code 2 and one line
//! naming the flag.

use std::net::SocketAddr;
use std::process::ExitCode;

use demo_backend::{DemoBackend, Settings};

fn main() -> ExitCode {
    let settings: Settings = service_kit::parse_or_exit("demo-backend");
    service_kit::init_tracing(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("demo-backend: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = service_kit::shutdown_signal("demo-backend");
        let addr = SocketAddr::new(settings.host, settings.port);
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!("demo-backend: --port (SERVER_PORT) {addr}: {err}");
                return ExitCode::FAILURE;
            }
        };
        match demo_backend::run(DemoBackend::new(settings), listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("demo-backend: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
