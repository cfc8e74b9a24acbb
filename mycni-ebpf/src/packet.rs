//! Parsing: the parts of an IPv4 packet the programs decide on, and the context's fields.
use crate::headers::{
    ETH_HLEN, ICMP_ECHO_ID, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_TYPE, IPPROTO_ICMP,
    IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IP_MF, IP_OFFSET, L4_SPORT, TCP_ACK, TCP_FLAGS, TCP_SYN,
};
use aya_ebpf::programs::TcContext;
use mycni_common::{FlowKey, FragmentKey};
use network_types::ip::Ipv4Hdr;

/// The parts of an IPv4 packet the programs decide on.
#[derive(Clone, Copy)]
pub(crate) struct Ipv4 {
    pub(crate) src: [u8; 4],
    pub(crate) dst: [u8; 4],
    pub(crate) proto: u8,
    /// Offset of the L4 header.
    pub(crate) l4: usize,
    /// Ports in host order; ICMP echo: the identifier as both. Zero when not parsed.
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    /// TCP/UDP, or an ICMP echo, of a first (or only) fragment: translatable.
    pub(crate) has_ports: bool,
    pub(crate) icmp_type: u8,
    /// The IP identification (host order), which ties fragments together.
    pub(crate) id: u16,
    /// Part of a fragmented datagram (more fragments follow, or a later one).
    pub(crate) fragmented: bool,
    /// A fragment after the first: no L4 header.
    pub(crate) later_fragment: bool,
}

impl Ipv4 {
    pub(crate) fn flow(&self) -> FlowKey {
        FlowKey {
            saddr: self.src,
            daddr: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            pad: [0; 3],
        }
    }

    pub(crate) fn fragment(&self) -> FragmentKey {
        FragmentKey {
            saddr: self.src,
            daddr: self.dst,
            id: self.id,
            proto: self.proto,
            pad: 0,
        }
    }

    /// A TCP SYN without ACK: the first segment of a connection.
    #[inline(always)]
    pub(crate) fn opens_tcp_connection(&self, ctx: &TcContext) -> bool {
        self.proto == IPPROTO_TCP && self.has_ports && tcp_opening(ctx, self)
    }

    pub(crate) fn reply_flow(&self) -> FlowKey {
        FlowKey {
            saddr: self.dst,
            daddr: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

/// A SYN without ACK: the first segment of a connection (the caller knows it is TCP).
#[inline(always)]
pub(crate) fn tcp_opening(ctx: &TcContext, packet: &Ipv4) -> bool {
    ctx.load::<u8>(packet.l4 + TCP_FLAGS)
        .is_ok_and(|flags| flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

#[inline(always)]
pub(crate) fn parse_ipv4(ctx: &TcContext) -> Option<Ipv4> {
    // The whole fixed header in one load: a packet shorter than that was refused before
    // too (the fields read reach its last byte).
    let header = ctx.load::<Ipv4Hdr>(ETH_HLEN).ok()?;
    let ihl = header.ihl() as usize;
    if header.version() != 4 || ihl < IPV4_HLEN {
        return None;
    }
    let frag = u16::from_be_bytes(header.frags);
    let proto = header.proto;
    let l4 = ETH_HLEN + ihl;
    let mut packet = Ipv4 {
        src: header.src_addr,
        dst: header.dst_addr,
        proto,
        l4,
        sport: 0,
        dport: 0,
        has_ports: false,
        icmp_type: 0,
        id: u16::from_be_bytes(header.id),
        fragmented: frag & (IP_MF | IP_OFFSET) != 0,
        later_fragment: frag & IP_OFFSET != 0,
    };
    // Later fragments carry no L4 header.
    if packet.later_fragment {
        return Some(packet);
    }
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports = ctx.load::<[u16; 2]>(l4 + L4_SPORT).ok()?;
            packet.sport = u16::from_be(ports[0]);
            packet.dport = u16::from_be(ports[1]);
            packet.has_ports = true;
        }
        IPPROTO_ICMP => {
            packet.icmp_type = ctx.load::<u8>(l4 + ICMP_TYPE).ok()?;
            if packet.icmp_type == ICMP_ECHO_REQUEST || packet.icmp_type == ICMP_ECHO_REPLY {
                let id = u16::from_be(ctx.load::<u16>(l4 + ICMP_ECHO_ID).ok()?);
                packet.sport = id;
                packet.dport = id;
                packet.has_ports = true;
            }
        }
        _ => {}
    }
    Some(packet)
}

#[inline(always)]
pub(crate) fn ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}
