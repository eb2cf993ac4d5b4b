//! The `demo-backend` binary: parses [`demo_backend::Settings`], sets up logging, binds
//! `SERVER_HOST:SERVER_PORT` (and `CONTROL_HOST:CONTROL_PORT` when a control port is set) and serves until
//! SIGTERM or Ctrl-C. Invalid settings exit with code 2 and one line naming the flag.

use std::net::SocketAddr;
use std::process::ExitCode;

use demo_backend::{DemoBackend, Settings};
use tokio::sync::watch;

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
        let addr = SocketAddr::new(settings.host, settings.port);
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!("demo-backend: --port (SERVER_PORT) {addr}: {err}");
                return ExitCode::FAILURE;
            }
        };
        let control = match settings.control_port {
            None => None,
            Some(port) => {
                let addr = SocketAddr::new(settings.control_host, port);
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => Some(l),
                    Err(err) => {
                        eprintln!("demo-backend: --control-port (CONTROL_PORT) {addr}: {err}");
                        return ExitCode::FAILURE;
                    }
                }
            }
        };
        // One signal stops both listeners.
        let (stop, stopped) = watch::channel(false);
        let shutdown = service_kit::shutdown_signal("demo-backend");
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let backend = DemoBackend::new(settings);
        if let Some(listener) = control {
            let (b, rx) = (backend.clone(), stopped.clone());
            tokio::spawn(async move {
                if let Err(err) = demo_backend::run_control(b, listener, until_stopped(rx)).await {
                    eprintln!("demo-backend: control listener: {err}");
                }
            });
        }
        match demo_backend::run(backend, listener, until_stopped(stopped)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("demo-backend: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
