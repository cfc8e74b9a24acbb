//! What a node's policy maps decide for a new flow, read the way `mycni_common::policy`
//! documents the programs' lookups (endpoint, peer identity by longest prefix, then the six
//! `POLICY` keys). Pure: the lab's enforcement-latency test asks it, at every poll of a
//! node's maps, whether the node enforces a policy yet.
use std::net::Ipv4Addr;

use mycni::policy_maps::PolicyDesired;
use mycni_common::policy::{identity, PolicyKey, ENFORCE_EGRESS, ENFORCE_INGRESS, POLICY_INGRESS};

/// The identity of `peer`: the longest prefix of `POLICY_IDENTITIES` holding it, or `WORLD`.
pub fn peer_identity(maps: &PolicyDesired, peer: Ipv4Addr) -> u32 {
    maps.identities
        .iter()
        .filter(|(net, _)| net.contains(peer))
        .max_by_key(|(net, _)| net.prefix())
        .map_or(identity::WORLD, |(_, id)| *id)
}

/// Whether the first packet of a flow between local pod `endpoint` and `peer` (to `port`,
/// `protocol`) passes in `direction` (`POLICY_INGRESS`: to the endpoint).
pub fn allows(
    maps: &PolicyDesired,
    endpoint: Ipv4Addr,
    peer: Ipv4Addr,
    port: u16,
    protocol: u8,
    direction: u8,
) -> bool {
    let bit = if direction == POLICY_INGRESS {
        ENFORCE_INGRESS
    } else {
        ENFORCE_EGRESS
    };
    match maps.endpoints.get(&endpoint) {
        Some(ep) if ep.enforce & bit != 0 => {}
        _ => return true,
    }
    let id = peer_identity(maps, peer);
    [
        (id, port, protocol),
        (id, 0, protocol),
        (id, 0, 0),
        (identity::ANY, port, protocol),
        (identity::ANY, 0, protocol),
        (identity::ANY, 0, 0),
    ]
    .into_iter()
    .any(|(peer_identity, port, protocol)| {
        maps.rules.contains_key(&PolicyKey {
            endpoint: endpoint.octets(),
            peer_identity,
            port,
            protocol,
            direction,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycni_common::policy::{PolicyEndpoint, PolicyEntry};

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 4);

    fn key(peer_identity: u32, port: u16, protocol: u8) -> PolicyKey {
        PolicyKey {
            endpoint: SERVER.octets(),
            peer_identity,
            port,
            protocol,
            direction: POLICY_INGRESS,
        }
    }

    fn maps() -> PolicyDesired {
        let mut maps = PolicyDesired::default();
        maps.endpoints.insert(
            SERVER,
            PolicyEndpoint {
                identity: 256,
                enforce: ENFORCE_INGRESS,
                pad: [0; 3],
            },
        );
        maps.identities
            .insert("10.244.0.0/16".parse().unwrap(), 300);
        maps.identities.insert(CLIENT.into(), 257);
        maps.rules
            .insert(key(257, 8080, 6), PolicyEntry { rules: 1 });
        maps
    }

    #[test]
    fn the_longest_prefix_names_the_peer_and_no_prefix_is_the_world() {
        let maps = maps();
        assert_eq!(peer_identity(&maps, CLIENT), 257);
        assert_eq!(peer_identity(&maps, OTHER), 300);
        assert_eq!(
            peer_identity(&maps, Ipv4Addr::new(8, 8, 8, 8)),
            identity::WORLD
        );
    }

    #[test]
    fn an_enforcing_endpoint_admits_only_what_a_key_allows() {
        let mut maps = maps();
        assert!(allows(&maps, SERVER, CLIENT, 8080, 6, POLICY_INGRESS));
        assert!(!allows(&maps, SERVER, CLIENT, 8081, 6, POLICY_INGRESS));
        assert!(!allows(&maps, SERVER, OTHER, 8080, 6, POLICY_INGRESS));
        // Egress is not enforced for the server; another pod is selected by nothing.
        assert!(allows(
            &maps,
            SERVER,
            OTHER,
            8080,
            6,
            mycni_common::policy::POLICY_EGRESS
        ));
        assert!(allows(&maps, OTHER, CLIENT, 1, 6, POLICY_INGRESS));
        // Wildcards: any port of the protocol, then any peer.
        maps.rules.insert(key(300, 0, 6), PolicyEntry { rules: 1 });
        assert!(allows(&maps, SERVER, OTHER, 9999, 6, POLICY_INGRESS));
        assert!(!allows(&maps, SERVER, OTHER, 9999, 17, POLICY_INGRESS));
        maps.rules
            .insert(key(identity::ANY, 0, 0), PolicyEntry { rules: 1 });
        assert!(allows(
            &maps,
            SERVER,
            Ipv4Addr::new(8, 8, 8, 8),
            53,
            17,
            POLICY_INGRESS
        ));
    }
}
