//! The pod side (host veth): what `from_pod` does with a pod's packets, and what `to_pod`
//! remembers of the packets the node stack delivers to a pod.
use crate::arp::arp_from_pod;
use crate::external::{local_pods_reached_frontends_from_outside, reply_from_pod};
use crate::forward::{decrement_ttl, deliver_to_pod, send_to_node};
use crate::headers::{ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF};
use crate::maps::{ENDPOINTS, ROUTES};
use crate::packet::{ifindex, parse_ipv4};
use crate::policy::{enforce, Site};
use crate::stack_flows::{forget_stack_flow, remember_stack_flow, stack_flow_reply};
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::programs::TcContext;
use mycni_common::{
    verdict, MARK_REVERSE_NAT, ROUTE_LOCAL_CIDR, ROUTE_LOCAL_ENDPOINT, ROUTE_REMOTE_NODE,
    ROUTE_REMOTE_TUNNEL,
};

#[inline(always)]
pub(crate) fn classify_from_pod(ctx: &TcContext) -> (u32, i32) {
    let Ok(ethertype) = ctx.load::<u16>(ETH_TYPE_OFF) else {
        event!(
            ctx,
            Debug,
            "from_pod: dropped a runt frame on ifindex {}",
            ifindex(ctx)
        );
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => ipv4_from_pod(ctx),
        ETH_P_ARP => arp_from_pod(ctx),
        // IPv4 only until dual-stack lands: a pod's router advertisement or redirect must
        // never reach the node stack. Every pod sends some (its own neighbour discovery),
        // so the message is at trace, where it cannot crowd out the debug ones.
        ETH_P_IPV6 => {
            event!(
                ctx,
                Trace,
                "from_pod: dropped IPv6 on ifindex {}: pods get IPv4 only",
                ifindex(ctx)
            );
            (verdict::DROP_IPV6, TC_ACT_SHOT)
        }
        // Anything else: the node stack decides.
        _ => (verdict::TO_STACK, TC_ACT_OK),
    }
}

