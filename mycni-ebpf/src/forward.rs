//! Redirects: straight into a local pod, to another node (direct or through VXLAN), and
//! the TTL of a routed hop.
use crate::headers::{AF_INET, ETH_DST_OFF, ETH_SRC_OFF, IP_CSUM_OFF, IP_TTL_OFF};
use crate::maps::config;
use aya_ebpf::bindings::{bpf_redir_neigh, bpf_tunnel_key, TC_ACT_SHOT};
use aya_ebpf::helpers::{
    bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_set_tunnel_key,
};
use aya_ebpf::programs::TcContext;
use mycni_common::{verdict, Route, MARK_FROM_POD, ROUTE_REMOTE_TUNNEL};

/// Rewrites the MACs for a local pod and redirects into its namespace.
#[inline(always)]
pub(crate) fn deliver_to_pod(ctx: &TcContext, route: &Route) -> Option<i32> {
    let (target, pod_mac, host_mac) = (route.ifindex, route.pod_mac, route.host_mac);
    // The destination pod drops frames not addressed to its own MAC.
    ctx.store(ETH_DST_OFF, &pod_mac, 0).ok()?;
    ctx.store(ETH_SRC_OFF, &host_mac, 0).ok()?;
    Some(unsafe { bpf_redirect_peer(target, 0) } as i32)
}

/// Sends a packet to the node that owns the destination's pod CIDR.
#[inline(always)]
pub(crate) fn send_to_node(ctx: &TcContext, route: &Route) -> (u32, i32) {
    ctx.set_mark(MARK_FROM_POD);
    if route.kind == ROUTE_REMOTE_TUNNEL {
        let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
        key.tunnel_id = config().map(|c| c.vni).unwrap_or(1);
        // The helper takes the remote address in host order.
        key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(route.next_hop);
        key.tunnel_ttl = 64;
        let set = unsafe {
            bpf_skb_set_tunnel_key(
                ctx.skb.skb,
                &mut key,
                core::mem::size_of::<bpf_tunnel_key>() as u32,
                0,
            )
        };
        if set != 0 {
            event!(
                ctx,
                Warn,
                "from_pod: dropped a packet for node {:i}: cannot set the VXLAN tunnel key (error {})",
                route.next_hop,
                set
            );
            return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
        }
        return (
            verdict::REMOTE_TUNNEL,
            unsafe { bpf_redirect(route.ifindex, 0) } as i32,
        );
    }
    let mut next_hop: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    next_hop.nh_family = AF_INET;
    next_hop.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(route.next_hop);
    let action = unsafe {
        bpf_redirect_neigh(
            route.ifindex,
            &mut next_hop,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    (verdict::REMOTE_DIRECT, action as i32)
}

/// Decrements the IPv4 TTL, fixing the header checksum; `Some(false)` when it would expire.
#[inline(always)]
pub(crate) fn decrement_ttl(ctx: &TcContext) -> Option<bool> {
    // TTL and protocol share the checksummed 16-bit word at offset 8 of the header.
    let word = ctx.load::<[u8; 2]>(IP_TTL_OFF).ok()?;
    if word[0] <= 1 {
        return Some(false);
    }
    let new = [word[0] - 1, word[1]];
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u16::from_ne_bytes(word) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )
    .ok()?;
    ctx.store(IP_TTL_OFF, &new[0], 0).ok()?;
    Some(true)
}
