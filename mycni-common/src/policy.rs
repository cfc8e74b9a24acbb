//! Keys and values of the NetworkPolicy maps (issue 14).
//!
//! The per-packet decision for a local pod `E`, direction `D`, peer address `P`, protocol
//! and destination port of the flow's first packet:
//! 1. `POLICY_ENDPOINTS[E]`: absent, or without `D`'s bit in `enforce`, allows (a pod no
//!    policy selects for that direction).
//! 2. The peer's identity: `POLICY_IDENTITIES` (LPM trie) at `P`; no match is
//!    [`identity::WORLD`].
//! 3. Allowed if any of these `POLICY` keys exists, in this order:
//!    `(E, id, port, proto, D)`, `(E, id, 0, proto, D)`, `(E, id, 0, 0, D)`,
//!    `(E, ANY, port, proto, D)`, `(E, ANY, 0, proto, D)`, `(E, ANY, 0, 0, D)`.
//!
//! A fixed number of lookups per packet, whatever the number of policies; a pod's label
//! change rewrites its one `POLICY_IDENTITIES` entry when its new label set already has an
//! identity. Ports are in **host** byte order (bpftool prints numbers).

/// Reserved identities; allocated ones start at [`identity::FIRST_ALLOCATED`].
pub mod identity {
    /// In a `PolicyKey`: any peer (a rule without `from`/`to`).
    pub const ANY: u32 = 0;
    /// This node's own addresses (the kubelet's probes come from here).
    pub const HOST: u32 = 1;
    /// Anything no entry covers: outside the cluster.
    pub const WORLD: u32 = 2;
    /// Another node's addresses.
    pub const REMOTE_NODE: u32 = 3;
    /// In a `PolicyEndpoint`: the plugin's fail-closed marker, written at CNI ADD for a pod
    /// whose namespace has policies, before the agent has resolved the pod: both directions
    /// are denied but the node's probes (its one `POLICY` row, `HOST` ingress, as the agent
    /// writes for every pod it enforces ingress on). The agent replaces it once it knows
    /// the pod.
    pub const UNRESOLVED: u32 = 4;
    pub const FIRST_ALLOCATED: u32 = 256;
}

/// `PolicyKey::direction`.
pub const POLICY_INGRESS: u8 = 0;
pub const POLICY_EGRESS: u8 = 1;

/// `PolicyEndpoint::enforce` bits: which directions some policy selects the pod for.
pub const ENFORCE_INGRESS: u8 = 1;
pub const ENFORCE_EGRESS: u8 = 2;

/// Key of `POLICY`: one allowed (endpoint, peer identity, port, protocol, direction).
/// `port` 0 is any port, `protocol` 0 any protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The local pod's IP.
    pub endpoint: [u8; 4],
    pub peer_identity: u32,
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub direction: u8,
}

/// Value of `POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntry {
    /// How many policy rules allow this key (for `mycni-agent policy` and bpftool).
    pub rules: u32,
}

/// Value of `POLICY_ENDPOINTS`, keyed by the local pod's IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEndpoint {
    /// The pod's own identity.
    pub identity: u32,
    /// `ENFORCE_*` bits.
    pub enforce: u8,
    pub pad: [u8; 3],
}

/// Value of `POLICY_STATE`, an array of one. The agent writes the maps, then bumps
/// `revision`, so every connection-tracking entry made under an older revision is checked
/// again on its next packet; `active` is zero while no endpoint enforces anything, and then
/// the programs stop after this one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub revision: u32,
    pub active: u32,
}

/// `PolicyCtEntry::flags`: the flow was recorded where no decision could be made yet (a
/// pod's packet handed to the node stack, e.g. to a ClusterIP before kube-proxy's DNAT): the
/// entry only lets its replies back in; the translated flow is checked where the stack
/// sends it (`to_pod`, `to_netdev`).
pub const CT_VIA_STACK: u8 = 1;

/// Value of `POLICY_CT`, an LRU hash keyed by the `FlowKey` of a flow's first packet (its
/// original direction; a reply matches the reversed key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCtEntry {
    /// The `PolicyState::revision` the flow was last allowed under.
    pub revision: u32,
    /// `CT_*` bits.
    pub flags: u8,
    pub pad: [u8; 3],
    /// When a packet of the flow was last seen (`bpf_ktime_get_ns`, CLOCK_MONOTONIC),
    /// refreshed at most once a second.
    pub last_seen_ns: u64,
}

/// Value of `POLICY_DROPS`, a per-CPU hash keyed by a local pod's IP: packets policy
/// dropped, by the pod's direction (ingress: to the pod; egress: from it). Sum the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyDrops {
    pub ingress_packets: u64,
    pub egress_packets: u64,
}
