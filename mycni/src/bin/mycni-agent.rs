//! The node agent: loads and pins the datapath, keeps routes to the other nodes in step,
//! expires NAT entries, and prints what the maps hold.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use mycni::agent::{Agent, NodeSettings, NodeSource, NodesFile};
use mycni::agent_cli::{AgentCli, AgentCommand, RunOptions};
use mycni::datapath::{self, Maps, NatTable};
use mycni::kube::{self, client::ApiClient, client::KubeNodeSource};
use mycni::netlink::format_mac;
use mycni::upkeep::{self, AgentCounters};
use mycni_common::{
    verdict, NAT_EGRESS, ROUTE_LOCAL_CIDR, ROUTE_LOCAL_ENDPOINT, ROUTE_REMOTE_NODE,
    ROUTE_REMOTE_TUNNEL,
};

fn main() -> anyhow::Result<()> {
    let cli = AgentCli::parse();
    let root = cli.bpffs_root.as_path();
    match cli.command {
        AgentCommand::Run(options) => run(root, &options),
        AgentCommand::Load => {
            datapath::load_and_pin(root)?;
            println!("datapath pinned under {}", root.display());
            Ok(())
        }
        AgentCommand::Unload => Ok(datapath::unpin_all(root)?),
        AgentCommand::InstallCniPlugin { dir } => install_cni_plugin(&dir),
        AgentCommand::Endpoints(format) => print_endpoints(root, format.json),
        AgentCommand::Routes(format) => print_routes(root, format.json),
        AgentCommand::Nat(format) => print_nat(root, format.json),
        AgentCommand::Stats(format) => print_stats(root, format.json),
    }
}

fn node_settings(options: &RunOptions) -> anyhow::Result<Option<NodeSettings>> {
    let Some(ip) = options.node_ip else {
        return Ok(None);
    };
    Ok(Some(NodeSettings {
        name: options
            .node_name
            .clone()
            .context("--node-name is required with --node-ip")?,
        ip,
        uplink: options.uplink.clone().unwrap_or_default(),
        cluster_cidr: options.cluster_cidr.context("--cluster-cidr is required")?,
        non_masquerade: options.non_masquerade_cidrs(),
        tunnel_mode: options.tunnel_mode,
        vni: options.vni,
        nat_ports: (options.nat_ports.min, options.nat_ports.max),
        nat_timeouts: options.nat_timeouts(),
    }))
}

/// The Kubernetes node source the options ask for, if any.
fn kube_source(options: &RunOptions) -> anyhow::Result<Option<KubeNodeSource>> {
    let access = match (&options.kubeconfig, options.in_cluster) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            kube::config::parse_kubeconfig(&text, dir)
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        (None, true) => kube::config::in_cluster(
            or_env(&options.api_server_host, "KUBERNETES_SERVICE_HOST").as_deref(),
            or_env(&options.api_server_port, "KUBERNETES_SERVICE_PORT").as_deref(),
            std::path::Path::new(kube::config::SERVICE_ACCOUNT_DIR),
        )?,
        (None, false) => return Ok(None),
    };
    Ok(Some(KubeNodeSource::start(ApiClient::new(access)?)))
}

/// `value` when given and not empty, else `$fallback`.
fn or_env(value: &Option<String>, fallback: &str) -> Option<String> {
    value
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| std::env::var(fallback).ok())
}

