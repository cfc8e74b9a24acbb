//! Types shared by the eBPF programs and userspace: map keys and values, map and program
//! names, and constants. Everything here is `#[repr(C)]` with no implicit padding, so the
//! kernel, the programs and userspace agree on the bytes, and BTF describes the fields for
//! `bpftool map dump`.
//!
//! IPv4 addresses are `[u8; 4]` in network order so bpftool prints them as four numbers.
#![no_std]

/// Bumped whenever a map's key or value layout changes; pinned maps of another layout are
/// refused by the loader instead of being silently reused.
pub const LAYOUT_VERSION: u32 = 2;

pub const MAP_ROUTES: &str = "ROUTES";
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
pub const MAP_STATS: &str = "STATS";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_NAT: &str = "NAT";
pub const MAP_NO_MASQ: &str = "NO_MASQ";
pub const MAP_STACK_FLOWS: &str = "STACK_FLOWS";
/// Every map the datapath pins, in a stable order.
pub const MAP_NAMES: [&str; 7] = [
    MAP_ROUTES,
    MAP_ENDPOINTS,
    MAP_STATS,
    MAP_CONFIG,
    MAP_NAT,
    MAP_NO_MASQ,
    MAP_STACK_FLOWS,
];

/// Host veth TC ingress: packets a pod sends.
pub const PROG_FROM_POD: &str = "from_pod";
/// Host veth TC egress: packets the node stack sends to a pod.
pub const PROG_TO_POD: &str = "to_pod";
/// Uplink and tunnel TC ingress: packets arriving at the node.
pub const PROG_FROM_NETDEV: &str = "from_netdev";
/// Uplink TC egress: packets leaving the node.
pub const PROG_TO_NETDEV: &str = "to_netdev";
/// Every program the datapath pins.
pub const PROGRAM_NAMES: [&str; 4] = [PROG_FROM_POD, PROG_TO_POD, PROG_FROM_NETDEV, PROG_TO_NETDEV];

/// Capacity of `ROUTES` and `ENDPOINTS`.
pub const MAX_ROUTES: u32 = 16384;
pub const MAX_ENDPOINTS: u32 = 16384;
/// Capacity of `NAT` (both directions of each translated flow).
pub const MAX_NAT: u32 = 131072;
pub const MAX_NO_MASQ: u32 = 64;
pub const MAX_STACK_FLOWS: u32 = 65536;

/// `skb->mark` bit set by `from_pod` on packets it sends to another node itself, so
/// `to_netdev` can tell them from packets the node stack routed.
pub const MARK_FROM_POD: u32 = 0x0c00_0000;

/// `skb->mark` bits set by `from_netdev` on a reply it translated back to a pod and handed
/// to the node stack, so `to_pod` does not record it as a flow the stack delivered (the
/// pod's next packets of that flow must still be masqueraded). kube-proxy uses 0xc000.
pub const MARK_REVERSE_NAT: u32 = 0x0300_0000;

/// The link-local gateway every pod routes through (as Calico does); its ARP requests are
/// answered by `from_pod` with the host veth's MAC.
pub const GATEWAY_IP: [u8; 4] = [169, 254, 1, 1];

/// `Route::kind`: the prefix is a pod on this node, reached through its host veth.
pub const ROUTE_LOCAL_ENDPOINT: u32 = 1;
/// `Route::kind`: the prefix is another node's pod CIDR, reached via `next_hop` on the
/// uplink (same L2 segment).
pub const ROUTE_REMOTE_NODE: u32 = 2;
/// `Route::kind`: another node's pod CIDR, reached through the VXLAN device (`ifindex`)
/// with `next_hop` as the tunnel's remote end.
pub const ROUTE_REMOTE_TUNNEL: u32 = 3;

/// Value of `CONFIG` (an array of one): what the programs know about this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Source address of masqueraded traffic; zero disables SNAT.
    pub node_ip: [u8; 4],
    pub uplink_ifindex: u32,
    /// The VXLAN device, zero when there is none.
    pub tunnel_ifindex: u32,
    pub vni: u32,
    /// Source ports SNAT may use, inclusive.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub layout_version: u32,
}

