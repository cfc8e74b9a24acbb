//! The policy engine, pure: from the cluster's pods, namespaces and policies and the
//! nodes' addresses to the desired contents of `POLICY_ENDPOINTS`, `POLICY_IDENTITIES` and
//! `POLICY` on this node (see `mycni_common::policy` for how the datapath reads them).
//!
//! Cost of one computation: one pass over the (namespace, label set)s the pod cache keeps
//! (an identity lookup each; when the policies here name CIDRs, a CIDR lookup per pod
//! too), one pass over the identities per peer of the policies that select a pod on this
//! node, and the rules of those policies times this node's pods. Nothing is proportional
//! to pods × policies. Measured by `policy_at_cluster_scale` below.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use mycni_common::policy::{
    identity, PolicyEndpoint, PolicyKey, ENFORCE_EGRESS, ENFORCE_INGRESS, POLICY_EGRESS,
    POLICY_INGRESS,
};

use super::identity::{IdentityAllocator, IdentityKey};
use super::model::{Labels, Peer, Policy, PolicyPod, PortRef, Rule};
use crate::policy_maps::PolicyDesired;

/// Pods of one namespace and label set: the pod cache keeps them grouped so, and the engine
/// walks these sets (thousands) rather than the pods (a hundred thousand) to find
/// identities.
#[derive(Debug, Clone)]
pub struct PodSet<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
    pub pods: Vec<&'a PolicyPod>,
}

/// `pods` grouped by (namespace, label set), as the agent's pod cache keeps them: for
/// callers that hold a plain list (tests, benchmarks).
pub fn pod_sets(pods: &[PolicyPod]) -> Vec<PodSet<'_>> {
    let mut sets: BTreeMap<(&str, &Labels), Vec<&PolicyPod>> = BTreeMap::new();
    for pod in pods {
        sets.entry((pod.namespace.as_str(), &pod.labels))
            .or_default()
            .push(pod);
    }
    sets.into_iter()
        .map(|((namespace, labels), pods)| PodSet {
            namespace,
            labels,
            pods,
        })
        .collect()
}

/// What the engine reads. Pods are every pod of the cluster (peers are cluster-wide), in
/// sets of one (namespace, label set) each.
#[derive(Debug, Clone, Default)]
pub struct PolicyWorld<'a> {
    pub node_name: &'a str,
    /// This node's own addresses: peers with identity `HOST`.
    pub host_addresses: Vec<Ipv4Addr>,
    /// The other nodes' addresses: `REMOTE_NODE` unless a policy CIDR covers them.
    pub remote_node_addresses: Vec<Ipv4Addr>,
    pub pod_sets: Vec<PodSet<'a>>,
    /// Namespace labels by name; a namespace not listed has none.
    pub namespaces: HashMap<&'a str, &'a Labels>,
    pub policies: Vec<&'a Policy>,
}

/// A local pod some policy selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedEndpoint {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub enforce: u8,
    /// `namespace/name` of every policy that selects it, sorted.
    pub policies: Vec<String>,
}

/// A computation's result: the maps, and what `mycni-agent policy` explains them with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyOutcome {
    pub desired: PolicyDesired,
    pub endpoints: Vec<SelectedEndpoint>,
    /// What each allocated identity the endpoints' rules and the endpoints name stands for.
    pub identities: BTreeMap<u32, IdentityKey>,
}

/// Pods that share an identity, or the addresses of one CIDR-set identity.
struct Group<'a> {
    id: u32,
    /// `None` for a CIDR-set identity (no pods).
    namespace: Option<&'a str>,
    labels: Option<&'a Labels>,
    cidrs: Vec<Ipv4Network>,
    pods: Vec<&'a PolicyPod>,
}

/// The peers one rule allows, independent of the endpoint it is applied to.
struct ResolvedPeers {
    any: bool,
    /// Indices into the groups.
    groups: BTreeSet<usize>,
    host: bool,
}

/// The CIDRs the policies mention, looked up by prefix length: the ones containing an
/// address cost one set lookup per distinct length, not one test per CIDR.
struct MentionedCidrs {
    /// Sorted: the identity keys list them in this order.
    cidrs: BTreeSet<Ipv4Network>,
    /// Distinct prefix lengths, shortest first.
    lengths: Vec<u8>,
}

impl MentionedCidrs {
    fn is_empty(&self) -> bool {
        self.cidrs.is_empty()
    }
}

impl MentionedCidrs {
    fn new(cidrs: impl Iterator<Item = Ipv4Network>) -> MentionedCidrs {
        let cidrs: BTreeSet<Ipv4Network> = cidrs.collect();
        let lengths: BTreeSet<u8> = cidrs.iter().map(|c| c.prefix()).collect();
        MentionedCidrs {
            cidrs,
            lengths: lengths.into_iter().collect(),
        }
    }

    /// The mentioned CIDRs that contain `ip`, sorted.
    fn containing(&self, ip: Ipv4Addr) -> Vec<Ipv4Network> {
        let mut found: Vec<Ipv4Network> = self
            .lengths
            .iter()
            .filter_map(|&len| {
                let masked = Ipv4Network::new(ip, len).ok()?;
                let network = Ipv4Network::new(masked.network(), len).ok()?;
                self.cidrs.contains(&network).then_some(network)
            })
            .collect();
        found.sort();
        found
    }

    /// The mentioned CIDRs that contain all of `inner` (itself included), sorted.
    fn containing_cidr(&self, inner: Ipv4Network) -> Vec<Ipv4Network> {
        let mut found = self.containing(inner.network());
        found.retain(|outer| outer.prefix() <= inner.prefix());
        found
    }
}

