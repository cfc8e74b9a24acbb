//! Pure: the `HOST_PORTS` entries one attachment's port mappings become, which of them
//! another attachment holds, and what CHECK finds missing (no I/O; [`super::table`] reads
//! and writes the map).
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use mycni_common::fnv1a64;
use mycni_common::service::{
    Backend, HostPortEntry, ServiceKey, ANY_NODE_ADDRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

use crate::cni::config::PortMapping;

/// `HOST_PORTS` as a map: (hostIP, hostPort, protocol) -> the pod behind it.
pub type HostPortEntries = BTreeMap<ServiceKey, HostPortEntry>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    #[error("hostPort {} is asked for twice, to containerPorts {first} and {second}", describe(.key))]
    Duplicate {
        key: ServiceKey,
        first: u16,
        second: u16,
    },
}

/// The tag of one attachment (container and interface) in `HostPortEntry`: the same hash
/// the host veth's name is made of.
pub fn attachment_hash(container_id: &str, ifname: &str) -> u64 {
    fnv1a64(format!("{container_id}/{ifname}").as_bytes())
}

/// `127.0.0.1:54321/tcp` (`*:54321/tcp` for every node address), for messages.
pub fn describe(key: &ServiceKey) -> String {
    let protocol = match key.protocol {
        PROTO_TCP => "tcp".to_string(),
        PROTO_UDP => "udp".to_string(),
        PROTO_SCTP => "sctp".to_string(),
        other => format!("protocol {other}"),
    };
    if key.address == ANY_NODE_ADDRESS {
        return format!("*:{}/{protocol}", key.port);
    }
    format!("{}:{}/{protocol}", Ipv4Addr::from(key.address), key.port)
}

/// The entries `mappings` become for the pod at `pod_ip`, tagged with `attachment`: one
/// per (hostIP, hostPort, protocol), a hostPort without hostIP (or `0.0.0.0`) keyed once at
/// `ANY_NODE_ADDRESS`, which the datapath serves on every address of the node, those it
/// gains after this ADD included. Two mappings landing on one key must agree on the
/// containerPort.
pub fn plan(
    mappings: &[PortMapping],
    pod_ip: Ipv4Addr,
    attachment: u64,
) -> Result<HostPortEntries, HostPortError> {
    let mut entries = HostPortEntries::new();
    for mapping in mappings {
        let address = mapping.host_ip.map_or(ANY_NODE_ADDRESS, |ip| ip.octets());
        let key = ServiceKey {
            address,
            port: mapping.host_port,
            protocol: mapping.protocol,
            scope: 0,
        };
        let entry = HostPortEntry {
            backend: Backend {
                address: pod_ip.octets(),
                port: mapping.container_port,
                pad: 0,
            },
            attachment_hash: attachment,
        };
        if let Some(first) = entries.insert(key, entry) {
            if first != entry {
                return Err(HostPortError::Duplicate {
                    key,
                    first: first.backend.port,
                    second: mapping.container_port,
                });
            }
        }
    }
    Ok(entries)
}

/// Whether two keys claim a common (address, port, protocol): the same key, or a wildcard
/// and any address on the same port and protocol (as the scheduler's hostPort check and
/// portmap's `0.0.0.0` rule see it).
pub fn overlap(a: &ServiceKey, b: &ServiceKey) -> bool {
    a.port == b.port
        && a.protocol == b.protocol
        && (a.address == b.address
            || a.address == ANY_NODE_ADDRESS
            || b.address == ANY_NODE_ADDRESS)
}

/// The keys of `held` another attachment holds that overlap a planned key, with their
/// entries.
pub fn conflicts(
    planned: &HostPortEntries,
    held: &HostPortEntries,
) -> Vec<(ServiceKey, HostPortEntry)> {
    held.iter()
        .filter(|(key, holder)| {
            planned.iter().any(|(mine, entry)| {
                holder.attachment_hash != entry.attachment_hash && overlap(mine, key)
            })
        })
        .map(|(key, holder)| (*key, *holder))
        .collect()
}

/// The keys `held` lists for `attachment`: what its DEL removes.
pub fn owned_by(held: &HostPortEntries, attachment: u64) -> Vec<ServiceKey> {
    held.iter()
        .filter(|(_, entry)| entry.attachment_hash == attachment)
        .map(|(key, _)| *key)
        .collect()
}

