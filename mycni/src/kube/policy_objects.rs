//! Pods, Namespaces and NetworkPolicies reduced to what the policy engine reads
//! ([`crate::policy::model`]), and the cache the watches keep them in; pure. Only the
//! projections are kept, not the objects: a pod's status heartbeat that changes none of its
//! labels, IP, node or named ports is no news.
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::watcher::Event;
use mycni_common::policy::{ENFORCE_EGRESS, ENFORCE_INGRESS};

use super::projection::Projection;
use super::WatchCache;
use crate::policy::engine::PodSet;
use crate::policy::model::{
    protocol_number, Labels, NamedPort, Peer, Policy, PolicyPod, PortRef, PortSpec, Requirement,
    Rule, Selector,
};

/// The pods, grouped by (namespace, label set), which is how the engine reads them
/// ([`PodSet`]): an event moves one pod between sets, and a computation walks the sets
/// (a label set per Deployment, say) instead of hashing every pod's labels again. Sets are
/// kept in order so identities are allocated in the same order on every node and run.
#[derive(Debug, Default)]
pub struct PodCache {
    sets: BTreeMap<Arc<PodSetKey>, BTreeMap<String, PolicyPod>>,
    /// Each pod's set, by the pod's key.
    set_of: HashMap<String, Arc<PodSetKey>>,
    relisting: Option<Vec<(String, PolicyPod)>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodSetKey {
    namespace: String,
    labels: Labels,
}

impl PodCache {
    pub fn get(&self, key: &str) -> Option<&PolicyPod> {
        self.sets.get(self.set_of.get(key)?)?.get(key)
    }

    /// The sets, as the engine reads them.
    pub fn pod_sets(&self) -> Vec<PodSet<'_>> {
        self.sets
            .iter()
            .map(|(set, pods)| PodSet {
                namespace: &set.namespace,
                labels: &set.labels,
                pods: pods.values().collect(),
            })
            .collect()
    }

    /// Every pod by key (to compare a re-list with what is cached).
    fn all(&self) -> BTreeMap<&str, &PolicyPod> {
        self.sets
            .values()
            .flat_map(|pods| pods.iter().map(|(key, pod)| (key.as_str(), pod)))
            .collect()
    }

    fn upsert(&mut self, key: String, pod: PolicyPod) -> bool {
        if self.get(&key) == Some(&pod) {
            return false;
        }
        self.remove(&key);
        let wanted = PodSetKey {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
        };
        let set = match self.sets.get_key_value(&wanted) {
            Some((set, _)) => set.clone(),
            None => Arc::new(wanted),
        };
        self.sets
            .entry(set.clone())
            .or_default()
            .insert(key.clone(), pod);
        self.set_of.insert(key, set);
        true
    }

    fn remove(&mut self, key: &str) -> bool {
        let Some(set) = self.set_of.remove(key) else {
            return false;
        };
        if let Some(pods) = self.sets.get_mut(&set) {
            pods.remove(key);
            if pods.is_empty() {
                self.sets.remove(&set);
            }
        }
        true
    }
}

impl WatchCache<Pod> for PodCache {
    fn apply(&mut self, event: Event<Pod>) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(Vec::new());
                false
            }
            Event::InitApply(pod) => {
                if let Some(projected) = PolicyPod::project(&pod) {
                    self.relisting
                        .get_or_insert_with(Vec::new)
                        .push((PolicyPod::key(&pod), projected));
                }
                false
            }
            Event::InitDone => {
                let mut listed = PodCache::default();
                for (key, pod) in self.relisting.take().unwrap_or_default() {
                    listed.upsert(key, pod);
                }
                let changed = listed.all() != self.all();
                *self = listed;
                changed
            }
            Event::Apply(pod) => match PolicyPod::project(&pod) {
                Some(projected) => self.upsert(PolicyPod::key(&pod), projected),
                None => self.remove(&PolicyPod::key(&pod)),
            },
            Event::Delete(pod) => self.remove(&PolicyPod::key(&pod)),
        }
    }

    fn len(&self) -> usize {
        self.set_of.len()
    }
}

