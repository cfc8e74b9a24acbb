//! The Services rows of `cargo xtask bench` (issue 15): new TCP connections per second from
//! a pod to a ClusterIP with 10, 1,000 and 5,000 Services installed, through mycni's socket
//! LB and through kube-proxy's iptables rules (Kubernetes 1.20's shape, [`crate::kubeproxy`]),
//! and the round trip on an established Service connection against the same backend
//! addressed directly. One node, the same pods for every path: the agent runs in eBPF
//! Services mode on a cgroup of this run's own, so a client process inside that cgroup is
//! load-balanced by mycni and one outside it goes through the node's iptables.
//!
//! [`service_set`] is pure (the same N Services for both); [`run`] builds the node, writes
//! each set and measures with the bench's own clients (`mycni-sock-probe conn-rate` and
//! `tcp-rr`, processes so that they can live in the cgroup).
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mycni::socket_lb::{DesiredServices, ServiceTables};
use mycni_common::service::{Backend, ServiceEntry, ServiceKey, PROTO_TCP};
use serde_json::{json, Value};

use crate::bench::{summarize, Server};
use crate::cgroup::TestCgroup;
use crate::kubeproxy::{self, Service};
use crate::{bin_dir, Netns, Node, NODE_IP};

/// How many Services each measurement runs with.
pub const SERVICE_COUNTS: [usize; 3] = [10, 1000, 5000];
/// The ClusterIP under test: port `RATE_PORT` for connection rates, `RR_PORT` for round trips.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const RATE_PORT: u16 = 80;
/// Each connection-rate measurement, in this many turns per client (see [`run`]).
const RATE_SLICES: usize = 5;
const RR_PORT: u16 = 81;
/// The backends' ports behind `RATE_PORT` and `RR_PORT`.
const BACKEND_RATE_PORT: u16 = 8080;
const BACKEND_RR_PORT: u16 = 8081;
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const POD_CIDR: &str = "10.244.30.0/24";
const UPLINK_IP: &str = "192.168.210.1";

/// The same `count` TCP Services for both load balancers, as (mycni's desired maps,
/// kube-proxy's Services): the two under test (`CLUSTER_IP` ports 80 and 81 over
/// `backends`) and `count - 2` others over the same backends. The ones under test sit
/// halfway down the list, so kube-proxy's `KUBE-SERVICES` walk is the average one (it
/// writes Services in no particular order).
pub fn service_set(count: usize, backends: &[Ipv4Addr]) -> (DesiredServices, Vec<Service>) {
    let count = count.max(2);
    let middle = count / 2;
    let mut desired = DesiredServices::new();
    let mut services = Vec::with_capacity(count);
    let mut others = 0usize;
    for index in 0..count {
        let (name, cluster_ip, port, backend_port) = match index {
            i if i == middle => (
                "bench/under-test:rate".to_string(),
                CLUSTER_IP,
                RATE_PORT,
                BACKEND_RATE_PORT,
            ),
            i if i == middle + 1 => (
                "bench/under-test:rr".to_string(),
                CLUSTER_IP,
                RR_PORT,
                BACKEND_RR_PORT,
            ),
            _ => {
                others += 1;
                let ip = Ipv4Addr::new(10, 97, (others / 250) as u8, (others % 250 + 1) as u8);
                (
                    format!("bench/other-{others}:http"),
                    ip,
                    80,
                    BACKEND_RATE_PORT,
                )
            }
        };
        let endpoints: Vec<Backend> = backends
            .iter()
            .map(|ip| Backend {
                address: ip.octets(),
                port: backend_port,
                pad: 0,
            })
            .collect();
        desired.insert(
            ServiceKey {
                address: cluster_ip.octets(),
                port,
                protocol: PROTO_TCP,
                scope: 0,
            },
            (
                ServiceEntry {
                    service_id: index as u32 + 1,
                    backend_count: 0,
                    affinity_timeout_s: 0,
                    flags: 0,
                },
                endpoints,
            ),
        );
        services.push(Service {
            name,
            cluster_ip,
            port,
            endpoints: backends
                .iter()
                .map(|ip| SocketAddr::from((*ip, backend_port)))
                .collect(),
        });
    }
    (desired, services)
}

