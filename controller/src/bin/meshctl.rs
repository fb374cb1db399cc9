//! `meshctl`: links clusters and shows the mesh. The work is in
//! `wiremesh_controller::meshctl`; this parses the command line, sets up logging (stderr,
//! `RUST_LOG`, default `warn`), runs it, and turns an error into its message and exit code.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;
use wiremesh_controller::meshctl::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // kube's client logs each failed request as an ERROR; meshctl reports them itself.
            EnvFilter::new("warn,kube_client::client::builder=off")
        }))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(meshctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(meshctl::exit_code(&e))
        }
    }
}
