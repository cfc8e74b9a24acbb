//! NetworkPolicy: whether a packet may leave or reach a pod of this node, with connection
//! tracking so replies and later packets of an allowed flow pass on one lookup.
//!
//! The maps and the decision order are `mycni_common::policy`'s contract. Every node decides
//! for its own pods only (`POLICY_ENDPOINTS` holds them): a packet is checked against its
//! source's egress policy when the source is a local pod, and its destination's ingress
//! policy when the destination is, wherever on this node it is forwarded.
//!
//! Two kinds of call site:
//! - [`Site::Decide`]: the packet is forwarded to its real destination here (`from_pod`'s
//!   redirects, `from_netdev`'s delivery, `to_pod` and `to_netdev` after the node stack's
//!   translations): the flow is checked, and recorded in `POLICY_CT` when allowed.
//! - [`Site::ToStack`]: `from_pod` hands the packet to the node stack, whose DNAT may still
//!   change its destination (a ClusterIP): nothing is decided; the flow is recorded with
//!   `CT_VIA_STACK` so its replies (from the ClusterIP, after the stack undid its DNAT)
//!   come back in, and is checked where the stack sends it.
use crate::headers::{
    ICMP_DEST_UNREACH, ICMP_ECHO_ID, ICMP_ECHO_REQUEST, ICMP_HLEN, ICMP_PARAMETER_PROBLEM,
    ICMP_TIME_EXCEEDED, ICMP_TYPE, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_DST, IPV4_HLEN,
    IPV4_PROTO, IPV4_SRC, IPV4_VIHL, L4_SPORT,
};
use crate::maps::{
    FRAGMENTS, POLICY, POLICY_CT, POLICY_DROPS, POLICY_ENDPOINTS, POLICY_IDENTITIES, POLICY_STATE,
};
use crate::packet::{tcp_opening, Ipv4};
use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::programs::TcContext;
use mycni_common::policy::{
    identity, PolicyCtEntry, PolicyDrops, PolicyEndpoint, PolicyKey, CT_VIA_STACK, ENFORCE_EGRESS,
    ENFORCE_INGRESS, POLICY_EGRESS, POLICY_INGRESS,
};
use mycni_common::{verdict, FlowKey, FragmentEntry, FRAGMENT_PASS};

/// SCTP, whose ports sit where TCP's and UDP's do (`parse_ipv4` leaves them out).
const IPPROTO_SCTP: u8 = 132;

/// A CT entry's `last_seen_ns` is rewritten at most this often, so a busy flow does not
/// dirty its entry's cache line on every packet.
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Where the packet goes from the call site (see the module comment).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Site {
    Decide,
    ToStack,
}

/// `Ok` when policy lets the packet go on, `Err(verdict)` (`DROP_POLICY_INGRESS` or
/// `DROP_POLICY_EGRESS`) when it must be dropped; the drop is counted per endpoint and
/// logged here, the caller counts the verdict.
#[inline(always)]
pub(crate) fn enforce(ctx: &TcContext, packet: &Ipv4, site: Site) -> Result<(), u32> {
    let Some(state) = POLICY_STATE.get(0) else {
        return Ok(());
    };
    if state.active == 0 {
        return Ok(());
    }
    enforce_active(ctx, packet, site, state.revision)
}

