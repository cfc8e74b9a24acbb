//! The node side (uplink and VXLAN device): what `from_netdev` does with arriving packets
//! and `to_netdev` with leaving ones.
use crate::external::{reply_after_reverse_nat, reply_from_node, to_backend};
use crate::forward::deliver_to_pod;
use crate::headers::{
    ETH_P_IP, ETH_TYPE_OFF, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST, ICMP_PARAMETER_PROBLEM,
    ICMP_TIME_EXCEEDED, IPPROTO_ICMP, PACKET_HOST,
};
use crate::maps::{config, route_of, ENDPOINTS, NO_MASQ, ROUTES};
use crate::nat::icmp_error::icmp_error_from_pod;
use crate::nat::reverse::reverse_nat;
use crate::nat::snat::{snat, snat_later_fragment, untranslatable};
use crate::packet::{ifindex, parse_ipv4};
use crate::policy::{enforce, Site};
use crate::stack_flows::{remember_stack_flow, stack_flow_reply};
use crate::tunnel::foreign_tunnel_sender;
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::programs::TcContext;
use mycni_common::{
    verdict, MARK_FROM_POD, MARK_REVERSE_NAT, ROUTE_LOCAL_CIDR, ROUTE_LOCAL_ENDPOINT,
    ROUTE_REMOTE_NODE, ROUTE_REMOTE_TUNNEL,
};

#[inline(always)]
pub(crate) fn classify_from_netdev(ctx: &TcContext) -> (u32, i32) {
    let Some(cfg) = config() else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    let on_tunnel = cfg.tunnel_ifindex != 0 && ifindex(ctx) == cfg.tunnel_ifindex;
    // The VXLAN device takes any sender and any VNI (collect-metadata mode): only our VNI
    // from a known peer node may go on, whatever it carries.
    if on_tunnel {
        if let Some(drop) = foreign_tunnel_sender(ctx, cfg) {
            return drop;
        }
    }
    let Ok(ethertype) = ctx.load::<u16>(ETH_TYPE_OFF) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let Some(packet) = parse_ipv4(ctx) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    let to_stack = |verdict: u32| {
        // Decapsulated frames carry the sender's idea of our MAC; make the stack accept them.
        if on_tunnel {
            let _ = ctx.change_type(PACKET_HOST);
        }
        (verdict, TC_ACT_OK)
    };
    if packet.dst == cfg.node_ip {
        // Replies of masqueraded flows go back to the pod's address and on through the
        // stack, which forwarded the pod's side of the flow (its conntrack sees both).
        match reverse_nat(ctx, &packet, cfg) {
            Ok(Some(verdict)) => {
                // A remote Service backend's reply, now addressed to its client outside:
                // it leaves as the frontend.
                if let Some(translated) = parse_ipv4(ctx) {
                    if let Some(result) = reply_after_reverse_nat(ctx, &translated) {
                        return result;
                    }
                }
                // Marked so to_pod does not take it for a flow the stack delivered: the
                // pod started it, and its later packets must still be masqueraded.
                // SAFETY: the kernel hands the program a valid skb for the length of its run.
                ctx.set_mark(unsafe { (*ctx.skb.skb).mark } | MARK_REVERSE_NAT);
                return to_stack(verdict);
            }
            Ok(None) => {}
            Err(()) => {
                event!(
                    ctx,
                    Debug,
                    "from_netdev: dropped a packet from {:i} to {:i} (proto {}): cannot translate it back",
                    packet.src,
                    packet.dst,
                    packet.proto
                );
                return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
            }
        }
    }
    let Some(route) = route_of(packet.dst) else {
        // No pod: maybe a NodePort or externalIP frontend, reached from outside.
        if !on_tunnel {
            if let Some(result) = to_backend(ctx, &packet, cfg) {
                return result;
            }
        }
        return to_stack(verdict::TO_STACK);
    };
    if route.kind == ROUTE_LOCAL_CIDR {
        return to_stack(verdict::TO_UNASSIGNED);
    }
    if route.kind != ROUTE_LOCAL_ENDPOINT {
        return to_stack(verdict::TO_STACK);
    }
    // Only other nodes' pods are delivered here; the node stack serves everything else
    // (nodes, the outside), both ways, and its conntrack sees whole flows.
    let from_remote_pod = route_of(packet.src)
        .is_some_and(|src| src.kind == ROUTE_REMOTE_NODE || src.kind == ROUTE_REMOTE_TUNNEL);
    if !from_remote_pod {
        return to_stack(verdict::TO_STACK);
    }
    if stack_flow_reply(&packet) {
        return to_stack(verdict::STACK_FLOW_REPLY);
    }
    // Delivered past the pod's veth hooks: its ingress policy is checked here.
    if let Err(drop) = enforce(ctx, &packet, Site::Decide) {
        return (drop, TC_ACT_SHOT);
    }
    match deliver_to_pod(ctx, route) {
        Some(action) => (verdict::DELIVERED_FROM_NETDEV, action),
        None => {
            event!(
                ctx,
                Debug,
                "from_netdev: dropped a packet from {:i} to {:i}: cannot rewrite its MACs",
                packet.src,
                packet.dst
            );
            (verdict::DROP_MALFORMED, TC_ACT_SHOT)
        }
    }
}

