//! mycni's TC programs.
//!
//! - `from_pod` (host veth ingress: packets a pod sends) drops anything the pod sends as
//!   someone else (IPv4 or ARP from an address or MAC not its own) and its IPv6, answers the
//!   pod's ARP for its gateway, redirects packets for pods on this node straight into the
//!   destination pod
//!   (`bpf_redirect_peer`), sends packets for other nodes' pods to them (`bpf_redirect_neigh`
//!   on the uplink, or the VXLAN device with the tunnel key set), and hands everything else
//!   to the node stack (services, hostPorts, the node itself, the outside).
//! - `to_pod` (host veth egress: packets the node stack sends to a pod) remembers every flow
//!   the stack delivered, so its replies go back through the stack too: it can undo its
//!   own translations (kube-proxy DNAT) and its conntrack sees both directions.
//! - `from_netdev` (uplink and VXLAN ingress) drops VXLAN that is not from a known peer
//!   node with our VNI, delivers packets from other nodes' pods to
//!   local pods with `bpf_redirect_peer`, and hands everything else to the node stack:
//!   replies of masqueraded flows (and ICMP errors about them, and their later fragments)
//!   after translating them back.
//! - `to_netdev` (uplink and VXLAN egress) masquerades pod traffic leaving the cluster to
//!   the node IP (except replies of flows the stack delivered to the pod; dropping what
//!   SNAT cannot translate), tracking each
//!   flow's state (TCP handshake, FINs, RST; UDP answered or not) for the agent's expiry,
//!   and remembers pod-to-pod flows the stack sent to other nodes.
//!
//! The rule behind the split: a flow crosses the node's netfilter in both directions or in
//! neither, because kube-proxy drops what conntrack saw only half of (`ctstate INVALID`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh, bpf_tunnel_key, BPF_F_MARK_MANGLED_0,
        BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
    },
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    cty::c_void,
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer, bpf_skb_change_tail, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
    },
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::macro_support::{level_enabled, Level};
use mycni_common::{
    nat_state, verdict, Counter, Endpoint, FlowKey, FragmentEntry, FragmentKey, NatEntry,
    NodeConfig, Route, FRAGMENT_REVERSE_NAT, FRAGMENT_SNAT, FRAGMENT_TO_STACK, MARK_FROM_POD,
    MARK_REVERSE_NAT, MAX_ENDPOINTS, MAX_FRAGMENTS, MAX_NAT, MAX_NO_MASQ, MAX_PEERS, MAX_ROUTES,
    MAX_STACK_FLOWS, NAT_EGRESS, NAT_INGRESS, ROUTE_LOCAL_CIDR, ROUTE_LOCAL_ENDPOINT,
    ROUTE_REMOTE_NODE, ROUTE_REMOTE_TUNNEL,
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

/// What was done to the first fragment of a fragmented datagram, so its later fragments
/// (which carry no ports) get the same: keyed like the kernel's reassembly.
#[btf_map]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentEntry, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// The other nodes' IPs: the only senders whose VXLAN `from_netdev` decapsulates toward pods.
#[btf_map]
static PEERS: HashMap<[u8; 4], u32, { MAX_PEERS as usize }> = HashMap::new();

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
const ETH_P_IPV6: u16 = 0x86dd;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// IPv4 "more fragments" flag and fragment offset mask.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
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
    /// The IP identification (host order), which ties fragments together.
    id: u16,
    /// Part of a fragmented datagram (more fragments follow, or a later one).
    fragmented: bool,
    /// A fragment after the first: no L4 header.
    later_fragment: bool,
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

    fn fragment(&self) -> FragmentKey {
        FragmentKey {
            saddr: self.src,
            daddr: self.dst,
            id: self.id,
            proto: self.proto,
            pad: 0,
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
    // Identification and flags + fragment offset share one 32-bit word.
    let id_frag = ctx.load::<[u16; 2]>(ETH_HLEN + 4).ok()?;
    let frag = u16::from_be(id_frag[1]);
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
        id: u16::from_be(id_frag[0]),
        fragmented: frag & (IP_MF | IP_OFFSET) != 0,
        later_fragment: frag & IP_OFFSET != 0,
    };
    // Later fragments carry no L4 header.
    if packet.later_fragment {
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
    let Some(route) = ROUTES.get(&Key::new(32, packet.dst)) else {
        return (verdict::TO_STACK, TC_ACT_OK);
    };
    // An address of this node's pod CIDR that no pod holds: the stack's unreachable route
    // answers it (it would otherwise follow the default route out of the node).
    if route.kind == ROUTE_LOCAL_CIDR {
        return (verdict::TO_UNASSIGNED, TC_ACT_OK);
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

/// Whether a packet belongs to a flow whose replies the node stack must see (it translated
/// the flow): by its ports, or for a later fragment by what its first fragment was.
#[inline(always)]
fn stack_flow_reply(packet: &Ipv4) -> bool {
    if packet.has_ports {
        if unsafe { STACK_FLOWS.get(packet.flow()) }.is_none() {
            return false;
        }
        if packet.fragmented {
            remember_fragment(packet, FRAGMENT_TO_STACK, [0; 4]);
        }
        return true;
    }
    packet.later_fragment
        && unsafe { FRAGMENTS.get(packet.fragment()) }
            .is_some_and(|first| first.action == FRAGMENT_TO_STACK)
}

/// Records what was done to a first fragment, keyed by the datagram as it arrived.
#[inline(always)]
fn remember_fragment(packet: &Ipv4, action: u8, addr: [u8; 4]) {
    let entry = FragmentEntry {
        addr,
        action,
        pad: [0; 3],
    };
    let _ = FRAGMENTS.insert(packet.fragment(), entry, 0);
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
    let Ok(ethertype) = ctx.load::<u16>(12) else {
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

/// Translates a packet for the node IP back to the pod when it belongs to a masqueraded
/// flow: a reply, a later fragment of one, or an ICMP error about the flow. `Ok(None)`:
/// not ours, the node's own traffic.
#[inline(always)]
fn reverse_nat(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> Result<Option<u32>, ()> {
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
fn track_reply(ctx: &TcContext, packet: &Ipv4, entry: *mut NatEntry) {
    let mut events = nat_state::REPLIED;
    if packet.proto == IPPROTO_TCP {
        let flags = ctx.load::<u8>(packet.l4 + 13).unwrap_or(0);
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

/// An ICMP error (unreachable, fragmentation needed, time exceeded, parameter problem) for
/// the node IP that quotes a masqueraded packet (node IP and port -> peer): rewrites the
/// outer destination and the quoted source address and port to the pod's, fixing the
/// quoted IP header's checksum and the ICMP checksum. The quoted TCP/UDP checksum is left
/// as is: receivers do not check it (Linux's NAT leaves it too when the quote is short).
#[inline(always)]
fn icmp_error_to_pod(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> Result<Option<u32>, ()> {
    let inner = packet.l4 + 8;
    let Ok(version_ihl) = ctx.load::<u8>(inner) else {
        return Ok(None);
    };
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Ok(None);
    }
    let (Ok(proto), Ok(inner_src), Ok(inner_dst)) = (
        ctx.load::<u8>(inner + 9),
        ctx.load::<[u8; 4]>(inner + 12),
        ctx.load::<[u8; 4]>(inner + 16),
    ) else {
        return Ok(None);
    };
    if inner_src != cfg.node_ip {
        return Ok(None);
    }
    let inner_l4 = inner + ihl;
    let (port_off, key) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Ok(ports) = ctx.load::<[u16; 2]>(inner_l4) else {
                return Ok(None);
            };
            let (sport, dport) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
            (inner_l4, (dport, sport))
        }
        IPPROTO_ICMP => {
            let (Ok(kind), Ok(id)) = (ctx.load::<u8>(inner_l4), ctx.load::<u16>(inner_l4 + 4))
            else {
                return Ok(None);
            };
            if kind != ICMP_ECHO_REQUEST {
                return Ok(None);
            }
            let id = u16::from_be(id);
            (inner_l4 + 4, (id, id))
        }
        _ => return Ok(None),
    };
    // The entry replies of the quoted packet's flow arrive with.
    let reply = FlowKey {
        saddr: inner_dst,
        daddr: cfg.node_ip,
        sport: key.0,
        dport: key.1,
        proto,
        pad: [0; 3],
    };
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let Some(entry) = (unsafe { NAT.get(reply) }) else {
        return Ok(None);
    };
    let (pod, pod_port, nat_port) = (entry.addr, entry.port, key.1);
    rewrite_quote(
        ctx,
        packet,
        inner + 12,
        cfg.node_ip,
        pod,
        port_off,
        nat_port,
        pod_port,
    )
    .ok_or(())?;
    rewrite_address(ctx, IP_DST_OFF, packet.dst, pod).ok_or(())?;
    Ok(Some(verdict::ICMP_ERROR_TRANSLATED))
}

/// Rewrites an address and a port in the packet an ICMP error quotes (`addr_off` inside
/// the quoted IP header at `packet.l4 + 8`), fixing the quoted IP header's checksum and
/// the ICMP checksum, which covers the whole quote.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite_quote(
    ctx: &TcContext,
    packet: &Ipv4,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Option<()> {
    let inner = packet.l4 + 8;
    let icmp_csum = packet.l4 + 2;
    let (old_a, new_a) = (
        u32::from_ne_bytes(old_addr) as u64,
        u32::from_ne_bytes(new_addr) as u64,
    );
    // The quoted IP header's checksum first, then the address; the ICMP checksum covers
    // both changes.
    let old_csum = ctx.load::<u16>(inner + 10).ok()?;
    ctx.l3_csum_replace(inner + 10, old_a, new_a, 4).ok()?;
    let new_csum = ctx.load::<u16>(inner + 10).ok()?;
    ctx.l4_csum_replace(icmp_csum, old_csum as u64, new_csum as u64, 2)
        .ok()?;
    ctx.l4_csum_replace(icmp_csum, old_a, new_a, 4).ok()?;
    ctx.store(addr_off, &new_addr, 0).ok()?;
    let (old_p, new_p) = (old_port.to_be(), new_port.to_be());
    ctx.l4_csum_replace(icmp_csum, old_p as u64, new_p as u64, 2)
        .ok()?;
    ctx.store(port_off, &new_p, 0).ok()
}

/// An ICMP error a pod sends about a reply of its masqueraded flow (peer -> pod, quoted):
/// leaves like the flow, from the node IP, quoting peer -> node IP and port, so the peer
/// relates it to the connection it knows. About a flow the stack delivered to the pod:
/// leaves untouched (`STACK_FLOW_REPLY`). `None`: about no flow we know.
#[inline(always)]
fn icmp_error_from_pod(ctx: &TcContext, packet: &Ipv4) -> Option<u32> {
    let inner = packet.l4 + 8;
    let version_ihl = ctx.load::<u8>(inner).ok()?;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let proto = ctx.load::<u8>(inner + 9).ok()?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let peer = ctx.load::<[u8; 4]>(inner + 12).ok()?;
    let pod = ctx.load::<[u8; 4]>(inner + 16).ok()?;
    if pod != packet.src {
        return None;
    }
    let inner_l4 = inner + ihl;
    let ports = ctx.load::<[u16; 2]>(inner_l4).ok()?;
    let (peer_port, pod_port) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
    let forward = FlowKey {
        saddr: pod,
        daddr: peer,
        sport: pod_port,
        dport: peer_port,
        proto,
        pad: [0; 3],
    };
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let Some(entry) = (unsafe { NAT.get(forward) }) else {
        // About a flow the stack delivered to the pod (its reply tuple is `forward`): the
        // peer knows the pod's address, so the error leaves as it is.
        // SAFETY: only the entry's presence is read.
        return unsafe { STACK_FLOWS.get(forward) }
            .is_some()
            .then_some(verdict::STACK_FLOW_REPLY);
    };
    let (node_ip, nat_port) = (entry.addr, entry.port);
    rewrite_quote(
        ctx,
        packet,
        inner + 16,
        pod,
        node_ip,
        inner_l4 + 2,
        pod_port,
        nat_port,
    )?;
    rewrite_address(ctx, IP_SRC_OFF, packet.src, node_ip)?;
    Some(verdict::ICMP_ERROR_TRANSLATED)
}

/// The drop for a decapsulated packet that did not come from a known peer node with our
/// VNI; `None` when it did.
#[inline(always)]
fn foreign_tunnel_sender(ctx: &TcContext, cfg: &NodeConfig) -> Option<(u32, i32)> {
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: the helper writes at most the size given into `key`.
    let got = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if got != 0 {
        event!(
            ctx,
            Warn,
            "from_netdev: dropped a packet on the VXLAN device without a tunnel key (error {})",
            got
        );
        return Some((verdict::DROP_TUNNEL_FOREIGN, TC_ACT_SHOT));
    }
    // The helper gives the remote address in host order.
    let sender = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    if key.tunnel_id == cfg.vni && unsafe { PEERS.get(sender) }.is_some() {
        return None;
    }
    event!(
        ctx,
        Warn,
        "from_netdev: dropped VXLAN from {:i} with VNI {}: only VNI {} from a known peer node is accepted",
        sender,
        key.tunnel_id,
        cfg.vni
    );
    Some((verdict::DROP_TUNNEL_FOREIGN, TC_ACT_SHOT))
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
    if unsafe { ENDPOINTS.get(packet.src) }.is_none() {
        return (verdict::TO_STACK, TC_ACT_OK);
    }
    if ROUTES.get(&Key::new(32, packet.dst)).is_some() {
        // A local pod's flow to another pod that the stack routed (e.g. DNATed from a
        // ClusterIP): its replies must come back through the stack.
        if packet.has_ports {
            let now = unsafe { bpf_ktime_get_ns() };
            let _ = STACK_FLOWS.insert(packet.reply_flow(), now, 0);
        }
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

/// A later fragment of a pod's datagram: gets the source its first fragment got.
#[inline(always)]
fn snat_later_fragment(ctx: &TcContext, packet: &Ipv4) -> (u32, i32) {
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
fn untranslatable(ctx: &TcContext, packet: &Ipv4) -> (u32, i32) {
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
fn snat(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> (u32, i32) {
    let now = unsafe { bpf_ktime_get_ns() };
    let tcp_flags = if packet.proto == IPPROTO_TCP {
        ctx.load::<u8>(packet.l4 + 13).unwrap_or(0)
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

/// The state bits a packet the pod sends adds to its flow's `state`.
#[inline(always)]
fn pod_events(state: u8, tcp_flags: u8) -> u8 {
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

/// The port of a flow already translated, refreshing both of its entries and recording
/// the pod's TCP flags; `None` when the flow needs a (new) port.
#[inline(always)]
fn existing_port(packet: &Ipv4, cfg: &NodeConfig, now: u64, tcp_flags: u8) -> Option<u16> {
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
    /// Every port in the range is taken for this peer (by flows not closed).
    Exhausted,
    /// The forward entry could not be inserted (the helper's error).
    Record(i64),
}

/// The port search's state, on the stack of `allocate_port` and handed to `try_port` by
/// `bpf_loop`.
#[repr(C)]
struct PortSearch {
    /// The reply key of the new flow; `try_port` fills in the port.
    reply: FlowKey,
    back: NatEntry,
    min: u32,
    range: u32,
    start: u32,
    /// The port claimed, 0 while none.
    found: u32,
    /// The first port seen held by a closed TCP flow, 0 while none.
    closed: u32,
}

#[inline(always)]
fn with_port(mut key: FlowKey, port: u16) -> FlowKey {
    key.dport = port;
    if key.proto == IPPROTO_ICMP {
        key.sport = port;
    }
    key
}

/// One step of the port search: claims port `start + index` (wrapping in the range) by
/// inserting its reply entry with BPF_NOEXIST, atomic across CPUs. Stops `bpf_loop` (1)
/// once a port is claimed.
#[inline(never)]
extern "C" fn try_port(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the `PortSearch` on allocate_port's stack it was given.
    let search = unsafe { &mut *(ctx as *mut PortSearch) };
    if search.range == 0 {
        return 1;
    }
    let port = (search.min + search.start.wrapping_add(index as u32) % search.range) as u16;
    let key = with_port(search.reply, port);
    let back = search.back;
    if NAT.insert(key, back, BPF_NOEXIST as u64).is_ok() {
        search.found = port as u32;
        return 1;
    }
    if search.closed == 0 && key.proto == IPPROTO_TCP && held_by_closed_flow(&key).is_some() {
        search.closed = port as u32;
    }
    0
}

/// When the reply entry `key` belongs to a closed TCP flow, that flow's forward key. Both
/// entries' state bits count, as the agent counts them: two CPUs updating the bits of one
/// entry at once may lose one side's (the programs write them without atomics).
#[inline(always)]
fn held_by_closed_flow(key: &FlowKey) -> Option<FlowKey> {
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let held = unsafe { NAT.get(key) }?;
    let forward = FlowKey {
        saddr: held.addr,
        daddr: key.saddr,
        sport: held.port,
        dport: key.sport,
        proto: key.proto,
        pad: [0; 3],
    };
    let mut state = held.state;
    if !nat_state::tcp_closed(state) {
        // SAFETY: as above.
        state |= unsafe { NAT.get(forward) }.map_or(0, |out| out.state);
    }
    nat_state::tcp_closed(state).then_some(forward)
}

/// Finds a port for a new flow: from a random start, every port of the range in turn
/// until a free one is claimed (one try in the common case). With none free, a new TCP
/// connection takes over the port of a closed one (RST or FIN both ways). Then records
/// the forward entry with BPF_NOEXIST too, so two CPUs handling the flow's first packets
/// at once agree on one port: the loser gives its port back and uses the winner's.
#[inline(always)]
fn allocate_port(
    packet: &Ipv4,
    cfg: &NodeConfig,
    now: u64,
    tcp_flags: u8,
) -> Result<u16, PortError> {
    let (min, max) = if cfg.nat_port_min != 0 && cfg.nat_port_max >= cfg.nat_port_min {
        (cfg.nat_port_min, cfg.nat_port_max)
    } else {
        (DEFAULT_NAT_PORT_MIN, DEFAULT_NAT_PORT_MAX)
    };
    let state = pod_events(0, tcp_flags);
    let mut search = PortSearch {
        reply: reply_key(packet, cfg.node_ip, 0),
        back: NatEntry {
            addr: packet.src,
            port: packet.sport,
            direction: NAT_INGRESS,
            state,
            last_seen_ns: now,
        },
        min: min as u32,
        range: (max - min) as u32 + 1,
        // SAFETY: a helper without arguments.
        start: unsafe { bpf_get_prandom_u32() },
        found: 0,
        closed: 0,
    };
    // SAFETY: `try_port` has the callback signature bpf_loop wants and only uses `search`.
    unsafe {
        bpf_loop(
            search.range,
            try_port as *mut c_void,
            &mut search as *mut PortSearch as *mut c_void,
            0,
        );
    }
    if search.found == 0 && search.closed != 0 && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        search.found = take_over(&search).unwrap_or(0);
    }
    if search.found == 0 {
        return Err(PortError::Exhausted);
    }
    let port = search.found as u16;
    let forward = NatEntry {
        addr: cfg.node_ip,
        port,
        direction: NAT_EGRESS,
        state,
        last_seen_ns: now,
    };
    match NAT.insert(packet.flow(), forward, BPF_NOEXIST as u64) {
        Ok(()) => Ok(port),
        Err(error) => {
            // Another CPU translated this flow's first packet at the same moment and
            // recorded its port first: use that one.
            let _ = NAT.remove(&with_port(search.reply, port));
            // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
            match unsafe { NAT.get(packet.flow()) } {
                Some(winner) => Ok(winner.port),
                None => Err(PortError::Record(error as i64)),
            }
        }
    }
}

/// Gives a closed TCP flow's port to a new connection: forgets both entries of the old
/// flow, then claims the port with BPF_NOEXIST, so of two CPUs taking the same port over
/// at once only one gets it. Maps have no compare-and-delete: the reply entry is checked
/// to still be the old flow's right before it is removed, which leaves a window of a few
/// instructions in which a second taker could remove the first one's fresh entry.
#[inline(always)]
fn take_over(search: &PortSearch) -> Option<u32> {
    let port = search.closed as u16;
    let key = with_port(search.reply, port);
    let old_forward = held_by_closed_flow(&key)?;
    // SAFETY: as above.
    let still_old = unsafe { NAT.get(key) }
        .is_some_and(|held| held.addr == old_forward.saddr && held.port == old_forward.sport);
    if !still_old {
        return None;
    }
    let _ = NAT.remove(&key);
    let _ = NAT.remove(&old_forward);
    NAT.insert(key, search.back, BPF_NOEXIST as u64).ok()?;
    Some(port as u32)
}

/// Answers a pod's TCP packet with a RST, as a refusing host would: the packet is
/// turned around in place (truncated to bare IP + TCP headers) and sent out of the pod's
/// host veth, so the pod's connect fails at once with ECONNREFUSED. `None` when the
/// packet cannot be answered (not TCP, a RST itself, IP options, no endpoint).
#[inline(always)]
fn refuse_tcp(ctx: &TcContext, packet: &Ipv4, tcp_flags: u8) -> Option<i32> {
    if packet.proto != IPPROTO_TCP || packet.l4 != ETH_HLEN + 20 || tcp_flags & TCP_RST != 0 {
        return None;
    }
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let endpoint = unsafe { ENDPOINTS.get(packet.src) }?;
    let (veth, pod_mac, host_mac) = (endpoint.ifindex, endpoint.pod_mac, endpoint.host_mac);
    let seq = u32::from_be(ctx.load::<u32>(packet.l4 + 4).ok()?);
    let ack = u32::from_be(ctx.load::<u32>(packet.l4 + 8).ok()?);
    let header_len = ((ctx.load::<u8>(packet.l4 + 12).ok()? >> 4) as u32) * 4;
    let total_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?) as u32;
    let payload = total_len.saturating_sub(20 + header_len);
    // RFC 9293 3.10.7.1: answer an ACK with its ack number as our sequence; otherwise
    // sequence 0 and acknowledge everything the segment occupied.
    let (rst_seq, rst_ack, rst_flags) = if tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let occupied =
            payload + (tcp_flags & TCP_SYN != 0) as u32 + (tcp_flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    let ip = ipv4_header(40, true, IPPROTO_TCP, &packet.dst, &packet.src);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&packet.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&packet.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = rst_flags;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&packet.dst);
    pseudo[4..8].copy_from_slice(&packet.src);
    pseudo[9] = IPPROTO_TCP;
    pseudo[11] = 20;
    let tcp_csum = fold(sum_words(&pseudo) + sum_words(&tcp));
    tcp[16..18].copy_from_slice(&tcp_csum.to_be_bytes());
    // SAFETY: the helper takes the context's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + 40) as u32, 0) } != 0 {
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
fn refuse_with_icmp(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> Option<i32> {
    const QUOTE: usize = 28;
    if packet.l4 != ETH_HLEN + 20 {
        return None;
    }
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let endpoint = unsafe { ENDPOINTS.get(packet.src) }?;
    let (veth, pod_mac, host_mac) = (endpoint.ifindex, endpoint.pod_mac, endpoint.host_mac);
    let quote = ctx.load::<[u8; QUOTE]>(ETH_HLEN).ok()?;
    let ip = ipv4_header(
        (20 + 8 + QUOTE) as u16,
        false,
        IPPROTO_ICMP,
        &cfg.node_ip,
        &packet.src,
    );
    let mut icmp = [0u8; 8];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = 13;
    let icmp_csum = fold(sum_words(&icmp) + sum_words(&quote));
    icmp[2..4].copy_from_slice(&icmp_csum.to_be_bytes());
    // SAFETY: the helpers take the context's own skb.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + QUOTE) as u32, 0) != 0 {
            return None;
        }
    }
    ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0).ok()?;
    send_answer_to_pod(ctx, veth, &pod_mac, &host_mac, &ip, &icmp)
}

/// A 20-byte IPv4 header (no options, TTL 64) with its checksum, for an answer the
/// datapath writes itself.
#[inline(always)]
fn ipv4_header(
    total_len: u16,
    dont_fragment: bool,
    proto: u8,
    src: &[u8; 4],
    dst: &[u8; 4],
) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    if dont_fragment {
        ip[6] = 0x40;
    }
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(src);
    ip[16..20].copy_from_slice(dst);
    let ip_csum = fold(sum_words(&ip));
    ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    ip
}

/// Writes an answer's Ethernet (host veth to pod), IP and L4 headers over the start of
/// the packet, already sized to hold them, and sends it out of the pod's host veth: it
/// arrives on the pod's eth0.
#[inline(always)]
fn send_answer_to_pod<const L4_LEN: usize>(
    ctx: &TcContext,
    veth: u32,
    pod_mac: &[u8; 6],
    host_mac: &[u8; 6],
    ip: &[u8; 20],
    l4: &[u8; L4_LEN],
) -> Option<i32> {
    ctx.store(0, pod_mac, 0).ok()?;
    ctx.store(6, host_mac, 0).ok()?;
    ctx.store(ETH_HLEN, ip, 0).ok()?;
    ctx.store(ETH_HLEN + 20, l4, 0).ok()?;
    // SAFETY: redirects the context's own skb.
    Some(unsafe { bpf_redirect(veth, 0) } as i32)
}

/// The one's complement sum of big-endian 16-bit words, not folded.
#[inline(always)]
fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
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
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
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

/// Replaces an address in the IP header alone (later fragments: their L4 checksum, in the
/// first fragment, was fixed there).
#[inline(always)]
fn rewrite_address(ctx: &TcContext, offset: usize, old: [u8; 4], new: [u8; 4]) -> Option<()> {
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
        4,
    )
    .ok()?;
    ctx.store(offset, &new, 0).ok()
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
