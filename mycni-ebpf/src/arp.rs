//! ARP: a pod's requests answered with the host veth's MAC, anything spoofed dropped.
use crate::headers::{
    ARP_OP_OFF, ARP_OP_REPLY, ARP_OP_REQUEST, ARP_SHA_OFF, ARP_SPA_OFF, ARP_THA_OFF, ARP_TPA_OFF,
    ETH_DST_OFF, ETH_SRC_OFF,
};
use crate::maps::ENDPOINTS;
use crate::packet::ifindex;
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::helpers::bpf_redirect;
use aya_ebpf::programs::TcContext;
use mycni_common::verdict;

/// Turns the pod's ARP request into a reply carrying the host veth's MAC and sends it back
/// out of the veth to the pod. Pods only ever ARP for their gateway (they hold a /32 and a
/// default route via 169.254.1.1), but any target gets the same answer, as proxy ARP would.
#[inline(always)]
pub(crate) fn arp_from_pod(ctx: &TcContext) -> (u32, i32) {
    let (Ok(op), Ok(sha), Ok(spa), Ok(tpa)) = (
        ctx.load::<u16>(ARP_OP_OFF),
        ctx.load::<[u8; 6]>(ARP_SHA_OFF),
        ctx.load::<[u8; 4]>(ARP_SPA_OFF),
        ctx.load::<[u8; 4]>(ARP_TPA_OFF),
    ) else {
        event!(
            ctx,
            Debug,
            "from_pod: dropped a truncated ARP packet on ifindex {}",
            ifindex(ctx)
        );
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    };
    // A pod speaks ARP only for itself (its address and its MAC), requests and replies
    // alike: whatever reaches the stack could teach the node's neighbour table a lie.
    let ifindex = ifindex(ctx);
    let Some(endpoint) = (unsafe { ENDPOINTS.get(spa) }) else {
        event!(
            ctx,
            Warn,
            "from_pod: dropped spoofed ARP from {:i} on ifindex {}: no pod holds that address",
            spa,
            ifindex
        );
        return (verdict::DROP_SPOOFED, TC_ACT_SHOT);
    };
    if endpoint.ifindex != ifindex {
        event!(
            ctx,
            Warn,
            "from_pod: dropped spoofed ARP from {:i} on ifindex {}: that address is the pod on ifindex {}",
            spa,
            ifindex,
            endpoint.ifindex
        );
        return (verdict::DROP_SPOOFED, TC_ACT_SHOT);
    }
    if sha != endpoint.pod_mac {
        event!(
            ctx,
            Warn,
            "from_pod: dropped spoofed ARP from {:i} on ifindex {}: the sender MAC is not the pod's",
            spa,
            ifindex
        );
        return (verdict::DROP_SPOOFED, TC_ACT_SHOT);
    }
    if u16::from_be(op) != ARP_OP_REQUEST {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let host_mac = endpoint.host_mac;
    let reply = ARP_OP_REPLY.to_be();
    let stored = ctx.store(ETH_DST_OFF, &sha, 0).is_ok()
        && ctx.store(ETH_SRC_OFF, &host_mac, 0).is_ok()
        && ctx.store(ARP_OP_OFF, &reply, 0).is_ok()
        && ctx.store(ARP_SHA_OFF, &host_mac, 0).is_ok()
        && ctx.store(ARP_SPA_OFF, &tpa, 0).is_ok()
        && ctx.store(ARP_THA_OFF, &sha, 0).is_ok()
        && ctx.store(ARP_TPA_OFF, &spa, 0).is_ok();
    if !stored {
        event!(
            ctx,
            Debug,
            "from_pod: dropped an ARP request from {:i}: cannot turn it into a reply",
            spa
        );
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    }
    // Egress of the same host veth: the reply comes out of the pod's eth0.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    (verdict::ARP_REPLY, action)
}