/// Keeps the identity allocator between computations, so identities stay stable.
#[derive(Debug, Default)]
pub struct PolicyEngine {
    identities: IdentityAllocator,
}

impl PolicyEngine {
    pub fn compute(&mut self, world: &PolicyWorld) -> PolicyOutcome {
        self.identities.begin_round();
        let outcome = Computation::new(world, &mut self.identities).finish();
        self.identities.end_round();
        outcome
    }

    /// How many identities are allocated.
    pub fn identity_count(&self) -> usize {
        self.identities.len()
    }
}

struct Computation<'w, 'a> {
    world: &'w PolicyWorld<'a>,
    /// Local pods some policy selects, with those policies.
    selected: Vec<(&'a PolicyPod, Vec<&'a Policy>)>,
    groups: Vec<Group<'a>>,
    /// The identity of each pod of this node, by IP.
    local_identities: HashMap<Ipv4Addr, u32>,
    identities: BTreeMap<Ipv4Network, u32>,
}

impl<'w, 'a> Computation<'w, 'a> {
    fn new(world: &'w PolicyWorld<'a>, allocator: &mut IdentityAllocator) -> Self {
        let mut by_namespace: HashMap<&str, Vec<&'a Policy>> = HashMap::new();
        for &policy in &world.policies {
            by_namespace
                .entry(policy.namespace.as_str())
                .or_default()
                .push(policy);
        }
        let is_local = |pod: &PolicyPod| pod.node == world.node_name;
        let mut selected: Vec<(&'a PolicyPod, Vec<&'a Policy>)> = Vec::new();
        for set in world
            .pod_sets
            .iter()
            .filter(|set| set.pods.iter().any(|p| is_local(p)))
        {
            // Selectors are evaluated once per label set, not per pod.
            let policies: Vec<&'a Policy> = by_namespace
                .get(set.namespace)
                .into_iter()
                .flatten()
                .copied()
                .filter(|policy| policy.pod_selector.matches(set.labels))
                .collect();
            if !policies.is_empty() {
                for &pod in set.pods.iter().filter(|p| is_local(p)) {
                    selected.push((pod, policies.clone()));
                }
            }
        }
        // Only the CIDRs of policies that matter here shape identities.
        let mentioned = MentionedCidrs::new(
            selected
                .iter()
                .flat_map(|(_, policies)| policies)
                .flat_map(|policy| policy.cidrs()),
        );
        let mut groups: Vec<Group<'a>> = Vec::new();
        let mut local_identities = HashMap::new();
        let mut identities = BTreeMap::new();
        for set in &world.pod_sets {
            // A label set's pods share an identity, split by the policy CIDRs they are in.
            let partitions: Vec<(Vec<Ipv4Network>, Vec<&'a PolicyPod>)> = if mentioned.is_empty() {
                vec![(Vec::new(), set.pods.clone())]
            } else {
                let mut by_cidrs: BTreeMap<Vec<Ipv4Network>, Vec<&'a PolicyPod>> = BTreeMap::new();
                for &pod in &set.pods {
                    by_cidrs
                        .entry(mentioned.containing(pod.ip))
                        .or_default()
                        .push(pod);
                }
                by_cidrs.into_iter().collect()
            };
            for (cidrs, pods) in partitions {
                let id = allocator.get_or_allocate(&IdentityKey::Pods {
                    namespace: set.namespace.to_string(),
                    labels: set.labels.clone(),
                    cidrs: cidrs.clone(),
                });
                for pod in pods.iter().filter(|p| is_local(p)) {
                    local_identities.insert(pod.ip, id);
                }
                groups.push(Group {
                    id,
                    namespace: Some(set.namespace),
                    labels: Some(set.labels),
                    cidrs,
                    pods,
                });
            }
        }
        // Every mentioned CIDR: the addresses in it that no longer prefix covers are in
        // exactly the mentioned CIDRs that contain it (CIDRs nest or are disjoint).
        for &cidr in &mentioned.cidrs {
            let containing = mentioned.containing_cidr(cidr);
            let key = IdentityKey::Cidrs(containing.clone());
            let id = allocator.get_or_allocate(&key);
            groups.push(Group {
                id,
                namespace: None,
                labels: None,
                cidrs: containing,
                pods: Vec::new(),
            });
            identities.insert(cidr, id);
        }
        // Another node's address inside a policy CIDR keeps that CIDR's identity, so an
        // ipBlock allows it; outside every one, it is a remote node.
        for &ip in &world.remote_node_addresses {
            if mentioned.containing(ip).is_empty() {
                identities.insert(Ipv4Network::from(ip), identity::REMOTE_NODE);
            }
        }
        for &ip in &world.host_addresses {
            identities.insert(Ipv4Network::from(ip), identity::HOST);
        }
        Computation {
            world,
            selected,
            groups,
            local_identities,
            identities,
        }
    }

