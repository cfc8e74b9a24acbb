//! The maps, shared by all programs: the pinned ones the agent and the plugin fill and read,
//! the log rate limit's, and their lookups.
//!
//! The pinned maps' shapes are declared once, in `mycni_common::map_spec`: capacities are
//! taken from there, and the kind, key and value sizes and name of each definition below
//! are checked against it at compile time (`check_spec!`).
use core::mem::size_of;

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap};
use aya_ebpf::macros::btf_map;
use mycni_common::policy::{
    PolicyCtEntry, PolicyDrops, PolicyEndpoint, PolicyEntry, PolicyKey, PolicyState,
};
use mycni_common::service::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ExternalNatEntry, ExternalState,
    HostPortEntry, ServiceEntry, ServiceKey, SockReverseEntry, SockReverseKey,
};
use mycni_common::{
    map_spec, Counter, Endpoint, FlowKey, FragmentEntry, FragmentKey, MapKind, MapSpec, NatEntry,
    NodeConfig, Route,
};

#[btf_map]
pub(crate) static ROUTES: LpmTrie<[u8; 4], Route, { map_spec::ROUTES.max_entries as usize }> =
    LpmTrie::new();

#[btf_map]
pub(crate) static ENDPOINTS: HashMap<
    [u8; 4],
    Endpoint,
    { map_spec::ENDPOINTS.max_entries as usize },
> = HashMap::new();

#[btf_map]
pub(crate) static STATS: PerCpuArray<Counter, { map_spec::STATS.max_entries as usize }> =
    PerCpuArray::new();

#[btf_map]
pub(crate) static CONFIG: Array<NodeConfig, { map_spec::CONFIG.max_entries as usize }> =
    Array::new();

#[btf_map]
pub(crate) static NAT: LruHashMap<FlowKey, NatEntry, { map_spec::NAT.max_entries as usize }> =
    LruHashMap::new();

/// Destinations never masqueraded: the cluster CIDR and configured extra CIDRs.
#[btf_map]
pub(crate) static NO_MASQ: LpmTrie<[u8; 4], u32, { map_spec::NO_MASQ.max_entries as usize }> =
    LpmTrie::new();

/// Reply tuples of flows the node stack delivered to a pod or routed from one pod to
/// another (and possibly translated): their replies go back through the stack.
#[btf_map]
pub(crate) static STACK_FLOWS: LruHashMap<
    FlowKey,
    u64,
    { map_spec::STACK_FLOWS.max_entries as usize },
> = LruHashMap::new();

/// What was done to the first fragment of a fragmented datagram, so its later fragments
/// (which carry no ports) get the same: keyed like the kernel's reassembly.
#[btf_map]
pub(crate) static FRAGMENTS: LruHashMap<
    FragmentKey,
    FragmentEntry,
    { map_spec::FRAGMENTS.max_entries as usize },
> = LruHashMap::new();

/// The other nodes' IPs: the only senders whose VXLAN `from_netdev` decapsulates toward pods.
#[btf_map]
pub(crate) static PEERS: HashMap<[u8; 4], u32, { map_spec::PEERS.max_entries as usize }> =
    HashMap::new();

