//! Services from outside the node, translated per packet at TC, as Cilium's NodePort path
//! beside its socket LB: the socket programs ([`crate::service`]) serve clients on this
//! node; a packet arriving at the uplink for a NodePort (one of this node's addresses) or
//! an externalIP frontend is sent here to a backend.
//!
//! - In (`from_netdev`): the frontend ([`choose_backend`], the one place a frontend key
//!   becomes a backend) gives a new flow a backend, recorded both ways in `EXTERNAL_NAT`.
//!   A backend on this node gets the packet with the client's source kept, straight into
//!   its pod; a backend elsewhere (`externalTrafficPolicy: Cluster`) gets it with this
//!   node's address and a SNAT port as the source (the `NAT` entries of the pods' own SNAT,
//!   so its replies come back here); a frontend without backends drops it, counted.
//! - Back: a local backend's reply (`from_pod`), or a remote one's after the reverse SNAT
//!   (`from_netdev`), gets the frontend as its source and goes to the client straight out
//!   of the uplink (or to the client pod's node). Neither direction crosses the node
//!   stack, so its conntrack sees neither.
//! - A backend that is the node itself (a hostNetwork pod) gets the packet through the
//!   stack, the client's source kept; its reply, routed out by the stack, leaves `to_netdev`
//!   as the frontend ([`reply_from_node`]): the stack sees both directions.
//! - NodePorts and hostPorts without hostIP answer on every address of `NODE_ADDRESSES`
//!   (loopback excepted: it never arrives from outside).
//! - Later fragments follow their first (`FRAGMENTS`), and an ICMP error a backend sends
//!   about a flow (a UDP port unreachable) leaves from the frontend, quoting it; one the
//!   client's side sends about a reply (a router's "fragmentation needed") reaches the
//!   backend quoting the backend's own packet.
//! - A reply whose flow the full `EXTERNAL_NAT` evicted never leaves with a remote
//!   backend's address: dropped and counted until the client's next packet records it.
use crate::forward::{deliver_to_pod, send_to_node};
use crate::fragments::remember_fragment;
use crate::headers::{
    ICMP_DEST_UNREACH, ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, IP_DST_OFF, IP_SRC_OFF, TCP_ACK, TCP_FLAGS, TCP_SYN,
};
use crate::maps::{
    is_node_address, route_of, AFFINITY, BACKENDS, ENDPOINTS, EXTERNAL_NAT, EXTERNAL_STATE,
    FRAGMENTS, NAT, SERVICES,
};
use crate::nat::icmp_error::{quote_about_receiver, quote_about_sender, rewrite_quote};
use crate::nat::ports::{allocate_port, PortError};
use crate::nat::snat::existing_port;
use crate::packet::Ipv4;
use crate::policy::{enforce, Site};
use crate::rewrite::{rewrite_address, rewrite_destination, rewrite_source};
use crate::service::{find_frontend, Frontend};
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect_neigh};
use aya_ebpf::programs::TcContext;
use mycni_common::service::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ExternalNatEntry, ServiceKey,
    ANY_NODE_ADDRESS, EXTERNAL_SNAT, EXTERNAL_TO_BACKEND, EXTERNAL_TO_CLIENT,
    SERVICE_AFFINITY_CLIENT_IP, SERVICE_EXTERNAL_IP, SERVICE_NODE_PORT,
};
use mycni_common::{
    verdict, FlowKey, NodeConfig, FRAGMENT_EXTERNAL_DNAT, FRAGMENT_EXTERNAL_DNAT_SNAT,
    FRAGMENT_EXTERNAL_REPLY, MARK_FROM_POD, ROUTE_LOCAL_ENDPOINT, ROUTE_REMOTE_NODE,
    ROUTE_REMOTE_TUNNEL,
};

