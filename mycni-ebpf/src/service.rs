//! Services, translated at the socket (cgroup v2 `sock_addr` hooks), as Cilium's socket LB
//! does: a connection or datagram to a frontend gets a backend's address before the kernel
//! routes it, so no packet of a Service flow is ever rewritten.
//!
//! - `connect4` (TCP, connected UDP, SCTP) and `sendmsg4` (unconnected UDP): a frontend with
//!   backends gets one (the client's previous one under `sessionAffinity: ClientIP`, else a
//!   random slot), and the socket remembers the frontend in `SOCK_REVERSE`; a frontend with
//!   none refuses the call with `ECONNREFUSED`; any other address is left alone.
//! - a call to a pod's hostPort (`HOST_PORTS`, looked up when `SERVICES` misses) goes to
//!   that pod's address and containerPort, remembered in `SOCK_REVERSE` the same way: how
//!   node processes, hostNetwork pods and pods reach `127.0.0.1:<hostPort>` and
//!   `<node IP>:<hostPort>` without portmap.
//! - NodePorts and hostPorts without hostIP are keyed once, at `ANY_NODE_ADDRESS`, and
//!   answer on every address in `NODE_ADDRESSES` ([`find_frontend`]).
//! - `recvmsg4` and `getpeername4`: a backend address the socket was given shows as the
//!   frontend the application addressed.
//! - `connect6`, `recvmsg6` and `getpeername6` do the same for an IPv4 address an AF_INET6
//!   socket gives as IPv4-mapped (`::ffff:a.b.c.d`, a dual-stack application), and leave
//!   every other IPv6 address alone. No `sendmsg6`: the kernel hands an unconnected send to
//!   a mapped address to the IPv4 path, where `sendmsg4` translates it.
use aya_ebpf::helpers::{
    bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
    bpf_set_retval,
};
use aya_ebpf::programs::SockAddrContext;
use aya_ebpf::EbpfContext;
use mycni_common::service::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ServiceEntry, ServiceKey, SockReverseEntry,
    SockReverseKey, ANY_NODE_ADDRESS, SERVICE_AFFINITY_CLIENT_IP,
};
use mycni_common::verdict;

use crate::counters;
use crate::maps::{is_node_address, AFFINITY, BACKENDS, HOST_PORTS, SERVICES, SOCK_REVERSE};

/// What a `sock_addr` program returns to let the call go on.
const PROCEED: i32 = 1;
/// What it returns to fail the call (with `EPERM`, or the error `bpf_set_retval` set).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;
const NS_PER_S: u64 = 1_000_000_000;

/// Which address fields of the context a hook reads and writes.
#[derive(Clone, Copy)]
pub(crate) enum Family {
    /// The `*4` hooks: `user_ip4`.
    Inet,
    /// The `*6` hooks: `user_ip6`, acted on only when it holds an IPv4-mapped address.
    Inet6Mapped,
}

const AF_INET6: u32 = 10;
/// The third 32-bit word of `::ffff:a.b.c.d`, as `user_ip6` holds it (network order).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 destination the application gave, address in network order and port in host
/// order; `None` for an IPv6 address that is not IPv4-mapped (left alone).
#[inline(always)]
fn user_address(ctx: &SockAddrContext, family: Family) -> Option<([u8; 4], u16)> {
    let ip = match family {
        // SAFETY: the kernel hands every sock_addr program a valid context; the verifier
        // checks each field access.
        Family::Inet => unsafe { (*ctx.sock_addr).user_ip4 },
        Family::Inet6Mapped => mapped_ipv4(ctx)?,
    };
    // SAFETY: as above.
    let port = unsafe { (*ctx.sock_addr).user_port };
    // `user_port` holds `sin_port` (network order) in its low 16 bits.
    Some((ip.to_ne_bytes(), u16::from_be(port as u16)))
}

