//! One node that knows a whole cluster: a namespace whose uplink is a veth on
//! 172.16.0.0/16, an agent reading a nodes file, and its log followed. Peers on that /16
//! are on-link (direct routes); peers elsewhere go through VXLAN in `auto` mode and are
//! unreachable in `direct` mode. Used by the agent tests and the scale benchmark.
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mycni_common::{Route, ROUTE_REMOTE_NODE, ROUTE_REMOTE_TUNNEL};

use crate::{http_get, prefix, AgentLog, Node};

pub const NODE_IP: &str = "172.16.0.1";
pub const METRICS: &str = "127.0.0.1:9962";
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";
pub const LOCAL_POD_CIDR: &str = "10.255.0.0/24";

pub struct LoneNode {
    pub node: Node,
    pub nodes_file: PathBuf,
    pub log: AgentLog,
}

impl LoneNode {
    /// Starts the agent on `nodes` (a nodes file's text) with `extra` options.
    pub fn start(test: &str, nodes: &str, extra: &[&str]) -> Result<LoneNode> {
        let mut node = Node::bare(&prefix(test), "node", LOCAL_POD_CIDR)?;
        let netns = &node.netns;
        // A veth whose peer stays in the namespace: this kernel may lack the dummy driver.
        netns.exec(&[
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ])?;
        netns.exec(&["ip", "addr", "add", &format!("{NODE_IP}/16"), "dev", "eth0"])?;
        netns.exec(&["ip", "link", "set", "eth0-peer", "up"])?;
        netns.exec(&["ip", "link", "set", "eth0", "up"])?;
        let nodes_file = node.data_dir.join("nodes");
        std::fs::write(&nodes_file, nodes)?;
        let file = nodes_file.display().to_string();
        let mut args = vec![
            "--node-name",
            "node-0",
            "--node-ip",
            NODE_IP,
            "--uplink",
            "eth0",
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--nodes-file",
            &file,
            "--metrics-address",
            METRICS,
        ];
        args.extend_from_slice(extra);
        node.start_agent(&args)?;
        let log = AgentLog::follow(&mut node)?;
        Ok(LoneNode {
            node,
            nodes_file,
            log,
        })
    }

    pub fn routes(&self) -> Result<Vec<(Ipv4Addr, u8, Route)>> {
        Ok(mycni::datapath::Maps::open(&self.node.pin_root())?.routes()?)
    }

    /// Remote-node entries in `ROUTES`.
    pub fn remote_routes(&self) -> Result<usize> {
        Ok(self
            .routes()?
            .iter()
            .filter(|(_, _, r)| r.kind == ROUTE_REMOTE_NODE || r.kind == ROUTE_REMOTE_TUNNEL)
            .count())
    }

    pub fn has_route(&self, cidr: &str) -> Result<bool> {
        Ok(self
            .routes()?
            .iter()
            .any(|(ip, len, _)| format!("{ip}/{len}") == cidr))
    }

    pub fn kernel_route(&self, cidr: &str) -> Result<String> {
        Ok(self
            .node
            .netns
            .exec(&["ip", "-4", "route", "show", cidr])?
            .trim()
            .to_string())
    }

    pub fn metrics(&self) -> Result<String> {
        Ok(http_get(&self.node.netns, METRICS, "/metrics")?.1)
    }

    pub fn ensure_alive(&mut self) -> Result<()> {
        ensure!(
            self.node.agent_alive(),
            "the agent died:\n{}",
            self.log.text()
        );
        Ok(())
    }
}

/// `name ip cidr` lines; the local node first, as a real nodes file lists it.
pub fn nodes_text(peers: &[(&str, &str, &str)]) -> String {
    std::iter::once(format!("node-0 {NODE_IP} {LOCAL_POD_CIDR}\n"))
        .chain(peers.iter().map(|(n, ip, c)| format!("{n} {ip} {c}\n")))
        .collect()
}

/// Peer `i` of a generated cluster of `count`: the first half on the uplink's /16
/// (direct), the rest beyond it (VXLAN); pod CIDR `10.<i/256>.<i%256>.0/24`.
pub fn peer(i: u32, count: u32) -> (String, Ipv4Addr, Ipv4Addr) {
    let ip = if i < count / 2 {
        Ipv4Addr::new(172, 16, (i / 250) as u8 + 1, (i % 250) as u8 + 1)
    } else {
        Ipv4Addr::new(172, 17, (i / 250) as u8, (i % 250) as u8 + 1)
    };
    (
        format!("n{i}"),
        ip,
        Ipv4Addr::new(10, (i / 256) as u8, (i % 256) as u8, 0),
    )
}

