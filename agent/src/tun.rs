//! A Linux TUN device: `/dev/net/tun`, `TUNSETIFF`, one IP packet per read or write.
//!
//! With [`Tun::create_offloaded`], every read and write starts with a `virtio_net_hdr`
//! (`IFF_VNET_HDR`) and the kernel may hand over TCP super-packets of up to 64 KiB
//! (`TUNSETOFFLOAD` with TSO) and take them back; see [`wiremesh_core::offload`].
//!
//! The device is non-persistent: closing the file descriptor (dropping [`Tun`]) removes it.
//! This is the only module allowed to use `unsafe`, for the `TUNSETIFF` and
//! `TUNSETOFFLOAD` ioctls.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_short};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A TUN device carrying bare IP packets (`IFF_TUN | IFF_NO_PI`), driven by tokio.
///
/// Reads and writes are one whole IPv4 or IPv6 packet each. The device disappears when this
/// value is dropped.
#[derive(Debug)]
pub struct Tun {
    fd: AsyncFd<File>,
    name: String,
    offloads: Offloads,
}

/// What the kernel and the device agreed on for a device from [`Tun::create_offloaded`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Every read and write starts with a 10-byte `virtio_net_hdr`.
    pub vnet_hdr: bool,
    /// TCP segmentation and checksum offload (`TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`):
    /// reads may be TCP super-packets, writes may be too.
    pub tso: bool,
    /// UDP segmentation offload (`TUN_F_USO4 | TUN_F_USO6`, Linux 6.2): reads may be UDP
    /// super-packets.
    pub uso: bool,
}

impl Tun {
    /// Creates (or attaches to) the TUN device `name` with one queue.
    ///
    /// Must be called inside a tokio runtime with I/O enabled.
    ///
    /// # Errors
    /// [`TunError::InvalidName`] when `name` is not a valid interface name;
    /// [`TunError::DeviceNodeMissing`] without `/dev/net/tun` (the `tun` module is not loaded);
    /// [`TunError::PermissionDenied`] without `CAP_NET_ADMIN`;
    /// [`TunError::NameInUse`] when another process holds the device or a non-TUN interface
    /// has that name; [`TunError::Open`], [`TunError::Configure`] or [`TunError::Register`]
    /// for anything else.
    ///
    /// # Panics
    /// Outside a tokio runtime, or in one without I/O enabled (from [`AsyncFd::register`]).
    pub fn create(name: &str) -> Result<Tun, TunError> {
        DetachedTun::open_queue(name, IFF_TUN | IFF_NO_PI)?.attach()
    }

    /// Like [`Tun::create`], with [`DetachedTun::create_offloaded`]'s offloads.
    ///
    /// # Errors
    /// As [`Tun::create`].
    ///
    /// # Panics
    /// As [`Tun::create`].
    pub fn create_offloaded(name: &str) -> Result<Tun, TunError> {
        DetachedTun::create_offloaded(name)?.attach()
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads in effect (all off for [`Tun::create`]).
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Unregisters the device from its runtime, to move it to another one (or to keep it
    /// while that runtime ends); the device stays up.
    pub fn detach(self) -> DetachedTun {
        DetachedTun {
            file: self.fd.into_inner(),
            name: self.name,
            offloads: self.offloads,
        }
    }
    /// Waits until the device may have a packet to read; follow with [`Tun::try_recv`].
    ///
    /// Readiness is kept until a [`Tun::try_recv`] returns `Ok(None)`.
    ///
    /// # Errors
    /// When the tokio reactor fails (it has shut down).
    pub async fn readable(&self) -> io::Result<()> {
        let _guard = self.fd.readable().await?;
        Ok(())
    }

    /// Reads one packet into `buf` without blocking.
    ///
    /// Returns `Ok(Some(len))` for a packet, `Ok(None)` when no packet is waiting (which clears
    /// the readiness that [`Tun::readable`] waits for). A packet longer than `buf` is truncated,
    /// so size `buf` for the MTU.
    ///
    /// # Errors
    /// The `read(2)` error, other than `EAGAIN`.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        would_block_to_none(
            self.fd
                .try_io(Interest::READABLE, |file| (&*file).read(buf)),
        )
    }

