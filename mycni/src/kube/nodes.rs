//! Node objects from the API server, and the agent's cache of them, without I/O: a list
//! replaces the cache, each watch event edits it, and the caller learns whether the nodes
//! the datapath cares about (name, InternalIP, pod CIDR) changed.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::ipam::Pool;
use crate::nodes::NodeEntry;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeObjectError {
    #[error("not a Node list: {0}")]
    List(String),
    #[error("not a watch event: {0}")]
    Event(String),
}

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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    resource_version: String,
    #[serde(default, rename = "continue")]
    continue_token: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NodeSpecJson {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs", default)]
    pod_cidrs: Vec<String>,
}

#[derive(Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

#[derive(Deserialize, Default)]
struct NodeStatusJson {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Deserialize)]
struct NodeJson {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: NodeSpecJson,
    #[serde(default)]
    status: NodeStatusJson,
}

impl From<NodeJson> for KubeNode {
    fn from(node: NodeJson) -> KubeNode {
        let internal_ip = node
            .status
            .addresses
            .iter()
            .filter(|a| a.kind == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        // podCIDRs lists one CIDR per family on dual-stack nodes; mycni routes IPv4.
        let pod_cidr = node
            .spec
            .pod_cidrs
            .iter()
            .chain(node.spec.pod_cidr.iter())
            .find_map(|text| Pool::parse(text).ok());
        KubeNode {
            name: node.metadata.name,
            internal_ip,
            pod_cidr,
        }
    }
}

/// One page of `GET /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeListPage {
    pub nodes: Vec<KubeNode>,
    pub resource_version: String,
    /// Set when more pages follow.
    pub continue_token: Option<String>,
}

pub fn parse_node_list(body: &[u8]) -> Result<NodeListPage, NodeObjectError> {
    #[derive(Deserialize)]
    struct NodeListJson {
        kind: Option<String>,
        metadata: ObjectMeta,
        #[serde(default)]
        items: Vec<NodeJson>,
    }
    let list: NodeListJson =
        serde_json::from_slice(body).map_err(|e| NodeObjectError::List(e.to_string()))?;
    if list.kind.as_deref().is_some_and(|kind| kind != "NodeList") {
        return Err(NodeObjectError::List(format!("kind {:?}", list.kind)));
    }
    Ok(NodeListPage {
        nodes: list.items.into_iter().map(KubeNode::from).collect(),
        resource_version: list.metadata.resource_version,
        continue_token: list.metadata.continue_token.filter(|t| !t.is_empty()),
    })
}

/// One line of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Added(KubeNode, String),
    Modified(KubeNode, String),
    Deleted(KubeNode, String),
    /// Only moves the resource version on.
    Bookmark(String),
    /// The server ended the watch; 410 means the resource version is too old to resume.
    Error {
        code: u16,
        message: String,
    },
}

pub fn parse_watch_event(line: &[u8]) -> Result<WatchEvent, NodeObjectError> {
    #[derive(Deserialize)]
    struct EventJson {
        #[serde(rename = "type")]
        kind: String,
        object: serde_json::Value,
    }
    #[derive(Deserialize)]
    struct StatusJson {
        #[serde(default)]
        code: u16,
        #[serde(default)]
        message: String,
    }
    let bad = |e: serde_json::Error| NodeObjectError::Event(e.to_string());
    let event: EventJson = serde_json::from_slice(line).map_err(bad)?;
    if event.kind == "ERROR" {
        let status: StatusJson = serde_json::from_value(event.object).map_err(bad)?;
        return Ok(WatchEvent::Error {
            code: status.code,
            message: status.message,
        });
    }
    let node: NodeJson = serde_json::from_value(event.object).map_err(bad)?;
    let version = node.metadata.resource_version.clone();
    Ok(match event.kind.as_str() {
        "ADDED" => WatchEvent::Added(node.into(), version),
        "MODIFIED" => WatchEvent::Modified(node.into(), version),
        "DELETED" => WatchEvent::Deleted(node.into(), version),
        "BOOKMARK" => WatchEvent::Bookmark(version),
        other => return Err(NodeObjectError::Event(format!("event type {other:?}"))),
    })
}

