//! ICMP errors about masqueraded flows: translated to the pod on the way in, to the node IP
//! on the way out, quote included.
use crate::headers::{
    ICMP_CHECK, ICMP_ECHO_ID, ICMP_ECHO_REQUEST, ICMP_HLEN, ICMP_TYPE, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, IPV4_CHECK, IPV4_DST, IPV4_HLEN, IPV4_PROTO, IPV4_SRC, IPV4_VIHL, IP_DST_OFF,
    IP_SRC_OFF, L4_DPORT, L4_SPORT,
};
use crate::maps::{NAT, STACK_FLOWS};
use crate::packet::Ipv4;
use crate::rewrite::rewrite_address;
use aya_ebpf::programs::TcContext;
use mycni_common::{verdict, FlowKey, NodeConfig};

/// An ICMP error (unreachable, fragmentation needed, time exceeded, parameter problem) for
/// the node IP that quotes a masqueraded packet (node IP and port -> peer): rewrites the
/// outer destination and the quoted source address and port to the pod's, fixing the
/// quoted IP header's checksum and the ICMP checksum. The quoted TCP/UDP checksum is left
/// as is: receivers do not check it (Linux's NAT leaves it too when the quote is short).
#[inline(always)]
pub(crate) fn icmp_error_to_pod(
    ctx: &TcContext,
    packet: &Ipv4,
    cfg: &NodeConfig,
) -> Result<Option<u32>, ()> {
    let inner = packet.l4 + ICMP_HLEN;
    let Ok(version_ihl) = ctx.load::<u8>(inner + IPV4_VIHL) else {
        return Ok(None);
    };
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return Ok(None);
    }
    let (Ok(proto), Ok(inner_src), Ok(inner_dst)) = (
        ctx.load::<u8>(inner + IPV4_PROTO),
        ctx.load::<[u8; 4]>(inner + IPV4_SRC),
        ctx.load::<[u8; 4]>(inner + IPV4_DST),
    ) else {
        return Ok(None);
    };
    if inner_src != cfg.node_ip {
        return Ok(None);
    }
    let inner_l4 = inner + ihl;
    let (port_off, key) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Ok(ports) = ctx.load::<[u16; 2]>(inner_l4 + L4_SPORT) else {
                return Ok(None);
            };
            let (sport, dport) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
            (inner_l4 + L4_SPORT, (dport, sport))
        }
        IPPROTO_ICMP => {
            let (Ok(kind), Ok(id)) = (
                ctx.load::<u8>(inner_l4 + ICMP_TYPE),
                ctx.load::<u16>(inner_l4 + ICMP_ECHO_ID),
            ) else {
                return Ok(None);
            };
            if kind != ICMP_ECHO_REQUEST {
                return Ok(None);
            }
            let id = u16::from_be(id);
            (inner_l4 + ICMP_ECHO_ID, (id, id))
        }
        _ => return Ok(None),
    };
    // The entry replies of the quoted packet's flow arrive with.
    let reply = FlowKey {
        saddr: inner_dst,
        daddr: cfg.node_ip,
        sport: key.0,
        dport: key.1,
        proto,
        pad: [0; 3],
    };
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let Some(entry) = (unsafe { NAT.get(reply) }) else {
        return Ok(None);
    };
    let (pod, pod_port, nat_port) = (entry.addr, entry.port, key.1);
    rewrite_quote(
        ctx,
        packet,
        inner + IPV4_SRC,
        cfg.node_ip,
        pod,
        port_off,
        nat_port,
        pod_port,
    )
    .ok_or(())?;
    rewrite_address(ctx, IP_DST_OFF, packet.dst, pod).ok_or(())?;
    Ok(Some(verdict::ICMP_ERROR_TRANSLATED))
}

/// Rewrites an address and a port in the packet an ICMP error quotes (`addr_off` inside
/// the quoted IP header after the ICMP header), fixing the quoted IP header's checksum and
/// the ICMP checksum, which covers the whole quote.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rewrite_quote(
    ctx: &TcContext,
    packet: &Ipv4,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Option<()> {
    let inner = packet.l4 + ICMP_HLEN;
    let icmp_csum = packet.l4 + ICMP_CHECK;
    let (old_a, new_a) = (
        u32::from_ne_bytes(old_addr) as u64,
        u32::from_ne_bytes(new_addr) as u64,
    );
    // The quoted IP header's checksum first, then the address; the ICMP checksum covers
    // both changes.
    let old_csum = ctx.load::<u16>(inner + IPV4_CHECK).ok()?;
    ctx.l3_csum_replace(inner + IPV4_CHECK, old_a, new_a, 4)
        .ok()?;
    let new_csum = ctx.load::<u16>(inner + IPV4_CHECK).ok()?;
    ctx.l4_csum_replace(icmp_csum, old_csum as u64, new_csum as u64, 2)
        .ok()?;
    ctx.l4_csum_replace(icmp_csum, old_a, new_a, 4).ok()?;
    ctx.store(addr_off, &new_addr, 0).ok()?;
    let (old_p, new_p) = (old_port.to_be(), new_port.to_be());
    ctx.l4_csum_replace(icmp_csum, old_p as u64, new_p as u64, 2)
        .ok()?;
    ctx.store(port_off, &new_p, 0).ok()
}