    /// Waits for and reads one packet into `buf`, returning its length.
    ///
    /// # Errors
    /// The `read(2)` error, other than `EAGAIN`.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::READABLE, |file| (&*file).read(buf))
            .await
    }

    /// Writes one IP packet without blocking.
    ///
    /// Returns `Ok(Some(len))` when the packet was written, `Ok(None)` when the device
    /// cannot take it now (nothing was written; wait with [`Tun::send`] instead).
    ///
    /// # Errors
    /// The `write(2)` error, other than `EAGAIN`; `EINVAL` for a packet that is not IP.
    pub fn try_send(&self, packet: &[u8]) -> io::Result<Option<usize>> {
        would_block_to_none(
            self.fd
                .try_io(Interest::WRITABLE, |file| (&*file).write(packet)),
        )
    }

    /// Writes one IP packet, waiting for the device to become writable if needed.
    ///
    /// # Errors
    /// The `write(2)` error, other than `EAGAIN`; `EINVAL` for a packet that is not IP.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::WRITABLE, |file| (&*file).write(packet))
            .await
    }

    /// Writes one packet now, without looking at the runtime's readiness: a TUN device takes
    /// writes unless its queue is full (`EAGAIN`, returned as an error).
    ///
    /// # Errors
    /// The `write(2)` error; `EINVAL` for a packet that is not IP (or, with a vnet header, a
    /// header that does not fit the packet).
    pub fn write_now(&self, packet: &[u8]) -> io::Result<usize> {
        let mut file: &File = self.fd.get_ref();
        file.write(packet)
    }
}

/// A TUN device that no tokio runtime watches yet: created outside the runtime that will
/// drive it, then [`DetachedTun::attach`]ed. Dropping it removes the device.
#[derive(Debug)]
pub struct DetachedTun {
    file: File,
    name: String,
    offloads: Offloads,
}

