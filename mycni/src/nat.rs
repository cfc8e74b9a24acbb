//! SNAT table upkeep without I/O: each flow's state and lifetime, which entries have
//! outlived it, and how full the table is. The agent reads the pinned `NAT` map, asks this
//! module, and deletes.
//!
//! The programs record events in both entries of a flow (`mycni_common::nat_state`); the
//! lifetime of a flow is picked from its state the way conntrack picks its timeouts, and
//! counts from the last packet in either direction.
use std::collections::BTreeSet;
use std::time::Duration;

use mycni_common::{nat_state, FlowKey, NatEntry, NAT_EGRESS};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Where a translated flow is, as far as its lifetime goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlowState {
    /// TCP: the pod sent a SYN (or a packet of a connection picked up midway), no answer.
    TcpSynSent,
    /// TCP: the peer answered, the pod has not acknowledged yet.
    TcpSynReceived,
    TcpEstablished,
    /// TCP: a FIN one way.
    TcpClosing,
    /// TCP: a FIN both ways, or a RST: the port may be reused.
    TcpClosed,
    UdpUnreplied,
    UdpReplied,
    Icmp,
}

impl FlowState {
    pub fn name(self) -> &'static str {
        match self {
            FlowState::TcpSynSent => "syn_sent",
            FlowState::TcpSynReceived => "syn_received",
            FlowState::TcpEstablished => "established",
            FlowState::TcpClosing => "closing",
            FlowState::TcpClosed => "closed",
            FlowState::UdpUnreplied => "unreplied",
            FlowState::UdpReplied => "replied",
            FlowState::Icmp => "icmp",
        }
    }
}

/// The state of a flow from its protocol and `nat_state` bits (of both entries, or-ed).
pub fn flow_state(proto: u8, state: u8) -> FlowState {
    match proto {
        IPPROTO_TCP => {
            if nat_state::tcp_closed(state) {
                FlowState::TcpClosed
            } else if state & (nat_state::TCP_FIN_OUT | nat_state::TCP_FIN_IN) != 0 {
                FlowState::TcpClosing
            } else if state & nat_state::TCP_ESTABLISHED != 0 {
                FlowState::TcpEstablished
            } else if state & nat_state::REPLIED != 0 {
                FlowState::TcpSynReceived
            } else {
                FlowState::TcpSynSent
            }
        }
        IPPROTO_UDP if state & nat_state::REPLIED != 0 => FlowState::UdpReplied,
        IPPROTO_UDP => FlowState::UdpUnreplied,
        _ => FlowState::Icmp,
    }
}

/// Idle time after which a translated flow is forgotten, per state. The defaults are the
/// kernel conntrack's (`nf_conntrack_tcp_timeout_*`, `nf_conntrack_udp_timeout*`,
/// `nf_conntrack_icmp_timeout`), except that a closed TCP connection frees its port after
/// 5 s instead of lingering in TIME_WAIT for 120 s, and meanwhile a new connection may take
/// the port over (the programs do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatTimeouts {
    /// Established TCP (`--nat-timeout-tcp`): idle connections live this long, 5 days.
    pub tcp: Duration,
    /// UDP flows that got an answer (`--nat-timeout-udp`), 120 s.
    pub udp: Duration,
    /// ICMP echo (`--nat-timeout-icmp`), 30 s.
    pub icmp: Duration,
    /// UDP flows never answered, 30 s (never more than `udp`).
    pub udp_unreplied: Duration,
    /// TCP handshake: SYN sent, 120 s; answered but not acknowledged, 60 s.
    pub tcp_syn_sent: Duration,
    pub tcp_syn_received: Duration,
    /// TCP with a FIN one way, 120 s.
    pub tcp_closing: Duration,
    /// TCP closed by RST or a FIN both ways, 5 s.
    pub tcp_closed: Duration,
}

impl Default for NatTimeouts {
    fn default() -> Self {
        NatTimeouts {
            tcp: Duration::from_secs(5 * 24 * 3600),
            udp: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
            udp_unreplied: Duration::from_secs(30),
            tcp_syn_sent: Duration::from_secs(120),
            tcp_syn_received: Duration::from_secs(60),
            tcp_closing: Duration::from_secs(120),
            tcp_closed: Duration::from_secs(5),
        }
    }
}

