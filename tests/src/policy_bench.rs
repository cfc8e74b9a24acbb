//! The NetworkPolicy rows of `cargo xtask bench` (issue 14): TCP round trip and connection
//! rate from a client pod on the same node and one on another node (direct routing) to a
//! server pod, with 0, 10 and 1,000 NetworkPolicies selecting the server (each allowing the
//! clients), against no policy at all. Real agents, programs, maps, veths and packets; the
//! maps are filled the way the agent fills them: a [`PolicyWorld`] through
//! [`PolicyEngine::compute`], written by [`PolicyTables::apply`].
//!
//! [`policy_world`] is pure (the pods and policies of each configuration); [`run`] builds
//! the two nodes, writes each configuration in turn (interleaved round by round) and
//! measures with the bench's in-process clients ([`crate::bench`]).
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mycni::policy::engine::{pod_sets, PolicyEngine, PolicyWorld};
use mycni::policy::model::PROTO_TCP;
use mycni::policy::model::{Labels, Peer, Policy, PolicyPod, PortRef, PortSpec, Rule, Selector};
use mycni::policy_maps::{PolicyDesired, PolicyTables};
use mycni_common::policy::ENFORCE_INGRESS;
use mycni_common::verdict;
use serde_json::{json, Value};

use crate::bench::{summarize, tcp_connection_rate, tcp_rr};
use crate::{Netns, Node, Pod};

/// How many policies select the server in each measured configuration (besides none at all).
pub const POLICY_COUNTS: [usize; 3] = [0, 10, 1000];
const NAMESPACE: &str = "bench";
const NODE_1: &str = "n1";
const NODE_2: &str = "n2";
const NODE_1_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 110, 1);
const NODE_2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 110, 2);
/// The ports the clients are allowed to (round trips, connection rate), and one the
/// `outsider` pod tries to show the policy is enforced.
const RR_PORT: u16 = 7100;
const RATE_PORT: u16 = 7101;
const CHECK_PORT: u16 = 7102;
/// Policy `i` also admits its own peer pod on `PEER_PORT_BASE + i`.
const PEER_PORT_BASE: u16 = 9000;

/// One measured configuration of node-1's policy maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    /// No NetworkPolicy in the cluster: the maps empty, `PolicyState::active` 0.
    NoPolicy,
    /// This many policies select the server; one more selects another pod of node-1
    /// (so enforcement is on, even at 0).
    Selecting(usize),
}

impl Config {
    pub fn name(&self) -> String {
        match self {
            Config::NoPolicy => "no policy".into(),
            Config::Selecting(n) => format!("{n} selecting the server"),
        }
    }

    fn all() -> Vec<Config> {
        std::iter::once(Config::NoPolicy)
            .chain(POLICY_COUNTS.iter().map(|&n| Config::Selecting(n)))
            .collect()
    }
}

/// The real pods' addresses, as the engine sees them.
#[derive(Clone, Copy, Debug)]
pub struct BenchPods {
    pub server: Ipv4Addr,
    pub near_client: Ipv4Addr,
    pub far_client: Ipv4Addr,
    /// On node-1, labelled `role=other`: no policy admits it.
    pub outsider: Ipv4Addr,
    /// On node-1, selected by the `decoy` policy in every configuration but `NoPolicy`.
    pub decoy: Ipv4Addr,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(name: &str, pairs: &[(&str, &str)], ip: Ipv4Addr, node: &str) -> PolicyPod {
    PolicyPod {
        namespace: NAMESPACE.into(),
        name: name.into(),
        labels: labels(pairs),
        ip,
        node: node.into(),
        named_ports: Vec::new(),
    }
}

fn selector(pairs: &[(&str, &str)]) -> Selector {
    Selector {
        match_labels: labels(pairs),
        expressions: Vec::new(),
    }
}

fn pods_peer(pairs: &[(&str, &str)]) -> Peer {
    Peer::Pods {
        namespaces: None,
        pods: selector(pairs),
    }
}

fn tcp(port: u16) -> PortSpec {
    PortSpec {
        protocol: PROTO_TCP,
        port: PortRef::Number(port),
    }
}

/// Policy `index` of `count`: ingress to `app=server` from `role=client` on the measured
/// ports, and from its own peer pod (`peer=p<index>`, elsewhere in the cluster) on a port
/// of its own, so the maps grow with the count (a rule key and an identity per policy)
/// the way distinct real policies make them grow.
fn server_policy(index: usize) -> Policy {
    let peer = format!("p{index}");
    Policy {
        namespace: NAMESPACE.into(),
        name: format!("allow-{index}"),
        pod_selector: selector(&[("app", "server")]),
        enforce: ENFORCE_INGRESS,
        ingress: vec![
            Rule {
                peers: vec![pods_peer(&[("role", "client")])],
                ports: vec![tcp(RR_PORT), tcp(RATE_PORT)],
            },
            Rule {
                peers: vec![pods_peer(&[("peer", &peer)])],
                ports: vec![tcp(PEER_PORT_BASE + index as u16)],
            },
        ],
        egress: Vec::new(),
    }
}

/// The address of policy `index`'s peer pod: on no real node (only its identity matters).
fn peer_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 100 + (index / 250) as u8, (index % 250 + 1) as u8)
}