/// The IPv4 address in `user_ip6` when it is `::ffff:a.b.c.d` of an AF_INET6 address.
#[inline(always)]
fn mapped_ipv4(ctx: &SockAddrContext) -> Option<u32> {
    // Volatile reads, one 32-bit load per word: the verifier takes `user_ip6` only as
    // 32-bit (or narrower, or aligned 64-bit) loads, and the compiler must neither merge
    // nor split them.
    // SAFETY: the kernel hands every sock_addr program a valid context; these are fields
    // of it, and the verifier checks each access.
    let (family, words) = unsafe {
        let context = ctx.sock_addr;
        let ip6 = core::ptr::addr_of!((*context).user_ip6) as *const u32;
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*context).user_family)),
            [
                core::ptr::read_volatile(ip6),
                core::ptr::read_volatile(ip6.add(1)),
                core::ptr::read_volatile(ip6.add(2)),
                core::ptr::read_volatile(ip6.add(3)),
            ],
        )
    };
    (family == AF_INET6 && words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD)
        .then_some(words[3])
}

#[inline(always)]
fn set_user_address(ctx: &SockAddrContext, family: Family, address: [u8; 4], port: u16) {
    // SAFETY: as in `user_address`; these hooks may write the address fields and the port.
    // The IPv6 one writes the mapped address's last word only (the `::ffff:` words stay),
    // as one 32-bit store: the verifier refuses narrower stores to the context and the
    // volatile write keeps the compiler from merging it with the port's.
    unsafe {
        let context = ctx.sock_addr;
        match family {
            Family::Inet => (*context).user_ip4 = u32::from_ne_bytes(address),
            Family::Inet6Mapped => {
                let ip6 = core::ptr::addr_of_mut!((*context).user_ip6) as *mut u32;
                core::ptr::write_volatile(ip6.add(3), u32::from_ne_bytes(address));
            }
        }
        core::ptr::write_volatile(
            core::ptr::addr_of_mut!((*context).user_port),
            port.to_be() as u32,
        );
    }
}

/// `connect4`, `sendmsg4` and `connect6`: sends a call addressed to a frontend to one of
/// its backends, and a call addressed to a pod's hostPort to that pod.
#[inline(always)]
pub(crate) fn to_backend(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some((address, port)) = user_address(ctx, family) else {
        return PROCEED;
    };
    // SAFETY: as in `user_address`.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    let key = ServiceKey {
        address,
        port,
        protocol: protocol as u8,
        scope: 0,
    };
    let (backend, translated) = match find_frontend(&key) {
        Some(Frontend::Service(service)) => {
            let Some(backend) = pick_backend(ctx, &service) else {
                counters::count(verdict::SERVICE_NO_BACKEND, 0);
                // SAFETY: a helper call with no pointer; `connect4`, `sendmsg4` and
                // `connect6` may set the error the refused call returns.
                unsafe { bpf_set_retval(-ECONNREFUSED) };
                return REFUSE;
            };
            (backend, verdict::SERVICE_TRANSLATED)
        }
        Some(Frontend::HostPort(backend)) => (backend, verdict::HOST_PORT_TRANSLATED),
        None => return PROCEED,
    };
    let reverse = SockReverseKey {
        // SAFETY: the context pointer is the one the kernel passed.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend,
    };
    let frontend = SockReverseEntry {
        address,
        port,
        pad: 0,
    };
    // A full LRU evicts the oldest socket; failing here would only lose the reverse view.
    let _ = SOCK_REVERSE.insert(&reverse, &frontend, 0);
    set_user_address(ctx, family, backend.address, backend.port);
    counters::count(translated, 0);
    PROCEED
}

/// What a destination (address, port, protocol) names.
pub(crate) enum Frontend {
    Service(ServiceEntry),
    /// A pod's hostPort: the pod is its one backend.
    HostPort(Backend),
}

