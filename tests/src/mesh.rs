//! Wiremesh on top of the lab: keys, config files, agents, metrics, and entering a
//! namespace from a test thread.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};
use nix::sched::{CloneFlags, setns};
use rand_core::OsRng;

use crate::lab::Proc;
use crate::lab::{Host, Netns, Pod, Underlay};
use crate::metrics::Exposition;

/// The interface name the lab's agents use.
pub const IFACE: &str = "wm0";
/// The agents' UDP port.
pub const PORT: u16 = 51820;
/// Where each agent serves metrics, inside its host's namespace.
pub const METRICS: &str = "127.0.0.1:9586";
/// The MTU [`write_config`] configures: wg-quick's default for a 1500-byte underlay.
pub const LAB_MTU: u32 = 1420;

/// A WireGuard key pair in base64.
#[derive(Debug, Clone)]
pub struct Keypair {
    /// The private key (base64).
    pub private: String,
    /// The public key (base64).
    pub public: String,
}

impl Keypair {
    /// A fresh key pair from the OS RNG.
    pub fn generate() -> Self {
        let secret = StaticSecret::random_from_rng(OsRng);
        let public = PublicKey::from(&secret);
        Self {
            private: STANDARD.encode(secret.to_bytes()),
            public: STANDARD.encode(public.as_bytes()),
        }
    }

    /// The raw private key.
    ///
    /// # Panics
    /// Never for keys made by [`Keypair::generate`].
    pub fn secret(&self) -> StaticSecret {
        let bytes: [u8; 32] = STANDARD
            .decode(&self.private)
            .ok()
            .and_then(|b| b.try_into().ok())
            .expect("generate() makes 32-byte keys");
        StaticSecret::from(bytes)
    }

    /// The raw public key.
    ///
    /// # Panics
    /// Never for keys made by [`Keypair::generate`].
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(&self.secret())
    }
}

/// One `[Peer]` of a config file.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// Its public key (base64).
    pub public: String,
    /// `Endpoint`, if we know where it is.
    pub endpoint: Option<SocketAddr>,
    /// `AllowedIPs`.
    pub allowed_ips: Vec<String>,
}

/// A lab host running (or about to run) a Wiremesh agent, with one pod behind it.
pub struct Node {
    /// The host.
    pub host: Host,
    /// Its pod.
    pub pod: Pod,
    /// Its keys.
    pub keys: Keypair,
    /// The running agent, if started.
    pub agent: Option<Proc>,
}

impl Node {
    /// A host with one pod and fresh keys; no agent yet.
    ///
    /// # Errors
    /// When the lab cannot make the host or pod.
    pub fn new(lab: &crate::Lab, name: &str, index: u8) -> Result<Self> {
        let underlay_ip = std::net::Ipv4Addr::new(198, 18, 0, index);
        Self::on(lab, lab.default_underlay(), name, underlay_ip, index)
    }

    /// A host on `underlay` at `underlay_ip`, with pod CIDR `10.<index>.0.0/24`, one pod
    /// and fresh keys; no agent yet.
    ///
    /// # Errors
    /// When the lab cannot make the host or pod.
    pub fn on(
        lab: &crate::Lab,
        underlay: &Underlay,
        name: &str,
        underlay_ip: std::net::Ipv4Addr,
        index: u8,
    ) -> Result<Self> {
        let host = lab.add_host_on(underlay, name, underlay_ip, &format!("10.{index}.0.0/24"))?;
        Self::with_pod(host)
    }

    /// A node on `host`, with a fresh pod `<host>-p` and fresh keys; no agent yet.
    fn with_pod(host: Host) -> Result<Self> {
        let pod = host.add_pod(&format!("{}-p", host.name()))?;
        Ok(Self {
            host,
            pod,
            keys: Keypair::generate(),
            agent: None,
        })
    }

    /// A host on the IPv6-only `underlay` at `underlay_ip6`, with dual-stack pod CIDRs
    /// `10.<index>.0.0/24` and `fd10:<index>::/64`, one pod and fresh keys; no agent yet.
    ///
    /// # Errors
    /// When the lab cannot make the host or pod.
    pub fn on_v6(
        lab: &crate::Lab,
        underlay: &Underlay,
        name: &str,
        underlay_ip6: std::net::Ipv6Addr,
        index: u8,
    ) -> Result<Self> {
        let host = lab.add_host_v6(
            underlay,
            name,
            underlay_ip6,
            &format!("10.{index}.0.0/24"),
            &format!("fd10:{index:x}::/64"),
        )?;
        Self::with_pod(host)
    }

