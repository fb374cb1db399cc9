//! `meshctl`: links clusters and shows the mesh.

use clap::{Parser, Subcommand};

/// Link Kubernetes clusters into one Wiremesh network.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Link the current cluster with the cluster of the given kubeconfig context.
    Join {
        /// The kubeconfig context of the other cluster.
        context: String,
    },
    /// Show this cluster, its peer clusters and their tunnels.
    Status,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let what = match cli.command {
        Command::Join { .. } => "meshctl join",
        Command::Status => "meshctl status",
    };
    eprintln!("error: {}", wiremesh_controller::Error::NotYet(what));
    std::process::ExitCode::from(2)
}
