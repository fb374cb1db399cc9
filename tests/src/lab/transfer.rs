//! Traffic between lab namespaces: checksummed transfers and pings.

use std::net::{IpAddr, SocketAddr};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::process::describe;
use super::{Netns, path_str, xfer_binary};
use crate::xfer::Summary;

/// A mebibyte, the unit of the tests' transfer sizes.
pub const MIB: u64 = 1 << 20;

/// The lower bound assumed for transfer throughput when choosing a timeout: 1 MiB/s is slower
/// than any working tunnel, debug builds included.
const TRANSFER_FLOOR_BYTES_PER_SEC: u64 = MIB;

/// Fixed part of a transfer timeout: process start, handshake, connect retries.
const TRANSFER_BASE_TIMEOUT: Duration = Duration::from_secs(30);

/// The outcome of a [`transfer`]: both sides agreed on the byte count and SHA-256.
#[derive(Debug, Clone)]
pub struct TransferReport {
    /// Bytes received (equal to bytes sent).
    pub bytes: u64,
    /// Their SHA-256 in lowercase hex.
    pub sha256: String,
    /// Seed of the byte stream; [`crate::xfer::expected`] recomputes the hash offline.
    pub seed: u64,
    /// From starting the sender until the receiver had everything.
    pub elapsed: Duration,
}

impl TransferReport {
    /// Goodput in Mbit/s.
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// `<N> MiB in <ms> ms, <rate> Mbit/s (sha256 <hash>)`.
impl std::fmt::Display for TransferReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} MiB in {:.0} ms, {:.0} Mbit/s (sha256 {})",
            self.bytes / MIB,
            self.elapsed.as_secs_f64() * 1e3,
            self.mbit_per_s(),
            self.sha256
        )
    }
}

/// Sends `bytes` checksummed bytes over TCP from `from` to `to_ip`, received in the lab
/// namespace that holds `to_ip`; see [`transfer_between`].
///
/// # Errors
/// When no namespace, or more than one, of the lab holds `to_ip`, or as [`transfer_between`].
pub fn transfer(from: &Netns, to_ip: impl Into<IpAddr>, bytes: u64) -> Result<TransferReport> {
    let to_ip = to_ip.into();
    let to = from.lab.owner_of(to_ip)?;
    transfer_between(from, &to, to_ip, bytes)
}

/// Runs `wm-xfer recv` on `to_ip` in `to` and `wm-xfer send` in `from`, and checks both saw
/// the same byte count (`bytes`) and SHA-256. The timeout allows 30 s plus 1 MiB/s.
///
/// # Errors
/// When either side fails or times out, or they disagree; the error holds both sides' output.
pub fn transfer_between(
    from: &Netns,
    to: &Netns,
    to_ip: impl Into<IpAddr>,
    bytes: u64,
) -> Result<TransferReport> {
    let to_ip = to_ip.into();
    transfer_translated(from, to, to_ip, to_ip, bytes)
}

/// As [`transfer_between`], the receiver listening on `listen_ip` (its own address) and the
/// sender connecting to `to_ip` (what the receiver is known by where the sender is, such
/// as its mesh address when its cluster's pod CIDRs are translated).
///
/// # Errors
/// As [`transfer_between`].
pub fn transfer_translated(
    from: &Netns,
    to: &Netns,
    listen_ip: impl Into<IpAddr>,
    to_ip: impl Into<IpAddr>,
    bytes: u64,
) -> Result<TransferReport> {
    run_transfer(from, to, listen_ip.into(), to_ip.into(), bytes, None)
}

/// As [`transfer_between`], sending at most `rate` bytes per second: one TCP connection
/// that lasts `bytes / rate` seconds, to span an event such as a rolling update.
///
/// # Errors
/// As [`transfer_between`].
pub fn transfer_paced(
    from: &Netns,
    to: &Netns,
    to_ip: impl Into<IpAddr>,
    bytes: u64,
    rate: u64,
) -> Result<TransferReport> {
    let to_ip = to_ip.into();
    run_transfer(from, to, to_ip, to_ip, bytes, Some(rate.max(1)))
}

