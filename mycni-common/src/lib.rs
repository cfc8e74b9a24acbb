//! Types shared by the eBPF programs and userspace: map keys and values, map and program
//! names, and constants. Everything here is `#[repr(C)]` with no implicit padding, so the
//! kernel, the programs and userspace agree on the bytes, and BTF describes the fields for
//! `bpftool map dump`.
//!
//! IPv4 addresses are `[u8; 4]` in network order so bpftool prints them as four numbers.
#![no_std]

/// Bumped whenever a map's key or value layout changes; pinned maps of another layout are
/// refused by the loader instead of being silently reused.
pub const LAYOUT_VERSION: u32 = 8;

pub mod policy;
pub mod service;

pub const MAP_ROUTES: &str = "ROUTES";
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
pub const MAP_STATS: &str = "STATS";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_NAT: &str = "NAT";
pub const MAP_NO_MASQ: &str = "NO_MASQ";
pub const MAP_STACK_FLOWS: &str = "STACK_FLOWS";
pub const MAP_FRAGMENTS: &str = "FRAGMENTS";
pub const MAP_PEERS: &str = "PEERS";
pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_AFFINITY: &str = "AFFINITY";
pub const MAP_SOCK_REVERSE: &str = "SOCK_REVERSE";
pub const MAP_HOST_PORTS: &str = "HOST_PORTS";
pub const MAP_EXTERNAL_NAT: &str = "EXTERNAL_NAT";
pub const MAP_POLICY_ENDPOINTS: &str = "POLICY_ENDPOINTS";
pub const MAP_POLICY_IDENTITIES: &str = "POLICY_IDENTITIES";
pub const MAP_POLICY: &str = "POLICY";
pub const MAP_POLICY_CT: &str = "POLICY_CT";
pub const MAP_POLICY_STATE: &str = "POLICY_STATE";
pub const MAP_POLICY_DROPS: &str = "POLICY_DROPS";
pub const MAP_NODE_ADDRESSES: &str = "NODE_ADDRESSES";
pub const MAP_EXTERNAL_STATE: &str = "EXTERNAL_STATE";
/// Every map the datapath pins, in a stable order (the order of [`PINNED_MAPS`]).
pub const MAP_NAMES: [&str; PINNED_MAPS.len()] = {
    let mut names = [""; PINNED_MAPS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = PINNED_MAPS[i].name;
        i += 1;
    }
    names
};

/// Host veth TC ingress: packets a pod sends.
pub const PROG_FROM_POD: &str = "from_pod";
/// Host veth TC egress: packets the node stack sends to a pod.
pub const PROG_TO_POD: &str = "to_pod";
/// Uplink and tunnel TC ingress: packets arriving at the node.
pub const PROG_FROM_NETDEV: &str = "from_netdev";
/// Uplink TC egress: packets leaving the node.
pub const PROG_TO_NETDEV: &str = "to_netdev";
/// Every TC program the datapath pins.
pub const PROGRAM_NAMES: [&str; 4] = [PROG_FROM_POD, PROG_TO_POD, PROG_FROM_NETDEV, PROG_TO_NETDEV];

