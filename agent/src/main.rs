//! `wiremesh-agent`: the node agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use wiremesh_agent::standalone::{self, UpOptions};

/// The Wiremesh node agent: userspace WireGuard tunnels to every node of the mesh.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "WIREMESH_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Bring up an interface from a wg-quick style config file and run in the foreground
    /// until SIGINT or SIGTERM, which remove its routes and device.
    Up {
        /// The config file (`[Interface]`, `[Peer]`); the interface is named after it.
        #[arg(long, short, env = "WIREMESH_CONFIG")]
        config: Option<PathBuf>,
        /// The interface name (default: the config file's name). Without a config file,
        /// an empty interface that `wg setconf` can configure.
        #[arg(long, short, env = "WIREMESH_INTERFACE")]
        interface: Option<String>,
        /// Private key file, used when the config has no PrivateKey; generated (mode
        /// 0600) if missing.
        #[arg(long, env = "WIREMESH_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// Directory of the UAPI socket that `wg` uses.
        #[arg(long, env = "WIREMESH_UAPI_DIR", default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
        /// Serve Prometheus metrics and health checks on this address (e.g. 0.0.0.0:9586).
        #[arg(long, env = "WIREMESH_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    wiremesh_agent::init_tracing(matches!(cli.log_format, LogFormat::Json));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up {
                config,
                interface,
                key_file,
                uapi_dir,
                metrics_addr,
            } => {
                standalone::up(UpOptions {
                    config,
                    interface,
                    key_file,
                    uapi_dir,
                    metrics_addr,
                })
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