    /// The groups (and the host) a peer of `policy` covers.
    fn resolve_peer(&self, policy: &Policy, peer: &Peer, into: &mut ResolvedPeers) {
        match peer {
            Peer::Pods { namespaces, pods } => {
                for (index, group) in self.groups.iter().enumerate() {
                    let (Some(namespace), Some(labels)) = (group.namespace, group.labels) else {
                        continue;
                    };
                    let namespace_matches = match namespaces {
                        None => namespace == policy.namespace,
                        Some(selector) => {
                            let empty = Labels::new();
                            let labels = self.world.namespaces.get(namespace).copied();
                            selector.matches(labels.unwrap_or(&empty))
                        }
                    };
                    if namespace_matches && pods.matches(labels) {
                        into.groups.insert(index);
                    }
                }
            }
            Peer::Block { cidr, except } => {
                // Exact for every address with an identity: it is in the block iff the
                // block's CIDR is in its set and none of the excepts is.
                for (index, group) in self.groups.iter().enumerate() {
                    if group.cidrs.contains(cidr) && !except.iter().any(|e| group.cidrs.contains(e))
                    {
                        into.groups.insert(index);
                    }
                }
                let in_block =
                    |ip: Ipv4Addr| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip));
                if self.world.host_addresses.iter().any(|&ip| in_block(ip)) {
                    into.host = true;
                }
            }
            Peer::Nothing => {}
        }
    }

    fn resolve_rule(&self, policy: &Policy, rule: &Rule) -> ResolvedPeers {
        let mut resolved = ResolvedPeers {
            any: rule.peers.is_empty(),
            groups: BTreeSet::new(),
            host: false,
        };
        for peer in &rule.peers {
            self.resolve_peer(policy, peer, &mut resolved);
        }
        resolved
    }

    /// The (identity, port, protocol) triples one rule allows `endpoint`.
    fn rule_keys(
        &self,
        endpoint: &PolicyPod,
        rule: &Rule,
        peers: &ResolvedPeers,
        direction: u8,
    ) -> BTreeSet<(u32, u16, u8)> {
        let ids: Vec<u32> = if peers.any {
            vec![identity::ANY]
        } else {
            peers
                .groups
                .iter()
                .map(|&g| self.groups[g].id)
                .chain(peers.host.then_some(identity::HOST))
                .collect()
        };
        let mut keys = BTreeSet::new();
        if rule.ports.is_empty() {
            keys.extend(ids.iter().map(|&id| (id, 0, 0)));
            return keys;
        }
        for spec in &rule.ports {
            let port = match &spec.port {
                PortRef::Any => 0,
                PortRef::Number(port) => *port,
                // A name is the destination's: this pod's own port for ingress.
                PortRef::Name(name) if direction == POLICY_INGRESS => {
                    match endpoint.named_port(name, spec.protocol) {
                        Some(port) => port,
                        None => continue,
                    }
                }
                // For egress each peer pod's own: resolved per identity (pods that share
                // one and number the name differently allow each other's numbers).
                PortRef::Name(name) => {
                    let groups: Box<dyn Iterator<Item = &Group>> = if peers.any {
                        Box::new(self.groups.iter())
                    } else {
                        Box::new(peers.groups.iter().map(|&g| &self.groups[g]))
                    };
                    for group in groups {
                        for pod in &group.pods {
                            if let Some(port) = pod.named_port(name, spec.protocol) {
                                keys.insert((group.id, port, spec.protocol));
                            }
                        }
                    }
                    continue;
                }
            };
            keys.extend(ids.iter().map(|&id| (id, port, spec.protocol)));
        }
        keys
    }

    /// The /32 of every pod whose identity a rule names. Any other pod is left to the CIDR
    /// entries, which give it the identity of its CIDR set (or `WORLD`): no rule names its
    /// pod identity, and a block allows that CIDR set exactly when it allows the pod's, so
    /// the decision is the same and the trie holds only the pods policies here talk about
    /// (none at all when no pod of this node is selected).
    fn add_peer_pods(&self, desired: &mut PolicyDesired) {
        if desired.endpoints.is_empty() {
            desired.identities.clear();
            return;
        }
        let named: HashSet<u32> = desired.rules.keys().map(|k| k.peer_identity).collect();
        for group in self.groups.iter().filter(|g| named.contains(&g.id)) {
            for pod in &group.pods {
                // A pod's /32 is more exact than a /32 policy CIDR on the same address;
                // never over the node's own (host-network pods are not in the list).
                if !self.world.host_addresses.contains(&pod.ip) {
                    desired
                        .identities
                        .insert(Ipv4Network::from(pod.ip), group.id);
                }
            }
        }
    }

    fn finish(mut self) -> PolicyOutcome {
        let mut desired = PolicyDesired {
            identities: std::mem::take(&mut self.identities),
            ..PolicyDesired::default()
        };
        let mut endpoints = Vec::new();
        // Rules resolved once per policy, whatever the number of pods it selects here.
        type BothDirections = (Vec<ResolvedPeers>, Vec<ResolvedPeers>);
        let mut resolved: HashMap<(&str, &str), BothDirections> = HashMap::new();
        for (pod, policies) in &self.selected {
            let identity = self
                .local_identities
                .get(&pod.ip)
                .copied()
                .unwrap_or(identity::WORLD);
            let mut enforce = 0;
            for policy in policies {
                enforce |= policy.enforce;
                let (ingress, egress) = resolved
                    .entry((policy.namespace.as_str(), policy.name.as_str()))
                    .or_insert_with(|| {
                        let resolve = |rules: &[Rule]| -> Vec<ResolvedPeers> {
                            rules.iter().map(|r| self.resolve_rule(policy, r)).collect()
                        };
                        (resolve(&policy.ingress), resolve(&policy.egress))
                    });
                let directions = [
                    (ENFORCE_INGRESS, POLICY_INGRESS, &policy.ingress, &*ingress),
                    (ENFORCE_EGRESS, POLICY_EGRESS, &policy.egress, &*egress),
                ];
                for (bit, direction, rules, peers) in directions {
                    if policy.enforce & bit == 0 {
                        continue;
                    }
                    for (rule, peers) in rules.iter().zip(peers) {
                        for (peer_identity, port, protocol) in
                            self.rule_keys(pod, rule, peers, direction)
                        {
                            let key = PolicyKey {
                                endpoint: pod.ip.octets(),
                                peer_identity,
                                port,
                                protocol,
                                direction,
                            };
                            desired.rules.entry(key).or_default().rules += 1;
                        }
                    }
                }
            }
            if enforce & ENFORCE_INGRESS != 0 {
                // The kubelet probes pods from the node: upstream expects probes to keep
                // working under a default-deny ingress policy. `rules` 0 marks this
                // implicit allow (no policy rule names it).
                let key = PolicyKey {
                    endpoint: pod.ip.octets(),
                    peer_identity: identity::HOST,
                    port: 0,
                    protocol: 0,
                    direction: POLICY_INGRESS,
                };
                desired.rules.entry(key).or_default();
            }
            desired.endpoints.insert(
                pod.ip,
                PolicyEndpoint {
                    identity,
                    enforce,
                    pad: [0; 3],
                },
            );
            let mut names: Vec<String> = policies.iter().map(|p| p.full_name()).collect();
            names.sort();
            endpoints.push(SelectedEndpoint {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ip: pod.ip,
                identity,
                enforce,
                policies: names,
            });
        }
        endpoints.sort_by_key(|e| e.ip);
        self.add_peer_pods(&mut desired);
        let named: BTreeSet<u32> = desired
            .rules
            .keys()
            .map(|key| key.peer_identity)
            .chain(endpoints.iter().map(|e| e.identity))
            .filter(|&id| id >= identity::FIRST_ALLOCATED)
            .collect();
        let identities = self
            .groups
            .iter()
            .filter(|group| named.contains(&group.id))
            .map(|group| {
                let key = match (group.namespace, group.labels) {
                    (Some(namespace), Some(labels)) => IdentityKey::Pods {
                        namespace: namespace.to_string(),
                        labels: labels.clone(),
                        cidrs: group.cidrs.clone(),
                    },
                    _ => IdentityKey::Cidrs(group.cidrs.clone()),
                };
                (group.id, key)
            })
            .collect();
        PolicyOutcome {
            desired,
            endpoints,
            identities,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::NamedPort;
    use crate::policy::model::{PortSpec, Requirement, Selector, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
    use identity::{ANY, HOST, REMOTE_NODE, WORLD};

    const NODE: &str = "n1";
    const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 11);
    const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 12);

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> Selector {
        Selector {
            match_labels: labels(pairs),
            expressions: vec![],
        }
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("an address")
    }

    fn net(text: &str) -> Ipv4Network {
        text.parse().expect("a CIDR")
    }

    fn pod(
        namespace: &str,
        name: &str,
        pairs: &[(&str, &str)],
        addr: &str,
        node: &str,
    ) -> PolicyPod {
        PolicyPod {
            namespace: namespace.into(),
            name: name.into(),
            labels: labels(pairs),
            ip: ip(addr),
            node: node.into(),
            named_ports: vec![],
        }
    }

    fn with_port(mut pod: PolicyPod, name: &str, port: u16, protocol: u8) -> PolicyPod {
        pod.named_ports.push(NamedPort {
            name: name.into(),
            port,
            protocol,
        });
        pod
    }

    fn policy(namespace: &str, name: &str, selector: Selector, enforce: u8) -> Policy {
        Policy {
            namespace: namespace.into(),
            name: name.into(),
            pod_selector: selector,
            enforce,
            ingress: vec![],
            egress: vec![],
        }
    }

    fn rule(peers: Vec<Peer>, ports: Vec<PortSpec>) -> Rule {
        Rule { peers, ports }
    }

    fn tcp(port: u16) -> PortSpec {
        PortSpec {
            protocol: PROTO_TCP,
            port: PortRef::Number(port),
        }
    }

    fn pods_peer(pairs: &[(&str, &str)]) -> Peer {
        Peer::Pods {
            namespaces: None,
            pods: sel(pairs),
        }
    }

    pub(super) use super::pod_sets;

    struct Cluster {
        pods: Vec<PolicyPod>,
        namespaces: Vec<(String, Labels)>,
        policies: Vec<Policy>,
    }

    impl Cluster {
        fn new(pods: Vec<PolicyPod>, policies: Vec<Policy>) -> Cluster {
            Cluster {
                pods,
                namespaces: vec![],
                policies,
            }
        }

        fn world(&self) -> PolicyWorld<'_> {
            PolicyWorld {
                node_name: NODE,
                host_addresses: vec![HOST_IP],
                remote_node_addresses: vec![REMOTE_IP],
                pod_sets: pod_sets(&self.pods),
                namespaces: self
                    .namespaces
                    .iter()
                    .map(|(name, labels)| (name.as_str(), labels))
                    .collect(),
                policies: self.policies.iter().collect(),
            }
        }

        fn compute(&self) -> PolicyOutcome {
            PolicyEngine::default().compute(&self.world())
        }
    }

    /// The identity the datapath finds for `addr`: the longest prefix holding it, else WORLD.
    fn id_of(outcome: &PolicyOutcome, addr: &str) -> u32 {
        let addr = ip(addr);
        outcome
            .desired
            .identities
            .iter()
            .filter(|(cidr, _)| cidr.contains(addr))
            .max_by_key(|(cidr, _)| cidr.prefix())
            .map_or(WORLD, |(_, &id)| id)
    }

    /// The (identity, port, protocol, rules) the endpoint is allowed in `direction`.
    fn allowed(outcome: &PolicyOutcome, endpoint: &str, direction: u8) -> Vec<(u32, u16, u8, u32)> {
        outcome
            .desired
            .rules
            .iter()
            .filter(|(key, _)| key.endpoint == ip(endpoint).octets() && key.direction == direction)
            .map(|(key, entry)| (key.peer_identity, key.port, key.protocol, entry.rules))
            .collect()
    }

    fn enforce(outcome: &PolicyOutcome, endpoint: &str) -> Option<u8> {
        outcome
            .desired
            .endpoints
            .get(&ip(endpoint))
            .map(|e| e.enforce)
    }

    const HOST_PROBES: (u32, u16, u8, u32) = (HOST, 0, 0, 0);

    #[test]
    fn pods_no_policy_selects_have_no_endpoint_entry_and_unnamed_ones_no_trie_entry() {
        let cluster = Cluster::new(
            vec![
                pod("default", "web", &[("app", "web")], "10.244.1.5", NODE),
                pod("default", "db", &[("app", "db")], "10.244.1.6", NODE),
            ],
            vec![policy(
                "default",
                "deny",
                sel(&[("app", "db")]),
                ENFORCE_INGRESS,
            )],
        );
        let outcome = cluster.compute();
        assert_eq!(enforce(&outcome, "10.244.1.5"), None);
        assert_eq!(enforce(&outcome, "10.244.1.6"), Some(ENFORCE_INGRESS));
        let db = outcome.desired.endpoints[&ip("10.244.1.6")].identity;
        assert!(db >= identity::FIRST_ALLOCATED);
        // No rule names web's identity: no entry of its own, it is WORLD to the datapath.
        assert_eq!(id_of(&outcome, "10.244.1.5"), WORLD);
        assert_eq!(outcome.endpoints.len(), 1);
        assert_eq!(outcome.endpoints[0].policies, ["default/deny"]);
    }

    #[test]
    fn default_deny_allows_only_the_hosts_probes_and_allow_all_allows_any() {
        let web = pod("default", "web", &[("app", "web")], "10.244.1.5", NODE);
        let deny = policy(
            "default",
            "deny",
            Selector::default(),
            ENFORCE_INGRESS | ENFORCE_EGRESS,
        );
        let outcome = Cluster::new(vec![web.clone()], vec![deny.clone()]).compute();
        assert_eq!(
            enforce(&outcome, "10.244.1.5"),
            Some(ENFORCE_INGRESS | ENFORCE_EGRESS)
        );
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_INGRESS),
            [HOST_PROBES]
        );
        assert_eq!(allowed(&outcome, "10.244.1.5", POLICY_EGRESS), []);
        let mut allow_all = policy("default", "allow", Selector::default(), ENFORCE_INGRESS);
        allow_all.ingress = vec![Rule::default()];
        let outcome = Cluster::new(vec![web], vec![deny, allow_all]).compute();
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_INGRESS),
            [(ANY, 0, 0, 1), HOST_PROBES]
        );
        assert_eq!(allowed(&outcome, "10.244.1.5", POLICY_EGRESS), []);
    }

    #[test]
    fn a_pod_selector_picks_labelled_pods_of_the_policys_namespace_only() {
        let mut allow = policy("default", "front", sel(&[("app", "web")]), ENFORCE_INGRESS);
        allow.ingress = vec![rule(vec![pods_peer(&[("app", "front")])], vec![])];
        let cluster = Cluster::new(
            vec![
                pod("default", "web", &[("app", "web")], "10.244.1.5", NODE),
                pod("default", "front", &[("app", "front")], "10.244.2.7", "n2"),
                pod("other", "front", &[("app", "front")], "10.244.2.8", "n2"),
            ],
            vec![allow],
        );
        let outcome = cluster.compute();
        let front = id_of(&outcome, "10.244.2.7");
        assert_ne!(front, id_of(&outcome, "10.244.2.8"), "namespaces differ");
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_INGRESS),
            [HOST_PROBES, (front, 0, 0, 1)]
        );
    }

    #[test]
    fn namespace_selectors_alone_and_with_a_pod_selector() {
        let prod = labels(&[("env", "prod")]);
        let pods = vec![
            pod("default", "web", &[("app", "web")], "10.244.1.5", NODE),
            pod("prod", "a", &[("app", "a")], "10.244.2.7", "n2"),
            pod("prod", "b", &[("app", "b")], "10.244.2.8", "n2"),
            pod("dev", "a", &[("app", "a")], "10.244.2.9", "n2"),
        ];
        let mut alone = policy("default", "ns", Selector::default(), ENFORCE_INGRESS);
        alone.ingress = vec![rule(
            vec![Peer::Pods {
                namespaces: Some(sel(&[("env", "prod")])),
                pods: Selector::default(),
            }],
            vec![],
        )];
        let mut cluster = Cluster::new(pods, vec![alone]);
        cluster.namespaces = vec![
            ("prod".into(), prod),
            ("dev".into(), labels(&[("env", "dev")])),
        ];
        let outcome = cluster.compute();
        let (a, b) = (id_of(&outcome, "10.244.2.7"), id_of(&outcome, "10.244.2.8"));
        let mut expected = vec![HOST_PROBES, (a, 0, 0, 1), (b, 0, 0, 1)];
        expected.sort();
        assert_eq!(allowed(&outcome, "10.244.1.5", POLICY_INGRESS), expected);
        // Both together: pods labelled app=a in namespaces labelled env=prod.
        cluster.policies[0].ingress = vec![rule(
            vec![Peer::Pods {
                namespaces: Some(sel(&[("env", "prod")])),
                pods: sel(&[("app", "a")]),
            }],
            vec![],
        )];
        let outcome = cluster.compute();
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_INGRESS),
            [HOST_PROBES, (id_of(&outcome, "10.244.2.7"), 0, 0, 1)]
        );
        // An empty namespace selector is every namespace, labelled or not.
        cluster.policies[0].ingress = vec![rule(
            vec![Peer::Pods {
                namespaces: Some(Selector::default()),
                pods: sel(&[("app", "a")]),
            }],
            vec![],
        )];
        let outcome = cluster.compute();
        let mut expected = vec![
            HOST_PROBES,
            (id_of(&outcome, "10.244.2.7"), 0, 0, 1),
            (id_of(&outcome, "10.244.2.9"), 0, 0, 1),
        ];
        expected.sort();
        assert_eq!(allowed(&outcome, "10.244.1.5", POLICY_INGRESS), expected);
    }

    #[test]
    fn an_ip_block_with_except_covers_pods_and_addresses_exactly() {
        let mut egress = policy("default", "block", sel(&[("app", "web")]), ENFORCE_EGRESS);
        egress.egress = vec![rule(
            vec![Peer::Block {
                cidr: net("10.244.2.0/24"),
                except: vec![net("10.244.2.128/25")],
            }],
            vec![],
        )];
        let cluster = Cluster::new(
            vec![
                pod("default", "web", &[("app", "web")], "10.244.1.5", NODE),
                // Same labels, one inside the block, one inside its except.
                pod("default", "in", &[("app", "x")], "10.244.2.7", "n2"),
                pod("default", "out", &[("app", "x")], "10.244.2.200", "n2"),
            ],
            vec![egress],
        );
        let outcome = cluster.compute();
        let (inside, excepted) = (
            id_of(&outcome, "10.244.2.7"),
            id_of(&outcome, "10.244.2.200"),
        );
        assert_ne!(inside, excepted, "their CIDR sets differ");
        let block = outcome.desired.identities[&net("10.244.2.0/24")];
        let except = outcome.desired.identities[&net("10.244.2.128/25")];
        assert_ne!(block, except);
        // The excepted pod's identity is named by no rule: it falls to the except's entry.
        assert!(!outcome
            .desired
            .identities
            .contains_key(&net("10.244.2.200/32")));
        assert_eq!(excepted, except);
        let mut expected = vec![(inside, 0, 0, 1), (block, 0, 0, 1)];
        expected.sort();
        assert_eq!(allowed(&outcome, "10.244.1.5", POLICY_EGRESS), expected);
        assert_eq!(
            outcome.identities[&block],
            IdentityKey::Cidrs(vec![net("10.244.2.0/24")])
        );
        // Not an ingress policy: no probe entry.
        assert_eq!(allowed(&outcome, "10.244.1.5", POLICY_INGRESS), []);
    }

    #[test]
    fn node_addresses_are_host_and_remote_node_unless_a_block_covers_them() {
        let web = pod("default", "web", &[("app", "web")], "10.244.1.5", NODE);
        let deny = policy("default", "deny", Selector::default(), ENFORCE_INGRESS);
        let outcome = Cluster::new(vec![web.clone()], vec![deny]).compute();
        assert_eq!(
            outcome.desired.identities[&Ipv4Network::from(HOST_IP)],
            HOST
        );
        assert_eq!(
            outcome.desired.identities[&Ipv4Network::from(REMOTE_IP)],
            REMOTE_NODE
        );
        let mut nodes = policy("default", "nodes", Selector::default(), ENFORCE_INGRESS);
        nodes.ingress = vec![rule(
            vec![Peer::Block {
                cidr: net("192.168.1.0/24"),
                except: vec![],
            }],
            vec![tcp(8080)],
        )];
        let outcome = Cluster::new(vec![web], vec![nodes]).compute();
        let subnet = outcome.desired.identities[&net("192.168.1.0/24")];
        assert!(!outcome
            .desired
            .identities
            .contains_key(&Ipv4Network::from(REMOTE_IP)));
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_INGRESS),
            [
                HOST_PROBES,
                (HOST, 8080, PROTO_TCP, 1),
                (subnet, 8080, PROTO_TCP, 1)
            ]
        );
        // Anything else falls to WORLD: no entry covers it.
        let outside = ip("8.8.8.8");
        assert!(!outcome
            .desired
            .identities
            .keys()
            .any(|cidr| cidr.contains(outside)));
    }

    #[test]
    fn numeric_and_named_ports_with_each_protocol() {
        let web = with_port(
            with_port(
                pod("default", "web", &[("app", "web")], "10.244.1.5", NODE),
                "http",
                8080,
                PROTO_TCP,
            ),
            "dns",
            5353,
            PROTO_UDP,
        );
        let api = with_port(
            pod("default", "api", &[("app", "api")], "10.244.2.7", "n2"),
            "api",
            9000,
            PROTO_TCP,
        );
        let api2 = with_port(
            pod("default", "api2", &[("app", "api")], "10.244.2.8", "n2"),
            "api",
            9001,
            PROTO_TCP,
        );
        let mut both = policy(
            "default",
            "ports",
            sel(&[("app", "web")]),
            ENFORCE_INGRESS | ENFORCE_EGRESS,
        );
        let named = |name: &str, protocol| PortSpec {
            protocol,
            port: PortRef::Name(name.into()),
        };
        both.ingress = vec![rule(
            vec![],
            vec![
                tcp(80),
                PortSpec {
                    protocol: PROTO_UDP,
                    port: PortRef::Number(53),
                },
                PortSpec {
                    protocol: PROTO_SCTP,
                    port: PortRef::Number(7777),
                },
                PortSpec {
                    protocol: PROTO_TCP,
                    port: PortRef::Any,
                },
                named("http", PROTO_TCP),
                named("dns", PROTO_UDP),
                // A name the pod declares for another protocol only: nothing.
                named("http", PROTO_UDP),
            ],
        )];
        both.egress = vec![rule(
            vec![pods_peer(&[("app", "api")])],
            vec![named("api", PROTO_TCP)],
        )];
        let outcome = Cluster::new(vec![web, api, api2], vec![both]).compute();
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_INGRESS),
            [
                (ANY, 0, PROTO_TCP, 1),
                (ANY, 53, PROTO_UDP, 1),
                (ANY, 80, PROTO_TCP, 1),
                (ANY, 5353, PROTO_UDP, 1),
                (ANY, 7777, PROTO_SCTP, 1),
                (ANY, 8080, PROTO_TCP, 1),
                HOST_PROBES,
            ]
        );
        // Egress names resolve against each peer pod's ports; the two api pods share one
        // identity, so both numbers are allowed to it.
        let api_id = id_of(&outcome, "10.244.2.7");
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_EGRESS),
            [(api_id, 9000, PROTO_TCP, 1), (api_id, 9001, PROTO_TCP, 1)]
        );
    }

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_it_has_egress_rules() {
        // The projection sets `enforce`; here, what the engine does with it: an
        // egress-only policy's ingress rules are ignored.
        let web = pod("default", "web", &[("app", "web")], "10.244.1.5", NODE);
        let mut egress_only = policy("default", "e", Selector::default(), ENFORCE_EGRESS);
        egress_only.ingress = vec![Rule::default()];
        egress_only.egress = vec![rule(vec![], vec![tcp(53)])];
        let outcome = Cluster::new(vec![web], vec![egress_only]).compute();
        assert_eq!(enforce(&outcome, "10.244.1.5"), Some(ENFORCE_EGRESS));
        assert_eq!(allowed(&outcome, "10.244.1.5", POLICY_INGRESS), []);
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_EGRESS),
            [(ANY, 53, PROTO_TCP, 1)]
        );
    }

    #[test]
    fn two_policies_on_one_pod_are_their_union_with_rules_counted() {
        let web = pod("default", "web", &[("app", "web")], "10.244.1.5", NODE);
        let mut one = policy("default", "one", sel(&[("app", "web")]), ENFORCE_INGRESS);
        one.ingress = vec![rule(vec![], vec![tcp(80)])];
        let mut two = policy("default", "two", Selector::default(), ENFORCE_INGRESS);
        two.ingress = vec![rule(vec![], vec![tcp(80), tcp(443)])];
        let outcome = Cluster::new(vec![web], vec![one, two]).compute();
        assert_eq!(
            allowed(&outcome, "10.244.1.5", POLICY_INGRESS),
            [
                (ANY, 80, PROTO_TCP, 2),
                (ANY, 443, PROTO_TCP, 1),
                HOST_PROBES
            ]
        );
        assert_eq!(
            outcome.endpoints[0].policies,
            ["default/one", "default/two"]
        );
    }

    #[test]
    fn no_pod_selected_here_means_no_identity_entries_at_all() {
        let web = pod("default", "web", &[("app", "web")], "10.244.1.5", NODE);
        let elsewhere = pod("default", "db", &[("app", "db")], "10.244.2.5", "n2");
        let mut deny = policy("default", "deny", sel(&[("app", "db")]), ENFORCE_INGRESS);
        deny.ingress = vec![rule(vec![pods_peer(&[("app", "web")])], vec![])];
        let outcome = Cluster::new(vec![web, elsewhere], vec![deny]).compute();
        assert_eq!(outcome.desired, PolicyDesired::default());
    }

    #[test]
    fn selector_expressions_select_endpoints() {
        let web = pod("default", "web", &[("app", "web")], "10.244.1.5", NODE);
        let selector = Selector {
            match_labels: Labels::new(),
            expressions: vec![Requirement::NotIn("app".into(), vec!["web".into()])],
        };
        let outcome = Cluster::new(
            vec![web],
            vec![policy("default", "p", selector, ENFORCE_INGRESS)],
        )
        .compute();
        assert!(outcome.desired.endpoints.is_empty());
    }

    #[test]
    fn a_label_change_to_a_known_label_set_rewrites_one_identity_entry() {
        let mut allow = policy("default", "p", sel(&[("app", "web")]), ENFORCE_INGRESS);
        allow.ingress = vec![rule(vec![pods_peer(&[("role", "client")])], vec![tcp(80)])];
        let mut cluster = Cluster::new(
            vec![
                pod("default", "web", &[("app", "web")], "10.244.1.5", NODE),
                pod("default", "c1", &[("role", "client")], "10.244.2.7", "n2"),
                pod("default", "c2", &[("role", "other")], "10.244.2.8", "n2"),
            ],
            vec![allow],
        );
        let mut engine = PolicyEngine::default();
        let before = engine.compute(&cluster.world());
        cluster.pods[2].labels = labels(&[("role", "client")]);
        let after = engine.compute(&cluster.world());
        let changed: Vec<_> = after
            .desired
            .identities
            .iter()
            .filter(|(prefix, id)| before.desired.identities.get(prefix) != Some(id))
            .collect();
        assert_eq!(
            changed,
            [(&net("10.244.2.8/32"), &id_of(&before, "10.244.2.7"))]
        );
        // c2 had no entry (no rule named role=other): the change adds exactly its one.
        assert_eq!(
            before.desired.identities.len() + 1,
            after.desired.identities.len()
        );
        assert_eq!(
            before.desired.rules, after.desired.rules,
            "no rule rewritten"
        );
        assert_eq!(before.desired.endpoints, after.desired.endpoints);
        // The unused label set's identity is released.
        assert_eq!(engine.identity_count(), 2);
    }
}

