//! Address and port rewrites with their IP and L4 checksum updates.
use crate::headers::{
    ICMP_CHECK, ICMP_ECHO_ID, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IP_CSUM_OFF, IP_DST_OFF,
    IP_SRC_OFF, L4_DPORT, L4_SPORT, TCP_CHECK, UDP_CHECK,
};
use crate::packet::Ipv4;
use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use aya_ebpf::programs::TcContext;

/// Offset of the checksum that covers the ports (or the ICMP identifier).
#[inline(always)]
pub(crate) fn l4_checksum(packet: &Ipv4) -> (usize, u64) {
    match packet.proto {
        IPPROTO_TCP => (packet.l4 + TCP_CHECK, 0),
        // A zero UDP checksum means "none" and must stay zero.
        IPPROTO_UDP => (packet.l4 + UDP_CHECK, BPF_F_MARK_MANGLED_0 as u64),
        _ => (packet.l4 + ICMP_CHECK, 0),
    }
}

/// Replaces an address in the IP header alone (later fragments: their L4 checksum, in the
/// first fragment, was fixed there).
#[inline(always)]
pub(crate) fn rewrite_address(
    ctx: &TcContext,
    offset: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Option<()> {
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
        4,
    )
    .ok()?;
    ctx.store(offset, &new, 0).ok()
}

#[inline(always)]
pub(crate) fn rewrite_source(
    ctx: &TcContext,
    packet: &Ipv4,
    addr: [u8; 4],
    port: u16,
) -> Option<()> {
    let port_off = if packet.proto == IPPROTO_ICMP {
        packet.l4 + ICMP_ECHO_ID
    } else {
        packet.l4 + L4_SPORT
    };
    rewrite(
        ctx,
        packet,
        IP_SRC_OFF,
        packet.src,
        addr,
        port_off,
        packet.sport,
        port,
    )
}

#[inline(always)]
pub(crate) fn rewrite_destination(
    ctx: &TcContext,
    packet: &Ipv4,
    addr: [u8; 4],
    port: u16,
) -> Option<()> {
    let port_off = if packet.proto == IPPROTO_ICMP {
        packet.l4 + ICMP_ECHO_ID
    } else {
        packet.l4 + L4_DPORT
    };
    rewrite(
        ctx,
        packet,
        IP_DST_OFF,
        packet.dst,
        addr,
        port_off,
        packet.dport,
        port,
    )
}

/// Replaces an address and a port, fixing the IP checksum and the L4 checksum (which for
/// TCP and UDP also covers the address through the pseudo-header; ICMP's does not).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rewrite(
    ctx: &TcContext,
    packet: &Ipv4,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Option<()> {
    let (old_a, new_a) = (
        u32::from_ne_bytes(old_addr) as u64,
        u32::from_ne_bytes(new_addr) as u64,
    );
    let (old_p, new_p) = (old_port.to_be() as u64, new_port.to_be() as u64);
    let (csum_off, csum_flags) = l4_checksum(packet);
    if packet.proto != IPPROTO_ICMP {
        ctx.l4_csum_replace(
            csum_off,
            old_a,
            new_a,
            csum_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .ok()?;
    }
    ctx.l4_csum_replace(csum_off, old_p, new_p, csum_flags | 2)
        .ok()?;
    ctx.store(port_off, &new_port.to_be(), 0).ok()?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_a, new_a, 4).ok()?;
    ctx.store(addr_off, &new_addr, 0).ok()?;
    Some(())
}