/// The policy path proper: with no policy active only the lookup above runs. Inlined: as a
/// BPF-to-BPF call its stack would add to `to_netdev`'s, past the verifier's 512 bytes.
#[inline(always)]
fn enforce_active(ctx: &TcContext, packet: &Ipv4, site: Site, revision: u32) -> Result<(), u32> {
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let src = unsafe { POLICY_ENDPOINTS.get(packet.src) };
    let dst = unsafe { POLICY_ENDPOINTS.get(packet.dst) };
    let enforcing = |ep: Option<&PolicyEndpoint>| ep.is_some_and(|ep| ep.enforce != 0);
    // Neither end is a pod of this node that some policy selects: nothing to decide, and no
    // reply will be checked here either.
    if !enforcing(src) && !enforcing(dst) {
        return Ok(());
    }
    // A pod's packet to this node's own addresses ends in the stack's input, past every
    // hook that decides: its egress is decided here, on the node's address and port
    // (before any DNAT the stack does there, e.g. a NodePort on the node's address).
    let site = if site == Site::ToStack && is_this_node(packet.dst) {
        Site::Decide
    } else {
        site
    };
    if packet.later_fragment {
        return later_fragment(ctx, packet, site);
    }
    if packet.proto == IPPROTO_ICMP
        && matches!(
            packet.icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    {
        return icmp_error(ctx, packet, site);
    }
    let flow = flow_of(ctx, packet);
    let reply = reversed(&flow);
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = POLICY_CT.get_ptr_mut(flow) {
        // SAFETY: the pointer is the map's value, valid for this run.
        let (entry_revision, flags) = unsafe { ((*entry).revision, (*entry).flags) };
        let via_stack = flags & CT_VIA_STACK != 0;
        // A flow recorded on its way into the stack is decided where it comes out; until
        // then, and when it was decided under the current policy, it passes.
        if site == Site::ToStack || (!via_stack && entry_revision == revision) {
            refresh(entry, now);
            return Ok(());
        }
        // Stale, or first seen at a decision point: check it as it goes.
        return match check_flow(ctx, &flow, src, dst) {
            Ok(()) => {
                unsafe {
                    (*entry).revision = revision;
                    (*entry).flags = 0;
                    (*entry).last_seen_ns = now;
                }
                remember_first_fragment(packet);
                Ok(())
            }
            Err(verdict) => {
                let _ = POLICY_CT.remove(flow);
                Err(verdict)
            }
        };
    }
    // A TCP SYN opens a connection: it is never the reply of another flow, whatever a
    // packet that went the other way recorded (a pod under ingress default-deny that sends
    // a forged SYN-ACK from its port to a peer's must not let the peer connect in).
    let opening = packet.proto == IPPROTO_TCP && tcp_opening(ctx, packet);
    let reply_entry = if opening {
        None
    } else {
        POLICY_CT.get_ptr_mut(reply)
    };
    if let Some(entry) = reply_entry {
        // SAFETY: as above.
        let (entry_revision, flags) = unsafe { ((*entry).revision, (*entry).flags) };
        // A reply: of a flow the pod sent into the stack (its peer is the address the pod
        // chose, e.g. the ClusterIP), or decided under the current policy.
        if site == Site::ToStack || flags & CT_VIA_STACK != 0 || entry_revision == revision {
            refresh(entry, now);
            return Ok(());
        }
        // The policy changed since: the flow must still be allowed in its original
        // direction, or its established connections would outlive a new deny.
        return match check_flow(ctx, &reply, dst, src) {
            Ok(()) => {
                unsafe {
                    (*entry).revision = revision;
                    (*entry).last_seen_ns = now;
                }
                Ok(())
            }
            Err(verdict) => {
                let _ = POLICY_CT.remove(reply);
                Err(verdict)
            }
        };
    }
    if site == Site::ToStack {
        // A TCP segment other than a connection's first one, with no entry: a connection
        // from before policy applied, probably one the stack delivered to the pod. Recording
        // it would make its peer's packets look like replies; the decision point checks them.
        if packet.proto == IPPROTO_TCP && !opening {
            return Ok(());
        }
        record(&flow, revision, CT_VIA_STACK, now);
        return Ok(());
    }
    // A new flow, or one older than the policy (checked the same way: its direction now is
    // all there is to go by).
    check_flow(ctx, &flow, src, dst)?;
    record(&flow, revision, 0, now);
    remember_first_fragment(packet);
    Ok(())
}

/// Whether `addr` is one of this node's own addresses (the `HOST` identity).
#[inline(always)]
fn is_this_node(addr: [u8; 4]) -> bool {
    POLICY_IDENTITIES.get(&Key::new(32, addr)).copied() == Some(identity::HOST)
}

/// The flow key of a packet as policy sees it: `parse_ipv4`'s, with SCTP's ports too.
#[inline(always)]
fn flow_of(ctx: &TcContext, packet: &Ipv4) -> FlowKey {
    let mut flow = packet.flow();
    if packet.proto == IPPROTO_SCTP {
        if let Ok(ports) = ctx.load::<[u16; 2]>(packet.l4 + L4_SPORT) {
            flow.sport = u16::from_be(ports[0]);
            flow.dport = u16::from_be(ports[1]);
        }
    }
    flow
}

#[inline(always)]
fn reversed(flow: &FlowKey) -> FlowKey {
    FlowKey {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        pad: [0; 3],
    }
}

#[inline(always)]
fn record(flow: &FlowKey, revision: u32, flags: u8, now: u64) {
    let entry = PolicyCtEntry {
        revision,
        flags,
        pad: [0; 3],
        last_seen_ns: now,
    };
    let _ = POLICY_CT.insert(flow, entry, 0);
}

#[inline(always)]
fn refresh(entry: *mut PolicyCtEntry, now: u64) {
    // SAFETY: the pointer is the map's value, valid for this run.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
    }
}