/// How long and how often to measure.
pub struct Settings {
    pub rounds: usize,
    pub rate_time: Duration,
    pub rr_count: usize,
}

/// One way for the client to reach the backends.
struct Client {
    name: &'static str,
    /// Inside the run's cgroup (mycni's socket LB applies) or outside it.
    in_cgroup: bool,
    /// Addressed to the ClusterIP, or to the first backend's pod IP.
    via_cluster_ip: bool,
    /// From a second client pod: see [`Lab::kube_proxy_client`].
    second_pod: bool,
}

pub const MYCNI: &str = "mycni socket LB";
pub const KUBE_PROXY: &str = "kube-proxy iptables";
pub const DIRECT: &str = "pod IP, no Service";

const CLIENTS: [Client; 3] = [
    Client {
        name: MYCNI,
        in_cgroup: true,
        via_cluster_ip: true,
        second_pod: false,
    },
    Client {
        name: DIRECT,
        in_cgroup: true,
        via_cluster_ip: false,
        second_pod: false,
    },
    Client {
        name: KUBE_PROXY,
        in_cgroup: false,
        via_cluster_ip: true,
        second_pod: true,
    },
];

/// The node, its pods and servers, and the run's cgroup.
struct Lab {
    backends: Vec<crate::Pod>,
    client: crate::Pod,
    /// kube-proxy's client, a twin of `client`: mycni remembers (in `STACK_FLOWS`) the
    /// reply tuple of every flow the node stack translated and sends its replies through
    /// the stack, with no expiry but LRU eviction; a later direct connection from the same
    /// pod reusing such a port has its SYN-ACK sent into conntrack's stale DNAT entry and
    /// never connects. Separate pods keep the paths' port spaces apart.
    kube_proxy_client: crate::Pod,
    servers: Vec<(usize, Server)>,
    // Dropped after the node (whose agent and pins go first), so the links are gone.
    node: Node,
    _uplink_peer: Netns,
    cgroup: TestCgroup,
}

impl Lab {
    fn new(prefix: &str) -> Result<Lab> {
        let cgroup = TestCgroup::new(prefix)?;
        let mut node = Node::bare(prefix, "node", POD_CIDR)?;
        let peer = Netns::new(&format!("{prefix}-peer"))?;
        node.netns.add_veth("eth0", &peer, "eth0")?;
        for (netns, ip) in [(&node.netns, UPLINK_IP), (&peer, "192.168.210.2")] {
            netns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            netns.exec(&["ip", "link", "set", "eth0", "up"])?;
        }
        node.netns
            .exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        // kube-proxy's DNATed connections are forwarded by the node.
        node.netns.sysctl("net.ipv4.ip_forward", "1")?;
        node.node_ip = UPLINK_IP.parse()?;
        let nodes_file = node.data_dir.join("nodes");
        std::fs::write(&nodes_file, format!("node {UPLINK_IP} {POD_CIDR}\n"))?;
        let (nodes_file, cgroup_arg) = (nodes_file.display().to_string(), cgroup.arg());
        node.start_agent(&[
            "--node-name",
            "node",
            "--node-ip",
            UPLINK_IP,
            "--uplink",
            "eth0",
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--nodes-file",
            &nodes_file,
            "--service-mode",
            "ebpf",
            "--cgroup-path",
            &cgroup_arg,
        ])?;
        crate::cluster::wait_for(Duration::from_secs(10), || {
            Ok(mycni::socket_lb::cgroup::services_attached(
                &node.pin_root(),
            ))
        })
        .context("the agent never attached the Services programs")?;
        let backends = (0..3)
            .map(|i| node.add_pod(&format!("b{i}")))
            .collect::<Result<Vec<_>>>()?;
        let client = node.add_pod("client")?;
        let kube_proxy_client = node.add_pod("kpclient")?;
        let mut servers = Vec::new();
        for (index, pod) in backends.iter().enumerate() {
            servers.push((
                index,
                Server::one_byte(&pod.netns, SocketAddr::from((pod.ip, BACKEND_RATE_PORT)))?,
            ));
            servers.push((
                index,
                Server::echo(&pod.netns, SocketAddr::from((pod.ip, BACKEND_RR_PORT)))?,
            ));
        }
        Ok(Lab {
            backends,
            client,
            kube_proxy_client,
            servers,
            node,
            _uplink_peer: peer,
            cgroup,
        })
    }

