//! What `mycni-agent policy` shows, pure: per local pod some policy selects, the policies,
//! the enforced directions, and every allowed peer identity (resolved to its namespace,
//! labels and CIDRs) with its ports. The agent builds a [`PolicyReport`] from each
//! computation and serves it as JSON on its metrics port (`/policy`); the command fetches
//! it and renders it here.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use mycni_common::policy::{
    identity, ENFORCE_EGRESS, ENFORCE_INGRESS, POLICY_EGRESS, POLICY_INGRESS,
};
use serde::{Deserialize, Serialize};

use super::engine::PolicyOutcome;
use super::identity::IdentityKey;
use super::model::{protocol_name, Labels};

/// Every local pod some policy selects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    /// Bumped by the agent on every computation it applied.
    pub revision: u64,
    pub endpoints: Vec<EndpointReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointReport {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    /// `ingress`, `egress`.
    pub enforce: Vec<String>,
    pub policies: Vec<String>,
    pub ingress: Vec<AllowedPeer>,
    pub egress: Vec<AllowedPeer>,
    /// Packets policy dropped, from `POLICY_DROPS` (filled in by the command, which reads
    /// the pinned map; the agent's report has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<DroppedPackets>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DroppedPackets {
    pub ingress: u64,
    pub egress: u64,
}

/// One peer identity an endpoint may talk with, and on which ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowedPeer {
    pub identity: u32,
    pub peer: PeerDescription,
    /// `all`, `tcp/*`, `tcp/80`, ...: the destination port (the endpoint's for ingress,
    /// the peer's for egress).
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum PeerDescription {
    /// Every peer (a rule without `from`/`to`).
    Any,
    /// This node (the kubelet's probes).
    Host,
    RemoteNode,
    World,
    /// Pods of this namespace and label set, inside these policy CIDRs.
    Pods {
        namespace: String,
        labels: Labels,
        cidrs: Vec<String>,
    },
    /// Addresses that are no pod's, inside these policy CIDRs.
    Cidrs {
        cidrs: Vec<String>,
    },
    /// An identity that is no longer allocated.
    Unknown,
}

impl PeerDescription {
    fn of(id: u32, identities: &BTreeMap<u32, IdentityKey>) -> PeerDescription {
        let texts =
            |cidrs: &[ipnetwork::Ipv4Network]| cidrs.iter().map(|c| c.to_string()).collect();
        match id {
            identity::ANY => PeerDescription::Any,
            identity::HOST => PeerDescription::Host,
            identity::REMOTE_NODE => PeerDescription::RemoteNode,
            identity::WORLD => PeerDescription::World,
            _ => match identities.get(&id) {
                Some(IdentityKey::Pods {
                    namespace,
                    labels,
                    cidrs,
                }) => PeerDescription::Pods {
                    namespace: namespace.clone(),
                    labels: labels.clone(),
                    cidrs: texts(cidrs),
                },
                Some(IdentityKey::Cidrs(cidrs)) => PeerDescription::Cidrs {
                    cidrs: texts(cidrs),
                },
                None => PeerDescription::Unknown,
            },
        }
    }

    /// One line's worth: `any`, `host`, `pods default {app=web}`, `cidrs 10.0.0.0/8`.
    pub fn text(&self) -> String {
        match self {
            PeerDescription::Any => "any".into(),
            PeerDescription::Host => "host (this node)".into(),
            PeerDescription::RemoteNode => "remote nodes".into(),
            PeerDescription::World => "world".into(),
            PeerDescription::Pods {
                namespace,
                labels,
                cidrs,
            } => {
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let mut text = format!("pods {namespace} {{{}}}", labels.join(","));
                if !cidrs.is_empty() {
                    let _ = write!(text, " in {}", cidrs.join(","));
                }
                text
            }
            PeerDescription::Cidrs { cidrs } => format!("cidrs {}", cidrs.join(",")),
            PeerDescription::Unknown => "unknown".into(),
        }
    }
}

fn port_text(port: u16, protocol: u8) -> String {
    match (port, protocol) {
        (0, 0) => "all".into(),
        (0, protocol) => format!("{}/*", protocol_name(protocol)),
        (port, protocol) => format!("{}/{port}", protocol_name(protocol)),
    }
}

impl PolicyReport {
    pub fn new(outcome: &PolicyOutcome, revision: u64) -> PolicyReport {
        // (endpoint, direction) -> identity -> ports, in key order.
        let mut allowed: BTreeMap<([u8; 4], u8), BTreeMap<u32, Vec<String>>> = BTreeMap::new();
        for key in outcome.desired.rules.keys() {
            allowed
                .entry((key.endpoint, key.direction))
                .or_default()
                .entry(key.peer_identity)
                .or_default()
                .push(port_text(key.port, key.protocol));
        }
        let mut peers = |ip: Ipv4Addr, direction: u8| -> Vec<AllowedPeer> {
            allowed
                .remove(&(ip.octets(), direction))
                .unwrap_or_default()
                .into_iter()
                .map(|(id, ports)| AllowedPeer {
                    identity: id,
                    peer: PeerDescription::of(id, &outcome.identities),
                    ports,
                })
                .collect()
        };
        let endpoints = outcome
            .endpoints
            .iter()
            .map(|e| EndpointReport {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                ip: e.ip,
                identity: e.identity,
                enforce: [(ENFORCE_INGRESS, "ingress"), (ENFORCE_EGRESS, "egress")]
                    .iter()
                    .filter(|(bit, _)| e.enforce & bit != 0)
                    .map(|(_, name)| name.to_string())
                    .collect(),
                policies: e.policies.clone(),
                ingress: peers(e.ip, POLICY_INGRESS),
                egress: peers(e.ip, POLICY_EGRESS),
                dropped: None,
            })
            .collect();
        PolicyReport {
            revision,
            endpoints,
        }
    }