/// The first fragment of an allowed datagram: its later fragments (no ports, no flow) pass
/// on it. Without overwriting what NAT or the stack-flow check record for it.
#[inline(always)]
fn remember_first_fragment(packet: &Ipv4) {
    if packet.fragmented {
        let entry = FragmentEntry {
            addr: [0; 4],
            action: FRAGMENT_PASS,
            pad: [0; 3],
        };
        let _ = FRAGMENTS.insert(packet.fragment(), entry, BPF_NOEXIST as u64);
    }
}

/// A later fragment goes where its first went: passes if the first was recorded (allowed
/// here, translated, or handed to the stack), else is checked with no port.
#[inline(always)]
fn later_fragment(ctx: &TcContext, packet: &Ipv4, site: Site) -> Result<(), u32> {
    if site == Site::ToStack || unsafe { FRAGMENTS.get(packet.fragment()) }.is_some() {
        return Ok(());
    }
    let flow = packet.flow();
    check_flow(
        ctx,
        &flow,
        unsafe { POLICY_ENDPOINTS.get(flow.saddr) },
        unsafe { POLICY_ENDPOINTS.get(flow.daddr) },
    )
}

/// An ICMP error passes when it is about a tracked flow (the quoted packet, either way);
/// any other is checked as ICMP between its outer addresses, and not recorded.
#[inline(always)]
fn icmp_error(ctx: &TcContext, packet: &Ipv4, site: Site) -> Result<(), u32> {
    if site == Site::ToStack {
        return Ok(());
    }
    if let Some(quoted) = quoted_flow(ctx, packet) {
        if POLICY_CT.get_ptr(quoted).is_some() || POLICY_CT.get_ptr(reversed(&quoted)).is_some() {
            return Ok(());
        }
    }
    let flow = packet.flow();
    check_flow(
        ctx,
        &flow,
        unsafe { POLICY_ENDPOINTS.get(flow.saddr) },
        unsafe { POLICY_ENDPOINTS.get(flow.daddr) },
    )
}

/// The flow of the packet an ICMP error quotes, as that packet was sent.
#[inline(always)]
fn quoted_flow(ctx: &TcContext, packet: &Ipv4) -> Option<FlowKey> {
    let inner = packet.l4 + ICMP_HLEN;
    let version_ihl = ctx.load::<u8>(inner + IPV4_VIHL).ok()?;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return None;
    }
    let proto = ctx.load::<u8>(inner + IPV4_PROTO).ok()?;
    let saddr = ctx.load::<[u8; 4]>(inner + IPV4_SRC).ok()?;
    let daddr = ctx.load::<[u8; 4]>(inner + IPV4_DST).ok()?;
    let inner_l4 = inner + ihl;
    let (sport, dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports = ctx.load::<[u16; 2]>(inner_l4 + L4_SPORT).ok()?;
            (u16::from_be(ports[0]), u16::from_be(ports[1]))
        }
        IPPROTO_ICMP => {
            if ctx.load::<u8>(inner_l4 + ICMP_TYPE).ok()? != ICMP_ECHO_REQUEST {
                return None;
            }
            let id = u16::from_be(ctx.load::<u16>(inner_l4 + ICMP_ECHO_ID).ok()?);
            (id, id)
        }
        _ => return None,
    };
    Some(FlowKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        pad: [0; 3],
    })
}