const NS_PER_S: u64 = 1_000_000_000;
/// A UDP flow idle this long picks its backend afresh (conntrack's UDP timeout), so a
/// client reusing its port after a backend went away does not keep sending into it.
const UDP_IDLE_NS: u64 = 120 * NS_PER_S;
/// `AffinityKey::netns_cookie` for a client outside the node: its address with the top bit
/// set, which no network namespace cookie (counted up from 1) reaches.
const OUTSIDE_CLIENT: u64 = 1 << 63;

/// What a frontend says about a new flow.
pub(crate) enum Choice {
    /// Not a frontend served from outside: the packet goes on as before.
    NotAFrontend,
    /// A frontend with no backend (for `externalTrafficPolicy: Local`, none on this node).
    NoBackend,
    Backend(Backend),
}

/// The frontend `key`'s backend for a new flow from `client`: NodePorts and externalIPs of
/// `SERVICES` (ClusterIPs are not served from outside), the client's previous backend while
/// its `sessionAffinity: ClientIP` entry is fresh, else a random slot. A key `SERVICES`
/// lacks may be a pod's hostPort (`HOST_PORTS`, its one backend a local pod), as kube-proxy's
/// chains run before portmap's; NodePorts and hostPorts without hostIP answer on every
/// node address ([`find_frontend`]).
#[inline(always)]
pub(crate) fn choose_backend(key: &ServiceKey, client: [u8; 4], now: u64) -> Choice {
    let service = match find_frontend(key) {
        Some(Frontend::Service(service)) => service,
        Some(Frontend::HostPort(pod)) => return Choice::Backend(pod),
        None => return Choice::NotAFrontend,
    };
    if service.flags & (SERVICE_NODE_PORT | SERVICE_EXTERNAL_IP) == 0 {
        return Choice::NotAFrontend;
    }
    if service.backend_count == 0 {
        return Choice::NoBackend;
    }
    let affinity = AffinityKey {
        netns_cookie: OUTSIDE_CLIENT | u32::from_be_bytes(client) as u64,
        service_id: service.service_id,
        pad: 0,
    };
    let sticky = service.flags & SERVICE_AFFINITY_CLIENT_IP != 0;
    if sticky {
        if let Some(entry) = AFFINITY.get_ptr_mut(&affinity) {
            let timeout_ns = service.affinity_timeout_s as u64 * NS_PER_S;
            // SAFETY: a pointer into the map's value, valid for this program run.
            unsafe {
                if now.wrapping_sub((*entry).last_used_ns) < timeout_ns {
                    (*entry).last_used_ns = now;
                    return Choice::Backend((*entry).backend);
                }
            }
        }
    }
    let slot = BackendKey {
        service_id: service.service_id,
        // SAFETY: a helper without arguments.
        slot: unsafe { bpf_get_prandom_u32() } % service.backend_count,
    };
    // A slot missing under a count that covers it is a torn update: no backend.
    // SAFETY: the value is copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(&slot) }).copied() else {
        return Choice::NoBackend;
    };
    if sticky {
        let entry = AffinityEntry {
            backend,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(&affinity, &entry, 0);
    }
    Choice::Backend(backend)
}

/// The backend of a flow already translated (refreshed), unless a new TCP connection or a
/// long idle UDP flow starts over on the same ports.
#[inline(always)]
fn existing_backend(ctx: &TcContext, packet: &Ipv4, now: u64) -> Option<(Backend, u8)> {
    let entry = EXTERNAL_NAT.get_ptr_mut(&packet.flow())?;
    // SAFETY: a pointer into the map's value, valid for this program run.
    let (address, port, direction, flags, last_seen) = unsafe {
        (
            (*entry).address,
            (*entry).port,
            (*entry).direction,
            (*entry).flags,
            (*entry).last_seen_ns,
        )
    };
    if direction != EXTERNAL_TO_BACKEND {
        return None;
    }
    let starts_over = match packet.proto {
        IPPROTO_TCP => ctx
            .load::<u8>(packet.l4 + TCP_FLAGS)
            .is_ok_and(|f| f & (TCP_SYN | TCP_ACK) == TCP_SYN),
        _ => now.wrapping_sub(last_seen) > UDP_IDLE_NS,
    };
    if starts_over {
        return None;
    }
    // SAFETY: as above.
    unsafe { (*entry).last_seen_ns = now };
    Some((
        Backend {
            address,
            port,
            pad: 0,
        },
        flags,
    ))
}

