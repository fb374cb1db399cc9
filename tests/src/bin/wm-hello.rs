//! `wm-hello`: the lab's tiny service. `serve` answers every TCP connection with an HTTP/1.0
//! response whose body is its name (which pod answered); `get` is a paced client that
//! prints one line per request: `<start ms> <end ms> ok <name>` or
//! `<start ms> <end ms> fail <reason>`, times in milliseconds since the Unix epoch.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// A named TCP service and its client.
#[derive(Parser)]
#[command(name = "wm-hello")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answers every connection with its name, until killed.
    Serve {
        /// Addresses and ports to listen on.
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// The name each answer carries.
        #[arg(long)]
        name: String,
    },
    /// Sends `count` requests, one every `interval_ms` (each on its own thread, so a slow
    /// one does not delay the next), and prints a line per request as it ends.
    Get {
        /// Address and port of the service.
        #[arg(long)]
        to: SocketAddr,
        /// How many requests.
        #[arg(long)]
        count: u32,
        /// Milliseconds between request starts.
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Milliseconds one request may take, connection included.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wm-hello: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { listen, name } => serve(&listen, &name),
        Command::Get {
            to,
            count,
            interval_ms,
            timeout_ms,
        } => get(
            to,
            count,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
    }
}

fn serve(listen: &[SocketAddr], name: &str) -> Result<()> {
    let mut handles = Vec::new();
    for addr in listen {
        let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        let name = name.to_owned();
        handles.push(thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || answer(stream, &name));
            }
        }));
    }
    for handle in handles {
        let _ = handle.join();
    }
    Ok(())
}

/// Reads the request head (bounded) and answers with `name`.
fn answer(mut stream: TcpStream, name: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
    }
    let body = format!("{name}\n");
    let _ = write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

fn get(to: SocketAddr, count: u32, interval: Duration, timeout: Duration) -> Result<()> {
    let (tx, rx) = mpsc::channel::<String>();
    let printer = thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in rx {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    let start = Instant::now();
    let mut workers = Vec::new();
    for i in 0..count {
        let due = start + interval * i;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let tx = tx.clone();
        workers.push(thread::spawn(move || {
            let began = unix_ms();
            let line = match request(to, timeout) {
                Ok(name) => format!("{began} {} ok {name}", unix_ms()),
                Err(e) => format!(
                    "{began} {} fail {}",
                    unix_ms(),
                    format!("{e:#}").replace('\n', " ")
                ),
            };
            let _ = tx.send(line);
        }));
    }
    drop(tx);
    for worker in workers {
        let _ = worker.join();
    }
    let _ = printer.join();
    Ok(())
}

fn request(to: SocketAddr, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&to, timeout).context("connect")?;
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .context("timed out")?;
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: hello\r\n\r\n")?;
    let mut response = String::new();
    stream
        .take(16 * 1024)
        .read_to_string(&mut response)
        .context("read")?;
    let Some((_, body)) = response.split_once("\r\n\r\n") else {
        bail!("no HTTP response: {response:?}");
    };
    let name = body.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        bail!("bad body {body:?}");
    }
    Ok(name.to_owned())
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
