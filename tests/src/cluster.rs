//! A simulated cluster: three nodes, two on one L2 segment (a bridge in a "fabric"
//! namespace) and one in another subnet behind a router namespace, plus an external host
//! beyond the router that has no route to any pod CIDR. Every namespace carries the test's
//! prefix and goes when the cluster drops.
//!
//! ```text
//!  node-1 192.168.1.11 ─┐
//!  node-2 192.168.1.12 ─┼─ fabric (br0) ─ router 192.168.1.1 / 192.168.2.1 / 203.0.113.1
//!                                          │                 │
//!                          node-3 192.168.2.13      external 203.0.113.10
//! ```
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{Netns, Node};

pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Pod MTU on every node: the uplink's 1500 less VXLAN's 50 bytes.
pub const POD_MTU: u32 = 1450;

/// One node's place in the lab.
pub struct NodeSpec {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub pod_cidr: &'static str,
}

pub const NODES: [NodeSpec; 3] = [
    NodeSpec {
        name: "node-1",
        ip: Ipv4Addr::new(192, 168, 1, 11),
        gateway: Ipv4Addr::new(192, 168, 1, 1),
        pod_cidr: "10.244.1.0/24",
    },
    NodeSpec {
        name: "node-2",
        ip: Ipv4Addr::new(192, 168, 1, 12),
        gateway: Ipv4Addr::new(192, 168, 1, 1),
        pod_cidr: "10.244.2.0/24",
    },
    NodeSpec {
        name: "node-3",
        ip: Ipv4Addr::new(192, 168, 2, 13),
        gateway: Ipv4Addr::new(192, 168, 2, 1),
        pod_cidr: "10.244.3.0/24",
    },
];

pub struct Cluster {
    pub prefix: String,
    // Nodes first: they drop (agents stopped, namespaces gone) before the fabric.
    pub nodes: Vec<Node>,
    pub external: Netns,
    pub router: Netns,
    pub fabric: Netns,
    pub nodes_file: PathBuf,
}

/// A line of the nodes file.
pub fn nodes_line(spec: &NodeSpec) -> String {
    format!("{} {} {}\n", spec.name, spec.ip, spec.pod_cidr)
}

