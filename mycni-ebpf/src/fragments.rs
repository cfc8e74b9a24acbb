//! Fragments: what was done to a first fragment (`FRAGMENTS`), so its later fragments,
//! which carry no ports, get the same.
use crate::maps::FRAGMENTS;
use crate::packet::Ipv4;
use mycni_common::FragmentEntry;

/// Records what was done to a first fragment, keyed by the datagram as it arrived.
#[inline(always)]
pub(crate) fn remember_fragment(packet: &Ipv4, action: u8, addr: [u8; 4]) {
    let entry = FragmentEntry {
        addr,
        action,
        pad: [0; 3],
    };
    let _ = FRAGMENTS.insert(packet.fragment(), entry, 0);
}