/// The cluster's pods and policies in `config`: the five real pods, one peer pod per
/// policy, and the policies.
pub fn policy_world(pods: &BenchPods, config: Config) -> (Vec<PolicyPod>, Vec<Policy>) {
    let mut all = vec![
        pod("server", &[("app", "server")], pods.server, NODE_1),
        pod(
            "near-client",
            &[("role", "client")],
            pods.near_client,
            NODE_1,
        ),
        pod("far-client", &[("role", "client")], pods.far_client, NODE_2),
        pod("outsider", &[("role", "other")], pods.outsider, NODE_1),
        pod("decoy", &[("app", "decoy")], pods.decoy, NODE_1),
    ];
    let count = match config {
        Config::NoPolicy => return (all, Vec::new()),
        Config::Selecting(count) => count,
    };
    let mut policies = vec![Policy {
        namespace: NAMESPACE.into(),
        name: "decoy".into(),
        pod_selector: selector(&[("app", "decoy")]),
        enforce: ENFORCE_INGRESS,
        ingress: vec![Rule {
            peers: vec![pods_peer(&[("role", "client")])],
            ports: Vec::new(),
        }],
        egress: Vec::new(),
    }];
    for index in 0..count {
        all.push(pod(
            &format!("peer-{index}"),
            &[("peer", &format!("p{index}"))],
            peer_ip(index),
            "elsewhere",
        ));
        policies.push(server_policy(index));
    }
    (all, policies)
}

/// Node-1's desired policy maps in `config`, computed by the agent's engine.
pub fn node1_maps(
    engine: &mut PolicyEngine,
    pods: &BenchPods,
    host_addresses: &[Ipv4Addr],
    config: Config,
) -> PolicyDesired {
    let (all, policies) = policy_world(pods, config);
    let world = PolicyWorld {
        node_name: NODE_1,
        host_addresses: host_addresses.to_vec(),
        remote_node_addresses: vec![NODE_2_IP],
        pod_sets: pod_sets(&all),
        namespaces: Default::default(),
        policies: policies.iter().collect(),
    };
    engine.compute(&world).desired
}

/// How long and how often to measure.
pub struct Settings {
    pub rounds: usize,
    pub rate_time: Duration,
    pub rr_count: usize,
}

/// The two nodes, their agents and pods.
struct Lab {
    server: Pod,
    near_client: Pod,
    far_client: Pod,
    outsider: Pod,
    decoy: Pod,
    host_addresses: Vec<Ipv4Addr>,
    n1: Node,
    _n2: Node,
    nodes_file: std::path::PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.nodes_file);
    }
}