fn run_transfer(
    from: &Netns,
    to: &Netns,
    listen_ip: IpAddr,
    to_ip: IpAddr,
    bytes: u64,
    rate: Option<u64>,
) -> Result<TransferReport> {
    let xfer = xfer_binary()?;
    let xfer = path_str(&xfer)?;
    let n = from.lab.next_counter();
    // A fresh port per transfer, so a listener never meets the TIME_WAIT of the last one.
    let port = u16::try_from(40_000 + n % 20_000).unwrap_or(40_000);
    let seed = u64::from(n) + 1;
    let seed_s = seed.to_string();
    let listen = SocketAddr::new(listen_ip, port).to_string();
    let connect = SocketAddr::new(to_ip, port).to_string();
    let paced = rate.map_or(Duration::ZERO, |rate| Duration::from_secs(bytes / rate));
    let timeout =
        TRANSFER_BASE_TIMEOUT + paced + Duration::from_secs(bytes / TRANSFER_FLOOR_BYTES_PER_SEC);
    let secs = timeout.as_secs().to_string();
    let bytes_s = bytes.to_string();
    let rate_s = rate.unwrap_or(0).to_string();

    let receiver = to.spawn(&[xfer, "recv", "--listen", &listen, "--timeout", &secs])?;
    let start = Instant::now();
    let sent = from.exec_timeout(
        &[
            xfer,
            "send",
            "--to",
            &connect,
            "--bytes",
            &bytes_s,
            "--seed",
            &seed_s,
            "--timeout",
            &secs,
            "--rate",
            &rate_s,
        ],
        timeout + Duration::from_secs(5),
    );
    let sent = match sent {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            let received = receiver.stop()?;
            bail!(
                "transfer {} -> {listen} failed\nsender: {}\nreceiver: {}",
                from.name,
                describe(&output),
                describe(&received)
            );
        }
        Err(e) => {
            let received = receiver.stop()?;
            return Err(e.context(format!(
                "transfer {} -> {listen}; receiver: {}",
                from.name,
                describe(&received)
            )));
        }
    };
    let received = receiver
        .wait_with_timeout(Duration::from_secs(10))
        .with_context(|| {
            format!(
                "transfer {} -> {listen}: sender done ({}) but receiver not",
                from.name,
                describe(&sent)
            )
        })?;
    let elapsed = start.elapsed();
    let both = || {
        format!(
            "sender: {}\nreceiver: {}",
            describe(&sent),
            describe(&received)
        )
    };
    ensure!(
        received.status.success(),
        "transfer {} -> {listen}: receiver failed\n{}",
        from.name,
        both()
    );
    let parse = |output: &Output| -> Result<Summary> {
        String::from_utf8_lossy(&output.stdout).trim().parse()
    };
    let (sent_summary, received_summary) = match (parse(&sent), parse(&received)) {
        (Ok(s), Ok(r)) => (s, r),
        (s, r) => bail!(
            "transfer {} -> {listen}: unreadable summary ({:?}, {:?})\n{}",
            from.name,
            s.err(),
            r.err(),
            both()
        ),
    };
    ensure!(
        sent_summary == received_summary && received_summary.bytes == bytes,
        "transfer {} -> {listen}: sent {sent_summary}, received {received_summary} \
         (wanted {bytes} bytes)\n{}",
        from.name,
        both()
    );
    Ok(TransferReport {
        bytes,
        sha256: received_summary.sha256,
        seed,
        elapsed,
    })
}

/// Whether one ping from `from` to `to` (IPv4 or IPv6) is answered within a second.
///
/// # Errors
/// When ping could not be run.
pub fn reachable(from: &Netns, to: impl Into<IpAddr>) -> Result<bool> {
    let to = to.into().to_string();
    let out = from.exec(&["ping", "-n", "-c", "1", "-W", "1", &to])?;
    Ok(out.status.success())
}

/// Pings `to` (IPv4 or IPv6) from `from` until `count` replies came back (0.2 s apart),
/// within `count + 5` seconds.
///
/// # Errors
/// When fewer replies came back in time (with ping's output).
pub fn ping(from: &Netns, to: impl Into<IpAddr>, count: u32) -> Result<()> {
    let to = to.into();
    let count_s = count.to_string();
    let deadline = (count + 5).to_string();
    let target = to.to_string();
    let args = [
        "ping", "-n", "-c", &count_s, "-i", "0.2", "-w", &deadline, &target,
    ];
    let output = from.exec_timeout(&args, Duration::from_secs(u64::from(count) + 15))?;
    ensure!(
        output.status.success(),
        "ping {to} from {}: {}",
        from.name,
        describe(&output)
    );
    Ok(())
}

/// `ping -M do -s <payload> -c <count>` from `from` to `to` (0.2 s apart, 1 s wait each,
/// at most 15 s): the Don't-Fragment bit set (IPv4) and never fragmented locally. The
/// output is returned whatever the outcome: a failure is what MTU tests look for.
///
/// # Errors
/// When ping could not be run.
pub fn df_ping(from: &Netns, to: impl Into<IpAddr>, payload: u32, count: u32) -> Result<Output> {
    let payload = payload.to_string();
    let count = count.to_string();
    let to = to.into().to_string();
    from.exec_timeout(
        &[
            "ping", "-n", "-M", "do", "-s", &payload, "-c", &count, "-i", "0.2", "-W", "1", &to,
        ],
        Duration::from_secs(15),
    )
}

/// A command's stdout followed by its stderr, as text.
#[must_use]
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