impl NatTimeouts {
    /// How long a flow in `state` may stay idle. A shorter `tcp` (established) also caps
    /// the handshake and closing lifetimes, so a short `--nat-timeout-tcp` means short
    /// everywhere.
    pub fn lifetime(&self, state: FlowState) -> Duration {
        match state {
            FlowState::TcpSynSent => self.tcp_syn_sent.min(self.tcp),
            FlowState::TcpSynReceived => self.tcp_syn_received.min(self.tcp),
            FlowState::TcpEstablished => self.tcp,
            FlowState::TcpClosing => self.tcp_closing.min(self.tcp),
            FlowState::TcpClosed => self.tcp_closed.min(self.tcp),
            FlowState::UdpUnreplied => self.udp_unreplied.min(self.udp),
            FlowState::UdpReplied => self.udp,
            FlowState::Icmp => self.icmp,
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

/// The state of the flow an entry belongs to, from both of its entries when the partner
/// is there.
fn state_of(
    lookup: &std::collections::HashMap<FlowKey, NatEntry>,
    key: &FlowKey,
    entry: &NatEntry,
) -> (FlowState, u64) {
    let (bits, last_seen) = match lookup.get(&partner_key(key, entry)) {
        Some(other) => (
            entry.state | other.state,
            entry.last_seen_ns.max(other.last_seen_ns),
        ),
        None => (entry.state, entry.last_seen_ns),
    };
    (flow_state(key.proto, bits), last_seen)
}

/// Keys to delete: both directions of every flow idle (in both directions) for longer than
/// its state's lifetime, and halves whose partner is gone and that are idle themselves.
pub fn expired(
    entries: &[(FlowKey, NatEntry)],
    now_ns: u64,
    timeouts: &NatTimeouts,
) -> BTreeSet<FlowKeyOrd> {
    let lookup: std::collections::HashMap<FlowKey, NatEntry> = entries.iter().copied().collect();
    let mut doomed = BTreeSet::new();
    for (key, entry) in entries {
        let partner = partner_key(key, entry);
        let (state, last_seen) = state_of(&lookup, key, entry);
        let idle = Duration::from_nanos(now_ns.saturating_sub(last_seen));
        if idle > timeouts.lifetime(state) {
            doomed.insert(FlowKeyOrd(*key));
            if lookup.contains_key(&partner) {
                doomed.insert(FlowKeyOrd(partner));
            }
        }
    }
    doomed
}

/// Every egress entry's flow with its state, for display.
pub fn flow_states(entries: &[(FlowKey, NatEntry)]) -> Vec<(FlowKey, NatEntry, FlowState)> {
    let lookup: std::collections::HashMap<FlowKey, NatEntry> = entries.iter().copied().collect();
    entries
        .iter()
        .map(|(key, entry)| (*key, *entry, state_of(&lookup, key, entry).0))
        .collect()
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
    /// TCP flows by state, in `FlowState` order: syn_sent, syn_received, established,
    /// closing, closed.
    pub tcp_states: [usize; 5],
}

/// Names of `NatOccupancy::tcp_states`, in order.
pub const TCP_STATE_NAMES: [&str; 5] = [
    "syn_sent",
    "syn_received",
    "established",
    "closing",
    "closed",
];

pub fn occupancy(entries: &[(FlowKey, NatEntry)]) -> NatOccupancy {
    let lookup: std::collections::HashMap<FlowKey, NatEntry> = entries.iter().copied().collect();
    let mut counts = NatOccupancy {
        entries: entries.len(),
        ..NatOccupancy::default()
    };
    for (key, entry) in entries {
        if entry.direction != NAT_EGRESS {
            continue;
        }
        match key.proto {
            IPPROTO_TCP => {
                counts.tcp += 1;
                let index = match state_of(&lookup, key, entry).0 {
                    FlowState::TcpSynSent => 0,
                    FlowState::TcpSynReceived => 1,
                    FlowState::TcpEstablished => 2,
                    FlowState::TcpClosing => 3,
                    _ => 4,
                };
                counts.tcp_states[index] += 1;
            }
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
        flow_in(
            proto,
            0,
            pod_port,
            ext_port,
            nat_port,
            egress_seen,
            ingress_seen,
        )
    }

    /// Both entries of a flow; `state` bits go into the egress entry only (the agent must
    /// combine both).
    fn flow_in(
        proto: u8,
        state: u8,
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
                    state,
                    last_seen_ns: egress_seen,
                },
            ),
            (
                reverse,
                NatEntry {
                    addr: POD,
                    port: pod_port,
                    direction: NAT_INGRESS,
                    state: 0,
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
    fn states_follow_the_tcp_handshake_and_close() {
        use nat_state::*;
        let tcp = |bits| flow_state(IPPROTO_TCP, bits);
        assert_eq!(tcp(TCP_SYN), FlowState::TcpSynSent);
        assert_eq!(
            tcp(0),
            FlowState::TcpSynSent,
            "picked up midway, unanswered"
        );
        assert_eq!(tcp(TCP_SYN | REPLIED), FlowState::TcpSynReceived);
        assert_eq!(
            tcp(TCP_SYN | REPLIED | TCP_ESTABLISHED),
            FlowState::TcpEstablished
        );
        let established = TCP_SYN | REPLIED | TCP_ESTABLISHED;
        assert_eq!(tcp(established | TCP_FIN_OUT), FlowState::TcpClosing);
        assert_eq!(tcp(established | TCP_FIN_IN), FlowState::TcpClosing);
        assert_eq!(
            tcp(established | TCP_FIN_IN | TCP_FIN_OUT),
            FlowState::TcpClosed
        );
        assert_eq!(tcp(TCP_SYN | TCP_RST), FlowState::TcpClosed);
        assert_eq!(flow_state(IPPROTO_UDP, 0), FlowState::UdpUnreplied);
        assert_eq!(flow_state(IPPROTO_UDP, REPLIED), FlowState::UdpReplied);
        assert_eq!(flow_state(IPPROTO_ICMP, REPLIED), FlowState::Icmp);
    }

    #[test]
    fn default_lifetimes_are_conntracks() {
        let t = NatTimeouts::default();
        assert_eq!(
            t.lifetime(FlowState::TcpEstablished),
            Duration::from_secs(432_000)
        );
        assert_eq!(t.lifetime(FlowState::TcpSynSent), Duration::from_secs(120));
        assert_eq!(t.lifetime(FlowState::TcpClosing), Duration::from_secs(120));
        assert_eq!(t.lifetime(FlowState::TcpClosed), Duration::from_secs(5));
        assert_eq!(t.lifetime(FlowState::UdpUnreplied), Duration::from_secs(30));
        assert_eq!(t.lifetime(FlowState::UdpReplied), Duration::from_secs(120));
        // A short established lifetime caps the others.
        let short = NatTimeouts {
            tcp: Duration::from_secs(3),
            udp: Duration::from_secs(1),
            ..NatTimeouts::default()
        };
        assert_eq!(
            short.lifetime(FlowState::TcpSynSent),
            Duration::from_secs(3)
        );
        assert_eq!(
            short.lifetime(FlowState::UdpUnreplied),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn closed_connections_free_their_port_within_seconds() {
        use nat_state::*;
        let timeouts = NatTimeouts::default();
        let established = TCP_SYN | REPLIED | TCP_ESTABLISHED;
        let mut entries = flow_in(IPPROTO_TCP, established, 40000, 443, 61000, 0, 0);
        entries.extend(flow_in(
            IPPROTO_TCP,
            established | TCP_FIN_OUT | TCP_FIN_IN,
            40001,
            443,
            61001,
            0,
            0,
        ));
        entries.extend(flow_in(
            IPPROTO_TCP,
            TCP_SYN | TCP_RST,
            40002,
            443,
            61002,
            0,
            0,
        ));
        entries.extend(flow_in(
            IPPROTO_TCP,
            established | TCP_FIN_OUT,
            40003,
            443,
            61003,
            0,
            0,
        ));
        // After 6 s: both closed flows (4 entries) go, the established and closing stay.
        let doomed = expired(&entries, 6 * SEC, &timeouts);
        let ports: BTreeSet<u16> = doomed
            .iter()
            .map(|k| {
                if k.0.saddr == POD {
                    k.0.sport
                } else {
                    k.0.dport
                }
            })
            .collect();
        assert_eq!(doomed.len(), 4);
        assert_eq!(ports, BTreeSet::from([40001, 40002, 61001, 61002]));
        // The closing one goes after 120 s, the established one lives for days.
        assert_eq!(expired(&entries, 121 * SEC, &timeouts).len(), 6);
        assert_eq!(expired(&entries, 4 * 24 * 3600 * SEC, &timeouts).len(), 6);
        assert_eq!(expired(&entries, 6 * 24 * 3600 * SEC, &timeouts).len(), 8);
    }

    #[test]
    fn answered_udp_lives_longer_than_unanswered() {
        let timeouts = NatTimeouts::default();
        let mut entries = flow_in(IPPROTO_UDP, 0, 40000, 53, 61000, 0, 0);
        entries.extend(flow_in(
            IPPROTO_UDP,
            nat_state::REPLIED,
            40001,
            53,
            61001,
            0,
            0,
        ));
        assert_eq!(expired(&entries, 29 * SEC, &timeouts).len(), 0);
        let doomed = expired(&entries, 31 * SEC, &timeouts);
        assert!(doomed
            .iter()
            .all(|k| k.0.sport == 40000 || k.0.dport == 61000));
        assert_eq!(doomed.len(), 2);
        assert_eq!(expired(&entries, 121 * SEC, &timeouts).len(), 4);
    }

    #[test]
    fn expires_flows_idle_in_both_directions_per_protocol() {
        let timeouts = NatTimeouts {
            tcp: Duration::from_secs(100),
            udp: Duration::from_secs(10),
            icmp: Duration::from_secs(5),
            ..NatTimeouts::default()
        };
        let established = nat_state::TCP_SYN | nat_state::REPLIED | nat_state::TCP_ESTABLISHED;
        let mut entries = flow_in(IPPROTO_TCP, established, 40000, 443, 61000, 0, 95 * SEC); // replies recent
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
        entries.extend(flow_in(IPPROTO_TCP, nat_state::TCP_RST, 3, 2, 61001, 0, 0));
        entries.extend(flow(IPPROTO_UDP, 3, 2, 61002, 0, 0));
        let counts = occupancy(&entries);
        assert_eq!(
            (counts.tcp, counts.udp, counts.icmp, counts.entries),
            (2, 1, 0, 6)
        );
        assert_eq!(counts.tcp_states, [1, 0, 0, 0, 1]);
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
            ..NatTimeouts::default()
        };
        assert_eq!(expiry_interval(&long), Duration::from_secs(10));
    }
}