/// Timings at the largest cluster the project claims, printed, not asserted (run with
/// `cargo test -p mycni --lib --release -- --ignored --nocapture policy_at_cluster_scale`).
#[cfg(test)]
mod scale {
    use super::*;
    use crate::policy::model::{NamedPort, PortSpec, Selector, PROTO_TCP};
    use std::time::Instant;

    const NODES: usize = 5000;
    const PODS_PER_NODE: usize = 30;
    const NAMESPACES: usize = 500;
    const POLICIES: usize = 1000;

    fn labels(pairs: &[(&str, String)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn cluster() -> (Vec<PolicyPod>, Vec<(String, Labels)>, Vec<Policy>) {
        let mut pods = Vec::with_capacity(NODES * PODS_PER_NODE);
        for node in 0..NODES {
            for slot in 0..PODS_PER_NODE {
                let n = node * PODS_PER_NODE + slot;
                // Deployments of 10 replicas spread over nodes: 15,000 label sets.
                let app = n % 15_000;
                pods.push(PolicyPod {
                    namespace: format!("ns-{}", app % NAMESPACES),
                    name: format!("pod-{n}"),
                    labels: labels(&[
                        ("app", format!("app-{app}")),
                        ("pod-template-hash", format!("{app:08x}")),
                    ]),
                    ip: Ipv4Addr::from(0x0a00_0000u32 + (node as u32) * 256 + slot as u32 + 2),
                    node: format!("node-{node}"),
                    named_ports: vec![NamedPort {
                        name: "http".into(),
                        port: 8080,
                        protocol: PROTO_TCP,
                    }],
                });
            }
        }
        let namespaces = (0..NAMESPACES)
            .map(|i| {
                (
                    format!("ns-{i}"),
                    labels(&[("team", format!("t{}", i % 20))]),
                )
            })
            .collect();
        let policies = (0..POLICIES)
            .map(|i| Policy {
                namespace: format!("ns-{}", i % NAMESPACES),
                name: format!("policy-{i}"),
                pod_selector: Selector {
                    match_labels: labels(&[("app", format!("app-{}", (i * 7) % 15_000))]),
                    expressions: vec![],
                },
                enforce: ENFORCE_INGRESS | ENFORCE_EGRESS,
                ingress: vec![Rule {
                    peers: vec![
                        Peer::Pods {
                            namespaces: None,
                            pods: Selector {
                                match_labels: labels(&[("app", format!("app-{}", i % 15_000))]),
                                expressions: vec![],
                            },
                        },
                        Peer::Pods {
                            namespaces: Some(Selector {
                                match_labels: labels(&[("team", format!("t{}", i % 20))]),
                                expressions: vec![],
                            }),
                            pods: Selector::default(),
                        },
                    ],
                    ports: vec![PortSpec {
                        protocol: PROTO_TCP,
                        port: PortRef::Name("http".into()),
                    }],
                }],
                egress: vec![Rule {
                    peers: vec![Peer::Block {
                        cidr: format!("172.{}.0.0/16", i % 200).parse().expect("cidr"),
                        except: vec![],
                    }],
                    ports: vec![PortSpec {
                        protocol: PROTO_TCP,
                        port: PortRef::Number(443),
                    }],
                }],
            })
            .collect();
        (pods, namespaces, policies)
    }

    #[test]
    #[ignore = "a benchmark: prints timings at 150,000 pods"]
    fn policy_at_cluster_scale() {
        let (mut pods, namespaces, policies) = cluster();
        let remote: Vec<Ipv4Addr> = (1..NODES as u32)
            .map(|n| Ipv4Addr::from(0xc0a8_0000 + n))
            .collect();
        let mut engine = PolicyEngine::default();
        let mut run = |pods: &[PolicyPod], what: &str| {
            // The pod cache keeps the sets; grouping them here is not part of a computation.
            let pod_sets = super::tests::pod_sets(pods);
            let started = Instant::now();
            let world = PolicyWorld {
                node_name: "node-0",
                host_addresses: vec![Ipv4Addr::new(192, 168, 0, 0)],
                remote_node_addresses: remote.clone(),
                pod_sets: pod_sets.clone(),
                namespaces: namespaces.iter().map(|(n, l)| (n.as_str(), l)).collect(),
                policies: policies.iter().collect(),
            };
            let outcome = engine.compute(&world);
            println!(
                "{what}: {:?} ({} pods, {} policies; here {} endpoints selected, {} rules, {} identity entries, {} identities)",
                started.elapsed(),
                pods.len(),
                policies.len(),
                outcome.desired.endpoints.len(),
                outcome.desired.rules.len(),
                outcome.desired.identities.len(),
                engine.identity_count()
            );
            outcome
        };
        let first = run(&pods, "first computation");
        let again = run(&pods, "nothing changed");
        assert_eq!(first, again);
        // One remote pod moves to another existing label set.
        pods[1000].labels = pods[2000].labels.clone();
        pods[1000].namespace = pods[2000].namespace.clone();
        let moved = run(&pods, "one pod's labels changed");
        let changed = moved
            .desired
            .identities
            .iter()
            .filter(|(prefix, id)| first.desired.identities.get(prefix) != Some(id))
            .count();
        println!("identity entries changed: {changed}");
    }
}