/// cgroup `connect4`: TCP and connected UDP to a Service frontend get a backend.
pub const PROG_SERVICE_CONNECT4: &str = "service_connect4";
/// cgroup `sendmsg4`: unconnected UDP to a Service frontend gets a backend.
pub const PROG_SERVICE_SENDMSG4: &str = "service_sendmsg4";
/// cgroup `recvmsg4`: a UDP reply from a backend shows the frontend as its source.
pub const PROG_SERVICE_RECVMSG4: &str = "service_recvmsg4";
/// cgroup `getpeername4`: a connected socket's peer shows as the frontend.
pub const PROG_SERVICE_GETPEERNAME4: &str = "service_getpeername4";
/// cgroup `connect6`: `connect4`'s work for an IPv4-mapped address of an AF_INET6 socket.
/// (No `sendmsg6`: the kernel sends to a mapped address through the IPv4 path, `sendmsg4`.)
pub const PROG_SERVICE_CONNECT6: &str = "service_connect6";
/// cgroup `recvmsg6`: `recvmsg4`'s work for an AF_INET6 socket's IPv4-mapped peer.
pub const PROG_SERVICE_RECVMSG6: &str = "service_recvmsg6";
/// cgroup `getpeername6`: `getpeername4`'s work for an AF_INET6 socket's IPv4-mapped peer.
pub const PROG_SERVICE_GETPEERNAME6: &str = "service_getpeername6";
/// Every cgroup program of the Services datapath (issue 15), loaded and pinned with the
/// TC programs, attached to the cgroup only in `--service-mode ebpf`.
pub const SERVICE_PROGRAM_NAMES: [&str; 7] = [
    PROG_SERVICE_CONNECT4,
    PROG_SERVICE_SENDMSG4,
    PROG_SERVICE_RECVMSG4,
    PROG_SERVICE_GETPEERNAME4,
    PROG_SERVICE_CONNECT6,
    PROG_SERVICE_RECVMSG6,
    PROG_SERVICE_GETPEERNAME6,
];

/// Capacity of `ROUTES` and `ENDPOINTS`.
pub const MAX_ROUTES: u32 = 16384;
pub const MAX_ENDPOINTS: u32 = 16384;
/// Capacity of `NAT` (both directions of each translated flow): 262144 entries, 131072
/// flows, preallocated: 24 MiB as the kernel accounts it (96 bytes per entry with its
/// hash bucket). Established TCP flows live for days (like conntrack), so
/// the table is sized for many long-lived flows; the LRU evicts the least recently used
/// entry if it ever fills.
pub const MAX_NAT: u32 = 262144;
pub const MAX_NO_MASQ: u32 = 64;
pub const MAX_STACK_FLOWS: u32 = 65536;
/// Capacity of `FRAGMENTS`: datagrams whose later fragments are still expected.
pub const MAX_FRAGMENTS: u32 = 8192;
/// Capacity of `PEERS`: room for clusters of several thousand nodes.
pub const MAX_PEERS: u32 = 16384;
/// Capacity of `SERVICES`: frontends (a Service has one per port and address: ClusterIP,
/// externalIPs, and one for a NodePort, served on every node address).
pub const MAX_SERVICES: u32 = 65536;
/// Capacity of `BACKENDS`: backend slots of all frontends together.
pub const MAX_BACKENDS: u32 = 262144;
/// Capacity of `AFFINITY`: (client, frontend) pairs with `sessionAffinity: ClientIP`.
pub const MAX_AFFINITY: u32 = 65536;
/// Capacity of `SOCK_REVERSE`: (UDP socket, backend) pairs in use.
pub const MAX_SOCK_REVERSE: u32 = 65536;
/// Capacity of `HOST_PORTS`: (hostIP, hostPort, protocol) of this node's pods, a hostPort
/// without hostIP counting once (at 0.0.0.0). Not preallocated: only the plugin inserts.
pub const MAX_HOST_PORTS: u32 = 65536;
/// Capacity of `EXTERNAL_NAT` (both directions of each flow from outside the node to a
/// NodePort or externalIP): 131072 entries, 65536 flows, preallocated like `NAT`.
pub const MAX_EXTERNAL_NAT: u32 = 131072;
/// Capacity of `POLICY_ENDPOINTS` and `POLICY_DROPS`: one per pod on this node, like
/// `ENDPOINTS`.
pub const MAX_POLICY_ENDPOINTS: u32 = 16384;
/// Capacity of `POLICY_IDENTITIES`: every pod IP of the largest cluster (5,000 nodes of 250
/// pods: 1,250,000), the nodes and the policies' CIDRs. An LPM trie allocates per entry
/// (`BPF_F_NO_PREALLOC`), so the cap costs nothing until it is used.
pub const MAX_POLICY_IDENTITIES: u32 = 2_097_152;
/// Capacity of `POLICY`: allowed (endpoint, peer identity, port, protocol, direction) keys
/// of this node's pods; not preallocated either.
pub const MAX_POLICY: u32 = 262144;
/// Capacity of `POLICY_CT`: pod flows of this node while any policy is active (LRU).
pub const MAX_POLICY_CT: u32 = 262144;
/// Capacity of `NODE_ADDRESSES`: the IPv4 addresses of the node's namespace (every link,
/// 127.0.0.1 included). Not preallocated: only the agent inserts.
pub const MAX_NODE_ADDRESSES: u32 = 4096;

