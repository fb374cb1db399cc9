//! The checksummed TCP transfer behind `wm-xfer`: a sender of deterministic pseudo-random bytes
//! and a receiver, both reporting `<bytes> <sha256hex>`.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

/// Size of one read or write; large enough that syscalls do not dominate at tunnel speeds.
const CHUNK: usize = 256 * 1024;

/// Upper bound for one connect attempt, so a black-holed route still lets the loop retry.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);

/// Pause between connect attempts while the receiver is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// What one side of a transfer saw: how many bytes and their SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Number of bytes sent or received.
    pub bytes: u64,
    /// Lowercase hex SHA-256 of those bytes.
    pub sha256: String,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.bytes, self.sha256)
    }
}

impl FromStr for Summary {
    type Err = anyhow::Error;

    /// Parses the `<bytes> <sha256hex>` line that `wm-xfer` prints.
    fn from_str(s: &str) -> Result<Self> {
        let mut fields = s.split_whitespace();
        let (Some(bytes), Some(sha256), None) = (fields.next(), fields.next(), fields.next())
        else {
            bail!("expected `<bytes> <sha256hex>`, got {s:?}");
        };
        let bytes = bytes
            .parse()
            .with_context(|| format!("byte count {bytes:?} in {s:?}"))?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{sha256:?} in {s:?} is not a SHA-256 in hex");
        }
        Ok(Self {
            bytes,
            sha256: sha256.to_ascii_lowercase(),
        })
    }
}

/// A fast deterministic byte generator (SplitMix64, Steele et al. 2014): the same seed gives
/// the same stream on both sides, with no randomness dependency.
#[derive(Debug, Clone)]
pub struct ByteStream {
    state: u64,
}

impl ByteStream {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        // Constants from the SplitMix64 reference implementation.
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next bytes of the stream. Every call starts on a fresh 8-byte
    /// word, so the stream depends on the chunk sizes; both sides of `wm-xfer` only compare
    /// hashes, and [`expected`] uses the sender's chunking.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            let last = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&last[..rest.len()]);
        }
    }
}

/// The summary `send(_, bytes, seed, _)` will report, computed without a network.
pub fn expected(bytes: u64, seed: u64) -> Summary {
    let mut stream = ByteStream::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = chunk_len(left);
        stream.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    summary(bytes, hasher)
}

/// Accepts one TCP connection on `listen`, reads it to EOF and returns what it got.
///
/// # Errors
/// When binding, accepting or reading fails, or `timeout` (for the whole run) passes first.
pub fn recv(listen: SocketAddr, timeout: Duration) -> Result<Summary> {
    let deadline = Instant::now() + timeout;
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    listener
        .set_nonblocking(true)
        .context("making the listener non-blocking")?;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _peer)) => break stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("no connection on {listen} within {timeout:?}");
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).with_context(|| format!("accepting on {listen}")),
        }
    };
    stream
        .set_nonblocking(false)
        .context("making the connection blocking")?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline, timeout)?))
            .context("setting the read timeout")?;
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading after {bytes} bytes"));
            }
        };
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(summary(bytes, hasher))
}

/// Echoes `count` UDP datagrams received on `listen` back to where each came from;
/// returns each one's source address.
///
/// # Errors
/// When binding, receiving or sending fails, or `timeout` (for the whole run) passes first.
pub fn udp_echo(listen: SocketAddr, count: usize, timeout: Duration) -> Result<Vec<SocketAddr>> {
    let deadline = Instant::now() + timeout;
    let socket = UdpSocket::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
    let mut sources = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while sources.len() < count {
        socket
            .set_read_timeout(Some(remaining(deadline, timeout)?))
            .context("setting the read timeout")?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("receiving on {listen} after {} datagrams", sources.len())
                });
            }
        };
        socket
            .send_to(&buf[..n], from)
            .with_context(|| format!("echoing to {from}"))?;
        sources.push(from);
    }
    Ok(sources)
}

