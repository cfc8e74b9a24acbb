//! The Services datapath's desired state, computed without I/O: from the cached Services
//! and Endpoints ([`crate::kube::services`]) and this node, every frontend (ClusterIP,
//! externalIP, NodePort keyed once at `ANY_NODE_ADDRESS`, which the datapath serves on
//! every address in `NODE_ADDRESSES`) with its flags and its sorted backends
//! ([`frontends`]); then a stable `service_id` per frontend ([`ServiceIds`]), which gives the
//! `SERVICES`/`BACKENDS` contents the adapter writes.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use mycni_common::service::{
    Backend, ServiceEntry, ServiceKey, ANY_NODE_ADDRESS, SERVICE_AFFINITY_CLIENT_IP,
    SERVICE_EXTERNAL_IP, SERVICE_EXTERNAL_LOCAL, SERVICE_NODE_PORT,
};

use crate::kube::services::{KubeEndpoints, KubeService, KubeServicePort, ObjectName};

pub use crate::socket_lb::DesiredServices;

/// The node the agent runs on. (Where its NodePorts answer is not its business: the
/// agent keeps the node's addresses in `NODE_ADDRESSES`, [`crate::node_addresses`].)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// Whose backends an `externalTrafficPolicy: Local` NodePort keeps.
    pub name: String,
}

/// One frontend before it has an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// `SERVICE_*` bits.
    pub flags: u32,
    pub affinity_timeout_s: u32,
    /// Sorted and without duplicates, so an unchanged set compares equal.
    pub backends: Vec<Backend>,
    /// The Service it belongs to.
    pub service: ObjectName,
}

/// Every frontend, and the frontends two Services both claimed (the first Service by
/// namespace and name keeps it; the others are named in `conflicts`, for the log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontends {
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    pub conflicts: Vec<(ServiceKey, ObjectName)>,
}

fn backend(address: Ipv4Addr, port: u16) -> Backend {
    Backend {
        address: address.octets(),
        port,
        pad: 0,
    }
}

/// The ready endpoints of `endpoints` serving `port` (the Endpoints port of the same name
/// and protocol), from `only_node` when given; sorted, without duplicates.
fn backends_of(
    endpoints: Option<&KubeEndpoints>,
    port: &KubeServicePort,
    only_node: Option<&str>,
) -> Vec<Backend> {
    let mut backends: Vec<Backend> = endpoints
        .into_iter()
        .flat_map(|e| e.backends.iter())
        .filter(|b| b.port_name == port.name && b.protocol == port.protocol)
        .filter(|b| only_node.is_none() || b.node_name.as_deref() == only_node)
        .map(|b| backend(b.address, b.port))
        .collect();
    backends.sort();
    backends.dedup();
    backends
}

