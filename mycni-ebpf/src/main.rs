//! mycni's TC programs.
//!
//! - `from_pod` (host veth ingress: packets a pod sends) answers the pod's ARP for its
//!   gateway, redirects packets for pods on this node straight into the destination pod
//!   (`bpf_redirect_peer`), sends packets for other nodes' pods to them (`bpf_redirect_neigh`
//!   on the uplink, or the VXLAN device with the tunnel key set), and hands everything else
//!   to the node stack (services, hostPorts, the node itself, the outside).
//! - `to_pod` (host veth egress: packets the node stack sends to a pod) remembers every flow
//!   the stack delivered, so its replies go back through the stack too: it can undo its
//!   own translations (kube-proxy DNAT) and its conntrack sees both directions.
//! - `from_netdev` (uplink and VXLAN ingress) delivers packets from other nodes' pods to
//!   local pods with `bpf_redirect_peer`, and hands everything else to the node stack,
//!   replies of masqueraded flows after translating them back.
//! - `to_netdev` (uplink and VXLAN egress) masquerades pod traffic leaving the cluster to
//!   the node IP (except replies of flows the stack delivered to the pod), and remembers
//!   pod-to-pod flows the stack sent to other nodes.
//!
//! The rule behind the split: a flow crosses the node's netfilter in both directions or in
//! neither, because kube-proxy drops what conntrack saw only half of (`ctstate INVALID`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_redir_neigh, bpf_tunnel_key, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_set_tunnel_key,
    },
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::macro_support::{level_enabled, Level};
use mycni_common::{
    verdict, Counter, Endpoint, FlowKey, NatEntry, NodeConfig, Route, MARK_FROM_POD,
    MARK_REVERSE_NAT, MAX_ENDPOINTS, MAX_NAT, MAX_NO_MASQ, MAX_ROUTES, MAX_STACK_FLOWS, NAT_EGRESS,
    NAT_INGRESS, ROUTE_LOCAL_ENDPOINT, ROUTE_REMOTE_NODE, ROUTE_REMOTE_TUNNEL,
};

#[btf_map]
static ROUTES: LpmTrie<[u8; 4], Route, { MAX_ROUTES as usize }> = LpmTrie::new();

#[btf_map]
static ENDPOINTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();

#[btf_map]
static STATS: PerCpuArray<Counter, { verdict::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map]
static NAT: LruHashMap<FlowKey, NatEntry, { MAX_NAT as usize }> = LruHashMap::new();

/// Destinations never masqueraded: the cluster CIDR and configured extra CIDRs.
#[btf_map]
static NO_MASQ: LpmTrie<[u8; 4], u32, { MAX_NO_MASQ as usize }> = LpmTrie::new();

/// Reply tuples of flows the node stack delivered to a pod or routed from one pod to
/// another (and possibly translated): their replies go back through the stack.
#[btf_map]
static STACK_FLOWS: LruHashMap<FlowKey, u64, { MAX_STACK_FLOWS as usize }> = LruHashMap::new();

/// When the programs last logged at each level (indexed by `Level as u32`). Not pinned:
/// each load starts afresh, like its log buffer (aya-log's `AYA_LOGS`).
#[btf_map]
static LOG_LAST_NS: Array<u64, 6> = Array::new();

/// At most one message per level and interval for the whole node: a pod spoofing at line
/// rate must not flood the agent's log. Messages say that something happens and who does
/// it; `STATS` counts every drop.
const LOG_INTERVAL_NS: u64 = 100_000_000;

