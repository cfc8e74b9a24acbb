//! Types shared by the eBPF programs and userspace: map keys and values, map and program
//! names, and constants. Everything here is `#[repr(C)]` with no implicit padding, so the
//! kernel, the programs and userspace agree on the bytes, and BTF describes the fields for
//! `bpftool map dump`.
//!
//! IPv4 addresses are `[u8; 4]` in network order so bpftool prints them as four numbers.
#![no_std]

/// Bumped whenever a map's key or value layout changes; pinned maps of another layout are
/// refused by the loader instead of being silently reused.
pub const LAYOUT_VERSION: u32 = 1;

pub const MAP_ROUTES: &str = "ROUTES";
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
pub const MAP_STATS: &str = "STATS";
/// Every map the datapath pins, in a stable order.
pub const MAP_NAMES: [&str; 3] = [MAP_ROUTES, MAP_ENDPOINTS, MAP_STATS];

pub const PROG_FROM_POD: &str = "from_pod";
/// Every program the datapath pins.
pub const PROGRAM_NAMES: [&str; 1] = [PROG_FROM_POD];

/// Capacity of `ROUTES` and `ENDPOINTS`.
pub const MAX_ROUTES: u32 = 16384;
pub const MAX_ENDPOINTS: u32 = 16384;

/// The link-local gateway every pod routes through (as Calico does); its ARP requests are
/// answered by `from_pod` with the host veth's MAC.
pub const GATEWAY_IP: [u8; 4] = [169, 254, 1, 1];

/// `Route::kind`: the prefix is a pod on this node, reached through its host veth.
pub const ROUTE_LOCAL_ENDPOINT: u32 = 1;
/// `Route::kind`: the prefix is another node's pod CIDR, reached via `next_hop`.
pub const ROUTE_REMOTE_NODE: u32 = 2;

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
    /// Number of verdicts, the length of `STATS`.
    pub const COUNT: u32 = 5;
    /// Display names, indexed by verdict.
    pub const NAMES: [&str; COUNT as usize] = [
        "local_redirect",
        "to_stack",
        "arp_reply",
        "drop_malformed",
        "drop_spoofed",
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
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }
}
