//! Refusals when SNAT has no port: a TCP RST or an ICMP "administratively prohibited"
//! written in place and sent back to the pod.
use crate::headers::{
    ETH_DST_OFF, ETH_HLEN, ETH_SRC_OFF, ICMP_CHECK, ICMP_CODE, ICMP_DEST_UNREACH, ICMP_HLEN,
    ICMP_TYPE, IPPROTO_ICMP, IPPROTO_TCP, IPV4_CHECK, IPV4_DST, IPV4_FRAGS, IPV4_HLEN, IPV4_PROTO,
    IPV4_SRC, IPV4_TOT_LEN, IPV4_TTL, IPV4_VIHL, IP_TOT_LEN_OFF, L4_DPORT, L4_SPORT, TCP_ACK,
    TCP_ACK_SEQ, TCP_CHECK, TCP_DOFF, TCP_FIN, TCP_FLAGS, TCP_HLEN, TCP_RST, TCP_SEQ, TCP_SYN,
};
use crate::maps::ENDPOINTS;
use crate::packet::Ipv4;
use aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC;
use aya_ebpf::helpers::{bpf_redirect, bpf_skb_change_tail};
use aya_ebpf::programs::TcContext;
use mycni_common::NodeConfig;

/// Answers a pod's TCP packet with a RST, as a refusing host would: the packet is
/// turned around in place (truncated to bare IP + TCP headers) and sent out of the pod's
/// host veth, so the pod's connect fails at once with ECONNREFUSED. `None` when the
/// packet cannot be answered (not TCP, a RST itself, IP options, no endpoint).
#[inline(always)]
pub(crate) fn refuse_tcp(ctx: &TcContext, packet: &Ipv4, tcp_flags: u8) -> Option<i32> {
    if packet.proto != IPPROTO_TCP || packet.l4 != ETH_HLEN + IPV4_HLEN || tcp_flags & TCP_RST != 0
    {
        return None;
    }
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let endpoint = unsafe { ENDPOINTS.get(packet.src) }?;
    let (veth, pod_mac, host_mac) = (endpoint.ifindex, endpoint.pod_mac, endpoint.host_mac);
    let seq = u32::from_be(ctx.load::<u32>(packet.l4 + TCP_SEQ).ok()?);
    let ack = u32::from_be(ctx.load::<u32>(packet.l4 + TCP_ACK_SEQ).ok()?);
    let header_len = ((ctx.load::<u8>(packet.l4 + TCP_DOFF).ok()? >> 4) as u32) * 4;
    let total_len = u16::from_be(ctx.load::<u16>(IP_TOT_LEN_OFF).ok()?) as u32;
    let payload = total_len.saturating_sub(IPV4_HLEN as u32 + header_len);
    // RFC 9293 3.10.7.1: answer an ACK with its ack number as our sequence; otherwise
    // sequence 0 and acknowledge everything the segment occupied.
    let (rst_seq, rst_ack, rst_flags) = if tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let occupied =
            payload + (tcp_flags & TCP_SYN != 0) as u32 + (tcp_flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    let ip = ipv4_header(
        (IPV4_HLEN + TCP_HLEN) as u16,
        true,
        IPPROTO_TCP,
        &packet.dst,
        &packet.src,
    );
    let mut tcp = [0u8; TCP_HLEN];
    tcp[L4_SPORT..L4_SPORT + 2].copy_from_slice(&packet.dport.to_be_bytes());
    tcp[L4_DPORT..L4_DPORT + 2].copy_from_slice(&packet.sport.to_be_bytes());
    tcp[TCP_SEQ..TCP_SEQ + 4].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[TCP_ACK_SEQ..TCP_ACK_SEQ + 4].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[TCP_DOFF] = ((TCP_HLEN / 4) << 4) as u8;
    tcp[TCP_FLAGS] = rst_flags;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&packet.dst);
    pseudo[4..8].copy_from_slice(&packet.src);
    pseudo[9] = IPPROTO_TCP;
    pseudo[11] = TCP_HLEN as u8;
    let tcp_csum = fold(sum_words(&pseudo) + sum_words(&tcp));
    tcp[TCP_CHECK..TCP_CHECK + 2].copy_from_slice(&tcp_csum.to_be_bytes());
    // SAFETY: the helper takes the context's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + IPV4_HLEN + TCP_HLEN) as u32, 0) } != 0
    {
        return None;
    }
    send_answer_to_pod(ctx, veth, &pod_mac, &host_mac, &ip, &tcp)
}

