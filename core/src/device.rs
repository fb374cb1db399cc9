//! The device: our key, the peers, cryptokey routing and the verdict for every packet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use wiremesh_proto::uapi::{DeviceUpdate, PeerUpdate, PreviousKey};

use crate::Endpoint;
use wiremesh_proto::{IpCidr, PresharedKey, PrivateKey, PublicKey};

use super::allowed_ips::AllowedIps;
use super::encap;
use super::handshake_limiter::HandshakeLimiter;
use super::keys;
use super::mtu::{self, MtuGuard, MtuVerdict};
use super::offload::VnetHdr;
use super::translate::Translation;
use super::{Counters, DropReason};

/// Handshake messages per second the whole device takes before it asks for cookies.
/// boringtun's device uses 100; each handshake is verified twice here (once to find the
/// peer, once inside its `Tunn`), hence twice that.
const HANDSHAKE_RATE_LIMIT: u64 = 2 * 100;

/// boringtun shifts our index left by 8 bits to make room for its session ring, so a
/// peer's index must fit in 24 bits.
const MAX_PEERS: usize = 1 << 24;

/// WireGuard message type of a cookie reply (whitepaper §5.4.7).
const COOKIE_REPLY: u8 = 3;
/// Message type of a handshake initiation (§5.4.2).
const HANDSHAKE_INIT: u8 = 1;
/// Message type of a handshake response (§5.4.3).
const HANDSHAKE_RESPONSE: u8 = 2;
/// Message type of a transport data message, keepalives included (§5.4.6).
const DATA: u8 = 4;
/// The mac2 field closes every handshake message (§5.4.4).
const MAC2_LEN: usize = 16;

/// `VIRTIO_NET_HDR_GSO_ECN`, a flag beside the GSO type (`include/uapi/linux/virtio_net.h`).
const GSO_ECN: u8 = 0x80;

/// Inner packets are zero-padded to a multiple of this before encryption (whitepaper
/// §5.4.6), never past the tunnel MTU, so the outer size does not tell the exact inner one.
const PADDING_MULTIPLE: usize = 16;

/// A peer keeps at most this many `Tunn`s besides its current one while keys rotate:
/// the sessions under its or our previous key, which still carry traffic until a session
/// under the new keys exists.
const MAX_RETIRING: usize = 2;

/// How long a retiring `Tunn` outlives the first session of the current one: packets the
/// peer encrypted before it switched are still on their way.
const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// A peer's slot in the device, stable while the peer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(u32);

impl PeerId {
    /// The slot number.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// What to do with a packet read from the TUN device.
#[must_use]
#[derive(Debug)]
pub enum TunVerdict<'o> {
    /// Send this datagram to the peer's endpoint.
    Send {
        /// The peer it is for.
        peer: PeerId,
        /// Where to send it, and from which local address.
        to: Endpoint,
        /// The encrypted datagram (or a handshake initiation).
        datagram: &'o [u8],
    },
    /// Nothing to send now (the packet is queued until a handshake completes).
    Queued,
    /// The packet was dropped and counted.
    Drop(DropReason),
}

/// What to do with a datagram received on the underlay socket.
#[must_use]
#[derive(Debug)]
pub enum DatagramVerdict<'o> {
    /// Write this decrypted IP packet to the TUN device.
    Tunnel {
        /// The peer it came from.
        peer: PeerId,
        /// The inner IP packet.
        packet: &'o [u8],
    },
    /// Send this datagram back. When `peer` is set, afterwards call
    /// [`Device::poll_queued`] until it returns `None` to flush packets that waited for
    /// the handshake.
    Reply {
        /// The peer whose handshake this is, if authenticated.
        peer: Option<PeerId>,
        /// Where to send it: back where it came from, from the address it arrived on.
        to: Endpoint,
        /// The datagram.
        datagram: &'o [u8],
    },
    /// Authenticated, nothing to do (a keepalive, a cookie).
    Done,
    /// Dropped and counted.
    Drop(DropReason),
}

/// Why an update was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The device cannot hold more peers.
    #[error("too many peers (the limit is {MAX_PEERS})")]
    TooManyPeers,
    /// A peer's public key is a point of small order: every shared secret with it is zero
    /// ([`keys::is_low_order`]).
    #[error("peer public key {0} is a low-order point (every shared secret with it is zero)")]
    LowOrderKey(PublicKey),
}

impl DeviceError {
    /// The errno a UAPI `set` answers with: `ENOSPC` for too many peers, `EINVAL` for a
    /// key that is refused.
    pub fn errno(&self) -> i32 {
        match self {
            Self::TooManyPeers => 28,
            Self::LowOrderKey(_) => 22,
        }
    }
}

/// What an applied update changed, for the I/O shell to act on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct ApplyOutcome {
    /// The listen port changed: rebind the underlay socket.
    pub listen_port_changed: bool,
    /// The fwmark changed: set it on the underlay socket.
    pub fwmark_changed: bool,
    /// The set of allowed IPs changed: reconcile routes.
    pub routes_changed: bool,
    /// The tunnel MTU changed ([`Device::mtu`]): set it on the TUN device before the routes.
    pub mtu_changed: bool,
    /// Peers added.
    pub added: Vec<PublicKey>,
    /// Peers removed.
    pub removed: Vec<PublicKey>,
    /// Peers whose key changed (old, new) ([`PeerUpdate::replaces`]).
    pub rekeyed: Vec<(PublicKey, PublicKey)>,
}

/// A read-only view of one peer, for status and the UAPI `get`.
#[derive(Debug, Clone)]
pub struct PeerView {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Its preshared key, if any.
    pub preshared_key: Option<PresharedKey>,
    /// Where we send to (the last authenticated source, or the configured endpoint).
    pub endpoint: Option<SocketAddr>,
    /// Where the last authenticated datagram from it came from: an observation, never a
    /// configured or guessed endpoint.
    pub observed_endpoint: Option<SocketAddr>,
    /// Persistent keepalive interval in seconds, 0 when off.
    pub persistent_keepalive: u16,
    /// The prefixes it may send from and we route to it.
    pub allowed_ips: Vec<IpCidr>,
    /// Further prefixes it may send from, not routed to it (failover groups).
    pub accept_ips: Vec<IpCidr>,
    /// Time since the last authenticated datagram from it, measured at timer ticks (a
    /// few times a second); `None` before the first.
    pub since_receive: Option<Duration>,
    /// Time since the current session's handshake, if there is a session.
    pub since_handshake: Option<Duration>,
    /// Bytes received from it (whole datagrams).
    pub rx_bytes: u64,
    /// Bytes sent to it (whole datagrams).
    pub tx_bytes: u64,
    /// Authenticated datagrams received from it (data, handshake and keepalive messages).
    pub rx_packets: u64,
    /// Datagrams sent to it.
    pub tx_packets: u64,
    /// Handshakes completed with it.
    pub handshakes: u64,
}

impl PeerView {
    /// A peer that is only configured: no endpoint, no allowed IPs, no traffic, no session.
    pub fn configured(public_key: PublicKey) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            observed_endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
            accept_ips: Vec::new(),
            since_receive: None,
            since_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            handshakes: 0,
        }
    }
}

/// A `Tunn` of a peer made under keys that rotated (ours or the peer's): its sessions
/// still decrypt what the peer sent under them, and still encrypt until the peer's
/// current `Tunn` has a session, so a rotation loses no packet.
struct Retiring {
    tunn: Box<Tunn>,
    /// The receiver-index slot its sessions use (see [`new_tunn`]).
    index: u32,
    /// Our public key it was made with.
    ours: PublicKey,
    /// The peer's public key it was made with.
    theirs: PublicKey,
}

/// Our key before a rotation, kept a while to answer handshakes addressed to it.
struct Previous {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Verifies mac1 over this key (a handshake's mac1 names the key it is for).
    limiter: Arc<RateLimiter>,
    /// The longest it is kept.
    grace: Duration,
    /// When it goes: set at the first tick after the rotation.
    until: Option<Instant>,
    /// It may go before `until`, once no peer is [`Peer::pending`]: a rotation of this
    /// device. One restored at start (from before a restart) is kept for its grace, as
    /// no one is known to have the new key yet.
    early: bool,
}

struct Peer {
    public_key: PublicKey,
    preshared_key: Option<PresharedKey>,
    /// Where we send to: the last authenticated source and the local address it arrived
    /// on, or a configured endpoint (no local address).
    endpoint: Option<Endpoint>,
    /// Every endpoint it publishes, most preferred first: an unanswered handshake moves
    /// `endpoint` to the next (empty: only the one endpoint, as in WireGuard).
    endpoints: Vec<SocketAddr>,
    /// `rx_packets` when the last handshake initiation was sent.
    init_rx: Option<u64>,
    /// Source of the last authenticated datagram.
    observed: Option<SocketAddr>,
    /// The addresses of `endpoint` and `endpoints`, sorted and distinct, as counted in
    /// [`Device::known_sources`].
    sources: Vec<IpAddr>,
    persistent_keepalive: u16,
    allowed_ips: BTreeSet<IpCidr>,
    /// Sources accepted from the peer besides `allowed_ips`, never routed to it.
    accept_ips: BTreeSet<IpCidr>,
    /// When a timer tick last saw `rx_packets` grow (stamped at ticks, not per packet, to
    /// keep the clock off the hot path).
    last_receive: Option<Instant>,
    /// `rx_packets` at that tick.
    rx_seen: u64,
    /// The noise state machine, created on first use (a packet for the peer, its
    /// handshake initiation, or at once when persistent keepalive is on) and freed when
    /// boringtun declares the connection expired: a `Tunn` is about 1 KiB plus 1.4 KiB
    /// per live session (boxed in `third_party/boringtun`), which 10,000 idle peers
    /// should not pay for. Always `None` while the device has no private key.
    tunn: Option<Box<Tunn>>,
    /// The receiver-index slot of `tunn`: the peer's own slot at first, another one
    /// after a rotation left the old `Tunn` in [`Peer::retiring`] with it.
    index: u32,
    /// Older `Tunn`s from before a rotation, newest first.
    retiring: Vec<Retiring>,
    /// The tick at which the current `Tunn` was first seen with a session while some
    /// are retiring.
    current_since: Option<Instant>,
    /// The peer had a session when our key rotated and has not yet proven our new key
    /// (a handshake or data under it): the previous key stays for it.
    pending: bool,
    /// Send a handshake initiation at the next timer tick: a peer with persistent
    /// keepalive starts its session at once, as the kernel module does, instead of at its
    /// first keepalive (a node behind NAT is unreachable until it does).
    initiate: bool,
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
    handshakes: u64,
}

impl Peer {
    /// Counts one authenticated datagram of `len` bytes received from the peer.
    fn count_rx(&mut self, len: usize) {
        self.rx_bytes += len as u64;
        self.rx_packets += 1;
    }

    /// Counts one datagram of `len` bytes sent to the peer.
    fn count_tx(&mut self, len: usize) {
        self.tx_bytes += len as u64;
        self.tx_packets += 1;
    }

    /// Counts a datagram sent to the peer; a handshake initiation also starts the wait
    /// for an answer that [`Peer::next_endpoint`] measures.
    fn sent(&mut self, datagram: &[u8]) {
        self.count_tx(datagram.len());
        if datagram.first() == Some(&HANDSHAKE_INIT) {
            self.init_rx = Some(self.rx_packets);
        }
    }

    /// Before another handshake initiation: when the last one went unanswered (nothing
    /// authenticated came back since) and the peer has other endpoints, moves on to the
    /// next one in order of preference. A peer that roamed elsewhere starts again from
    /// its most preferred endpoint.
    fn next_endpoint(&mut self) -> Option<SocketAddr> {
        if self.endpoints.len() < 2 || self.init_rx != Some(self.rx_packets) {
            return None;
        }
        let next = match self
            .endpoint
            .and_then(|e| self.endpoints.iter().position(|c| *c == e.addr))
        {
            Some(i) => *self.endpoints.get((i + 1) % self.endpoints.len())?,
            None => *self.endpoints.first()?,
        };
        self.endpoint = Some(Endpoint::from(next));
        Some(next)
    }
}

/// The WireGuard device state: our key, the peers and the allowed-IPs table.
///
/// Methods take packets and return verdicts; the caller does the I/O.
pub struct Device {
    private_key: Option<(x25519::StaticSecret, x25519::PublicKey)>,
    /// Our key before the last rotation, while it is kept.
    previous: Option<Previous>,
    /// Verifies mac1 over the last key that stopped being kept, so handshakes still
    /// addressed to it are counted as [`DropReason::RetiredKey`].
    retired: Option<Arc<RateLimiter>>,
    /// Receiver-index slots of retiring or current `Tunn`s that are not their peer's
    /// own slot, and the peer they belong to.
    aliases: BTreeMap<u32, PeerId>,
    listen_port: u16,
    fwmark: u32,
    rate_limiter: Arc<RateLimiter>,
    slots: Vec<Option<Peer>>,
    free: Vec<u32>,
    by_key: BTreeMap<PublicKey, PeerId>,
    allowed: AllowedIps<PeerId>,
    counters: Counters,
    /// Handshake work per source address, after the cookie.
    handshake_limiter: HandshakeLimiter,
    /// The peers' endpoints (configured, and where verified packets came from), each
    /// with how many peers have it: their handshakes may draw on a reserve a flood cannot
    /// spend ([`HandshakeLimiter::allow_known`]). Kept up to date as endpoints change
    /// ([`refresh_sources`]), so no tick walks every peer for it.
    known_sources: BTreeMap<IpAddr, u32>,
    /// The time of the last timer tick (the core reads no clock itself).
    last_tick: Option<Instant>,
    /// The tunnel MTU, and the ICMP errors for packets over it.
    mtu: MtuGuard,
    /// The MTU was derived from the underlay, so it follows [`mtu::floor_for_routes`]; a
    /// configured one is left as it is.
    mtu_follows_routes: bool,
    /// Where a packet is zero-padded before encryption when its buffer has no room
    /// ([`Inner::padded`]).
    pad: Vec<u8>,
    /// This cluster's pod CIDRs and the mesh CIDRs that stand for them elsewhere: empty
    /// when they are unique in the mesh (no translation).
    translation: Translation,
    /// Where a borrowed packet is copied to be translated.
    translated: Vec<u8>,
}

impl Default for Device {
    fn default() -> Self {
        Self::new()
    }
}

impl Device {
    /// A device with no key and no peers, and a tunnel MTU of [`mtu::DEFAULT_MTU`].
    pub fn new() -> Self {
        Self {
            private_key: None,
            previous: None,
            retired: None,
            aliases: BTreeMap::new(),
            listen_port: 0,
            fwmark: 0,
            rate_limiter: Arc::new(RateLimiter::new(
                &x25519::PublicKey::from([0u8; 32]),
                HANDSHAKE_RATE_LIMIT,
            )),
            slots: Vec::new(),
            free: Vec::new(),
            by_key: BTreeMap::new(),
            allowed: AllowedIps::new(),
            counters: Counters::default(),
            handshake_limiter: HandshakeLimiter::new(),
            known_sources: BTreeMap::new(),
            last_tick: None,
            mtu: MtuGuard::new(mtu::DEFAULT_MTU),
            mtu_follows_routes: false,
            pad: Vec::new(),
            translation: Translation::default(),
            translated: Vec::new(),
        }
    }

