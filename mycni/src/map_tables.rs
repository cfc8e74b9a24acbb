//! What `mycni-agent endpoints|routes|peers|nat|stats|services` print: the pinned maps as tables for a
//! person or JSON for a script. The renderers are pure (rows in, text out) and unit-tested;
//! the `print_*` functions read the maps and write stdout.
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use mycni_common::service::{
    Backend, ServiceEntry, ServiceKey, ANY_NODE_ADDRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    SERVICE_AFFINITY_CLIENT_IP, SERVICE_EXTERNAL_IP, SERVICE_EXTERNAL_LOCAL, SERVICE_HOST_PORT,
    SERVICE_NODE_PORT,
};
use mycni_common::{
    verdict, Counter, Endpoint, FlowKey, NatEntry, Route, NAT_EGRESS, ROUTE_LOCAL_CIDR,
    ROUTE_LOCAL_ENDPOINT, ROUTE_REMOTE_NODE, ROUTE_REMOTE_TUNNEL,
};
use serde_json::{json, Value};

use crate::datapath::{self, DatapathError, Maps, NatTable};
use crate::host_ports::{HostPortEntries, HostPortTable, HostPortTableError};
use crate::nat;
use crate::netlink::format_mac;
use crate::node_addresses::{NodeAddressError, NodeAddressTable};
use crate::socket_lb::{ServiceTables, ServiceTablesError};

#[derive(Debug, thiserror::Error)]
pub enum MapTablesError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Services(#[from] ServiceTablesError),
    #[error(transparent)]
    NodeAddresses(#[from] NodeAddressError),
    #[error(transparent)]
    HostPorts(#[from] HostPortTableError),
    #[error("cannot write stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

/// Writes a rendered table or JSON document to stdout.
fn print(text: &str) -> Result<(), MapTablesError> {
    use std::io::Write;
    Ok(std::io::stdout().lock().write_all(text.as_bytes())?)
}

/// `mycni-agent endpoints`.
pub fn print_endpoints(root: &Path, json: bool) -> Result<(), MapTablesError> {
    print(&render_endpoints(&Maps::open(root)?.endpoints()?, json))
}

/// `mycni-agent routes`.
pub fn print_routes(root: &Path, json: bool) -> Result<(), MapTablesError> {
    print(&render_routes(&Maps::open(root)?.routes()?, json))
}

/// `mycni-agent peers`.
pub fn print_peers(root: &Path, json: bool) -> Result<(), MapTablesError> {
    print(&render_peers(&datapath::read_peers(root)?, json))
}

/// `mycni-agent nat`: idle times are counted from now.
pub fn print_nat(root: &Path, json: bool) -> Result<(), MapTablesError> {
    let entries = NatTable::open(root)?.entries()?;
    print(&render_nat(&entries, crate::agent::monotonic_ns(), json))
}

/// `mycni-agent stats`.
pub fn print_stats(root: &Path, json: bool) -> Result<(), MapTablesError> {
    print(&render_stats(&datapath::read_stats(root)?, json))
}

/// `mycni-agent services`: the Service frontends and the pods' hostPorts.
pub fn print_services(root: &Path, json: bool) -> Result<(), MapTablesError> {
    let mut rows: Vec<ServiceRow> = ServiceTables::open(root)?
        .frontends()?
        .into_iter()
        .map(|(key, (entry, backends))| (key, entry, backends))
        .collect();
    rows.extend(host_port_rows(&HostPortTable::open(root)?.entries()?));
    let node_addresses: Vec<Ipv4Addr> = NodeAddressTable::open(root)?
        .present()?
        .into_iter()
        .collect();
    print(&render_services(&rows, &node_addresses, json))
}

/// hostPorts as `services` rows: flag `host-port`, service id 0 (they have no slots in
/// `BACKENDS`), the pod as the one backend.
pub fn host_port_rows(entries: &HostPortEntries) -> Vec<ServiceRow> {
    entries
        .iter()
        .map(|(key, entry)| {
            let frontend = ServiceEntry {
                service_id: 0,
                backend_count: 1,
                affinity_timeout_s: 0,
                flags: SERVICE_HOST_PORT,
            };
            (*key, frontend, vec![entry.backend])
        })
        .collect()
}

/// A pretty-printed JSON document and its newline.
fn json_text(value: &Value) -> String {
    // A `Value` always serializes; the fallback is never taken.
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

pub fn render_endpoints(endpoints: &[(Ipv4Addr, Endpoint)], json: bool) -> String {
    if json {
        let rows: Vec<Value> = endpoints
            .iter()
            .map(|(ip, ep)| {
                json!({
                    "ip": ip.to_string(), "ifindex": ep.ifindex,
                    "podMac": format_mac(&ep.pod_mac), "hostMac": format_mac(&ep.host_mac),
                    "containerIdHash": format!("{:016x}", ep.container_id_hash),
                })
            })
            .collect();
        return json_text(&Value::Array(rows));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:<18} {:<18} CONTAINER-HASH",
        "IP", "IFINDEX", "POD-MAC", "HOST-MAC"
    );
    for (ip, ep) in endpoints {
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:<18} {:<18} {:016x}",
            ip.to_string(),
            ep.ifindex,
            format_mac(&ep.pod_mac),
            format_mac(&ep.host_mac),
            ep.container_id_hash
        );
    }
    out
}

fn route_kind(kind: u32) -> &'static str {
    match kind {
        ROUTE_LOCAL_ENDPOINT => "local",
        ROUTE_REMOTE_NODE => "direct",
        ROUTE_REMOTE_TUNNEL => "vxlan",
        ROUTE_LOCAL_CIDR => "own-cidr",
        _ => "unknown",
    }
}

