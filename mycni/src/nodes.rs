//! The cluster's nodes and the routes the agent derives from them, without I/O.
//!
//! Nodes come from a source behind [`NodeSource`]-shaped callers (a static file here, the
//! Kubernetes API later); the agent turns them into [`PeerRoute`]s and applies the
//! difference between the last applied set and the new one.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::ipam::Pool;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodesError {
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    #[error("nodes {first} and {second} both claim pod CIDR {cidr}")]
    OverlappingCidr {
        first: String,
        second: String,
        cidr: String,
    },
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: Pool,
}

/// Parses a nodes file: one node per line, `name node-ip pod-cidr`; `#` starts a comment.
///
/// ```text
/// # name   node IP        pod CIDR
/// node-1   192.168.1.11   10.244.1.0/24
/// node-2   192.168.1.12   10.244.2.0/24
/// ```
pub fn parse_nodes_file(text: &str) -> Result<Vec<NodeEntry>, NodesError> {
    let mut nodes: Vec<NodeEntry> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let syntax = |reason: String| NodesError::Syntax {
            line: index + 1,
            reason,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, ip, cidr] = fields[..] else {
            return Err(syntax(format!(
                "want `name node-ip pod-cidr`, got {line:?}"
            )));
        };
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| syntax(format!("{ip:?} is not an IPv4 address")))?;
        let pod_cidr = Pool::parse(cidr).map_err(|e| syntax(e.to_string()))?;
        nodes.push(NodeEntry {
            name: name.to_string(),
            ip,
            pod_cidr,
        });
    }
    check_overlaps(&nodes)?;
    Ok(nodes)
}

/// Refuses two nodes whose pod CIDRs overlap. Sorted by network, a CIDR overlaps an
/// earlier one exactly when it starts before the furthest end seen so far, so a cluster of
/// thousands is checked in one pass (a pairwise check took a second at 5,000 nodes).
fn check_overlaps(nodes: &[NodeEntry]) -> Result<(), NodesError> {
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| nodes[i].pod_cidr.cidr());
    // The node reaching furthest so far, and where it ends.
    let mut furthest: Option<(usize, Ipv4Addr)> = None;
    for i in order {
        let cidr = &nodes[i].pod_cidr;
        if let Some((j, end)) = furthest {
            if cidr.network() <= end {
                // Named in file order, the covering or covered CIDR last.
                let (first, second) = if j < i { (j, i) } else { (i, j) };
                return Err(NodesError::OverlappingCidr {
                    first: nodes[first].name.clone(),
                    second: nodes[second].name.clone(),
                    cidr: nodes[second].pod_cidr.to_string(),
                });
            }
        }
        if furthest.is_none_or(|(_, end)| cidr.broadcast() > end) {
            furthest = Some((i, cidr.broadcast()));
        }
    }
    Ok(())
}

/// How packets reach a peer node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// Same L2 segment: straight out of the uplink to the node's IP.
    Direct,
    /// Through the VXLAN device, the node's IP as the tunnel's remote end.
    Tunnel,
}

/// Which path the agent picks per peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelMode {
    /// Direct when the peer is on the uplink's subnet, VXLAN otherwise.
    Auto,
    Vxlan,
    Direct,
}

impl std::str::FromStr for TunnelMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(TunnelMode::Auto),
            "vxlan" => Ok(TunnelMode::Vxlan),
            "direct" => Ok(TunnelMode::Direct),
            other => Err(format!(
                "unknown tunnel mode {other:?} (auto, vxlan or direct)"
            )),
        }
    }
}

/// This node, as the route computation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The uplink's subnet: peers inside it are on-link.
    pub uplink_subnet: Ipv4Network,
}

impl LocalNode {
    fn on_link(&self, ip: Ipv4Addr) -> bool {
        self.uplink_subnet.contains(ip)
    }
}

/// A peer node's pod CIDR and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerRoute {
    /// The peer's pod CIDR.
    pub cidr: Ipv4Network,
    pub node_ip: Ipv4Addr,
    pub path: Path,
}

/// The routes to every other node, keyed by pod CIDR.
pub fn peer_routes(
    local: &LocalNode,
    mode: TunnelMode,
    nodes: &[NodeEntry],
) -> BTreeMap<RouteKey, PeerRoute> {
    nodes
        .iter()
        .filter(|node| node.name != local.name && node.ip != local.ip)
        .map(|node| {
            let path = match mode {
                TunnelMode::Vxlan => Path::Tunnel,
                TunnelMode::Direct => Path::Direct,
                TunnelMode::Auto if local.on_link(node.ip) => Path::Direct,
                TunnelMode::Auto => Path::Tunnel,
            };
            let route = PeerRoute {
                cidr: node.pod_cidr.cidr(),
                node_ip: node.ip,
                path,
            };
            (route.cidr, route)
        })
        .collect()
}