/// The frontends of every Service on `node`:
/// - the ClusterIP, each externalIP (`SERVICE_EXTERNAL_IP`), and `ANY_NODE_ADDRESS` for a
///   port with a nodePort (`SERVICE_NODE_PORT`: every address of the node, kube-proxy's
///   default `--nodeport-addresses`), per service port;
/// - backends: the ready endpoints of the port with the same name; a NodePort of a Service
///   with `externalTrafficPolicy: Local` keeps only this node's (`SERVICE_EXTERNAL_LOCAL`);
/// - `sessionAffinity: ClientIP` sets `SERVICE_AFFINITY_CLIENT_IP` and the timeout on
///   every frontend of the Service.
pub fn frontends(
    services: &BTreeMap<ObjectName, KubeService>,
    endpoints: &BTreeMap<ObjectName, KubeEndpoints>,
    node: &LocalNode,
) -> Frontends {
    let mut out = Frontends::default();
    for (name, service) in services {
        let (affinity_flag, affinity_timeout_s) = match service.affinity_timeout_s {
            Some(timeout) => (SERVICE_AFFINITY_CLIENT_IP, timeout),
            None => (0, 0),
        };
        let service_endpoints = endpoints.get(name);
        for port in &service.ports {
            let key = |address: Ipv4Addr, port_number: u16| ServiceKey {
                address: address.octets(),
                port: port_number,
                protocol: port.protocol,
                scope: 0,
            };
            let all = backends_of(service_endpoints, port, None);
            let mut add = |key: ServiceKey, flags: u32, backends: Vec<Backend>| {
                if out.frontends.contains_key(&key) {
                    out.conflicts.push((key, name.clone()));
                    return;
                }
                out.frontends.insert(
                    key,
                    Frontend {
                        flags: flags | affinity_flag,
                        affinity_timeout_s,
                        backends,
                        service: name.clone(),
                    },
                );
            };
            add(key(service.cluster_ip, port.port), 0, all.clone());
            for external_ip in &service.external_ips {
                add(
                    key(*external_ip, port.port),
                    SERVICE_EXTERNAL_IP,
                    all.clone(),
                );
            }
            if let Some(node_port) = port.node_port {
                let (flags, backends) = if service.external_local {
                    (
                        SERVICE_NODE_PORT | SERVICE_EXTERNAL_LOCAL,
                        backends_of(service_endpoints, port, Some(&node.name)),
                    )
                } else {
                    (SERVICE_NODE_PORT, all.clone())
                };
                add(
                    key(Ipv4Addr::from(ANY_NODE_ADDRESS), node_port),
                    flags,
                    backends,
                );
            }
        }
    }
    out
}

/// Stable `service_id`s: a frontend keeps its id while it exists; a released id is
/// reused, lowest first, only from the next assignment on, so one write to the maps never
/// deletes an old frontend's backend slots under a new frontend with the same id.
#[derive(Debug, Clone)]
pub struct ServiceIds {
    ids: BTreeMap<ServiceKey, u32>,
    free: BTreeSet<u32>,
    released: Vec<u32>,
    /// The lowest id never handed out.
    next: u32,
}

impl Default for ServiceIds {
    /// Ids from 1: 0 is what an all-zero entry holds.
    fn default() -> ServiceIds {
        ServiceIds::resume([])
    }
}

impl ServiceIds {
    /// Ids continue from what the maps hold (an agent restart keeps every frontend's id,
    /// so it rewrites nothing).
    pub fn resume(existing: impl IntoIterator<Item = (ServiceKey, u32)>) -> ServiceIds {
        let ids: BTreeMap<ServiceKey, u32> = existing.into_iter().collect();
        let next = ids.values().max().map_or(1, |max| max.saturating_add(1));
        let used: BTreeSet<u32> = ids.values().copied().collect();
        let free = (1..next).filter(|id| !used.contains(id)).collect();
        ServiceIds {
            ids,
            free,
            released: Vec::new(),
            next,
        }
    }

    /// The id of each frontend.
    pub fn ids(&self) -> &BTreeMap<ServiceKey, u32> {
        &self.ids
    }

    /// Gives every frontend its id (keeping the ones it had, releasing the ones of
    /// frontends gone) and returns the maps' desired contents.
    pub fn assign(&mut self, frontends: &BTreeMap<ServiceKey, Frontend>) -> DesiredServices {
        self.free.extend(self.released.drain(..));
        let gone: Vec<ServiceKey> = self
            .ids
            .keys()
            .filter(|key| !frontends.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            if let Some(id) = self.ids.remove(&key) {
                self.released.push(id);
            }
        }
        let mut desired = DesiredServices::new();
        for (key, frontend) in frontends {
            let id = match self.ids.get(key) {
                Some(id) => *id,
                None => {
                    let id = match self.free.pop_first() {
                        Some(id) => id,
                        None => {
                            self.next += 1;
                            self.next - 1
                        }
                    };
                    self.ids.insert(*key, id);
                    id
                }
            };
            let entry = ServiceEntry {
                service_id: id,
                backend_count: frontend.backends.len() as u32,
                affinity_timeout_s: frontend.affinity_timeout_s,
                flags: frontend.flags,
            };
            desired.insert(*key, (entry, frontend.backends.clone()));
        }
        desired
    }
}

