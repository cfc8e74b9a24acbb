//! SNAT: a pod's packet leaving the cluster gets the node IP and the flow's port; later
//! fragments follow their first; what cannot be translated is dropped.
use super::flow::{pod_events, reply_key};
use super::ports::{allocate_port, PortError};
use super::refuse::{refuse_tcp, refuse_with_icmp};
use crate::fragments::remember_fragment;
use crate::headers::{IPPROTO_TCP, IP_SRC_OFF, TCP_ACK, TCP_FLAGS, TCP_SYN};
use crate::maps::{FRAGMENTS, NAT};
use crate::packet::Ipv4;
use crate::rewrite::{rewrite_address, rewrite_source};
use aya_ebpf::bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::programs::TcContext;
use mycni_common::{nat_state, verdict, NatEntry, NodeConfig, FRAGMENT_SNAT, NAT_INGRESS};

/// A later fragment of a pod's datagram: gets the source its first fragment got.
#[inline(always)]
pub(crate) fn snat_later_fragment(ctx: &TcContext, packet: &Ipv4) -> (u32, i32) {
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let first = unsafe { FRAGMENTS.get(packet.fragment()) };
    let Some(addr) = first
        .filter(|first| first.action == FRAGMENT_SNAT)
        .map(|first| first.addr)
    else {
        // Its first fragment never passed (or was forgotten): sending it with the pod's
        // address would leak it, and nobody could reassemble it anyway.
        event!(
            ctx,
            Debug,
            "to_netdev: dropped a fragment of datagram {} from {:i} to {:i}: its first fragment was not translated",
            packet.id,
            packet.src,
            packet.dst
        );
        return (verdict::DROP_FRAGMENT_UNTRACKED, TC_ACT_SHOT);
    };
    match rewrite_address(ctx, IP_SRC_OFF, packet.src, addr) {
        Some(()) => (verdict::FRAGMENT_TRANSLATED, TC_ACT_OK),
        None => (verdict::DROP_MALFORMED, TC_ACT_SHOT),
    }
}

/// The drop for a pod's packet that needs masquerading but that SNAT has no port for (SCTP,
/// GRE, ICMP other than echo requests and errors about known flows): it must not leave
/// with the pod's address.
#[inline(always)]
pub(crate) fn untranslatable(ctx: &TcContext, packet: &Ipv4) -> (u32, i32) {
    event!(
        ctx,
        Info,
        "to_netdev: dropped proto {} (ICMP type {}) from {:i} to {:i}: it needs masquerading and SNAT cannot translate it",
        packet.proto,
        packet.icmp_type,
        packet.src,
        packet.dst
    );
    (verdict::DROP_UNTRANSLATABLE, TC_ACT_SHOT)
}

/// Masquerades a pod's packet to the node IP, reusing the flow's port or finding a free one.
#[inline(always)]
pub(crate) fn snat(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> (u32, i32) {
    let now = unsafe { bpf_ktime_get_ns() };
    let tcp_flags = if packet.proto == IPPROTO_TCP {
        ctx.load::<u8>(packet.l4 + TCP_FLAGS).unwrap_or(0)
    } else {
        0
    };
    let port = match existing_port(packet, cfg, now, tcp_flags) {
        Some(port) => port,
        None => match allocate_port(packet, cfg, now, tcp_flags) {
            Ok(port) => {
                event!(
                    ctx,
                    Debug,
                    "to_netdev: new SNAT flow, proto {} {:i}:{} -> {:i}:{} leaves as port {}",
                    packet.proto,
                    packet.src,
                    packet.sport,
                    packet.dst,
                    packet.dport,
                    port
                );
                port
            }
            Err(PortError::Exhausted) => {
                event!(
                    ctx,
                    Warn,
                    "to_netdev: proto {} {:i}:{} -> {:i}:{}: no free SNAT port; refused",
                    packet.proto,
                    packet.src,
                    packet.sport,
                    packet.dst,
                    packet.dport
                );
                // Tell the pod at once (connection refused, host unreachable) instead of
                // letting it retry into the void.
                let refusal = if packet.proto == IPPROTO_TCP {
                    refuse_tcp(ctx, packet, tcp_flags)
                } else {
                    refuse_with_icmp(ctx, packet, cfg)
                };
                let action = refusal.unwrap_or(TC_ACT_SHOT);
                return (verdict::DROP_NAT_EXHAUSTED, action);
            }
            Err(PortError::Record(error)) => {
                event!(
                    ctx,
                    Warn,
                    "to_netdev: dropped proto {} {:i}:{} -> {:i}:{}: cannot record its SNAT entry (error {})",
                    packet.proto,
                    packet.src,
                    packet.sport,
                    packet.dst,
                    packet.dport,
                    error
                );
                return (verdict::DROP_NAT_EXHAUSTED, TC_ACT_SHOT);
            }
        },
    };
    match rewrite_source(ctx, packet, cfg.node_ip, port) {
        Some(()) => {
            if packet.fragmented {
                remember_fragment(packet, FRAGMENT_SNAT, cfg.node_ip);
            }
            (verdict::SNAT, TC_ACT_OK)
        }
        None => {
            event!(
                ctx,
                Debug,
                "to_netdev: dropped a packet from {:i} to {:i}: cannot rewrite its source",
                packet.src,
                packet.dst
            );
            (verdict::DROP_MALFORMED, TC_ACT_SHOT)
        }
    }
}

/// The port of a flow already translated, refreshing both of its entries and recording
/// the pod's TCP flags; `None` when the flow needs a (new) port.
#[inline(always)]
pub(crate) fn existing_port(
    packet: &Ipv4,
    cfg: &NodeConfig,
    now: u64,
    tcp_flags: u8,
) -> Option<u16> {
    let flow = packet.flow();
    let entry = NAT.get_ptr_mut(flow)?;
    // SAFETY: `entry` and `back` point into NAT values, valid for this program run.
    let (port, mut state) = unsafe { ((*entry).port, (*entry).state) };
    let reply = reply_key(packet, cfg.node_ip, port);
    let back = match NAT.get_ptr_mut(reply) {
        // SAFETY: NAT value pointers stay valid for this program run.
        Some(back) if unsafe { (*back).addr == packet.src && (*back).port == packet.sport } => back,
        Some(_) => {
            // Another flow holds the port now: it took it over once this flow had closed.
            // A late packet of the closed flow (its last ACK) still leaves with its port;
            // anything else starts a new flow.
            if nat_state::tcp_closed(state) && tcp_flags & TCP_SYN == 0 {
                return Some(port);
            }
            let _ = NAT.remove(&flow);
            return None;
        }
        None => {
            // The reply half went (expired or evicted): claim the port again, atomically.
            let back = NatEntry {
                addr: packet.src,
                port: packet.sport,
                direction: NAT_INGRESS,
                state,
                last_seen_ns: now,
            };
            if NAT.insert(reply, back, BPF_NOEXIST as u64).is_err() {
                let _ = NAT.remove(&flow);
                return None;
            }
            NAT.get_ptr_mut(reply)?
        }
    };
    if nat_state::tcp_closed(state) && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection on the same addresses and ports: start its state afresh.
        state = 0;
        // SAFETY: as above.
        unsafe {
            (*entry).state = 0;
            (*back).state = 0;
        }
    }
    let events = pod_events(state, tcp_flags);
    // SAFETY: as above.
    unsafe {
        (*entry).last_seen_ns = now;
        (*back).last_seen_ns = now;
        if state & events != events {
            (*entry).state = state | events;
            (*back).state |= state | events;
        }
    }
    Some(port)
}