/// The kinds of map the datapath pins, numbered as the kernel's `BPF_MAP_TYPE_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    PerCpuHash = 5,
    PerCpuArray = 6,
    LruHash = 9,
    LpmTrie = 11,
}

impl MapKind {
    /// The name bpftool prints for the kind.
    pub const fn name(self) -> &'static str {
        match self {
            MapKind::Hash => "hash",
            MapKind::Array => "array",
            MapKind::PerCpuHash => "percpu_hash",
            MapKind::PerCpuArray => "percpu_array",
            MapKind::LruHash => "lru_hash",
            MapKind::LpmTrie => "lpm_trie",
        }
    }
}

/// The shape of one pinned map, declared once: the programs' map definitions are checked
/// against it at compile time, the agent refuses pins of another shape, and a test holds
/// the README's limits table to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// The pinned maps' shapes.
pub mod map_spec {
    use super::*;
    use core::mem::size_of;

    /// An LPM trie key: the prefix length (u32) before the IPv4 address.
    const LPM_IPV4_KEY: u32 = 4 + 4;
    /// Array maps are indexed by a u32.
    const ARRAY_INDEX: u32 = 4;
    const IPV4: u32 = 4;

    pub const ROUTES: MapSpec = MapSpec {
        name: MAP_ROUTES,
        kind: MapKind::LpmTrie,
        key_size: LPM_IPV4_KEY,
        value_size: size_of::<Route>() as u32,
        max_entries: MAX_ROUTES,
    };
    pub const ENDPOINTS: MapSpec = MapSpec {
        name: MAP_ENDPOINTS,
        kind: MapKind::Hash,
        key_size: IPV4,
        value_size: size_of::<Endpoint>() as u32,
        max_entries: MAX_ENDPOINTS,
    };
    pub const STATS: MapSpec = MapSpec {
        name: MAP_STATS,
        kind: MapKind::PerCpuArray,
        key_size: ARRAY_INDEX,
        value_size: size_of::<Counter>() as u32,
        max_entries: verdict::COUNT,
    };
    pub const CONFIG: MapSpec = MapSpec {
        name: MAP_CONFIG,
        kind: MapKind::Array,
        key_size: ARRAY_INDEX,
        value_size: size_of::<NodeConfig>() as u32,
        max_entries: 1,
    };
    pub const NAT: MapSpec = MapSpec {
        name: MAP_NAT,
        kind: MapKind::LruHash,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<NatEntry>() as u32,
        max_entries: MAX_NAT,
    };
    /// Value: unused (the prefix's presence is the answer).
    pub const NO_MASQ: MapSpec = MapSpec {
        name: MAP_NO_MASQ,
        kind: MapKind::LpmTrie,
        key_size: LPM_IPV4_KEY,
        value_size: size_of::<u32>() as u32,
        max_entries: MAX_NO_MASQ,
    };
    /// Value: when the flow was last seen (`bpf_ktime_get_ns`).
    pub const STACK_FLOWS: MapSpec = MapSpec {
        name: MAP_STACK_FLOWS,
        kind: MapKind::LruHash,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<u64>() as u32,
        max_entries: MAX_STACK_FLOWS,
    };
    pub const FRAGMENTS: MapSpec = MapSpec {
        name: MAP_FRAGMENTS,
        kind: MapKind::LruHash,
        key_size: size_of::<FragmentKey>() as u32,
        value_size: size_of::<FragmentEntry>() as u32,
        max_entries: MAX_FRAGMENTS,
    };
    /// Value: `PEER_KNOWN`.
    pub const PEERS: MapSpec = MapSpec {
        name: MAP_PEERS,
        kind: MapKind::Hash,
        key_size: IPV4,
        value_size: size_of::<u32>() as u32,
        max_entries: MAX_PEERS,
    };
    pub const SERVICES: MapSpec = MapSpec {
        name: MAP_SERVICES,
        kind: MapKind::Hash,
        key_size: size_of::<service::ServiceKey>() as u32,
        value_size: size_of::<service::ServiceEntry>() as u32,
        max_entries: MAX_SERVICES,
    };
    pub const BACKENDS: MapSpec = MapSpec {
        name: MAP_BACKENDS,
        kind: MapKind::Hash,
        key_size: size_of::<service::BackendKey>() as u32,
        value_size: size_of::<service::Backend>() as u32,
        max_entries: MAX_BACKENDS,
    };
    pub const AFFINITY: MapSpec = MapSpec {
        name: MAP_AFFINITY,
        kind: MapKind::LruHash,
        key_size: size_of::<service::AffinityKey>() as u32,
        value_size: size_of::<service::AffinityEntry>() as u32,
        max_entries: MAX_AFFINITY,
    };
    pub const SOCK_REVERSE: MapSpec = MapSpec {
        name: MAP_SOCK_REVERSE,
        kind: MapKind::LruHash,
        key_size: size_of::<service::SockReverseKey>() as u32,
        value_size: size_of::<service::SockReverseEntry>() as u32,
        max_entries: MAX_SOCK_REVERSE,
    };
    pub const HOST_PORTS: MapSpec = MapSpec {
        name: MAP_HOST_PORTS,
        kind: MapKind::Hash,
        key_size: size_of::<service::ServiceKey>() as u32,
        value_size: size_of::<service::HostPortEntry>() as u32,
        max_entries: MAX_HOST_PORTS,
    };
    pub const EXTERNAL_NAT: MapSpec = MapSpec {
        name: MAP_EXTERNAL_NAT,
        kind: MapKind::LruHash,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<service::ExternalNatEntry>() as u32,
        max_entries: MAX_EXTERNAL_NAT,
    };
    pub const POLICY_ENDPOINTS: MapSpec = MapSpec {
        name: MAP_POLICY_ENDPOINTS,
        kind: MapKind::Hash,
        key_size: IPV4,
        value_size: size_of::<policy::PolicyEndpoint>() as u32,
        max_entries: MAX_POLICY_ENDPOINTS,
    };
    /// Value: the identity (`policy::identity`) of the addresses under the prefix.
    pub const POLICY_IDENTITIES: MapSpec = MapSpec {
        name: MAP_POLICY_IDENTITIES,
        kind: MapKind::LpmTrie,
        key_size: LPM_IPV4_KEY,
        value_size: size_of::<u32>() as u32,
        max_entries: MAX_POLICY_IDENTITIES,
    };
    pub const POLICY: MapSpec = MapSpec {
        name: MAP_POLICY,
        kind: MapKind::Hash,
        key_size: size_of::<policy::PolicyKey>() as u32,
        value_size: size_of::<policy::PolicyEntry>() as u32,
        max_entries: MAX_POLICY,
    };
    pub const POLICY_CT: MapSpec = MapSpec {
        name: MAP_POLICY_CT,
        kind: MapKind::LruHash,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<policy::PolicyCtEntry>() as u32,
        max_entries: MAX_POLICY_CT,
    };
    pub const POLICY_STATE: MapSpec = MapSpec {
        name: MAP_POLICY_STATE,
        kind: MapKind::Array,
        key_size: ARRAY_INDEX,
        value_size: size_of::<policy::PolicyState>() as u32,
        max_entries: 1,
    };
    pub const POLICY_DROPS: MapSpec = MapSpec {
        name: MAP_POLICY_DROPS,
        kind: MapKind::PerCpuHash,
        key_size: IPV4,
        value_size: size_of::<policy::PolicyDrops>() as u32,
        max_entries: MAX_POLICY_ENDPOINTS,
    };
    /// Value: `NODE_ADDRESS_PRESENT`.
    pub const NODE_ADDRESSES: MapSpec = MapSpec {
        name: MAP_NODE_ADDRESSES,
        kind: MapKind::Hash,
        key_size: IPV4,
        value_size: size_of::<u32>() as u32,
        max_entries: MAX_NODE_ADDRESSES,
    };
    pub const EXTERNAL_STATE: MapSpec = MapSpec {
        name: MAP_EXTERNAL_STATE,
        kind: MapKind::Array,
        key_size: ARRAY_INDEX,
        value_size: size_of::<service::ExternalState>() as u32,
        max_entries: 1,
    };
}