/// A flow as the programs key it: addresses in network order, ports in host order (ICMP
/// echo uses its identifier as both ports), so bpftool prints readable numbers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `NatEntry::direction`: the entry translates a pod's outgoing packets.
pub const NAT_EGRESS: u16 = 1;
/// `NatEntry::direction`: the entry translates replies back to the pod.
pub const NAT_INGRESS: u16 = 2;

/// Value of `NAT`: the address and port to write, and when the flow was last seen
/// (`bpf_ktime_get_ns`, i.e. CLOCK_MONOTONIC), for the agent's idle expiry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub addr: [u8; 4],
    pub port: u16,
    pub direction: u16,
    pub last_seen_ns: u64,
}

/// Value of `ROUTES`, an LPM trie keyed by `{prefix_len, [u8; 4]}`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// `ROUTE_LOCAL_ENDPOINT` or `ROUTE_REMOTE_NODE`.
    pub kind: u32,
    /// Local endpoint: the host veth; remote node: the uplink.
    pub ifindex: u32,
    /// Remote node: that node's IP; zero for local endpoints.
    pub next_hop: [u8; 4],
    /// Local endpoint: the pod's `eth0` MAC (destination MAC after redirect).
    pub pod_mac: [u8; 6],
    /// Local endpoint: the host veth's MAC (source MAC after redirect).
    pub host_mac: [u8; 6],
}

/// Value of `ENDPOINTS`, a hash keyed by the pod IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The host end of the pod's veth.
    pub ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    /// FNV-1a of the container ID, so GC and CHECK can tell endpoints apart.
    pub container_id_hash: u64,
}

/// One verdict's counter in `STATS`, a per-CPU array indexed by `Verdict`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Indexes of `STATS`. Kept as plain constants: the eBPF side indexes an array with them.
pub mod verdict {
    /// Redirected straight into a pod on this node.
    pub const LOCAL_REDIRECT: u32 = 0;
    /// Handed to the node's stack (services, the node itself, the outside).
    pub const TO_STACK: u32 = 1;
    /// ARP request from a pod answered in eBPF.
    pub const ARP_REPLY: u32 = 2;
    /// Dropped: truncated or malformed header.
    pub const DROP_MALFORMED: u32 = 3;
    /// Dropped: the pod sent from an address that is not its own.
    pub const DROP_SPOOFED: u32 = 4;
    /// Sent straight to another node on the uplink (direct routing).
    pub const REMOTE_DIRECT: u32 = 5;
    /// Sent to another node through the VXLAN device.
    pub const REMOTE_TUNNEL: u32 = 6;
    /// Arrived from another node's pod and redirected straight into a local pod.
    pub const DELIVERED_FROM_NETDEV: u32 = 7;
    /// Masqueraded to the node IP on the way out.
    pub const SNAT: u32 = 8;
    /// A reply to a masqueraded flow, translated back to the pod and handed to the stack.
    pub const REVERSE_NAT: u32 = 9;
    /// Dropped: no free SNAT port for the flow.
    pub const DROP_NAT_EXHAUSTED: u32 = 10;
    /// A reply of a flow the node stack delivered or translated (kube-proxy, hostPort, a
    /// node's probe): handed to the stack so it can undo its translation and its conntrack
    /// sees both directions (`from_pod`, `from_netdev`), or left unmasqueraded
    /// (`to_netdev`).
    pub const STACK_FLOW_REPLY: u32 = 11;
    /// Number of verdicts, the length of `STATS`.
    pub const COUNT: u32 = 12;
    /// Display names, indexed by verdict.
    pub const NAMES: [&str; COUNT as usize] = [
        "local_redirect",
        "to_stack",
        "arp_reply",
        "drop_malformed",
        "drop_spoofed",
        "remote_direct",
        "remote_tunnel",
        "delivered_from_netdev",
        "snat",
        "reverse_nat",
        "drop_nat_exhausted",
        "stack_flow_reply",
    ];
}

/// FNV-1a, 64 bit: a stable hash usable on both sides (no_std, no allocation).
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with no padding and no pointers.
    unsafe impl aya::Pod for super::Route {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::NatEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<Route>(), 4 + 4 + 4 + 6 + 6);
        assert_eq!(size_of::<Endpoint>(), 4 + 6 + 6 + 8);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<NodeConfig>(), 4 + 4 + 4 + 4 + 2 + 2 + 4);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<NatEntry>(), 16);
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }
}