/// Copies the plugin beside this binary into `dir` under a temporary name and renames it
/// into place, so a runtime never executes a half-written file.
fn install_cni_plugin(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().context("locating mycni-agent")?;
    let source = exe.with_file_name("mycni");
    let staged = dir.join(".mycni.installing");
    std::fs::copy(&source, &staged)
        .with_context(|| format!("copy {} to {}", source.display(), staged.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
    let target = dir.join("mycni");
    std::fs::rename(&staged, &target)
        .with_context(|| format!("rename {} to {}", staged.display(), target.display()))?;
    println!("installed {}", target.display());
    Ok(())
}

/// Waits until this node's Node object has an InternalIP and a pod CIDR (the controller
/// manager assigns the CIDR shortly after kubelet registers the node), then fills in the
/// options the operator left out.
async fn learn_local_node(source: &KubeNodeSource, options: &mut RunOptions) -> anyhow::Result<()> {
    let name = options
        .node_name
        .clone()
        .context("--node-name is required with the Kubernetes API")?;
    let mut waited = Duration::ZERO;
    let step = Duration::from_millis(100);
    let node = loop {
        for error in source.take_errors() {
            eprintln!("mycni-agent: {error}");
        }
        match source.node(&name) {
            Some(node) if node.internal_ip.is_some() && node.pod_cidr.is_some() => break node,
            seen => {
                if waited.as_millis().is_multiple_of(5000) {
                    let why = match seen {
                        None => "to be registered",
                        Some(n) if n.internal_ip.is_none() => "to report an InternalIP",
                        Some(_) => "to be given a pod CIDR",
                    };
                    eprintln!("mycni-agent: waiting for node {name} {why}");
                }
            }
        }
        tokio::time::sleep(step).await;
        waited += step;
    };
    let (Some(ip), Some(cidr)) = (node.internal_ip, node.pod_cidr) else {
        unreachable!("checked above");
    };
    eprintln!("mycni-agent: node {name} has IP {ip} and pod CIDR {cidr}");
    options.node_ip.get_or_insert(ip);
    options.pod_cidr.get_or_insert(cidr);
    Ok(())
}

fn run(root: &std::path::Path, options: &RunOptions) -> anyhow::Result<()> {
    mycni::ebpf_log::init(options.bpf_log_level);
    let mut options = options.clone();
    let kube_source = kube_source(&options)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(source) = &kube_source {
        runtime.block_on(learn_local_node(source, &mut options))?;
    }
    let options = &options;
    let mut settings = node_settings(options)?;
    let pod_cidr = options.pod_cidr;
    if options.cni_conf_dir.is_some() && pod_cidr.is_none() {
        bail!("--cni-conf-dir needs --pod-cidr (this node's pod CIDR)");
    }
    if let Some(settings) = settings.as_mut().filter(|s| s.uplink.is_empty()) {
        settings.uplink = runtime
            .block_on(mycni::agent::uplink_holding(settings.ip))
            .context("finding the uplink (give --uplink)")?;
    }
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        };
        let counters = Arc::new(AgentCounters::default());
        let mut agent = match settings {
            None => {
                datapath::load_and_pin(root)?;
                None
            }
            Some(settings) => Some(Agent::start(root, settings).await?),
        };
        let refreshed = upkeep::refresh_pod_programs(root).await?;
        eprintln!(
            "mycni-agent: datapath pinned under {}; programs of {refreshed} existing pods replaced",
            root.display()
        );
        if let Some(address) = &options.metrics_address {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("--metrics-address {address}"))?;
            tokio::spawn(upkeep::serve_http(
                listener,
                root.to_path_buf(),
                counters.clone(),
            ));
        }
        let network = options.network_name.clone();
        if let Some(data_dir) = options.data_dir.clone() {
            let (root, network, counters) = (root.to_path_buf(), network.clone(), counters.clone());
            let interval = Duration::from_secs(options.gc_interval);
            let grace = Duration::from_secs(options.gc_grace);
            // Its own thread and runtime: GC waits on the address store's file lock, which
            // a slow ADD may hold, and must not stall route changes or /healthz meanwhile.
            std::thread::Builder::new()
                .name("garbage-collection".into())
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            eprintln!("mycni-agent: garbage collection cannot start: {e}");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let mut tick =
                            tokio::time::interval(interval.max(Duration::from_millis(100)));
                        loop {
                            tick.tick().await;
                            match upkeep::collect_garbage(&data_dir, &network, &root, grace).await {
                                Ok(freed) => {
                                    counters
                                        .garbage_collected
                                        .fetch_add(freed as u64, Ordering::Relaxed);
                                }
                                Err(e) => eprintln!("mycni-agent: garbage collection failed: {e}"),
                            }
                        }
                    })
                })
                .context("start the garbage collection thread")?;
        }
        // Written last: its presence tells kubelet (and STATUS) the node can take pods.
        if let (Some(dir), Some(pod_cidr)) = (&options.cni_conf_dir, &pod_cidr) {
            let mtu = options
                .pod_mtu
                .or_else(|| agent.as_ref().map(Agent::pod_mtu))
                .unwrap_or(mycni::cni::config::DEFAULT_MTU);
            let data_dir = options
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(mycni::cni::config::DEFAULT_DATA_DIR));
            let conflist = mycni::cni::config::conflist(&network, pod_cidr, mtu, &data_dir, root);
            let path = upkeep::write_conflist(dir, &conflist)?;
            eprintln!("mycni-agent: wrote {} (pod MTU {mtu})", path.display());
        }
        match agent.as_mut() {
            None => shutdown.await,
            Some(agent) => {
                let mut source: Box<dyn NodeSource> = match kube_source {
                    Some(source) => Box::new(source),
                    None => Box::new(NodesFile::new(
                        options
                            .nodes_file
                            .clone()
                            .unwrap_or_else(|| PathBuf::from("/etc/mycni/nodes")),
                    )),
                };
                let stop_nat = Arc::new(AtomicBool::new(false));
                let nat_upkeep = mycni::agent::spawn_nat_upkeep(
                    root.to_path_buf(),
                    agent.nat_timeouts(),
                    counters.clone(),
                    stop_nat.clone(),
                )
                .context("start the NAT expiry thread")?;
                agent.run(source.as_mut(), &counters, shutdown).await;
                stop_nat.store(true, Ordering::Relaxed);
                let _ = nat_upkeep.join();
            }
        }
        anyhow::Ok(())
    })?;
    // Pins and attachments stay: pods keep their datapath while the agent is down.
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
        println!(
            "{:<16} {:>8} {:<18} {:<18} CONTAINER-HASH",
            "IP", "IFINDEX", "POD-MAC", "HOST-MAC"
        );
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