#[inline(always)]
pub(crate) fn ipv4_from_pod(ctx: &TcContext) -> (u32, i32) {
    let Some(packet) = parse_ipv4(ctx) else {
        event!(
            ctx,
            Debug,
            "from_pod: dropped an IPv4 packet with a malformed header on ifindex {}",
            ifindex(ctx)
        );
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    };
    // A pod may only send from its own address: the source must be the endpoint behind this
    // very veth, whatever the destination. (The plugin writes the endpoint and attaches
    // this program before the veth comes up, so a pod's first packet already passes.)
    match unsafe { ENDPOINTS.get(packet.src) } {
        Some(endpoint) if endpoint.ifindex == ifindex(ctx) => {}
        Some(endpoint) => {
            event!(
                ctx,
                Warn,
                "from_pod: dropped spoofed IPv4 from {:i} to {:i} (proto {}) on ifindex {}: that source is the pod on ifindex {}",
                packet.src,
                packet.dst,
                packet.proto,
                ifindex(ctx),
                endpoint.ifindex
            );
            return (verdict::DROP_SPOOFED, TC_ACT_SHOT);
        }
        None => {
            event!(
                ctx,
                Warn,
                "from_pod: dropped spoofed IPv4 from {:i} to {:i} (proto {}) on ifindex {}: no pod holds that source",
                packet.src,
                packet.dst,
                packet.proto,
                ifindex(ctx)
            );
            return (verdict::DROP_SPOOFED, TC_ACT_SHOT);
        }
    }
    let route = ROUTES.get(&Key::new(32, packet.dst));
    // A backend's reply to a client that reached a NodePort or externalIP from outside. A
    // client outside is never a pod of this node, so a packet to a local pod skips the
    // `EXTERNAL_NAT` lookup, unless this node has ever served one of its own pods that way
    // (an unmasqueraded flow that left and came back in through the uplink).
    let to_local_pod = route.is_some_and(|route| route.kind == ROUTE_LOCAL_ENDPOINT);
    if !to_local_pod || local_pods_reached_frontends_from_outside() {
        if let Some(result) = reply_from_pod(ctx, &packet) {
            return result;
        }
    }
    // Policy before any forwarding decision: on a redirect the packet reaches its
    // destination pod without passing any other hook (`bpf_redirect_peer` skips the
    // destination veth's), so both ends' policies are checked here; what goes to the
    // stack is checked where the stack sends it, after its DNAT.
    let site = match route {
        Some(route)
            if matches!(
                route.kind,
                ROUTE_LOCAL_ENDPOINT | ROUTE_REMOTE_NODE | ROUTE_REMOTE_TUNNEL
            ) =>
        {
            Site::Decide
        }
        _ => Site::ToStack,
    };
    if let Err(drop) = enforce(ctx, &packet, site) {
        return (drop, TC_ACT_SHOT);
    }
    let Some(route) = route else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    // An address of this node's pod CIDR that no pod holds: the stack's unreachable route
    // answers it (it would otherwise follow the default route out of the node).
    if route.kind == ROUTE_LOCAL_CIDR {
        return (verdict::TO_UNASSIGNED, TC_ACT_OK);
    }
    // A connection this pod opens straight to another pod owns its ports from now on.
    if packet.opens_tcp_connection(ctx) {
        forget_stack_flow(&packet);
    }
    // A reply in a flow the stack translated (a ClusterIP backend or a hostPort answering
    // a pod) must go back through the stack to be un-DNATed, all its fragments too.
    if stack_flow_reply(&packet) {
        return (verdict::STACK_FLOW_REPLY, TC_ACT_OK);
    }
    // A routed hop: expiring packets go to the stack, which answers with ICMP time exceeded.
    match decrement_ttl(ctx) {
        Some(true) => {}
        Some(false) => {
            event!(
                ctx,
                Debug,
                "from_pod: TTL of a packet from {:i} to {:i} expires here: to the stack (ICMP time exceeded)",
                packet.src,
                packet.dst
            );
            return (verdict::TO_STACK, TC_ACT_OK);
        }
        None => {
            event!(
                ctx,
                Debug,
                "from_pod: dropped a packet from {:i} to {:i}: cannot rewrite its TTL",
                packet.src,
                packet.dst
            );
            return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
        }
    }
    match route.kind {
        ROUTE_LOCAL_ENDPOINT => match deliver_to_pod(ctx, route) {
            Some(action) => (verdict::LOCAL_REDIRECT, action),
            None => {
                event!(
                    ctx,
                    Debug,
                    "from_pod: dropped a packet from {:i} to {:i}: cannot rewrite its MACs",
                    packet.src,
                    packet.dst
                );
                (verdict::DROP_MALFORMED, TC_ACT_SHOT)
            }
        },
        ROUTE_REMOTE_NODE | ROUTE_REMOTE_TUNNEL => send_to_node(ctx, route),
        _ => (verdict::TO_STACK, TC_ACT_OK),
    }
}

/// Packets the redirects of `from_pod` and `from_netdev` never produce: anything here was
/// delivered by the stack. Checked against policy (the pod's ingress, and the sender's
/// egress when it is a local pod whose packet the stack translated), then remembered.
/// `None` when the packet passes uncounted, as every packet here did before policy.
#[inline(always)]
pub(crate) fn classify_to_pod(ctx: &TcContext) -> (Option<u32>, i32) {
    // SAFETY: the kernel hands the program a valid skb for the length of its run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let reverse_nat = mark & MARK_REVERSE_NAT == MARK_REVERSE_NAT;
    if reverse_nat {
        ctx.set_mark(mark & !MARK_REVERSE_NAT);
    }
    let Ok(ethertype) = ctx.load::<u16>(ETH_TYPE_OFF) else {
        return (None, TC_ACT_OK);
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return (None, TC_ACT_OK);
    }
    let Some(packet) = parse_ipv4(ctx) else {
        return (None, TC_ACT_OK);
    };
    if let Err(drop) = enforce(ctx, &packet, Site::Decide) {
        return (Some(drop), TC_ACT_SHOT);
    }
    // A reply of the pod's own masqueraded flow: the pod started it, so its next packets
    // must still be masqueraded; nothing to remember.
    if !reverse_nat {
        remember_stack_flow(&packet);
    }
    (None, TC_ACT_OK)
}