/// The nodes as the API server last described them, and the resource version to resume
/// watching from.
#[derive(Debug, Default, Clone)]
pub struct NodeCache {
    nodes: BTreeMap<String, KubeNode>,
    resource_version: String,
}

impl NodeCache {
    pub fn resource_version(&self) -> &str {
        &self.resource_version
    }

    pub fn get(&self, name: &str) -> Option<&KubeNode> {
        self.nodes.get(name)
    }

    /// The routable nodes, by name.
    pub fn entries(&self) -> Vec<NodeEntry> {
        self.nodes.values().filter_map(KubeNode::entry).collect()
    }

    /// Replaces everything with a fresh list. Returns whether the routable nodes changed,
    /// so a re-list after a broken watch does not touch routes that stayed the same.
    pub fn replace(&mut self, nodes: Vec<KubeNode>, resource_version: String) -> bool {
        let before = self.entries();
        self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        self.resource_version = resource_version;
        before != self.entries()
    }

    /// Applies one watch event. Returns whether the routable nodes changed; an `Error`
    /// event is returned to the caller, which must resume or re-list.
    pub fn apply(&mut self, event: WatchEvent) -> Result<bool, (u16, String)> {
        // Only the node the event names is compared: a heartbeat of one node among
        // thousands must not cost a walk of them all.
        match event {
            WatchEvent::Added(node, version) | WatchEvent::Modified(node, version) => {
                let after = node.entry();
                let before = self
                    .nodes
                    .insert(node.name.clone(), node)
                    .and_then(|old| old.entry());
                self.resource_version = version;
                Ok(before != after)
            }
            WatchEvent::Deleted(node, version) => {
                let before = self.nodes.remove(&node.name).and_then(|old| old.entry());
                self.resource_version = version;
                Ok(before.is_some())
            }
            WatchEvent::Bookmark(version) => {
                self.resource_version = version;
                Ok(false)
            }
            WatchEvent::Error { code, message } => Err((code, message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_json(name: &str, ip: &str, cidr: Option<&str>, version: &str) -> String {
        let spec = match cidr {
            Some(c) => format!(r#"{{"podCIDR":"{c}","podCIDRs":["{c}"]}}"#),
            None => "{}".into(),
        };
        format!(
            r#"{{"kind":"Node","metadata":{{"name":"{name}","resourceVersion":"{version}"}},
               "spec":{spec},
               "status":{{"addresses":[{{"type":"Hostname","address":"{name}"}},
                                      {{"type":"InternalIP","address":"{ip}"}}]}}}}"#
        )
    }

    fn event(kind: &str, object: &str) -> WatchEvent {
        let line = format!(r#"{{"type":"{kind}","object":{object}}}"#);
        parse_watch_event(line.as_bytes()).expect("valid event")
    }

    #[test]
    fn list_gives_nodes_version_and_continue() {
        let body = format!(
            r#"{{"kind":"NodeList","apiVersion":"v1","metadata":{{"resourceVersion":"41","continue":"abc"}},
                "items":[{},{}]}}"#,
            node_json("n1", "192.168.1.11", Some("10.244.0.0/24"), "40"),
            node_json("n2", "192.168.1.12", None, "39"),
        );
        let page = parse_node_list(body.as_bytes()).expect("valid list");
        assert_eq!(page.resource_version, "41");
        assert_eq!(page.continue_token.as_deref(), Some("abc"));
        assert_eq!(
            page.nodes[0].internal_ip,
            Some(Ipv4Addr::new(192, 168, 1, 11))
        );
        assert_eq!(page.nodes[0].pod_cidr, Pool::parse("10.244.0.0/24").ok());
        assert_eq!(page.nodes[1].pod_cidr, None);
        assert!(page.nodes[1].entry().is_none(), "no CIDR yet, no route");
    }

    #[test]
    fn dual_stack_nodes_route_their_ipv4_cidr() {
        let json = r#"{"metadata":{"name":"d"},"spec":{"podCIDR":"fd00::/64","podCIDRs":["fd00::/64","10.244.9.0/24"]},
            "status":{"addresses":[{"type":"InternalIP","address":"fd00::9"},{"type":"InternalIP","address":"192.168.1.9"}]}}"#;
        let node = match event("ADDED", json) {
            WatchEvent::Added(node, _) => node,
            other => panic!("{other:?}"),
        };
        let entry = node.entry().expect("routable");
        assert_eq!(entry.ip, Ipv4Addr::new(192, 168, 1, 9));
        assert_eq!(entry.pod_cidr, Pool::parse("10.244.9.0/24").expect("cidr"));
    }

    #[test]
    fn not_a_list_is_an_error() {
        assert!(parse_node_list(b"<html>").is_err());
        assert!(parse_node_list(br#"{"kind":"Status","metadata":{}}"#).is_err());
        assert!(parse_watch_event(br#"{"type":"NEW","object":{"metadata":{}}}"#).is_err());
        assert!(parse_watch_event(b"{").is_err());
    }

    #[test]
    fn events_edit_the_cache_and_report_route_changes() {
        let mut cache = NodeCache::default();
        let n1 = node_json("n1", "192.168.1.11", Some("10.244.1.0/24"), "5");
        assert_eq!(cache.apply(event("ADDED", &n1)), Ok(true));
        assert_eq!(cache.resource_version(), "5");
        // A status heartbeat changes nothing routable.
        let n1_again = node_json("n1", "192.168.1.11", Some("10.244.1.0/24"), "6");
        assert_eq!(cache.apply(event("MODIFIED", &n1_again)), Ok(false));
        assert_eq!(cache.resource_version(), "6");
        // A node that registers first and gets its CIDR later.
        let n2 = node_json("n2", "192.168.1.12", None, "7");
        assert_eq!(cache.apply(event("ADDED", &n2)), Ok(false));
        assert!(cache.get("n2").is_some());
        let n2 = node_json("n2", "192.168.1.12", Some("10.244.2.0/24"), "8");
        assert_eq!(cache.apply(event("MODIFIED", &n2)), Ok(true));
        assert_eq!(cache.entries().len(), 2);
        assert_eq!(cache.apply(event("DELETED", &n1_again)), Ok(true));
        assert_eq!(cache.entries().len(), 1);
        let bookmark = r#"{"kind":"Node","metadata":{"resourceVersion":"99"}}"#;
        assert_eq!(cache.apply(event("BOOKMARK", bookmark)), Ok(false));
        assert_eq!(cache.resource_version(), "99");
    }

    #[test]
    fn expired_watch_is_returned_as_an_error() {
        let gone = r#"{"kind":"Status","status":"Failure","message":"too old resource version","reason":"Expired","code":410}"#;
        let mut cache = NodeCache::default();
        assert_eq!(
            cache.apply(event("ERROR", gone)),
            Err((410, "too old resource version".into()))
        );
    }

    #[test]
    fn relisting_the_same_nodes_changes_nothing() {
        let mut cache = NodeCache::default();
        let page = |v: &str| {
            let body = format!(
                r#"{{"kind":"NodeList","metadata":{{"resourceVersion":"{v}"}},"items":[{}]}}"#,
                node_json("n1", "192.168.1.11", Some("10.244.1.0/24"), v)
            );
            parse_node_list(body.as_bytes()).expect("list")
        };
        let first = page("10");
        assert!(cache.replace(first.nodes, first.resource_version));
        let again = page("20");
        assert!(!cache.replace(again.nodes, again.resource_version));
        assert_eq!(cache.resource_version(), "20");
        assert!(cache.replace(Vec::new(), "30".into()), "every node gone");
    }
}