/// Every map the datapath pins, in a stable order.
pub const PINNED_MAPS: [MapSpec; 23] = [
    map_spec::ROUTES,
    map_spec::ENDPOINTS,
    map_spec::STATS,
    map_spec::CONFIG,
    map_spec::NAT,
    map_spec::NO_MASQ,
    map_spec::STACK_FLOWS,
    map_spec::FRAGMENTS,
    map_spec::PEERS,
    map_spec::SERVICES,
    map_spec::BACKENDS,
    map_spec::AFFINITY,
    map_spec::SOCK_REVERSE,
    map_spec::HOST_PORTS,
    map_spec::EXTERNAL_NAT,
    map_spec::POLICY_ENDPOINTS,
    map_spec::POLICY_IDENTITIES,
    map_spec::POLICY,
    map_spec::POLICY_CT,
    map_spec::POLICY_STATE,
    map_spec::POLICY_DROPS,
    map_spec::NODE_ADDRESSES,
    map_spec::EXTERNAL_STATE,
];

/// The shape of the pinned map called `name`.
pub fn pinned_map(name: &str) -> Option<&'static MapSpec> {
    PINNED_MAPS.iter().find(|spec| spec.name == name)
}

/// Value of `PEERS` (keyed by a peer node's IP): the node is a known VXLAN peer.
pub const PEER_KNOWN: u32 = 1;

