//! What SNAT and its port search share: the state bits a pod's packet adds to its flow, and
//! the key its replies arrive with.
use crate::headers::{IPPROTO_ICMP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::packet::Ipv4;
use mycni_common::{nat_state, FlowKey};

/// The state bits a packet the pod sends adds to its flow's `state`.
#[inline(always)]
pub(crate) fn pod_events(state: u8, tcp_flags: u8) -> u8 {
    let mut events = 0;
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        events |= nat_state::TCP_SYN;
    }
    if tcp_flags & TCP_FIN != 0 {
        events |= nat_state::TCP_FIN_OUT;
    }
    if tcp_flags & TCP_RST != 0 {
        events |= nat_state::TCP_RST;
    }
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK && state & nat_state::REPLIED != 0 {
        events |= nat_state::TCP_ESTABLISHED;
    }
    events
}

/// The key a reply to the translated flow arrives with.
#[inline(always)]
pub(crate) fn reply_key(packet: &Ipv4, node_ip: [u8; 4], port: u16) -> FlowKey {
    let (sport, dport) = if packet.proto == IPPROTO_ICMP {
        (port, port)
    } else {
        (packet.dport, port)
    };
    FlowKey {
        saddr: packet.dst,
        daddr: node_ip,
        sport,
        dport,
        proto: packet.proto,
        pad: [0; 3],
    }
}