    /// Applies a UAPI-style update (also what a config file becomes), all or nothing.
    ///
    /// Peers are applied in order; an allowed IP that another peer holds moves to this
    /// peer, as in the kernel module.
    ///
    /// # Errors
    /// [`DeviceError::TooManyPeers`] when the new peers do not fit,
    /// [`DeviceError::LowOrderKey`] for a peer (added or changed) whose key is a low-order
    /// point; nothing is changed.
    pub fn apply(&mut self, update: &DeviceUpdate) -> Result<ApplyOutcome, DeviceError> {
        if let Some(peer) = update
            .peers
            .iter()
            .find(|p| !p.remove && keys::is_low_order(&p.public_key))
        {
            return Err(DeviceError::LowOrderKey(peer.public_key));
        }
        let existing = if update.replace_peers {
            0
        } else {
            self.by_key.len()
        };
        let new_keys: BTreeSet<&PublicKey> = update
            .peers
            .iter()
            .filter(|p| !p.remove && !p.update_only && !self.by_key.contains_key(&p.public_key))
            .map(|p| &p.public_key)
            .collect();
        if existing + new_keys.len() > MAX_PEERS {
            return Err(DeviceError::TooManyPeers);
        }

        let mut outcome = ApplyOutcome::default();
        match (&update.private_key, &update.previous_key) {
            (Some(Some(key)), Some(previous)) => self.rotate_private_key(key, previous),
            (Some(key), _) => self.set_private_key(key.as_ref()),
            (None, _) => {}
        }
        if let Some(port) = update.listen_port
            && port != self.listen_port
        {
            self.listen_port = port;
            outcome.listen_port_changed = true;
        }
        if let Some(mark) = update.fwmark
            && mark != self.fwmark
        {
            self.fwmark = mark;
            outcome.fwmark_changed = true;
        }
        if update.replace_peers {
            let keys: Vec<PublicKey> = self.by_key.keys().copied().collect();
            for key in keys {
                if self.remove_peer(&key) {
                    outcome.removed.push(key);
                    outcome.routes_changed = true;
                }
            }
        }
        for peer in &update.peers {
            self.apply_peer(peer, &mut outcome);
        }
        if outcome.routes_changed && self.mtu_follows_routes {
            outcome.mtu_changed = self.floor_mtu();
        }
        Ok(outcome)
    }

    /// Sets the tunnel MTU. One `derived` from the underlay follows the routes
    /// ([`mtu::floor_for_routes`]): it is raised to the IPv6 minimum as soon as a route is
    /// IPv6, now or in a later [`apply`](Self::apply) (which then says
    /// [`ApplyOutcome::mtu_changed`]); a configured one is left as it is.
    pub fn set_mtu(&mut self, mtu: u32, derived: bool) {
        self.mtu.set_mtu(mtu);
        self.mtu_follows_routes = derived;
        if derived {
            let _ = self.floor_mtu();
        }
    }

    /// The tunnel MTU: the TUN device's, and what [`check_mtu`](Self::check_mtu) holds
    /// packets to.
    pub fn mtu(&self) -> u32 {
        self.mtu.mtu()
    }

    /// Raises the MTU to what the routes need; whether it changed.
    fn floor_mtu(&mut self) -> bool {
        let current = self.mtu.mtu();
        let ipv6 = self.allowed.iter().any(|(c, _)| c.addr().is_ipv6());
        let wanted = mtu::with_ipv6_floor(current, ipv6);
        self.mtu.set_mtu(wanted);
        wanted != current
    }