/// Value of `NODE_ADDRESSES` (keyed by an IPv4 address of the node's namespace): the
/// address is this node's, so a NodePort or a hostPort without hostIP answers on it.
pub const NODE_ADDRESS_PRESENT: u32 = 1;

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
/// `Route::kind`: this node's own pod CIDR. Its pods have /32 `ROUTE_LOCAL_ENDPOINT`
/// entries, so a lookup lands here only for an address no pod holds; the programs count it
/// and hand it to the stack, whose `unreachable` route answers ICMP host unreachable.
pub const ROUTE_LOCAL_CIDR: u32 = 4;

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

impl FlowKey {
    /// The same flow seen the other way: the reply's key.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

/// `NatEntry::direction`: the entry translates a pod's outgoing packets.
pub const NAT_EGRESS: u8 = 1;
/// `NatEntry::direction`: the entry translates replies back to the pod.
pub const NAT_INGRESS: u8 = 2;

/// `NatEntry::state` bits, the same in both entries of a flow (whichever program sees an
/// event sets it in both). The agent turns them into a lifetime (`mycni::nat`).
pub mod nat_state {
    /// A packet came back from the peer (for UDP: the flow is answered).
    pub const REPLIED: u8 = 1 << 0;
    /// The pod sent a SYN (a TCP flow that started here).
    pub const TCP_SYN: u8 = 1 << 1;
    /// The pod acknowledged after the peer answered: the handshake is complete.
    pub const TCP_ESTABLISHED: u8 = 1 << 2;
    /// The pod sent a FIN.
    pub const TCP_FIN_OUT: u8 = 1 << 3;
    /// The peer sent a FIN.
    pub const TCP_FIN_IN: u8 = 1 << 4;
    /// Either side sent a RST.
    pub const TCP_RST: u8 = 1 << 5;
    /// The connection is over (RST, or a FIN each way): a new flow may take its port.
    pub const fn tcp_closed(state: u8) -> bool {
        state & TCP_RST != 0 || state & (TCP_FIN_OUT | TCP_FIN_IN) == TCP_FIN_OUT | TCP_FIN_IN
    }
}

/// Value of `NAT`: the address and port to write, the flow's state (`nat_state` bits),
/// and when the flow was last seen in this direction (`bpf_ktime_get_ns`, i.e.
/// CLOCK_MONOTONIC), for the agent's expiry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub addr: [u8; 4],
    pub port: u16,
    pub direction: u8,
    pub state: u8,
    pub last_seen_ns: u64,
}

