//! SNAT table upkeep without I/O: which entries have been idle too long, and how full the
//! table is. The agent reads the pinned `NAT` map, asks this module, and deletes.
use std::collections::BTreeSet;
use std::time::Duration;

use mycni_common::{FlowKey, NatEntry, NAT_EGRESS};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Idle time after which a translated flow is forgotten, per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatTimeouts {
    pub tcp: Duration,
    pub udp: Duration,
    pub icmp: Duration,
}

impl Default for NatTimeouts {
    /// Close to the kernel's conntrack defaults for established TCP being far too long for
    /// a port pool; these match what masquerading CNIs commonly use.
    fn default() -> Self {
        NatTimeouts {
            tcp: Duration::from_secs(3600),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(30),
        }
    }
}

impl NatTimeouts {
    fn for_proto(&self, proto: u8) -> Duration {
        match proto {
            IPPROTO_TCP => self.tcp,
            IPPROTO_UDP => self.udp,
            _ => self.icmp,
        }
    }
}

/// How often the agent walks the NAT table: a tenth of the shortest timeout, between 1 and
/// 10 seconds. An entry outlives its timeout by at most this much, and a full table (a
/// walk of hundreds of thousands of entries) is not walked every second.
pub fn expiry_interval(timeouts: &NatTimeouts) -> Duration {
    let shortest = timeouts.tcp.min(timeouts.udp).min(timeouts.icmp);
    (shortest / 10).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// The entry for the other direction of the same translated flow.
pub fn partner_key(key: &FlowKey, entry: &NatEntry) -> FlowKey {
    let icmp = key.proto == IPPROTO_ICMP;
    if entry.direction == NAT_EGRESS {
        // pod -> ext translated to node:port; replies come ext -> node:port.
        FlowKey {
            saddr: key.daddr,
            daddr: entry.addr,
            sport: if icmp { entry.port } else { key.dport },
            dport: entry.port,
            proto: key.proto,
            pad: [0; 3],
        }
    } else {
        // ext -> node:port goes back to pod:port; the pod sent pod:port -> ext.
        FlowKey {
            saddr: entry.addr,
            daddr: key.saddr,
            sport: entry.port,
            dport: if icmp { entry.port } else { key.sport },
            proto: key.proto,
            pad: [0; 3],
        }
    }
}

/// Keys to delete: both directions of every flow idle (in both directions) for longer than
/// its protocol's timeout, and halves whose partner is gone and that are idle themselves.
pub fn expired(
    entries: &[(FlowKey, NatEntry)],
    now_ns: u64,
    timeouts: &NatTimeouts,
) -> BTreeSet<FlowKeyOrd> {
    let lookup: std::collections::HashMap<FlowKey, NatEntry> = entries.iter().copied().collect();
    let mut doomed = BTreeSet::new();
    for (key, entry) in entries {
        let partner = partner_key(key, entry);
        let last_seen = match lookup.get(&partner) {
            Some(other) => entry.last_seen_ns.max(other.last_seen_ns),
            None => entry.last_seen_ns,
        };
        let idle = Duration::from_nanos(now_ns.saturating_sub(last_seen));
        if idle > timeouts.for_proto(key.proto) {
            doomed.insert(FlowKeyOrd(*key));
            if lookup.contains_key(&partner) {
                doomed.insert(FlowKeyOrd(partner));
            }
        }
    }
    doomed
}

/// A `FlowKey` ordered by its bytes, for sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKeyOrd(pub FlowKey);

impl FlowKeyOrd {
    fn tuple(&self) -> ([u8; 4], [u8; 4], u16, u16, u8) {
        let k = &self.0;
        (k.saddr, k.daddr, k.sport, k.dport, k.proto)
    }
}

impl PartialOrd for FlowKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for FlowKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tuple().cmp(&other.tuple())
    }
}

/// How full the table is: translated flows per protocol (one per egress entry).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatOccupancy {
    pub tcp: usize,
    pub udp: usize,
    pub icmp: usize,
    pub entries: usize,
}