impl Lab {
    fn new(prefix: &str) -> Result<Lab> {
        let nodes_file = crate::run_dir().join(format!("{prefix}-nodes"));
        std::fs::write(
            &nodes_file,
            format!("{NODE_1} {NODE_1_IP} 10.244.1.0/24\n{NODE_2} {NODE_2_IP} 10.244.2.0/24\n"),
        )?;
        let mut n1 = Node::bare(prefix, NODE_1, "10.244.1.0/24")?;
        let mut n2 = Node::bare(prefix, NODE_2, "10.244.2.0/24")?;
        n1.netns.add_veth("eth0", &n2.netns, "eth0")?;
        let file = nodes_file.display().to_string();
        for (node, name, ip) in [(&mut n1, NODE_1, NODE_1_IP), (&mut n2, NODE_2, NODE_2_IP)] {
            node.netns
                .exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            node.netns.exec(&["ip", "link", "set", "eth0", "up"])?;
            node.netns.sysctl("net.ipv4.ip_forward", "1")?;
            node.node_ip = ip;
            let ip = ip.to_string();
            node.start_agent(&[
                "--node-name",
                name,
                "--node-ip",
                &ip,
                "--uplink",
                "eth0",
                "--cluster-cidr",
                "10.244.0.0/16",
                "--nodes-file",
                &file,
                "--tunnel-mode",
                "direct",
            ])?;
        }
        crate::cluster::wait_for(Duration::from_secs(10), || {
            let routes = mycni::datapath::Maps::open(&n1.pin_root())?.routes()?;
            Ok(routes.iter().any(|(_, len, _)| *len == 24))
        })
        .context("node-1 never learned node-2's pod CIDR")?;
        let server = n1.add_pod("server")?;
        let near_client = n1.add_pod("near")?;
        let outsider = n1.add_pod("outsider")?;
        let decoy = n1.add_pod("decoy")?;
        let far_client = n2.add_pod("far")?;
        let host_addresses = addresses(&n1.netns)?;
        Ok(Lab {
            server,
            near_client,
            far_client,
            outsider,
            decoy,
            host_addresses,
            n1,
            _n2: n2,
            nodes_file,
        })
    }

    fn pods(&self) -> BenchPods {
        BenchPods {
            server: self.server.ip,
            near_client: self.near_client.ip,
            far_client: self.far_client.ip,
            outsider: self.outsider.ip,
            decoy: self.decoy.ip,
        }
    }

    /// Whether a connection from the outsider to the server completes. A SYN policy drops
    /// is never answered: no answer within 1 s is a refusal (this checks the
    /// configuration, it is not a measurement).
    fn outsider_connects(&self) -> Result<bool> {
        let target = SocketAddr::from((self.server.ip, CHECK_PORT));
        let _listener = self
            .server
            .netns
            .run_inside(|| Ok(TcpListener::bind(target)?))?;
        self.outsider
            .netns
            .run_inside(|| Ok(TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()))
    }

    fn ingress_drops(&self) -> Result<u64> {
        Ok(
            mycni::datapath::read_stats(&self.n1.pin_root())?
                [verdict::DROP_POLICY_INGRESS as usize]
                .packets,
        )
    }

    /// Shows that node-1 enforces what `config` says: the outsider is refused (and the
    /// drop counted) exactly when some policy selects the server.
    fn check_enforced(&self, tables: &PolicyTables, config: Config) -> Result<()> {
        let state = tables.state()?;
        ensure!(
            (state.active != 0) == (config != Config::NoPolicy),
            "{}: policy state {state:?}",
            config.name()
        );
        let before = self.ingress_drops()?;
        let connects = self.outsider_connects()?;
        let dropped = self.ingress_drops()? - before;
        let selected = matches!(config, Config::Selecting(n) if n > 0);
        if selected && (connects || dropped == 0) {
            bail!(
                "{}: the outsider connected ({connects}), {dropped} drops",
                config.name()
            );
        }
        if !selected && !connects {
            bail!("{}: the outsider was refused", config.name());
        }
        Ok(())
    }

    fn client(&self, path: Path) -> &Netns {
        match path {
            Path::SameNode => &self.near_client.netns,
            Path::CrossNode => &self.far_client.netns,
        }
    }
}