    /// Writes `count` Services to mycni's maps and kube-proxy's rules (each replacing the
    /// last set); returns how long each took.
    fn install(&self, count: usize) -> Result<(Duration, Duration)> {
        let ips: Vec<Ipv4Addr> = self.backends.iter().map(|pod| pod.ip).collect();
        let (desired, services) = service_set(count, &ips);
        let start = Instant::now();
        ServiceTables::open(&self.node.pin_root())?.apply(&desired)?;
        let maps = start.elapsed();
        let start = Instant::now();
        kubeproxy::install(&self.node.netns, CLUSTER_CIDR, &services)?;
        Ok((maps, start.elapsed()))
    }

    /// Writes `count` Services to mycni's maps alone (kube-proxy's rules stay as they are:
    /// the socket LB's connections never pass the node's netfilter).
    fn install_mycni_only(&self, count: usize) -> Result<()> {
        let ips: Vec<Ipv4Addr> = self.backends.iter().map(|pod| pod.ip).collect();
        let (desired, _) = service_set(count, &ips);
        ServiceTables::open(&self.node.pin_root())?.apply(&desired)?;
        Ok(())
    }

    /// The socket LB's connections/s over `time`, checked to be its translations.
    fn checked_mycni_rate(&self, time: Duration) -> Result<f64> {
        let client = &CLIENTS[0];
        let before = self.translated()?;
        let rate = self.connection_rate(client, time)?;
        let translated = self.translated()? - before;
        ensure!(
            translated as f64 >= rate * time.as_secs_f64() * 0.9,
            "{}: {translated} translations for {rate:.0} connections/s",
            client.name
        );
        Ok(rate)
    }

    /// Runs `mycni-sock-probe argv` as `client`; its one line.
    fn probe(&self, client: &Client, argv: &[&str]) -> Result<String> {
        let probe = bin_dir().join("mycni-sock-probe").display().to_string();
        let mut full = vec![probe.as_str()];
        full.extend_from_slice(argv);
        let cgroup = client.in_cgroup.then_some(&self.cgroup);
        let pod = if client.second_pod {
            &self.kube_proxy_client
        } else {
            &self.client
        };
        let output = crate::run(&mut TestCgroup::command_in(cgroup, &pod.netns, &full))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    fn target(&self, client: &Client, cluster_port: u16, backend_port: u16) -> SocketAddr {
        if client.via_cluster_ip {
            SocketAddr::from((CLUSTER_IP, cluster_port))
        } else {
            SocketAddr::from((self.backends[0].ip, backend_port))
        }
    }

    fn connection_rate(&self, client: &Client, time: Duration) -> Result<f64> {
        let target = self
            .target(client, RATE_PORT, BACKEND_RATE_PORT)
            .to_string();
        let millis = time.as_millis().to_string();
        let line = self.probe(client, &["conn-rate", &target, &millis])?;
        field(&line, "per_s")
    }

    /// The average and the median round trip, µs.
    fn round_trip_us(&self, client: &Client, count: usize) -> Result<(f64, f64)> {
        let target = self.target(client, RR_PORT, BACKEND_RR_PORT).to_string();
        let line = self.probe(client, &["tcp-rr", &target, &count.to_string()])?;
        Ok((field(&line, "avg_us")?, field(&line, "p50_us")?))
    }

    /// Mycni translated this run's connections (a sanity check that the cgroup client
    /// really went through the socket LB).
    fn translated(&self) -> Result<u64> {
        let stats = mycni::datapath::read_stats(&self.node.pin_root())?;
        Ok(stats[mycni_common::verdict::SERVICE_TRANSLATED as usize].packets)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (index, server) in self.servers.drain(..) {
            server.stop(&self.backends[index].netns);
        }
    }
}

/// `key=value` out of a probe's line.
fn field(line: &str, key: &str) -> Result<f64> {
    let value = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key} in the probe's {line:?}"))?;
    value
        .parse()
        .with_context(|| format!("{key} in the probe's {line:?}"))
}

/// Samples per client, per Service count, per metric.
type Samples = BTreeMap<&'static str, BTreeMap<usize, BTreeMap<&'static str, Vec<f64>>>>;

