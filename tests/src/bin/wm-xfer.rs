//! `wm-xfer`: a checksummed TCP transfer for the lab. Both subcommands print
//! `<bytes> <sha256hex>` on stdout.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use wiremesh_lab::xfer;

/// Sends or receives a deterministic byte stream over TCP and reports its SHA-256.
#[derive(Parser)]
#[command(name = "wm-xfer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accepts one connection, reads it to EOF and prints `<bytes> <sha256hex>`.
    Recv {
        /// Address and port to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Seconds for the whole run, waiting for the connection included.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Sends pseudo-random bytes and prints `<bytes> <sha256hex>`.
    Send {
        /// Address and port of the receiver; refused connections are retried.
        #[arg(long)]
        to: SocketAddr,
        /// How many bytes to send.
        #[arg(long)]
        bytes: u64,
        /// Seed of the byte stream.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seconds for the whole run.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// At most this many bytes per second (0: as fast as it goes).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Echoes `count` UDP datagrams and prints the source address of each, one a line.
    UdpEcho {
        /// Address and port to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// How many datagrams.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Seconds for the whole run.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Sends `count` UDP datagrams, each until echoed, and prints the source address of
    /// each echo, one a line.
    UdpPing {
        /// Address and port of the echo.
        #[arg(long)]
        to: SocketAddr,
        /// How many datagrams.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Bytes per datagram.
        #[arg(long, default_value_t = 1000)]
        len: usize,
        /// Seconds for the whole run.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wm-xfer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let sources = match cli.command {
        Command::UdpEcho {
            listen,
            count,
            timeout,
        } => Some(xfer::udp_echo(listen, count, Duration::from_secs(timeout))?),
        Command::UdpPing {
            to,
            count,
            len,
            timeout,
        } => Some(xfer::udp_ping(
            to,
            count,
            len,
            Duration::from_secs(timeout),
        )?),
        _ => None,
    };
    if let Some(sources) = sources {
        let mut stdout = std::io::stdout().lock();
        for source in sources {
            writeln!(stdout, "{source}").context("writing a source")?;
        }
        return stdout.flush().context("flushing stdout");
    }
    let summary = match cli.command {
        Command::Recv { listen, timeout } => xfer::recv(listen, Duration::from_secs(timeout))?,
        Command::Send {
            to,
            bytes,
            seed,
            timeout,
            rate,
        } => xfer::send_paced(
            to,
            bytes,
            seed,
            Duration::from_secs(timeout),
            Some(rate).filter(|r| *r > 0),
        )?,
        Command::UdpEcho { .. } | Command::UdpPing { .. } => return Ok(()),
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{summary}").context("writing the summary")?;
    stdout.flush().context("flushing stdout")
}