fn namespaced_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

impl PolicyPod {
    /// The pod cache's key: `namespace/name`.
    pub fn key(pod: &Pod) -> String {
        namespaced_key(&pod.metadata)
    }
}

impl Projection<Pod> for PolicyPod {
    /// Pods with an IPv4 address, not on the host network (those are the node's address)
    /// and not finished (a finished pod's IP may be another pod's already).
    fn project(pod: &Pod) -> Option<PolicyPod> {
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let ip = status
            .pod_ips
            .iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .chain(status.pod_ip.as_deref())
            .find_map(|text| text.parse::<Ipv4Addr>().ok())?;
        let named_ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.clone()?,
                    port: u16::try_from(p.container_port).ok()?,
                    protocol: protocol_number(p.protocol.as_deref().unwrap_or("TCP"))?,
                })
            })
            .collect();
        Some(PolicyPod {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ip,
            node: spec.node_name.clone().unwrap_or_default(),
            named_ports,
        })
    }
}

/// A namespace's labels (what namespace selectors read).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceLabels(pub Labels);

impl Projection<Namespace> for NamespaceLabels {
    fn project(namespace: &Namespace) -> Option<NamespaceLabels> {
        Some(NamespaceLabels(
            namespace.metadata.labels.clone().unwrap_or_default(),
        ))
    }
}

impl Projection<NetworkPolicy> for Policy {
    fn project(object: &NetworkPolicy) -> Option<Policy> {
        let spec = object.spec.clone().unwrap_or_default();
        let ingress: Vec<Rule> = spec
            .ingress
            .iter()
            .flatten()
            .filter_map(|r| rule(r.from.as_deref(), r.ports.as_deref()))
            .collect();
        let egress_rules = spec.egress.as_deref().unwrap_or_default();
        let egress: Vec<Rule> = egress_rules
            .iter()
            .filter_map(|r| rule(r.to.as_deref(), r.ports.as_deref()))
            .collect();
        // Without policyTypes: Ingress, plus Egress when the policy has egress rules.
        let enforce = match spec.policy_types.as_deref() {
            Some(types) if !types.is_empty() => types.iter().fold(0, |bits, t| match t.as_str() {
                "Ingress" => bits | ENFORCE_INGRESS,
                "Egress" => bits | ENFORCE_EGRESS,
                _ => bits,
            }),
            _ if !egress_rules.is_empty() => ENFORCE_INGRESS | ENFORCE_EGRESS,
            _ => ENFORCE_INGRESS,
        };
        Some(Policy {
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            pod_selector: selector(spec.pod_selector.as_ref()),
            enforce,
            ingress,
            egress,
        })
    }
}

/// A rule; `None` when it lists ports but none the datapath can match (a protocol it does
/// not know): such a rule allows nothing, where an empty port list would allow all.
fn rule(peers: Option<&[NetworkPolicyPeer]>, ports: Option<&[NetworkPolicyPort]>) -> Option<Rule> {
    let ports_given = ports.unwrap_or_default();
    let ports: Vec<PortSpec> = ports_given.iter().filter_map(port).collect();
    if ports.is_empty() && !ports_given.is_empty() {
        return None;
    }
    Some(Rule {
        peers: peers.unwrap_or_default().iter().map(peer).collect(),
        ports,
    })
}

fn port(port: &NetworkPolicyPort) -> Option<PortSpec> {
    let protocol = protocol_number(port.protocol.as_deref().unwrap_or("TCP"))?;
    let port = match &port.port {
        None => PortRef::Any,
        Some(IntOrString::Int(number)) => PortRef::Number(u16::try_from(*number).ok()?),
        Some(IntOrString::String(name)) => PortRef::Name(name.clone()),
    };
    Some(PortSpec { protocol, port })
}