/// Key of `FRAGMENTS`: one fragmented datagram (RFC 791 reassembly key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// The IP identification, host order.
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}

/// `FragmentEntry::action`: later fragments keep their addresses (not translated).
pub const FRAGMENT_PASS: u8 = 0;
/// `FragmentEntry::action`: later fragments get `addr` as their source (SNAT).
pub const FRAGMENT_SNAT: u8 = 1;
/// `FragmentEntry::action`: later fragments get `addr` as their destination (reverse NAT).
pub const FRAGMENT_REVERSE_NAT: u8 = 2;
/// `FragmentEntry::action`: later fragments go to the node stack, like their first one.
pub const FRAGMENT_TO_STACK: u8 = 3;

/// `FragmentEntry::action`: later fragments from outside get `addr` (a Service backend) as
/// their destination and follow their first fragment to it.
pub const FRAGMENT_EXTERNAL_DNAT: u8 = 4;
/// `FragmentEntry::action`: as `FRAGMENT_EXTERNAL_DNAT`, with the node IP as the source.
pub const FRAGMENT_EXTERNAL_DNAT_SNAT: u8 = 5;
/// `FragmentEntry::action`: later fragments of a backend's reply get `addr` (the frontend)
/// as their source and go back to the client.
pub const FRAGMENT_EXTERNAL_REPLY: u8 = 6;

/// Value of `FRAGMENTS`: what was done to the first fragment, for the later ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentEntry {
    /// The address written into the first fragment (source or destination by `action`).
    pub addr: [u8; 4],
    pub action: u8,
    pub pad: [u8; 3],
}