/// The other nodes' IPs: the only senders whose VXLAN this node decapsulates toward pods.
pub fn peer_ips(local: &LocalNode, nodes: &[NodeEntry]) -> Vec<Ipv4Addr> {
    nodes
        .iter()
        .filter(|node| node.name != local.name && node.ip != local.ip)
        .map(|node| node.ip)
        .collect()
}

/// This node's own pod CIDR, when the node list names this node (by name, else by IP).
pub fn own_pod_cidr(local: &LocalNode, nodes: &[NodeEntry]) -> Option<Ipv4Network> {
    nodes
        .iter()
        .find(|node| node.name == local.name)
        .or_else(|| nodes.iter().find(|node| node.ip == local.ip))
        .map(|node| node.pod_cidr.cidr())
}

/// What changes between two route sets: routes to remove, routes to add or replace.
pub fn diff_routes(
    applied: &BTreeMap<RouteKey, PeerRoute>,
    desired: &BTreeMap<RouteKey, PeerRoute>,
) -> (Vec<PeerRoute>, Vec<PeerRoute>) {
    let removed = applied
        .iter()
        .filter(|(key, _)| !desired.contains_key(key))
        .map(|(_, route)| route.clone())
        .collect();
    let changed = desired
        .iter()
        .filter(|(key, route)| applied.get(key) != Some(route))
        .map(|(_, route)| route.clone())
        .collect();
    (removed, changed)
}

/// A peer route's key in `ROUTES`: its pod CIDR.
pub type RouteKey = Ipv4Network;

/// The first retry of a peer that failed to apply, doubled per failure up to
/// [`RETRY_MAX`]: a peer the kernel or a full map refuses is retried without hammering.
pub const RETRY_FIRST: Duration = Duration::from_millis(250);
pub const RETRY_MAX: Duration = Duration::from_secs(8);

/// How long to wait after the `attempts`-th failure in a row.
pub fn retry_delay(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    (RETRY_FIRST * (1u32 << doublings)).min(RETRY_MAX)
}

/// One peer whose last apply failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRetry {
    pub attempts: u32,
    pub next_try: Instant,
}

/// Peers whose route could not be applied (or removed), and when each is due again. The
/// other peers never wait for them.
#[derive(Debug, Default, Clone)]
pub struct PeerRetries {
    pending: BTreeMap<RouteKey, PendingRetry>,
}

impl PeerRetries {
    /// Whether `key` may be tried now: it never failed, or its backoff has passed.
    pub fn due(&self, key: &RouteKey, now: Instant) -> bool {
        self.pending.get(key).is_none_or(|p| p.next_try <= now)
    }

    /// Records a failure; returns the attempts so far.
    pub fn failed(&mut self, key: RouteKey, now: Instant) -> u32 {
        let entry = self.pending.entry(key).or_insert(PendingRetry {
            attempts: 0,
            next_try: now,
        });
        entry.attempts += 1;
        entry.next_try = now + retry_delay(entry.attempts);
        entry.attempts
    }

    /// Forgets `key` (it was applied); returns how many attempts it had failed.
    pub fn succeeded(&mut self, key: &RouteKey) -> u32 {
        self.pending.remove(key).map_or(0, |p| p.attempts)
    }

    /// Drops peers that need no more work (removed from the cluster, or back as applied).
    pub fn retain(&mut self, mut still_pending: impl FnMut(&RouteKey) -> bool) {
        self.pending.retain(|key, _| still_pending(key));
    }

    /// The earliest moment a failed peer is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next_try).min()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# the lab
node-1 192.168.1.11 10.244.1.0/24
node-2 192.168.1.12 10.244.2.0/24   # same segment
node-3 192.168.2.13 10.244.3.0/24
";

    fn local() -> LocalNode {
        LocalNode {
            name: "node-1".into(),
            ip: "192.168.1.11".parse().unwrap(),
            uplink_subnet: "192.168.1.0/24".parse().unwrap(),
        }
    }

