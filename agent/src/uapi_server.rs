//! The UAPI socket (`/var/run/wireguard/<iface>.sock`) that `wg` talks to.
//!
//! Each connection carries one or more requests, each ended by a blank line
//! (<https://www.wireguard.com/xplatform/>). A request that does not parse gets an
//! `errno=` reply and reaches nothing; a line or request over the limits gets an `errno=`
//! reply and the connection is closed, so no client grows our memory past them.
//!
//! The socket answers `get=1` with the private key: it is bound inside a fresh 0700
//! directory, made 0600 there and only then renamed into place, so it never exists at its
//! public path with the mode the umask gave it.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use wiremesh_proto::uapi::{Request, parse_request};

use crate::control::Command;

/// Largest request we read. `wg setconf` with 10,000 peers is about 2 MiB.
const MAX_REQUEST: usize = 64 << 20;
/// Longest line we read. The longest valid line is under 100 bytes (`allowed_ip=` with an
/// IPv6 CIDR, `public_key=` with 64 hex digits); the rest is room.
const MAX_LINE: usize = 4096;
/// EINVAL, for requests that are not text.
const EINVAL: i32 = 22;
/// ENOMEM, for a line over [`MAX_LINE`] or a request over [`MAX_REQUEST`].
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
    let listener = bind_private(path)?;
    let task = tokio::spawn(accept_loop(listener, commands));
    Ok(Server {
        task,
        path: path.to_owned(),
    })
}

/// Binds a listening socket at `path` that is 0600 from the moment it has that name: bound
/// in a new 0700 directory beside `path` (the umask can only take bits away from 0700),
/// made 0600, then renamed to `path`.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt as _;

    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let private = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // A leftover of a process with our pid that died here.
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inner = private.join("sock");
    let bound: io::Result<UnixListener> = (|| {
        let listener = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
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
        let mut close = false;
        let reply = match read_request(&mut read).await {
            Ok(Incoming::Request(text)) => match parse_request(&text) {
                Ok(request) => match forward(&commands, request).await {
                    Some(reply) => reply,
                    None => return,
                },
                Err(e) => {
                    debug!(error = %e, "malformed UAPI request");
                    format!("errno={}\n\n", e.errno())
                }
            },
            Ok(Incoming::NotText) => format!("errno={EINVAL}\n\n"),
            Ok(Incoming::TooLong) => {
                debug!(
                    max_line = MAX_LINE,
                    max_request = MAX_REQUEST,
                    "UAPI request over the limits; closing"
                );
                close = true;
                format!("errno={ENOMEM}\n\n")
            }
            Ok(Incoming::End) => return,
            Err(e) => {
                debug!(error = %e, "reading the UAPI socket");
                return;
            }
        };
        if write.write_all(reply.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

/// What [`read_request`] read.
#[derive(Debug, PartialEq, Eq)]
enum Incoming {
    /// A whole request, up to its blank line.
    Request(String),
    /// A whole request that is not UTF-8.
    NotText,
    /// A line over [`MAX_LINE`] or a request over [`MAX_REQUEST`]: the rest is not read.
    TooLong,
    /// A clean end of stream.
    End,
}

/// One request up to its blank line, reading at most [`MAX_LINE`] bytes of a line and
/// [`MAX_REQUEST`] bytes of a request.
async fn read_request(read: &mut (impl AsyncBufRead + Unpin)) -> io::Result<Incoming> {
    let mut text = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut *read)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(Incoming::End);
        }
        if line.len() > MAX_LINE || text.len() + line.len() > MAX_REQUEST {
            return Ok(Incoming::TooLong);
        }
        if line == b"\n" {
            break;
        }
        text.extend_from_slice(&line);
    }
    Ok(String::from_utf8(text).map_or(Incoming::NotText, Incoming::Request))
}

async fn forward(commands: &mpsc::Sender<Command>, request: Request) -> Option<String> {
    let (tx, rx) = oneshot::channel();
    commands.send(Command::Uapi(request, tx)).await.ok()?;
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use std::os::unix::fs::PermissionsExt as _;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn the_socket_never_exists_at_its_path_with_another_mode_than_0600() {
        let dir = scratch_dir("mode");
        let path = dir.join("wg-test.sock");
        let done = Arc::new(AtomicBool::new(false));
        // Watches the public path as fast as it can while the socket is made again and
        // again: the old bind-then-chmod showed the umask's mode (0755) for a moment.
        let watcher = std::thread::spawn({
            let (path, done) = (path.clone(), done.clone());
            move || {
                let mut seen = std::collections::BTreeSet::new();
                while !done.load(Ordering::Relaxed) {
                    if let Ok(meta) = std::fs::symlink_metadata(&path)
                        && meta.file_type().is_socket()
                    {
                        seen.insert(meta.permissions().mode() & 0o7777);
                    }
                }
                seen
            }
        });
        let (tx, _rx) = mpsc::channel(1);
        for _ in 0..300 {
            let server = serve(&path, tx.clone()).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o600);
            server.stop();
        }
        done.store(true, Ordering::Relaxed);
        let seen = watcher.join().unwrap();
        let modes: Vec<String> = seen.iter().map(|m| format!("{m:o}")).collect();
        assert!(seen.iter().all(|m| *m == 0o600), "modes seen: {modes:?}");
        // Nothing left beside it: the private directory is gone.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_endless_line_gets_an_errno_and_the_connection_closed() {
        let dir = scratch_dir("line");
        let path = dir.join("wg-test.sock");
        let (tx, _rx) = mpsc::channel(1);
        let server = serve(&path, tx).unwrap();
        let stream = UnixStream::connect(&path).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        // Up to 256 MiB without a newline, stopping when the server hangs up.
        let writer = tokio::spawn(async move {
            let chunk = vec![b'a'; 64 << 10];
            let mut sent = 0usize;
            while sent < 256 << 20 {
                if write.write_all(&chunk).await.is_err() {
                    return sent;
                }
                sent += chunk.len();
            }
            sent
        });
        // The reply, then the end of the stream: EOF, or a reset because the server closed
        // with our unread bytes still queued.
        let read_all = async {
            let mut reply = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) => return reply,
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return reply,
                    Err(e) => panic!("reading the reply: {e}"),
                }
            }
        };
        let reply = tokio::time::timeout(Duration::from_secs(10), read_all)
            .await
            .expect("the server answers and closes within 10 s");
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("errno={ENOMEM}\n\n")
        );
        let sent = writer.await.unwrap();
        assert!(
            sent < 256 << 20,
            "the server stopped reading ({sent} bytes sent)"
        );
        server.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn requests_within_the_limits_still_parse_and_bad_text_keeps_the_connection() {
        let mut read = BufReader::new(&b"get=1\n\n"[..]);
        assert_eq!(
            read_request(&mut read).await.unwrap(),
            Incoming::Request("get=1\n".into())
        );
        let mut bad = BufReader::new(&b"set=1\n\xff\n\n"[..]);
        assert_eq!(read_request(&mut bad).await.unwrap(), Incoming::NotText);
        assert_eq!(read_request(&mut bad).await.unwrap(), Incoming::End);
        let long = format!("set=1\n{}\n\n", "a".repeat(MAX_LINE));
        let mut long = BufReader::new(long.as_bytes());
        assert_eq!(read_request(&mut long).await.unwrap(), Incoming::TooLong);
    }

    /// A fresh directory under the system's temporary directory.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wiremesh-uapi-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
