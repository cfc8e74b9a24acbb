//! The NetworkPolicy world as the engine reads it: pods, namespaces and policies reduced
//! to what decides a packet (no Kubernetes types, no I/O). The projections from the API
//! objects live in [`crate::kube::policy_objects`].
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

pub type Labels = BTreeMap<String, String>;

/// IANA protocol numbers, as `PolicyKey::protocol` holds them.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// The protocol number of a Kubernetes protocol name (`TCP`, `UDP`, `SCTP`).
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

pub fn protocol_name(number: u8) -> &'static str {
    match number {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_SCTP => "sctp",
        0 => "any",
        _ => "other",
    }
}

/// One `matchExpressions` term.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    /// An operator the API server would have refused: the selector matches nothing.
    Invalid,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
            Requirement::Invalid => false,
        }
    }
}

/// A label selector; the empty one selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub match_labels: Labels,
    pub expressions: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self.expressions.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.expressions.is_empty()
    }
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: u8,
}

/// A pod with an IPv4 address that is not on the host network and has not finished
/// (Succeeded and Failed pods may have handed their IP to another pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub node: String,
    /// Container ports that have a name (the only ones a policy can name).
    pub named_ports: Vec<NamedPort>,
}

impl PolicyPod {
    /// The number of the named port for `protocol`, if the pod declares it.
    pub fn named_port(&self, name: &str, protocol: u8) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// Where a rule's peers are: pods (by namespace and labels) or addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// `namespaces` `None`: the policy's own namespace (a `podSelector` alone). A
    /// `namespaceSelector` alone has an empty `pods` selector.
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    /// An `ipBlock`; `except` entries outside `cidr` are dropped.
    Block {
        cidr: Ipv4Network,
        except: Vec<Ipv4Network>,
    },
    /// A peer no IPv4 address matches (an IPv6 or malformed `ipBlock`).
    Nothing,
}

/// A port of a rule; `protocol` defaults to TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: u8,
    pub port: PortRef,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    /// No `port`: every port of the protocol.
    Any,
    Number(u16),
    /// A container port's name: the destination pod's.
    Name(String),
}

/// One ingress or egress rule. Empty `peers` (no `from`/`to`) is every peer; empty
/// `ports` every port and protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

/// A NetworkPolicy. `enforce` holds the `ENFORCE_*` bits of its `policyTypes` after
/// defaulting (Ingress always; Egress when it has egress rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub enforce: u8,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl Policy {
    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Every CIDR the policy mentions (`ipBlock.cidr` and `except`).
    pub fn cidrs(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        self.ingress
            .iter()
            .chain(&self.egress)
            .flat_map(|rule| &rule.peers)
            .flat_map(|peer| match peer {
                Peer::Block { cidr, except } => std::iter::once(*cidr)
                    .chain(except.iter().copied())
                    .collect(),
                _ => Vec::new(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        assert!(Selector::default().matches(&web), "empty selects all");
        let app_web = Selector {
            match_labels: labels(&[("app", "web")]),
            expressions: vec![],
        };
        assert!(app_web.matches(&web) && !app_web.matches(&db));
        let expr = |r: Requirement| Selector {
            match_labels: Labels::new(),
            expressions: vec![r],
        };
        let values = vec!["web".to_string(), "api".to_string()];
        assert!(expr(Requirement::In("app".into(), values.clone())).matches(&web));
        assert!(!expr(Requirement::In("app".into(), values.clone())).matches(&db));
        assert!(expr(Requirement::NotIn("app".into(), values.clone())).matches(&db));
        assert!(expr(Requirement::NotIn("x".into(), values)).matches(&db));
        assert!(expr(Requirement::Exists("tier".into())).matches(&web));
        assert!(!expr(Requirement::Exists("tier".into())).matches(&db));
        assert!(expr(Requirement::DoesNotExist("tier".into())).matches(&db));
        assert!(!expr(Requirement::Invalid).matches(&web));
    }
}