impl DetachedTun {
    /// Creates the TUN device `name` with a `virtio_net_hdr` before every packet
    /// (`IFF_VNET_HDR`) and TCP (and, from Linux 6.2, UDP) segmentation offload, so that reads
    /// and writes carry up to 64 KiB; see [`wiremesh_core::offload`].
    ///
    /// Falls back to what the kernel supports: see [`DetachedTun::offloads`]. Without
    /// `IFF_VNET_HDR` support at all, the device is a plain one as from [`Tun::create`].
    ///
    /// # Errors
    /// As [`Tun::create`], except [`TunError::Register`].
    pub fn create_offloaded(name: &str) -> Result<DetachedTun, TunError> {
        let mut tun = match Self::open_queue(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR) {
            Ok(tun) => tun,
            // A kernel without IFF_VNET_HDR refuses the flag itself.
            Err(TunError::NameInUse { .. } | TunError::Configure { .. }) => {
                return Self::open_queue(name, IFF_TUN | IFF_NO_PI);
            }
            Err(e) => return Err(e),
        };
        tun.offloads.vnet_hdr = true;
        let tcp = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        if tun.set_offload(tcp | TUN_F_USO4 | TUN_F_USO6).is_ok() {
            tun.offloads.tso = true;
            tun.offloads.uso = true;
        } else if tun.set_offload(tcp).is_ok() {
            tun.offloads.tso = true;
        }
        tracing::debug!(name = %tun.name, offloads = ?tun.offloads, "TUN offloads");
        Ok(tun)
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads in effect.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Registers the device with the current tokio runtime.
    ///
    /// # Errors
    /// [`TunError::Register`] when the reactor refuses the descriptor.
    ///
    /// # Panics
    /// Outside a tokio runtime, or in one without I/O enabled (from [`AsyncFd::register`]).
    pub fn attach(self) -> Result<Tun, TunError> {
        let name = self.name;
        // SAFETY: `file` owns its descriptor and moves into the `AsyncFd`, which keeps it open
        // until it is dropped or `Tun::detach` takes it back out with `into_inner`; nothing
        // replaces the `File` in between, and a `File` always reports the same descriptor.
        let fd = unsafe { AsyncFd::register(self.file) }.map_err(|e| TunError::Register {
            name: name.clone(),
            source: e.into_parts().1,
        })?;
        Ok(Tun {
            fd,
            name,
            offloads: self.offloads,
        })
    }

    /// `TUNSETOFFLOAD`: which offloads the device announces to the stack.
    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: `file` is an open TUN descriptor for the whole call; TUNSETOFFLOAD takes its
        // argument by value (an unsigned long of TUN_F_* bits) and reads no memory.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Opens one queue of the device with the given `IFF_*` flags.
    ///
    /// Multi-queue later: call this once per queue with `IFF_MULTI_QUEUE` added and the same
    /// name; each call returns its own fd.
    fn open_queue(name: &str, flags: c_short) -> Result<DetachedTun, TunError> {
        let ifr_name = encode_name(name)?;

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_DEVICE_NODE)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TunError::DeviceNodeMissing {
                    path: TUN_DEVICE_NODE,
                    source,
                },
                Some(libc::EPERM | libc::EACCES) => TunError::PermissionDenied {
                    name: name.to_owned(),
                    source,
                },
                _ => TunError::Open { source },
            })?;

        // SAFETY: `ifreq` is plain old data (a byte array and a union of integers, sockaddrs
        // and a raw pointer); all zero bytes is a valid value for every field.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = ifr_name;
        req.ifr_ifru.ifru_flags = flags;

        // SAFETY: `file` is an open `/dev/net/tun` descriptor for the whole call; TUNSETIFF
        // reads and writes exactly one `struct ifreq`, and `req` is a live, writable `ifreq`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TunError::PermissionDenied { name, source },
                // EBUSY: a single-queue device already has its fd; EINVAL: the name belongs to
                // an interface of another kind (or a TUN device with other flags).
                Some(libc::EBUSY | libc::EINVAL) => TunError::NameInUse { name, source },
                _ => TunError::Configure { name, source },
            });
        }
        let name = decode_name(&req.ifr_name);
        tracing::debug!(%name, "opened TUN device");
        Ok(DetachedTun {
            file,
            name,
            offloads: Offloads::default(),
        })
    }
}

/// Why a TUN device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The name is not one the kernel accepts for an interface.
    #[error("invalid TUN device name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `/dev/net/tun` does not exist or has no driver behind it.
    #[error(
        "{path} is missing: load the tun module (`modprobe tun`) or give the container the device"
    )]
    DeviceNodeMissing {
        /// The device node path.
        path: &'static str,
        /// The `open(2)` error.
        #[source]
        source: io::Error,
    },
    /// The process lacks the privilege to create network devices.
    #[error("creating TUN device {name:?} needs CAP_NET_ADMIN")]
    PermissionDenied {
        /// The requested name.
        name: String,
        /// The `open(2)` or `ioctl(2)` error.
        #[source]
        source: io::Error,
    },
    /// Another process holds a TUN device of that name, or a non-TUN interface has it.
    #[error("interface name {name:?} is already in use")]
    NameInUse {
        /// The requested name.
        name: String,
        /// The `ioctl(2)` error (`EBUSY` or `EINVAL`).
        #[source]
        source: io::Error,
    },
    /// Opening `/dev/net/tun` failed for another reason.
    #[error("cannot open /dev/net/tun")]
    Open {
        /// The `open(2)` error.
        #[source]
        source: io::Error,
    },
    /// `TUNSETIFF` failed for another reason.
    #[error("cannot create TUN device {name:?}")]
    Configure {
        /// The requested name.
        name: String,
        /// The `ioctl(2)` error.
        #[source]
        source: io::Error,
    },
    /// The descriptor could not be registered with the tokio reactor.
    #[error("cannot register TUN device {name:?} with the runtime")]
    Register {
        /// The device name.
        name: String,
        /// The reactor error.
        #[source]
        source: io::Error,
    },
}