/// A nodes file of `count` generated peers, peer `moved` (if any) at `moved_ip` instead.
pub fn cluster_text(count: u32, moved: Option<(u32, Ipv4Addr)>) -> String {
    let mut text = format!("node-0 {NODE_IP} {LOCAL_POD_CIDR}\n");
    for i in 0..count {
        let (name, mut ip, cidr) = peer(i, count);
        if let Some((which, to)) = moved {
            if which == i {
                ip = to;
            }
        }
        text += &format!("{name} {ip} {cidr}/24\n");
    }
    text
}

/// Waits until `ROUTES` sends `cidr/24` to `next_hop`, polling one lookup per
/// millisecond; returns how long that took.
pub fn wait_next_hop(
    lone: &LoneNode,
    cidr: Ipv4Addr,
    next_hop: Ipv4Addr,
    limit: Duration,
) -> Result<Duration> {
    let maps = mycni::datapath::Maps::open(&lone.node.pin_root())?;
    let start = Instant::now();
    loop {
        if maps
            .route(cidr, 24)?
            .is_some_and(|r| r.next_hop == next_hop.octets())
        {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < limit,
            "{cidr}/24 never went via {next_hop}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `count` GETs of `path` on the agent's metrics address, from one thread inside the node,
/// `gap` apart: each one's time from connect to the last byte, in milliseconds.
pub fn http_latencies(
    lone: &LoneNode,
    path: &str,
    count: usize,
    gap: Duration,
) -> Result<Vec<f64>> {
    use std::io::{Read, Write};
    let addr: SocketAddr = METRICS.parse()?;
    lone.node.netns.run_inside(|| {
        let mut took = Vec::with_capacity(count);
        for _ in 0..count {
            let start = Instant::now();
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").as_bytes())?;
            let mut text = String::new();
            conn.read_to_string(&mut text)?;
            ensure!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
            took.push(start.elapsed().as_secs_f64() * 1000.0);
            std::thread::sleep(gap);
        }
        Ok(took)
    })
}

/// Fills `NAT` with `flows` translated UDP flows (both directions, just seen, so none
/// expires), as a busy node's pods would: returns how many entries it wrote.
pub fn fill_nat(lone: &LoneNode, flows: u32) -> Result<usize> {
    use mycni_common::{nat_state, FlowKey, NatEntry, NAT_EGRESS, NAT_INGRESS};
    let mut table = mycni::datapath::NatTable::open(&lone.node.pin_root())?;
    let now = mycni::agent::monotonic_ns();
    let node: Ipv4Addr = NODE_IP.parse()?;
    let mut written = 0;
    for i in 0..flows {
        let pod = Ipv4Addr::new(10, 255, 0, (i % 250) as u8 + 2).octets();
        let remote = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i / 1000).octets();
        let pod_port = 10000 + (i % 1000) as u16;
        let nat_port = 61000 + (i % 4000) as u16;
        let egress = FlowKey {
            saddr: pod,
            daddr: remote,
            sport: pod_port,
            dport: 53,
            proto: 17,
            pad: [0; 3],
        };
        let ingress = FlowKey {
            saddr: remote,
            daddr: node.octets(),
            sport: 53,
            dport: nat_port,
            proto: 17,
            pad: [0; 3],
        };
        table
            .insert(
                &egress,
                &NatEntry {
                    addr: node.octets(),
                    port: nat_port,
                    direction: NAT_EGRESS,
                    state: nat_state::REPLIED,
                    last_seen_ns: now,
                },
            )
            .context("fill NAT")?;
        table.insert(
            &ingress,
            &NatEntry {
                addr: pod,
                port: pod_port,
                direction: NAT_INGRESS,
                state: nat_state::REPLIED,
                last_seen_ns: now,
            },
        )?;
        written += 2;
    }
    Ok(written)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Kernel-reported memory of each pinned map (`bytes_memlock`, the map's own accounting).
pub fn map_memory(root: &std::path::Path) -> Result<Vec<(&'static str, u64, u64)>> {
    let mut found = Vec::new();
    for name in mycni_common::MAP_NAMES {
        let out = crate::run(
            std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(root.join(name)),
        )?;
        let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        found.push((
            name,
            info["max_entries"].as_u64().unwrap_or(0),
            info["bytes_memlock"].as_u64().unwrap_or(0),
        ));
    }
    Ok(found)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Moves peer `which` between two addresses `changes` times, `gap` apart: each change's time
/// from the file write to `ROUTES` holding it, in milliseconds.
fn node_changes(
    lone: &LoneNode,
    count: u32,
    which: u32,
    changes: usize,
    gap: Duration,
) -> Result<Vec<f64>> {
    let (_, home, cidr) = peer(which, count);
    let away = Ipv4Addr::new(172, 17, 200, 200);
    let mut took = Vec::new();
    for n in 0..changes {
        let to = if n % 2 == 0 { away } else { home };
        let text = cluster_text(count, (to != home).then_some((which, to)));
        let start = Instant::now();
        std::fs::write(&lone.nodes_file, text)?;
        wait_next_hop(lone, cidr, to, Duration::from_secs(10))?;
        took.push(start.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(gap);
    }
    Ok(took)
}

/// The agent at cluster scale: time to converge and memory at 100, 1,000 and 5,000 nodes;
/// one node change at 5,000; and how fast it answers `/healthz` and `/metrics` and applies
/// a route change with an empty and a 100,000-entry NAT table (whose walks run on their
/// own thread). Returns the Markdown section and its JSON.
pub fn bench(quick: bool) -> Result<(String, serde_json::Value)> {
    let sizes: &[u32] = if quick {
        &[100, 1000]
    } else {
        &[100, 1000, 5000]
    };
    let mut md = String::from(
        "\n## Agent at cluster scale (nodes file, half direct and half VXLAN peers)\n\n| nodes | time to converge (s) | agent RSS (KiB) | ROUTES (bytes) | one node change, p50 / max (ms) |\n|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    let mut largest = None;
    for &count in sizes {
        eprintln!("agent scale: {count} nodes ...");
        let start = Instant::now();
        // The previous size's node goes first (test prefixes keep 8 characters, so the
        // names must differ within them).
        drop(largest.take());
        let mut lone = LoneNode::start(&format!("sc{count}"), &cluster_text(count, None), &[])?;
        loop {
            lone.ensure_alive()?;
            if lone.remote_routes()? == count as usize {
                break;
            }
            ensure!(start.elapsed() < Duration::from_secs(300), "no convergence");
            std::thread::sleep(Duration::from_millis(20));
        }
        let converge = start.elapsed().as_secs_f64();
        let rss = lone.node.agent_pid().and_then(rss_kib).unwrap_or(0);
        let maps = map_memory(&lone.node.pin_root())?;
        let routes_bytes = maps
            .iter()
            .find(|(name, _, _)| *name == mycni_common::MAP_ROUTES)
            .map_or(0, |m| m.2);
        let changes = node_changes(
            &lone,
            count,
            count - 7,
            if quick { 6 } else { 10 },
            Duration::from_millis(300),
        )?;
        let (p50, max) = (percentile(&changes, 50.0), percentile(&changes, 100.0));
        md += &format!(
            "| {count} | {converge:.2} | {rss} | {routes_bytes} | {p50:.1} / {max:.1} |\n"
        );
        rows.push(serde_json::json!({"nodes": count, "converge_s": converge, "agent_rss_kib": rss,
            "maps": maps.iter().map(|(n, cap, bytes)| serde_json::json!({"map": n, "capacity": cap, "bytes": bytes})).collect::<Vec<_>>(),
            "node_change_ms": changes}));
        largest = Some((count, lone, maps));
    }
    let (count, lone, maps) = largest.context("no size measured")?;
    md += &format!("\nPinned maps at {count} nodes (capacity, kernel-accounted bytes): ");
    md += &maps
        .iter()
        .map(|(name, cap, bytes)| format!("{name} {cap} / {bytes}"))
        .collect::<Vec<_>>()
        .join("; ");
    md += "\n";

    md += &format!("\n### Agent responsiveness at {count} nodes\n\n| NAT entries | /healthz p50 / p99 (ms) | /metrics p50 / p99 (ms) | route change p50 / p99 (ms) |\n|---|---|---|---|\n");
    let requests = if quick { 150 } else { 400 };
    let mut responsiveness = Vec::new();
    for flows in [0u32, 50_000] {
        let entries = if flows > 0 {
            fill_nat(&lone, flows)?
        } else {
            0
        };
        let healthz = http_latencies(&lone, "/healthz", requests, Duration::from_millis(10))?;
        let metrics = http_latencies(&lone, "/metrics", requests / 10, Duration::from_millis(100))?;
        let changes = node_changes(
            &lone,
            count,
            3,
            if quick { 8 } else { 40 },
            Duration::from_millis(150),
        )?;
        let cell = |v: &[f64]| format!("{:.1} / {:.1}", percentile(v, 50.0), percentile(v, 99.0));
        md += &format!(
            "| {entries} | {} | {} | {} |\n",
            cell(&healthz),
            cell(&metrics),
            cell(&changes)
        );
        responsiveness.push(serde_json::json!({"nat_entries": entries,
            "healthz_p50_ms": percentile(&healthz, 50.0), "healthz_p99_ms": percentile(&healthz, 99.0),
            "metrics_p50_ms": percentile(&metrics, 50.0), "metrics_p99_ms": percentile(&metrics, 99.0),
            "route_change_p50_ms": percentile(&changes, 50.0), "route_change_p99_ms": percentile(&changes, 99.0)}));
    }
    Ok((
        md,
        serde_json::json!({"sizes": rows, "responsiveness": responsiveness}),
    ))
}