/// `from_netdev`, for a packet whose destination is no pod: sends a packet for a NodePort
/// or externalIP frontend (or a later fragment of one) to its backend. `None`: not for a
/// frontend served from outside.
#[inline(always)]
pub(crate) fn to_backend(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> Option<(u32, i32)> {
    if packet.later_fragment {
        return later_fragment_to_backend(ctx, packet, cfg);
    }
    if packet.proto == IPPROTO_ICMP
        && matches!(
            packet.icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    {
        return icmp_error_from_client(ctx, packet, cfg);
    }
    if !packet.has_ports || (packet.proto != IPPROTO_TCP && packet.proto != IPPROTO_UDP) {
        return None;
    }
    // The wildcard keys are no destination, and loopback never arrives from outside (the
    // stack drops it as martian; it must not be translated first).
    if packet.dst == ANY_NODE_ADDRESS || packet.dst[0] == 127 {
        return None;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (backend, local) = match existing_backend(ctx, packet, now) {
        Some((backend, flags)) => (backend, flags & EXTERNAL_SNAT == 0),
        None => {
            let key = ServiceKey {
                address: packet.dst,
                port: packet.dport,
                protocol: packet.proto,
                scope: 0,
            };
            let backend = match choose_backend(&key, packet.src, now) {
                Choice::NotAFrontend => return None,
                Choice::NoBackend => {
                    event!(
                        ctx,
                        Debug,
                        "from_netdev: dropped proto {} {:i}:{} -> {:i}:{}: the frontend has no backend here",
                        packet.proto,
                        packet.src,
                        packet.sport,
                        packet.dst,
                        packet.dport
                    );
                    return Some((verdict::EXTERNAL_NO_BACKEND, TC_ACT_SHOT));
                }
                Choice::Backend(backend) => backend,
            };
            let local = served_here(backend.address);
            if local && is_local_pod(packet.src) {
                note_local_client();
            }
            // The client's address stays for a backend on this node; any other backend's
            // replies would not come back here without the node's address as the source.
            let flags = if local { 0 } else { EXTERNAL_SNAT };
            record_forward(packet, backend, flags, now);
            (backend, local)
        }
    };
    if rewrite_destination(ctx, packet, backend.address, backend.port).is_none() {
        return Some(malformed(ctx, packet));
    }
    let mut translated = *packet;
    translated.dst = backend.address;
    translated.dport = backend.port;
    let mut fragment_action = FRAGMENT_EXTERNAL_DNAT;
    if !local {
        let tcp_flags = if packet.proto == IPPROTO_TCP {
            ctx.load::<u8>(packet.l4 + TCP_FLAGS).unwrap_or(0)
        } else {
            0
        };
        let port = match existing_port(&translated, cfg, now, tcp_flags) {
            Some(port) => port,
            None => match allocate_port(&translated, cfg, now, tcp_flags) {
                Ok(port) => port,
                Err(PortError::Exhausted) | Err(PortError::Record(_)) => {
                    event!(
                        ctx,
                        Warn,
                        "from_netdev: dropped proto {} {:i}:{} for backend {:i}:{}: no free SNAT port",
                        packet.proto,
                        packet.src,
                        packet.sport,
                        backend.address,
                        backend.port
                    );
                    return Some((verdict::DROP_NAT_EXHAUSTED, TC_ACT_SHOT));
                }
            },
        };
        record_reverse(packet, backend, EXTERNAL_SNAT, now);
        if rewrite_source(ctx, &translated, cfg.node_ip, port).is_none() {
            return Some(malformed(ctx, packet));
        }
        translated.src = cfg.node_ip;
        translated.sport = port;
        fragment_action = FRAGMENT_EXTERNAL_DNAT_SNAT;
    }
    if local {
        record_reverse(packet, backend, 0, now);
    }
    if packet.fragmented {
        remember_fragment(packet, fragment_action, backend.address);
    }
    Some(send_to_backend(ctx, &translated, cfg))
}

/// The forward entry of a new flow: the client's packets go to `backend`.
#[inline(always)]
fn record_forward(packet: &Ipv4, backend: Backend, flags: u8, now: u64) {
    let forward = ExternalNatEntry {
        address: backend.address,
        port: backend.port,
        direction: EXTERNAL_TO_BACKEND,
        flags,
        last_seen_ns: now,
    };
    // A full LRU evicts its oldest flows; inserts do not fail otherwise.
    let _ = EXTERNAL_NAT.insert(&packet.flow(), &forward, 0);
}

/// The reverse entry, keyed by the backend's reply as it leaves the backend (backend ->
/// client) or, SNATed, as the reverse SNAT leaves it: the reply comes from the frontend.
/// Checked on every packet of the client, so it comes back if the LRU evicted it.
#[inline(always)]
fn record_reverse(packet: &Ipv4, backend: Backend, flags: u8, now: u64) {
    let reverse = ExternalNatEntry {
        address: packet.dst,
        port: packet.dport,
        direction: EXTERNAL_TO_CLIENT,
        flags,
        last_seen_ns: now,
    };
    let reply = FlowKey {
        saddr: backend.address,
        daddr: packet.src,
        sport: backend.port,
        dport: packet.sport,
        proto: packet.proto,
        pad: [0; 3],
    };
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let current = unsafe { EXTERNAL_NAT.get(&reply) };
    if current.is_some_and(|entry| {
        entry.direction == EXTERNAL_TO_CLIENT
            && entry.address == reverse.address
            && entry.port == reverse.port
    }) {
        // Already there (the replies refresh it): a lookup costs less than an update.
        return;
    }
    let _ = EXTERNAL_NAT.insert(&reply, &reverse, 0);
}

/// Whether `from_netdev` ever gave a backend on this node to one of this node's own pods
/// (`EXTERNAL_STATE`): then a local backend's replies to a local pod may need to leave as
/// the frontend, and `from_pod` looks them up in `EXTERNAL_NAT` too. An array lookup, which
/// the verifier inlines: what every packet between local pods pays instead of the LRU one.
#[inline(always)]
pub(crate) fn local_pods_reached_frontends_from_outside() -> bool {
    EXTERNAL_STATE
        .get(0)
        .is_some_and(|state| state.local_clients != 0)
}

/// A pod of this node reached a frontend of this node through the uplink (its flow left
/// unmasqueraded and came back, e.g. to an externalIP in a `--non-masquerade-cidr`): set
/// once for good, as such a flow's replies would otherwise reach the pod with the
/// backend's address as their source.
#[inline(always)]
fn note_local_client() {
    if let Some(state) = EXTERNAL_STATE.get_ptr_mut(0) {
        // SAFETY: a pointer into the array's one value, valid for this program run.
        unsafe {
            if (*state).local_clients == 0 {
                (*state).local_clients = 1;
            }
        }
    }
}

/// Whether a backend answers on this node, so the client's address can stay: a local pod,
/// or the node itself (a hostNetwork pod's address is its node's).
#[inline(always)]
fn served_here(address: [u8; 4]) -> bool {
    is_local_pod(address) || is_node_address(address)
}

#[inline(always)]
fn is_local_pod(address: [u8; 4]) -> bool {
    route_of(address).is_some_and(|route| route.kind == ROUTE_LOCAL_ENDPOINT)
}

/// Delivers a translated packet: into a local pod (its ingress policy checked here, as
/// `from_netdev` does for other nodes' pods), to a pod's node, or to a backend that is no
/// pod ([`send_to_host`]).
#[inline(always)]
fn send_to_backend(ctx: &TcContext, translated: &Ipv4, cfg: &NodeConfig) -> (u32, i32) {
    let Some(route) = route_of(translated.dst) else {
        return send_to_host(ctx, translated, cfg);
    };
    match route.kind {
        ROUTE_LOCAL_ENDPOINT => {
            if let Err(drop) = enforce(ctx, translated, Site::Decide) {
                return (drop, TC_ACT_SHOT);
            }
            match deliver_to_pod(ctx, route) {
                Some(action) => (verdict::EXTERNAL_TRANSLATED, action),
                None => malformed(ctx, translated),
            }
        }
        ROUTE_REMOTE_NODE | ROUTE_REMOTE_TUNNEL => {
            let (verdict, action) = send_to_node(ctx, route);
            if verdict == verdict::DROP_MALFORMED {
                return (verdict, action);
            }
            (verdict::EXTERNAL_TRANSLATED, action)
        }
        _ => (verdict::EXTERNAL_TRANSLATED, TC_ACT_OK),
    }
}

/// A delivery's result with `external_translated` counted as `as_verdict` instead (a later
/// fragment or an ICMP error of a translated flow); a drop keeps its own verdict.
#[inline(always)]
fn counted_as(result: (u32, i32), as_verdict: u32) -> (u32, i32) {
    match result {
        (verdict::EXTERNAL_TRANSLATED, action) => (as_verdict, action),
        other => other,
    }
}

/// A backend that is no pod (a hostNetwork pod, at its node's address). This node: the
/// node stack delivers it, the client's source kept ([`reply_from_node`] turns the reply
/// back). Another host: straight out of the uplink, SNATed to this node's address by
/// [`to_backend`]; this node's stack would drop a packet from its own address arriving on
/// the uplink as a martian.
#[inline(always)]
fn send_to_host(ctx: &TcContext, translated: &Ipv4, cfg: &NodeConfig) -> (u32, i32) {
    if is_node_address(translated.dst) {
        return (verdict::EXTERNAL_TRANSLATED, TC_ACT_OK);
    }
    // Passed by to_netdev untouched, like from_pod's packets to other nodes.
    ctx.set_mark(MARK_FROM_POD);
    // SAFETY: a helper call with no pointer but a null parameters block, as it allows; the
    // kernel looks the backend up in the node's routes.
    let action = unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    (verdict::EXTERNAL_TRANSLATED, action as i32)
}

/// A later fragment of a datagram whose first fragment went to a backend: the same
/// addresses, the same way.
#[inline(always)]
fn later_fragment_to_backend(
    ctx: &TcContext,
    packet: &Ipv4,
    cfg: &NodeConfig,
) -> Option<(u32, i32)> {
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let first = unsafe { FRAGMENTS.get(packet.fragment()) }.copied()?;
    if first.action != FRAGMENT_EXTERNAL_DNAT && first.action != FRAGMENT_EXTERNAL_DNAT_SNAT {
        return None;
    }
    let mut translated = *packet;
    if rewrite_address(ctx, IP_DST_OFF, packet.dst, first.addr).is_none() {
        return Some(malformed(ctx, packet));
    }
    translated.dst = first.addr;
    if first.action == FRAGMENT_EXTERNAL_DNAT_SNAT {
        if rewrite_address(ctx, IP_SRC_OFF, packet.src, cfg.node_ip).is_none() {
            return Some(malformed(ctx, packet));
        }
        translated.src = cfg.node_ip;
    }
    Some(counted_as(
        send_to_backend(ctx, &translated, cfg),
        verdict::FRAGMENT_TRANSLATED,
    ))
}

/// `from_pod`: a local backend's reply to a client outside (or an ICMP error about the
/// flow, or a later fragment of a reply) leaves as the frontend. `None`: no such flow.
#[inline(always)]
pub(crate) fn reply_from_pod(ctx: &TcContext, packet: &Ipv4) -> Option<(u32, i32)> {
    if packet.later_fragment {
        // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
        let first = unsafe { FRAGMENTS.get(packet.fragment()) }.copied()?;
        if first.action != FRAGMENT_EXTERNAL_REPLY {
            return None;
        }
        if rewrite_address(ctx, IP_SRC_OFF, packet.src, first.addr).is_none() {
            return Some(malformed(ctx, packet));
        }
        return Some(counted_as(
            send_to_client(ctx, packet.dst),
            verdict::FRAGMENT_TRANSLATED,
        ));
    }
    if packet.proto == IPPROTO_ICMP {
        return icmp_error_from_backend(ctx, packet);
    }
    if !packet.has_ports {
        return None;
    }
    let frontend = reply_frontend(packet)?;
    if let Err(drop) = enforce(ctx, packet, Site::Decide) {
        return Some((drop, TC_ACT_SHOT));
    }
    Some(reply_as_frontend(ctx, packet, frontend))
}

/// `to_netdev`, for a packet no pod sent: the reply of a backend that is the node itself
/// (a hostNetwork pod), which the stack routed out, leaves as the frontend, later
/// fragments as their first. `None`: not such a reply. The inbound packets of these flows
/// went to the stack translated, and these replies leave it before translation, so its
/// conntrack sees both directions of one flow.
#[inline(always)]
pub(crate) fn reply_from_node(ctx: &TcContext, packet: &Ipv4) -> Option<(u32, i32)> {
    if packet.later_fragment {
        // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
        let first = unsafe { FRAGMENTS.get(packet.fragment()) }.copied()?;
        if first.action != FRAGMENT_EXTERNAL_REPLY {
            return None;
        }
        if rewrite_address(ctx, IP_SRC_OFF, packet.src, first.addr).is_none() {
            return Some(malformed(ctx, packet));
        }
        return Some((verdict::FRAGMENT_TRANSLATED, TC_ACT_OK));
    }
    if !packet.has_ports || (packet.proto != IPPROTO_TCP && packet.proto != IPPROTO_UDP) {
        return None;
    }
    let frontend = reply_frontend(packet)?;
    if rewrite_source(ctx, packet, frontend.0, frontend.1).is_none() {
        return Some(malformed(ctx, packet));
    }
    if packet.fragmented {
        remember_fragment(packet, FRAGMENT_EXTERNAL_REPLY, frontend.0);
    }
    Some((verdict::EXTERNAL_TRANSLATED, TC_ACT_OK))
}

/// `from_netdev`, after the reverse SNAT wrote the client back into a reply: a remote
/// backend's reply (`translated`: backend -> client) leaves as the frontend. `None`: a
/// reply of a pod's own masqueraded flow.
#[inline(always)]
pub(crate) fn reply_after_reverse_nat(ctx: &TcContext, translated: &Ipv4) -> Option<(u32, i32)> {
    if translated.later_fragment {
        // The reverse SNAT wrote the client's address: the first fragment recorded the
        // frontend under the datagram's key as it is now.
        // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
        let first = unsafe { FRAGMENTS.get(translated.fragment()) }.copied()?;
        if first.action != FRAGMENT_EXTERNAL_REPLY {
            return None;
        }
        if rewrite_address(ctx, IP_SRC_OFF, translated.src, first.addr).is_none() {
            return Some(malformed(ctx, translated));
        }
        let (verdict, action) = send_to_client(ctx, translated.dst);
        let verdict = if verdict == verdict::EXTERNAL_TRANSLATED {
            verdict::FRAGMENT_TRANSLATED
        } else {
            verdict
        };
        return Some((verdict, action));
    }
    if translated.proto == IPPROTO_ICMP {
        // An error the remote backend sent about the flow: the reverse SNAT put the client
        // back into its quote; the frontend goes in too.
        return icmp_error_from_backend(ctx, translated);
    }
    if !translated.has_ports {
        return None;
    }
    let frontend = reply_frontend(translated)?;
    Some(reply_as_frontend(ctx, translated, frontend))
}

/// The frontend a reply comes from, its entry refreshed.
#[inline(always)]
fn reply_frontend(packet: &Ipv4) -> Option<([u8; 4], u16)> {
    let entry = EXTERNAL_NAT.get_ptr_mut(&packet.flow())?;
    // SAFETY: a pointer into the map's value, valid for this program run.
    unsafe {
        if (*entry).direction != EXTERNAL_TO_CLIENT {
            return None;
        }
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        Some(((*entry).address, (*entry).port))
    }
}

#[inline(always)]
fn reply_as_frontend(ctx: &TcContext, packet: &Ipv4, frontend: ([u8; 4], u16)) -> (u32, i32) {
    if rewrite_source(ctx, packet, frontend.0, frontend.1).is_none() {
        return malformed(ctx, packet);
    }
    if packet.fragmented {
        // Later fragments arrive with the addresses this one had here.
        remember_fragment(packet, FRAGMENT_EXTERNAL_REPLY, frontend.0);
    }
    send_to_client(ctx, packet.dst)
}

/// Sends a translated reply to the client: to a pod's node when the client is another
/// node's pod, else out of the uplink to the next hop the node's routes give.
#[inline(always)]
fn send_to_client(ctx: &TcContext, client: [u8; 4]) -> (u32, i32) {
    if let Some(route) = route_of(client) {
        match route.kind {
            ROUTE_REMOTE_NODE | ROUTE_REMOTE_TUNNEL => {
                let (verdict, action) = send_to_node(ctx, route);
                if verdict == verdict::DROP_MALFORMED {
                    return (verdict, action);
                }
                return (verdict::EXTERNAL_TRANSLATED, action);
            }
            ROUTE_LOCAL_ENDPOINT => {
                return match deliver_to_pod(ctx, route) {
                    Some(action) => (verdict::EXTERNAL_TRANSLATED, action),
                    None => (verdict::DROP_MALFORMED, TC_ACT_SHOT),
                };
            }
            _ => {}
        }
    }
    let Some(cfg) = crate::maps::config() else {
        return (verdict::DROP_MALFORMED, TC_ACT_SHOT);
    };
    // Passed by to_netdev untouched, like from_pod's packets to other nodes.
    ctx.set_mark(MARK_FROM_POD);
    // No next hop given: the kernel looks the client up in the node's routes.
    let action = unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    (verdict::EXTERNAL_TRANSLATED, action as i32)
}

/// An ICMP error a backend sends about a client's packet (client -> backend, quoted; for a
/// remote backend, after the reverse SNAT): leaves from the frontend, quoting client ->
/// frontend.
#[inline(always)]
fn icmp_error_from_backend(ctx: &TcContext, packet: &Ipv4) -> Option<(u32, i32)> {
    if !matches!(
        packet.icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return None;
    }
    let quote = quote_about_sender(ctx, packet)?;
    let reply = &quote.sender_flow;
    let (backend, backend_port) = (reply.saddr, reply.sport);
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let entry = unsafe { EXTERNAL_NAT.get(reply) }.copied()?;
    if entry.direction != EXTERNAL_TO_CLIENT {
        return None;
    }
    if let Err(drop) = enforce(ctx, packet, Site::Decide) {
        return Some((drop, TC_ACT_SHOT));
    }
    if rewrite_quote(
        ctx,
        packet,
        quote.destination_offset,
        backend,
        entry.address,
        quote.destination_port_offset,
        backend_port,
        entry.port,
    )
    .is_none()
        || rewrite_address(ctx, IP_SRC_OFF, packet.src, entry.address).is_none()
    {
        return Some(malformed(ctx, packet));
    }
    let (verdict, action) = send_to_client(ctx, packet.dst);
    if verdict == verdict::EXTERNAL_TRANSLATED {
        return Some((verdict::ICMP_ERROR_TRANSLATED, action));
    }
    Some((verdict, action))
}

/// `from_netdev`: an ICMP error the client's side sends about a backend's reply, quoting
/// it as it reached the client (frontend -> client): the client's port unreachable, or a
/// router's "fragmentation needed" on the way to it, without which PMTU discovery through a
/// frontend breaks. It goes to the backend quoting the backend's own packet: a local
/// backend gets it in its pod (backend -> client quoted); a remote one, reached through
/// SNAT, gets it at its node quoting what that node sent (backend -> this node's address
/// and SNAT port), as the node's conntrack relates it to that flow. The outer source (the
/// client or the router) stays: a PMTU error is valid from any hop. `None`: about no flow
/// from outside.
#[inline(always)]
fn icmp_error_from_client(ctx: &TcContext, packet: &Ipv4, cfg: &NodeConfig) -> Option<(u32, i32)> {
    let quote = quote_about_receiver(ctx, packet)?;
    let reply = &quote.flow;
    // The client's side of the flow, as its packets arrive: client -> frontend.
    let client_flow = reply.reversed();
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let entry = unsafe { EXTERNAL_NAT.get(&client_flow) }.copied()?;
    if entry.direction != EXTERNAL_TO_BACKEND {
        return None;
    }
    let (backend, backend_port) = (entry.address, entry.port);
    if rewrite_quote(
        ctx,
        packet,
        quote.source_offset,
        reply.saddr,
        backend,
        quote.source_port_offset,
        reply.sport,
        backend_port,
    )
    .is_none()
    {
        return Some(malformed(ctx, packet));
    }
    if entry.flags & EXTERNAL_SNAT != 0 {
        // What the backend answered: this node's address and the flow's SNAT port.
        let translated = FlowKey {
            daddr: backend,
            dport: backend_port,
            ..client_flow
        };
        // SAFETY: as above.
        let Some(snat) = (unsafe { NAT.get(&translated) }).copied() else {
            // The SNAT entry is gone: the backend's node knows no such flow.
            return Some(untracked(ctx, packet));
        };
        if rewrite_quote(
            ctx,
            packet,
            quote.destination_offset,
            reply.daddr,
            snat.addr,
            quote.destination_port_offset,
            reply.dport,
            snat.port,
        )
        .is_none()
        {
            return Some(malformed(ctx, packet));
        }
    }
    if rewrite_address(ctx, IP_DST_OFF, packet.dst, backend).is_none() {
        return Some(malformed(ctx, packet));
    }
    let mut translated = *packet;
    translated.dst = backend;
    Some(counted_as(
        send_to_backend(ctx, &translated, cfg),
        verdict::ICMP_ERROR_TRANSLATED,
    ))
}

/// `from_netdev`, after the reverse SNAT sent a packet to `translated.dst`: a reply (or an
/// ICMP error, or a later fragment) of a flow from outside whose `EXTERNAL_NAT` entries are
/// gone (the LRU evicted them) would leave with the remote backend's address; dropped and
/// counted instead. The client's next packet picks a backend and records the flow again.
/// `None`: the packet is for a local pod (a reply of its own masqueraded flow).
#[inline(always)]
pub(crate) fn untracked_reply(ctx: &TcContext, translated: &Ipv4) -> Option<(u32, i32)> {
    // SAFETY: only the entry's presence is read.
    if unsafe { ENDPOINTS.get(&translated.dst) }.is_some() {
        return None;
    }
    Some(untracked(ctx, translated))
}

#[inline(always)]
fn untracked(ctx: &TcContext, packet: &Ipv4) -> (u32, i32) {
    event!(
        ctx,
        Debug,
        "dropped proto {} from {:i} to {:i}: its flow from outside is no longer tracked",
        packet.proto,
        packet.src,
        packet.dst
    );
    (verdict::DROP_EXTERNAL_UNTRACKED, TC_ACT_SHOT)
}

#[inline(always)]
fn malformed(ctx: &TcContext, packet: &Ipv4) -> (u32, i32) {
    event!(
        ctx,
        Debug,
        "dropped a Service packet from {:i} to {:i}: cannot rewrite it",
        packet.src,
        packet.dst
    );
    (verdict::DROP_MALFORMED, TC_ACT_SHOT)
}
