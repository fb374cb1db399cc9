//! `wiremesh-controller`: mirrors remote clusters' nodes into local `MeshPeer`s.

use clap::Parser;

/// The Wiremesh controller (not implemented yet).
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _cli = Cli::parse();
    eprintln!(
        "error: {}",
        wiremesh_controller::Error::NotYet("wiremesh-controller")
    );
    std::process::ExitCode::from(2)
}
