//! The offload path end to end (needs root): TCP super-packets from the TUN device (TSO),
//! split and encrypted into UDP GSO batches, received with UDP GRO, coalesced again and
//! written back as super-packets.

// The test prints what it measured (shown with --nocapture).
#![allow(clippy::print_stdout)]

use anyhow::{Context as _, Result, ensure};
use wiremesh_lab::mesh::{IFACE, Node};
use wiremesh_lab::{Lab, MIB, ping, transfer};

/// The lab's tunnel MTU (`mesh::write_config`): without offloads no packet on `wm0` is
/// longer.
const MTU: u64 = 1420;

#[test]
fn a_gibibyte_crosses_the_offload_path_intact_as_super_packets() -> Result<()> {
    let lab = Lab::new()?;
    let mut a = Node::new(&lab, "a", 1)?;
    let mut b = Node::new(&lab, "b", 2)?;
    a.start(&[b.as_peer(true)])?;
    b.start(&[a.as_peer(true)])?;
    ping(&a.pod, b.pod.ip(), 2)?;
    for node in [&a, &b] {
        let log = node.agent.as_ref().context("agent")?.stderr();
        ensure!(
            log.contains("vnet_hdr: true, tso: true"),
            "{} came up without TUN offloads:\n{log}",
            node.host.name()
        );
    }

    let a_before = a.host.link_stats(IFACE)?;
    let b_before = b.host.link_stats(IFACE)?;
    let there = transfer(&a.pod, b.pod.ip(), 1024 * MIB)?;
    let back = transfer(&b.pod, a.pod.ip(), 256 * MIB)?;
    let a_after = a.host.link_stats(IFACE)?;
    let b_after = b.host.link_stats(IFACE)?;

    // What the kernel handed agent a to send (TSO), and what agent b wrote (GRO).
    let sent = a_after.tx.since(&a_before.tx);
    let written = b_after.rx.since(&b_before.rx);
    println!(
        "1 GiB a->b {:.0} Mbit/s, 256 MiB b->a {:.0} Mbit/s; a read {} packets of {} bytes on average, b wrote {} of {}",
        there.mbit_per_s(),
        back.mbit_per_s(),
        sent.packets,
        sent.average(),
        written.packets,
        written.average()
    );
    ensure!(
        sent.bytes >= 1024 * MIB && written.bytes >= 1024 * MIB,
        "less than the transfer crossed wm0: {sent:?} {written:?}"
    );
    // Without offloads the averages would be at most the MTU.
    ensure!(
        sent.average() > 4 * MTU,
        "agent a read no TCP super-packets: {sent:?}"
    );
    ensure!(
        written.average() > 4 * MTU,
        "agent b wrote no coalesced packets: {written:?}"
    );
    ping(&b.pod, a.pod.ip(), 1)?;
    Ok(())
}
