//! Interface counters, MTU, index and link-local address, as `ip` prints them.

use std::net::Ipv6Addr;

use anyhow::{Context, Result, ensure};

use super::Netns;

/// Byte and packet counters of one direction of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes.
    pub bytes: u64,
    /// Packets.
    pub packets: u64,
}

impl Counters {
    /// What was counted after `earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            bytes: self.bytes.saturating_sub(earlier.bytes),
            packets: self.packets.saturating_sub(earlier.packets),
        }
    }

    /// Bytes per packet (0 with no packets).
    pub fn average(&self) -> u64 {
        self.bytes / self.packets.max(1)
    }
}

/// The RX and TX counters of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Received.
    pub rx: Counters,
    /// Sent.
    pub tx: Counters,
}

impl Netns {
    /// The RX and TX counters of `dev` in this namespace, from `ip -s link show`.
    ///
    /// # Errors
    /// When `ip` fails or its output has no counters.
    pub fn link_stats(&self, dev: &str) -> Result<LinkStats> {
        parse_link_stats(&self.ip(&["-s", "link", "show", "dev", dev])?)
    }

    /// The MTU of `dev` in this namespace.
    ///
    /// # Errors
    /// When `ip` fails or its output has no MTU.
    pub fn link_mtu(&self, dev: &str) -> Result<u32> {
        let text = self.ip(&["-o", "link", "show", "dev", dev])?;
        let mtu = text
            .split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .with_context(|| format!("no mtu in {text}"))?;
        mtu.parse().with_context(|| format!("mtu {mtu:?} of {dev}"))
    }

    /// The names of the namespace's interfaces (`ip -o link show`, without the `@peer`
    /// suffix of a veth): compare names, not the text, which also names other namespaces.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn link_names(&self) -> Result<Vec<String>> {
        let text = self.ip(&["-o", "link", "show"])?;
        Ok(text
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .collect())
    }

    /// The interface index of `dev` in this namespace.
    ///
    /// # Errors
    /// When `ip` fails or its output has no index.
    pub fn link_index(&self, dev: &str) -> Result<u32> {
        let text = self.ip(&["-o", "link", "show", "dev", dev])?;
        let index = text
            .split(':')
            .next()
            .with_context(|| format!("no index in {text}"))?;
        index
            .trim()
            .parse()
            .with_context(|| format!("index {index:?} of {dev}"))
    }

    /// The link-local IPv6 address of `dev` in this namespace.
    ///
    /// # Errors
    /// When `ip` fails or `dev` has no link-local address.
    pub fn link_local(&self, dev: &str) -> Result<Ipv6Addr> {
        let text = self.ip(&["-6", "-o", "addr", "show", "dev", dev, "scope", "link"])?;
        let cidr = text
            .split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .with_context(|| format!("no link-local address on {dev}: {text}"))?;
        let addr = cidr.split('/').next().unwrap_or(cidr);
        addr.parse()
            .with_context(|| format!("link-local address {addr:?} of {dev}"))
    }
}

fn parse_link_stats(text: &str) -> Result<LinkStats> {
    let numbers_after = |label: &str| -> Result<Counters> {
        let mut lines = text.lines();
        lines
            .by_ref()
            .find(|l| l.trim_start().starts_with(label))
            .with_context(|| format!("no {label} in {text}"))?;
        let values: Vec<u64> = lines
            .next()
            .with_context(|| format!("no counters after {label} in {text}"))?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("counters after {label} in {text}"))?;
        ensure!(values.len() >= 2, "short counters in {text}");
        Ok(Counters {
            bytes: values[0],
            packets: values[1],
        })
    };
    Ok(LinkStats {
        rx: numbers_after("RX:")?,
        tx: numbers_after("TX:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_after_their_label() {
        let text = "\
3: wm0: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1420 qdisc fq_codel state UNKNOWN
    link/none
    RX:  bytes packets errors dropped  missed   mcast
         12345      67      0       0       0       0
    TX:  bytes packets errors dropped carrier collsns
          8900      12      0       0       0       0
";
        let stats = parse_link_stats(text).unwrap();
        assert_eq!(
            stats.rx,
            Counters {
                bytes: 12345,
                packets: 67
            }
        );
        assert_eq!(
            stats.tx,
            Counters {
                bytes: 8900,
                packets: 12
            }
        );
        assert_eq!(stats.rx.since(&stats.tx).packets, 55);
        assert_eq!(stats.tx.average(), 741);
        assert!(parse_link_stats("3: wm0: <UP>\n").is_err());
    }
}
