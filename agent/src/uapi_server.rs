//! The UAPI socket (`/var/run/wireguard/<iface>.sock`) that `wg` talks to.
//!
//! Each connection carries one or more requests, each ended by a blank line
//! (<https://www.wireguard.com/xplatform/>). A request that does not parse gets an
//! `errno=` reply and reaches nothing.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use wiremesh_proto::uapi::{Request, parse_request};

use crate::control::Command;

/// Largest request we read. `wg setconf` with 10,000 peers is about 2 MiB.
const MAX_REQUEST: usize = 64 << 20;
/// EINVAL, for requests that are not text.
const EINVAL: i32 = 22;
/// ENOMEM, for requests over [`MAX_REQUEST`].
const ENOMEM: i32 = 12;

/// A running UAPI server; [`stop`](Self::stop) removes the socket.
#[derive(Debug)]
pub struct Server {
    task: JoinHandle<()>,
    path: PathBuf,
}

impl Server {
    /// Stops accepting and removes the socket file.
    pub fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` and forwards parsed requests to the device task.
///
/// # Errors
/// When the directory cannot be made, another live process serves the path, or the
/// socket cannot be bound.
pub fn serve(path: &Path, commands: mpsc::Sender<Command>) -> io::Result<Server> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let task = tokio::spawn(accept_loop(listener, commands));
    Ok(Server {
        task,
        path: path.to_owned(),
    })
}

async fn accept_loop(listener: UnixListener, commands: mpsc::Sender<Command>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, commands.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accepting on the UAPI socket");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(stream: UnixStream, commands: mpsc::Sender<Command>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let reply = match read_request(&mut read).await {
            Ok(Some(Ok(text))) => match parse_request(&text) {
                Ok(request) => match forward(&commands, request).await {
                    Some(reply) => reply,
                    None => return,
                },
                Err(e) => {
                    debug!(error = %e, "malformed UAPI request");
                    format!("errno={}\n\n", e.errno())
                }
            },
            Ok(Some(Err(errno))) => format!("errno={errno}\n\n"),
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "reading the UAPI socket");
                return;
            }
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One request up to its blank line. `Ok(None)` at a clean end of stream; `Some(Err)`
/// with an errno for a request that is not UTF-8 or too long (the rest of it is read
/// and discarded).
async fn read_request(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> io::Result<Option<Result<String, i32>>> {
    let mut text = Vec::new();
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        line.clear();
        let n = read.read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Ok(None);
        }
        if line == b"\n" {
            break;
        }
        if text.len() + line.len() > MAX_REQUEST {
            too_long = true;
            text.clear();
        }
        if !too_long {
            text.extend_from_slice(&line);
        }
    }
    if too_long {
        return Ok(Some(Err(ENOMEM)));
    }
    Ok(Some(String::from_utf8(text).map_err(|_| EINVAL)))
}

async fn forward(commands: &mpsc::Sender<Command>, request: Request) -> Option<String> {
    let (tx, rx) = oneshot::channel();
    commands.send(Command::Uapi(request, tx)).await.ok()?;
    rx.await.ok()
}
