//! Keys and values of the Services maps (socket-level load balancing at the cgroup
//! `connect4`/`sendmsg4`/`recvmsg4`/`getpeername4` hooks, issue 15).
//!
//! Ports are in **host** byte order, so `bpftool map dump` prints them as numbers; the
//! programs convert at the socket address. Addresses are `[u8; 4]` in network order.

/// `ServiceKey::protocol` values are IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// `ServiceEntry::flags`: pick the client's previous backend while it is fresh
/// (`sessionAffinity: ClientIP`, timeout in `affinity_timeout_s`).
pub const SERVICE_AFFINITY_CLIENT_IP: u32 = 1;
/// `ServiceEntry::flags`: the frontend is a NodePort, keyed by [`ANY_NODE_ADDRESS`]: it
/// answers on every address of `NODE_ADDRESSES`.
pub const SERVICE_NODE_PORT: u32 = 2;
/// `ServiceEntry::flags`: `externalTrafficPolicy: Local` (only this node's backends are
/// listed for traffic from outside).
pub const SERVICE_EXTERNAL_LOCAL: u32 = 4;
/// `ServiceEntry::flags`: the frontend is a pod's hostPort. (hostPorts have their own
/// map, `HOST_PORTS`, written by the CNI plugin: see [`HostPortEntry`].)
pub const SERVICE_HOST_PORT: u32 = 8;
/// `ServiceEntry::flags`: the frontend is an externalIP.
pub const SERVICE_EXTERNAL_IP: u32 = 16;

/// The address of a wildcard key of `SERVICES` (a NodePort) and `HOST_PORTS` (a hostPort
/// without hostIP): looked up only when the exact key misses and the destination is one of
/// the node's addresses (`NODE_ADDRESSES`), as kube-proxy's NodePort rules match
/// `--dst-type LOCAL` and portmap's `0.0.0.0` rule any local address.
pub const ANY_NODE_ADDRESS: [u8; 4] = [0; 4];

/// Key of `SERVICES`: one frontend (ClusterIP, externalIP, [`ANY_NODE_ADDRESS`] for a
/// NodePort, hostIP for a hostPort) and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub address: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    /// 0 for every frontend today; reserved to split in-cluster from outside traffic.
    pub scope: u8,
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Names this frontend's backend slots in `BACKENDS`.
    pub service_id: u32,
    /// Slots `0..backend_count` of `BACKENDS` are filled; zero refuses connections.
    pub backend_count: u32,
    /// `sessionAffinity: ClientIP`'s timeout, seconds (zero without affinity).
    pub affinity_timeout_s: u32,
    /// `SERVICE_*` bits.
    pub flags: u32,
}

/// Key of `BACKENDS`: one slot of one frontend's backend list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Value of `BACKENDS`, and the translated address kept for affinity and replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub address: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub pad: u16,
}

/// Key of `AFFINITY` (LRU): one client (its network namespace's cookie, so every socket of
/// a pod shares it; for a client outside the node, whose packets the TC path translates,
/// `1 << 63 | its IPv4 address`, which no cookie reaches) of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    pub pad: u32,
}

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    pub backend: Backend,
    /// `bpf_ktime_get_ns()` of the last connection that used it.
    pub last_used_ns: u64,
}

/// Key of `SOCK_REVERSE` (LRU): a socket that connected or sent to a frontend and the
/// backend it was given, so `recvmsg4`/`getpeername4` show the frontend as the peer, and
/// the agent can tell a socket connected through a frontend (to end it when that backend
/// leaves the frontend) from one connected to the backend's address itself. The cookie is
/// `bpf_get_socket_cookie`'s, which sock_diag reports too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockReverseKey {
    pub socket_cookie: u64,
    pub backend: Backend,
}

/// Value of `SOCK_REVERSE`: the frontend the application addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockReverseEntry {
    pub address: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub pad: u16,
}

/// Value of `HOST_PORTS`, keyed by a [`ServiceKey`] (address = the hostIP, port = the
/// hostPort, protocol, scope 0): one pod's hostPort, written by the CNI plugin at ADD
/// (the `portMappings` capability) and removed at DEL. A hostIP left unset (0.0.0.0) is
/// one key at [`ANY_NODE_ADDRESS`], served on every address of `NODE_ADDRESSES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostPortEntry {
    /// The pod's IP and containerPort.
    pub backend: Backend,
    /// FNV-1a of `<container ID>/<ifname>` (`mycni_common::fnv1a64`): the attachment that
    /// holds the port, so DEL finds its entries without the pod and ADD tells its own
    /// entries from another pod's.
    pub attachment_hash: u64,
}

/// `ExternalNatEntry::direction`: keyed by the client's packet as it arrives (client ->
/// frontend); holds the backend it goes to.
pub const EXTERNAL_TO_BACKEND: u8 = 1;
/// `ExternalNatEntry::direction`: keyed by the backend's reply as it leaves the backend
/// (backend -> client, after the reverse SNAT when the flow was SNATed); holds the
/// frontend the reply comes from.
pub const EXTERNAL_TO_CLIENT: u8 = 2;

/// `ExternalNatEntry::flags`: the flow goes to a backend on another node with the node's
/// address as its source (`externalTrafficPolicy: Cluster`); its `NAT` entries hold the
/// client's address and port.
pub const EXTERNAL_SNAT: u8 = 1;

/// Value of `EXTERNAL_NAT` (LRU, keyed by a `FlowKey`): one direction of a flow from
/// outside the node to a NodePort or externalIP frontend, translated at TC (`from_netdev`
/// in, `from_pod` or `from_netdev` back).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExternalNatEntry {
    /// The backend (`EXTERNAL_TO_BACKEND`) or the frontend (`EXTERNAL_TO_CLIENT`).
    pub address: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub direction: u8,
    /// `EXTERNAL_*` bits.
    pub flags: u8,
    /// `bpf_ktime_get_ns()` of the last packet in this direction.
    pub last_seen_ns: u64,
}

/// Value of `EXTERNAL_STATE` (an array of one): what the TC path for clients outside the
/// node has seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExternalState {
    /// Non-zero once `from_netdev` sent a flow of one of this node's own pods to a backend on
    /// this node (the pod's packets left unmasqueraded and came back in through the uplink):
    /// from then on `from_pod` looks packets to local pods up in `EXTERNAL_NAT` too, for the
    /// backend's replies that must leave as the frontend. Never cleared.
    pub local_clients: u32,
}