pub fn render_routes(routes: &[(Ipv4Addr, u8, Route)], json: bool) -> String {
    if json {
        let rows: Vec<Value> = routes
            .iter()
            .map(|(ip, len, r)| {
                json!({
                    "prefix": format!("{ip}/{len}"), "kind": route_kind(r.kind), "ifindex": r.ifindex,
                    "nextHop": Ipv4Addr::from(r.next_hop).to_string(),
                    "podMac": format_mac(&r.pod_mac), "hostMac": format_mac(&r.host_mac),
                })
            })
            .collect();
        return json_text(&Value::Array(rows));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<7} {:>8} {:<16} POD-MAC",
        "PREFIX", "KIND", "IFINDEX", "NEXT-HOP"
    );
    for (ip, len, r) in routes {
        let _ = writeln!(
            out,
            "{:<20} {:<7} {:>8} {:<16} {}",
            format!("{ip}/{len}"),
            route_kind(r.kind),
            r.ifindex,
            Ipv4Addr::from(r.next_hop).to_string(),
            format_mac(&r.pod_mac)
        );
    }
    out
}

/// The peer node IPs, sorted: one per line under a heading, or a JSON array of strings.
pub fn render_peers(peers: &[Ipv4Addr], json: bool) -> String {
    let mut sorted = peers.to_vec();
    sorted.sort();
    if json {
        let rows: Vec<Value> = sorted.iter().map(|ip| json!(ip.to_string())).collect();
        return json_text(&Value::Array(rows));
    }
    let mut out = String::from("NODE-IP\n");
    for ip in sorted {
        let _ = writeln!(out, "{ip}");
    }
    out
}

/// The NAT table at monotonic time `now_ns`.
pub fn render_nat(entries: &[(FlowKey, NatEntry)], now_ns: u64, json: bool) -> String {
    let proto = |p: u8| match p {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        _ => "other",
    };
    let rows: Vec<Value> = nat::flow_states(entries)
        .iter()
        .map(|(key, entry, state)| {
            json!({
                "proto": proto(key.proto),
                "direction": if entry.direction == NAT_EGRESS { "egress" } else { "ingress" },
                "state": state.name(),
                "from": format!("{}:{}", Ipv4Addr::from(key.saddr), key.sport),
                "to": format!("{}:{}", Ipv4Addr::from(key.daddr), key.dport),
                "translatedTo": format!("{}:{}", Ipv4Addr::from(entry.addr), entry.port),
                "idleSeconds": now_ns.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
            })
        })
        .collect();
    let occupancy = nat::occupancy(entries);
    if json {
        return json_text(&json!({
            "occupancy": {"tcp": occupancy.tcp, "udp": occupancy.udp, "icmp": occupancy.icmp,
                          "entries": occupancy.entries, "capacity": mycni_common::MAX_NAT},
            "entries": rows,
        }));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flows: tcp {} udp {} icmp {}; entries {} of {}",
        occupancy.tcp,
        occupancy.udp,
        occupancy.icmp,
        occupancy.entries,
        mycni_common::MAX_NAT
    );
    let _ = writeln!(
        out,
        "{:<5} {:<8} {:<12} {:<22} {:<22} {:<22} IDLE",
        "PROTO", "DIR", "STATE", "FROM", "TO", "REWRITTEN"
    );
    for row in rows {
        let text = |key: &str| row[key].as_str().unwrap_or("").to_string();
        let _ = writeln!(
            out,
            "{:<5} {:<8} {:<12} {:<22} {:<22} {:<22} {}s",
            text("proto"),
            text("direction"),
            text("state"),
            text("from"),
            text("to"),
            text("translatedTo"),
            row["idleSeconds"]
        );
    }
    out
}