/// Value of `ROUTES`, an LPM trie keyed by `{prefix_len, [u8; 4]}`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// `ROUTE_LOCAL_ENDPOINT`, `ROUTE_REMOTE_NODE`, `ROUTE_REMOTE_TUNNEL` or
    /// `ROUTE_LOCAL_CIDR`.
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
    /// Dropped: no free SNAT port for the flow (a new TCP flow's SYN is answered with a RST).
    pub const DROP_NAT_EXHAUSTED: u32 = 10;
    /// A reply of a flow the node stack delivered or translated (kube-proxy, hostPort, a
    /// node's probe): handed to the stack so it can undo its translation and its conntrack
    /// sees both directions (`from_pod`, `from_netdev`), or left unmasqueraded
    /// (`to_netdev`).
    pub const STACK_FLOW_REPLY: u32 = 11;
    /// A later fragment translated like its first fragment.
    pub const FRAGMENT_TRANSLATED: u32 = 12;
    /// An ICMP error about a translated flow, translated back to the pod.
    pub const ICMP_ERROR_TRANSLATED: u32 = 13;
    /// Dropped: a later fragment of a pod's datagram whose first fragment was not
    /// translated (it would leave with the pod's address).
    pub const DROP_FRAGMENT_UNTRACKED: u32 = 14;
    /// Dropped: arrived on the VXLAN device from an address that is not a known peer node,
    /// or with another VNI (the device accepts any sender and any VNI).
    pub const DROP_TUNNEL_FOREIGN: u32 = 15;
    /// Dropped: IPv6 from a pod (IPv4 only until dual-stack lands).
    pub const DROP_IPV6: u32 = 16;
    /// Dropped: a pod's packet that needs masquerading in a protocol SNAT cannot translate
    /// (anything but TCP, UDP and ICMP echo requests); it would leave with the pod's address.
    pub const DROP_UNTRANSLATABLE: u32 = 17;
    /// To an address of this node's pod CIDR that no pod holds: handed to the stack, whose
    /// `unreachable` route answers ICMP host unreachable.
    pub const TO_UNASSIGNED: u32 = 18;
    /// Dropped: NetworkPolicy does not allow the flow into a pod of this node.
    pub const DROP_POLICY_INGRESS: u32 = 19;
    /// Dropped: NetworkPolicy does not allow the flow out of a pod of this node.
    pub const DROP_POLICY_EGRESS: u32 = 20;
    /// A connection or datagram to a Service frontend sent to one of its backends (cgroup
    /// `connect4`/`sendmsg4`; counted per socket call, `bytes` stays zero).
    pub const SERVICE_TRANSLATED: u32 = DROP_POLICY_EGRESS + 1;
    /// A connection or datagram to a Service frontend with no backend, refused with
    /// `ECONNREFUSED`.
    pub const SERVICE_NO_BACKEND: u32 = SERVICE_TRANSLATED + 1;
    /// A connection or datagram to a pod's hostPort (`HOST_PORTS`) sent to the pod (cgroup
    /// `connect4`/`sendmsg4`; counted per socket call, `bytes` stays zero).
    pub const HOST_PORT_TRANSLATED: u32 = SERVICE_NO_BACKEND + 1;
    /// A packet from outside the node to a NodePort, externalIP or hostPort frontend sent
    /// to one of its backends (`from_netdev`), or its backend's reply sent back as the
    /// frontend (`from_pod`, or `from_netdev` after the reverse SNAT).
    pub const EXTERNAL_TRANSLATED: u32 = HOST_PORT_TRANSLATED + 1;
    /// Dropped: a packet from outside the node to a NodePort or externalIP frontend with no
    /// backend (with `externalTrafficPolicy: Local`, none on this node).
    pub const EXTERNAL_NO_BACKEND: u32 = EXTERNAL_TRANSLATED + 1;
    /// Dropped: a reply (or an ICMP error about one) of a flow from outside the node to a
    /// frontend whose `EXTERNAL_NAT` entries are gone (evicted from the full LRU): a remote
    /// backend's reply after the reverse SNAT, which would leave with the backend's address,
    /// or a client's ICMP error about a reply whose SNAT entry is gone.
    pub const DROP_EXTERNAL_UNTRACKED: u32 = EXTERNAL_NO_BACKEND + 1;
    /// Number of verdicts, the length of `STATS`.
    pub const COUNT: u32 = DROP_EXTERNAL_UNTRACKED + 1;
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
        "fragment_translated",
        "icmp_error_translated",
        "drop_fragment_untracked",
        "drop_tunnel_foreign",
        "drop_ipv6",
        "drop_untranslatable",
        "to_unassigned",
        "drop_policy_ingress",
        "drop_policy_egress",
        "service_translated",
        "service_no_backend",
        "host_port_translated",
        "external_translated",
        "external_no_backend",
        "drop_external_untracked",
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
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentEntry {}
    unsafe impl aya::Pod for super::service::ServiceKey {}
    unsafe impl aya::Pod for super::service::ServiceEntry {}
    unsafe impl aya::Pod for super::service::BackendKey {}
    unsafe impl aya::Pod for super::service::Backend {}
    unsafe impl aya::Pod for super::service::AffinityKey {}
    unsafe impl aya::Pod for super::service::AffinityEntry {}
    unsafe impl aya::Pod for super::service::SockReverseKey {}
    unsafe impl aya::Pod for super::service::SockReverseEntry {}
    unsafe impl aya::Pod for super::service::HostPortEntry {}
    unsafe impl aya::Pod for super::service::ExternalNatEntry {}
    unsafe impl aya::Pod for super::service::ExternalState {}
    unsafe impl aya::Pod for super::policy::PolicyKey {}
    unsafe impl aya::Pod for super::policy::PolicyEntry {}
    unsafe impl aya::Pod for super::policy::PolicyEndpoint {}
    unsafe impl aya::Pod for super::policy::PolicyState {}
    unsafe impl aya::Pod for super::policy::PolicyCtEntry {}
    unsafe impl aya::Pod for super::policy::PolicyDrops {}
}