#[inline(always)]
pub(crate) fn classify_to_netdev(ctx: &TcContext) -> (u32, i32) {
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & MARK_FROM_POD == MARK_FROM_POD {
        // Sent by from_pod to another node's pod: nothing to translate.
        ctx.set_mark(mark & !MARK_FROM_POD);
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let Ok(ethertype) = ctx.load::<u16>(ETH_TYPE_OFF) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let Some(packet) = parse_ipv4(ctx) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    // The node's own reply as a hostNetwork backend of a NodePort or externalIP that a
    // client outside reached (from_netdev sent the client here with its address kept).
    if let Some(cfg) = config() {
        if packet.src == cfg.node_ip && ifindex(ctx) == cfg.uplink_ifindex {
            if let Some(result) = reply_from_node(ctx, &packet) {
                return result;
            }
        }
    }
    if unsafe { ENDPOINTS.get(packet.src) }.is_none() {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    // A local pod's packet the stack routed (after kube-proxy's DNAT, to its real
    // destination): the pod's egress policy, which `from_pod` left to this point.
    if let Err(drop) = enforce(ctx, &packet, Site::Decide) {
        return (drop, TC_ACT_SHOT);
    }
    if ROUTES.get(&Key::new(32, packet.dst)).is_some() {
        // A local pod's flow to another pod that the stack routed (e.g. DNATed from a
        // ClusterIP): its replies must come back through the stack.
        remember_stack_flow(&packet);
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let Some(cfg) = config() else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    // Only the uplink masquerades; the tunnel carries pod-to-pod traffic only.
    if ifindex(ctx) != cfg.uplink_ifindex || NO_MASQ.get(&Key::new(32, packet.dst)).is_some() {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    if cfg.node_ip == [0; 4] {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let icmp_error = packet.proto == IPPROTO_ICMP
        && !packet.later_fragment
        && matches!(
            packet.icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        );
    if icmp_error {
        // An error about the pod's masqueraded flow leaves like that flow; one about a flow
        // the stack delivered to the pod leaves as it is; any other would leak the pod's
        // address.
        if let Some(verdict) = icmp_error_from_pod(ctx, &packet) {
            return (verdict, TC_ACT_OK);
        }
        return untranslatable(ctx, &packet);
    }
    // A reply in a flow the stack delivered to the pod (a node's probe, NodePort with
    // externalTrafficPolicy Local): the peer expects the pod's own address. Later fragments
    // follow their first.
    if stack_flow_reply(&packet) {
        return (verdict::STACK_FLOW_REPLY, TC_ACT_OK);
    }
    if packet.later_fragment {
        return snat_later_fragment(ctx, &packet);
    }
    let translatable =
        packet.has_ports && (packet.proto != IPPROTO_ICMP || packet.icmp_type == ICMP_ECHO_REQUEST);
    if !translatable {
        return untranslatable(ctx, &packet);
    }
    snat(ctx, &packet, cfg)
}