pub fn render_stats(stats: &[Counter], json: bool) -> String {
    if json {
        let rows: serde_json::Map<String, Value> = stats
            .iter()
            .zip(verdict::NAMES)
            .map(|(c, name)| {
                (
                    name.to_string(),
                    json!({"packets": c.packets, "bytes": c.bytes}),
                )
            })
            .collect();
        return json_text(&Value::Object(rows));
    }
    let mut out = String::new();
    let _ = writeln!(out, "{:<22} {:>12} {:>14}", "VERDICT", "PACKETS", "BYTES");
    for (c, name) in stats.iter().zip(verdict::NAMES) {
        let _ = writeln!(out, "{:<22} {:>12} {:>14}", name, c.packets, c.bytes);
    }
    out
}

/// One frontend as the maps hold it: its key, its entry, and the backends in slots
/// `0..backend_count`.
pub type ServiceRow = (ServiceKey, ServiceEntry, Vec<Backend>);

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_SCTP => "sctp",
        _ => "other",
    }
}

/// The names of a frontend's `SERVICE_*` flags.
fn service_flag_names(flags: u32) -> Vec<&'static str> {
    [
        (SERVICE_NODE_PORT, "node-port"),
        (SERVICE_EXTERNAL_IP, "external-ip"),
        (SERVICE_HOST_PORT, "host-port"),
        (SERVICE_EXTERNAL_LOCAL, "local"),
        (SERVICE_AFFINITY_CLIENT_IP, "affinity"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| *name)
    .collect()
}

fn address_port(address: [u8; 4], port: u16) -> String {
    format!("{}:{port}", Ipv4Addr::from(address))
}

/// A frontend's address as the table shows it: `*` for a wildcard key (a NodePort, a
/// hostPort without hostIP), which answers on every node address.
fn frontend_address_port(address: [u8; 4], port: u16) -> String {
    if address == ANY_NODE_ADDRESS {
        format!("*:{port}")
    } else {
        address_port(address, port)
    }
}