/// The packet an ICMP error quotes, when it is an IPv4 TCP/UDP packet sent to the error's
/// sender (quoted: peer -> sender).
pub(crate) struct Quote {
    /// The sender's side of the quoted flow: sender -> peer, ports likewise.
    pub(crate) sender_flow: FlowKey,
    /// Where the quoted destination address (the sender's) lies in the packet.
    pub(crate) destination_offset: usize,
    /// Where the quoted destination port lies.
    pub(crate) destination_port_offset: usize,
}

/// An IPv4 TCP/UDP packet an ICMP error quotes, as quoted, and where its addresses and
/// ports lie in the error.
pub(crate) struct Quoted {
    pub(crate) flow: FlowKey,
    pub(crate) source_offset: usize,
    pub(crate) destination_offset: usize,
    pub(crate) source_port_offset: usize,
    pub(crate) destination_port_offset: usize,
}

/// Reads the quote of the ICMP error `packet` (its type already checked). `None`: the quote
/// is not an IPv4 TCP/UDP header with its ports.
#[inline(always)]
fn read_quote(ctx: &TcContext, packet: &Ipv4) -> Option<Quoted> {
    let inner = packet.l4 + ICMP_HLEN;
    let version_ihl = ctx.load::<u8>(inner + IPV4_VIHL).ok()?;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return None;
    }
    let proto = ctx.load::<u8>(inner + IPV4_PROTO).ok()?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let source = ctx.load::<[u8; 4]>(inner + IPV4_SRC).ok()?;
    let destination = ctx.load::<[u8; 4]>(inner + IPV4_DST).ok()?;
    let inner_l4 = inner + ihl;
    let ports = ctx.load::<[u16; 2]>(inner_l4 + L4_SPORT).ok()?;
    Some(Quoted {
        flow: FlowKey {
            saddr: source,
            daddr: destination,
            sport: u16::from_be(ports[0]),
            dport: u16::from_be(ports[1]),
            proto,
            pad: [0; 3],
        },
        source_offset: inner + IPV4_SRC,
        destination_offset: inner + IPV4_DST,
        source_port_offset: inner_l4 + L4_SPORT,
        destination_port_offset: inner_l4 + L4_DPORT,
    })
}

/// Reads the quote of the ICMP error `packet` (its type already checked). `None`: the quote
/// is not IPv4 TCP/UDP, or not about a packet to the error's sender.
#[inline(always)]
pub(crate) fn quote_about_sender(ctx: &TcContext, packet: &Ipv4) -> Option<Quote> {
    let quoted = read_quote(ctx, packet)?;
    if quoted.flow.daddr != packet.src {
        return None;
    }
    Some(Quote {
        sender_flow: quoted.flow.reversed(),
        destination_offset: quoted.destination_offset,
        destination_port_offset: quoted.destination_port_offset,
    })
}

/// Reads the quote of the ICMP error `packet` (its type already checked) when it is a
/// packet the error's receiver sent (quoted: receiver -> peer), whoever reports it: the
/// peer itself, or a router on the way ("fragmentation needed"). `None` otherwise.
#[inline(always)]
pub(crate) fn quote_about_receiver(ctx: &TcContext, packet: &Ipv4) -> Option<Quoted> {
    let quoted = read_quote(ctx, packet)?;
    (quoted.flow.saddr == packet.dst).then_some(quoted)
}

/// An ICMP error a pod sends about a reply of its masqueraded flow (peer -> pod, quoted):
/// leaves like the flow, from the node IP, quoting peer -> node IP and port, so the peer
/// relates it to the connection it knows. About a flow the stack delivered to the pod:
/// leaves untouched (`STACK_FLOW_REPLY`). `None`: about no flow we know.
#[inline(always)]
pub(crate) fn icmp_error_from_pod(ctx: &TcContext, packet: &Ipv4) -> Option<u32> {
    let quote = quote_about_sender(ctx, packet)?;
    let forward = &quote.sender_flow;
    let (pod, pod_port) = (forward.saddr, forward.sport);
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let Some(entry) = (unsafe { NAT.get(forward) }) else {
        // About a flow the stack delivered to the pod (its reply tuple is `forward`): the
        // peer knows the pod's address, so the error leaves as it is.
        // SAFETY: only the entry's presence is read.
        return unsafe { STACK_FLOWS.get(forward) }
            .is_some()
            .then_some(verdict::STACK_FLOW_REPLY);
    };
    let (node_ip, nat_port) = (entry.addr, entry.port);
    rewrite_quote(
        ctx,
        packet,
        quote.destination_offset,
        pod,
        node_ip,
        quote.destination_port_offset,
        pod_port,
        nat_port,
    )?;
    rewrite_address(ctx, IP_SRC_OFF, packet.src, node_ip)?;
    Some(verdict::ICMP_ERROR_TRANSLATED)
}