impl Cluster {
    /// Builds the lab and starts an agent on every node. `listed` says which nodes the
    /// shared nodes file names at first.
    pub fn new(prefix: &str, listed: &[&str], extra_agent_args: &[&str]) -> Result<Cluster> {
        let fabric = Netns::new(&format!("{prefix}-fabric"))?;
        let router = Netns::new(&format!("{prefix}-router"))?;
        let external = Netns::new(&format!("{prefix}-ext"))?;
        fabric.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        fabric.exec(&["ip", "link", "set", "br0", "up"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;

        // Router legs: one on the fabric, one to node-3's subnet, one to the outside.
        fabric.add_veth("rt", &router, "a0")?;
        fabric.exec(&["ip", "link", "set", "rt", "master", "br0", "up"])?;
        router.exec(&["ip", "addr", "add", "192.168.1.1/24", "dev", "a0"])?;
        router.exec(&["ip", "link", "set", "a0", "up"])?;
        router.add_veth("x0", &external, "eth0")?;
        router.exec(&["ip", "addr", "add", "203.0.113.1/24", "dev", "x0"])?;
        router.exec(&["ip", "link", "set", "x0", "up"])?;
        external.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{EXTERNAL_IP}/24"),
            "dev",
            "eth0",
        ])?;
        external.exec(&["ip", "link", "set", "eth0", "up"])?;
        // The outside knows the nodes, never the pods: replies can only come back via SNAT.
        external.exec(&["ip", "route", "add", "192.168.0.0/16", "via", "203.0.113.1"])?;

        let nodes_file = crate::run_dir().join(format!("{prefix}-nodes"));
        let mut cluster = Cluster {
            prefix: prefix.to_string(),
            nodes: Vec::new(),
            external,
            router,
            fabric,
            nodes_file,
        };
        cluster.write_nodes_file(listed)?;
        for (index, spec) in NODES.iter().enumerate() {
            let mut node = Node::bare(prefix, spec.name, spec.pod_cidr)?;
            node.node_ip = spec.ip;
            node.mtu = POD_MTU;
            if index < 2 {
                let leg = format!("n{}", index + 1);
                cluster.fabric.add_veth(&leg, &node.netns, "eth0")?;
                cluster
                    .fabric
                    .exec(&["ip", "link", "set", &leg, "master", "br0", "up"])?;
            } else {
                cluster.router.add_veth("b0", &node.netns, "eth0")?;
                cluster
                    .router
                    .exec(&["ip", "addr", "add", "192.168.2.1/24", "dev", "b0"])?;
                cluster.router.exec(&["ip", "link", "set", "b0", "up"])?;
            }
            let netns = &node.netns;
            netns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", spec.ip),
                "dev",
                "eth0",
            ])?;
            netns.exec(&["ip", "link", "set", "eth0", "up"])?;
            netns.exec(&[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &spec.gateway.to_string(),
            ])?;
            // Forwarding off until the agent turns it on (it must: node-to-pod, ClusterIP
            // and SNAT flows are forwarded by the node stack), whatever the machine has.
            netns.sysctl("net.ipv4.ip_forward", "0")?;
            let mut args = cluster.agent_args(index);
            args.extend(extra_agent_args.iter().map(|a| a.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            node.start_agent(&args)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// The arguments every node's agent runs with (this node, the uplink, the cluster CIDR,
    /// the shared nodes file), before any extra ones.
    pub fn agent_args(&self, index: usize) -> Vec<String> {
        let spec = &NODES[index];
        [
            "--node-name",
            spec.name,
            "--node-ip",
            &spec.ip.to_string(),
            "--uplink",
            "eth0",
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--nodes-file",
            &self.nodes_file.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn node(&self, name: &str) -> &Node {
        let index = NODES.iter().position(|spec| spec.name == name).unwrap_or(0);
        &self.nodes[index]
    }

    /// kube-proxy's iptables rules (1.20's shape, see [`crate::kubeproxy`]) with
    /// `services` on every node, as a kubeadm cluster has them.
    pub fn install_kube_proxy(&self, services: &[crate::kubeproxy::Service]) -> Result<()> {
        for node in &self.nodes {
            crate::kubeproxy::install(&node.netns, CLUSTER_CIDR, services)?;
        }
        Ok(())
    }

    /// Packets kube-proxy's `ctstate INVALID` rule dropped, per node.
    pub fn invalid_drops(&self) -> Result<Vec<u64>> {
        self.nodes
            .iter()
            .map(|node| crate::kubeproxy::invalid_drops(&node.netns))
            .collect()
    }

    /// Waits until every node's `ROUTES` holds every other node's pod CIDR.
    pub fn wait_for_full_mesh(&self) -> Result<()> {
        for (node, own) in self.nodes.iter().zip(NODES.iter()) {
            for spec in NODES.iter().filter(|s| s.name != own.name) {
                wait_for(Duration::from_secs(5), || has_route(node, spec.pod_cidr))
                    .with_context(|| format!("{} never learned {}", own.name, spec.pod_cidr))?;
            }
        }
        Ok(())
    }

    pub fn write_nodes_file(&self, listed: &[&str]) -> Result<()> {
        let text: String = NODES
            .iter()
            .filter(|spec| listed.contains(&spec.name))
            .map(nodes_line)
            .collect();
        Ok(std::fs::write(&self.nodes_file, text)?)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.nodes_file);
    }
}

/// Whether `node`'s `ROUTES` holds `cidr` (as `a.b.c.d/len`).
pub fn has_route(node: &Node, cidr: &str) -> Result<bool> {
    let routes = mycni::datapath::Maps::open(&node.pin_root())?.routes()?;
    Ok(routes
        .iter()
        .any(|(ip, len, _)| format!("{ip}/{len}") == cidr))
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("condition not met within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
