//! Node objects as the agent needs them, and its cache of them, without I/O: the watcher's
//! events edit the cache, a re-list replaces it whole once complete, and the caller learns
//! whether the nodes the datapath cares about (name, InternalIP, pod CIDR) changed.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::Event;

use super::WatchCache;
use crate::ipam::Pool;
use crate::nodes::NodeEntry;

/// What the agent keeps of a Node: a node without an InternalIP or a pod CIDR yet (the
/// controller manager assigns CIDRs after registration) gets no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeNode {
    pub name: String,
    pub internal_ip: Option<Ipv4Addr>,
    pub pod_cidr: Option<Pool>,
}

impl KubeNode {
    pub fn entry(&self) -> Option<NodeEntry> {
        Some(NodeEntry {
            name: self.name.clone(),
            ip: self.internal_ip?,
            pod_cidr: self.pod_cidr?,
        })
    }
}

impl From<&Node> for KubeNode {
    fn from(node: &Node) -> KubeNode {
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|status| status.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        // podCIDRs lists one CIDR per family on dual-stack nodes; mycni routes IPv4.
        let spec = node.spec.as_ref();
        let pod_cidr = spec
            .and_then(|spec| spec.pod_cidrs.as_ref())
            .into_iter()
            .flatten()
            .chain(spec.and_then(|spec| spec.pod_cidr.as_ref()))
            .find_map(|text| Pool::parse(text).ok());
        KubeNode {
            name: node.metadata.name.clone().unwrap_or_default(),
            internal_ip,
            pod_cidr,
        }
    }
}

/// The nodes as the API server last described them. Only this projection is kept, not
/// the Node objects (their images, conditions, labels), which a reflector store would hold
/// whole for every node.
#[derive(Debug, Default, Clone)]
pub struct NodeCache {
    nodes: BTreeMap<String, KubeNode>,
    /// A re-list in progress: the nodes received so far. The routes keep following
    /// `nodes` until it completes.
    relisting: Option<BTreeMap<String, KubeNode>>,
}

impl NodeCache {
    pub fn get(&self, name: &str) -> Option<&KubeNode> {
        self.nodes.get(name)
    }

    /// The routable nodes, by name.
    pub fn entries(&self) -> Vec<NodeEntry> {
        self.nodes.values().filter_map(KubeNode::entry).collect()
    }

    /// Replaces everything with a complete list. Returns whether the routable nodes
    /// changed, so a re-list after a broken watch does not touch routes that stayed.
    pub fn replace(&mut self, nodes: BTreeMap<String, KubeNode>) -> bool {
        let before = self.entries();
        self.nodes = nodes;
        before != self.entries()
    }

    /// A node added or changed. Only that node is compared: a heartbeat of one node among
    /// thousands must not cost a walk of them all.
    fn upsert(&mut self, node: KubeNode) -> bool {
        let after = node.entry();
        let before = self
            .nodes
            .insert(node.name.clone(), node)
            .and_then(|old| old.entry());
        before != after
    }

    fn remove(&mut self, name: &str) -> bool {
        self.nodes
            .remove(name)
            .and_then(|old| old.entry())
            .is_some()
    }
}

