//! `cargo xtask demo`: a simulated node in network namespaces, three pods added through
//! the real `mycni` binary, their traffic moved by eBPF with kernel forwarding off, the maps
//! as bpftool prints them, then everything removed. Needs root.
use std::process::Command;

use anyhow::{Context, Result};
use mycni_common::verdict;
use mycni_tests::{prefix, tcp_round_trip, Node};

fn main() -> Result<()> {
    let node = Node::new(&prefix("demo"), "10.244.1.0/24").context("create the node")?;
    println!("node namespace {} (pod CIDR {}), datapath pinned under {}",
        node.netns.name, node.pod_cidr, node.pin_root().display());
    node.netns.sysctl("net.ipv4.ip_forward", "0")?;
    println!("net.ipv4.ip_forward=0 in the node: only eBPF can move packets between pods\n");

    let mut pods = Vec::new();
    for name in ["frontend", "backend", "db"] {
        let pod = node.add_pod(name)?;
        println!("ADD {name:<9} -> {} (netns {})", pod.ip, pod.netns.name);
        pods.push((name, pod));
    }
    println!();
    let mut failures = 0;
    let mut verdict_of = |outcome: Result<()>| match outcome {
        Ok(()) => "ok",
        Err(_) => {
            failures += 1;
            "FAILED"
        }
    };
    let mut port = 7000;
    for (from_name, from) in &pods {
        for (to_name, to) in &pods {
            if from_name == to_name {
                continue;
            }
            let ping = verdict_of(from.netns.ping(to.ip));
            let tcp = verdict_of(tcp_round_trip(&to.netns, &from.netns, to.ip, port));
            port += 1;
            println!("{from_name:>9} -> {to_name:<9} icmp {ping:<6} tcp {tcp}");
        }
    }
    for (name, pod) in &pods {
        let ping = verdict_of(node.netns.ping(pod.ip));
        println!("     node -> {name:<9} icmp {ping}");
    }

    for map in ["ROUTES", "ENDPOINTS"] {
        println!("\n$ bpftool map dump pinned {}/{map}", node.pin_root().display());
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(node.pin_root().join(map))
            .output()
            .context("run bpftool")?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\nverdict counters (STATS, summed over CPUs):");
    for (counter, name) in mycni::datapath::read_stats(&node.pin_root())?.iter().zip(verdict::NAMES) {
        println!("  {name:<16} {:>8} packets {:>10} bytes", counter.packets, counter.bytes);
    }

    for (name, pod) in &pods {
        node.del_pod(pod)?;
        println!("DEL {name}");
    }
    let left = node.leftovers()?;
    println!("left on the node after DEL: {}", if left.is_empty() { "nothing".to_string() } else { format!("{left:?}") });
    drop(pods);
    drop(node);
    println!("removed every namespace, pin and file the demo made");
    anyhow::ensure!(failures == 0 && left.is_empty(), "{failures} connectivity checks failed");
    Ok(())
}
