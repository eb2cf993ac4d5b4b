//! The `fanout` binary: parses the configuration, sets up logging, binds the listeners and calls
//! [`fanout::run`] until SIGTERM or Ctrl-C. Invalid configuration exits with code 2 and one line naming the
//! flag, before any port is bound.

use std::process::ExitCode;

use fanout::Config;
use tokio::net::TcpListener;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config: Config = service_kit::parse_or_exit("fanout");
    if let Err(err) = config.validate() {
        eprintln!("fanout: {err}");
        return ExitCode::from(2);
    }
    service_kit::init_tracing(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("fanout: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = service_kit::shutdown_signal("fanout");
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
        match fanout::run(config, api, metrics, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("fanout: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
