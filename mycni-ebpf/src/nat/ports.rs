//! SNAT port allocation: a free port claimed atomically from a random start, or a closed
//! TCP flow's port taken over.
use super::flow::{pod_events, reply_key};
use crate::headers::{IPPROTO_ICMP, IPPROTO_TCP, TCP_ACK, TCP_SYN};
use crate::maps::NAT;
use crate::packet::Ipv4;
use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use mycni_common::{nat_state, FlowKey, NatEntry, NodeConfig, NAT_EGRESS, NAT_INGRESS};

pub(crate) const DEFAULT_NAT_PORT_MIN: u16 = 61000;
pub(crate) const DEFAULT_NAT_PORT_MAX: u16 = 65535;

/// Why SNAT found no port for a new flow.
pub(crate) enum PortError {
    /// Every port in the range is taken for this peer (by flows not closed).
    Exhausted,
    /// The forward entry could not be inserted (the helper's error).
    Record(i64),
}

/// The port search's state, on the stack of `allocate_port` and handed to `try_port` by
/// `bpf_loop`.
#[repr(C)]
pub(crate) struct PortSearch {
    /// The reply key of the new flow; `try_port` fills in the port.
    pub(crate) reply: FlowKey,
    pub(crate) back: NatEntry,
    pub(crate) min: u32,
    pub(crate) range: u32,
    pub(crate) start: u32,
    /// The port claimed, 0 while none.
    pub(crate) found: u32,
    /// The first port seen held by a closed TCP flow, 0 while none.
    pub(crate) closed: u32,
}

#[inline(always)]
pub(crate) fn with_port(mut key: FlowKey, port: u16) -> FlowKey {
    key.dport = port;
    if key.proto == IPPROTO_ICMP {
        key.sport = port;
    }
    key
}

/// One step of the port search: claims port `start + index` (wrapping in the range) by
/// inserting its reply entry with BPF_NOEXIST, atomic across CPUs. Stops `bpf_loop` (1)
/// once a port is claimed.
#[inline(never)]
pub(crate) extern "C" fn try_port(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the `PortSearch` on allocate_port's stack it was given.
    let search = unsafe { &mut *(ctx as *mut PortSearch) };
    if search.range == 0 {
        return 1;
    }
    let port = (search.min + search.start.wrapping_add(index as u32) % search.range) as u16;
    let key = with_port(search.reply, port);
    let back = search.back;
    if NAT.insert(key, back, BPF_NOEXIST as u64).is_ok() {
        search.found = port as u32;
        return 1;
    }
    if search.closed == 0 && key.proto == IPPROTO_TCP && held_by_closed_flow(&key).is_some() {
        search.closed = port as u32;
    }
    0
}

/// When the reply entry `key` belongs to a closed TCP flow, that flow's forward key. Both
/// entries' state bits count, as the agent counts them: two CPUs updating the bits of one
/// entry at once may lose one side's (the programs write them without atomics).
#[inline(always)]
pub(crate) fn held_by_closed_flow(key: &FlowKey) -> Option<FlowKey> {
    // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
    let held = unsafe { NAT.get(key) }?;
    let forward = FlowKey {
        saddr: held.addr,
        daddr: key.saddr,
        sport: held.port,
        dport: key.sport,
        proto: key.proto,
        pad: [0; 3],
    };
    let mut state = held.state;
    if !nat_state::tcp_closed(state) {
        // SAFETY: as above.
        state |= unsafe { NAT.get(forward) }.map_or(0, |out| out.state);
    }
    nat_state::tcp_closed(state).then_some(forward)
}

/// Finds a port for a new flow: from a random start, every port of the range in turn
/// until a free one is claimed (one try in the common case). With none free, a new TCP
/// connection takes over the port of a closed one (RST or FIN both ways). Then records
/// the forward entry with BPF_NOEXIST too, so two CPUs handling the flow's first packets
/// at once agree on one port: the loser gives its port back and uses the winner's.
#[inline(always)]
pub(crate) fn allocate_port(
    packet: &Ipv4,
    cfg: &NodeConfig,
    now: u64,
    tcp_flags: u8,
) -> Result<u16, PortError> {
    let (min, max) = if cfg.nat_port_min != 0 && cfg.nat_port_max >= cfg.nat_port_min {
        (cfg.nat_port_min, cfg.nat_port_max)
    } else {
        (DEFAULT_NAT_PORT_MIN, DEFAULT_NAT_PORT_MAX)
    };
    let state = pod_events(0, tcp_flags);
    let mut search = PortSearch {
        reply: reply_key(packet, cfg.node_ip, 0),
        back: NatEntry {
            addr: packet.src,
            port: packet.sport,
            direction: NAT_INGRESS,
            state,
            last_seen_ns: now,
        },
        min: min as u32,
        range: (max - min) as u32 + 1,
        // SAFETY: a helper without arguments.
        start: unsafe { bpf_get_prandom_u32() },
        found: 0,
        closed: 0,
    };
    // SAFETY: `try_port` has the callback signature bpf_loop wants and only uses `search`.
    unsafe {
        bpf_loop(
            search.range,
            try_port as *mut c_void,
            &mut search as *mut PortSearch as *mut c_void,
            0,
        );
    }
    if search.found == 0 && search.closed != 0 && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        search.found = take_over(&search).unwrap_or(0);
    }
    if search.found == 0 {
        return Err(PortError::Exhausted);
    }
    let port = search.found as u16;
    let forward = NatEntry {
        addr: cfg.node_ip,
        port,
        direction: NAT_EGRESS,
        state,
        last_seen_ns: now,
    };
    match NAT.insert(packet.flow(), forward, BPF_NOEXIST as u64) {
        Ok(()) => Ok(port),
        Err(error) => {
            // Another CPU translated this flow's first packet at the same moment and
            // recorded its port first: use that one.
            let _ = NAT.remove(&with_port(search.reply, port));
            // SAFETY: map values are plain data; a concurrent update can at worst tear a read.
            match unsafe { NAT.get(packet.flow()) } {
                Some(winner) => Ok(winner.port),
                None => Err(PortError::Record(error as i64)),
            }
        }
    }
}

/// Gives a closed TCP flow's port to a new connection: forgets both entries of the old
/// flow, then claims the port with BPF_NOEXIST, so of two CPUs taking the same port over
/// at once only one gets it. Maps have no compare-and-delete: the reply entry is checked
/// to still be the old flow's right before it is removed, which leaves a window of a few
/// instructions in which a second taker could remove the first one's fresh entry.
#[inline(always)]
pub(crate) fn take_over(search: &PortSearch) -> Option<u32> {
    let port = search.closed as u16;
    let key = with_port(search.reply, port);
    let old_forward = held_by_closed_flow(&key)?;
    // SAFETY: as above.
    let still_old = unsafe { NAT.get(key) }
        .is_some_and(|held| held.addr == old_forward.saddr && held.port == old_forward.sport);
    if !still_old {
        return None;
    }
    let _ = NAT.remove(&key);
    let _ = NAT.remove(&old_forward);
    NAT.insert(key, search.back, BPF_NOEXIST as u64).ok()?;
    Some(port as u32)
}
