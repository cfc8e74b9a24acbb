//! `cargo xtask demo`: a simulated cluster in network namespaces — three nodes (two on one
//! L2 segment, one in another subnet behind a router), two pods each added through the real
//! `mycni` binary, and an external host beyond the router. Prints a connectivity matrix with
//! the datapath verdicts each check moved, the maps as bpftool prints them, then removes
//! everything. Needs root.
use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context, Result};
use mycni_common::verdict;
use mycni_tests::cluster::{wait_for, Cluster, EXTERNAL_IP, NODES};
use mycni_tests::kubeproxy::Service;
use mycni_tests::{prefix, tcp_echo, udp_echo, Netns, Node, Pod};

/// Per-verdict packet counts of every node.
fn snapshot(cluster: &Cluster) -> Result<Vec<Vec<u64>>> {
    cluster
        .nodes
        .iter()
        .map(|node| {
            Ok(mycni::datapath::read_stats(&node.pin_root())?
                .iter()
                .map(|c| c.packets)
                .collect())
        })
        .collect()
}

/// The verdicts that moved on the client's node: the path the packets took there.
fn path_taken(before: &[Vec<u64>], after: &[Vec<u64>], node: usize) -> String {
    let moved: Vec<&str> = verdict::NAMES
        .iter()
        .enumerate()
        .filter(|(i, name)| after[node][*i] > before[node][*i] && **name != "arp_reply")
        .map(|(_, name)| *name)
        .collect();
    if moved.is_empty() {
        "node stack only".into()
    } else {
        moved.join(" + ")
    }
}

struct Check<'a> {
    what: &'a str,
    client: &'a Netns,
    client_node: usize,
    server: &'a Netns,
    listen: SocketAddr,
    connect: SocketAddr,
    /// A ClusterIP: only its TCP port answers.
    service: bool,
}