fn push(
    samples: &mut Samples,
    client: &'static str,
    count: usize,
    metric: &'static str,
    value: f64,
) {
    samples
        .entry(client)
        .or_default()
        .entry(count)
        .or_default()
        .entry(metric)
        .or_default()
        .push(value);
}

fn median(samples: &Samples, client: &str, count: usize, metric: &str) -> f64 {
    samples
        .get(client)
        .and_then(|by_count| by_count.get(&count))
        .and_then(|metrics| metrics.get(metric))
        .map(|values| summarize(values).median)
        .unwrap_or(f64::NAN)
}

fn cell(samples: &Samples, client: &str, count: usize, metric: &str) -> String {
    let values = samples
        .get(client)
        .and_then(|by_count| by_count.get(&count))
        .and_then(|metrics| metrics.get(metric));
    match values {
        Some(values) => {
            let s = summarize(values);
            format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max)
        }
        None => "–".into(),
    }
}

/// Builds the node, measures every client at every Service count (the counts interleaved
/// round by round, the clients within each), and returns the report section and its JSON.
pub fn run(prefix: &str, settings: &Settings) -> Result<(String, Value)> {
    let lab = Lab::new(prefix)?;
    let mut samples: Samples = BTreeMap::new();
    let mut install_ms: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for round in 0..settings.rounds {
        for count in SERVICE_COUNTS {
            eprintln!(
                "services round {}/{}: {count} Services ...",
                round + 1,
                settings.rounds
            );
            let (maps, rules) = lab.install(count)?;
            install_ms
                .entry(count)
                .or_default()
                .push((maps.as_secs_f64() * 1e3, rules.as_secs_f64() * 1e3));
            // Every client's connection rate, then every client's round trip: the two
            // round trips compared (socket LB and pod IP) run back to back. The rates in
            // `RATE_SLICES` slices, the clients taking turns (in an order rotated each
            // round, so no client always runs first after a rewrite), and each client's
            // sample the median of its slices: a burst of the shared machine's other work
            // then costs every client a slice, where it took one client's whole window
            // (measured: single windows 2-4 times slower than the rest, which decided the
            // flatness target by which count they fell on).
            let slice = settings.rate_time / RATE_SLICES as u32;
            let mut slices: Vec<Vec<f64>> = vec![Vec::new(); CLIENTS.len()];
            for _ in 0..RATE_SLICES {
                for offset in 0..CLIENTS.len() {
                    let index = (offset + round) % CLIENTS.len();
                    let client = &CLIENTS[index];
                    let before = lab.translated()?;
                    let rate = lab
                        .connection_rate(client, slice)
                        .with_context(|| format!("{} at {count} Services", client.name))?;
                    let translated = lab.translated()? - before;
                    // Only the cgroup client to the ClusterIP is the socket LB's: one
                    // translation per connection.
                    if client.in_cgroup && client.via_cluster_ip {
                        ensure!(
                            translated as f64 >= rate * slice.as_secs_f64() * 0.9,
                            "{}: {translated} translations for {rate:.0} connections/s",
                            client.name
                        );
                    } else if translated != 0 {
                        bail!("{}: mycni translated {translated} connections", client.name);
                    }
                    slices[index].push(rate);
                }
            }
            for (client, rates) in CLIENTS.iter().zip(&slices) {
                let rate = summarize(rates).median;
                push(&mut samples, client.name, count, "tcp_conn_per_s", rate);
            }
            for client in &CLIENTS {
                let round_trip = lab
                    .round_trip_us(client, settings.rr_count)
                    .with_context(|| format!("{} at {count} Services", client.name))?;
                push(
                    &mut samples,
                    client.name,
                    count,
                    "tcp_rr_avg_us",
                    round_trip.0,
                );
                push(
                    &mut samples,
                    client.name,
                    count,
                    "tcp_rr_p50_us",
                    round_trip.1,
                );
            }
        }
        eprintln!(
            "services round {}/{}: mycni at every count, interleaved ...",
            round + 1,
            settings.rounds
        );
        flatness_phase(&lab, &mut samples, settings)?;
    }
    drop(lab);
    Ok(report(&samples, &install_ms, settings))
}

/// The metric of the flatness phase: the socket LB's connections/s with only mycni's maps
/// switched between the Service counts, slice by slice.
const FLAT_RATE: &str = "tcp_conn_per_s_counts_interleaved";