/// Service frontends (address, port, protocol) and how many backends each has. Not
/// preallocated (as Cilium's Services maps): only the agent inserts, so no program ever
/// waits on an allocation, and a node with few Services does not hold 26 MB for 10,000.
#[btf_map]
pub(crate) static SERVICES: HashMap<
    ServiceKey,
    ServiceEntry,
    { map_spec::SERVICES.max_entries as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Each frontend's backends, in slots `0..backend_count`. Not preallocated, as `SERVICES`.
#[btf_map]
pub(crate) static BACKENDS: HashMap<
    BackendKey,
    Backend,
    { map_spec::BACKENDS.max_entries as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The backend each client (network namespace) last used for a frontend with
/// `sessionAffinity: ClientIP`.
#[btf_map]
pub(crate) static AFFINITY: LruHashMap<
    AffinityKey,
    AffinityEntry,
    { map_spec::AFFINITY.max_entries as usize },
> = LruHashMap::new();

/// The frontend each socket addressed, by the backend it was given: replies and
/// `getpeername` show the frontend.
#[btf_map]
pub(crate) static SOCK_REVERSE: LruHashMap<
    SockReverseKey,
    SockReverseEntry,
    { map_spec::SOCK_REVERSE.max_entries as usize },
> = LruHashMap::new();

/// This node's pods' hostPorts (hostIP, hostPort, protocol) -> the pod's address and
/// containerPort. Written by the CNI plugin only, so not preallocated, as `SERVICES`.
#[btf_map]
pub(crate) static HOST_PORTS: HashMap<
    ServiceKey,
    HostPortEntry,
    { map_spec::HOST_PORTS.max_entries as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();
/// Flows from outside the node to NodePort and externalIP frontends, both directions: the
/// backend each client flow goes to, and the frontend each backend's reply comes from.
#[btf_map]
pub(crate) static EXTERNAL_NAT: LruHashMap<
    FlowKey,
    ExternalNatEntry,
    { map_spec::EXTERNAL_NAT.max_entries as usize },
> = LruHashMap::new();

/// The local pods some policy selects, and for which directions (`mycni_common::policy`).
#[btf_map]
pub(crate) static POLICY_ENDPOINTS: HashMap<
    [u8; 4],
    PolicyEndpoint,
    { map_spec::POLICY_ENDPOINTS.max_entries as usize },
> = HashMap::new();

/// Address prefix -> the identity of the peers under it.
#[btf_map]
pub(crate) static POLICY_IDENTITIES: LpmTrie<
    [u8; 4],
    u32,
    { map_spec::POLICY_IDENTITIES.max_entries as usize },
> = LpmTrie::new();

/// Allowed (endpoint, peer identity, port, protocol, direction). Written by the agent only,
/// so not preallocated: memory grows with the rules, not with the capacity.
#[btf_map]
pub(crate) static POLICY: HashMap<
    PolicyKey,
    PolicyEntry,
    { map_spec::POLICY.max_entries as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Connection tracking of pod flows while policy is active: the original tuple of each
/// allowed flow and the policy revision it was allowed under.
#[btf_map]
pub(crate) static POLICY_CT: LruHashMap<
    FlowKey,
    PolicyCtEntry,
    { map_spec::POLICY_CT.max_entries as usize },
> = LruHashMap::new();

/// `{revision, active}`: the one lookup every packet pays when no policy is active.
#[btf_map]
pub(crate) static POLICY_STATE: Array<
    PolicyState,
    { map_spec::POLICY_STATE.max_entries as usize },
> = Array::new();

/// Packets policy dropped, per local pod and direction, per CPU. Not preallocated: its
/// per-CPU values would take 16 bytes per CPU for every possible pod; entries are made on a
/// pod's first drop only.
#[btf_map]
pub(crate) static POLICY_DROPS: PerCpuHashMap<
    [u8; 4],
    PolicyDrops,
    { map_spec::POLICY_DROPS.max_entries as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// The IPv4 addresses of the node's namespace, kept by the agent from rtnetlink: where
/// NodePorts and hostPorts without hostIP (the wildcard keys) answer. Written by the agent
/// only, so not preallocated.
#[btf_map]
pub(crate) static NODE_ADDRESSES: HashMap<
    [u8; 4],
    u32,
    { map_spec::NODE_ADDRESSES.max_entries as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// A map definition's shape as the kernel will see it.
trait Shape {
    const KIND: MapKind;
    const KEY_SIZE: usize;
    const VALUE_SIZE: usize;
    const MAX_ENTRIES: usize;
}

impl<K, V, const N: usize, const F: usize> Shape for LpmTrie<K, V, N, F> {
    const KIND: MapKind = MapKind::LpmTrie;
    const KEY_SIZE: usize = size_of::<Key<K>>();
    const VALUE_SIZE: usize = size_of::<V>();
    const MAX_ENTRIES: usize = N;
}

impl<K, V, const N: usize, const F: usize> Shape for HashMap<K, V, N, F> {
    const KIND: MapKind = MapKind::Hash;
    const KEY_SIZE: usize = size_of::<K>();
    const VALUE_SIZE: usize = size_of::<V>();
    const MAX_ENTRIES: usize = N;
}

impl<K, V, const N: usize, const F: usize> Shape for PerCpuHashMap<K, V, N, F> {
    const KIND: MapKind = MapKind::PerCpuHash;
    const KEY_SIZE: usize = size_of::<K>();
    const VALUE_SIZE: usize = size_of::<V>();
    const MAX_ENTRIES: usize = N;
}

impl<K, V, const N: usize, const F: usize> Shape for LruHashMap<K, V, N, F> {
    const KIND: MapKind = MapKind::LruHash;
    const KEY_SIZE: usize = size_of::<K>();
    const VALUE_SIZE: usize = size_of::<V>();
    const MAX_ENTRIES: usize = N;
}

impl<T, const N: usize, const F: usize> Shape for Array<T, N, F> {
    const KIND: MapKind = MapKind::Array;
    const KEY_SIZE: usize = size_of::<u32>();
    const VALUE_SIZE: usize = size_of::<T>();
    const MAX_ENTRIES: usize = N;
}

impl<T, const N: usize, const F: usize> Shape for PerCpuArray<T, N, F> {
    const KIND: MapKind = MapKind::PerCpuArray;
    const KEY_SIZE: usize = size_of::<u32>();
    const VALUE_SIZE: usize = size_of::<T>();
    const MAX_ENTRIES: usize = N;
}

const fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether the definition of `map`, named `name`, has the shape `spec` declares.
const fn has_shape<M: Shape>(_map: &M, name: &str, spec: &MapSpec) -> bool {
    same_name(name, spec.name)
        && M::KIND as u32 == spec.kind as u32
        && M::KEY_SIZE == spec.key_size as usize
        && M::VALUE_SIZE == spec.value_size as usize
        && M::MAX_ENTRIES == spec.max_entries as usize
}

/// Fails the build when a pinned map's definition and its `map_spec` entry disagree.
macro_rules! check_spec {
    ($($map:ident),+ $(,)?) => {
        $(const _: () = assert!(
            has_shape(&$map, stringify!($map), &map_spec::$map),
            concat!("the definition of ", stringify!($map), " does not match map_spec::", stringify!($map)),
        );)+
    };
}

check_spec!(
    ROUTES,
    ENDPOINTS,
    STATS,
    CONFIG,
    NAT,
    NO_MASQ,
    STACK_FLOWS,
    FRAGMENTS,
    PEERS,
    SERVICES,
    BACKENDS,
    AFFINITY,
    SOCK_REVERSE,
    HOST_PORTS,
    EXTERNAL_NAT,
    POLICY_ENDPOINTS,
    POLICY_IDENTITIES,
    POLICY,
    POLICY_CT,
    POLICY_STATE,
    POLICY_DROPS,
    NODE_ADDRESSES,
    EXTERNAL_STATE,
);

/// `{local_clients}`: whether this node's own pods ever reached its frontends through the
/// uplink, which makes `from_pod` look local pods' packets up in `EXTERNAL_NAT`.
#[btf_map]
pub(crate) static EXTERNAL_STATE: Array<
    ExternalState,
    { map_spec::EXTERNAL_STATE.max_entries as usize },
> = Array::new();

/// When the programs last logged at each level (indexed by `Level as u32`). Not pinned:
/// each load starts afresh, like its log buffer (aya-log's `AYA_LOGS`).
#[btf_map]
pub(crate) static LOG_LAST_NS: Array<u64, 6> = Array::new();

#[inline(always)]
pub(crate) fn config() -> Option<&'static NodeConfig> {
    CONFIG.get(0)
}

/// Whether `address` is one of the node's own (`NODE_ADDRESSES`).
#[inline(always)]
pub(crate) fn is_node_address(address: [u8; 4]) -> bool {
    // SAFETY: only presence is read.
    unsafe { NODE_ADDRESSES.get(&address) }.is_some()
}

#[inline(always)]
pub(crate) fn route_of(addr: [u8; 4]) -> Option<&'static Route> {
    ROUTES.get(&Key::new(32, addr))
}