fn main() -> Result<()> {
    let cluster = Cluster::new(&prefix("demo"), &["node-1", "node-2", "node-3"], &[])
        .context("build the lab")?;
    println!("cluster {}: nodes", cluster.prefix);
    for spec in &NODES {
        println!(
            "  {:<7} {:<13} pod CIDR {}",
            spec.name, spec.ip, spec.pod_cidr
        );
    }
    println!("  external host {EXTERNAL_IP} (no route to any pod CIDR)\n");
    for (node, spec) in cluster.nodes.iter().zip(NODES.iter()) {
        for other in NODES.iter().filter(|o| o.name != spec.name) {
            let has = |node: &Node| -> Result<bool> {
                let routes = mycni::datapath::Maps::open(&node.pin_root())?.routes()?;
                Ok(routes
                    .iter()
                    .any(|(ip, len, _)| format!("{ip}/{len}") == other.pod_cidr))
            };
            wait_for(std::time::Duration::from_secs(5), || has(node))?;
        }
    }
    let mut pods: Vec<(usize, Pod)> = Vec::new();
    for (index, node) in cluster.nodes.iter().enumerate() {
        for n in 1..=2 {
            let name = format!("pod{}{n}", index + 1);
            let pod = node.add_pod(&name)?;
            println!("ADD {name} on {} -> {}", NODES[index].name, pod.ip);
            pods.push((index, pod));
        }
    }
    let pod = |node: usize, n: usize| &pods[node * 2 + n].1;
    // kube-proxy's iptables rules on every node, with two ClusterIPs: 10.96.0.10:80 ->
    // pod11:8080, and the `kubernetes` Service 10.96.0.1:443 -> an API server on node-2's IP.
    let backend = SocketAddr::from((pod(0, 0).ip, 8080));
    let api_server = SocketAddr::from((NODES[1].ip, 6443));
    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    let kubernetes: SocketAddr = "10.96.0.1:443".parse()?;
    cluster.install_kube_proxy(&[
        Service {
            name: "default/web:http".into(),
            cluster_ip: [10, 96, 0, 10].into(),
            port: 80,
            endpoints: vec![backend],
        },
        Service {
            name: "default/kubernetes:https".into(),
            cluster_ip: [10, 96, 0, 1].into(),
            port: 443,
            endpoints: vec![api_server],
        },
    ])?;
    let at = |ip, port| SocketAddr::from((ip, port));
    let external = SocketAddr::from((EXTERNAL_IP, 9999));
    let checks = [
        Check {
            what: "pod11 -> pod12   same node",
            client: &pod(0, 0).netns,
            client_node: 0,
            server: &pod(0, 1).netns,
            listen: at(pod(0, 1).ip, 7001),
            connect: at(pod(0, 1).ip, 7001),
            service: false,
        },
        Check {
            what: "pod11 -> pod21   cross node, direct",
            client: &pod(0, 0).netns,
            client_node: 0,
            server: &pod(1, 0).netns,
            listen: at(pod(1, 0).ip, 7002),
            connect: at(pod(1, 0).ip, 7002),
            service: false,
        },
        Check {
            what: "pod22 -> pod12   cross node, direct",
            client: &pod(1, 1).netns,
            client_node: 1,
            server: &pod(0, 1).netns,
            listen: at(pod(0, 1).ip, 7003),
            connect: at(pod(0, 1).ip, 7003),
            service: false,
        },
        Check {
            what: "pod11 -> pod31   cross node, VXLAN",
            client: &pod(0, 0).netns,
            client_node: 0,
            server: &pod(2, 0).netns,
            listen: at(pod(2, 0).ip, 7004),
            connect: at(pod(2, 0).ip, 7004),
            service: false,
        },
        Check {
            what: "pod32 -> pod22   cross node, VXLAN",
            client: &pod(2, 1).netns,
            client_node: 2,
            server: &pod(1, 1).netns,
            listen: at(pod(1, 1).ip, 7005),
            connect: at(pod(1, 1).ip, 7005),
            service: false,
        },
        Check {
            what: "node-1 -> pod31  node to pod",
            client: &cluster.nodes[0].netns,
            client_node: 0,
            server: &pod(2, 0).netns,
            listen: at(pod(2, 0).ip, 7006),
            connect: at(pod(2, 0).ip, 7006),
            service: false,
        },
        Check {
            what: "pod21 -> external via SNAT",
            client: &pod(1, 0).netns,
            client_node: 1,
            server: &cluster.external,
            listen: external,
            connect: external,
            service: false,
        },
        Check {
            what: "pod11 -> node-3   node IP, masqueraded",
            client: &pod(0, 0).netns,
            client_node: 0,
            server: &cluster.nodes[2].netns,
            listen: at(NODES[2].ip, 7007),
            connect: at(NODES[2].ip, 7007),
            service: false,
        },
        Check {
            what: "pod12 -> ClusterIP (same node backend)",
            client: &pod(0, 1).netns,
            client_node: 0,
            server: &pod(0, 0).netns,
            listen: backend,
            connect: vip,
            service: true,
        },
        Check {
            what: "pod31 -> ClusterIP (backend across VXLAN)",
            client: &pod(2, 0).netns,
            client_node: 2,
            server: &pod(0, 0).netns,
            listen: backend,
            connect: vip,
            service: true,
        },
        Check {
            what: "pod12 -> kubernetes Service (node-2 IP)",
            client: &pod(0, 1).netns,
            client_node: 0,
            server: &cluster.nodes[1].netns,
            listen: api_server,
            connect: kubernetes,
            service: true,
        },
    ];
    println!(
        "\n{:<44} {:<5} {:<5} {:<5} {:<18} path on the client's node",
        "CHECK", "ICMP", "TCP", "UDP", "SERVER SAW"
    );
    let mut failures = 0;
    for check in &checks {
        let before = snapshot(&cluster)?;
        let icmp = match check.connect.ip() {
            std::net::IpAddr::V4(ip) if !check.service => check.client.ping(ip).is_ok(),
            _ => true, // a ClusterIP only answers on its port
        };
        let tcp = tcp_echo(check.server, check.listen, check.client, check.connect);
        let udp = if check.service {
            Ok(check.listen)
        } else {
            udp_echo(check.server, check.listen, check.client, check.connect)
        };
        let after = snapshot(&cluster)?;
        let mark = |ok: bool| if ok { "ok" } else { "FAIL" };
        failures += [icmp, tcp.is_ok(), udp.is_ok()]
            .iter()
            .filter(|ok| !**ok)
            .count();
        let seen = tcp
            .as_ref()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|e| format!("{e}"));
        println!(
            "{:<44} {:<5} {:<5} {:<5} {:<18} {}",
            check.what,
            mark(icmp),
            mark(tcp.is_ok()),
            if check.service {
                "-"
            } else {
                mark(udp.is_ok())
            },
            seen,
            path_taken(&before, &after, check.client_node)
        );
    }

    for (node, map) in [(0, "ROUTES"), (1, "NAT")] {
        let root = cluster.nodes[node].pin_root();
        println!(
            "\n$ bpftool map dump pinned {}/{map}   # on {}",
            root.display(),
            NODES[node].name
        );
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(root.join(map))
            .output()
            .context("run bpftool")?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\n$ mycni-agent routes   # on node-3");
    let out = cluster.nodes[2]
        .netns
        .command(mycni_tests::agent_bin())
        .arg("--bpffs-root")
        .arg(cluster.nodes[2].pin_root())
        .arg("routes")
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    for (node, pod) in &pods {
        cluster.nodes[*node].del_pod(pod)?;
    }
    let mut left = Vec::new();
    for node in &cluster.nodes {
        let found = node.leftovers()?;
        if !found.is_empty() {
            left.push(format!("{}: {found:?}", node.netns.name));
        }
    }
    println!(
        "\nDEL every pod; left on the nodes: {}",
        if left.is_empty() {
            "nothing".to_string()
        } else {
            left.join("; ")
        }
    );
    drop(pods);
    drop(cluster);
    println!("removed every namespace, pin and file the demo made");
    anyhow::ensure!(failures == 0 && left.is_empty(), "{failures} checks failed");
    Ok(())
}