    /// The verdict for one packet read from the TUN device against the tunnel MTU, at time
    /// `now`, before [`handle_tun_packet`](Self::handle_tun_packet): a single packet, never
    /// a GSO super-packet (the kernel sized its segments). One too big that must not be
    /// fragmented is dropped and counted ([`DropReason::TooBig`]), and answered with an
    /// ICMP error built in `out` (which needs [`mtu::MAX_ICMP_LEN`] bytes) unless the rate
    /// limit is spent ([`MtuGuard::check`]).
    pub fn check_mtu<'o>(
        &mut self,
        packet: &[u8],
        now: Instant,
        out: &'o mut [u8],
    ) -> MtuVerdict<'o> {
        let verdict = self.mtu.check(packet, now, out);
        if verdict != MtuVerdict::Fits {
            self.counters.drop(DropReason::TooBig);
        }
        verdict
    }

    fn apply_peer(&mut self, update: &PeerUpdate, outcome: &mut ApplyOutcome) {
        let key = update.public_key;
        if self.public_key() == Some(key) {
            // A peer with our own key makes no sense; wireguard-go ignores it too.
            return;
        }
        if update.remove {
            if self.remove_peer(&key) {
                outcome.removed.push(key);
                outcome.routes_changed = true;
            }
            return;
        }
        if let Some(old) = update.replaces
            && old != key
            && !self.by_key.contains_key(&key)
            && let Some(id) = self.by_key.get(&old).copied()
        {
            self.rekey_peer(id, old, key);
            outcome.rekeyed.push((old, key));
        }
        let id = match self.by_key.get(&key) {
            Some(id) => *id,
            None if update.update_only => return,
            None => {
                let id = self.insert_peer(key);
                outcome.added.push(key);
                id
            }
        };
        let mut rebuild = false;
        let Some(peer) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        if let Some(psk) = &update.preshared_key
            && peer.preshared_key != *psk
        {
            peer.preshared_key = *psk;
            rebuild = true;
        }
        if let Some(endpoints) = &update.endpoints {
            peer.endpoints.clone_from(endpoints);
            // The endpoint in use stays (the peer may have roamed there); a new list
            // only gives a peer without one somewhere to start.
            if update.endpoint.is_none()
                && peer.endpoint.is_none()
                && let Some(first) = endpoints.first()
            {
                peer.endpoint = Some(Endpoint::from(*first));
            }
        }
        // A configured endpoint has no local address yet (the kernel's
        // `wg_socket_set_peer_endpoint` from netlink clears the source too).
        if let Some(endpoint) = update.endpoint {
            peer.endpoint = Some(Endpoint::from(endpoint));
        }
        refresh_sources(&mut self.known_sources, peer);
        if let Some(keepalive) = update.persistent_keepalive
            && peer.persistent_keepalive != keepalive
        {
            peer.persistent_keepalive = keepalive;
            rebuild = true;
        }
        if let Some(accept) = &update.accept_ips {
            peer.accept_ips = accept.iter().copied().collect();
        }
        let old_ips = if update.replace_allowed_ips {
            std::mem::take(&mut peer.allowed_ips)
        } else {
            BTreeSet::new()
        };
        for cidr in &old_ips {
            self.allowed.remove(cidr);
            outcome.routes_changed = true;
        }
        for cidr in &update.allowed_ips {
            if let Some(previous) = self.allowed.insert(*cidr, id)
                && previous != id
                && let Some(other) = self.slot_mut(previous)
            {
                other.allowed_ips.remove(cidr);
            }
            if let Some(peer) = self.slot_mut(id) {
                peer.allowed_ips.insert(*cidr);
            }
            outcome.routes_changed = true;
        }
        if rebuild {
            self.rebuild_tunn(id);
        }
    }

    fn set_private_key(&mut self, key: Option<&PrivateKey>) {
        // Kept clamped, as the kernel and wireguard-go keep it: the same scalar.
        let key = key.map(keys::clamp);
        // The same key again keeps every session, as in wireguard-go.
        if self.private_key() == key {
            return;
        }
        let key = key.as_ref();
        self.private_key = key.map(|k| {
            let secret = x25519::StaticSecret::from(*k.as_bytes());
            let public = x25519::PublicKey::from(&secret);
            (secret, public)
        });
        if let Some((_, public)) = &self.private_key {
            self.rate_limiter = Arc::new(RateLimiter::new(public, HANDSHAKE_RATE_LIMIT));
        }
        // A new identity invalidates every session (those of a rotation too) and every
        // peer whose key is now ours.
        self.previous = None;
        for id in self.by_key.values().copied().collect::<Vec<_>>() {
            let indices: Vec<u32> = self
                .slot_mut(id)
                .map(|p| {
                    p.pending = false;
                    p.retiring.drain(..).map(|r| r.index).collect()
                })
                .unwrap_or_default();
            for index in indices {
                self.free_index(id, index);
            }
        }
        let own = self.public_key();
        if let Some(own) = own {
            self.remove_peer(&own);
        }
        let ids: Vec<PeerId> = self.by_key.values().copied().collect();
        for id in ids {
            self.rebuild_tunn(id);
        }
    }

    /// Rotates our static key to `key`, keeping `previous.key` (normally the current
    /// one) for up to `previous.grace`: handshakes addressed to it are still answered, and
    /// every peer's current `Tunn` retires (its sessions keep carrying traffic) behind a
    /// new one under `key` that initiates at the next tick. The previous key goes at the
    /// first tick where every peer that had a session has proven the new key, or when the
    /// grace is over; afterwards a handshake addressed to it is refused
    /// ([`DropReason::RetiredKey`]).
    fn rotate_private_key(&mut self, key: &PrivateKey, previous: &PreviousKey) {
        let key = keys::clamp(key);
        let old = keys::clamp(&previous.key);
        if self.private_key() == Some(key) || key == old {
            return;
        }
        let old_secret = x25519::StaticSecret::from(*old.as_bytes());
        let old_public = x25519::PublicKey::from(&old_secret);
        let rotating = self.private_key() == Some(old);
        // The sessions under the old key, when it is ours now, keep its rate limiter.
        let old_limiter = if rotating {
            Arc::clone(&self.rate_limiter)
        } else {
            Arc::new(RateLimiter::new(&old_public, HANDSHAKE_RATE_LIMIT))
        };
        let secret = x25519::StaticSecret::from(*key.as_bytes());
        let public = x25519::PublicKey::from(&secret);
        self.rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        self.private_key = Some((secret, public));
        self.previous = Some(Previous {
            secret: old_secret,
            public: old_public,
            limiter: old_limiter,
            grace: previous.grace,
            until: None,
            early: rotating,
        });
        self.retired = None;
        let own = PublicKey::from(*public.as_bytes());
        self.remove_peer(&own);
        let ours = PublicKey::from(*old_public.as_bytes());
        let ids: Vec<PeerId> = self.by_key.values().copied().collect();
        for id in ids {
            let had_session = rotating && self.retire_current(id, ours);
            self.rebuild_tunn(id);
            self.start_current(id);
            if let Some(peer) = self.slot_mut(id) {
                peer.pending = had_session;
            }
        }
    }

    /// The peer's key changed from `old` to `new` ([`PeerUpdate::replaces`]): same slot,
    /// allowed IPs and counters; its current `Tunn` retires and a new one for `new`
    /// initiates at the next tick.
    fn rekey_peer(&mut self, id: PeerId, old: PublicKey, new: PublicKey) {
        self.by_key.remove(&old);
        self.by_key.insert(new, id);
        if let Some(ours) = self.public_key() {
            self.retire_current(id, ours);
        }
        if let Some(peer) = self.slot_mut(id) {
            peer.public_key = new;
        }
        self.rebuild_tunn(id);
        self.start_current(id);
    }

    /// While the peer has retiring `Tunn`s, its current one initiates at the next tick
    /// whatever its keepalive: the session under the new keys starts at once, and the
    /// retiring ones carry the traffic meanwhile.
    fn start_current(&mut self, id: PeerId) {
        let retiring = self
            .slots
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .is_some_and(|p| !p.retiring.is_empty());
        if retiring {
            self.ensure_tunn(id);
            if let Some(peer) = self.slot_mut(id) {
                peer.initiate = true;
            }
        }
    }

    /// Moves the peer's current `Tunn` to its retiring ones when it has a session (made
    /// with our key `ours`), giving the current one a fresh receiver-index slot; whether
    /// it did. Without a free slot the old sessions are simply dropped.
    fn retire_current(&mut self, id: PeerId, ours: PublicKey) -> bool {
        let has_session = self
            .slots
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .and_then(|p| p.tunn.as_ref())
            .is_some_and(|t| t.time_since_last_handshake().is_some());
        if !has_session {
            return false;
        }
        let Some(index) = self.alloc_index(id) else {
            return false;
        };
        let mut dropped = Vec::new();
        if let Some(peer) = self.slot_mut(id)
            && let Some(tunn) = peer.tunn.take()
        {
            peer.retiring.insert(
                0,
                Retiring {
                    tunn,
                    index: peer.index,
                    ours,
                    theirs: peer.public_key,
                },
            );
            peer.index = index;
            peer.current_since = None;
            while peer.retiring.len() > MAX_RETIRING {
                if let Some(old) = peer.retiring.pop() {
                    dropped.push(old.index);
                }
            }
        }
        for index in dropped {
            self.free_index(id, index);
        }
        true
    }

    /// A receiver-index slot for another `Tunn` of peer `id`.
    fn alloc_index(&mut self, id: PeerId) -> Option<u32> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                if self.slots.len() >= MAX_PEERS {
                    return None;
                }
                let slot = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(None);
                slot
            }
        };
        self.aliases.insert(slot, id);
        Some(slot)
    }

    /// Gives back a slot from [`Self::alloc_index`] (the peer's own slot stays).
    fn free_index(&mut self, id: PeerId, index: u32) {
        if index != id.0 && self.aliases.remove(&index).is_some() {
            self.free.push(index);
        }
    }

    /// The peer whose `Tunn` uses receiver-index slot `index`.
    fn owner(&self, index: u32) -> Option<PeerId> {
        match self.slots.get(index as usize) {
            Some(Some(_)) => Some(PeerId(index)),
            _ => self.aliases.get(&index).copied(),
        }
    }

    /// Gives the peer a current `Tunn` if it has none and we have a key.
    fn ensure_tunn(&mut self, id: PeerId) {
        let Some((secret, _)) = &self.private_key else {
            return;
        };
        let limiter = &self.rate_limiter;
        if let Some(peer) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut)
            && peer.tunn.is_none()
        {
            peer.tunn = Some(new_tunn(secret, limiter, peer));
        }
    }

    fn insert_peer(&mut self, public_key: PublicKey) -> PeerId {
        let peer = Peer {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: BTreeSet::new(),
            accept_ips: BTreeSet::new(),
            endpoints: Vec::new(),
            init_rx: None,
            observed: None,
            sources: Vec::new(),
            last_receive: None,
            rx_seen: 0,
            tunn: None,
            index: 0,
            retiring: Vec::new(),
            current_since: None,
            pending: false,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            initiate: false,
            handshakes: 0,
        };
        let id = match self.free.pop() {
            Some(slot) => {
                // A freed slot is one of `slots`, emptied by remove_peer.
                if let Some(entry) = self.slots.get_mut(slot as usize) {
                    *entry = Some(Peer {
                        index: slot,
                        ..peer
                    });
                }
                PeerId(slot)
            }
            None => {
                // apply() checked MAX_PEERS, which fits in u32.
                let slot = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                self.slots.push(Some(Peer {
                    index: slot,
                    ..peer
                }));
                PeerId(slot)
            }
        };
        self.by_key.insert(public_key, id);
        self.rebuild_tunn(id);
        id
    }

    /// Discards the peer's sessions after a change of keys or keepalive. A peer with
    /// persistent keepalive gets its `Tunn` at once (it initiates on its own); the
    /// others get one when they first need it.
    fn rebuild_tunn(&mut self, id: PeerId) {
        let private_key = self.private_key.as_ref().map(|(secret, _)| secret);
        let limiter = &self.rate_limiter;
        if let Some(peer) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) {
            peer.tunn = match private_key {
                Some(secret) if peer.persistent_keepalive != 0 => {
                    Some(new_tunn(secret, limiter, peer))
                }
                _ => None,
            };
            peer.initiate = peer.tunn.is_some();
        }
    }

    fn remove_peer(&mut self, key: &PublicKey) -> bool {
        let Some(id) = self.by_key.remove(key) else {
            return false;
        };
        if let Some(mut peer) = self.slots.get_mut(id.0 as usize).and_then(Option::take) {
            peer.endpoint = None;
            peer.endpoints.clear();
            refresh_sources(&mut self.known_sources, &mut peer);
            for cidr in &peer.allowed_ips {
                if self.allowed.exact(cidr) == Some(id) {
                    self.allowed.remove(cidr);
                }
            }
            self.free_index(id, peer.index);
            for retiring in &peer.retiring {
                self.free_index(id, retiring.index);
            }
        }
        self.free.push(id.0);
        true
    }

    fn slot_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.slots.get_mut(id.0 as usize).and_then(Option::as_mut)
    }

    /// Sets this cluster's prefix translation ([`crate::translate`]): packets from its
    /// pods to other clusters leave with mesh sources, packets for its mesh addresses are
    /// delivered to its pods. An empty table translates nothing.
    pub fn set_translation(&mut self, translation: Translation) {
        self.translation = translation;
    }

    /// This cluster's prefix translation.
    pub fn translation(&self) -> &Translation {
        &self.translation
    }

    /// Translates a TUN read behind its vnet header once, before it is split, when it is a
    /// GSO super-packet: its segments then need no translation each. A single packet is
    /// left alone: it is translated when encrypted, after the MTU check (whose ICMP
    /// error must quote the packet as the pod sent it).
    ///
    /// # Errors
    /// When the packet cannot be translated: it is counted as
    /// [`DropReason::Untranslatable`] and must be dropped.
    pub fn translate_tun_read(&mut self, read: &mut [u8]) -> Result<(), DropReason> {
        let gso = VnetHdr::parse(read).is_some_and(|h| h.gso_type & !GSO_ECN != 0);
        if self.translation.is_empty() || !gso {
            return Ok(());
        }
        match self.translation.outbound_vnet(read) {
            Ok(_) => Ok(()),
            Err(_) => {
                self.counters.drop(DropReason::Untranslatable);
                Err(DropReason::Untranslatable)
            }
        }
    }

    /// Encrypts a packet read from the TUN device for the peer that owns its destination,
    /// zero-padded to a multiple of 16 bytes within the tunnel MTU (whitepaper §5.4.6).
    ///
    /// `out` must be at least `packet.len() + 47` (the padding and 32 bytes of header and
    /// tag) and at least 148 bytes long.
    pub fn handle_tun_packet<'o>(&mut self, packet: &[u8], out: &'o mut [u8]) -> TunVerdict<'o> {
        self.encrypt(Inner::Borrowed(packet), out)
    }

    /// As [`Self::handle_tun_packet`] for the packet `buf[..len]`, padded in place in the
    /// rest of `buf` when it has room (a TUN read buffer does): no copy. A `len` over
    /// `buf.len()` is dropped as a bad packet.
    pub fn handle_tun_packet_in_place<'o>(
        &mut self,
        buf: &mut [u8],
        len: usize,
        out: &'o mut [u8],
    ) -> TunVerdict<'o> {
        if len > buf.len() {
            return self.drop_tun(DropReason::BadTunPacket);
        }
        self.encrypt(Inner::Roomy(buf, len), out)
    }

    fn encrypt<'o>(&mut self, inner: Inner<'_>, out: &'o mut [u8]) -> TunVerdict<'o> {
        let Some(dst) = Tunn::dst_address(inner.packet()) else {
            return self.drop_tun(DropReason::BadTunPacket);
        };
        let Some(id) = self.allowed.lookup(dst) else {
            return self.drop_tun(DropReason::NoRoute);
        };
        let Some((secret, _)) = &self.private_key else {
            return self.drop_tun(DropReason::NoPrivateKey);
        };
        let Some(peer) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return self.drop_tun(DropReason::NoRoute);
        };
        let Some(to) = peer.endpoint else {
            return self.drop_tun(DropReason::NoEndpoint);
        };
        if peer.tunn.is_none() && !peer.retiring.iter().any(|r| has_session(&r.tunn)) {
            peer.tunn = Some(new_tunn(secret, &self.rate_limiter, peer));
        }
        let Some(tunn) = sending_tunn(peer) else {
            return self.drop_tun(DropReason::Internal);
        };
        let Some(inner) = translated(&self.translation, inner, &mut self.translated) else {
            self.counters.drop(DropReason::Untranslatable);
            return TunVerdict::Drop(DropReason::Untranslatable);
        };
        let packet = inner.padded(self.mtu.mtu(), &mut self.pad);
        match tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                peer.sent(datagram);
                TunVerdict::Send {
                    peer: id,
                    to,
                    datagram,
                }
            }
            TunnResult::Done => TunVerdict::Queued,
            TunnResult::Err(e) => {
                let reason = reason_for(&e);
                self.counters.drop(reason);
                TunVerdict::Drop(reason)
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                self.drop_tun(DropReason::Internal)
            }
        }
    }

    fn drop_tun(&mut self, reason: DropReason) -> TunVerdict<'static> {
        self.counters.drop(reason);
        TunVerdict::Drop(reason)
    }

    fn drop_datagram(&mut self, reason: DropReason) -> DatagramVerdict<'static> {
        self.counters.drop(reason);
        DatagramVerdict::Drop(reason)
    }

    /// Handles one datagram from the underlay socket.
    ///
    /// `out` must be at least as long as the datagram and at least 148 bytes.
    ///
    /// `from` is the datagram's source and the local address it arrived on (its
    /// destination), which becomes the peer's sticky source when the datagram proves the
    /// peer's key.
    pub fn handle_datagram<'o>(
        &mut self,
        from: Endpoint,
        datagram: &[u8],
        out: &'o mut [u8],
    ) -> DatagramVerdict<'o> {
        let Some((secret, public)) = &self.private_key else {
            return self.drop_datagram(DropReason::NoPrivateKey);
        };
        // Step 1: MACs and the load check (whitepaper §5.4.4, §5.3 cookies). A handshake
        // message's mac1 is keyed with the receiver's static public key, so it also tells
        // whether the sender addressed our previous key (a rotation in progress).
        let mut cookie = [0u8; 64];
        let mut verified =
            self.rate_limiter
                .verify_packet(Some(from.addr.ip()), datagram, &mut cookie);
        let mut to_previous = false;
        if matches!(verified, Err(TunnResult::Err(WireGuardError::InvalidMac))) {
            if let Some(previous) = &self.previous {
                let mut again = [0u8; 64];
                if let Ok(packet) =
                    previous
                        .limiter
                        .verify_packet(Some(from.addr.ip()), datagram, &mut again)
                {
                    verified = Ok(packet);
                    to_previous = true;
                }
            } else if let Some(retired) = &self.retired
                && retired
                    .verify_packet(Some(from.addr.ip()), datagram, &mut [0u8; 64])
                    .is_ok()
            {
                return self.drop_datagram(DropReason::RetiredKey);
            }
        }
        let parsed = match verified {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(reply)) => {
                let Some(answer) = out.get_mut(..reply.len()) else {
                    return self.drop_datagram(DropReason::Internal);
                };
                answer.copy_from_slice(reply);
                self.counters.cookies_sent += 1;
                return DatagramVerdict::Reply {
                    peer: None,
                    to: from,
                    datagram: answer,
                };
            }
            Err(TunnResult::Err(e)) => return self.drop_datagram(reason_for(&e)),
            Err(_) => return self.drop_datagram(DropReason::Internal),
        };
        // A handshake that carries a cookie (which boringtun checked if we are under
        // load) still costs its source one of its tokens before any Diffie-Hellman: a
        // sender that answers cookies gets no more than its share of handshake work.
        // Before the first tick there is no time to count with (the loop ticks at once).
        if carries_cookie(datagram)
            && let Some(now) = self.last_tick
            && !if self.known_sources.contains_key(&from.addr.ip()) {
                self.handshake_limiter.allow_known(from.addr.ip(), now)
            } else {
                self.handshake_limiter.allow(from.addr.ip(), now)
            }
        {
            return self.drop_datagram(DropReason::RateLimited);
        }
        // Step 2: which peer, and which of its `Tunn`s. An initiation names its sender
        // only inside the encrypted static key; everything else carries our receiver
        // index, whose top 24 bits name the `Tunn`'s slot.
        let (id, index) = match &parsed {
            Packet::HandshakeInit(init) => {
                let (secret, public) = match (&self.previous, to_previous) {
                    (Some(previous), true) => (&previous.secret, &previous.public),
                    _ => (secret, public),
                };
                let id = parse_handshake_anon(secret, public, init)
                    .ok()
                    .and_then(|half| self.by_key.get(&PublicKey::from(half.peer_static_public)))
                    .copied();
                (id, None)
            }
            Packet::HandshakeResponse(p) => {
                (self.owner(p.receiver_idx >> 8), Some(p.receiver_idx >> 8))
            }
            Packet::PacketCookieReply(p) => {
                (self.owner(p.receiver_idx >> 8), Some(p.receiver_idx >> 8))
            }
            Packet::PacketData(p) => (self.owner(p.receiver_idx >> 8), Some(p.receiver_idx >> 8)),
        };
        let is_cookie = matches!(parsed, Packet::PacketCookieReply(_));
        let Some(id) = id else {
            return self.drop_datagram(DropReason::UnknownPeer);
        };
        let previous = self
            .previous
            .as_ref()
            .map(|p| (&p.secret, &p.limiter, PublicKey::from(*p.public.as_bytes())));
        let Some(peer) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return self.drop_datagram(DropReason::UnknownPeer);
        };
        let is_init = matches!(parsed, Packet::HandshakeInit(_));
        // An initiation to our previous key is answered by a retiring `Tunn` under it
        // (made now if the peer has none); the current `Tunn` answers the others.
        let mut make_retiring = None;
        let slot = match (index, previous) {
            (Some(index), _) if index == peer.index => Slot::Current,
            (Some(index), _) => match peer.retiring.iter().position(|r| r.index == index) {
                Some(at) => Slot::Retiring(at),
                None => return self.drop_datagram(DropReason::UnknownPeer),
            },
            (None, Some((old_secret, old_limiter, ours))) if to_previous => {
                let theirs = peer.public_key;
                match peer
                    .retiring
                    .iter()
                    .position(|r| r.ours == ours && r.theirs == theirs)
                {
                    Some(at) => Slot::Retiring(at),
                    None => {
                        make_retiring = Some((old_secret.clone(), Arc::clone(old_limiter), ours));
                        Slot::Retiring(0)
                    }
                }
            }
            (None, _) if to_previous => return self.drop_datagram(DropReason::RetiredKey),
            (None, _) => Slot::Current,
        };
        let slot = match make_retiring {
            Some((old_secret, old_limiter, ours)) => {
                match self.new_retiring(id, &old_secret, &old_limiter, ours) {
                    Some(at) => Slot::Retiring(at),
                    None => return self.drop_datagram(DropReason::UnknownPeer),
                }
            }
            None => slot,
        };
        let Some((secret, _)) = &self.private_key else {
            return self.drop_datagram(DropReason::NoPrivateKey);
        };
        let Some(peer) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return self.drop_datagram(DropReason::UnknownPeer);
        };
        // Only an initiation starts a conversation with a peer that has no `Tunn`; a
        // response, cookie or data packet for it answers nothing we sent.
        if slot == Slot::Current && peer.tunn.is_none() && is_init {
            peer.tunn = Some(new_tunn(secret, &self.rate_limiter, peer));
        }
        let tunn = match slot {
            Slot::Retiring(at) => peer.retiring.get_mut(at).map(|r| &mut *r.tunn),
            _ => peer.tunn.as_deref_mut(),
        };
        let Some(tunn) = tunn else {
            return self.drop_datagram(DropReason::UnknownPeer);
        };
        // Step 3: decrypt. Only what proves the peer's key moves its endpoint (roaming,
        // whitepaper §2.1), becomes its observed endpoint and counts as heard from it.
        let result = tunn.decapsulate(Some(from.addr.ip()), datagram, out);
        let proof = proof_of(datagram, &result);
        if proof != Proof::None {
            let moved = peer.endpoint.map(|e| e.addr.ip()) != Some(from.addr.ip());
            peer.endpoint = Some(from);
            if moved {
                refresh_sources(&mut self.known_sources, peer);
            }
            peer.observed = Some(from.addr);
            peer.count_rx(datagram.len());
            if proof == Proof::Handshake {
                peer.handshakes += 1;
            }
            if slot == Slot::Current {
                // The peer has proven our current key.
                peer.pending = false;
            }
        }
        // A valid cookie reply from the endpoint we sent our initiation to answers it
        // (the peer is only busy): no reason to move on to the next one. It proves no
        // key, so nothing else changes.
        if is_cookie
            && peer.endpoint.map(|e| e.addr) == Some(from.addr)
            && !matches!(result, TunnResult::Err(_))
        {
            peer.init_rx = None;
        }
        match result {
            TunnResult::Done => DatagramVerdict::Done,
            TunnResult::Err(e) => {
                let reason = reason_for(&e);
                self.counters.drop(reason);
                DatagramVerdict::Drop(reason)
            }
            TunnResult::WriteToNetwork(reply) => {
                if reply.first() == Some(&COOKIE_REPLY) {
                    self.counters.cookies_sent += 1;
                    return DatagramVerdict::Reply {
                        peer: None,
                        to: from,
                        datagram: reply,
                    };
                }
                peer.sent(reply);
                DatagramVerdict::Reply {
                    // Only the current `Tunn` queues packets for a handshake.
                    peer: (slot == Slot::Current).then_some(id),
                    to: from,
                    datagram: reply,
                }
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                self.check_source(id, IpAddr::V4(src), packet)
            }
            TunnResult::WriteToTunnelV6(packet, src) => {
                self.check_source(id, IpAddr::V6(src), packet)
            }
        }
    }

    /// A retiring `Tunn` for peer `id` under our previous key (`secret`, whose public
    /// key is `ours`), to answer an initiation addressed to it; its position.
    fn new_retiring(
        &mut self,
        id: PeerId,
        secret: &x25519::StaticSecret,
        limiter: &Arc<RateLimiter>,
        ours: PublicKey,
    ) -> Option<usize> {
        let full = self
            .slots
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .is_none_or(|p| p.retiring.len() >= MAX_RETIRING);
        if full {
            return None;
        }
        let index = self.alloc_index(id)?;
        let peer = self.slot_mut(id)?;
        let keepalive = (peer.persistent_keepalive != 0).then_some(peer.persistent_keepalive);
        let tunn = Box::new(Tunn::new(
            secret.clone(),
            x25519::PublicKey::from(*peer.public_key.as_bytes()),
            peer.preshared_key.map(|k| *k.as_bytes()),
            keepalive,
            index,
            Some(Arc::clone(limiter)),
        ));
        peer.retiring.push(Retiring {
            tunn,
            index,
            ours,
            theirs: peer.public_key,
        });
        Some(peer.retiring.len() - 1)
    }

    /// Cryptokey routing on receive (whitepaper §2.2): the inner source must be one of
    /// the sending peer's allowed IPs.
    /// Then the destination is translated back from this cluster's mesh CIDR (after the
    /// check: the source is the peer's own), and, where the cluster's own ranges are
    /// known, must be one of them or another peer's, and carry no other tunnel's packet
    /// ([`encap`]).
    fn check_source<'o>(
        &mut self,
        id: PeerId,
        src: IpAddr,
        packet: &'o mut [u8],
    ) -> DatagramVerdict<'o> {
        let accepted = || {
            self.slots
                .get(id.0 as usize)
                .and_then(Option::as_ref)
                .is_some_and(|p| p.accept_ips.iter().any(|c| c.contains(src)))
        };
        if self.allowed.lookup(src) == Some(id) || accepted() {
            if !self.translation.is_empty() && self.translation.inbound(packet).is_err() {
                return self.drop_datagram(DropReason::Untranslatable);
            }
            if self.translation.limits_destinations() {
                // To this cluster's own ranges, or on to another peer (a gateway or a
                // relay passes it on); nothing else.
                let allowed = destination(packet).is_some_and(|dst| {
                    self.translation.delivers(dst)
                        || (self.translation.passes_on()
                            && self.allowed.lookup(dst).is_some_and(|to| to != id))
                });
                if !allowed {
                    return self.drop_datagram(DropReason::BadDestination);
                }
                if encap::carries_tunnel(packet) {
                    return self.drop_datagram(DropReason::Encapsulated);
                }
            }
            DatagramVerdict::Tunnel { peer: id, packet }
        } else {
            self.drop_datagram(DropReason::BadSource)
        }
    }

    /// Next packet that waited for a handshake with `peer`, encrypted, if any.
    ///
    /// Call after a [`DatagramVerdict::Reply`] with a peer until it returns `None`.
    pub fn poll_queued<'o>(
        &mut self,
        peer: PeerId,
        out: &'o mut [u8],
    ) -> Option<(Endpoint, &'o [u8])> {
        let peer = self.slots.get_mut(peer.0 as usize)?.as_mut()?;
        let to = peer.endpoint?;
        match peer.tunn.as_mut()?.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(datagram) => {
                peer.count_tx(datagram.len());
                Some((to, datagram))
            }
            _ => None,
        }
    }

    /// Drives every peer's timers: handshake retries, rekeys, keepalives. Call a few
    /// times a second with the time of the tick. `send` gets each datagram to transmit.
    pub fn update_timers(
        &mut self,
        now: Instant,
        out: &mut [u8],
        mut send: impl FnMut(Endpoint, &[u8]),
    ) {
        self.rate_limiter.reset_count();
        self.handshake_limiter.forget_idle(now);
        self.last_tick = Some(now);
        self.expire_previous(now);
        let mut freed = Vec::new();
        for (slot, peer) in self.slots.iter_mut().enumerate() {
            let Some(peer) = peer.as_mut() else {
                continue;
            };
            if peer.rx_packets != peer.rx_seen {
                peer.rx_seen = peer.rx_packets;
                peer.last_receive = Some(now);
            }
            if !peer.retiring.is_empty() {
                retiring_timers(peer, now, out, &mut send, |index| freed.push((slot, index)));
            }
            let Some(tunn) = peer.tunn.as_mut() else {
                continue;
            };
            if peer.initiate
                && let Some(to) = peer.endpoint
            {
                peer.initiate = false;
                if let TunnResult::WriteToNetwork(datagram) =
                    tunn.format_handshake_initiation(out, false)
                {
                    peer.sent(datagram);
                    send(to, datagram);
                    continue;
                }
            }
            match tunn.update_timers(out) {
                TunnResult::WriteToNetwork(datagram) => {
                    if datagram.first() == Some(&HANDSHAKE_INIT) && peer.next_endpoint().is_some() {
                        refresh_sources(&mut self.known_sources, peer);
                    }
                    if let Some(to) = peer.endpoint {
                        peer.sent(datagram);
                        send(to, datagram);
                    }
                }
                // boringtun gave up: no session left and no handshake to retry (after
                // REKEY_ATTEMPT_TIME, or REJECT_AFTER_TIME × 3 without new keys). Free
                // the state; the next packet or initiation builds a fresh one.
                TunnResult::Err(WireGuardError::ConnectionExpired)
                    if peer.persistent_keepalive == 0 =>
                {
                    peer.tunn = None;
                }
                _ => {}
            }
        }
        for (slot, index) in freed {
            // Slots are below MAX_PEERS, which fits in u32.
            let id = PeerId(u32::try_from(slot).unwrap_or(u32::MAX));
            self.free_index(id, index);
        }
    }

    /// Forgets our previous key when its grace is over, or once no peer that had a
    /// session under it still waits to prove the new one. Afterwards handshakes
    /// addressed to it are refused ([`DropReason::RetiredKey`]).
    fn expire_previous(&mut self, now: Instant) {
        let Some(previous) = self.previous.as_mut() else {
            return;
        };
        let until = *previous.until.get_or_insert(now + previous.grace);
        let waiting = !previous.early || self.slots.iter().flatten().any(|p| p.pending);
        if now < until && waiting {
            return;
        }
        if let Some(previous) = self.previous.take() {
            self.retired = Some(Arc::new(RateLimiter::new(
                &previous.public,
                HANDSHAKE_RATE_LIMIT,
            )));
        }
        for peer in self.slots.iter_mut().flatten() {
            peer.pending = false;
        }
    }

    /// Whether our previous key is still kept (a rotation in progress).
    pub fn has_previous_key(&self) -> bool {
        self.previous.is_some()
    }

    /// Forgets `local` as the sticky source of every peer that has it: sending from it
    /// failed (the address is gone), so the kernel chooses again, as WireGuard does when
    /// `ip_route_output_flow` refuses the source. Returns how many peers had it.
    pub fn forget_local(&mut self, local: IpAddr) -> usize {
        let mut forgotten = 0;
        for peer in self.slots.iter_mut().flatten() {
            if let Some(endpoint) = &mut peer.endpoint
                && endpoint.local == Some(local)
            {
                endpoint.local = None;
                forgotten += 1;
            }
        }
        forgotten
    }

    /// Where datagrams for `id` go now, with the local address they leave from.
    pub fn endpoint(&self, id: PeerId) -> Option<Endpoint> {
        self.slots.get(id.0 as usize)?.as_ref()?.endpoint
    }

    /// Our public key, if a private key is set.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.private_key
            .as_ref()
            .map(|(_, public)| PublicKey::from(*public.as_bytes()))
    }

    /// Our private key, clamped ([`keys::clamp`]) as `wg` prints it, for the UAPI `get`
    /// (which hands it to a root-only socket).
    pub fn private_key(&self) -> Option<PrivateKey> {
        self.private_key
            .as_ref()
            .map(|(secret, _)| PrivateKey::from(secret.to_bytes()))
    }

    /// The UDP port we listen on (0 until bound).
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// Records the port the socket actually bound (when 0 was asked for).
    pub fn set_bound_port(&mut self, port: u16) {
        self.listen_port = port;
    }

    /// The fwmark for the underlay socket, 0 when off.
    pub fn fwmark(&self) -> u32 {
        self.fwmark
    }

    /// Every allowed-IPs prefix of every peer: the routes the TUN device needs.
    pub fn routes(&self) -> BTreeSet<IpCidr> {
        self.allowed.iter().map(|(c, _)| c).collect()
    }

    /// How many peers hold noise state (a `Tunn`) right now; the others cost only their
    /// configuration.
    pub fn live_tunnels(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|peer| peer.tunn.is_some())
            .count()
    }

    /// The peers, ordered by public key.
    pub fn peers(&self) -> Vec<PeerView> {
        self.by_key
            .values()
            .filter_map(|id| self.peer(*id))
            .collect()
    }

    /// One peer.
    pub fn peer(&self, id: PeerId) -> Option<PeerView> {
        let peer = self.slots.get(id.0 as usize)?.as_ref()?;
        Some(PeerView {
            public_key: peer.public_key,
            preshared_key: peer.preshared_key,
            endpoint: peer.endpoint.map(|e| e.addr),
            observed_endpoint: peer.observed,
            persistent_keepalive: peer.persistent_keepalive,
            allowed_ips: peer.allowed_ips.iter().copied().collect(),
            accept_ips: peer.accept_ips.iter().copied().collect(),
            since_receive: peer
                .last_receive
                .zip(self.last_tick)
                .map(|(heard, tick)| tick.saturating_duration_since(heard)),
            // During a rotation the retiring sessions count until the new one exists.
            since_handshake: peer
                .tunn
                .as_ref()
                .and_then(|t| t.time_since_last_handshake())
                .or_else(|| {
                    peer.retiring
                        .iter()
                        .filter_map(|r| r.tunn.time_since_last_handshake())
                        .min()
                }),
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
            rx_packets: peer.rx_packets,
            tx_packets: peer.tx_packets,
            handshakes: peer.handshakes,
        })
    }

    /// The slot of the peer with this key.
    pub fn peer_id(&self, key: &PublicKey) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    /// Drop and cookie counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts a packet the shell refused before it reached the device, such as a TUN read
    /// whose offload header is malformed ([`DropReason::BadTunPacket`]).
    pub fn count_drop(&mut self, reason: DropReason) {
        self.counters.drop(reason);
    }
}