fn peer(peer: &NetworkPolicyPeer) -> Peer {
    if let Some(block) = &peer.ip_block {
        let Some(cidr) = cidr_of(&block.cidr) else {
            return Peer::Nothing;
        };
        let mut except = Vec::new();
        for text in block.except.iter().flatten() {
            match cidr_of(text) {
                Some(e) if e.is_subnet_of(cidr) => except.push(e),
                Some(_) => {}
                // An except the engine cannot read must not widen the block.
                None => return Peer::Nothing,
            }
        }
        return Peer::Block { cidr, except };
    }
    match (&peer.namespace_selector, &peer.pod_selector) {
        (None, None) => Peer::Nothing,
        (namespaces, pods) => Peer::Pods {
            namespaces: namespaces.as_ref().map(|s| selector(Some(s))),
            pods: selector(pods.as_ref()),
        },
    }
}

/// An IPv4 CIDR with its host bits cleared; `None` for IPv6 and malformed ones.
fn cidr_of(text: &str) -> Option<Ipv4Network> {
    let network = text.parse::<Ipv4Network>().ok()?;
    Ipv4Network::new(network.network(), network.prefix()).ok()
}

fn selector(selector: Option<&LabelSelector>) -> Selector {
    let Some(selector) = selector else {
        return Selector::default();
    };
    let expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .map(|r| {
            let values = r.values.clone().unwrap_or_default();
            match r.operator.as_str() {
                "In" => Requirement::In(r.key.clone(), values),
                "NotIn" => Requirement::NotIn(r.key.clone(), values),
                "Exists" => Requirement::Exists(r.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(r.key.clone()),
                _ => Requirement::Invalid,
            }
        })
        .collect();
    Selector {
        match_labels: selector.match_labels.clone().unwrap_or_default(),
        expressions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::projection::ProjectionCache;
    use crate::policy::model::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

    fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).expect("valid JSON for the kind")
    }

    fn pod_json(name: &str, extra_spec: &str, status: &str) -> Pod {
        from_json(&format!(
            r#"{{"metadata":{{"namespace":"default","name":"{name}","labels":{{"app":"web"}}}},
                "spec":{{"nodeName":"n1","containers":[{{"name":"c","ports":[
                    {{"name":"http","containerPort":8080}},
                    {{"name":"dns","containerPort":53,"protocol":"UDP"}},
                    {{"containerPort":9999}}]}}]{extra_spec}}},
                "status":{status}}}"#
        ))
    }

    #[test]
    fn a_pod_keeps_labels_ip_node_and_named_ports() {
        let pod = pod_json(
            "web",
            "",
            r#"{"phase":"Running","podIP":"fd00::5","podIPs":[{"ip":"fd00::5"},{"ip":"10.244.1.5"}]}"#,
        );
        let projected = PolicyPod::project(&pod).expect("kept");
        assert_eq!(PolicyPod::key(&pod), "default/web");
        assert_eq!(projected.ip, Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(projected.node, "n1");
        assert_eq!(projected.labels["app"], "web");
        assert_eq!(projected.named_port("http", PROTO_TCP), Some(8080));
        assert_eq!(projected.named_port("dns", PROTO_UDP), Some(53));
        assert_eq!(projected.named_port("dns", PROTO_TCP), None);
        assert_eq!(projected.named_ports.len(), 2, "unnamed ports are not kept");
    }

    #[test]
    fn host_network_finished_and_addressless_pods_are_left_out() {
        let running = r#"{"phase":"Running","podIP":"10.244.1.5"}"#;
        assert!(PolicyPod::project(&pod_json("a", "", running)).is_some());
        assert!(PolicyPod::project(&pod_json("a", r#","hostNetwork":true"#, running)).is_none());
        let done = r#"{"phase":"Succeeded","podIP":"10.244.1.5"}"#;
        assert!(PolicyPod::project(&pod_json("a", "", done)).is_none());
        assert!(PolicyPod::project(&pod_json("a", "", r#"{"phase":"Pending"}"#)).is_none());
    }

    #[test]
    fn the_cache_reports_only_changes_the_engine_reads() {
        let mut cache = PodCache::default();
        assert!(!cache.apply(Event::Init));
        assert!(!cache.apply(Event::InitDone));
        let pending = pod_json("a", "", r#"{"phase":"Pending"}"#);
        assert!(!cache.apply(Event::Apply(pending)), "no IP yet");
        let running = pod_json("a", "", r#"{"phase":"Running","podIP":"10.244.1.5"}"#);
        assert!(cache.apply(Event::Apply(running.clone())));
        // A status heartbeat (conditions) changes nothing kept.
        let heartbeat = pod_json(
            "a",
            "",
            r#"{"phase":"Running","podIP":"10.244.1.5","conditions":[{"type":"Ready","status":"True"}]}"#,
        );
        assert!(!cache.apply(Event::Apply(heartbeat)));
        let finished = pod_json("a", "", r#"{"phase":"Failed","podIP":"10.244.1.5"}"#);
        assert!(cache.apply(Event::Apply(finished)), "leaves the cache");
        assert!(cache.is_empty());
        assert!(cache.apply(Event::Apply(running.clone())));
        // A re-list of the same pods is no news; one without it is.
        assert!(!cache.apply(Event::Init));
        assert!(!cache.apply(Event::InitApply(running.clone())));
        assert!(!cache.apply(Event::InitDone));
        assert!(!cache.apply(Event::Init));
        assert!(
            cache.get("default/a").is_some(),
            "kept while the re-list runs"
        );
        assert!(cache.apply(Event::InitDone));
        assert!(cache.apply(Event::Apply(running.clone())));
        assert!(cache.apply(Event::Delete(running)));
    }

    fn policy_json(spec: &str) -> Policy {
        let object: NetworkPolicy = from_json(&format!(
            r#"{{"metadata":{{"namespace":"ns","name":"p"}},"spec":{spec}}}"#
        ));
        Policy::project(&object).expect("projected")
    }

    #[test]
    fn pods_are_kept_in_sets_of_one_namespace_and_label_set() {
        let mut cache = PodCache::default();
        let running = r#"{"phase":"Running","podIP":"10.244.1.5"}"#;
        assert!(cache.apply(Event::Apply(pod_json("a", "", running))));
        assert!(cache.apply(Event::Apply(pod_json("b", "", running))));
        let sets = cache.pod_sets();
        assert_eq!(sets.len(), 1, "a and b share app=web in default");
        assert_eq!(sets[0].pods.len(), 2);
        // b is relabelled: it moves to a set of its own; back again, the set goes.
        let mut relabelled = pod_json("b", "", running);
        relabelled.metadata.labels = Some([("app".to_string(), "db".to_string())].into());
        assert!(cache.apply(Event::Apply(relabelled)));
        let sizes: Vec<usize> = cache.pod_sets().iter().map(|s| s.pods.len()).collect();
        assert_eq!(sizes, [1, 1]);
        assert!(cache.apply(Event::Apply(pod_json("b", "", running))));
        assert_eq!(cache.pod_sets().len(), 1);
        assert!(cache.apply(Event::Delete(pod_json("a", "", running))));
        assert!(cache.apply(Event::Delete(pod_json("b", "", running))));
        assert!(cache.pod_sets().is_empty() && cache.is_empty());
    }

    #[test]
    fn policy_types_are_defaulted_as_the_api_documents() {
        let ingress_only = policy_json(r#"{"podSelector":{}}"#);
        assert_eq!(ingress_only.enforce, ENFORCE_INGRESS);
        assert!(ingress_only.ingress.is_empty(), "default deny");
        let with_egress = policy_json(
            r#"{"podSelector":{},"egress":[{"ports":[{"port":53,"protocol":"UDP"}]}]}"#,
        );
        assert_eq!(with_egress.enforce, ENFORCE_INGRESS | ENFORCE_EGRESS);
        let empty_egress = policy_json(r#"{"podSelector":{},"egress":[]}"#);
        assert_eq!(empty_egress.enforce, ENFORCE_INGRESS);
        let egress_only = policy_json(r#"{"podSelector":{},"policyTypes":["Egress"]}"#);
        assert_eq!(egress_only.enforce, ENFORCE_EGRESS);
        let both = policy_json(r#"{"podSelector":{},"policyTypes":["Ingress","Egress"]}"#);
        assert_eq!(both.enforce, ENFORCE_INGRESS | ENFORCE_EGRESS);
    }

    #[test]
    fn peers_and_ports_are_read_with_their_defaults() {
        let p = policy_json(
            r#"{"podSelector":{"matchLabels":{"app":"web"},"matchExpressions":[{"key":"tier","operator":"Exists"}]},
                "ingress":[
                  {"from":[{"podSelector":{"matchLabels":{"role":"client"}}},
                           {"namespaceSelector":{"matchLabels":{"env":"prod"}}},
                           {"namespaceSelector":{},"podSelector":{"matchLabels":{"a":"b"}}},
                           {"ipBlock":{"cidr":"10.1.2.3/16","except":["10.1.128.0/17","10.9.0.0/24"]}},
                           {"ipBlock":{"cidr":"fd00::/64"}}],
                   "ports":[{"port":80},{"port":"http","protocol":"TCP"},{"protocol":"UDP"},{"port":9,"protocol":"SCTP"}]},
                  {}]}"#,
        );
        let rule = &p.ingress[0];
        assert_eq!(
            p.pod_selector.expressions,
            [Requirement::Exists("tier".into())]
        );
        let labels = |k: &str, v: &str| -> Labels { [(k.to_string(), v.to_string())].into() };
        assert_eq!(
            rule.peers,
            [
                Peer::Pods {
                    namespaces: None,
                    pods: Selector {
                        match_labels: labels("role", "client"),
                        expressions: vec![]
                    }
                },
                Peer::Pods {
                    namespaces: Some(Selector {
                        match_labels: labels("env", "prod"),
                        expressions: vec![]
                    }),
                    pods: Selector::default()
                },
                Peer::Pods {
                    namespaces: Some(Selector::default()),
                    pods: Selector {
                        match_labels: labels("a", "b"),
                        expressions: vec![]
                    }
                },
                // Host bits cleared; an except outside the block dropped.
                Peer::Block {
                    cidr: "10.1.0.0/16".parse().unwrap(),
                    except: vec!["10.1.128.0/17".parse().unwrap()]
                },
                Peer::Nothing,
            ]
        );
        assert_eq!(
            rule.ports,
            [
                PortSpec {
                    protocol: PROTO_TCP,
                    port: PortRef::Number(80)
                },
                PortSpec {
                    protocol: PROTO_TCP,
                    port: PortRef::Name("http".into())
                },
                PortSpec {
                    protocol: PROTO_UDP,
                    port: PortRef::Any
                },
                PortSpec {
                    protocol: PROTO_SCTP,
                    port: PortRef::Number(9)
                },
            ]
        );
        assert_eq!(p.ingress[1], Rule::default(), "an empty rule allows all");
    }

    #[test]
    fn a_rule_whose_ports_are_all_unknown_allows_nothing() {
        let p = policy_json(
            r#"{"podSelector":{},"ingress":[{"ports":[{"port":80,"protocol":"ICMP"}]}]}"#,
        );
        assert!(p.ingress.is_empty());
    }

    #[test]
    fn namespaces_keep_their_labels() {
        let ns: Namespace = from_json(r#"{"metadata":{"name":"prod","labels":{"env":"prod"}}}"#);
        assert_eq!(
            NamespaceLabels::project(&ns),
            Some(NamespaceLabels(
                [("env".to_string(), "prod".to_string())].into()
            ))
        );
        // Kept by name, as a cluster-scoped object (no namespace).
        let mut cache = ProjectionCache::<NamespaceLabels>::default();
        assert!(cache.apply(Event::Apply(ns)));
        assert!(cache
            .objects()
            .contains_key(&(String::new(), "prod".to_string())));
    }
}
