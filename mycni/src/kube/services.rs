//! Services and Endpoints as the Services datapath needs them, and the agent's caches of
//! them, without I/O. Only a projection of each object is kept (addresses, ports, the
//! few spec fields that change a frontend), so an update that touches nothing else (an
//! annotation, a leader-election renewal on an Endpoints object, a status) changes
//! nothing and wakes nobody.
//!
//! Endpoints v1, not EndpointSlices: the 1.20 API servers mycni supports serve slices only
//! as v1beta1, which k8s-openapi 0.29 no longer has.
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use mycni_common::service::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub use super::projection::{ObjectName, Projection, ProjectionCache};

/// Labels whose presence (any value) hands a Service to another proxy: kube-proxy watches
/// only Services with neither (`service.kubernetes.io/service-proxy-name` names the proxy
/// that serves it; `service.kubernetes.io/headless` marks one that must not be balanced), and
/// mycni in its place does the same.
pub const NOT_OURS_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

/// The API's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// A `protocol` field ("TCP" when absent, as the API defaults it) as an IP protocol
/// number; `None` for a protocol mycni does not balance.
fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

/// A port number from the API's `i32`, when it is one.
fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeServicePort {
    /// Empty for a Service's only, unnamed port.
    pub name: String,
    pub protocol: u8,
    pub port: u16,
    /// Set on NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

/// What the datapath needs of a Service that has frontends. Headless Services
/// (`clusterIP: None`), ExternalName Services, Services without an IPv4 ClusterIP and
/// Services labelled for another proxy ([`NOT_OURS_LABELS`]) have none, and are not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeService {
    pub cluster_ip: Ipv4Addr,
    pub external_ips: Vec<Ipv4Addr>,
    pub ports: Vec<KubeServicePort>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP`'s timeout in seconds; `None` without affinity.
    pub affinity_timeout_s: Option<u32>,
}

impl KubeService {
    /// The projection of `service`, or `None` when it has no frontend to balance.
    pub fn from_service(service: &Service) -> Option<KubeService> {
        let labels = service.metadata.labels.as_ref();
        if NOT_OURS_LABELS
            .iter()
            .any(|label| labels.is_some_and(|labels| labels.contains_key(*label)))
        {
            return None;
        }
        let spec = service.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        // "None" (headless) and "" (not allocated yet) do not parse.
        let cluster_ip = spec.cluster_ip.as_deref()?.parse::<Ipv4Addr>().ok()?;
        let mut external_ips: Vec<Ipv4Addr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        external_ips.sort();
        external_ips.dedup();
        let mut ports: Vec<KubeServicePort> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|port| {
                Some(KubeServicePort {
                    name: port.name.clone().unwrap_or_default(),
                    protocol: protocol_number(port.protocol.as_deref())?,
                    port: port_number(port.port)?,
                    node_port: port.node_port.and_then(port_number),
                })
            })
            .collect();
        ports.sort();
        let affinity_timeout_s =
            (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|config| config.client_ip.as_ref())
                    .and_then(|client_ip| client_ip.timeout_seconds)
                    .and_then(|seconds| u32::try_from(seconds).ok())
                    .filter(|seconds| *seconds > 0)
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
            });
        Some(KubeService {
            cluster_ip,
            external_ips,
            ports,
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            affinity_timeout_s,
        })
    }
}

/// One ready endpoint of one port of an Endpoints object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointBackend {
    /// The Service port's name it serves (empty for an unnamed port).
    pub port_name: String,
    pub protocol: u8,
    pub address: Ipv4Addr,
    /// The pod's port: a `targetPort` by name is already resolved, per pod.
    pub port: u16,
    /// The node the pod runs on, when the controller recorded it.
    pub node_name: Option<String>,
}

/// The ready endpoints of an Endpoints object (never `notReadyAddresses`), sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeEndpoints {
    pub backends: Vec<EndpointBackend>,
}

impl KubeEndpoints {
    pub fn from_endpoints(endpoints: &Endpoints) -> KubeEndpoints {
        let mut backends = Vec::new();
        for subset in endpoints.subsets.iter().flatten() {
            for address in subset.addresses.iter().flatten() {
                let Ok(ip) = address.ip.parse::<Ipv4Addr>() else {
                    continue;
                };
                for port in subset.ports.iter().flatten() {
                    let (Some(protocol), Some(number)) = (
                        protocol_number(port.protocol.as_deref()),
                        port_number(port.port),
                    ) else {
                        continue;
                    };
                    backends.push(EndpointBackend {
                        port_name: port.name.clone().unwrap_or_default(),
                        protocol,
                        address: ip,
                        port: number,
                        node_name: address.node_name.clone(),
                    });
                }
            }
        }
        backends.sort();
        backends.dedup();
        KubeEndpoints { backends }
    }
}

impl Projection<Service> for KubeService {
    fn project(service: &Service) -> Option<KubeService> {
        KubeService::from_service(service)
    }
}

impl Projection<Endpoints> for KubeEndpoints {
    fn project(endpoints: &Endpoints) -> Option<KubeEndpoints> {
        Some(KubeEndpoints::from_endpoints(endpoints))
    }
}

/// The Services with frontends.
pub type ServiceCache = ProjectionCache<KubeService>;
/// The Endpoints objects' ready endpoints.
pub type EndpointsCache = ProjectionCache<KubeEndpoints>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::WatchCache;
    use kube::runtime::watcher::Event;

    fn service(json: &str) -> Service {
        serde_json::from_str(json).expect("a valid Service")
    }

    fn endpoints(json: &str) -> Endpoints {
        serde_json::from_str(json).expect("a valid Endpoints")
    }

    const WEB: &str = r#"{"metadata":{"namespace":"default","name":"web","resourceVersion":"1"},
        "spec":{"type":"NodePort","clusterIP":"10.96.0.10","clusterIPs":["10.96.0.10"],
                "externalIPs":["203.0.113.7","fd00::7","203.0.113.7"],
                "externalTrafficPolicy":"Local",
                "sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":60}},
                "ports":[{"name":"http","port":80,"targetPort":"http","nodePort":30080},
                         {"name":"dns","protocol":"UDP","port":53,"targetPort":5353},
                         {"name":"sctp","protocol":"SCTP","port":9,"targetPort":9}]}}"#;

    #[test]
    fn a_service_gives_its_addresses_ports_and_policies() {
        let web = KubeService::from_service(&service(WEB)).expect("has frontends");
        assert_eq!(web.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(web.external_ips, [Ipv4Addr::new(203, 0, 113, 7)]);
        assert!(web.external_local);
        assert_eq!(web.affinity_timeout_s, Some(60));
        let http = KubeServicePort {
            name: "http".into(),
            protocol: PROTO_TCP,
            port: 80,
            node_port: Some(30080),
        };
        assert!(web.ports.contains(&http));
        let protocols: Vec<u8> = web.ports.iter().map(|p| p.protocol).collect();
        assert_eq!(protocols.len(), 3);
        assert!(protocols.contains(&PROTO_UDP) && protocols.contains(&PROTO_SCTP));
    }

    #[test]
    fn affinity_without_a_timeout_takes_the_apis_default() {
        let json = r#"{"metadata":{"namespace":"a","name":"s"},
            "spec":{"clusterIP":"10.96.0.11","sessionAffinity":"ClientIP","ports":[{"port":80}]}}"#;
        let s = KubeService::from_service(&service(json)).expect("frontends");
        assert_eq!(s.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
        assert!(!s.external_local);
        assert_eq!(s.ports[0].name, "");
        assert_eq!(s.ports[0].protocol, PROTO_TCP, "TCP when absent");
        let none = r#"{"metadata":{"namespace":"a","name":"s"},
            "spec":{"clusterIP":"10.96.0.11","sessionAffinity":"None","ports":[{"port":80}]}}"#;
        assert_eq!(
            KubeService::from_service(&service(none)).and_then(|s| s.affinity_timeout_s),
            None
        );
    }

    #[test]
    fn headless_external_name_and_unallocated_services_have_no_frontend() {
        for spec in [
            r#"{"clusterIP":"None","ports":[{"port":80}]}"#,
            r#"{"type":"ExternalName","externalName":"example.org"}"#,
            r#"{"type":"ExternalName","clusterIP":"10.96.0.9","externalName":"example.org"}"#,
            r#"{"clusterIP":"","ports":[{"port":80}]}"#,
            r#"{"clusterIP":"fd00::1","ports":[{"port":80}]}"#,
        ] {
            let json = format!(r#"{{"metadata":{{"namespace":"a","name":"s"}},"spec":{spec}}}"#);
            assert_eq!(KubeService::from_service(&service(&json)), None, "{spec}");
        }
    }

    #[test]
    fn services_labelled_for_another_proxy_have_no_frontend() {
        for label in NOT_OURS_LABELS {
            for value in ["", "foo-bar"] {
                let labelled = WEB.replace(
                    r#""name":"web","#,
                    &format!(r#""name":"web","labels":{{"{label}":"{value}","app":"web"}},"#),
                );
                assert_ne!(labelled, WEB);
                assert_eq!(
                    KubeService::from_service(&service(&labelled)),
                    None,
                    "{label}={value}"
                );
            }
        }
        let other = WEB.replace(
            r#""name":"web","#,
            r#""name":"web","labels":{"service.kubernetes.io/topology":"x"},"#,
        );
        assert!(KubeService::from_service(&service(&other)).is_some());
        // Labelled later: the Service leaves the cache, and comes back when unlabelled.
        let mut cache = ServiceCache::default();
        assert!(cache.apply(Event::Apply(service(WEB))));
        let labelled = WEB.replace(
            r#""name":"web","#,
            r#""name":"web","labels":{"service.kubernetes.io/headless":""},"#,
        );
        assert!(cache.apply(Event::Apply(service(&labelled))));
        assert!(cache.is_empty());
        assert!(cache.apply(Event::Apply(service(WEB))));
        assert_eq!(cache.len(), 1);
    }

    const WEB_ENDPOINTS: &str = r#"{"metadata":{"namespace":"default","name":"web"},
        "subsets":[{"addresses":[{"ip":"10.224.1.5","nodeName":"node-1"},{"ip":"10.224.2.5","nodeName":"node-2"}],
                    "notReadyAddresses":[{"ip":"10.224.1.9","nodeName":"node-1"}],
                    "ports":[{"name":"http","port":8080},{"name":"dns","port":5353,"protocol":"UDP"}]},
                   {"addresses":[{"ip":"10.224.1.6","nodeName":"node-1"}],
                    "ports":[{"name":"http","port":9090}]}]}"#;

    #[test]
    fn endpoints_keep_ready_addresses_per_port() {
        let kept = KubeEndpoints::from_endpoints(&endpoints(WEB_ENDPOINTS));
        let rows: Vec<(String, u8, String, u16)> = kept
            .backends
            .iter()
            .map(|b| {
                (
                    b.port_name.clone(),
                    b.protocol,
                    b.address.to_string(),
                    b.port,
                )
            })
            .collect();
        let row = |n: &str, p, a: &str, port| (n.to_string(), p, a.to_string(), port);
        assert_eq!(
            rows,
            [
                row("dns", PROTO_UDP, "10.224.1.5", 5353),
                row("dns", PROTO_UDP, "10.224.2.5", 5353),
                row("http", PROTO_TCP, "10.224.1.5", 8080),
                // A second subset: pods whose named port resolved to another number.
                row("http", PROTO_TCP, "10.224.1.6", 9090),
                row("http", PROTO_TCP, "10.224.2.5", 8080),
            ]
        );
        assert!(
            !kept
                .backends
                .iter()
                .any(|b| b.address == Ipv4Addr::new(10, 224, 1, 9)),
            "not ready"
        );
        assert_eq!(kept.backends[0].node_name.as_deref(), Some("node-1"));
    }

    fn listed<K: kube::Resource, C: WatchCache<K>>(cache: &mut C, objects: Vec<K>) -> bool {
        assert!(!cache.apply(Event::Init));
        for object in objects {
            assert!(!cache.apply(Event::InitApply(object)));
        }
        cache.apply(Event::InitDone)
    }

    #[test]
    fn only_changes_to_the_projection_are_news() {
        let mut cache = EndpointsCache::default();
        assert!(listed(&mut cache, vec![endpoints(WEB_ENDPOINTS)]));
        assert!(
            !listed(&mut cache, vec![endpoints(WEB_ENDPOINTS)]),
            "same list"
        );
        // A leader-election renewal: annotations only.
        let renewed = WEB_ENDPOINTS.replace(
            r#""name":"web"}"#,
            r#""name":"web","annotations":{"renew":"12:00:01"}}"#,
        );
        assert!(!cache.apply(Event::Apply(endpoints(&renewed))));
        // A pod turns unready.
        let unready = WEB_ENDPOINTS.replace(
            r#"{"ip":"10.224.1.6","nodeName":"node-1"}"#,
            r#"{"ip":"10.224.1.7","nodeName":"node-1"}"#,
        );
        assert!(cache.apply(Event::Apply(endpoints(&unready))));
        assert!(cache.apply(Event::Delete(endpoints(&unready))));
        assert!(
            !cache.apply(Event::Delete(endpoints(&unready))),
            "gone already"
        );
        assert!(cache.objects().is_empty());
    }

    #[test]
    fn services_that_lose_their_frontends_leave_the_cache() {
        let mut cache = ServiceCache::default();
        assert!(cache.apply(Event::Apply(service(WEB))));
        assert_eq!(cache.len(), 1);
        let key = ("default".to_string(), "web".to_string());
        assert!(cache.objects().contains_key(&key));
        let headless = WEB.replace(r#""clusterIP":"10.96.0.10""#, r#""clusterIP":"None""#);
        assert!(cache.apply(Event::Apply(service(&headless))));
        assert!(cache.is_empty());
        assert!(!cache.apply(Event::Apply(service(&headless))));
    }

    #[test]
    fn the_old_list_stays_until_a_relist_completes() {
        let mut cache = ServiceCache::default();
        assert!(listed(&mut cache, vec![service(WEB)]));
        assert!(!cache.apply(Event::Init));
        assert_eq!(cache.len(), 1, "kept while the list runs");
        assert!(listed(&mut cache, vec![]));
        assert!(cache.is_empty());
    }
}