    /// The table `mycni-agent policy` prints.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "revision {}", self.revision);
        if self.endpoints.is_empty() {
            let _ = writeln!(out, "no pod on this node is selected by a NetworkPolicy");
        }
        for e in &self.endpoints {
            let _ = writeln!(
                out,
                "\n{}/{} {} identity {} enforce {}",
                e.namespace,
                e.name,
                e.ip,
                e.identity,
                e.enforce.join(",")
            );
            let _ = writeln!(out, "  policies: {}", e.policies.join(" "));
            if let Some(dropped) = e.dropped {
                let _ = writeln!(
                    out,
                    "  dropped: ingress {} egress {} packets",
                    dropped.ingress, dropped.egress
                );
            }
            for (direction, enforced, peers) in [
                ("ingress", "ingress", &e.ingress),
                ("egress", "egress", &e.egress),
            ] {
                if !e.enforce.iter().any(|d| d == enforced) {
                    continue;
                }
                if peers.is_empty() {
                    let _ = writeln!(out, "  {direction:<8} {:<6} {:<40} denied", "-", "-");
                }
                for p in peers {
                    let id = match p.identity {
                        identity::ANY => "-".to_string(),
                        id => id.to_string(),
                    };
                    let _ = writeln!(
                        out,
                        "  {direction:<8} {id:<6} {:<40} {}",
                        p.peer.text(),
                        p.ports.join(" ")
                    );
                }
            }
        }
        out
    }

    pub fn render_json(&self) -> String {
        // A report always serializes; the fallback is never taken.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::engine::SelectedEndpoint;
    use crate::policy_maps::PolicyDesired;
    use mycni_common::policy::{PolicyEntry, PolicyKey};

    fn outcome() -> PolicyOutcome {
        let web = Ipv4Addr::new(10, 244, 1, 5);
        let key = |peer_identity, port, protocol, direction| {
            (
                PolicyKey {
                    endpoint: web.octets(),
                    peer_identity,
                    port,
                    protocol,
                    direction,
                },
                PolicyEntry { rules: 1 },
            )
        };
        let rules = [
            key(identity::HOST, 0, 0, POLICY_INGRESS),
            key(257, 80, 6, POLICY_INGRESS),
            key(257, 443, 6, POLICY_INGRESS),
            key(258, 0, 17, POLICY_EGRESS),
            key(identity::ANY, 53, 17, POLICY_EGRESS),
        ]
        .into();
        let identities = [
            (
                257,
                IdentityKey::Pods {
                    namespace: "default".into(),
                    labels: [("app".to_string(), "front".to_string())].into(),
                    cidrs: vec![],
                },
            ),
            (258, IdentityKey::Cidrs(vec!["10.0.0.0/8".parse().unwrap()])),
        ]
        .into();
        PolicyOutcome {
            desired: PolicyDesired {
                rules,
                ..PolicyDesired::default()
            },
            endpoints: vec![
                SelectedEndpoint {
                    namespace: "default".into(),
                    name: "web".into(),
                    ip: web,
                    identity: 256,
                    enforce: ENFORCE_INGRESS | ENFORCE_EGRESS,
                    policies: vec!["default/egress".into(), "default/front".into()],
                },
                SelectedEndpoint {
                    namespace: "default".into(),
                    name: "locked".into(),
                    ip: Ipv4Addr::new(10, 244, 1, 6),
                    identity: 259,
                    enforce: ENFORCE_EGRESS,
                    policies: vec!["default/deny-egress".into()],
                },
            ],
            identities,
        }
    }

    #[test]
    fn the_table_names_policies_peers_and_ports() {
        let text = PolicyReport::new(&outcome(), 7).render_text();
        assert_eq!(
            text,
            "revision 7\n\
             \n\
             default/web 10.244.1.5 identity 256 enforce ingress,egress\n\
             \x20 policies: default/egress default/front\n\
             \x20 ingress  1      host (this node)                         all\n\
             \x20 ingress  257    pods default {app=front}                 tcp/80 tcp/443\n\
             \x20 egress   -      any                                      udp/53\n\
             \x20 egress   258    cidrs 10.0.0.0/8                         udp/*\n\
             \n\
             default/locked 10.244.1.6 identity 259 enforce egress\n\
             \x20 policies: default/deny-egress\n\
             \x20 egress   -      -                                        denied\n"
        );
    }

    #[test]
    fn drop_counts_show_when_the_command_read_them() {
        let mut report = PolicyReport::new(&outcome(), 7);
        report.endpoints[1].dropped = Some(DroppedPackets {
            ingress: 0,
            egress: 12,
        });
        let text = report.render_text();
        assert!(
            text.ends_with(
                "  policies: default/deny-egress\n  dropped: ingress 0 egress 12 packets\n  egress   -      -                                        denied\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_json_round_trips_for_the_command() {
        let mut report = PolicyReport::new(&outcome(), 7);
        report.endpoints[0].dropped = Some(DroppedPackets {
            ingress: 3,
            egress: 0,
        });
        let json = report.render_json();
        assert!(json.contains("\"kind\": \"pods\""), "{json}");
        let back: PolicyReport = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, report);
    }

    #[test]
    fn no_selected_pod_says_so() {
        assert_eq!(
            PolicyReport::default().render_text(),
            "revision 0\nno pod on this node is selected by a NetworkPolicy\n"
        );
    }
}