    #[test]
    fn parses_nodes_and_skips_comments() {
        let nodes = parse_nodes_file(FILE).unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[2].name, "node-3");
        assert_eq!(nodes[2].pod_cidr.to_string(), "10.244.3.0/24");
    }

    #[test]
    fn rejects_bad_lines_and_overlaps() {
        assert!(matches!(
            parse_nodes_file("n1 1.2.3.4"),
            Err(NodesError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            parse_nodes_file("n1 x 10.0.0.0/24"),
            Err(NodesError::Syntax { .. })
        ));
        assert!(matches!(
            parse_nodes_file("a 1.1.1.1 10.0.0.0/16\nb 1.1.1.2 10.0.5.0/24"),
            Err(NodesError::OverlappingCidr { .. })
        ));
        // Covered before its cover, apart in the file, and identical.
        let spread = "a 1.1.1.1 10.0.5.0/24\nx 1.1.1.3 10.1.0.0/24\nb 1.1.1.2 10.0.0.0/16";
        assert_eq!(
            parse_nodes_file(spread),
            Err(NodesError::OverlappingCidr {
                first: "a".into(),
                second: "b".into(),
                cidr: "10.0.0.0/16".into()
            })
        );
        assert!(matches!(
            parse_nodes_file("a 1.1.1.1 10.0.1.0/24\nb 1.1.1.2 10.0.2.0/24\nc 1.1.1.3 10.0.1.0/24"),
            Err(NodesError::OverlappingCidr { .. })
        ));
        // Adjacent CIDRs do not overlap.
        assert!(parse_nodes_file(
            "a 1.1.1.1 10.0.0.0/24\nb 1.1.1.2 10.0.1.0/24\nc 1.1.1.3 10.0.2.0/23"
        )
        .is_ok());
    }

    #[test]
    fn auto_mode_tunnels_only_to_off_link_peers() {
        let routes = peer_routes(&local(), TunnelMode::Auto, &parse_nodes_file(FILE).unwrap());
        assert_eq!(routes.len(), 2, "the local node gets no route");
        let two = &routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            (two.path, two.node_ip),
            (Path::Direct, "192.168.1.12".parse().unwrap())
        );
        assert_eq!(routes[&"10.244.3.0/24".parse().unwrap()].path, Path::Tunnel);
        let forced = peer_routes(
            &local(),
            TunnelMode::Vxlan,
            &parse_nodes_file(FILE).unwrap(),
        );
        assert!(forced.values().all(|r| r.path == Path::Tunnel));
    }

    #[test]
    fn peers_are_the_other_nodes_and_the_own_cidr_is_ours() {
        let nodes = parse_nodes_file(FILE).unwrap();
        let peers: Vec<String> = peer_ips(&local(), &nodes)
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(peers, ["192.168.1.12", "192.168.2.13"]);
        assert_eq!(
            own_pod_cidr(&local(), &nodes),
            Some("10.244.1.0/24".parse().unwrap())
        );
        // Found by IP when listed under another name; absent when not listed at all.
        let mut renamed = nodes.clone();
        renamed[0].name = "node-one".into();
        assert_eq!(
            own_pod_cidr(&local(), &renamed),
            Some("10.244.1.0/24".parse().unwrap())
        );
        assert_eq!(peer_ips(&local(), &renamed).len(), 2);
        assert_eq!(own_pod_cidr(&local(), &nodes[1..]), None);
    }

    #[test]
    fn diff_finds_removed_added_and_changed() {
        let nodes = parse_nodes_file(FILE).unwrap();
        let before = peer_routes(&local(), TunnelMode::Auto, &nodes);
        let mut moved = nodes.clone();
        moved[1].ip = "192.168.1.22".parse().unwrap();
        moved.remove(2);
        moved.push(NodeEntry {
            name: "node-4".into(),
            ip: "192.168.1.14".parse().unwrap(),
            pod_cidr: Pool::parse("10.244.4.0/24").unwrap(),
        });
        let after = peer_routes(&local(), TunnelMode::Auto, &moved);
        let (removed, changed) = diff_routes(&before, &after);
        assert_eq!(
            removed
                .iter()
                .map(|r| r.cidr.to_string())
                .collect::<Vec<_>>(),
            ["10.244.3.0/24"]
        );
        assert_eq!(
            changed
                .iter()
                .map(|r| r.cidr.to_string())
                .collect::<Vec<_>>(),
            ["10.244.2.0/24", "10.244.4.0/24"]
        );
        assert_eq!(diff_routes(&after, &after), (vec![], vec![]));
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        assert_eq!(retry_delay(1), RETRY_FIRST);
        assert_eq!(retry_delay(2), RETRY_FIRST * 2);
        assert_eq!(retry_delay(3), RETRY_FIRST * 4);
        assert_eq!(retry_delay(20), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn failed_peers_wait_their_backoff_and_others_do_not() {
        let start = Instant::now();
        let bad: RouteKey = "10.244.9.0/24".parse().unwrap();
        let good: RouteKey = "10.244.2.0/24".parse().unwrap();
        let mut retries = PeerRetries::default();
        assert!(retries.due(&bad, start));
        assert_eq!(retries.failed(bad, start), 1);
        assert!(!retries.due(&bad, start), "retried before its backoff");
        assert!(retries.due(&good, start), "a healthy peer waits for nobody");
        assert_eq!(retries.next_due(), Some(start + RETRY_FIRST));
        assert!(retries.due(&bad, start + RETRY_FIRST));
        assert_eq!(retries.failed(bad, start + RETRY_FIRST), 2);
        assert_eq!(retries.next_due(), Some(start + RETRY_FIRST * 3));
        assert_eq!(retries.len(), 1);
        assert_eq!(retries.succeeded(&bad), 2);
        assert!(retries.is_empty());
        retries.failed(bad, start);
        retries.failed(good, start);
        retries.retain(|key| *key == good);
        assert_eq!(retries.len(), 1);
        assert!(retries.due(&bad, start));
    }
}