#[cfg(test)]
mod tests {
    extern crate std;

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
        assert_eq!(size_of::<service::ServiceKey>(), 8);
        assert_eq!(size_of::<service::ServiceEntry>(), 16);
        assert_eq!(size_of::<service::BackendKey>(), 8);
        assert_eq!(size_of::<service::Backend>(), 8);
        assert_eq!(size_of::<service::AffinityKey>(), 16);
        assert_eq!(size_of::<service::AffinityEntry>(), 16);
        assert_eq!(size_of::<service::SockReverseKey>(), 16);
        assert_eq!(size_of::<service::SockReverseEntry>(), 8);
        assert_eq!(size_of::<service::HostPortEntry>(), 8 + 8);
        assert_eq!(size_of::<service::ExternalNatEntry>(), 16);
        assert_eq!(size_of::<policy::PolicyKey>(), 12);
        assert_eq!(size_of::<policy::PolicyEntry>(), 4);
        assert_eq!(size_of::<policy::PolicyEndpoint>(), 8);
        assert_eq!(size_of::<policy::PolicyState>(), 8);
        assert_eq!(size_of::<policy::PolicyCtEntry>(), 4 + 1 + 3 + 8);
        assert_eq!(size_of::<policy::PolicyDrops>(), 16);
        assert_eq!(size_of::<FragmentKey>(), 12);
        assert_eq!(size_of::<FragmentEntry>(), 8);
    }

    /// The README's limits table, as (map names, capacities) per row.
    fn readme_limits() -> std::vec::Vec<(std::vec::Vec<std::string::String>, std::vec::Vec<u32>)> {
        use std::string::ToString;
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n### Limits\n")
            .nth(1)
            .expect("the README has a Limits section");
        section
            .lines()
            .skip_while(|line| !line.starts_with("| map |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .map(|row| {
                let cells: std::vec::Vec<&str> = row.split('|').map(str::trim).collect();
                let names = cells[1]
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(ToString::to_string)
                    .collect();
                // "16,384 prefixes" is 16384; "19 verdicts, 1" is 19 and 1.
                let capacities = cells[2]
                    .split_whitespace()
                    .map(|word| word.trim_end_matches(',').replace(',', ""))
                    .filter_map(|word| word.parse().ok())
                    .collect();
                (names, capacities)
            })
            .collect()
    }

    /// The table is written by hand (its memory column is measured, the rest is prose);
    /// this holds its capacities to the declarations the programs and the agent use.
    #[test]
    fn readme_limits_table_states_every_pinned_map_capacity() {
        let rows = readme_limits();
        assert!(!rows.is_empty(), "no rows in the README's limits table");
        for spec in PINNED_MAPS {
            let stated: std::vec::Vec<u32> = rows
                .iter()
                .filter_map(|(names, capacities)| {
                    let column = names.iter().position(|name| name == spec.name)?;
                    Some(*capacities.get(column).unwrap_or_else(|| {
                        panic!("the README's limits row for {} has no capacity", spec.name)
                    }))
                })
                .collect();
            assert_eq!(
                stated,
                [spec.max_entries],
                "README limits table: {} holds {} entries",
                spec.name,
                spec.max_entries
            );
        }
        for (names, _) in &rows {
            for name in names {
                assert!(
                    pinned_map(name).is_some(),
                    "the README's limits table names {name}, which is not a pinned map"
                );
            }
        }
    }

    #[test]
    fn map_names_follow_the_pinned_maps() {
        assert_eq!(MAP_NAMES.len(), PINNED_MAPS.len());
        for (name, spec) in MAP_NAMES.iter().zip(PINNED_MAPS) {
            assert_eq!(*name, spec.name);
        }
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }
}