/// mycni's connections/s at each Service count, the counts taking turns slice by slice
/// within a few seconds: kube-proxy's rules are rewritten only between counts (tens of
/// seconds at 5,000), so in the main loop each count's rate comes from another minute of
/// the shared machine's load; the socket LB's connections never pass the node's
/// netfilter, so only its maps need switching, which takes milliseconds.
fn flatness_phase(lab: &Lab, samples: &mut Samples, settings: &Settings) -> Result<()> {
    let slice = settings.rate_time / RATE_SLICES as u32;
    let mut slices: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for _ in 0..RATE_SLICES {
        for count in SERVICE_COUNTS {
            lab.install_mycni_only(count)?;
            let rate = lab
                .checked_mycni_rate(slice)
                .with_context(|| format!("{MYCNI} at {count} Services, counts interleaved"))?;
            slices.entry(count).or_default().push(rate);
        }
    }
    for (count, rates) in slices {
        push(samples, MYCNI, count, FLAT_RATE, summarize(&rates).median);
    }
    Ok(())
}

/// A target row: (what, value, met).
type TargetRow = (String, f64, bool);

fn targets(samples: &Samples) -> Vec<TargetRow> {
    let rate = |client: &str, count: usize| median(samples, client, count, "tcp_conn_per_s");
    let against_kube_proxy = rate(MYCNI, 1000) / rate(KUBE_PROXY, 1000);
    let flatness = |metric: &str| {
        let rates: Vec<f64> = SERVICE_COUNTS
            .iter()
            .map(|n| median(samples, MYCNI, *n, metric))
            .collect();
        let lowest = rates.iter().cloned().fold(f64::INFINITY, f64::min);
        let highest = rates.iter().cloned().fold(0.0, f64::max);
        lowest / highest
    };
    let interleaved = flatness(FLAT_RATE);
    let apart = flatness("tcp_conn_per_s");
    // Each round's socket-LB round trip over the pod IP's measured right after it: paired,
    // so what the shared machine does between rounds cancels out.
    let paired: Vec<f64> = SERVICE_COUNTS
        .iter()
        .flat_map(|count| {
            let of = |client: &str| {
                samples
                    .get(client)
                    .and_then(|by_count| by_count.get(count))
                    .and_then(|metrics| metrics.get("tcp_rr_p50_us"))
                    .cloned()
                    .unwrap_or_default()
            };
            of(MYCNI)
                .into_iter()
                .zip(of(DIRECT))
                .map(|(ours, direct)| ours / direct)
                .collect::<Vec<_>>()
        })
        .collect();
    let round_trip = summarize(&paired).median;
    vec![
        (
            "Services: connections/s at 1,000 Services, mycni / kube-proxy ≥ 1.5".into(),
            against_kube_proxy,
            against_kube_proxy >= 1.5,
        ),
        (
            "Services: mycni connections/s, lowest / highest median over 10–5,000 Services, counts interleaved slice by slice ≥ 0.9"
                .into(),
            interleaved,
            interleaved >= 0.9,
        ),
        (
            "Services: the same from the rows above (each count measured after its iptables rewrite, minutes apart) ≥ 0.9"
                .into(),
            apart,
            apart >= 0.9,
        ),
        (
            "Services: round trip (median) on an established connection, mycni ClusterIP / pod IP (paired per round) ≤ 1.05"
                .into(),
            round_trip,
            round_trip <= 1.05,
        ),
    ]
}