/// Entries whose pod has no `ENDPOINTS` entry: left by a pod whose DEL and address record
/// were both lost (garbage collection removes them). `endpoints` must be read after
/// `held`: ADD writes the endpoint before the hostPorts, so every entry read first has its
/// endpoint unless that pod is being deleted.
pub fn orphaned(held: &HostPortEntries, endpoints: &BTreeSet<Ipv4Addr>) -> Vec<ServiceKey> {
    held.iter()
        .filter(|(_, entry)| !endpoints.contains(&Ipv4Addr::from(entry.backend.address)))
        .map(|(key, _)| *key)
        .collect()
}

/// CHECK: each planned entry `held` lacks or holds otherwise, described.
pub fn differences(planned: &HostPortEntries, held: &HostPortEntries) -> Vec<String> {
    planned
        .iter()
        .filter_map(|(key, entry)| match held.get(key) {
            None => Some(format!("HOST_PORTS has no entry for {}", describe(key))),
            Some(found) if found != entry => Some(format!(
                "HOST_PORTS entry for {} is {}:{} of attachment {:x}, not {}:{} of this one",
                describe(key),
                Ipv4Addr::from(found.backend.address),
                found.backend.port,
                found.attachment_hash,
                Ipv4Addr::from(entry.backend.address),
                entry.backend.port,
            )),
            Some(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 11);
    const OTHER_NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn mapping(host_port: u16, protocol: u8, host_ip: Option<Ipv4Addr>) -> PortMapping {
        PortMapping {
            host_port,
            container_port: 8080,
            protocol,
            host_ip,
        }
    }

    fn key(address: Ipv4Addr, port: u16, protocol: u8) -> ServiceKey {
        ServiceKey {
            address: address.octets(),
            port,
            protocol,
            scope: 0,
        }
    }

    fn keys(entries: &HostPortEntries) -> Vec<String> {
        entries.keys().map(describe).collect()
    }

    #[test]
    fn a_host_port_without_host_ip_is_planned_once_for_every_node_address() {
        let entries = plan(&[mapping(54321, PROTO_TCP, None)], POD, 7).unwrap();
        assert_eq!(keys(&entries), ["*:54321/tcp"]);
        let entry = &entries[&key(Ipv4Addr::UNSPECIFIED, 54321, PROTO_TCP)];
        assert_eq!(entry.backend.address, POD.octets());
        assert_eq!(entry.backend.port, 8080);
        assert_eq!(entry.attachment_hash, 7);
        // An explicit 0.0.0.0 is the same wildcard.
        let explicit = plan(
            &[mapping(54321, PROTO_TCP, Some(Ipv4Addr::UNSPECIFIED))],
            POD,
            7,
        )
        .unwrap();
        assert_eq!(explicit, entries);
    }

    #[test]
    fn a_host_ip_names_its_one_address_and_each_protocol_is_its_own_key() {
        let entries = plan(
            &[
                mapping(54321, PROTO_TCP, Some(Ipv4Addr::LOCALHOST)),
                mapping(54321, PROTO_TCP, Some(NODE)),
                mapping(54321, PROTO_UDP, Some(NODE)),
            ],
            POD,
            7,
        )
        .unwrap();
        assert_eq!(
            keys(&entries),
            [
                "127.0.0.1:54321/tcp",
                "192.168.1.11:54321/tcp",
                "192.168.1.11:54321/udp"
            ]
        );
    }

    #[test]
    fn one_key_asked_for_twice_must_agree_on_the_container_port() {
        let same = [
            mapping(80, PROTO_TCP, Some(NODE)),
            mapping(80, PROTO_TCP, Some(NODE)),
        ];
        assert_eq!(plan(&same, POD, 7).unwrap().len(), 1);
        let mut other = same;
        other[1].container_port = 9090;
        assert_eq!(
            plan(&other, POD, 7),
            Err(HostPortError::Duplicate {
                key: key(NODE, 80, PROTO_TCP),
                first: 8080,
                second: 9090,
            })
        );
    }

    /// The upstream conformance spec's three pods: same hostPort, different hostIP or
    /// protocol, no conflict; a fourth with the first one's triple conflicts, and so does a
    /// wildcard on the port and protocol of any of them.
    #[test]
    fn the_same_triple_or_a_wildcard_over_it_of_another_pod_conflicts() {
        let mut held = HostPortEntries::new();
        let pods = [
            (1, mapping(54321, PROTO_TCP, Some(Ipv4Addr::LOCALHOST))),
            (2, mapping(54321, PROTO_TCP, Some(NODE))),
            (3, mapping(54321, PROTO_UDP, Some(NODE))),
        ];
        for (attachment, mapping) in pods {
            let planned = plan(&[mapping], POD, attachment).unwrap();
            assert!(conflicts(&planned, &held).is_empty(), "pod {attachment}");
            held.extend(planned);
        }
        let fourth = plan(
            &[mapping(54321, PROTO_TCP, Some(Ipv4Addr::LOCALHOST))],
            POD,
            4,
        )
        .unwrap();
        let found = conflicts(&fourth, &held);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, key(Ipv4Addr::LOCALHOST, 54321, PROTO_TCP));
        assert_eq!(found[0].1.attachment_hash, 1);
        // A wildcard overlaps every specific address on its port and protocol.
        let wildcard = plan(&[mapping(54321, PROTO_TCP, None)], POD, 5).unwrap();
        let found: Vec<u64> = conflicts(&wildcard, &held)
            .iter()
            .map(|(_, holder)| holder.attachment_hash)
            .collect();
        assert_eq!(found, [1, 2]);
        let wildcard_udp = plan(&[mapping(54321, PROTO_UDP, None)], POD, 5).unwrap();
        assert_eq!(conflicts(&wildcard_udp, &held).len(), 1);
        // ... and a held wildcard overlaps any address asked for later.
        held.extend(plan(&[mapping(8080, PROTO_TCP, None)], POD, 6).unwrap());
        let specific = plan(
            &[mapping(8080, PROTO_TCP, Some(OTHER_NODE_ADDRESS))],
            POD,
            7,
        )
        .unwrap();
        assert_eq!(conflicts(&specific, &held).len(), 1);
        let other_port = plan(
            &[mapping(8081, PROTO_TCP, Some(OTHER_NODE_ADDRESS))],
            POD,
            7,
        )
        .unwrap();
        assert!(conflicts(&other_port, &held).is_empty());
        // The same attachment again (a retried ADD) is no conflict with itself.
        let again = plan(&[pods[0].1], POD, 1).unwrap();
        assert!(conflicts(&again, &held).is_empty());
    }

    #[test]
    fn del_finds_exactly_its_attachments_keys_and_check_names_what_differs() {
        let mine = plan(
            &[
                mapping(80, PROTO_TCP, None),
                mapping(80, PROTO_TCP, Some(Ipv4Addr::LOCALHOST)),
                mapping(80, PROTO_TCP, Some(NODE)),
            ],
            POD,
            1,
        )
        .unwrap();
        let theirs = plan(&[mapping(81, PROTO_TCP, None)], POD, 2).unwrap();
        let mut held = mine.clone();
        held.extend(theirs);
        assert_eq!(owned_by(&held, 1), mine.keys().copied().collect::<Vec<_>>());
        assert!(differences(&mine, &held).is_empty());

        held.remove(&key(NODE, 80, PROTO_TCP));
        held.entry(key(Ipv4Addr::LOCALHOST, 80, PROTO_TCP))
            .and_modify(|entry| entry.attachment_hash = 2);
        let found = differences(&mine, &held);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("127.0.0.1:80/tcp") && found[0].contains("attachment 2"));
        assert!(found[1].contains("no entry for 192.168.1.11:80/tcp"));
    }

    #[test]
    fn entries_of_pods_without_an_endpoint_are_orphaned() {
        let other_pod = Ipv4Addr::new(10, 244, 1, 6);
        let mut held = plan(&[mapping(80, PROTO_TCP, None)], POD, 1).unwrap();
        held.extend(plan(&[mapping(81, PROTO_TCP, Some(NODE))], other_pod, 2).unwrap());
        let endpoints: BTreeSet<Ipv4Addr> = [POD].into();
        assert_eq!(
            orphaned(&held, &endpoints)
                .iter()
                .map(describe)
                .collect::<Vec<_>>(),
            ["192.168.1.11:81/tcp"]
        );
        assert!(orphaned(&held, &[POD, other_pod].into()).is_empty());
    }

    #[test]
    fn attachments_are_told_apart_by_container_and_interface() {
        assert_eq!(attachment_hash("c", "eth0"), attachment_hash("c", "eth0"));
        assert_ne!(attachment_hash("c", "eth0"), attachment_hash("c", "eth1"));
        assert_ne!(attachment_hash("c", "eth0"), attachment_hash("d", "eth0"));
    }
}
