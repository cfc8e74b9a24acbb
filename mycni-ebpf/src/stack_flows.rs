//! Flows the node stack delivered or translated (`STACK_FLOWS`): their replies go back
//! through the stack.
use crate::fragments::remember_fragment;
use crate::maps::{FRAGMENTS, STACK_FLOWS};
use crate::packet::Ipv4;
use aya_ebpf::helpers::bpf_ktime_get_ns;
use mycni_common::FRAGMENT_TO_STACK;

/// Whether a packet belongs to a flow whose replies the node stack must see (it translated
/// the flow): by its ports, or for a later fragment by what its first fragment was.
#[inline(always)]
pub(crate) fn stack_flow_reply(packet: &Ipv4) -> bool {
    if packet.has_ports {
        if unsafe { STACK_FLOWS.get(packet.flow()) }.is_none() {
            return false;
        }
        if packet.fragmented {
            remember_fragment(packet, FRAGMENT_TO_STACK, [0; 4]);
        }
        return true;
    }
    packet.later_fragment
        && unsafe { FRAGMENTS.get(packet.fragment()) }
            .is_some_and(|first| first.action == FRAGMENT_TO_STACK)
}

/// Records the reply tuple of a flow the stack delivered (from a node, the outside, or a
/// pod through a translation), so the pod's replies go back through the stack instead of
/// being short-cut past its conntrack and translations, and are not masqueraded.
#[inline(always)]
pub(crate) fn remember_stack_flow(packet: &Ipv4) {
    if !packet.has_ports {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = STACK_FLOWS.insert(packet.reply_flow(), now, 0);
}

/// Forgets the reply tuple of a connection a pod opens straight to another pod: an entry
/// with the same ports left by an earlier connection the stack translated (a ClusterIP
/// through kube-proxy, whose conntrack still holds its DNAT) would send the new
/// connection's replies into the stack, where they are mistranslated and the connection
/// hangs. Entries only expire by LRU, so such a leftover is the common case, not a race.
#[inline(always)]
pub(crate) fn forget_stack_flow(packet: &Ipv4) {
    let _ = STACK_FLOWS.remove(&packet.reply_flow());
}