fn report(
    samples: &Samples,
    install_ms: &BTreeMap<usize, Vec<(f64, f64)>>,
    settings: &Settings,
) -> (String, Value) {
    let names = CLIENTS.map(|c| c.name);
    let mut md = format!(
        "\n## Services: a pod to a ClusterIP (3 backends on the same node; {} rounds, Service counts interleaved; medians with min–max)\n\n\
         | Services installed | {} | mycni / kube-proxy |\n|---|---|---|---|---|\n",
        settings.rounds,
        names.map(|n| format!("{n}: TCP connections/s")).join(" | ")
    );
    for count in SERVICE_COUNTS {
        let cells: Vec<String> = names
            .iter()
            .map(|n| cell(samples, n, count, "tcp_conn_per_s"))
            .collect();
        md += &format!(
            "| {count} | {} | {:.2} |\n",
            cells.join(" | "),
            median(samples, MYCNI, count, "tcp_conn_per_s")
                / median(samples, KUBE_PROXY, count, "tcp_conn_per_s")
        );
    }
    md += "\n| Services installed | mycni socket LB: TCP connections/s, counts interleaved slice by slice (maps only) |\n|---|---|\n";
    for count in SERVICE_COUNTS {
        md += &format!("| {count} | {} |\n", cell(samples, MYCNI, count, FLAT_RATE));
    }
    for (metric, label) in [
        ("tcp_rr_p50_us", "TCP round trip, median (µs)"),
        ("tcp_rr_avg_us", "TCP round trip, avg (µs)"),
    ] {
        md += &format!(
            "\n| Services installed | {} |\n|---|---|---|---|\n",
            names.map(|n| format!("{n}: {label}")).join(" | ")
        );
        for count in SERVICE_COUNTS {
            let cells: Vec<String> = names
                .iter()
                .map(|n| {
                    let values = samples
                        .get(n)
                        .and_then(|by_count| by_count.get(&count))
                        .and_then(|metrics| metrics.get(metric));
                    values.map_or("–".into(), |v| {
                        let s = summarize(v);
                        format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
                    })
                })
                .collect();
            md += &format!("| {count} | {} |\n", cells.join(" | "));
        }
    }
    md += "\n| Services installed | writing mycni's maps (ms) | kube-proxy's iptables-restore (ms) |\n|---|---|---|\n";
    for (count, times) in install_ms {
        let maps: Vec<f64> = times.iter().map(|t| t.0).collect();
        let rules: Vec<f64> = times.iter().map(|t| t.1).collect();
        md += &format!(
            "| {count} | {:.1} | {:.1} |\n",
            summarize(&maps).median,
            summarize(&rules).median
        );
    }
    let rows = targets(samples);
    md += "\n| target | ratio (median) | met |\n|---|---|---|\n";
    for (what, value, met) in &rows {
        md += &format!(
            "| {what} | {value:.2} | {} |\n",
            if *met { "yes" } else { "**no**" }
        );
    }
    let json = json!({
        "samples": samples,
        "install_ms": install_ms.iter().map(|(count, times)| (count.to_string(), json!(times))).collect::<serde_json::Map<String, Value>>(),
        "targets": rows.iter().map(|(what, value, met)| json!({"target": what, "value": value, "met": met})).collect::<Vec<_>>(),
    });
    (md, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_load_balancers_get_the_same_services_with_the_one_under_test_halfway() {
        let backends = [Ipv4Addr::new(10, 244, 30, 2), Ipv4Addr::new(10, 244, 30, 3)];
        for count in SERVICE_COUNTS {
            let (desired, services) = service_set(count, &backends);
            assert_eq!(desired.len(), count);
            assert_eq!(services.len(), count);
            for service in &services {
                let key = ServiceKey {
                    address: service.cluster_ip.octets(),
                    port: service.port,
                    protocol: PROTO_TCP,
                    scope: 0,
                };
                let (_, mycni_backends) = &desired[&key];
                let theirs: Vec<SocketAddr> = mycni_backends
                    .iter()
                    .map(|b| SocketAddr::from((b.address, b.port)))
                    .collect();
                assert_eq!(theirs, service.endpoints, "{}", service.name);
            }
            let under_test = services
                .iter()
                .position(|s| s.cluster_ip == CLUSTER_IP && s.port == RATE_PORT)
                .expect("the Service under test");
            assert_eq!(under_test, count / 2);
            let ids: std::collections::BTreeSet<u32> = desired
                .values()
                .map(|(entry, _)| entry.service_id)
                .collect();
            assert_eq!(ids.len(), count, "service ids are unique");
        }
    }

    #[test]
    fn probe_fields_are_read_by_name() {
        assert_eq!(field("avg_us=31.5 p99_us=60", "avg_us").ok(), Some(31.5));
        assert_eq!(field("avg_us=31.5 p99_us=60", "p99_us").ok(), Some(60.0));
        assert!(field("per_s=", "per_s").is_err());
        assert!(field("errno=111", "per_s").is_err());
    }
}
