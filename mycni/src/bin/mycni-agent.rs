//! The node agent: loads and pins the datapath, stays up, and prints what the maps hold.
use std::path::PathBuf;

use anyhow::{bail, Context};
use mycni::datapath::{self, Maps};
use mycni::netlink::format_mac;
use mycni_common::{verdict, ROUTE_LOCAL_ENDPOINT, ROUTE_REMOTE_NODE};

const USAGE: &str = "usage: mycni-agent [--bpffs-root DIR] <command> [--json]
commands:
  run        load and pin programs and maps, then stay up until SIGTERM/SIGINT
  load       load and pin, then exit (pins keep everything loaded)
  unload     remove the pins (attached programs stay until their veths go)
  endpoints  print the ENDPOINTS map
  routes     print the ROUTES map
  stats      print the per-verdict counters";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut root = PathBuf::from(mycni::cni::config::DEFAULT_BPFFS_ROOT);
    let mut command = None;
    let mut json = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bpffs-root" => root = PathBuf::from(args.next().context("--bpffs-root needs a value")?),
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other if command.is_none() && !other.starts_with('-') => command = Some(other.to_string()),
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    match command.as_deref() {
        Some("run") => run(root),
        Some("load") => {
            datapath::load_and_pin(&root)?;
            println!("datapath pinned under {}", root.display());
            Ok(())
        }
        Some("unload") => Ok(datapath::unpin_all(&root)?),
        Some("endpoints") => print_endpoints(&root, json),
        Some("routes") => print_routes(&root, json),
        Some("stats") => print_stats(&root, json),
        _ => bail!("{USAGE}"),
    }
}

fn run(root: PathBuf) -> anyhow::Result<()> {
    datapath::load_and_pin(&root)?;
    eprintln!("mycni-agent: datapath pinned under {}", root.display());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        anyhow::Ok(())
    })?;
    // Pins stay: pods keep their datapath while the agent is down or being upgraded.
    eprintln!("mycni-agent: stopping; programs and maps stay pinned");
    Ok(())
}

fn print_endpoints(root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let endpoints = Maps::open(root)?.endpoints()?;
    if json {
        let rows: Vec<_> = endpoints
            .iter()
            .map(|(ip, ep)| {
                serde_json::json!({
                    "ip": ip.to_string(), "ifindex": ep.ifindex,
                    "podMac": format_mac(&ep.pod_mac), "hostMac": format_mac(&ep.host_mac),
                    "containerIdHash": format!("{:016x}", ep.container_id_hash),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<16} {:>8} {:<18} {:<18} CONTAINER-HASH", "IP", "IFINDEX", "POD-MAC", "HOST-MAC");
        for (ip, ep) in endpoints {
            println!(
                "{:<16} {:>8} {:<18} {:<18} {:016x}",
                ip.to_string(),
                ep.ifindex,
                format_mac(&ep.pod_mac),
                format_mac(&ep.host_mac),
                ep.container_id_hash
            );
        }
    }
    Ok(())
}

fn print_routes(root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let routes = Maps::open(root)?.routes()?;
    let kind = |k: u32| match k {
        ROUTE_LOCAL_ENDPOINT => "local",
        ROUTE_REMOTE_NODE => "remote",
        _ => "unknown",
    };
    if json {
        let rows: Vec<_> = routes
            .iter()
            .map(|(ip, len, r)| {
                serde_json::json!({
                    "prefix": format!("{ip}/{len}"), "kind": kind(r.kind), "ifindex": r.ifindex,
                    "nextHop": std::net::Ipv4Addr::from(r.next_hop).to_string(),
                    "podMac": format_mac(&r.pod_mac), "hostMac": format_mac(&r.host_mac),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<20} {:<7} {:>8} {:<16} POD-MAC", "PREFIX", "KIND", "IFINDEX", "NEXT-HOP");
        for (ip, len, r) in routes {
            println!(
                "{:<20} {:<7} {:>8} {:<16} {}",
                format!("{ip}/{len}"),
                kind(r.kind),
                r.ifindex,
                std::net::Ipv4Addr::from(r.next_hop).to_string(),
                format_mac(&r.pod_mac)
            );
        }
    }
    Ok(())
}

fn print_stats(root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let stats = datapath::read_stats(root)?;
    if json {
        let rows: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .zip(verdict::NAMES)
            .map(|(c, name)| (name.to_string(), serde_json::json!({"packets": c.packets, "bytes": c.bytes})))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<16} {:>12} {:>14}", "VERDICT", "PACKETS", "BYTES");
        for (c, name) in stats.iter().zip(verdict::NAMES) {
            println!("{:<16} {:>12} {:>14}", name, c.packets, c.bytes);
        }
    }
    Ok(())
}