/// Every IPv4 address of a namespace but loopback (the agent's `HOST` identity).
fn addresses(netns: &Netns) -> Result<Vec<Ipv4Addr>> {
    let out = netns.exec(&["ip", "-4", "-o", "addr", "show"])?;
    out.lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .map(|cidr| {
            let ip = cidr.split('/').next().unwrap_or(cidr);
            ip.parse::<Ipv4Addr>()
                .with_context(|| format!("address {cidr}"))
        })
        .filter(|ip| !ip.as_ref().is_ok_and(|ip| ip.is_loopback()))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Path {
    SameNode,
    CrossNode,
}

impl Path {
    const ALL: [Path; 2] = [Path::SameNode, Path::CrossNode];

    fn name(self) -> &'static str {
        match self {
            Path::SameNode => "same node",
            Path::CrossNode => "cross node",
        }
    }
}

const RR_P50: &str = "tcp_rr_p50_us";
const RR_AVG: &str = "tcp_rr_avg_us";
const CONN_RATE: &str = "tcp_conn_per_s";

/// Samples per path, per configuration, per metric, one per round.
type Samples = BTreeMap<&'static str, BTreeMap<Config, BTreeMap<&'static str, Vec<f64>>>>;

fn series<'s>(samples: &'s Samples, path: Path, config: Config, metric: &str) -> &'s [f64] {
    samples
        .get(path.name())
        .and_then(|by_config| by_config.get(&config))
        .and_then(|metrics| metrics.get(metric))
        .map_or(&[][..], Vec::as_slice)
}

/// Each round's value under `config` over the same round's without policy (paired, so what
/// the shared machine does between rounds cancels out); their median.
fn paired_ratio(samples: &Samples, path: Path, config: Config, metric: &str) -> f64 {
    let ours = series(samples, path, config, metric);
    let base = series(samples, path, Config::NoPolicy, metric);
    let ratios: Vec<f64> = ours.iter().zip(base).map(|(o, b)| o / b).collect();
    summarize(&ratios).median
}

/// Builds the nodes, measures every configuration round by round (their order rotated each
/// round), and returns the report section and its JSON.
pub fn run(prefix: &str, settings: &Settings) -> Result<(String, Value)> {
    let lab = Lab::new(prefix)?;
    let pods = lab.pods();
    let mut engine = PolicyEngine::default();
    let mut tables = PolicyTables::open(&lab.n1.pin_root())?;
    let configs = Config::all();
    let mut samples: Samples = BTreeMap::new();
    // (engine, map writes) per round.
    let mut apply_ms: BTreeMap<Config, Vec<(f64, f64)>> = BTreeMap::new();
    let mut map_sizes: BTreeMap<Config, (usize, usize)> = BTreeMap::new();
    for round in 0..settings.rounds {
        for offset in 0..configs.len() {
            let config = configs[(offset + round) % configs.len()];
            eprintln!(
                "policy round {}/{}: {} ...",
                round + 1,
                settings.rounds,
                config.name()
            );
            let start = Instant::now();
            let desired = node1_maps(&mut engine, &pods, &lab.host_addresses, config);
            let computed = start.elapsed();
            tables.apply(&desired)?;
            apply_ms.entry(config).or_default().push((
                computed.as_secs_f64() * 1e3,
                (start.elapsed() - computed).as_secs_f64() * 1e3,
            ));
            map_sizes.insert(config, (desired.rules.len(), desired.identities.len()));
            lab.check_enforced(&tables, config)?;
            for path in Path::ALL {
                let client = lab.client(path);
                let server = &lab.server.netns;
                let context = || format!("{} at {}", path.name(), config.name());
                let trips = tcp_rr(
                    server,
                    client,
                    SocketAddr::from((pods.server, RR_PORT)),
                    settings.rr_count,
                )
                .with_context(context)?;
                let rate = tcp_connection_rate(
                    server,
                    client,
                    SocketAddr::from((pods.server, RATE_PORT)),
                    settings.rate_time,
                )
                .with_context(context)?;
                let metrics = samples
                    .entry(path.name())
                    .or_default()
                    .entry(config)
                    .or_default();
                for (metric, value) in [
                    (RR_P50, trips.p50_us),
                    (RR_AVG, trips.avg_us),
                    (CONN_RATE, rate),
                ] {
                    metrics.entry(metric).or_default().push(value);
                }
            }
        }
    }
    // Leave node-1 as it was found before the nodes go.
    tables.apply(&PolicyDesired::default())?;
    drop(lab);
    Ok(report(&samples, &apply_ms, &map_sizes, settings))
}