/// Answers a pod's UDP datagram or ICMP echo with an ICMP "communication administratively
/// prohibited" (type 3 code 13) from the node IP, quoting its IP header and first 8 bytes,
/// as a filtering router would: the packet is cut to that quote, a new IP and ICMP header
/// go in front, and it is sent out of the pod's host veth. The pod's connected socket sees
/// EHOSTUNREACH at once. `None` when it cannot be answered (IP options, no endpoint).
#[inline(always)]
pub(crate) fn refuse_with_icmp(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> Option<i32> {
    // The IP header and the first 8 bytes of the datagram (RFC 792).
    const QUOTE: usize = IPV4_HLEN + 8;
    if packet.l4 != ETH_HLEN + IPV4_HLEN {
        return None;
    }
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let endpoint = unsafe { ENDPOINTS.get(packet.src) }?;
    let (veth, pod_mac, host_mac) = (endpoint.ifindex, endpoint.pod_mac, endpoint.host_mac);
    let quote = ctx.load::<[u8; QUOTE]>(ETH_HLEN).ok()?;
    let ip = ipv4_header(
        (IPV4_HLEN + ICMP_HLEN + QUOTE) as u16,
        false,
        IPPROTO_ICMP,
        &cfg.node_ip,
        &packet.src,
    );
    let mut icmp = [0u8; ICMP_HLEN];
    icmp[ICMP_TYPE] = ICMP_DEST_UNREACH;
    icmp[ICMP_CODE] = 13;
    let icmp_csum = fold(sum_words(&icmp) + sum_words(&quote));
    icmp[ICMP_CHECK..ICMP_CHECK + 2].copy_from_slice(&icmp_csum.to_be_bytes());
    // SAFETY: the helpers take the context's own skb.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + QUOTE) as u32, 0) != 0 {
            return None;
        }
    }
    ctx.adjust_room((IPV4_HLEN + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .ok()?;
    send_answer_to_pod(ctx, veth, &pod_mac, &host_mac, &ip, &icmp)
}

/// A 20-byte IPv4 header (no options, TTL 64) with its checksum, for an answer the
/// datapath writes itself.
#[inline(always)]
pub(crate) fn ipv4_header(
    total_len: u16,
    dont_fragment: bool,
    proto: u8,
    src: &[u8; 4],
    dst: &[u8; 4],
) -> [u8; IPV4_HLEN] {
    let mut ip = [0u8; IPV4_HLEN];
    ip[IPV4_VIHL] = 0x40 | (IPV4_HLEN / 4) as u8;
    ip[IPV4_TOT_LEN..IPV4_TOT_LEN + 2].copy_from_slice(&total_len.to_be_bytes());
    if dont_fragment {
        ip[IPV4_FRAGS] = 0x40;
    }
    ip[IPV4_TTL] = 64;
    ip[IPV4_PROTO] = proto;
    ip[IPV4_SRC..IPV4_SRC + 4].copy_from_slice(src);
    ip[IPV4_DST..IPV4_DST + 4].copy_from_slice(dst);
    let ip_csum = fold(sum_words(&ip));
    ip[IPV4_CHECK..IPV4_CHECK + 2].copy_from_slice(&ip_csum.to_be_bytes());
    ip
}

/// Writes an answer's Ethernet (host veth to pod), IP and L4 headers over the start of
/// the packet, already sized to hold them, and sends it out of the pod's host veth: it
/// arrives on the pod's eth0.
#[inline(always)]
pub(crate) fn send_answer_to_pod<const L4_LEN: usize>(
    ctx: &TcContext,
    veth: u32,
    pod_mac: &[u8; 6],
    host_mac: &[u8; 6],
    ip: &[u8; IPV4_HLEN],
    l4: &[u8; L4_LEN],
) -> Option<i32> {
    ctx.store(ETH_DST_OFF, pod_mac, 0).ok()?;
    ctx.store(ETH_SRC_OFF, host_mac, 0).ok()?;
    ctx.store(ETH_HLEN, ip, 0).ok()?;
    ctx.store(ETH_HLEN + IPV4_HLEN, l4, 0).ok()?;
    // SAFETY: redirects the context's own skb.
    Some(unsafe { bpf_redirect(veth, 0) } as i32)
}

/// The one's complement sum of big-endian 16-bit words, not folded.
#[inline(always)]
pub(crate) fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a sum into a 16-bit Internet checksum.
#[inline(always)]
pub(crate) fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