/// The frontends sorted by address, port and protocol, each with its backends: a table
/// (backends space-separated, `refused` when there is none; wildcard frontends as `*:port`,
/// with the node addresses they answer on below) or JSON (`anyNodeAddress` on wildcard
/// frontends).
pub fn render_services(rows: &[ServiceRow], node_addresses: &[Ipv4Addr], json: bool) -> String {
    let mut sorted: Vec<&ServiceRow> = rows.iter().collect();
    sorted.sort_by_key(|(key, _, _)| (key.address, key.port, key.protocol, key.scope));
    if json {
        let rows: Vec<Value> = sorted
            .iter()
            .map(|(key, entry, backends)| {
                json!({
                    "address": Ipv4Addr::from(key.address).to_string(),
                    "anyNodeAddress": key.address == ANY_NODE_ADDRESS,
                    "port": key.port,
                    "protocol": protocol_name(key.protocol),
                    "serviceId": entry.service_id,
                    "flags": service_flag_names(entry.flags),
                    "affinityTimeoutSeconds": (entry.flags & SERVICE_AFFINITY_CLIENT_IP != 0)
                        .then_some(entry.affinity_timeout_s),
                    "backends": backends.iter().map(|b| address_port(b.address, b.port)).collect::<Vec<_>>(),
                })
            })
            .collect();
        return json_text(&Value::Array(rows));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:>6} {:<24} {:>9} BACKENDS",
        "FRONTEND", "ID", "FLAGS", "AFFINITY"
    );
    for (key, entry, backends) in sorted {
        let flags = service_flag_names(entry.flags).join(",");
        let affinity = if entry.flags & SERVICE_AFFINITY_CLIENT_IP != 0 {
            format!("{}s", entry.affinity_timeout_s)
        } else {
            "-".to_string()
        };
        let backends = if backends.is_empty() {
            "refused".to_string()
        } else {
            let list: Vec<String> = backends
                .iter()
                .map(|b| address_port(b.address, b.port))
                .collect();
            list.join(" ")
        };
        let _ = writeln!(
            out,
            "{:<26} {:>6} {:<24} {:>9} {backends}",
            format!(
                "{}/{}",
                frontend_address_port(key.address, key.port),
                protocol_name(key.protocol)
            ),
            entry.service_id,
            if flags.is_empty() { "-" } else { &flags },
            affinity,
        );
    }
    if rows
        .iter()
        .any(|(key, _, _)| key.address == ANY_NODE_ADDRESS)
    {
        let list: Vec<String> = node_addresses.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(out, "* = every node address: {}", list.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_listed_sorted_as_text_and_json() {
        let peers = [Ipv4Addr::new(192, 168, 1, 3), Ipv4Addr::new(10, 0, 0, 9)];
        assert_eq!(
            render_peers(&peers, false),
            "NODE-IP\n10.0.0.9\n192.168.1.3\n"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&render_peers(&peers, true)).ok(),
            Some(json!(["10.0.0.9", "192.168.1.3"]))
        );
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            ifindex: 7,
            pod_mac: [2, 0, 0, 0, 0, 1],
            host_mac: [2, 0, 0, 0, 0, 2],
            container_id_hash: 0xabc,
        }
    }

    #[test]
    fn endpoints_render_as_a_table_and_as_json() {
        let rows = [(Ipv4Addr::new(10, 244, 1, 2), endpoint())];
        assert_eq!(
            render_endpoints(&rows, false),
            "IP                IFINDEX POD-MAC            HOST-MAC           CONTAINER-HASH\n\
             10.244.1.2              7 02:00:00:00:00:01  02:00:00:00:00:02  0000000000000abc\n"
        );
        assert_eq!(
            render_endpoints(&rows, true),
            "[\n  {\n    \"containerIdHash\": \"0000000000000abc\",\n    \"hostMac\": \"02:00:00:00:00:02\",\n    \"ifindex\": 7,\n    \"ip\": \"10.244.1.2\",\n    \"podMac\": \"02:00:00:00:00:01\"\n  }\n]\n"
        );
    }

    #[test]
    fn routes_name_their_kind_and_prefix() {
        let route = Route {
            kind: ROUTE_REMOTE_TUNNEL,
            ifindex: 9,
            next_hop: [192, 168, 1, 12],
            pod_mac: [0; 6],
            host_mac: [0; 6],
        };
        let rows = [(Ipv4Addr::new(10, 244, 2, 0), 24, route)];
        let table = render_routes(&rows, false);
        assert!(
            table.starts_with("PREFIX               KIND     IFINDEX NEXT-HOP         POD-MAC\n")
        );
        assert!(
            table.contains(
                "10.244.2.0/24        vxlan          9 192.168.1.12     00:00:00:00:00:00\n"
            ),
            "{table}"
        );
        let json: Value = serde_json::from_str(&render_routes(&rows, true)).unwrap();
        assert_eq!(json[0]["prefix"], "10.244.2.0/24");
        assert_eq!(json[0]["kind"], "vxlan");
        assert_eq!(json[0]["nextHop"], "192.168.1.12");
    }

    #[test]
    fn stats_list_every_verdict() {
        let mut stats = vec![Counter::default(); verdict::COUNT as usize];
        stats[verdict::SNAT as usize] = Counter {
            packets: 3,
            bytes: 300,
        };
        let table = render_stats(&stats, false);
        assert_eq!(table.lines().count(), 1 + verdict::COUNT as usize);
        let json: Value = serde_json::from_str(&render_stats(&stats, true)).unwrap();
        assert_eq!(json["snat"], json!({"packets": 3, "bytes": 300}));
    }

    #[test]
    fn an_empty_nat_table_reports_its_capacity() {
        let json: Value = serde_json::from_str(&render_nat(&[], 0, true)).unwrap();
        assert_eq!(json["occupancy"]["capacity"], mycni_common::MAX_NAT);
        assert_eq!(json["entries"], json!([]));
        assert!(render_nat(&[], 0, false).starts_with("flows: tcp 0 udp 0 icmp 0; entries 0 of "));
    }

    fn node_addresses() -> Vec<Ipv4Addr> {
        vec![Ipv4Addr::LOCALHOST, Ipv4Addr::new(192, 168, 1, 11)]
    }

    fn service_rows() -> Vec<ServiceRow> {
        let key = |address: [u8; 4], port, protocol| ServiceKey {
            address,
            port,
            protocol,
            scope: 0,
        };
        let backend = |address: [u8; 4], port| Backend {
            address,
            port,
            pad: 0,
        };
        vec![
            (
                key(ANY_NODE_ADDRESS, 30080, PROTO_TCP),
                ServiceEntry {
                    service_id: 3,
                    backend_count: 0,
                    affinity_timeout_s: 0,
                    flags: SERVICE_NODE_PORT | SERVICE_EXTERNAL_LOCAL,
                },
                vec![],
            ),
            (
                key([10, 96, 0, 10], 80, PROTO_TCP),
                ServiceEntry {
                    service_id: 1,
                    backend_count: 2,
                    affinity_timeout_s: 10800,
                    flags: SERVICE_AFFINITY_CLIENT_IP,
                },
                vec![
                    backend([10, 224, 1, 5], 8080),
                    backend([10, 224, 2, 5], 8080),
                ],
            ),
            (
                key([10, 96, 0, 10], 53, PROTO_UDP),
                ServiceEntry {
                    service_id: 2,
                    backend_count: 1,
                    affinity_timeout_s: 0,
                    flags: 0,
                },
                vec![backend([10, 224, 2, 5], 5353)],
            ),
        ]
    }

    #[test]
    fn services_list_each_frontend_with_its_backends() {
        assert_eq!(
            render_services(&service_rows(), &node_addresses(), false),
            "FRONTEND                       ID FLAGS                     AFFINITY BACKENDS\n\
             *:30080/tcp                     3 node-port,local                  - refused\n\
             10.96.0.10:53/udp               2 -                                - 10.224.2.5:5353\n\
             10.96.0.10:80/tcp               1 affinity                    10800s 10.224.1.5:8080 10.224.2.5:8080\n\
             * = every node address: 127.0.0.1 192.168.1.11\n"
        );
    }

    #[test]
    fn host_ports_list_as_frontends_flagged_host_port() {
        let mut entries = HostPortEntries::new();
        entries.insert(
            ServiceKey {
                address: [127, 0, 0, 1],
                port: 54321,
                protocol: PROTO_TCP,
                scope: 0,
            },
            mycni_common::service::HostPortEntry {
                backend: Backend {
                    address: [10, 224, 1, 7],
                    port: 8080,
                    pad: 0,
                },
                attachment_hash: 9,
            },
        );
        assert_eq!(
            render_services(&host_port_rows(&entries), &node_addresses(), false),
            "FRONTEND                       ID FLAGS                     AFFINITY BACKENDS\n\
             127.0.0.1:54321/tcp             0 host-port                        - 10.224.1.7:8080\n"
        );
    }

    #[test]
    fn services_render_as_json() {
        let json: Value =
            serde_json::from_str(&render_services(&service_rows(), &node_addresses(), true))
                .unwrap();
        assert_eq!(
            json,
            json!([
                {"address": "0.0.0.0", "anyNodeAddress": true, "port": 30080, "protocol": "tcp",
                 "serviceId": 3, "flags": ["node-port", "local"], "affinityTimeoutSeconds": null,
                 "backends": []},
                {"address": "10.96.0.10", "anyNodeAddress": false, "port": 53, "protocol": "udp",
                 "serviceId": 2, "flags": [], "affinityTimeoutSeconds": null,
                 "backends": ["10.224.2.5:5353"]},
                {"address": "10.96.0.10", "anyNodeAddress": false, "port": 80, "protocol": "tcp",
                 "serviceId": 1, "flags": ["affinity"], "affinityTimeoutSeconds": 10800,
                 "backends": ["10.224.1.5:8080", "10.224.2.5:8080"]},
            ])
        );
    }
}