impl WatchCache<Node> for NodeCache {
    fn apply(&mut self, event: Event<Node>) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(node) => {
                let node = KubeNode::from(&node);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(node.name.clone(), node);
                false
            }
            Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                self.replace(listed)
            }
            Event::Apply(node) => self.upsert(KubeNode::from(&node)),
            Event::Delete(node) => self.remove(node.metadata.name.as_deref().unwrap_or("")),
        }
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Node as the API server sends it.
    fn node(name: &str, ip: &str, cidr: Option<&str>) -> Node {
        let spec = match cidr {
            Some(c) => format!(r#"{{"podCIDR":"{c}","podCIDRs":["{c}"]}}"#),
            None => "{}".into(),
        };
        let json = format!(
            r#"{{"kind":"Node","apiVersion":"v1","metadata":{{"name":"{name}","resourceVersion":"7"}},
               "spec":{spec},
               "status":{{"addresses":[{{"type":"Hostname","address":"{name}"}},
                                      {{"type":"InternalIP","address":"{ip}"}}]}}}}"#
        );
        serde_json::from_str(&json).expect("a valid Node")
    }

    fn listed(cache: &mut NodeCache, nodes: &[Node]) -> bool {
        assert!(!cache.apply(Event::Init));
        for node in nodes {
            assert!(!cache.apply(Event::InitApply(node.clone())));
        }
        cache.apply(Event::InitDone)
    }

    #[test]
    fn a_node_gives_its_internal_ip_and_pod_cidr() {
        let n1 = KubeNode::from(&node("n1", "192.168.1.11", Some("10.244.0.0/24")));
        assert_eq!(n1.internal_ip, Some(Ipv4Addr::new(192, 168, 1, 11)));
        assert_eq!(n1.pod_cidr, Pool::parse("10.244.0.0/24").ok());
        let n2 = KubeNode::from(&node("n2", "192.168.1.12", None));
        assert_eq!(n2.pod_cidr, None);
        assert!(n2.entry().is_none(), "no CIDR yet, no route");
    }

    #[test]
    fn dual_stack_nodes_route_their_ipv4_cidr() {
        let json = r#"{"metadata":{"name":"d"},"spec":{"podCIDR":"fd00::/64","podCIDRs":["fd00::/64","10.244.9.0/24"]},
            "status":{"addresses":[{"type":"InternalIP","address":"fd00::9"},{"type":"InternalIP","address":"192.168.1.9"}]}}"#;
        let node: Node = serde_json::from_str(json).expect("a valid Node");
        let entry = KubeNode::from(&node).entry().expect("routable");
        assert_eq!(entry.ip, Ipv4Addr::new(192, 168, 1, 9));
        assert_eq!(entry.pod_cidr, Pool::parse("10.244.9.0/24").expect("cidr"));
    }

    #[test]
    fn a_node_without_spec_or_status_has_no_route() {
        let node: Node = serde_json::from_str(r#"{"metadata":{"name":"bare"}}"#).expect("Node");
        let bare = KubeNode::from(&node);
        assert_eq!((bare.name.as_str(), bare.entry()), ("bare", None));
    }

    #[test]
    fn events_edit_the_cache_and_report_route_changes() {
        let mut cache = NodeCache::default();
        // An empty cluster changes no route (the adapter makes the first list news).
        assert!(!listed(&mut cache, &[]));
        let n1 = node("n1", "192.168.1.11", Some("10.244.1.0/24"));
        assert!(cache.apply(Event::Apply(n1.clone())));
        // A status heartbeat changes nothing routable.
        assert!(!cache.apply(Event::Apply(n1.clone())));
        // A node that registers first and gets its CIDR later.
        assert!(!cache.apply(Event::Apply(node("n2", "192.168.1.12", None))));
        assert!(cache.get("n2").is_some());
        let n2 = node("n2", "192.168.1.12", Some("10.244.2.0/24"));
        assert!(cache.apply(Event::Apply(n2)));
        assert_eq!(cache.entries().len(), 2);
        // Its InternalIP moves.
        let moved = node("n2", "192.168.1.22", Some("10.244.2.0/24"));
        assert!(cache.apply(Event::Apply(moved)));
        assert_eq!(
            cache.get("n2").and_then(|n| n.internal_ip),
            Some(Ipv4Addr::new(192, 168, 1, 22))
        );
        assert!(cache.apply(Event::Delete(n1)));
        assert_eq!(cache.entries().len(), 1);
        assert_eq!(cache.len(), 1);
        // Deleting a node never routed (or already gone) changes nothing.
        assert!(!cache.apply(Event::Delete(node("n9", "192.168.1.19", None))));
    }

    #[test]
    fn relisting_the_same_nodes_changes_nothing() {
        let mut cache = NodeCache::default();
        let nodes = [
            node("n1", "192.168.1.11", Some("10.244.1.0/24")),
            node("n2", "192.168.1.12", Some("10.244.2.0/24")),
        ];
        assert!(listed(&mut cache, &nodes));
        assert!(!listed(&mut cache, &nodes));
        assert!(listed(&mut cache, &nodes[..1]), "n2 gone");
        assert!(listed(&mut cache, &[]), "every node gone");
        assert!(cache.entries().is_empty());
    }

    #[test]
    fn routes_follow_the_old_list_until_a_relist_completes() {
        let mut cache = NodeCache::default();
        let n1 = node("n1", "192.168.1.11", Some("10.244.1.0/24"));
        assert!(listed(&mut cache, std::slice::from_ref(&n1)));
        // A re-list that breaks off half way (the watcher starts over with Init).
        assert!(!cache.apply(Event::Init));
        assert_eq!(cache.entries().len(), 1, "kept while the list runs");
        let n2 = node("n2", "192.168.1.12", Some("10.244.2.0/24"));
        assert!(listed(&mut cache, &[n1, n2]));
        assert_eq!(cache.entries().len(), 2);
    }
}