/// The frontend `key` (a socket call's or an arriving packet's destination, scope 0)
/// names, in kube-proxy's and portmap's order: a Service frontend on the address itself,
/// then, when the address is one of the node's (`NODE_ADDRESSES`), a NodePort
/// ([`ANY_NODE_ADDRESS`]); only then a hostPort, on that address or on any of the node's.
/// kube-proxy's chains run before portmap's, so a Service wins a key both claim. A call to
/// no frontend pays three lookups (`SERVICES`, `NODE_ADDRESSES`, `HOST_PORTS`); the
/// wildcard keys are looked up only for the node's own addresses.
#[inline(always)]
pub(crate) fn find_frontend(key: &ServiceKey) -> Option<Frontend> {
    // SAFETY: entries are copied out at once; the agent and the plugin write them whole.
    if let Some(service) = unsafe { SERVICES.get(key) }.copied() {
        return Some(Frontend::Service(service));
    }
    let on_node = is_node_address(key.address);
    let wildcard = ServiceKey {
        address: ANY_NODE_ADDRESS,
        ..*key
    };
    if on_node {
        // SAFETY: as above.
        if let Some(service) = unsafe { SERVICES.get(&wildcard) }.copied() {
            return Some(Frontend::Service(service));
        }
    }
    // SAFETY: as above.
    if let Some(entry) = unsafe { HOST_PORTS.get(key) } {
        return Some(Frontend::HostPort(entry.backend));
    }
    if on_node {
        // SAFETY: as above.
        if let Some(entry) = unsafe { HOST_PORTS.get(&wildcard) } {
            return Some(Frontend::HostPort(entry.backend));
        }
    }
    None
}

/// The client's fresh affinity entry when the frontend asks for one, else a random slot
/// (recorded for the client under affinity). `None`: no backend.
#[inline(always)]
fn pick_backend(ctx: &SockAddrContext, service: &ServiceEntry) -> Option<Backend> {
    if service.backend_count == 0 {
        return None;
    }
    if service.flags & SERVICE_AFFINITY_CLIENT_IP == 0 {
        return random_backend(service);
    }
    let key = AffinityKey {
        // SAFETY: the context pointer is the one the kernel passed.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        service_id: service.service_id,
        pad: 0,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = service.affinity_timeout_s as u64 * NS_PER_S;
    if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map's value, valid for this program run; a racing
        // update of `last_used_ns` by another CPU only changes when the entry expires.
        unsafe {
            if now.wrapping_sub((*entry).last_used_ns) < timeout_ns {
                (*entry).last_used_ns = now;
                return Some((*entry).backend);
            }
        }
    }
    let backend = random_backend(service)?;
    let entry = AffinityEntry {
        backend,
        last_used_ns: now,
    };
    let _ = AFFINITY.insert(&key, &entry, 0);
    Some(backend)
}

#[inline(always)]
fn random_backend(service: &ServiceEntry) -> Option<Backend> {
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let key = BackendKey {
        service_id: service.service_id,
        slot,
    };
    // A slot missing under a count that says it is there is a torn update: refused, as if
    // the frontend had no backend (the agent writes slots before the count that covers
    // them, so this does not happen between its updates).
    // SAFETY: the value is copied out at once.
    unsafe { BACKENDS.get(&key) }.copied()
}

/// `recvmsg4`, `getpeername4` and their `*6` twins: a peer this socket was sent to in place
/// of a frontend shows as that frontend. Always lets the call go on (these hooks cannot
/// refuse).
#[inline(always)]
pub(crate) fn to_frontend(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some((address, port)) = user_address(ctx, family) else {
        return PROCEED;
    };
    let key = SockReverseKey {
        // SAFETY: the context pointer is the one the kernel passed.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend: Backend {
            address,
            port,
            pad: 0,
        },
    };
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { SOCK_REVERSE.get(&key) }.copied() {
        set_user_address(ctx, family, frontend.address, frontend.port);
    }
    PROCEED
}
