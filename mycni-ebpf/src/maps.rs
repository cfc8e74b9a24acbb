//! The maps, shared by all programs: the pinned ones the agent and the plugin fill and read
//! (named as in `mycni_common::MAP_NAMES`), the log rate limit's, and their lookups.
use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::macros::btf_map;
use mycni_common::{
    verdict, Counter, Endpoint, FlowKey, FragmentEntry, FragmentKey, NatEntry, NodeConfig, Route,
    MAX_ENDPOINTS, MAX_FRAGMENTS, MAX_NAT, MAX_NO_MASQ, MAX_PEERS, MAX_ROUTES, MAX_STACK_FLOWS,
};

#[btf_map]
pub(crate) static ROUTES: LpmTrie<[u8; 4], Route, { MAX_ROUTES as usize }> = LpmTrie::new();

#[btf_map]
pub(crate) static ENDPOINTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> =
    HashMap::new();

#[btf_map]
pub(crate) static STATS: PerCpuArray<Counter, { verdict::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub(crate) static CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map]
pub(crate) static NAT: LruHashMap<FlowKey, NatEntry, { MAX_NAT as usize }> = LruHashMap::new();

/// Destinations never masqueraded: the cluster CIDR and configured extra CIDRs.
#[btf_map]
pub(crate) static NO_MASQ: LpmTrie<[u8; 4], u32, { MAX_NO_MASQ as usize }> = LpmTrie::new();

/// Reply tuples of flows the node stack delivered to a pod or routed from one pod to
/// another (and possibly translated): their replies go back through the stack.
#[btf_map]
pub(crate) static STACK_FLOWS: LruHashMap<FlowKey, u64, { MAX_STACK_FLOWS as usize }> =
    LruHashMap::new();

/// What was done to the first fragment of a fragmented datagram, so its later fragments
/// (which carry no ports) get the same: keyed like the kernel's reassembly.
#[btf_map]
pub(crate) static FRAGMENTS: LruHashMap<FragmentKey, FragmentEntry, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// The other nodes' IPs: the only senders whose VXLAN `from_netdev` decapsulates toward pods.
#[btf_map]
pub(crate) static PEERS: HashMap<[u8; 4], u32, { MAX_PEERS as usize }> = HashMap::new();

/// When the programs last logged at each level (indexed by `Level as u32`). Not pinned:
/// each load starts afresh, like its log buffer (aya-log's `AYA_LOGS`).
#[btf_map]
pub(crate) static LOG_LAST_NS: Array<u64, 6> = Array::new();

#[inline(always)]
pub(crate) fn config() -> Option<&'static NodeConfig> {
    CONFIG.get(0)
}

#[inline(always)]
pub(crate) fn route_of(addr: [u8; 4]) -> Option<&'static Route> {
    ROUTES.get(&Key::new(32, addr))
}