/// A target row: (what, value, met).
type TargetRow = (String, f64, bool);

fn targets(samples: &Samples) -> Vec<TargetRow> {
    let most = Config::Selecting(POLICY_COUNTS[POLICY_COUNTS.len() - 1]);
    let mut rows = Vec::new();
    for path in Path::ALL {
        let rr = paired_ratio(samples, path, most, RR_P50);
        rows.push((
            format!(
                "Policy, {}: round trip (median), 1,000 policies / no policy (paired per round) ≤ 1.05",
                path.name()
            ),
            rr,
            rr <= 1.05,
        ));
        // A rate's cost is its inverse: no policy's rate over the 1,000 policies' one.
        let rate = 1.0 / paired_ratio(samples, path, most, CONN_RATE);
        rows.push((
            format!(
                "Policy, {}: connections/s, no policy / 1,000 policies (paired per round) ≤ 1.10",
                path.name()
            ),
            rate,
            rate <= 1.10,
        ));
    }
    rows
}

fn report(
    samples: &Samples,
    apply_ms: &BTreeMap<Config, Vec<(f64, f64)>>,
    map_sizes: &BTreeMap<Config, (usize, usize)>,
    settings: &Settings,
) -> (String, Value) {
    let configs = Config::all();
    let mut md = format!(
        "\n## NetworkPolicy: a client pod to a server pod that 0, 10 or 1,000 policies select, against no policy ({} rounds, configurations interleaved; medians with min–max; ratios paired per round)\n",
        settings.rounds
    );
    for (metric, label, digits) in [
        (RR_P50, "TCP round trip, median (µs)", 1),
        (RR_AVG, "TCP round trip, avg (µs)", 1),
        (CONN_RATE, "TCP connections/s", 0),
    ] {
        md += &format!(
            "\n| policies | same node: {label} | / no policy | cross node: {label} | / no policy |\n|---|---|---|---|---|\n"
        );
        for config in &configs {
            let mut cells = Vec::new();
            for path in Path::ALL {
                let values = series(samples, path, *config, metric);
                if values.is_empty() {
                    cells.push("–".to_string());
                    cells.push("–".to_string());
                    continue;
                }
                let s = summarize(values);
                cells.push(format!(
                    "{:.digits$} ({:.digits$}–{:.digits$})",
                    s.median, s.min, s.max
                ));
                cells.push(format!(
                    "{:.3}",
                    paired_ratio(samples, path, *config, metric)
                ));
            }
            md += &format!("| {} | {} |\n", config.name(), cells.join(" | "));
        }
    }
    md += "\n| policies | node-1's POLICY entries | POLICY_IDENTITIES entries | engine (ms, median) | writing the difference from the last configuration (ms, median) |\n|---|---|---|---|---|\n";
    for config in &configs {
        let (rules, identities) = map_sizes.get(config).copied().unwrap_or_default();
        let times = apply_ms.get(config).map_or(&[][..], Vec::as_slice);
        let median = |pick: fn(&(f64, f64)) -> f64| {
            summarize(&times.iter().map(pick).collect::<Vec<_>>()).median
        };
        md += &format!(
            "| {} | {rules} | {identities} | {:.1} | {:.1} |\n",
            config.name(),
            median(|t| t.0),
            median(|t| t.1)
        );
    }
    let rows = targets(samples);
    md += "\n| target | ratio (median) | met |\n|---|---|---|\n";
    for (what, value, met) in &rows {
        md += &format!(
            "| {what} | {value:.3} | {} |\n",
            if *met { "yes" } else { "**no**" }
        );
    }
    let samples_json: serde_json::Map<String, Value> = samples
        .iter()
        .map(|(path, by_config)| {
            let inner: serde_json::Map<String, Value> = by_config
                .iter()
                .map(|(config, metrics)| (config.name(), json!(metrics)))
                .collect();
            (path.to_string(), Value::Object(inner))
        })
        .collect();
    let json = json!({
        "samples": samples_json,
        "apply_ms": apply_ms.iter().map(|(c, v)| (c.name(), json!(v))).collect::<serde_json::Map<String, Value>>(),
        "map_entries": map_sizes.iter().map(|(c, (r, i))| (c.name(), json!({"policy": r, "identities": i}))).collect::<serde_json::Map<String, Value>>(),
        "targets": rows.iter().map(|(what, value, met)| json!({"target": what, "value": value, "met": met})).collect::<Vec<_>>(),
    });
    (md, json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnetwork::Ipv4Network;
    use mycni_common::policy::{identity, PolicyKey, POLICY_INGRESS};

    const PODS: BenchPods = BenchPods {
        server: Ipv4Addr::new(10, 244, 1, 2),
        near_client: Ipv4Addr::new(10, 244, 1, 3),
        outsider: Ipv4Addr::new(10, 244, 1, 4),
        decoy: Ipv4Addr::new(10, 244, 1, 5),
        far_client: Ipv4Addr::new(10, 244, 2, 2),
    };
    const HOST: [Ipv4Addr; 1] = [NODE_1_IP];

    fn client_key(desired: &PolicyDesired, client: Ipv4Addr, port: u16) -> Option<PolicyKey> {
        let id = *desired.identities.get(&Ipv4Network::from(client))?;
        let key = PolicyKey {
            endpoint: PODS.server.octets(),
            peer_identity: id,
            port,
            protocol: PROTO_TCP,
            direction: POLICY_INGRESS,
        };
        desired.rules.contains_key(&key).then_some(key)
    }

    #[test]
    fn no_policy_leaves_the_maps_empty() {
        let desired = node1_maps(&mut PolicyEngine::default(), &PODS, &HOST, Config::NoPolicy);
        assert_eq!(desired, PolicyDesired::default());
        assert!(!desired.active());
    }

    #[test]
    fn zero_policies_enforce_on_the_decoy_only() {
        let desired = node1_maps(
            &mut PolicyEngine::default(),
            &PODS,
            &HOST,
            Config::Selecting(0),
        );
        assert!(desired.active());
        assert_eq!(
            desired.endpoints.keys().copied().collect::<Vec<_>>(),
            vec![PODS.decoy]
        );
    }

    #[test]
    fn every_count_admits_both_clients_on_the_measured_ports_and_grows_the_maps() {
        for count in [10, 1000] {
            let desired = node1_maps(
                &mut PolicyEngine::default(),
                &PODS,
                &HOST,
                Config::Selecting(count),
            );
            let server = desired
                .endpoints
                .get(&PODS.server)
                .expect("server selected");
            assert_eq!(server.enforce, ENFORCE_INGRESS);
            for client in [PODS.near_client, PODS.far_client] {
                for port in [RR_PORT, RATE_PORT] {
                    let key = client_key(&desired, client, port).expect("client admitted");
                    assert_eq!(desired.rules[&key].rules, count as u32);
                }
                assert!(client_key(&desired, client, CHECK_PORT).is_none());
            }
            // The outsider has no identity any rule names: WORLD, no rule.
            assert!(!desired
                .identities
                .contains_key(&Ipv4Network::from(PODS.outsider)));
            let server_rules = desired
                .rules
                .keys()
                .filter(|k| k.endpoint == PODS.server.octets())
                .count();
            // One per policy's own peer, the clients' two ports, the node's probes.
            assert_eq!(server_rules, count + 2 + 1);
            assert!(desired
                .rules
                .keys()
                .any(|k| k.endpoint == PODS.server.octets() && k.peer_identity == identity::HOST));
            // Every peer pod's /32, the clients' two, the host's.
            assert!(desired.identities.len() >= count + 3);
        }
    }
}