/// Whether the programs may log at `level` now (and if so, takes the slot). CPUs race for
/// the slot without atomics: at worst a few more messages get through. Only reached on
/// paths that log, never on a per-packet success path.
#[inline(always)]
fn log_slot(level: Level) -> bool {
    let Some(last) = LOG_LAST_NS.get_ptr_mut(level as u32) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        if now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// An aya-log message, rate-limited. The agent patches the level (`AYA_LOG_LEVEL`, in
/// `.rodata`, frozen) at load time, so the verifier sees `level_enabled` as a constant and
/// removes disabled statements: they cost nothing, not even the rate limit. Only drops
/// and rare decisions log; no per-packet success path does. `cold_path` has LLVM put the
/// message code after the function's hot blocks, so enabled levels do not spread the
/// forwarding path over more cache lines either.
macro_rules! event {
    ($ctx:expr, $level:ident, $($arg:tt)+) => {
        if level_enabled(Level::$level) {
            core::hint::cold_path();
            if log_slot(Level::$level) {
                aya_log_ebpf::log!($ctx, Level::$level, $($arg)+);
            }
        }
    };
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const AF_INET: u32 = 2;
const PACKET_HOST: u32 = 0;
// Offsets inside an Ethernet + IPv4 frame.
const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
// Offsets inside an Ethernet + ARP (Ethernet/IPv4) frame.
const ARP_OP_OFF: usize = ETH_HLEN + 6;
const ARP_SHA_OFF: usize = ETH_HLEN + 8;
const ARP_SPA_OFF: usize = ETH_HLEN + 14;
const ARP_THA_OFF: usize = ETH_HLEN + 18;
const ARP_TPA_OFF: usize = ETH_HLEN + 24;
/// How many ports SNAT tries for a new flow before giving up.
const NAT_PORT_TRIES: u32 = 32;
const DEFAULT_NAT_PORT_MIN: u16 = 61000;
const DEFAULT_NAT_PORT_MAX: u16 = 65535;

/// The parts of an IPv4 packet the programs decide on.
struct Ipv4 {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    /// Offset of the L4 header.
    l4: usize,
    /// Ports in host order; ICMP echo: the identifier as both. Zero when not parsed.
    sport: u16,
    dport: u16,
    /// TCP/UDP, or an ICMP echo, of a first (or only) fragment: translatable.
    has_ports: bool,
    icmp_type: u8,
}

impl Ipv4 {
    fn flow(&self) -> FlowKey {
        FlowKey {
            saddr: self.src,
            daddr: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            pad: [0; 3],
        }
    }

    fn reply_flow(&self) -> FlowKey {
        FlowKey {
            saddr: self.dst,
            daddr: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Option<Ipv4> {
    let version_ihl = ctx.load::<u8>(ETH_HLEN).ok()?;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    let proto = ctx.load::<u8>(ETH_HLEN + 9).ok()?;
    let src = ctx.load::<[u8; 4]>(IP_SRC_OFF).ok()?;
    let dst = ctx.load::<[u8; 4]>(IP_DST_OFF).ok()?;
    let l4 = ETH_HLEN + ihl;
    let mut packet = Ipv4 {
        src,
        dst,
        proto,
        l4,
        sport: 0,
        dport: 0,
        has_ports: false,
        icmp_type: 0,
    };
    // Later fragments carry no L4 header.
    if frag & 0x1fff != 0 {
        return Some(packet);
    }
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports = ctx.load::<[u16; 2]>(l4).ok()?;
            packet.sport = u16::from_be(ports[0]);
            packet.dport = u16::from_be(ports[1]);
            packet.has_ports = true;
        }
        IPPROTO_ICMP => {
            packet.icmp_type = ctx.load::<u8>(l4).ok()?;
            if packet.icmp_type == ICMP_ECHO_REQUEST || packet.icmp_type == ICMP_ECHO_REPLY {
                let id = u16::from_be(ctx.load::<u16>(l4 + 4).ok()?);
                packet.sport = id;
                packet.dport = id;
                packet.has_ports = true;
            }
        }
        _ => {}
    }
    Some(packet)
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn config() -> Option<&'static NodeConfig> {
    CONFIG.get(0)
}

#[inline(always)]
fn route_of(addr: [u8; 4]) -> Option<&'static Route> {
    ROUTES.get(&Key::new(32, addr))
}

#[inline(always)]
fn count(verdict: u32, bytes: u32) {
    if let Some(counter) = STATS.get_ptr_mut(verdict) {
        // Per-CPU slot: no other CPU writes it.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

/// Rewrites the MACs for a local pod and redirects into its namespace.
#[inline(always)]
fn deliver_to_pod(ctx: &TcContext, route: &Route) -> Option<i32> {
    let (target, pod_mac, host_mac) = (route.ifindex, route.pod_mac, route.host_mac);
    // The destination pod drops frames not addressed to its own MAC.
    ctx.store(0, &pod_mac, 0).ok()?;
    ctx.store(6, &host_mac, 0).ok()?;
    Some(unsafe { bpf_redirect_peer(target, 0) } as i32)
}

/// Sends a packet to the node that owns the destination's pod CIDR.
#[inline(always)]
fn send_to_node(ctx: &TcContext, route: &Route) -> (u32, i32) {
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

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (verdict, action) = classify_from_pod(&ctx);
    count(verdict, ctx.len());
    action
}

#[inline(always)]
fn classify_from_pod(ctx: &TcContext) -> (u32, i32) {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
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
        // IPv6 and anything else: the node stack decides.
        _ => (verdict::TO_STACK, TC_ACT_OK),
    }
}

#[inline(always)]
fn ipv4_from_pod(ctx: &TcContext) -> (u32, i32) {
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
    // very veth. Unknown sources (an endpoint not written yet) go to the stack, which has
    // its own reverse-path rules.
    if let Some(endpoint) = unsafe { ENDPOINTS.get(packet.src) } {
        if endpoint.ifindex != ifindex(ctx) {
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
    }
    let Some(route) = ROUTES.get(&Key::new(32, packet.dst)) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    // A reply in a flow the stack translated (a ClusterIP backend or a hostPort answering
    // a pod) must go back through the stack to be un-DNATed.
    if packet.has_ports && unsafe { STACK_FLOWS.get(packet.flow()) }.is_some() {
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

/// Decrements the IPv4 TTL, fixing the header checksum; `Some(false)` when it would expire.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Option<bool> {
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

/// Turns the pod's ARP request into a reply carrying the host veth's MAC and sends it back
/// out of the veth to the pod. Pods only ever ARP for their gateway (they hold a /32 and a
/// default route via 169.254.1.1), but any target gets the same answer, as proxy ARP would.
#[inline(always)]
fn arp_from_pod(ctx: &TcContext) -> (u32, i32) {
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
    if u16::from_be(op) != ARP_OP_REQUEST {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let ifindex = ifindex(ctx);
    let Some(endpoint) = (unsafe { ENDPOINTS.get(spa) }) else {
        return (verdict::TO_STACK, TC_ACT_OK);
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

/// Packets the redirects of `from_pod` and `from_netdev` never produce: anything here was
/// delivered by the stack.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    // SAFETY: the kernel hands the program a valid skb for the length of its run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & MARK_REVERSE_NAT == MARK_REVERSE_NAT {
        // A reply of the pod's own masqueraded flow: the pod started it, so its next packets
        // must still be masqueraded; nothing to remember.
        ctx.set_mark(mark & !MARK_REVERSE_NAT);
        return TC_ACT_OK;
    }
    if let Ok(ethertype) = ctx.load::<u16>(12) {
        if u16::from_be(ethertype) == ETH_P_IP {
            if let Some(packet) = parse_ipv4(&ctx) {
                remember_stack_flow(&packet);
            }
        }
    }
    TC_ACT_OK
}

/// Records the reply tuple of a flow the stack delivered (from a node, the outside, or a
/// pod through a translation), so the pod's replies go back through the stack instead of
/// being short-cut past its conntrack and translations, and are not masqueraded.
#[inline(always)]
fn remember_stack_flow(packet: &Ipv4) {
    if !packet.has_ports {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = STACK_FLOWS.insert(packet.reply_flow(), now, 0);
}

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    let (verdict, action) = classify_from_netdev(&ctx);
    count(verdict, ctx.len());
    action
}

#[inline(always)]
fn classify_from_netdev(ctx: &TcContext) -> (u32, i32) {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let Some(mut packet) = parse_ipv4(ctx) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    let Some(cfg) = config() else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    let mut translated = false;
    if packet.has_ports && packet.dst == cfg.node_ip && packet.icmp_type != ICMP_ECHO_REQUEST {
        if let Some(entry) = NAT.get_ptr_mut(packet.flow()) {
            let (addr, port) = unsafe {
                (*entry).last_seen_ns = bpf_ktime_get_ns();
                ((*entry).addr, (*entry).port)
            };
            if rewrite_destination(ctx, &packet, addr, port).is_none() {
                event!(
                    ctx,
                    Debug,
                    "from_netdev: dropped a reply from {:i} to {:i}: cannot translate it back to {:i}:{}",
                    packet.src,
                    packet.dst,
                    addr,
                    port
                );
                return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
            }
            packet.dst = addr;
            translated = true;
        }
    }
    let on_tunnel = cfg.tunnel_ifindex != 0 && ifindex(ctx) == cfg.tunnel_ifindex;
    let to_stack = |verdict: u32| {
        // Decapsulated frames carry the sender's idea of our MAC; make the stack accept them.
        if on_tunnel {
            let _ = ctx.change_type(PACKET_HOST);
        }
        (verdict, TC_ACT_OK)
    };
    if translated {
        // The request went out through the stack (conntrack, kube-proxy's DNAT): the reply
        // goes back the same way, marked so to_pod does not take it for a stack-delivered
        // flow.
        // SAFETY: the kernel hands the program a valid skb for the length of its run.
        ctx.set_mark(unsafe { (*ctx.skb.skb).mark } | MARK_REVERSE_NAT);
        return to_stack(verdict::REVERSE_NAT);
    }
    let Some(route) = route_of(packet.dst) else {
        return to_stack(verdict::TO_STACK);
    };
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
    if packet.has_ports && unsafe { STACK_FLOWS.get(packet.flow()) }.is_some() {
        return to_stack(verdict::STACK_FLOW_REPLY);
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

#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    let (verdict, action) = classify_to_netdev(&ctx);
    if verdict != verdict::TO_STACK {
        count(verdict, ctx.len());
    }
    action
}

#[inline(always)]
fn classify_to_netdev(ctx: &TcContext) -> (u32, i32) {
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & MARK_FROM_POD == MARK_FROM_POD {
        // Sent by from_pod to another node's pod: nothing to translate.
        ctx.set_mark(mark & !MARK_FROM_POD);
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let Some(packet) = parse_ipv4(ctx) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    if !packet.has_ports || unsafe { ENDPOINTS.get(packet.src) }.is_none() {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    if ROUTES.get(&Key::new(32, packet.dst)).is_some() {
        // A local pod's flow to another pod that the stack routed (e.g. DNATed from a
        // ClusterIP): its replies must come back through the stack.
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = STACK_FLOWS.insert(packet.reply_flow(), now, 0);
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    let Some(cfg) = config() else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    // Only the uplink masquerades; the tunnel carries pod-to-pod traffic only.
    if ifindex(ctx) != cfg.uplink_ifindex || NO_MASQ.get(&Key::new(32, packet.dst)).is_some() {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    if cfg.node_ip == [0; 4]
        || (packet.proto == IPPROTO_ICMP && packet.icmp_type != ICMP_ECHO_REQUEST)
    {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    // A reply in a flow the stack delivered to the pod (a node's probe, NodePort with
    // externalTrafficPolicy Local): the peer expects the pod's own address.
    // SAFETY: only the entry's presence is read, never the value a CPU may be updating.
    if unsafe { STACK_FLOWS.get(packet.flow()) }.is_some() {
        return (verdict::STACK_FLOW_REPLY, TC_ACT_OK);
    }
    snat(ctx, &packet, cfg)
}

/// Masquerades a pod's packet to the node IP, reusing the flow's port or finding a free one.
#[inline(always)]
fn snat(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> (u32, i32) {
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = packet.flow();
    let port = match NAT.get_ptr_mut(flow) {
        Some(entry) => unsafe {
            (*entry).last_seen_ns = now;
            let port = (*entry).port;
            // Keep the reply direction alive as long as the flow sends.
            let reply = reply_key(packet, cfg.node_ip, port);
            match NAT.get_ptr_mut(reply) {
                Some(back) => (*back).last_seen_ns = now,
                None => {
                    let back = NatEntry {
                        addr: packet.src,
                        port: packet.sport,
                        direction: NAT_INGRESS,
                        last_seen_ns: now,
                    };
                    let _ = NAT.insert(reply, back, 0);
                }
            }
            port
        },
        None => match allocate_port(packet, cfg, now) {
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
                    "to_netdev: dropped proto {} {:i}:{} -> {:i}:{}: no free SNAT port ({} random tries)",
                    packet.proto,
                    packet.src,
                    packet.sport,
                    packet.dst,
                    packet.dport,
                    NAT_PORT_TRIES
                );
                return (verdict::DROP_NAT_EXHAUSTED, TC_ACT_SHOT);
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
        Some(()) => (verdict::SNAT, TC_ACT_OK),
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

/// The key a reply to the translated flow arrives with.
#[inline(always)]
fn reply_key(packet: &Ipv4, node_ip: [u8; 4], port: u16) -> FlowKey {
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

/// Why SNAT found no port for a new flow.
enum PortError {
    /// Every port tried is taken for this peer.
    Exhausted,
    /// The forward entry could not be inserted (the helper's error).
    Record(i64),
}

/// Claims a free source port by inserting the reply entry with BPF_NOEXIST (atomic, so two
/// CPUs never claim the same port for the same peer), then records the forward entry.
#[inline(always)]
fn allocate_port(packet: &Ipv4, cfg: &NodeConfig, now: u64) -> Result<u16, PortError> {
    let (min, max) = if cfg.nat_port_min != 0 && cfg.nat_port_max >= cfg.nat_port_min {
        (cfg.nat_port_min, cfg.nat_port_max)
    } else {
        (DEFAULT_NAT_PORT_MIN, DEFAULT_NAT_PORT_MAX)
    };
    let range = (max - min) as u32 + 1;
    let start = unsafe { bpf_get_prandom_u32() };
    let back = NatEntry {
        addr: packet.src,
        port: packet.sport,
        direction: NAT_INGRESS,
        last_seen_ns: now,
    };
    for attempt in 0..NAT_PORT_TRIES {
        let port = min + (start.wrapping_add(attempt) % range) as u16;
        if NAT
            .insert(
                reply_key(packet, cfg.node_ip, port),
                back,
                BPF_NOEXIST as u64,
            )
            .is_ok()
        {
            let forward = NatEntry {
                addr: cfg.node_ip,
                port,
                direction: NAT_EGRESS,
                last_seen_ns: now,
            };
            NAT.insert(packet.flow(), forward, 0)
                .map_err(|error| PortError::Record(error as i64))?;
            return Ok(port);
        }
    }
    Err(PortError::Exhausted)
}

/// Offset of the checksum that covers the ports (or the ICMP identifier).
#[inline(always)]
fn l4_checksum(packet: &Ipv4) -> (usize, u64) {
    match packet.proto {
        IPPROTO_TCP => (packet.l4 + 16, 0),
        // A zero UDP checksum means "none" and must stay zero.
        IPPROTO_UDP => (packet.l4 + 6, BPF_F_MARK_MANGLED_0 as u64),
        _ => (packet.l4 + 2, 0),
    }
}

#[inline(always)]
fn rewrite_source(ctx: &TcContext, packet: &Ipv4, addr: [u8; 4], port: u16) -> Option<()> {
    let port_off = if packet.proto == IPPROTO_ICMP {
        packet.l4 + 4
    } else {
        packet.l4
    };
    rewrite(
        ctx,
        packet,
        IP_SRC_OFF,
        packet.src,
        addr,
        port_off,
        packet.sport,
        port,
    )
}

#[inline(always)]
fn rewrite_destination(ctx: &TcContext, packet: &Ipv4, addr: [u8; 4], port: u16) -> Option<()> {
    let port_off = if packet.proto == IPPROTO_ICMP {
        packet.l4 + 4
    } else {
        packet.l4 + 2
    };
    rewrite(
        ctx,
        packet,
        IP_DST_OFF,
        packet.dst,
        addr,
        port_off,
        packet.dport,
        port,
    )
}

/// Replaces an address and a port, fixing the IP checksum and the L4 checksum (which for
/// TCP and UDP also covers the address through the pseudo-header; ICMP's does not).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    packet: &Ipv4,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Option<()> {
    let (old_a, new_a) = (
        u32::from_ne_bytes(old_addr) as u64,
        u32::from_ne_bytes(new_addr) as u64,
    );
    let (old_p, new_p) = (old_port.to_be() as u64, new_port.to_be() as u64);
    let (csum_off, csum_flags) = l4_checksum(packet);
    if packet.proto != IPPROTO_ICMP {
        ctx.l4_csum_replace(
            csum_off,
            old_a,
            new_a,
            csum_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .ok()?;
    }
    ctx.l4_csum_replace(csum_off, old_p, new_p, csum_flags | 2)
        .ok()?;
    ctx.store(port_off, &new_port.to_be(), 0).ok()?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_a, new_a, 4).ok()?;
    ctx.store(addr_off, &new_addr, 0).ok()?;
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
