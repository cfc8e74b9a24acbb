//! Reverse NAT: replies of masqueraded flows (and their later fragments) translated back
//! to the pod, recording what the peer's packets say about the flow's state.
use super::icmp_error::icmp_error_to_pod;
use crate::fragments::remember_fragment;
use crate::headers::{
    ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST, ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, IPPROTO_ICMP,
    IPPROTO_TCP, IP_DST_OFF, TCP_FIN, TCP_FLAGS, TCP_RST,
};
use crate::maps::{FRAGMENTS, NAT};
use crate::packet::Ipv4;
use crate::rewrite::{rewrite_address, rewrite_destination};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::programs::TcContext;
use mycni_common::{nat_state, verdict, FlowKey, NatEntry, NodeConfig, FRAGMENT_REVERSE_NAT};

/// Translates a packet for the node IP back to the pod when it belongs to a masqueraded
/// flow: a reply, a later fragment of one, or an ICMP error about the flow. `Ok(None)`:
/// not ours, the node's own traffic.
#[inline(always)]
pub(crate) fn reverse_nat(
    ctx: &TcContext,
    packet: &Ipv4,
    cfg: &NodeConfig,
) -> Result<Option<u32>, ()> {
    if packet.has_ports && packet.icmp_type != ICMP_ECHO_REQUEST {
        let Some(entry) = NAT.get_ptr_mut(packet.flow()) else {
            return Ok(None);
        };
        // SAFETY: `entry` points into a NAT value, valid for this program run.
        let (addr, port) = unsafe {
            (*entry).last_seen_ns = bpf_ktime_get_ns();
            ((*entry).addr, (*entry).port)
        };
        track_reply(ctx, packet, entry);
        rewrite_destination(ctx, packet, addr, port).ok_or(())?;
        if packet.fragmented {
            remember_fragment(packet, FRAGMENT_REVERSE_NAT, addr);
        }
        return Ok(Some(verdict::REVERSE_NAT));
    }
    if packet.later_fragment {
        // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
        let Some(first) = (unsafe { FRAGMENTS.get(packet.fragment()) }) else {
            return Ok(None);
        };
        if first.action != FRAGMENT_REVERSE_NAT {
            return Ok(None);
        }
        let addr = first.addr;
        rewrite_address(ctx, IP_DST_OFF, packet.dst, addr).ok_or(())?;
        return Ok(Some(verdict::FRAGMENT_TRANSLATED));
    }
    if packet.proto == IPPROTO_ICMP
        && matches!(
            packet.icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    {
        return icmp_error_to_pod(ctx, packet, cfg);
    }
    Ok(None)
}

/// Records what a reply says about the flow in both of its entries: answered, and for
/// TCP a FIN or RST from the peer. Writes only when something changes.
#[inline(always)]
pub(crate) fn track_reply(ctx: &TcContext, packet: &Ipv4, entry: *mut NatEntry) {
    let mut events = nat_state::REPLIED;
    if packet.proto == IPPROTO_TCP {
        let flags = ctx.load::<u8>(packet.l4 + TCP_FLAGS).unwrap_or(0);
        if flags & TCP_FIN != 0 {
            events |= nat_state::TCP_FIN_IN;
        }
        if flags & TCP_RST != 0 {
            events |= nat_state::TCP_RST;
        }
    }
    // SAFETY: `entry` points into a NAT value, valid for this program run.
    let (state, pod, pod_port) = unsafe { ((*entry).state, (*entry).addr, (*entry).port) };
    if state & events == events {
        return;
    }
    let state = state | events;
    unsafe { (*entry).state = state };
    let forward = FlowKey {
        saddr: pod,
        daddr: packet.src,
        sport: pod_port,
        dport: if packet.proto == IPPROTO_ICMP {
            pod_port
        } else {
            packet.sport
        },
        proto: packet.proto,
        pad: [0; 3],
    };
    if let Some(out) = NAT.get_ptr_mut(forward) {
        // SAFETY: as above.
        unsafe { (*out).state |= state };
    }
}