/// How many frontends and backend slots a desired state holds (for `/metrics`).
pub fn counts(desired: &DesiredServices) -> (usize, usize) {
    (
        desired.len(),
        desired.values().map(|(_, backends)| backends.len()).sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::services::EndpointBackend;
    use mycni_common::service::{PROTO_TCP, PROTO_UDP};

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("an IPv4 address")
    }

    fn name(n: &str) -> ObjectName {
        ("default".to_string(), n.to_string())
    }

    fn port(name: &str, protocol: u8, port: u16, node_port: Option<u16>) -> KubeServicePort {
        KubeServicePort {
            name: name.into(),
            protocol,
            port,
            node_port,
        }
    }

    fn service(cluster_ip: &str, ports: Vec<KubeServicePort>) -> KubeService {
        KubeService {
            cluster_ip: ip(cluster_ip),
            external_ips: vec![],
            ports,
            external_local: false,
            affinity_timeout_s: None,
        }
    }

    fn endpoint(
        port_name: &str,
        protocol: u8,
        address: &str,
        port: u16,
        node: &str,
    ) -> EndpointBackend {
        EndpointBackend {
            port_name: port_name.into(),
            protocol,
            address: ip(address),
            port,
            node_name: Some(node.into()),
        }
    }

    fn key(address: &str, port: u16, protocol: u8) -> ServiceKey {
        ServiceKey {
            address: ip(address).octets(),
            port,
            protocol,
            scope: 0,
        }
    }

    fn node1() -> LocalNode {
        LocalNode {
            name: "node-1".into(),
        }
    }

    /// `web`: http (TCP 80, nodePort 30080) and dns (UDP 53); two ready pods, one per node.
    fn web() -> (
        BTreeMap<ObjectName, KubeService>,
        BTreeMap<ObjectName, KubeEndpoints>,
    ) {
        let services = BTreeMap::from([(
            name("web"),
            service(
                "10.96.0.10",
                vec![
                    port("http", PROTO_TCP, 80, Some(30080)),
                    port("dns", PROTO_UDP, 53, None),
                ],
            ),
        )]);
        let endpoints = BTreeMap::from([(
            name("web"),
            KubeEndpoints {
                backends: vec![
                    endpoint("dns", PROTO_UDP, "10.224.2.5", 5353, "node-2"),
                    endpoint("http", PROTO_TCP, "10.224.2.5", 8080, "node-2"),
                    endpoint("http", PROTO_TCP, "10.224.1.5", 8080, "node-1"),
                    // Another protocol under the same name is another port.
                    endpoint("http", PROTO_UDP, "10.224.1.5", 8081, "node-1"),
                ],
            },
        )]);
        (services, endpoints)
    }

    fn backends(list: &[(&str, u16)]) -> Vec<Backend> {
        list.iter().map(|(a, p)| backend(ip(a), *p)).collect()
    }

    #[test]
    fn each_service_port_gets_its_cluster_ip_and_node_port_frontends() {
        let (services, endpoints) = web();
        let out = frontends(&services, &endpoints, &node1());
        assert!(out.conflicts.is_empty());
        let keys: Vec<ServiceKey> = out.frontends.keys().copied().collect();
        assert_eq!(
            keys,
            [
                // The NodePort once, for every node address.
                key("0.0.0.0", 30080, PROTO_TCP),
                key("10.96.0.10", 53, PROTO_UDP),
                key("10.96.0.10", 80, PROTO_TCP),
            ]
        );
        let http = &out.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert_eq!(http.flags, 0);
        // Sorted by address; the UDP endpoint named "http" is not a TCP backend.
        assert_eq!(
            http.backends,
            backends(&[("10.224.1.5", 8080), ("10.224.2.5", 8080)])
        );
        let dns = &out.frontends[&key("10.96.0.10", 53, PROTO_UDP)];
        assert_eq!(dns.backends, backends(&[("10.224.2.5", 5353)]));
        let node_port = &out.frontends[&key("0.0.0.0", 30080, PROTO_TCP)];
        assert_eq!(node_port.flags, SERVICE_NODE_PORT);
        assert_eq!(node_port.backends, http.backends);
        assert_eq!(node_port.service, name("web"));
    }

    #[test]
    fn external_traffic_policy_local_keeps_this_nodes_backends_on_node_ports() {
        let (mut services, endpoints) = web();
        if let Some(web) = services.get_mut(&name("web")) {
            web.external_local = true;
        }
        let out = frontends(&services, &endpoints, &node1());
        let node_port = &out.frontends[&key("0.0.0.0", 30080, PROTO_TCP)];
        assert_eq!(node_port.flags, SERVICE_NODE_PORT | SERVICE_EXTERNAL_LOCAL);
        assert_eq!(node_port.backends, backends(&[("10.224.1.5", 8080)]));
        // The ClusterIP keeps every backend.
        let cluster = &out.frontends[&key("10.96.0.10", 80, PROTO_TCP)];
        assert_eq!(cluster.backends.len(), 2);
        // On a node without a local backend the NodePort refuses.
        let node3 = LocalNode {
            name: "node-3".into(),
        };
        let out = frontends(&services, &endpoints, &node3);
        let node_port = &out.frontends[&key("0.0.0.0", 30080, PROTO_TCP)];
        assert!(node_port.backends.is_empty());
    }

    #[test]
    fn external_ips_and_affinity_are_flagged() {
        let (mut services, endpoints) = web();
        if let Some(web) = services.get_mut(&name("web")) {
            web.external_ips = vec![ip("203.0.113.7")];
            web.affinity_timeout_s = Some(60);
        }
        let out = frontends(&services, &endpoints, &node1());
        let external = &out.frontends[&key("203.0.113.7", 80, PROTO_TCP)];
        assert_eq!(
            external.flags,
            SERVICE_EXTERNAL_IP | SERVICE_AFFINITY_CLIENT_IP
        );
        assert_eq!(external.affinity_timeout_s, 60);
        assert_eq!(external.backends.len(), 2);
        for frontend in out.frontends.values() {
            assert_eq!(frontend.affinity_timeout_s, 60);
            assert_ne!(frontend.flags & SERVICE_AFFINITY_CLIENT_IP, 0);
        }
    }

    #[test]
    fn ports_match_endpoints_by_name_and_unnamed_ports_match_unnamed_ones() {
        let services = BTreeMap::from([
            (
                name("a"),
                service("10.96.0.20", vec![port("", PROTO_TCP, 80, None)]),
            ),
            (
                name("b"),
                service("10.96.0.21", vec![port("web", PROTO_TCP, 80, None)]),
            ),
        ]);
        let endpoints = BTreeMap::from([
            (
                name("a"),
                KubeEndpoints {
                    backends: vec![endpoint("", PROTO_TCP, "10.224.1.7", 8080, "node-1")],
                },
            ),
            (
                name("b"),
                KubeEndpoints {
                    // A port of another name (a stale or mismatched Endpoints) is no backend.
                    backends: vec![endpoint("http", PROTO_TCP, "10.224.1.8", 8080, "node-1")],
                },
            ),
        ]);
        let out = frontends(&services, &endpoints, &node1());
        assert_eq!(
            out.frontends[&key("10.96.0.20", 80, PROTO_TCP)].backends,
            backends(&[("10.224.1.7", 8080)])
        );
        assert!(out.frontends[&key("10.96.0.21", 80, PROTO_TCP)]
            .backends
            .is_empty());
    }

    #[test]
    fn a_service_without_endpoints_has_frontends_that_refuse() {
        let (services, _) = web();
        let out = frontends(&services, &BTreeMap::new(), &node1());
        assert_eq!(out.frontends.len(), 3);
        assert!(out.frontends.values().all(|f| f.backends.is_empty()));
    }

    #[test]
    fn the_first_service_keeps_a_frontend_two_claim() {
        let mut a = service("10.96.0.30", vec![port("", PROTO_TCP, 80, None)]);
        a.external_ips = vec![ip("203.0.113.9")];
        let mut b = service("10.96.0.31", vec![port("", PROTO_TCP, 80, None)]);
        b.external_ips = vec![ip("203.0.113.9")];
        let services = BTreeMap::from([(name("a"), a), (name("b"), b)]);
        let out = frontends(&services, &BTreeMap::new(), &node1());
        let claimed = key("203.0.113.9", 80, PROTO_TCP);
        assert_eq!(out.frontends[&claimed].service, name("a"));
        assert_eq!(out.conflicts, [(claimed, name("b"))]);
    }

    #[test]
    fn ids_are_stable_and_reused_only_after_a_release() {
        let (services, endpoints) = web();
        let mut ids = ServiceIds::default();
        let first = ids.assign(&frontends(&services, &endpoints, &node1()).frontends);
        let mut numbers: Vec<u32> = first.values().map(|(e, _)| e.service_id).collect();
        numbers.sort();
        assert_eq!(numbers, [1, 2, 3]);
        let http = key("10.96.0.10", 80, PROTO_TCP);
        let (entry, slots) = &first[&http];
        assert_eq!(entry.backend_count, 2);
        assert_eq!(slots.len(), 2);
        // Unchanged input, unchanged output.
        assert_eq!(
            ids.assign(&frontends(&services, &endpoints, &node1()).frontends),
            first
        );
        // The NodePort goes away and another Service comes in the same write: the others
        // keep their ids, and the new frontend does not take the id just released.
        let mut with_other = services.clone();
        if let Some(web) = with_other.get_mut(&name("web")) {
            web.ports[0].node_port = None;
        }
        with_other.insert(
            name("other"),
            service("10.96.0.40", vec![port("", PROTO_TCP, 80, None)]),
        );
        let node_port_id = first[&key("0.0.0.0", 30080, PROTO_TCP)].0.service_id;
        let other = key("10.96.0.40", 80, PROTO_TCP);
        let second = ids.assign(&frontends(&with_other, &endpoints, &node1()).frontends);
        assert_eq!(second[&http].0.service_id, entry.service_id);
        assert_eq!(second[&other].0.service_id, 4);
        // A frontend in a later write does take it.
        let mut with_another = with_other.clone();
        with_another.insert(
            name("another"),
            service("10.96.0.41", vec![port("", PROTO_TCP, 80, None)]),
        );
        let fourth = ids.assign(&frontends(&with_another, &endpoints, &node1()).frontends);
        assert_eq!(
            fourth[&key("10.96.0.41", 80, PROTO_TCP)].0.service_id,
            node_port_id
        );
        assert_eq!(fourth[&other].0.service_id, 4);
        assert_eq!(counts(&fourth), (4, 3));
    }

    #[test]
    fn resumed_ids_keep_what_the_maps_hold() {
        let a = key("10.96.0.10", 80, PROTO_TCP);
        let b = key("10.96.0.11", 80, PROTO_TCP);
        let mut ids = ServiceIds::resume([(a, 7), (b, 3)]);
        let frontend = Frontend {
            flags: 0,
            affinity_timeout_s: 0,
            backends: vec![],
            service: name("a"),
        };
        let c = key("10.96.0.12", 80, PROTO_TCP);
        let desired = ids.assign(&BTreeMap::from([
            (a, frontend.clone()),
            (b, frontend.clone()),
            (c, frontend.clone()),
        ]));
        assert_eq!(desired[&a].0.service_id, 7);
        assert_eq!(desired[&b].0.service_id, 3);
        assert_eq!(
            desired[&c].0.service_id, 1,
            "the lowest id free in the maps"
        );
    }
}