/// Which of a peer's `Tunn`s a datagram is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// [`Peer::tunn`].
    Current,
    /// [`Peer::retiring`] at this position.
    Retiring(usize),
}

/// What a received datagram proved about its sender, judged from its message type and
/// from what boringtun's `Tunn::decapsulate` made of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// Nothing: an error, a cookie reply we send (the initiation was not even looked
    /// at: all it needs is our public key), or one we received (which proves only that
    /// someone saw our initiation).
    None,
    /// A handshake completed: an initiation we answer with a response (§5.4.2, the
    /// sender knew the peer's static key and a timestamp newer than any before), or a
    /// response we consumed (§5.4.3).
    Handshake,
    /// A transport message that decrypted under a session key (§5.4.6): data or a
    /// keepalive.
    Data,
}

/// Decides what `datagram` proved from what `Tunn::decapsulate` returned for it
/// (boringtun 0.7.1): an initiation gives a response (type 2) or, under load, a cookie
/// reply (type 3); a response gives the keepalive that confirms the session (type 4)
/// or a cookie reply; a data message gives an inner packet, or `Done` for a keepalive;
/// a cookie reply gives `Done`.
fn proof_of(datagram: &[u8], result: &TunnResult<'_>) -> Proof {
    let sent = |reply: &[u8]| reply.first().copied();
    match (datagram.first().copied(), result) {
        (Some(HANDSHAKE_INIT), TunnResult::WriteToNetwork(reply))
            if sent(reply) == Some(HANDSHAKE_RESPONSE) =>
        {
            Proof::Handshake
        }
        (Some(HANDSHAKE_RESPONSE), TunnResult::WriteToNetwork(reply))
            if sent(reply) == Some(DATA) =>
        {
            Proof::Handshake
        }
        (
            Some(DATA),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) | TunnResult::Done,
        ) => Proof::Data,
        _ => Proof::None,
    }
}

/// Whether a handshake message carries a mac2 (a cookie we gave its source): under load
/// boringtun lets no handshake through without a valid one, and an initiator sends one
/// only for a while after our cookie reply (§5.4.4).
fn carries_cookie(datagram: &[u8]) -> bool {
    matches!(
        datagram.first(),
        Some(&HANDSHAKE_INIT | &HANDSHAKE_RESPONSE)
    ) && datagram
        .len()
        .checked_sub(MAC2_LEN)
        .and_then(|at| datagram.get(at..))
        .is_some_and(|mac2| mac2.iter().any(|b| *b != 0))
}

/// A packet from the TUN device: borrowed, or at the start of a buffer with room after it.
enum Inner<'p> {
    Borrowed(&'p [u8]),
    /// `buf[..len]`; `len <= buf.len()`.
    Roomy(&'p mut [u8], usize),
}

impl<'p> Inner<'p> {
    fn packet(&self) -> &[u8] {
        match self {
            Self::Borrowed(p) => p,
            Self::Roomy(buf, len) => buf.get(..*len).unwrap_or_default(),
        }
    }

    /// The packet zero-padded to a multiple of [`PADDING_MULTIPLE`] but not past `mtu`
    /// (whitepaper §5.4.6; the kernel's `calculate_skb_padding`): in place when the buffer
    /// has room, else copied into `scratch`. A packet over the MTU (an IPv4 packet the
    /// underlay may fragment) is not padded. Receivers cut a packet to its IP length field.
    fn padded(self, mtu: u32, scratch: &'p mut Vec<u8>) -> &'p [u8] {
        let len = self.packet().len();
        let mtu = usize::try_from(mtu).unwrap_or(usize::MAX);
        let target = len.next_multiple_of(PADDING_MULTIPLE).min(mtu.max(len));
        match self {
            Self::Borrowed(packet) if target == len => packet,
            Self::Roomy(buf, _) if target <= buf.len() => {
                let (packet, _) = buf.split_at_mut(target);
                if let Some(pad) = packet.get_mut(len..) {
                    pad.fill(0);
                }
                packet
            }
            other => {
                scratch.clear();
                scratch.extend_from_slice(other.packet());
                scratch.resize(target, 0);
                scratch
            }
        }
    }
}

/// The packet with its source translated for another cluster ([`Translation::outbound`]):
/// in place when it is in a buffer of ours, else copied into `scratch` (with room for the
/// padding) only when it may need a change. `None` when it cannot be translated.
fn translated<'p>(
    translation: &Translation,
    inner: Inner<'p>,
    scratch: &'p mut Vec<u8>,
) -> Option<Inner<'p>> {
    if translation.is_empty() {
        return Some(inner);
    }
    match inner {
        Inner::Roomy(buf, len) => {
            translation.outbound(buf.get_mut(..len)?).ok()?;
            Some(Inner::Roomy(buf, len))
        }
        Inner::Borrowed(packet) if translation.may_rewrite_outbound(packet) => {
            scratch.clear();
            scratch.extend_from_slice(packet);
            translation.outbound(scratch).ok()?;
            let len = scratch.len();
            scratch.resize(len + PADDING_MULTIPLE, 0);
            Some(Inner::Roomy(scratch, len))
        }
        borrowed => Some(borrowed),
    }
}

/// Brings `known` (each endpoint address with how many peers have it) up to date after
/// `peer`'s endpoints changed: O(its endpoints), not O(peers).
fn refresh_sources(known: &mut BTreeMap<IpAddr, u32>, peer: &mut Peer) {
    let mut now: Vec<IpAddr> = peer
        .endpoint
        .map(|e| e.addr)
        .iter()
        .chain(&peer.endpoints)
        .map(SocketAddr::ip)
        .collect();
    now.sort_unstable();
    now.dedup();
    if now == peer.sources {
        return;
    }
    for ip in &peer.sources {
        if let Some(count) = known.get_mut(ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                known.remove(ip);
            }
        }
    }
    for ip in &now {
        *known.entry(*ip).or_insert(0) += 1;
    }
    peer.sources = now;
}

/// A `Tunn` for `peer` at its slot [`Peer::index`]; boringtun puts the slot in the top
/// 24 bits of each session's receiver index, which is how datagrams find their peer.
fn new_tunn(secret: &x25519::StaticSecret, limiter: &Arc<RateLimiter>, peer: &Peer) -> Box<Tunn> {
    let keepalive = (peer.persistent_keepalive != 0).then_some(peer.persistent_keepalive);
    Box::new(Tunn::new(
        secret.clone(),
        x25519::PublicKey::from(*peer.public_key.as_bytes()),
        peer.preshared_key.map(|k| *k.as_bytes()),
        keepalive,
        peer.index,
        Some(Arc::clone(limiter)),
    ))
}

/// Drives the timers of a peer's retiring `Tunn`s (keepalives and rekeys, to its
/// endpoint)
/// and drops them once the current `Tunn` has had a session for [`RETIRE_GRACE`], or
/// when boringtun declares them expired; `freed` gets each dropped one's slot.
fn retiring_timers(
    peer: &mut Peer,
    now: Instant,
    out: &mut [u8],
    send: &mut impl FnMut(Endpoint, &[u8]),
    mut freed: impl FnMut(u32),
) {
    let current = peer.tunn.as_deref().is_some_and(has_session);
    let since = if current {
        *peer.current_since.get_or_insert(now)
    } else {
        peer.current_since = None;
        now
    };
    let done = current && now.saturating_duration_since(since) >= RETIRE_GRACE;
    let endpoint = peer.endpoint;
    let mut sent = Vec::new();
    peer.retiring.retain_mut(|r| {
        if done {
            freed(r.index);
            return false;
        }
        match r.tunn.update_timers(out) {
            TunnResult::WriteToNetwork(datagram) => {
                if let Some(to) = endpoint {
                    sent.push(datagram.len());
                    send(to, datagram);
                }
                true
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                freed(r.index);
                false
            }
            _ => true,
        }
    });
    for len in sent {
        peer.count_tx(len);
    }
    if peer.retiring.is_empty() {
        peer.current_since = None;
    }
}

/// Whether `tunn` encrypts with a session now (boringtun 0.7.1: its current session
/// exists; a responder's session becomes current with the first data packet under it).
fn has_session(tunn: &Tunn) -> bool {
    tunn.time_since_last_handshake().is_some()
}

/// The `Tunn` that encrypts for `peer`: the current one, unless it has no session yet
/// and a retiring one has (a rotation in progress), so that no packet waits for the new
/// handshake. `None` only when the peer has no current `Tunn` and no retiring one with a
/// session.
fn sending_tunn(peer: &mut Peer) -> Option<&mut Tunn> {
    if !peer.retiring.is_empty()
        && peer.tunn.as_deref().is_none_or(|t| !has_session(t))
        && let Some(retiring) = peer.retiring.iter_mut().find(|r| has_session(&r.tunn))
    {
        return Some(&mut retiring.tunn);
    }
    peer.tunn.as_deref_mut()
}

