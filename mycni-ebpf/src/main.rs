//! mycni's TC programs.
//!
//! `from_pod` runs on TC ingress of every pod's host veth, i.e. on packets the pod sends.
//! It answers the pod's ARP for its gateway, redirects packets for pods on this node straight
//! into the destination pod (`bpf_redirect_peer`, never touching the node stack), and hands
//! everything else to the node stack.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuArray},
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use mycni_common::{
    verdict, Counter, Endpoint, Route, MAX_ENDPOINTS, MAX_ROUTES, ROUTE_LOCAL_ENDPOINT,
};

#[btf_map]
static ROUTES: LpmTrie<[u8; 4], Route, { MAX_ROUTES as usize }> = LpmTrie::new();

#[btf_map]
static ENDPOINTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();

#[btf_map]
static STATS: PerCpuArray<Counter, { verdict::COUNT as usize }> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
// Offsets inside an Ethernet + IPv4 frame.
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
// Offsets inside an Ethernet + ARP (Ethernet/IPv4) frame.
const ARP_OP_OFF: usize = ETH_HLEN + 6;
const ARP_SHA_OFF: usize = ETH_HLEN + 8;
const ARP_SPA_OFF: usize = ETH_HLEN + 14;
const ARP_THA_OFF: usize = ETH_HLEN + 18;
const ARP_TPA_OFF: usize = ETH_HLEN + 24;
const ARP_LEN: usize = 28;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (verdict, action) = classify_from_pod(&ctx);
    count(verdict, ctx.len());
    action
}

#[inline(always)]
fn classify_from_pod(ctx: &TcContext) -> (u32, i32) {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => ipv4_from_pod(ctx),
        ETH_P_ARP => arp_from_pod(ctx),
        // IPv6 and anything else: the node stack decides.
        _ => (verdict::TO_STACK, TC_ACT_OK),
    }
}

#[inline(always)]
fn ipv4_from_pod(ctx: &TcContext) -> (u32, i32) {
    let (Ok(src), Ok(dst)) = (ctx.load::<[u8; 4]>(IP_SRC_OFF), ctx.load::<[u8; 4]>(IP_DST_OFF))
    else {
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // A pod may only send from its own address: the source must be the endpoint behind this
    // very veth. Unknown sources (an endpoint not written yet) fall through to the stack,
    // which has its own reverse-path rules.
    if let Some(endpoint) = unsafe { ENDPOINTS.get(&src) } {
        if endpoint.ifindex != ifindex {
            return (verdict::DROP_SPOOFED, TC_ACT_SHOT);
        }
    }
    let key = Key::new(32, dst);
    let Some(route) = ROUTES.get(&key) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    if route.kind != ROUTE_LOCAL_ENDPOINT {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let (target, pod_mac, host_mac) = (route.ifindex, route.pod_mac, route.host_mac);
    // The destination pod drops frames not addressed to its own MAC.
    if ctx.store(0, &pod_mac, 0).is_err() || ctx.store(6, &host_mac, 0).is_err() {
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    }
    let action = unsafe { bpf_redirect_peer(target, 0) } as i32;
    (verdict::LOCAL_REDIRECT, action)
}

/// Turns the pod's ARP request into a reply carrying the host veth's MAC and sends it back
/// out of the veth to the pod. Pods only ever ARP for their gateway (they hold a /32 and a
/// default route via 169.254.1.1), but any target gets the same answer, as proxy ARP would.
#[inline(always)]
fn arp_from_pod(ctx: &TcContext) -> (u32, i32) {
    if ctx.len() < (ETH_HLEN + ARP_LEN) as u32 {
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    }
    let (Ok(op), Ok(sha), Ok(spa), Ok(tpa)) = (
        ctx.load::<u16>(ARP_OP_OFF),
        ctx.load::<[u8; 6]>(ARP_SHA_OFF),
        ctx.load::<[u8; 4]>(ARP_SPA_OFF),
        ctx.load::<[u8; 4]>(ARP_TPA_OFF),
    ) else {
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    };
    if u16::from_be(op) != ARP_OP_REQUEST {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&spa) }) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    if endpoint.ifindex != ifindex {
        return (verdict::DROP_SPOOFED, TC_ACT_SHOT);
    }
    let host_mac = endpoint.host_mac;
    let reply = ARP_OP_REPLY.to_be();
    let stored = ctx.store(0, &sha, 0).is_ok()
        && ctx.store(6, &host_mac, 0).is_ok()
        && ctx.store(ARP_OP_OFF, &reply, 0).is_ok()
        && ctx.store(ARP_SHA_OFF, &host_mac, 0).is_ok()
        && ctx.store(ARP_SPA_OFF, &tpa, 0).is_ok()
        && ctx.store(ARP_THA_OFF, &sha, 0).is_ok()
        && ctx.store(ARP_TPA_OFF, &spa, 0).is_ok();
    if !stored {
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    }
    // Egress of the same host veth: the reply comes out of the pod's eth0.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    (verdict::ARP_REPLY, action)
}

#[inline(always)]
fn count(verdict: u32, bytes: u32) {
    if let Some(counter) = STATS.get_ptr_mut(verdict) {
        // Per-CPU slot: no other CPU writes it, so plain adds are safe.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