/// The clone device, from Documentation/networking/tuntap.rst.
const TUN_DEVICE_NODE: &str = "/dev/net/tun";

/// `IFF_TUN` from `<linux/if_tun.h>`: layer 3 packets, no Ethernet header.
const IFF_TUN: c_short = 0x0001;
/// `IFF_NO_PI` from `<linux/if_tun.h>`: no 4-byte packet information prefix.
const IFF_NO_PI: c_short = 0x1000;
/// `IFF_MULTI_QUEUE` from `<linux/if_tun.h>`, for when the agent reads with several threads.
const IFF_MULTI_QUEUE: c_short = 0x0100;
/// `IFF_VNET_HDR` from `<linux/if_tun.h>`: a `virtio_net_hdr` before every packet.
const IFF_VNET_HDR: c_short = 0x4000;

/// `TUN_F_*` from `<linux/if_tun.h>`: checksum offload, TSO for IPv4 and IPv6, USO for
/// IPv4 and IPv6 (Linux 6.2).
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

const _: () = {
    assert!(IFF_TUN as libc::c_int == libc::IFF_TUN);
    assert!(IFF_NO_PI as libc::c_int == libc::IFF_NO_PI);
    assert!(IFF_MULTI_QUEUE as libc::c_int == libc::IFF_MULTI_QUEUE);
    assert!(IFF_VNET_HDR as libc::c_int == libc::IFF_VNET_HDR);
    assert!(TUN_F_CSUM == libc::TUN_F_CSUM);
    assert!(TUN_F_TSO4 == libc::TUN_F_TSO4);
    assert!(TUN_F_TSO6 == libc::TUN_F_TSO6);
    assert!(TUN_F_USO4 == libc::TUN_F_USO4);
    assert!(TUN_F_USO6 == libc::TUN_F_USO6);
};

/// Checks `name` the way the kernel's `dev_valid_name` does and NUL-pads it for `ifr_name`.
fn encode_name(name: &str) -> Result<[c_char; libc::IFNAMSIZ], TunError> {
    let invalid = |reason| TunError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    // IFNAMSIZ counts the terminating NUL.
    if name.len() >= libc::IFNAMSIZ {
        return Err(invalid("it is longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("it is a path component"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(invalid("it contains '/', ':', NUL or whitespace"));
    }
    let mut out = [0; libc::IFNAMSIZ];
    for (dst, src) in out.iter_mut().zip(name.bytes()) {
        *dst = src as c_char;
    }
    Ok(out)
}

/// The NUL-terminated name the kernel wrote back into `ifr_name`.
fn decode_name(raw: &[c_char; libc::IFNAMSIZ]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn would_block_to_none(result: io::Result<usize>) -> io::Result<Option<usize>> {
    match result {
        Ok(len) => Ok(Some(len)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_of_fifteen_bytes_is_accepted_and_padded() {
        let raw = encode_name("wiremesh0123456").unwrap();
        assert_eq!(decode_name(&raw), "wiremesh0123456");
        assert_eq!(raw[15], 0);
    }

    #[test]
    fn name_of_sixteen_bytes_is_refused() {
        let err = encode_name("wiremesh01234567").unwrap_err();
        assert!(err.to_string().contains("longer than 15 bytes"), "{err}");
    }

    #[test]
    fn names_the_kernel_refuses_are_refused() {
        for name in ["", ".", "..", "wm/0", "wm:0", "wm 0", "wm\0"] {
            assert!(
                matches!(encode_name(name), Err(TunError::InvalidName { .. })),
                "{name:?} accepted"
            );
        }
    }
}