/// The destination address of an IPv4 or IPv6 packet; `None` when it is too short.
fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        Some(6) => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// Each boringtun error is one drop reason.
fn reason_for(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::InvalidPacket
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::WrongPacketType => DropReason::BadPacket,
        WireGuardError::InvalidMac => DropReason::BadMac,
        WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => DropReason::UnknownPeer,
        WireGuardError::InvalidAeadTag => DropReason::BadAuth,
        WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => DropReason::Replay,
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        WireGuardError::UnexpectedPacket
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::ConnectionExpired => DropReason::BadHandshake,
        WireGuardError::DestinationBufferTooSmall | WireGuardError::LockFailed => {
            DropReason::Internal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_ADDR: &str = "198.18.0.1:51820";
    const B_ADDR: &str = "198.18.0.2:51820";

    /// Two devices that know each other: A owns 10.0.1.0/24, B owns 10.0.2.0/24.
    struct Pair {
        a: Device,
        b: Device,
        b_key: PublicKey,
    }

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from([seed; 32])
    }

    fn public(k: &PrivateKey) -> PublicKey {
        PublicKey::from(
            *x25519::PublicKey::from(&x25519::StaticSecret::from(*k.as_bytes())).as_bytes(),
        )
    }

    fn peer(k: PublicKey, endpoint: Option<&str>, ips: &[&str]) -> PeerUpdate {
        let mut p = PeerUpdate::new(k);
        p.endpoint = endpoint.map(|e| e.parse().unwrap());
        p.replace_allowed_ips = true;
        p.allowed_ips = ips.iter().map(|c| c.parse().unwrap()).collect();
        p
    }

    fn update(private: &PrivateKey, peers: Vec<PeerUpdate>) -> DeviceUpdate {
        DeviceUpdate {
            private_key: Some(Some(*private)),
            listen_port: Some(51820),
            fwmark: None,
            replace_peers: true,
            peers,
            previous_key: None,
        }
    }

    fn pair() -> Pair {
        let (ka, kb) = (key(1), key(2));
        let mut a = Device::new();
        let mut b = Device::new();
        let _ = a
            .apply(&update(
                &ka,
                vec![peer(public(&kb), Some(B_ADDR), &["10.0.2.0/24"])],
            ))
            .unwrap();
        let _ = b
            .apply(&update(
                &kb,
                vec![peer(public(&ka), None, &["10.0.1.0/24"])],
            ))
            .unwrap();
        Pair {
            a,
            b,
            b_key: public(&kb),
        }
    }

    /// A minimal IPv4 packet (UDP, no checksum) from `src` to `dst` with `payload`.
    fn ipv4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let src: std::net::Ipv4Addr = src.parse().unwrap();
        let dst: std::net::Ipv4Addr = dst.parse().unwrap();
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    /// Delivers `datagram` from `from` to `dev`; returns what it wrote to its TUN
    /// device and the datagrams it sent back (replies and flushed queue).
    fn deliver(
        dev: &mut Device,
        from: &str,
        datagram: &[u8],
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Option<DropReason>) {
        deliver_on(dev, from, None, datagram)
    }

    /// [`deliver`], the datagram having arrived on our address `local`.
    fn deliver_on(
        dev: &mut Device,
        from: &str,
        local: Option<&str>,
        datagram: &[u8],
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Option<DropReason>) {
        let mut out = vec![0u8; 65_536];
        let mut tun = Vec::new();
        let mut net = Vec::new();
        let mut dropped = None;
        let from = Endpoint::new(from.parse().unwrap(), local.map(|l| l.parse().unwrap()));
        let flush = match dev.handle_datagram(from, datagram, &mut out) {
            DatagramVerdict::Tunnel { packet, .. } => {
                tun.push(packet.to_vec());
                None
            }
            DatagramVerdict::Reply { peer, datagram, .. } => {
                net.push(datagram.to_vec());
                peer
            }
            DatagramVerdict::Done => None,
            DatagramVerdict::Drop(r) => {
                dropped = Some(r);
                None
            }
        };
        if let Some(peer) = flush {
            while let Some((_, d)) = dev.poll_queued(peer, &mut out) {
                net.push(d.to_vec());
            }
        }
        (tun, net, dropped)
    }

    fn send(dev: &mut Device, packet: &[u8]) -> Result<Vec<u8>, Option<DropReason>> {
        let mut out = vec![0u8; 65_536];
        match dev.handle_tun_packet(packet, &mut out) {
            TunVerdict::Send { datagram, .. } => Ok(datagram.to_vec()),
            TunVerdict::Queued => Err(None),
            TunVerdict::Drop(r) => Err(Some(r)),
        }
    }

    #[test]
    fn noise_state_is_created_on_first_use() {
        let mut p = pair();
        // Configured, nothing sent: neither side pays for a Tunn.
        assert_eq!((p.a.live_tunnels(), p.b.live_tunnels()), (0, 0));
        // 1,000 more peers on A, none with keepalive: still none.
        let mut u = update(&key(1), Vec::new());
        u.replace_peers = false;
        u.peers = (0..1000u32)
            .map(|i| {
                let mut seed = [7u8; 32];
                seed[..4].copy_from_slice(&i.to_be_bytes());
                peer(public(&PrivateKey::from(seed)), Some(B_ADDR), &[])
            })
            .collect();
        let _ = p.a.apply(&u).unwrap();
        assert_eq!(p.a.live_tunnels(), 0);
        // A packet for B creates A's, B's initiation handler creates B's.
        let data = establish(&mut p);
        assert!(!data.is_empty());
        assert_eq!((p.a.live_tunnels(), p.b.live_tunnels()), (1, 1));
        // A data packet for a peer without state is refused, not turned into state.
        let mut c = Device::new();
        let _ = c
            .apply(&update(
                &key(2),
                vec![peer(public(&key(1)), None, &["10.0.1.0/24"])],
            ))
            .unwrap();
        let (tun, _, dropped) = deliver(&mut c, A_ADDR, &data);
        assert!(tun.is_empty());
        assert_eq!(dropped, Some(DropReason::UnknownPeer));
        assert_eq!(c.live_tunnels(), 0);
        // A peer with persistent keepalive initiates by itself, so it gets one at once.
        let mut k = peer(public(&key(9)), Some(B_ADDR), &[]);
        k.persistent_keepalive = Some(25);
        let mut u = update(&key(1), vec![k]);
        u.replace_peers = false;
        let _ = p.a.apply(&u).unwrap();
        assert_eq!(p.a.live_tunnels(), 2);
    }

    #[test]
    fn a_keepalive_peer_initiates_at_the_next_tick() {
        let mut p = pair();
        let mut k = peer(p.b_key, Some(B_ADDR), &["10.0.2.0/24"]);
        k.persistent_keepalive = Some(25);
        let mut u = update(&key(1), vec![k]);
        u.replace_peers = false;
        let _ = p.a.apply(&u).unwrap();
        let mut out = vec![0u8; 2048];
        let mut sent = Vec::new();
        p.a.update_timers(Instant::now(), &mut out, |to, d| {
            sent.push((to, d.to_vec()))
        });
        assert_eq!(sent.len(), 1, "one initiation at once");
        let (to, init) = &sent[0];
        assert_eq!(to.to_string(), B_ADDR);
        assert_eq!((init.len(), init[0]), (148, 1));
        // B answers it; no second initiation on the next tick.
        let (_, replies, dropped) = deliver(&mut p.b, A_ADDR, init);
        assert_eq!((replies.len(), dropped), (1, None));
        let (_, _, dropped) = deliver(&mut p.a, B_ADDR, &replies[0]);
        assert_eq!(dropped, None);
        sent.clear();
        p.a.update_timers(Instant::now(), &mut out, |to, d| {
            sent.push((to, d.to_vec()))
        });
        assert!(sent.iter().all(|(_, d)| d[0] != 1), "{sent:?}");
    }

    /// A sends one packet to B, completing the handshake; returns the data datagram
    /// B received.
    fn establish(p: &mut Pair) -> Vec<u8> {
        establish_keeping_init(p).1
    }

    /// [`establish`], also returning A's handshake initiation.
    fn establish_keeping_init(p: &mut Pair) -> (Vec<u8>, Vec<u8>) {
        let packet = ipv4("10.0.1.5", "10.0.2.7", b"hello");
        let init = send(&mut p.a, &packet).unwrap();
        assert_eq!(init[0], 1, "first datagram is a handshake initiation");
        let (tun, replies, dropped) = deliver(&mut p.b, A_ADDR, &init);
        assert!(tun.is_empty() && dropped.is_none());
        assert_eq!(replies.len(), 1);
        let (tun, data, dropped) = deliver(&mut p.a, B_ADDR, &replies[0]);
        assert!(tun.is_empty() && dropped.is_none(), "{dropped:?}");
        // A keepalive confirms the session (whitepaper §5.4.3), then the queued packet.
        assert_eq!(data.len(), 2, "keepalive and the queued packet");
        let mut received = Vec::new();
        for datagram in &data {
            let (tun, _, dropped) = deliver(&mut p.b, A_ADDR, datagram);
            assert_eq!(dropped, None);
            received.extend(tun);
        }
        assert_eq!(received, vec![packet]);
        (init, data[1].clone())
    }

    #[test]
    fn clusters_with_the_same_pod_cidr_talk_through_their_mesh_cidrs() {
        use crate::translate::Translation;
        let table = |mesh: &str| {
            Translation::new(&[("10.244.0.0/16".parse().unwrap(), mesh.parse().unwrap())]).unwrap()
        };
        let (ka, kb) = (key(1), key(2));
        let mut p = Pair {
            a: Device::new(),
            b: Device::new(),
            b_key: public(&kb),
        };
        let _ =
            p.a.apply(&update(
                &ka,
                vec![peer(public(&kb), Some(B_ADDR), &["100.65.0.0/16"])],
            ))
            .unwrap();
        let _ =
            p.b.apply(&update(
                &kb,
                vec![peer(public(&ka), None, &["100.64.0.0/16"])],
            ))
            .unwrap();
        p.a.set_translation(table("100.64.0.0/16"));
        p.b.set_translation(table("100.65.0.0/16"));
        let sent = ipv4("10.244.1.2", "100.65.1.2", b"hello");
        let init = send(&mut p.a, &sent).unwrap();
        let (_, replies, _) = deliver(&mut p.b, A_ADDR, &init);
        let (_, data, _) = deliver(&mut p.a, B_ADDR, &replies[0]);
        let (tun, _, dropped) = deliver(&mut p.b, A_ADDR, &data[1]);
        assert_eq!(dropped, None);
        // B's pod sees A's mesh address as the source; the checksum follows.
        let mut expected = sent.clone();
        table("100.64.0.0/16").outbound(&mut expected).unwrap();
        table("100.65.0.0/16").inbound(&mut expected).unwrap();
        assert_eq!(tun, vec![expected.clone()]);
        assert_eq!(
            (&expected[12..16], &expected[16..20]),
            (&[100, 64, 1, 2][..], &[10, 244, 1, 2][..])
        );
        // B's pod answers A's pod at its mesh address.
        let reply = ipv4("10.244.1.2", "100.64.1.2", b"world");
        let datagram = send(&mut p.b, &reply).unwrap();
        let (tun, _, _) = deliver(&mut p.a, B_ADDR, &datagram);
        assert_eq!(tun.len(), 1);
        assert_eq!(
            (&tun[0][12..16], &tun[0][16..20]),
            (&[100, 65, 1, 2][..], &[10, 244, 1, 2][..])
        );
        // A packet from B's side that claims an untranslated source is refused.
        p.b.set_translation(Translation::default());
        let datagram = send(&mut p.b, &ipv4("10.244.1.2", "100.64.1.2", b"spoof")).unwrap();
        let (tun, _, dropped) = deliver(&mut p.a, B_ADDR, &datagram);
        assert_eq!((tun.len(), dropped), (0, Some(DropReason::BadSource)));
        // A malformed packet that needs translating is dropped and counted.
        let mut bad = ipv4("10.244.1.2", "100.65.1.2", b"x");
        bad[0] = 0x4f;
        assert_eq!(send(&mut p.a, &bad), Err(Some(DropReason::Untranslatable)));
        assert_eq!(p.a.counters().drops(DropReason::Untranslatable), 1);
    }

    #[test]
    fn handshake_then_data_both_ways() {
        let mut p = pair();
        establish(&mut p);
        // B learnt A's endpoint from the authenticated initiation (roaming).
        let reply = ipv4("10.0.2.7", "10.0.1.5", b"world");
        let datagram = send(&mut p.b, &reply).unwrap();
        let (tun, _, _) = deliver(&mut p.a, B_ADDR, &datagram);
        assert_eq!(tun, vec![reply]);
        let view = p.a.peer(p.a.peer_id(&p.b_key).unwrap()).unwrap();
        assert!(view.since_handshake.is_some());
        assert!(view.rx_bytes > 0 && view.tx_bytes > 0);
        // A sent the initiation, the keepalive and the queued packet; it received the
        // response and B's reply.
        assert_eq!((view.tx_packets, view.rx_packets), (3, 2));
        assert_eq!(view.handshakes, 1);
    }

    #[test]
    fn spoofed_inner_source_is_dropped_and_counted() {
        let mut p = pair();
        establish(&mut p);
        // B may only send from 10.0.2.0/24.
        let spoofed = ipv4("10.0.9.9", "10.0.1.5", b"spoof");
        let datagram = {
            // B has no route for 10.0.1.5's reply... it does: A is allowed 10.0.1.0/24.
            send(&mut p.b, &spoofed).unwrap()
        };
        let (tun, _, dropped) = deliver(&mut p.a, B_ADDR, &datagram);
        assert!(tun.is_empty());
        assert_eq!(dropped, Some(DropReason::BadSource));
        assert_eq!(p.a.counters().drops(DropReason::BadSource), 1);
    }

    #[test]
    fn a_peer_reaches_only_the_clusters_own_ranges_or_another_peer() {
        let mut p = pair();
        establish(&mut p);
        // A also holds peer C (10.0.3.0/24), for which it may pass packets on.
        let more = |peers| DeviceUpdate {
            private_key: None,
            listen_port: None,
            fwmark: None,
            replace_peers: false,
            peers,
            previous_key: None,
        };
        let _ =
            p.a.apply(&more(vec![peer(
                public(&key(3)),
                Some("198.18.0.3:51820"),
                &["10.0.3.0/24"],
            )]))
            .unwrap();
        // B, compromised, routes anything to A.
        let _ =
            p.b.apply(&more(vec![peer(
                public(&key(1)),
                None,
                &[
                    "10.0.1.0/24",
                    "10.0.3.0/24",
                    "169.254.169.254/32",
                    "198.18.0.0/15",
                    "10.0.2.8/32",
                ],
            )]))
            .unwrap();
        let through = |p: &mut Pair, dst: &str| {
            let datagram = send(&mut p.b, &ipv4("10.0.2.7", dst, b"x")).unwrap();
            let (tun, _, dropped) = deliver(&mut p.a, B_ADDR, &datagram);
            (tun.len(), dropped)
        };
        // With no own ranges (standalone, hosts), WireGuard as usual: the OS routes it.
        assert_eq!(through(&mut p, "169.254.169.254"), (1, None));
        p.a.set_translation(
            Translation::default().with_own_ranges(vec!["10.0.1.0/24".parse().unwrap()]),
        );
        assert_eq!(through(&mut p, "10.0.1.5"), (1, None));
        assert_eq!(through(&mut p, "10.0.3.9"), (1, None), "on to peer C");
        for dst in ["169.254.169.254", "198.18.0.1", "10.0.2.8"] {
            assert_eq!(
                through(&mut p, dst),
                (0, Some(DropReason::BadDestination)),
                "{dst}"
            );
        }
        assert_eq!(p.a.counters().drops(DropReason::BadDestination), 3);
        // To one of the cluster's own addresses, but carrying another tunnel's packet that
        // a node running that tunnel would unwrap: IP-in-IP, or VXLAN on flannel's port.
        let mut ipip = ipv4("10.0.2.7", "10.0.1.1", &[0x45; 20]);
        ipip[9] = 4;
        let mut vxlan = ipv4("10.0.2.7", "10.0.1.1", &[0; 16]);
        vxlan[22..24].copy_from_slice(&8472u16.to_be_bytes());
        for packet in [ipip, vxlan] {
            let datagram = send(&mut p.b, &packet).unwrap();
            let (tun, _, dropped) = deliver(&mut p.a, B_ADDR, &datagram);
            assert_eq!((tun.len(), dropped), (0, Some(DropReason::Encapsulated)));
        }
        assert_eq!(p.a.counters().drops(DropReason::Encapsulated), 2);
        // A host passes nothing on to another peer.
        let own = vec!["10.0.1.0/24".parse().unwrap()];
        p.a.set_translation(
            Translation::default()
                .with_own_ranges(own)
                .without_passing_on(),
        );
        assert_eq!(through(&mut p, "10.0.1.5"), (1, None));
        assert_eq!(
            through(&mut p, "10.0.3.9"),
            (0, Some(DropReason::BadDestination)),
            "a host is no relay"
        );
    }

    #[test]
    fn an_unanswered_handshake_moves_on_to_the_next_endpoint() {
        let mut p = pair();
        let dead: SocketAddr = "198.18.77.2:51820".parse().unwrap();
        let live: SocketAddr = B_ADDR.parse().unwrap();
        let mut u = peer(p.b_key, Some("198.18.77.2:51820"), &["10.0.2.0/24"]);
        u.endpoints = Some(vec![dead, live]);
        let mut u = update(&key(1), vec![u]);
        u.replace_peers = false;
        u.private_key = None;
        let _ = p.a.apply(&u).unwrap();
        let id = p.a.peer_id(&p.b_key).unwrap();
        assert_eq!(
            p.a.peer(id).unwrap().endpoint,
            Some(dead),
            "most preferred first"
        );
        // A packet starts a handshake towards the dead endpoint; nothing answers.
        let init = send(&mut p.a, &ipv4("10.0.1.5", "10.0.2.7", b"x")).unwrap();
        assert_eq!(init[0], HANDSHAKE_INIT);
        // boringtun retries after REKEY_TIMEOUT (5 s): the retry goes to the next one.
        let mut out = vec![0u8; 2048];
        let mut sent = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(8);
        while sent.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            p.a.update_timers(Instant::now(), &mut out, |to, d| {
                sent.push((to, d.to_vec()))
            });
        }
        let (to, retry) = sent.first().expect("a handshake retry within 8 s");
        assert_eq!((to.addr, retry[0]), (live, HANDSHAKE_INIT));
        // B answers there: the endpoint stays.
        let (_, replies, dropped) = deliver(&mut p.b, A_ADDR, retry);
        assert_eq!((replies.len(), dropped), (1, None));
        let (_, _, dropped) = deliver(&mut p.a, B_ADDR, &replies[0]);
        assert_eq!(dropped, None);
        assert_eq!(p.a.peer(id).unwrap().endpoint, Some(live));
    }

    #[test]
    fn accept_ips_admit_sources_without_routing_to_the_peer() {
        let mut p = pair();
        establish(&mut p);
        let mut u = peer(p.b_key, None, &[]);
        u.replace_allowed_ips = false;
        u.accept_ips = Some(vec!["10.0.9.0/24".parse().unwrap()]);
        let mut u = update(&key(1), vec![u]);
        u.replace_peers = false;
        u.private_key = None;
        let _ = p.a.apply(&u).unwrap();
        // B may now send from 10.0.9.0/24 as well as 10.0.2.0/24 ...
        let from_group = ipv4("10.0.9.9", "10.0.1.5", b"group");
        let datagram = send(&mut p.b, &from_group).unwrap();
        let (tun, _, dropped) = deliver(&mut p.a, B_ADDR, &datagram);
        assert_eq!((tun, dropped), (vec![from_group], None));
        // ... but nothing is routed to it there, and other sources are still refused.
        assert_eq!(
            send(&mut p.a, &ipv4("10.0.1.5", "10.0.9.9", b"x")),
            Err(Some(DropReason::NoRoute))
        );
        assert!(!p.a.routes().iter().any(|c| c.to_string() == "10.0.9.0/24"));
        let spoofed = send(&mut p.b, &ipv4("10.0.8.8", "10.0.1.5", b"x")).unwrap();
        let (_, _, dropped) = deliver(&mut p.a, B_ADDR, &spoofed);
        assert_eq!(dropped, Some(DropReason::BadSource));
        let view = p.a.peer(p.a.peer_id(&p.b_key).unwrap()).unwrap();
        assert_eq!(view.accept_ips, vec!["10.0.9.0/24".parse().unwrap()]);
    }

    #[test]
    fn since_receive_is_stamped_at_the_tick_after_a_datagram() {
        let mut p = pair();
        let id = p.a.peer_id(&p.b_key).unwrap();
        let mut out = vec![0u8; 2048];
        let t0 = Instant::now();
        p.a.update_timers(t0, &mut out, |_, _| {});
        assert_eq!(p.a.peer(id).unwrap().since_receive, None);
        establish(&mut p);
        // Stamped at the next tick; measured against the latest tick, not a clock.
        p.a.update_timers(t0 + Duration::from_secs(1), &mut out, |_, _| {});
        assert_eq!(p.a.peer(id).unwrap().since_receive, Some(Duration::ZERO));
        p.a.update_timers(t0 + Duration::from_secs(4), &mut out, |_, _| {});
        assert_eq!(
            p.a.peer(id).unwrap().since_receive,
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn garbage_truncated_and_replayed_datagrams_are_counted() {
        let mut p = pair();
        let data = establish(&mut p);
        let (_, _, d) = deliver(&mut p.b, A_ADDR, b"\xff\xff garbage");
        assert_eq!(d, Some(DropReason::BadPacket));
        let (_, _, d) = deliver(&mut p.b, A_ADDR, &data[..20]);
        assert!(d.is_some());
        let (_, _, d) = deliver(&mut p.b, A_ADDR, &data);
        assert_eq!(d, Some(DropReason::Replay));
        let mut tampered = send(&mut p.a, &ipv4("10.0.1.5", "10.0.2.7", b"fresh")).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let (_, _, d) = deliver(&mut p.b, A_ADDR, &tampered);
        assert_eq!(d, Some(DropReason::BadAuth));
        assert_eq!(p.b.counters().drops(DropReason::Replay), 1);
        // The tunnel still works.
        let packet = ipv4("10.0.1.5", "10.0.2.7", b"still here");
        let datagram = send(&mut p.a, &packet).unwrap();
        let (tun, _, _) = deliver(&mut p.b, A_ADDR, &datagram);
        assert_eq!(tun, vec![packet]);
    }

    #[test]
    fn endpoint_follows_last_authenticated_source() {
        let mut p = pair();
        establish(&mut p);
        let packet = ipv4("10.0.1.5", "10.0.2.7", b"from elsewhere");
        let datagram = send(&mut p.a, &packet).unwrap();
        let a_key = p.b.peers()[0].public_key;
        let _ = deliver(&mut p.b, "198.18.5.5:40000", &datagram);
        let id = p.b.peer_id(&a_key).unwrap();
        assert_eq!(
            p.b.peer(id).unwrap().endpoint,
            Some("198.18.5.5:40000".parse().unwrap())
        );
        // An unauthenticated datagram from yet another address does not move it.
        let _ = deliver(&mut p.b, "198.18.6.6:1", &datagram);
        assert_eq!(
            p.b.peer(id).unwrap().endpoint,
            Some("198.18.5.5:40000".parse().unwrap())
        );
    }

    #[test]
    fn a_tunn_keeps_its_sessions_out_of_line() {
        // third_party/boringtun boxes the ring of eight sessions (1.4 KiB each): inline,
        // 10,000 peers with live sessions cost 130 MiB (issue 15).
        let size = size_of::<Tunn>();
        assert!(size < 2048, "a Tunn is {size} bytes");
    }

    #[test]
    fn known_sources_follow_every_endpoint_change() {
        let mut p = pair();
        let check = |dev: &Device, what: &str| {
            let naive: BTreeMap<IpAddr, u32> =
                dev.slots
                    .iter()
                    .flatten()
                    .fold(BTreeMap::new(), |mut m, peer| {
                        let ips: BTreeSet<IpAddr> = peer
                            .endpoint
                            .map(|e| e.addr)
                            .iter()
                            .chain(&peer.endpoints)
                            .map(SocketAddr::ip)
                            .collect();
                        for ip in ips {
                            *m.entry(ip).or_insert(0) += 1;
                        }
                        m
                    });
            assert_eq!(dev.known_sources, naive, "{what}");
        };
        check(&p.a, "configured");
        check(&p.b, "no endpoint yet");
        // Two more peers share an address; one publishes a list.
        let mut listed = peer(public(&key(3)), None, &["10.0.3.0/24"]);
        listed.endpoints = Some(vec![
            "198.18.7.7:1".parse().unwrap(),
            "198.18.0.2:9".parse().unwrap(),
        ]);
        let mut u = update(
            &key(1),
            vec![
                peer(public(&key(2)), Some(B_ADDR), &["10.0.2.0/24"]),
                listed,
                peer(public(&key(4)), Some("198.18.7.7:2"), &["10.0.4.0/24"]),
            ],
        );
        u.replace_peers = false;
        let _ = p.a.apply(&u).unwrap();
        check(&p.a, "added");
        // Roaming: B hears A from elsewhere.
        establish(&mut p);
        let datagram = send(&mut p.a, &ipv4("10.0.1.5", "10.0.2.7", b"x")).unwrap();
        let _ = deliver(&mut p.b, "198.18.5.5:40000", &datagram);
        assert!(
            p.b.known_sources
                .contains_key(&"198.18.5.5".parse().unwrap())
        );
        check(&p.b, "roamed");
        // A configured endpoint moves; a peer goes; all go.
        let mut moved = peer(public(&key(4)), Some("198.18.8.8:2"), &["10.0.4.0/24"]);
        moved.replace_allowed_ips = false;
        let mut gone = PeerUpdate::new(public(&key(3)));
        gone.remove = true;
        let mut u = update(&key(1), vec![moved, gone]);
        u.replace_peers = false;
        let _ = p.a.apply(&u).unwrap();
        check(&p.a, "moved and removed");
        assert!(
            !p.a.known_sources
                .contains_key(&"198.18.7.7".parse().unwrap())
        );
        let _ = p.a.apply(&update(&key(1), Vec::new())).unwrap();
        check(&p.a, "replaced by none");
        assert!(p.a.known_sources.is_empty());
    }

    #[test]
    fn replies_leave_from_the_address_the_peer_last_reached_us_on() {
        let mut p = pair();
        let a_key = public(&key(1));
        let id = p.b.peer_id(&a_key).unwrap();
        let from_b = |p: &mut Pair| {
            let mut out = vec![0u8; 2048];
            match p
                .b
                .handle_tun_packet(&ipv4("10.0.2.7", "10.0.1.5", b"to A"), &mut out)
            {
                TunVerdict::Send { to, .. } => to,
                other => panic!("{other:?}"),
            }
        };
        let first: IpAddr = "198.18.0.2".parse().unwrap();
        let second: IpAddr = "198.18.0.3".parse().unwrap();
        // A's initiation arrives on B's first address: the response leaves from it.
        let init = send(&mut p.a, &ipv4("10.0.1.5", "10.0.2.7", b"x")).unwrap();
        let mut out = vec![0u8; 2048];
        let from = Endpoint::new(A_ADDR.parse().unwrap(), Some(first));
        let response = match p.b.handle_datagram(from, &init, &mut out) {
            DatagramVerdict::Reply { to, datagram, .. } => {
                assert_eq!(to, from);
                datagram.to_vec()
            }
            other => panic!("{other:?}"),
        };
        let (_, data, _) = deliver(&mut p.a, B_ADDR, &response);
        for datagram in &data {
            let (_, _, dropped) = deliver_on(&mut p.b, A_ADDR, Some("198.18.0.2"), datagram);
            assert_eq!(dropped, None);
        }
        assert_eq!(from_b(&mut p), from);
        // A now sends to B's second address: B follows.
        let data = send(&mut p.a, &ipv4("10.0.1.5", "10.0.2.7", b"y")).unwrap();
        let (tun, _, _) = deliver_on(&mut p.b, A_ADDR, Some("198.18.0.3"), &data);
        assert_eq!(tun.len(), 1);
        let sticky = Endpoint::new(A_ADDR.parse().unwrap(), Some(second));
        assert_eq!(from_b(&mut p), sticky);
        assert_eq!(p.b.endpoint(id), Some(sticky));
        // What proves nothing (a replay, here on the first address) moves nothing.
        let (tun, _, dropped) = deliver_on(&mut p.b, A_ADDR, Some("198.18.0.2"), &data);
        assert_eq!((tun.len(), dropped), (0, Some(DropReason::Replay)));
        assert_eq!(from_b(&mut p), sticky);
        // The address is gone: the kernel chooses again, the peer's address stays.
        assert_eq!(p.b.forget_local(first), 0);
        assert_eq!(p.b.forget_local(second), 1);
        assert_eq!(from_b(&mut p), Endpoint::from(sticky.addr));
        // A configured endpoint has no local address.
        let _ = deliver_on(
            &mut p.b,
            A_ADDR,
            Some("198.18.0.3"),
            &send(&mut p.a, &ipv4("10.0.1.5", "10.0.2.7", b"z")).unwrap(),
        );
        let mut u = update(&key(2), vec![peer(a_key, Some(A_ADDR), &["10.0.1.0/24"])]);
        u.replace_peers = false;
        let _ = p.b.apply(&u).unwrap();
        assert_eq!(p.b.endpoint(id), Some(Endpoint::from(sticky.addr)));
    }

    #[test]
    fn only_completed_handshakes_and_decrypted_messages_prove_the_peer() {
        let check = |datagram: &[u8], result: TunnResult<'_>, proof: Proof| {
            assert_eq!(
                proof_of(datagram, &result),
                proof,
                "{datagram:?} {result:?}"
            );
        };
        let (init, response, cookie, data) = ([1u8, 0, 0, 0], [2u8, 0, 0, 0], [3u8; 4], [4u8; 4]);
        let sent = |first: u8| vec![first, 0, 0, 0];
        check(
            &init,
            TunnResult::WriteToNetwork(&mut sent(2)),
            Proof::Handshake,
        );
        check(&init, TunnResult::WriteToNetwork(&mut sent(3)), Proof::None);
        check(
            &init,
            TunnResult::Err(WireGuardError::WrongTai64nTimestamp),
            Proof::None,
        );
        check(
            &init,
            TunnResult::Err(WireGuardError::UnderLoad),
            Proof::None,
        );
        check(
            &response,
            TunnResult::WriteToNetwork(&mut sent(4)),
            Proof::Handshake,
        );
        check(
            &response,
            TunnResult::WriteToNetwork(&mut sent(3)),
            Proof::None,
        );
        check(&response, TunnResult::Done, Proof::None);
        let mut inner = ipv4("10.0.2.7", "10.0.1.5", b"x");
        let src = [10, 0, 2, 7].into();
        check(
            &data,
            TunnResult::WriteToTunnelV4(&mut inner, src),
            Proof::Data,
        );
        check(&data, TunnResult::Done, Proof::Data);
        check(&data, TunnResult::WriteToNetwork(&mut sent(3)), Proof::None);
        check(
            &data,
            TunnResult::Err(WireGuardError::InvalidAeadTag),
            Proof::None,
        );
        check(&cookie, TunnResult::Done, Proof::None);
        check(&[], TunnResult::Done, Proof::None);
        check(&[9, 0, 0, 0], TunnResult::Done, Proof::None);
    }

    #[test]
    fn an_initiation_answered_with_a_cookie_steers_nothing() {
        // boringtun's limiter counts each handshake twice here (the device's check, then
        // the Tunn's); depending on the count, the one that trips it is the device's or
        // the Tunn's. Three paddings put the replay at each position once.
        for padding in 0..3 {
            let mut p = pair();
            let (init, _) = establish_keeping_init(&mut p);
            let id = p.b.peer_id(&public(&key(1))).unwrap();
            let mut out = vec![0u8; 2048];
            let t0 = Instant::now();
            p.b.update_timers(t0, &mut out, |_, _| {});
            let before = p.b.peer(id).unwrap();
            // Valid mac1 (it needs only B's public key), a static key B does not know.
            let mut stranger = stranger_to(&p.b);
            let unknown = initiation(&mut stranger);
            for _ in 0..padding {
                let _ = deliver(&mut p.b, ATTACKER, &unknown);
            }
            // A's initiation, replayed from elsewhere: it names A and its MACs verify.
            for _ in 0..150 {
                let (tun, _, dropped) = deliver(&mut p.b, ATTACKER, &init);
                assert!(tun.is_empty() && dropped != Some(DropReason::Internal));
                let _ = deliver(&mut p.b, ATTACKER, &unknown);
            }
            assert!(p.b.counters().cookies_sent > 0, "B is under load");
            p.b.update_timers(t0 + Duration::from_secs(1), &mut out, |_, _| {});
            let after = p.b.peer(id).unwrap();
            let a_addr = Some(A_ADDR.parse().unwrap());
            assert_eq!((after.endpoint, after.observed_endpoint), (a_addr, a_addr));
            assert_eq!(
                (after.rx_packets, after.rx_bytes, after.handshakes),
                (before.rx_packets, before.rx_bytes, before.handshakes),
                "padding {padding}"
            );
            assert_eq!(
                after.since_receive,
                Some(Duration::from_secs(1)),
                "not heard"
            );
            // The session still carries A's packets, and B's go to A.
            let packet = ipv4("10.0.1.5", "10.0.2.7", b"still A");
            let datagram = send(&mut p.a, &packet).unwrap();
            assert_eq!(deliver(&mut p.b, A_ADDR, &datagram).0, vec![packet]);
            let mut out = vec![0u8; 2048];
            match p
                .b
                .handle_tun_packet(&ipv4("10.0.2.7", "10.0.1.5", b"to A"), &mut out)
            {
                TunVerdict::Send { to, .. } => assert_eq!(Some(to.addr), a_addr),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_completed_handshake_from_a_new_address_roams_even_under_load() {
        let mut p = pair();
        let mut out = vec![0u8; 2048];
        p.b.update_timers(Instant::now(), &mut out, |_, _| {});
        load(&mut p.b);
        let id = p.b.peer_id(&public(&key(1))).unwrap();
        // A (its key, from a new address) is asked for a cookie: nothing moves yet.
        let moved = "198.18.5.5:40000";
        let mut a = Tunn::new(
            x25519::StaticSecret::from(*key(1).as_bytes()),
            x25519::PublicKey::from(*p.b.public_key().unwrap().as_bytes()),
            None,
            None,
            0x77,
            None,
        );
        let (_, replies, _) = deliver(&mut p.b, moved, &initiation(&mut a));
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0][0], COOKIE_REPLY);
        let view = p.b.peer(id).unwrap();
        assert_eq!(
            (view.endpoint, view.observed_endpoint, view.rx_packets),
            (None, None, 0)
        );
        // With the cookie, the handshake completes there, and B's endpoint follows.
        assert!(matches!(
            a.decapsulate(None, &replies[0], &mut out),
            TunnResult::Done
        ));
        let (_, replies, dropped) = deliver(&mut p.b, moved, &initiation(&mut a));
        assert_eq!((replies.len(), dropped), (1, None));
        assert_eq!(replies[0][0], HANDSHAKE_RESPONSE);
        let view = p.b.peer(id).unwrap();
        let moved = Some(moved.parse().unwrap());
        assert_eq!((view.endpoint, view.observed_endpoint), (moved, moved));
        assert_eq!((view.rx_packets, view.handshakes), (1, 1));
    }

    #[test]
    fn a_source_that_answers_cookies_gets_only_its_share_of_handshakes() {
        let mut p = pair();
        let mut out = vec![0u8; 2048];
        let t0 = Instant::now();
        p.b.update_timers(t0, &mut out, |_, _| {});
        load(&mut p.b);
        let mut stranger = stranger_to(&p.b);
        let (_, replies, _) = deliver(&mut p.b, ATTACKER, &initiation(&mut stranger));
        assert_eq!(replies[0][0], COOKIE_REPLY);
        assert!(matches!(
            stranger.decapsulate(None, &replies[0], &mut out),
            TunnResult::Done
        ));
        // Each initiation now carries a valid mac2 and costs B a Diffie-Hellman ...
        for i in 0..crate::handshake_limiter::PACKETS_BURST {
            let (_, _, dropped) = deliver(&mut p.b, ATTACKER, &initiation(&mut stranger));
            assert_eq!(dropped, Some(DropReason::UnknownPeer), "initiation {i}");
        }
        // ... until the source has had its share for now.
        let (_, _, dropped) = deliver(&mut p.b, ATTACKER, &initiation(&mut stranger));
        assert_eq!(dropped, Some(DropReason::RateLimited));
        assert_eq!(p.b.counters().drops(DropReason::RateLimited), 1);
        // Other sources are not held back; and this one gets more as time passes.
        let mut other = stranger_to(&p.b);
        let (_, replies, _) = deliver(&mut p.b, "198.18.66.7:1", &initiation(&mut other));
        assert_eq!(replies[0][0], COOKIE_REPLY);
        p.b.update_timers(t0 + Duration::from_secs(1), &mut out, |_, _| {});
        let (_, _, dropped) = deliver(&mut p.b, ATTACKER, &initiation(&mut stranger));
        assert_eq!(dropped, Some(DropReason::UnknownPeer));
    }

    #[test]
    fn a_known_peer_is_answered_after_a_flood_from_many_sources() {
        // A knows B at B_ADDR. Strangers that answer cookies, from more sources than the
        // budget of all sources allows, flood A.
        let mut p = pair();
        let mut out = vec![0u8; 2048];
        let t0 = Instant::now();
        p.a.update_timers(t0, &mut out, |_, _| {});
        load(&mut p.a);
        let mut stranger = stranger_to(&p.a);
        let budget = crate::handshake_limiter::MAX_HANDSHAKES_PER_SECOND;
        let mut limited = 0;
        for i in 0..budget + 100 {
            let from = format!("198.19.{}.{}:1", i / 250, i % 250 + 1);
            // Asked for a cookie for this address (no mac2, or one for another address).
            let (_, replies, _) = deliver(&mut p.a, &from, &initiation(&mut stranger));
            assert_eq!(replies[0][0], COOKIE_REPLY);
            assert!(matches!(
                stranger.decapsulate(None, &replies[0], &mut out),
                TunnResult::Done
            ));
            let (_, _, dropped) = deliver(&mut p.a, &from, &initiation(&mut stranger));
            limited += u32::from(dropped == Some(DropReason::RateLimited));
        }
        assert_eq!(limited, 100, "the budget of all sources is spent");
        // B, from its endpoint, gets a cookie, then its handshake is answered.
        let mut b = Tunn::new(
            x25519::StaticSecret::from(*key(2).as_bytes()),
            x25519::PublicKey::from(*p.a.public_key().unwrap().as_bytes()),
            None,
            None,
            0x42,
            None,
        );
        let (_, replies, _) = deliver(&mut p.a, B_ADDR, &initiation(&mut b));
        assert_eq!(replies[0][0], COOKIE_REPLY);
        assert!(matches!(
            b.decapsulate(None, &replies[0], &mut out),
            TunnResult::Done
        ));
        let (_, replies, dropped) = deliver(&mut p.a, B_ADDR, &initiation(&mut b));
        assert_eq!(dropped, None);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0][0], HANDSHAKE_RESPONSE);
        // A stranger from another address still is not.
        let from = "198.19.200.1:1";
        let (_, replies, _) = deliver(&mut p.a, from, &initiation(&mut stranger));
        assert!(matches!(
            stranger.decapsulate(None, &replies[0], &mut out),
            TunnResult::Done
        ));
        let (_, _, dropped) = deliver(&mut p.a, from, &initiation(&mut stranger));
        assert_eq!(dropped, Some(DropReason::RateLimited));
    }

    #[test]
    fn packets_without_a_route_are_dropped() {
        let mut p = pair();
        assert_eq!(
            send(&mut p.a, &ipv4("10.0.1.5", "10.0.3.1", b"x")),
            Err(Some(DropReason::NoRoute))
        );
        assert_eq!(
            send(&mut p.a, b"\x00junk"),
            Err(Some(DropReason::BadTunPacket))
        );
    }

    #[test]
    fn removing_a_peer_keeps_the_others_sessions() {
        let mut p = pair();
        establish(&mut p);
        let mut extra = DeviceUpdate {
            private_key: None,
            listen_port: None,
            fwmark: None,
            replace_peers: false,
            peers: vec![peer(
                public(&key(3)),
                Some("198.18.0.3:51820"),
                &["10.0.3.0/24"],
            )],
            previous_key: None,
        };
        let outcome = p.a.apply(&extra).unwrap();
        assert!(outcome.routes_changed);
        assert_eq!(p.a.routes().len(), 2);
        extra.peers[0].remove = true;
        let _ = p.a.apply(&extra).unwrap();
        assert_eq!(p.a.routes().len(), 1);
        // The session with B survived both changes: data flows without a new handshake.
        let packet = ipv4("10.0.1.5", "10.0.2.7", b"undisturbed");
        let datagram = send(&mut p.a, &packet).unwrap();
        assert_eq!(datagram[0], 4, "a data message, not a new handshake");
        let (tun, _, _) = deliver(&mut p.b, A_ADDR, &datagram);
        assert_eq!(tun, vec![packet]);
    }

    #[test]
    fn an_allowed_ip_moves_to_the_peer_that_claims_it_last() {
        let mut p = pair();
        let other = public(&key(3));
        let _ =
            p.a.apply(&DeviceUpdate {
                private_key: None,
                listen_port: None,
                fwmark: None,
                replace_peers: false,
                peers: vec![peer(other, None, &["10.0.2.0/24"])],
                previous_key: None,
            })
            .unwrap();
        let b = p.a.peer(p.a.peer_id(&p.b_key).unwrap()).unwrap();
        assert!(b.allowed_ips.is_empty());
        assert_eq!(p.a.routes().len(), 1);
    }

    #[test]
    fn a_peer_with_our_own_key_is_ignored() {
        let mut d = Device::new();
        let k = key(9);
        let _ = d
            .apply(&update(&k, vec![peer(public(&k), None, &["10.0.0.0/8"])]))
            .unwrap();
        assert_eq!(d.peer_count(), 0);
    }

    #[test]
    fn a_derived_mtu_rises_to_the_ipv6_minimum_when_an_ipv6_route_arrives() {
        let mut d = Device::new();
        d.set_mtu(1220, true);
        let v4 = route_to(&mut d, "10.0.2.0/24");
        assert!(!v4.mtu_changed);
        assert_eq!(d.mtu(), 1220);
        let v6 = route_to(&mut d, "fd00:2::/64");
        assert!(v6.mtu_changed);
        assert_eq!(d.mtu(), mtu::MIN_MTU_V6);
        // Never lowered again.
        let back = route_to(&mut d, "10.0.2.0/24");
        assert!(!back.mtu_changed);
        assert_eq!(d.mtu(), mtu::MIN_MTU_V6);
    }

    #[test]
    fn a_configured_mtu_stays_as_it_is() {
        let mut d = Device::new();
        d.set_mtu(1220, false);
        let outcome = route_to(&mut d, "fd00:2::/64");
        assert!(!outcome.mtu_changed);
        assert_eq!(d.mtu(), 1220);
    }

    #[test]
    fn a_packet_too_big_that_must_not_be_fragmented_is_counted_and_answered() {
        let mut d = Device::new();
        d.set_mtu(1000, false);
        let mut out = vec![0u8; mtu::MAX_ICMP_LEN];
        let now = Instant::now();
        let small = ipv4("10.0.1.1", "10.0.2.1", &[0; 100]);
        assert_eq!(d.check_mtu(&small, now, &mut out), MtuVerdict::Fits);
        let mut big = ipv4("10.0.1.1", "10.0.2.1", &[0; 1100]);
        big[6] = 0x40; // don't fragment
        assert!(matches!(
            d.check_mtu(&big, now, &mut out),
            MtuVerdict::TooBig(_)
        ));
        assert_eq!(d.counters().drops(DropReason::TooBig), 1);
    }

    #[test]
    fn an_84_byte_ping_is_padded_to_96_bytes_and_arrives_as_84() {
        let mut p = pair();
        establish(&mut p);
        // 20 (IPv4) + 8 (ICMP echo header) + 56 bytes of data, as `ping` sends by default.
        let ping = ipv4("10.0.1.5", "10.0.2.7", &[0xab; 84 - 28]);
        assert_eq!(ping.len(), 84);
        let datagram = send(&mut p.a, &ping).unwrap();
        // Type, reserved, index, counter (16), then 96 padded bytes, then the tag (16).
        assert_eq!(datagram.len(), 16 + 96 + 16);
        let (tun, _, dropped) = deliver(&mut p.b, A_ADDR, &datagram);
        assert_eq!(dropped, None);
        assert_eq!(
            tun,
            vec![ping.clone()],
            "the receiver cuts it to its IP length"
        );
        // A multiple of 16 already: nothing added.
        let even = ipv4("10.0.1.5", "10.0.2.7", &[1; 96 - 28]);
        assert_eq!(send(&mut p.a, &even).unwrap().len(), 96 + 32);
        // Never past the tunnel MTU.
        p.a.set_mtu(90, false);
        let datagram = send(&mut p.a, &ping).unwrap();
        assert_eq!(datagram.len(), 90 + 32);
        let (tun, _, _) = deliver(&mut p.b, A_ADDR, &datagram);
        assert_eq!(tun, vec![ping.clone()]);
        // A packet over the MTU (fragmentable) is not padded.
        p.a.set_mtu(80, false);
        assert_eq!(send(&mut p.a, &ping).unwrap().len(), 84 + 32);
    }

    #[test]
    fn padding_in_place_gives_the_same_datagram_length_and_packet() {
        let mut p = pair();
        establish(&mut p);
        let ping = ipv4("10.0.1.5", "10.0.2.7", &[0xab; 84 - 28]);
        let mut out = vec![0u8; 2048];
        // Room after the packet: padded there, with zeros whatever the buffer held.
        let mut buf = vec![0xee; 1500];
        buf[..ping.len()].copy_from_slice(&ping);
        let datagram = match p
            .a
            .handle_tun_packet_in_place(&mut buf, ping.len(), &mut out)
        {
            TunVerdict::Send { datagram, .. } => datagram.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(datagram.len(), 16 + 96 + 16);
        assert_eq!(&buf[..84], &ping[..]);
        assert_eq!(&buf[84..96], &[0; 12], "zero padding, in place");
        assert_eq!(buf[96], 0xee, "nothing past the padding");
        let (tun, _, dropped) = deliver(&mut p.b, A_ADDR, &datagram);
        assert_eq!((tun, dropped), (vec![ping.clone()], None));
        // No room: copied, same length.
        let mut tight = ping.clone();
        let datagram = match p.a.handle_tun_packet_in_place(&mut tight, 84, &mut out) {
            TunVerdict::Send { datagram, .. } => datagram.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(datagram.len(), 16 + 96 + 16);
        assert_eq!(tight, ping, "the caller's buffer is untouched");
        let (tun, _, _) = deliver(&mut p.b, A_ADDR, &datagram);
        assert_eq!(tun, vec![ping.clone()]);
        // Never past the tunnel MTU; a length past the buffer is a bad packet.
        p.a.set_mtu(90, false);
        match p.a.handle_tun_packet_in_place(&mut buf, 84, &mut out) {
            TunVerdict::Send { datagram, .. } => assert_eq!(datagram.len(), 90 + 32),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p.a.handle_tun_packet_in_place(&mut tight, 85, &mut out),
            TunVerdict::Drop(DropReason::BadTunPacket)
        ));
    }

    #[test]
    fn low_order_peer_keys_are_refused_naming_the_key_and_nothing_changes() {
        let mut d = Device::new();
        let _ = route_to(&mut d, "10.0.2.0/24");
        let mut order_8 = [0u8; 32];
        order_8[..8].copy_from_slice(&[0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae]);
        order_8[8..16].copy_from_slice(&[0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a]);
        order_8[16..24].copy_from_slice(&[0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd]);
        order_8[24..].copy_from_slice(&[0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00]);
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [[0u8; 32], one, order_8] {
            let bad = PublicKey::from(bad);
            let mut u = update(
                &key(1),
                vec![peer(public(&key(3)), Some(B_ADDR), &["10.0.3.0/24"])],
            );
            u.replace_peers = false;
            u.peers.push(peer(bad, Some(B_ADDR), &["10.0.4.0/24"]));
            let error = d.apply(&u).unwrap_err();
            assert_eq!(error, DeviceError::LowOrderKey(bad));
            assert_eq!(error.errno(), 22);
            assert!(error.to_string().contains(&bad.to_base64()), "{error}");
            // All or nothing: the good peer in the same update was not added either.
            assert_eq!(d.peer_count(), 1);
            // No route, so no initiation is ever sent to it.
            let packet = ipv4("10.0.1.5", "10.0.4.7", b"x");
            assert_eq!(send(&mut d, &packet), Err(Some(DropReason::NoRoute)));
        }
        // Removing such a key is fine (it was never there).
        let mut remove = PeerUpdate::new(PublicKey::from([0u8; 32]));
        remove.remove = true;
        let u = DeviceUpdate {
            peers: vec![remove],
            ..DeviceUpdate::default()
        };
        assert!(d.apply(&u).is_ok());
    }

    #[test]
    fn the_private_key_reads_back_clamped_and_setting_it_again_keeps_the_session() {
        let mut p = pair();
        establish(&mut p);
        let unclamped = key(1);
        let clamped = p.a.private_key().unwrap();
        assert_eq!(clamped, keys::clamp(&unclamped));
        assert_ne!(clamped, unclamped);
        let public_before = p.a.public_key();
        // Set again, unclamped or clamped: the same key, the session stays.
        for again in [unclamped, clamped] {
            let u = DeviceUpdate {
                private_key: Some(Some(again)),
                ..DeviceUpdate::default()
            };
            let _ = p.a.apply(&u).unwrap();
            assert_eq!(p.a.public_key(), public_before);
            let packet = ipv4("10.0.1.5", "10.0.2.7", b"still up");
            let datagram = send(&mut p.a, &packet).unwrap();
            assert_eq!(datagram[0], 4, "a data message, not a new initiation");
        }
    }

    /// Applies one peer owning `cidr` to `d`, as its only peer.
    /// An address no peer of the tests uses.
    const ATTACKER: &str = "198.18.66.6:4444";

    /// A `Tunn` with a key `dev` does not know, for `dev`.
    fn stranger_to(dev: &Device) -> Tunn {
        Tunn::new(
            x25519::StaticSecret::from([0x66; 32]),
            x25519::PublicKey::from(*dev.public_key().unwrap().as_bytes()),
            None,
            None,
            0x66,
            None,
        )
    }

    /// A new handshake initiation from `tunn` (with mac2 once it has a cookie).
    fn initiation(tunn: &mut Tunn) -> Vec<u8> {
        let mut out = vec![0u8; 2048];
        match tunn.format_handshake_initiation(&mut out, true) {
            TunnResult::WriteToNetwork(init) => init.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    /// Puts `dev` under load: more handshakes than its limit within a second.
    fn load(dev: &mut Device) {
        let mut stranger = stranger_to(dev);
        let unknown = initiation(&mut stranger);
        for _ in 0..=HANDSHAKE_RATE_LIMIT {
            let _ = deliver(dev, "198.18.66.99:1", &unknown);
        }
        assert!(dev.counters().cookies_sent > 0);
    }

    fn route_to(d: &mut Device, cidr: &str) -> ApplyOutcome {
        d.apply(&update(&key(1), vec![peer(public(&key(2)), None, &[cidr])]))
            .unwrap()
    }

    // Key rotation (issue 12 §5): two devices exchanging real datagrams in memory.

    /// Datagrams in flight between A and B.
    #[derive(Default)]
    struct Wire {
        to_a: Vec<Vec<u8>>,
        to_b: Vec<Vec<u8>>,
        /// Inner packets each side wrote to its TUN device.
        got_a: Vec<Vec<u8>>,
        got_b: Vec<Vec<u8>>,
        /// Every drop either side counted for a datagram, with the reason.
        drops: Vec<DropReason>,
    }

    impl Wire {
        /// Delivers everything in flight, and what that sends back, until nothing is left.
        fn pump(&mut self, p: &mut Pair) {
            for _ in 0..100 {
                if self.to_a.is_empty() && self.to_b.is_empty() {
                    return;
                }
                for d in std::mem::take(&mut self.to_b) {
                    let (tun, replies, dropped) = deliver(&mut p.b, A_ADDR, &d);
                    self.got_b.extend(tun);
                    self.to_a.extend(replies);
                    self.drops.extend(dropped);
                }
                for d in std::mem::take(&mut self.to_a) {
                    let (tun, replies, dropped) = deliver(&mut p.a, B_ADDR, &d);
                    self.got_a.extend(tun);
                    self.to_b.extend(replies);
                    self.drops.extend(dropped);
                }
            }
            panic!("datagrams still in flight after 100 rounds");
        }

        /// One timer tick on A at `now`; what it sends goes on the wire.
        fn tick_a(&mut self, p: &mut Pair, now: Instant) {
            let mut out = vec![0u8; 2048];
            let to_b = &mut self.to_b;
            p.a.update_timers(now, &mut out, |_, d| to_b.push(d.to_vec()));
        }

        fn tick_b(&mut self, p: &mut Pair, now: Instant) {
            let mut out = vec![0u8; 2048];
            let to_a = &mut self.to_a;
            p.b.update_timers(now, &mut out, |_, d| to_a.push(d.to_vec()));
        }
    }

    /// Sends packet `n` each way (A to B and B to A), which must leave at once: a
    /// packet that waits for a handshake would be lost if it never completed.
    fn both_ways(p: &mut Pair, wire: &mut Wire, n: u32) -> (Vec<u8>, Vec<u8>) {
        let ab = ipv4("10.0.1.5", "10.0.2.7", &n.to_be_bytes());
        let ba = ipv4("10.0.2.7", "10.0.1.5", &n.to_be_bytes());
        let datagram = send(&mut p.a, &ab).unwrap_or_else(|e| panic!("A, packet {n}: {e:?}"));
        assert_eq!(datagram[0], DATA, "A, packet {n}: sent as data");
        wire.to_b.push(datagram);
        let datagram = send(&mut p.b, &ba).unwrap_or_else(|e| panic!("B, packet {n}: {e:?}"));
        assert_eq!(datagram[0], DATA, "B, packet {n}: sent as data");
        wire.to_a.push(datagram);
        (ab, ba)
    }

    /// The rotation of `dev`'s key from `old` to `new`, keeping `old` up to `grace`.
    fn rotation(old: &PrivateKey, new: &PrivateKey, grace: Duration) -> DeviceUpdate {
        DeviceUpdate {
            private_key: Some(Some(*new)),
            previous_key: Some(PreviousKey { key: *old, grace }),
            ..DeviceUpdate::default()
        }
    }

    /// The peer `old` is now `new` (a MeshPeer whose key changed).
    fn rekey(old: PublicKey, new: PublicKey, endpoint: &str, cidr: &str) -> DeviceUpdate {
        let mut p = peer(new, Some(endpoint), &[cidr]);
        p.replaces = Some(old);
        DeviceUpdate {
            peers: vec![p],
            ..DeviceUpdate::default()
        }
    }

    /// Packets flow both ways through every step of a rotation of B's key (and, with
    /// `both`, of A's at the same time); `b_initiates` chooses whose handshake under the
    /// new keys arrives first. Returns the wire and the pair at the end.
    fn rotate_under_traffic(b_initiates: bool, both: bool) -> (Pair, Wire) {
        let mut p = pair();
        establish(&mut p);
        let mut wire = Wire::default();
        let mut sent_ab = Vec::new();
        let mut sent_ba = Vec::new();
        let mut n = 0u32;
        let mut traffic = |p: &mut Pair, wire: &mut Wire, count: u32| {
            for _ in 0..count {
                n += 1;
                let (ab, ba) = both_ways(p, wire, n);
                sent_ab.push(ab);
                sent_ba.push(ba);
                wire.pump(p);
            }
        };
        let now = Instant::now();
        traffic(&mut p, &mut wire, 5);
        let grace = Duration::from_secs(600);
        // B rotates (and A, with `both`): old sessions still carry everything.
        let _ = p.b.apply(&rotation(&key(2), &key(12), grace)).unwrap();
        if both {
            let _ = p.a.apply(&rotation(&key(1), &key(11), grace)).unwrap();
        }
        traffic(&mut p, &mut wire, 5);
        // B's first initiation under its new key goes to A, which does not know the key
        // yet (dropped as an unknown peer), or is held back and arrives later.
        wire.tick_b(&mut p, now);
        if both {
            wire.tick_a(&mut p, now);
        }
        let held = if b_initiates {
            std::mem::take(&mut wire.to_a)
        } else {
            Vec::new()
        };
        wire.pump(&mut p);
        traffic(&mut p, &mut wire, 5);
        // The controllers mirror the new keys: A learns B's (and B learns A's).
        let _ =
            p.a.apply(&rekey(
                public(&key(2)),
                public(&key(12)),
                B_ADDR,
                "10.0.2.0/24",
            ))
            .unwrap();
        if both {
            let _ =
                p.b.apply(&rekey(
                    public(&key(1)),
                    public(&key(11)),
                    A_ADDR,
                    "10.0.1.0/24",
                ))
                .unwrap();
        }
        traffic(&mut p, &mut wire, 5);
        if b_initiates {
            wire.to_a.extend(held);
            wire.pump(&mut p);
            traffic(&mut p, &mut wire, 5);
        }
        wire.tick_a(&mut p, now);
        if both {
            wire.tick_b(&mut p, now);
        }
        wire.pump(&mut p);
        traffic(&mut p, &mut wire, 5);
        // After the grace for packets in flight, the old sessions go.
        for later in [1, 7, 8] {
            let at = now + Duration::from_secs(later);
            wire.tick_a(&mut p, at);
            wire.tick_b(&mut p, at);
            wire.pump(&mut p);
            traffic(&mut p, &mut wire, 5);
        }
        assert_eq!(
            wire.got_b, sent_ab,
            "every packet from A arrived at B, in order"
        );
        assert_eq!(
            wire.got_a, sent_ba,
            "every packet from B arrived at A, in order"
        );
        (p, wire)
    }

    /// Every `Tunn` of every peer of `dev`: (current, retiring).
    fn tunns(dev: &Device) -> (usize, usize) {
        dev.slots.iter().flatten().fold((0, 0), |(c, r), p| {
            (c + usize::from(p.tunn.is_some()), r + p.retiring.len())
        })
    }

    /// Asserts that A and B now talk under B's new key only, and that B refuses an
    /// initiation addressed to its old key.
    fn settled(p: &mut Pair) {
        assert!(!p.b.has_previous_key(), "B dropped its old key");
        assert_eq!(tunns(&p.a), (1, 0), "A: no retiring sessions left");
        assert_eq!(tunns(&p.b), (1, 0), "B: no retiring sessions left");
        assert_eq!(p.b.public_key(), Some(public(&key(12))));
        let a = p.a.peer(p.a.peer_id(&public(&key(12))).unwrap()).unwrap();
        assert!(a.since_handshake.is_some());
        assert!(p.a.peer_id(&public(&key(2))).is_none());
        // An initiation to B's old key, from a key B knows, is refused and counted.
        let a_secret = if p.a.public_key() == Some(public(&key(11))) {
            key(11)
        } else {
            key(1)
        };
        let mut old = Tunn::new(
            x25519::StaticSecret::from(*a_secret.as_bytes()),
            x25519::PublicKey::from(*public(&key(2)).as_bytes()),
            None,
            None,
            0x77,
            None,
        );
        let before = p.b.counters().drops(DropReason::RetiredKey);
        let (tun, replies, dropped) = deliver(&mut p.b, A_ADDR, &initiation(&mut old));
        assert!(tun.is_empty() && replies.is_empty(), "no answer");
        assert_eq!(dropped, Some(DropReason::RetiredKey));
        assert_eq!(p.b.counters().drops(DropReason::RetiredKey), before + 1);
    }

    #[test]
    fn a_rotation_loses_no_packet_when_the_remote_initiates_under_the_new_key() {
        let (mut p, wire) = rotate_under_traffic(false, false);
        settled(&mut p);
        // B's first initiation under its new key reached A before A knew the key.
        assert!(
            wire.drops.contains(&DropReason::UnknownPeer),
            "{:?}",
            wire.drops
        );
    }

    #[test]
    fn a_rotation_loses_no_packet_when_the_rotated_node_initiates_under_the_new_key() {
        let (mut p, _) = rotate_under_traffic(true, false);
        settled(&mut p);
    }

    #[test]
    fn both_ends_rotating_at_once_lose_no_packet() {
        for b_initiates in [false, true] {
            let (mut p, _) = rotate_under_traffic(b_initiates, true);
            settled(&mut p);
            assert!(!p.a.has_previous_key());
            assert_eq!(p.a.public_key(), Some(public(&key(11))));
        }
    }

    #[test]
    fn an_initiation_to_the_previous_key_is_answered_until_the_grace_ends() {
        let mut p = pair();
        establish(&mut p);
        // B rotates; A, which has not learnt it yet, starts a new session to the old key
        // (its sessions expired, say): B answers from its old key.
        let _ =
            p.b.apply(&rotation(&key(2), &key(12), Duration::from_secs(60)))
                .unwrap();
        let now = Instant::now();
        let mut wire = Wire::default();
        wire.tick_b(&mut p, now);
        wire.to_a.clear();
        let mut fresh = Tunn::new(
            x25519::StaticSecret::from(*key(1).as_bytes()),
            x25519::PublicKey::from(*public(&key(2)).as_bytes()),
            None,
            None,
            0x78,
            None,
        );
        let (_, replies, dropped) = deliver(&mut p.b, A_ADDR, &initiation(&mut fresh));
        assert_eq!((replies.len(), dropped), (1, None));
        assert_eq!(replies[0][0], HANDSHAKE_RESPONSE);
        assert!(p.b.has_previous_key(), "A has not proven the new key yet");
        // The grace ends: the old key goes, and is refused.
        wire.tick_b(&mut p, now + Duration::from_secs(61));
        assert!(!p.b.has_previous_key());
        let (_, replies, dropped) = deliver(&mut p.b, A_ADDR, &initiation(&mut fresh));
        assert!(replies.is_empty());
        assert_eq!(dropped, Some(DropReason::RetiredKey));
    }

    #[test]
    fn a_restart_in_the_middle_of_a_rotation_answers_both_keys() {
        // The agent restarts with its new key and the previous one (from its state
        // file): a peer that still knows only the old key gets a session, as does one
        // that knows the new key.
        let mut b = Device::new();
        let mut u = update(
            &key(12),
            vec![peer(public(&key(1)), None, &["10.0.1.0/24"])],
        );
        u.previous_key = Some(PreviousKey {
            key: key(2),
            grace: Duration::from_secs(600),
        });
        let _ = b.apply(&u).unwrap();
        let mut out = vec![0u8; 2048];
        b.update_timers(Instant::now(), &mut out, |_, _| {});
        assert!(
            b.has_previous_key(),
            "its peer has not proven the new key yet"
        );
        for (n, theirs) in [(2u8, key(2)), (12, key(12))] {
            let mut a = Tunn::new(
                x25519::StaticSecret::from(*key(1).as_bytes()),
                x25519::PublicKey::from(*public(&theirs).as_bytes()),
                None,
                None,
                u32::from(n),
                None,
            );
            let (_, replies, dropped) = deliver(&mut b, A_ADDR, &initiation(&mut a));
            assert_eq!((replies.len(), dropped), (1, None), "to key({n})");
            assert_eq!(replies[0][0], HANDSHAKE_RESPONSE);
        }
    }
}