fn route_kind(kind: u32) -> &'static str {
    match kind {
        ROUTE_LOCAL_ENDPOINT => "local",
        ROUTE_REMOTE_NODE => "direct",
        ROUTE_REMOTE_TUNNEL => "vxlan",
        ROUTE_LOCAL_CIDR => "own-cidr",
        _ => "unknown",
    }
}

fn print_routes(root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let routes = Maps::open(root)?.routes()?;
    if json {
        let rows: Vec<_> = routes
            .iter()
            .map(|(ip, len, r)| {
                serde_json::json!({
                    "prefix": format!("{ip}/{len}"), "kind": route_kind(r.kind), "ifindex": r.ifindex,
                    "nextHop": std::net::Ipv4Addr::from(r.next_hop).to_string(),
                    "podMac": format_mac(&r.pod_mac), "hostMac": format_mac(&r.host_mac),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<20} {:<7} {:>8} {:<16} POD-MAC",
            "PREFIX", "KIND", "IFINDEX", "NEXT-HOP"
        );
        for (ip, len, r) in routes {
            println!(
                "{:<20} {:<7} {:>8} {:<16} {}",
                format!("{ip}/{len}"),
                route_kind(r.kind),
                r.ifindex,
                std::net::Ipv4Addr::from(r.next_hop).to_string(),
                format_mac(&r.pod_mac)
            );
        }
    }
    Ok(())
}

fn print_nat(root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let entries = NatTable::open(root)?.entries()?;
    let now = mycni::agent::monotonic_ns();
    let proto = |p: u8| match p {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        _ => "other",
    };
    let rows: Vec<_> = mycni::nat::flow_states(&entries)
        .iter()
        .map(|(key, entry, state)| {
            serde_json::json!({
                "proto": proto(key.proto),
                "direction": if entry.direction == NAT_EGRESS { "egress" } else { "ingress" },
                "state": state.name(),
                "from": format!("{}:{}", std::net::Ipv4Addr::from(key.saddr), key.sport),
                "to": format!("{}:{}", std::net::Ipv4Addr::from(key.daddr), key.dport),
                "translatedTo": format!("{}:{}", std::net::Ipv4Addr::from(entry.addr), entry.port),
                "idleSeconds": now.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
            })
        })
        .collect();
    let occupancy = mycni::nat::occupancy(&entries);
    if json {
        let report = serde_json::json!({
            "occupancy": {"tcp": occupancy.tcp, "udp": occupancy.udp, "icmp": occupancy.icmp,
                          "entries": occupancy.entries, "capacity": mycni_common::MAX_NAT},
            "entries": rows,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "flows: tcp {} udp {} icmp {}; entries {} of {}",
            occupancy.tcp,
            occupancy.udp,
            occupancy.icmp,
            occupancy.entries,
            mycni_common::MAX_NAT
        );
        println!(
            "{:<5} {:<8} {:<12} {:<22} {:<22} {:<22} IDLE",
            "PROTO", "DIR", "STATE", "FROM", "TO", "REWRITTEN"
        );
        for row in rows {
            let text = |key: &str| row[key].as_str().unwrap_or("").to_string();
            println!(
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
    }
    Ok(())
}

fn print_stats(root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let stats = datapath::read_stats(root)?;
    if json {
        let rows: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .zip(verdict::NAMES)
            .map(|(c, name)| {
                (
                    name.to_string(),
                    serde_json::json!({"packets": c.packets, "bytes": c.bytes}),
                )
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<22} {:>12} {:>14}", "VERDICT", "PACKETS", "BYTES");
        for (c, name) in stats.iter().zip(verdict::NAMES) {
            println!("{:<22} {:>12} {:>14}", name, c.packets, c.bytes);
        }
    }
    Ok(())
}