pub fn occupancy(entries: &[(FlowKey, NatEntry)]) -> NatOccupancy {
    let mut counts = NatOccupancy {
        entries: entries.len(),
        ..NatOccupancy::default()
    };
    for (key, entry) in entries {
        if entry.direction != NAT_EGRESS {
            continue;
        }
        match key.proto {
            IPPROTO_TCP => counts.tcp += 1,
            IPPROTO_UDP => counts.udp += 1,
            _ => counts.icmp += 1,
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycni_common::NAT_INGRESS;

    const POD: [u8; 4] = [10, 244, 1, 5];
    const EXT: [u8; 4] = [203, 0, 113, 10];
    const NODE: [u8; 4] = [192, 168, 1, 11];
    const SEC: u64 = 1_000_000_000;

    fn flow(
        proto: u8,
        pod_port: u16,
        ext_port: u16,
        nat_port: u16,
        egress_seen: u64,
        ingress_seen: u64,
    ) -> Vec<(FlowKey, NatEntry)> {
        let icmp = proto == IPPROTO_ICMP;
        let forward = FlowKey {
            saddr: POD,
            daddr: EXT,
            sport: pod_port,
            dport: ext_port,
            proto,
            pad: [0; 3],
        };
        let reverse = FlowKey {
            saddr: EXT,
            daddr: NODE,
            sport: if icmp { nat_port } else { ext_port },
            dport: nat_port,
            proto,
            pad: [0; 3],
        };
        vec![
            (
                forward,
                NatEntry {
                    addr: NODE,
                    port: nat_port,
                    direction: NAT_EGRESS,
                    last_seen_ns: egress_seen,
                },
            ),
            (
                reverse,
                NatEntry {
                    addr: POD,
                    port: pod_port,
                    direction: NAT_INGRESS,
                    last_seen_ns: ingress_seen,
                },
            ),
        ]
    }

    #[test]
    fn partners_pair_up_both_ways() {
        for (proto, ext_port) in [(IPPROTO_TCP, 443), (IPPROTO_UDP, 53), (IPPROTO_ICMP, 77)] {
            let pair = flow(proto, 77, ext_port, 61001, 0, 0);
            assert_eq!(
                partner_key(&pair[0].0, &pair[0].1),
                pair[1].0,
                "proto {proto}"
            );
            assert_eq!(
                partner_key(&pair[1].0, &pair[1].1),
                pair[0].0,
                "proto {proto}"
            );
        }
    }

    #[test]
    fn expires_flows_idle_in_both_directions_per_protocol() {
        let timeouts = NatTimeouts {
            tcp: Duration::from_secs(100),
            udp: Duration::from_secs(10),
            icmp: Duration::from_secs(5),
        };
        let mut entries = flow(IPPROTO_TCP, 40000, 443, 61000, 0, 95 * SEC); // replies recent
        entries.extend(flow(IPPROTO_UDP, 40001, 53, 61001, 0, 0)); // idle 100 s > 10 s
        entries.extend(flow(IPPROTO_ICMP, 9, 9, 61002, 99 * SEC, 0)); // requests recent
        let doomed = expired(&entries, 100 * SEC, &timeouts);
        let keys: Vec<FlowKey> = doomed.iter().map(|k| k.0).collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|k| k.proto == IPPROTO_UDP));
        assert_eq!(expired(&entries, 300 * SEC, &timeouts).len(), 6);
    }

    #[test]
    fn counts_flows_per_protocol() {
        let mut entries = flow(IPPROTO_TCP, 1, 2, 61000, 0, 0);
        entries.extend(flow(IPPROTO_TCP, 3, 2, 61001, 0, 0));
        entries.extend(flow(IPPROTO_UDP, 3, 2, 61002, 0, 0));
        let counts = occupancy(&entries);
        assert_eq!(
            (counts.tcp, counts.udp, counts.icmp, counts.entries),
            (2, 1, 0, 6)
        );
    }

    #[test]
    fn expiry_interval_follows_the_shortest_timeout_within_bounds() {
        assert_eq!(
            expiry_interval(&NatTimeouts::default()),
            Duration::from_secs(3)
        );
        let short = NatTimeouts {
            icmp: Duration::from_secs(2),
            ..NatTimeouts::default()
        };
        assert_eq!(expiry_interval(&short), Duration::from_secs(1));
        let long = NatTimeouts {
            tcp: Duration::from_secs(7200),
            udp: Duration::from_secs(600),
            icmp: Duration::from_secs(300),
        };
        assert_eq!(expiry_interval(&long), Duration::from_secs(10));
    }
}