    /// The UDP endpoint of this node on the underlay (IPv6 on an IPv6-only underlay).
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.host.underlay_addr(), PORT)
    }

    /// This node as a peer of another: its pod CIDRs (IPv4, and IPv6 if it has one) as
    /// allowed IPs.
    pub fn as_peer(&self, with_endpoint: bool) -> PeerSpec {
        let mut allowed_ips = vec![self.host.pod_cidr()];
        allowed_ips.extend(self.host.pod_cidr6());
        PeerSpec {
            public: self.keys.public.clone(),
            endpoint: with_endpoint.then(|| self.endpoint()),
            allowed_ips,
        }
    }

    /// Writes `<host dir>/wm0.conf` with these peers and starts the agent on it.
    ///
    /// # Errors
    /// When the agent does not come up (with its output).
    pub fn start(&mut self, peers: &[PeerSpec]) -> Result<()> {
        self.start_with_mtu(peers, Some(LAB_MTU))
    }

    /// As [`Node::start`], with `MTU = mtu` in the config, or no `MTU` line at all when
    /// `None` (the agent derives it from the underlay).
    ///
    /// # Errors
    /// When the agent does not come up (with its output).
    pub fn start_with_mtu(&mut self, peers: &[PeerSpec], mtu: Option<u32>) -> Result<()> {
        let config = write_config_with_mtu(&self.host, &self.keys, peers, mtu)?;
        let path = config.to_str().context("lab paths are UTF-8")?.to_owned();
        let agent = start_agent(
            &self.host,
            &["up", "--config", &path, "--metrics-addr", METRICS],
        )?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Runs `command` (a `wireguard-go` binary and its arguments; `-f wm0` at the end)
    /// with `env` as this node's WireGuard instead of the agent, configured with `wg` for
    /// `peer` (its pod CIDR as allowed IPs; its endpoint only when `with_endpoint`), with
    /// the pod gateway's address, MTU 1420 and a route to `peer`'s pods on the device.
    ///
    /// # Errors
    /// When it does not come up or `wg`/`ip` fail.
    pub fn start_wireguard_go(
        &self,
        command: &[&str],
        env: &[(&str, &str)],
        peer: &Node,
        with_endpoint: bool,
    ) -> Result<Proc> {
        let proc = self.host.spawn_wireguard_go(command, IFACE, env)?;
        let mut conf = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {PORT}\n\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
            self.keys.private,
            peer.keys.public,
            peer.host.pod_cidr()
        );
        if with_endpoint {
            conf.push_str(&format!("Endpoint = {}\n", peer.endpoint()));
        }
        let path = self.host.dir().join("wg-go.conf");
        std::fs::write(&path, conf)?;
        self.wg(&["setconf", IFACE, path.to_str().context("utf-8 path")?])?;
        let gateway = format!("{}/32", self.host.pod_gateway());
        self.host.ip(&["addr", "add", &gateway, "dev", IFACE])?;
        self.host.ip(&["link", "set", IFACE, "mtu", "1420", "up"])?;
        self.host
            .ip(&["route", "add", &peer.host.pod_cidr(), "dev", IFACE])?;
        Ok(proc)
    }

    /// Runs `wg args...` against this node's agent.
    ///
    /// # Errors
    /// When `wg` fails.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        self.host.wg(args)
    }

    /// The agent's `/metrics` text.
    ///
    /// # Errors
    /// When the endpoint does not answer.
    pub fn metrics(&self) -> Result<String> {
        http_get(&self.host, METRICS, "/metrics")
    }

    /// The agent's `/metrics`, parsed.
    ///
    /// # Errors
    /// When the endpoint does not answer or serves something that does not parse.
    pub fn scrape(&self) -> Result<Exposition> {
        let text = self.metrics()?;
        text.parse()
            .with_context(|| format!("parsing the metrics of {}:\n{text}", self.host.name()))
    }

    /// The value of the one sample of `name` whose labels include `labels` (e.g.
    /// `[("reason", "replay")]`).
    ///
    /// # Errors
    /// When the metrics cannot be read or no sample, or more than one, matches.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.scrape()?.value(name, labels)
    }

    /// As [`Node::metric`], once the value has reached `at_least`, or its last value after
    /// 5 s: scrapes share one data-plane snapshot for up to a second (the agent's
    /// `metrics.rs`), so a counter shows an event only a moment later.
    ///
    /// # Errors
    /// As [`Node::metric`].
    pub fn metric_reaching(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
    ) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let value = self.metric(name, labels)?;
            if value >= at_least || Instant::now() >= deadline {
                return Ok(value);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Writes a wg-quick style config for `host` into its directory; the interface addresses
/// are the pod gateways, IPv4 and (if the host has an IPv6 pod CIDR) IPv6, so the host's own
/// traffic into the mesh has a pod-CIDR source.
///
/// # Errors
/// When the file cannot be written.
pub fn write_config(host: &Host, keys: &Keypair, peers: &[PeerSpec]) -> Result<PathBuf> {
    write_config_with_mtu(host, keys, peers, Some(LAB_MTU))
}

/// As [`write_config`], with `MTU = mtu`, or no `MTU` line when `None`.
///
/// # Errors
/// When the file cannot be written.
pub fn write_config_with_mtu(
    host: &Host,
    keys: &Keypair,
    peers: &[PeerSpec],
    mtu: Option<u32>,
) -> Result<PathBuf> {
    let mut text = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {PORT}\nAddress = {}/32\n",
        keys.private,
        host.pod_gateway()
    );
    if let Some(gateway6) = host.pod_gateway6() {
        text.push_str(&format!("Address = {gateway6}/128\n"));
    }
    if let Some(mtu) = mtu {
        text.push_str(&format!("MTU = {mtu}\n"));
    }
    for peer in peers {
        text.push_str(&format!("\n[Peer]\nPublicKey = {}\n", peer.public));
        if let Some(endpoint) = peer.endpoint {
            text.push_str(&format!("Endpoint = {endpoint}\n"));
        }
        if !peer.allowed_ips.is_empty() {
            text.push_str(&format!("AllowedIPs = {}\n", peer.allowed_ips.join(", ")));
        }
    }
    let path = host.dir().join(format!("{IFACE}.conf"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Starts `wiremesh-agent args...` on `host` and waits (up to 10 s) for its UAPI socket.
///
/// # Errors
/// When the agent exits or the socket does not appear (with the agent's output).
pub fn start_agent(host: &Host, args: &[&str]) -> Result<Proc> {
    let agent = host.spawn_agent(args, &[("RUST_LOG", "info")])?;
    let socket = host.run_dir().join(format!("{IFACE}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if !agent.is_running() || Instant::now() > deadline {
            bail!(
                "the agent on {} did not come up:\n{}",
                host.name(),
                agent.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent)
}

/// Runs `f` on a thread that has entered `ns`'s network namespace, so a test can open
/// sockets inside the lab.
///
/// # Errors
/// When the namespace cannot be entered, or as `f`.
pub fn in_netns<R: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("the thread in {} panicked", ns.name()))?
}

/// The agent's `wiremesh_drops_total{reason}` on `host` (0 when it has none yet), read
/// from its metrics at [`METRICS`].
///
/// # Errors
/// When the metrics cannot be fetched or parsed.
pub fn drops(host: &Netns, reason: &str) -> Result<f64> {
    let text = http_get(host, METRICS, "/metrics")?;
    let exposition: Exposition = text.parse()?;
    Ok(exposition
        .value("wiremesh_drops_total", &[("reason", reason)])
        .unwrap_or(0.0))
}

/// `GET path` from `addr` inside `ns`; returns the body of a 200 response.
///
/// # Errors
/// When the connection fails or the status is not 200.
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> Result<String> {
    let (head, body) = http_response(ns, addr, path)?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body)
}

/// `GET path` from `addr` inside `ns`; returns the head (status line and headers) and the
/// body, whatever the status.
///
/// # Errors
/// When the connection fails or the response is not HTTP.
pub fn http_response(ns: &Netns, addr: &str, path: &str) -> Result<(String, String)> {
    let addr: SocketAddr = addr.parse().context("metrics address")?;
    let path = path.to_owned();
    in_netns(ns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed HTTP response: {response:?}"))?;
        Ok((head.to_owned(), body.to_owned()))
    })
}

/// Waits up to `timeout` for `check` to succeed, polling every 100 ms; returns the last
/// error otherwise.
///
/// # Errors
/// The last error of `check` when the time runs out.
pub fn eventually<R>(timeout: Duration, mut check: impl FnMut() -> Result<R>) -> Result<R> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// What crossed an underlay while [`capture_during`] watched it.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    /// Ethernet frames seen (each bridge port sees a forwarded frame once).
    pub frames: u64,
    /// IPv4 UDP frames to or from the WireGuard port.
    pub wireguard: u64,
    /// Of those, WireGuard data messages (type 4).
    pub wireguard_data: u64,
    /// IPv4 frames that were not WireGuard (ARP and IPv6 are not counted at all).
    pub other_ipv4: u64,
    /// Frames that contained the plaintext marker.
    pub marker_hits: u64,
}