/// Whether policy allows `flow` (its first packet's direction): the source's egress when
/// `src` (its `POLICY_ENDPOINTS` entry) enforces it, the destination's ingress likewise.
/// Out of line: called from several places, each inlined copy would carry its lookups and
/// log messages (the programs tripled in size); its own stack is small enough to add to
/// `to_netdev`'s.
#[inline(never)]
fn check_flow(
    ctx: &TcContext,
    flow: &FlowKey,
    src: Option<&PolicyEndpoint>,
    dst: Option<&PolicyEndpoint>,
) -> Result<(), u32> {
    if src.is_some_and(|ep| ep.enforce & ENFORCE_EGRESS != 0)
        && !allowed(flow.saddr, flow.daddr, flow, POLICY_EGRESS)
    {
        count_drop(flow.saddr, POLICY_EGRESS);
        event!(
            ctx,
            Debug,
            "policy: dropped egress of {:i} to {:i} port {} (proto {})",
            flow.saddr,
            flow.daddr,
            flow.dport,
            flow.proto
        );
        return Err(verdict::DROP_POLICY_EGRESS);
    }
    if dst.is_some_and(|ep| ep.enforce & ENFORCE_INGRESS != 0)
        && !allowed(flow.daddr, flow.saddr, flow, POLICY_INGRESS)
    {
        count_drop(flow.daddr, POLICY_INGRESS);
        event!(
            ctx,
            Debug,
            "policy: dropped ingress of {:i} from {:i} port {} (proto {})",
            flow.daddr,
            flow.saddr,
            flow.dport,
            flow.proto
        );
        return Err(verdict::DROP_POLICY_INGRESS);
    }
    Ok(())
}

/// The contract's lookup order: the peer's identity, then the exact, any-port and
/// any-protocol keys, first for that identity and then for any peer.
#[inline(always)]
fn allowed(endpoint: [u8; 4], peer: [u8; 4], flow: &FlowKey, direction: u8) -> bool {
    let peer_identity = POLICY_IDENTITIES
        .get(&Key::new(32, peer))
        .copied()
        .unwrap_or(identity::WORLD);
    // ICMP has no ports (the flow key holds the echo identifier): only the any-port keys.
    let port = if flow.proto == IPPROTO_ICMP {
        0
    } else {
        flow.dport
    };
    let mut key = PolicyKey {
        endpoint,
        peer_identity,
        port,
        protocol: flow.proto,
        direction,
    };
    for id in [peer_identity, identity::ANY] {
        key.peer_identity = id;
        key.port = port;
        key.protocol = flow.proto;
        if port != 0 && POLICY.get_ptr(key).is_some() {
            return true;
        }
        key.port = 0;
        if POLICY.get_ptr(key).is_some() {
            return true;
        }
        key.protocol = 0;
        if POLICY.get_ptr(key).is_some() {
            return true;
        }
    }
    false
}

/// One more packet dropped for `endpoint` in `direction`, on this CPU's slot; the entry is
/// made on the pod's first drop (the agent removes it with the endpoint).
#[inline(always)]
fn count_drop(endpoint: [u8; 4], direction: u8) {
    if POLICY_DROPS.get_ptr_mut(endpoint).is_none() {
        let _ = POLICY_DROPS.insert(endpoint, PolicyDrops::default(), BPF_NOEXIST as u64);
    }
    let Some(drops) = POLICY_DROPS.get_ptr_mut(endpoint) else {
        return;
    };
    // SAFETY: the pointer is this CPU's slot of the map's value: no other CPU writes it.
    unsafe {
        if direction == POLICY_EGRESS {
            (*drops).egress_packets += 1;
        } else {
            (*drops).ingress_packets += 1;
        }
    }
}