/// Sends `count` UDP datagrams of `len` bytes to `to`, each until its echo comes back
/// (resent every 200 ms); returns the source address of each echo.
///
/// # Errors
/// When sending fails, an echo differs from what was sent, or `timeout` passes first.
pub fn udp_ping(
    to: SocketAddr,
    count: usize,
    len: usize,
    timeout: Duration,
) -> Result<Vec<SocketAddr>> {
    let deadline = Instant::now() + timeout;
    let any: SocketAddr = if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let socket = UdpSocket::bind(any).context("binding a UDP socket")?;
    let mut sources = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let mut generator = ByteStream::new(count as u64);
    let mut datagram = vec![0u8; len.max(8)];
    for i in 0..count {
        generator.fill(&mut datagram);
        datagram[..8].copy_from_slice(&(i as u64).to_be_bytes());
        'resend: loop {
            socket
                .send_to(&datagram, to)
                .with_context(|| format!("sending datagram {i} to {to}"))?;
            let wait = remaining(deadline, timeout)?.min(Duration::from_millis(200));
            socket
                .set_read_timeout(Some(wait))
                .context("setting the read timeout")?;
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) if buf[..n] == datagram[..] => {
                        sources.push(from);
                        break 'resend;
                    }
                    // An echo of an earlier resend.
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        continue 'resend;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).with_context(|| format!("receiving from {to}")),
                }
            }
        }
    }
    Ok(sources)
}

/// Connects to `to` (retrying while it refuses), sends `bytes` bytes of [`ByteStream`]`(seed)`,
/// closes its side and waits for the receiver to close.
///
/// # Errors
/// When connecting or writing fails, or `timeout` (for the whole run) passes first.
pub fn send(to: SocketAddr, bytes: u64, seed: u64, timeout: Duration) -> Result<Summary> {
    send_paced(to, bytes, seed, timeout, None)
}

/// As [`send`], at most `rate` bytes per second when given (a chunk at a time), so that one
/// connection can span an event that takes seconds (a rolling update).
///
/// # Errors
/// As [`send`].
pub fn send_paced(
    to: SocketAddr,
    bytes: u64,
    seed: u64,
    timeout: Duration,
    rate: Option<u64>,
) -> Result<Summary> {
    let deadline = Instant::now() + timeout;
    let start = Instant::now();
    let mut stream = connect(to, deadline, timeout)?;
    let mut generator = ByteStream::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = chunk_len(left);
        generator.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        stream
            .set_write_timeout(Some(remaining(deadline, timeout)?))
            .context("setting the write timeout")?;
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("writing to {to} after {} bytes", bytes - left))?;
        left -= n as u64;
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64((bytes - left) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                thread::sleep(wait);
            }
        }
    }
    stream
        .shutdown(Shutdown::Write)
        .context("closing the sending side")?;
    // The receiver closes only after reading our EOF: once we see its EOF, it has everything.
    stream
        .set_read_timeout(Some(remaining(deadline, timeout)?))
        .context("setting the read timeout")?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("waiting for the receiver to close")?;
    Ok(summary(bytes, hasher))
}

fn connect(to: SocketAddr, deadline: Instant, timeout: Duration) -> Result<TcpStream> {
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = remaining(deadline, timeout)
            .with_context(|| format!("connecting to {to} ({attempts} attempts)"))?
            .min(CONNECT_ATTEMPT);
        match TcpStream::connect_timeout(&to, attempt) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() + CONNECT_RETRY < deadline => {
                if e.kind() != ErrorKind::ConnectionRefused && e.kind() != ErrorKind::TimedOut {
                    return Err(e).with_context(|| format!("connecting to {to}"));
                }
                thread::sleep(CONNECT_RETRY);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("connecting to {to}, {attempts} attempts"));
            }
        }
    }
}

fn remaining(deadline: Instant, timeout: Duration) -> Result<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow!("timed out after {timeout:?}"))
}

fn chunk_len(left: u64) -> usize {
    usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK))
}

fn summary(bytes: u64, hasher: Sha256) -> Summary {
    Summary {
        bytes,
        sha256: format!("{:x}", hasher.finalize()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        assert_eq!(expected(100_000, 7), expected(100_000, 7));
        assert_ne!(expected(100_000, 7).sha256, expected(100_000, 8).sha256);
    }

    #[test]
    fn empty_transfer_hashes_the_empty_string() {
        assert_eq!(
            expected(0, 1).sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn summary_line_round_trips() {
        let s = expected(12_345, 3);
        assert_eq!(s.to_string().parse::<Summary>().unwrap(), s);
        assert!("12 abc".parse::<Summary>().is_err());
        assert!("x".parse::<Summary>().is_err());
    }

    #[test]
    fn loopback_transfer_matches_expected() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let receiver = thread::spawn(move || recv(addr, Duration::from_secs(20)));
        let sent = send(addr, 1_000_003, 42, Duration::from_secs(20)).unwrap();
        let received = receiver.join().unwrap().unwrap();
        assert_eq!(sent, received);
        assert_eq!(sent, expected(1_000_003, 42));
    }
}