/// Sends `count` pings from `from` to `to`, 10 ms apart, each carrying `marker_hex`
/// (`ping -p`: the pattern repeats through the payload, for [`capture_during`] to look
/// for) and each waited for at most `wait` (seconds, as `ping -W` takes them); its output,
/// successful when any was answered.
///
/// # Errors
/// When `ping` cannot be run or takes more than 30 s.
pub fn marked_pings(
    from: &Netns,
    to: std::net::IpAddr,
    count: u32,
    marker_hex: &str,
    wait: &str,
) -> Result<std::process::Output> {
    from.exec_timeout(
        &[
            "ping",
            "-n",
            "-q",
            "-i",
            "0.01",
            "-W",
            wait,
            "-c",
            &count.to_string(),
            "-p",
            marker_hex,
            &to.to_string(),
        ],
        Duration::from_secs(30),
    )
}

/// Captures every frame in namespace `ns` (an underlay) while `action` runs, looking for
/// `marker` in the clear.
///
/// # Errors
/// When the capture socket cannot be opened, or as `action`.
pub fn capture_during<R>(
    ns: &Netns,
    marker: &'static [u8],
    action: impl FnOnce() -> Result<R>,
) -> Result<(Capture, R)> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, recv, setsockopt, socket, sockopt,
    };
    use nix::sys::time::TimeVal;

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{}", ns.name());
    let stop_flag = Arc::clone(&stop);
    let capture = std::thread::spawn(move || -> Result<Capture> {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
        let sock = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::EthAll,
        )
        .context("opening a packet socket")?;
        setsockopt(&sock, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000))?;
        let _ = ready_tx.send(());
        let mut stats = Capture::default();
        let mut buf = vec![0u8; 65_536];
        let deadline = Instant::now() + Duration::from_secs(300);
        while !stop_flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Ok(n) = recv(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) else {
                continue;
            };
            let frame = &buf[..n];
            stats.frames += 1;
            if frame.windows(marker.len()).any(|w| w == marker) {
                stats.marker_hits += 1;
            }
            if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
                continue;
            }
            let ip = &frame[14..];
            let header = usize::from(ip[0] & 0x0f) * 4;
            let is_wireguard = ip[9] == 17 && ip.len() >= header + 9 && {
                let udp = &ip[header..];
                let (src, dst) = (
                    u16::from_be_bytes([udp[0], udp[1]]),
                    u16::from_be_bytes([udp[2], udp[3]]),
                );
                src == PORT || dst == PORT
            };
            if is_wireguard {
                stats.wireguard += 1;
                if ip[header + 8] == 4 {
                    stats.wireguard_data += 1;
                }
            } else {
                stats.other_ipv4 += 1;
            }
        }
        Ok(stats)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("the capture did not start"))?;
    let result = action();
    stop.store(true, Ordering::Relaxed);
    let stats = capture
        .join()
        .map_err(|_| anyhow!("the capture thread panicked"))??;
    Ok((stats, result?))
}
