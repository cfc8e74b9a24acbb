//! The node agent: loads and pins the datapath, keeps routes to the other nodes in step,
//! expires NAT entries, and prints what the maps hold.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use mycni::agent::{Agent, NodeSettings, NodeSource, NodesFile};
use mycni::cni::result::parse_cidr;
use mycni::datapath::{self, Maps, NatTable};
use mycni::ipam::Pool;
use mycni::kube::{self, client::ApiClient, client::KubeNodeSource};
use mycni::nat::NatTimeouts;
use mycni::netlink::format_mac;
use mycni::upkeep::{self, AgentCounters};
use mycni_common::{
    verdict, NAT_EGRESS, ROUTE_LOCAL_CIDR, ROUTE_LOCAL_ENDPOINT, ROUTE_REMOTE_NODE,
    ROUTE_REMOTE_TUNNEL,
};

const USAGE: &str = "usage: mycni-agent [--bpffs-root DIR] <command> [options]
commands:
  run        load and pin programs and maps, then stay up until SIGTERM/SIGINT.
             With --node-ip, also hook the uplink and keep routes to the other nodes:
               --node-name NAME --node-ip IP [--uplink IFNAME] --cluster-cidr CIDR
               [--nodes-file PATH] [--tunnel-mode auto|vxlan|direct] [--vni N]
             or learn the nodes from Kubernetes (this node's IP and pod CIDR come from
             its Node object, the uplink is the device holding that IP):
               --node-name NAME --cluster-cidr CIDR (--kubeconfig FILE | --in-cluster)
               [--non-masquerade-cidr CIDR]... [--nat-ports MIN-MAX]
               [--nat-timeout-tcp SECS] [--nat-timeout-udp SECS] [--nat-timeout-icmp SECS]
                   idle lifetimes of established TCP (432000, 5 days), answered UDP
                   (120) and ICMP echo (30); handshakes, closing and closed TCP and
                   unanswered UDP follow conntrack (120/60/120/5/30 s), capped by these
             In every mode:
               --cni-conf-dir DIR --pod-cidr CIDR [--pod-mtu N] [--network-name mycni]
                   write DIR/10-mycni.conflist once the datapath is ready
               --data-dir DIR [--gc-interval 60] [--gc-grace 60]
                   free addresses and map entries of pods that vanished without DEL
               --metrics-address ADDR:PORT   serve /metrics and /healthz
               --bpf-log-level off|error|warn|info|debug|trace   the programs' messages
                   in this log (warn: spoofing pods, SNAT out of ports; debug: also
                   malformed packets, new SNAT flows); $MYCNI_BPF_LOG_LEVEL, else warn
  install-cni-plugin DIR
             copy the `mycni` plugin that sits beside this binary into DIR (atomically:
             a runtime may be executing the old one); the DaemonSet's init step
  load       load and pin, then exit (pins keep everything loaded)
  unload     remove the pins (attached programs stay until their links go)
  endpoints  print the ENDPOINTS map       (--json for JSON)
  routes     print the ROUTES map          (--json)
  peers      print the PEERS map: node IPs whose VXLAN is accepted (--json)
  nat        print the NAT map             (--json)
  stats      print the per-verdict counters (--json)";

#[derive(Default, Clone)]
struct Options {
    kubeconfig: Option<PathBuf>,
    in_cluster: bool,
    /// A subcommand's positional argument.
    operand: Option<String>,
    root: Option<PathBuf>,
    command: Option<String>,
    json: bool,
    node_name: Option<String>,
    node_ip: Option<String>,
    uplink: Option<String>,
    cluster_cidr: Option<String>,
    nodes_file: Option<PathBuf>,
    tunnel_mode: Option<String>,
    vni: Option<u32>,
    non_masquerade: Vec<String>,
    nat_ports: Option<String>,
    nat_timeouts: NatTimeouts,
    cni_conf_dir: Option<PathBuf>,
    pod_cidr: Option<String>,
    pod_mtu: Option<u32>,
    network_name: Option<String>,
    data_dir: Option<PathBuf>,
    gc_interval: Option<Duration>,
    gc_grace: Option<Duration>,
    metrics_address: Option<String>,
    bpf_log_level: Option<mycni::ebpf_log::BpfLogLevel>,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut options = Options::default();
    while let Some(raw) = args.next() {
        // `--flag value` and `--flag=value` alike (manifests tend to use the latter).
        let (arg, mut inline) = match raw.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (raw, None),
        };
        let mut value = |name: &str| {
            inline
                .take()
                .or_else(|| args.next())
                .with_context(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--bpffs-root" => options.root = Some(PathBuf::from(value(&arg)?)),
            "--json" => options.json = true,
            "--kubeconfig" => options.kubeconfig = Some(PathBuf::from(value(&arg)?)),
            "--in-cluster" => options.in_cluster = true,
            "--node-name" => options.node_name = Some(value(&arg)?),
            "--node-ip" => options.node_ip = Some(value(&arg)?),
            "--uplink" => options.uplink = Some(value(&arg)?),
            "--cluster-cidr" => options.cluster_cidr = Some(value(&arg)?),
            "--nodes-file" => options.nodes_file = Some(PathBuf::from(value(&arg)?)),
            "--tunnel-mode" => options.tunnel_mode = Some(value(&arg)?),
            "--vni" => options.vni = Some(value(&arg)?.parse().context("--vni")?),
            "--non-masquerade-cidr" => options.non_masquerade.push(value(&arg)?),
            "--nat-ports" => options.nat_ports = Some(value(&arg)?),
            "--nat-timeout-tcp" => options.nat_timeouts.tcp = seconds(&value(&arg)?)?,
            "--nat-timeout-udp" => options.nat_timeouts.udp = seconds(&value(&arg)?)?,
            "--nat-timeout-icmp" => options.nat_timeouts.icmp = seconds(&value(&arg)?)?,
            "--cni-conf-dir" => options.cni_conf_dir = Some(PathBuf::from(value(&arg)?)),
            "--pod-cidr" => options.pod_cidr = Some(value(&arg)?),
            "--pod-mtu" => options.pod_mtu = Some(value(&arg)?.parse().context("--pod-mtu")?),
            "--network-name" => options.network_name = Some(value(&arg)?),
            "--data-dir" => options.data_dir = Some(PathBuf::from(value(&arg)?)),
            "--gc-interval" => options.gc_interval = Some(seconds(&value(&arg)?)?),
            "--gc-grace" => options.gc_grace = Some(seconds(&value(&arg)?)?),
            "--metrics-address" => options.metrics_address = Some(value(&arg)?),
            "--bpf-log-level" => options.bpf_log_level = Some(value(&arg)?.parse()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other if options.command.is_none() && !other.starts_with('-') => {
                options.command = Some(other.to_string())
            }
            other if options.operand.is_none() && !other.starts_with('-') => {
                options.operand = Some(other.to_string())
            }
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
        if let Some(unused) = inline {
            bail!("{arg} takes no value (got {unused:?})");
        }
    }
    // The DaemonSet passes ConfigMap values through the environment; flags win.
    if options.non_masquerade.is_empty() {
        if let Ok(list) = std::env::var("MYCNI_NON_MASQUERADE_CIDRS") {
            options.non_masquerade = list
                .split([' ', ',', '\n'])
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
    }
    Ok(options)
}

fn seconds(text: &str) -> anyhow::Result<Duration> {
    Ok(Duration::from_secs(text.parse().with_context(|| {
        format!("{text:?} is not a number of seconds")
    })?))
}

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let root = options
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(mycni::cni::config::DEFAULT_BPFFS_ROOT));
    match options.command.as_deref() {
        Some("run") => run(&root, &options),
        Some("load") => {
            datapath::load_and_pin(&root)?;
            println!("datapath pinned under {}", root.display());
            Ok(())
        }
        Some("unload") => Ok(datapath::unpin_all(&root)?),
        Some("install-cni-plugin") => install_cni_plugin(options.operand.as_deref()),
        Some("endpoints") => print_endpoints(&root, options.json),
        Some("routes") => print_routes(&root, options.json),
        Some("peers") => print_peers(&root, options.json),
        Some("nat") => print_nat(&root, options.json),
        Some("stats") => print_stats(&root, options.json),
        _ => bail!("{USAGE}"),
    }
}

fn node_settings(options: &Options) -> anyhow::Result<Option<NodeSettings>> {
    let Some(ip) = &options.node_ip else {
        return Ok(None);
    };
    let nat_ports = match &options.nat_ports {
        None => (61000, 65535),
        Some(text) => {
            let (min, max) = text.split_once('-').context("--nat-ports wants MIN-MAX")?;
            let (min, max): (u16, u16) = (min.parse()?, max.parse()?);
            anyhow::ensure!(min > 0 && min <= max, "--nat-ports {text}: empty range");
            (min, max)
        }
    };
    Ok(Some(NodeSettings {
        name: options
            .node_name
            .clone()
            .context("--node-name is required with --node-ip")?,
        ip: ip.parse().with_context(|| format!("--node-ip {ip:?}"))?,
        uplink: options.uplink.clone().unwrap_or_default(),
        cluster_cidr: Pool::parse(
            options
                .cluster_cidr
                .as_deref()
                .context("--cluster-cidr is required")?,
        )?,
        non_masquerade: options
            .non_masquerade
            .iter()
            .map(|text| parse_cidr(text).with_context(|| format!("--non-masquerade-cidr {text:?}")))
            .collect::<anyhow::Result<_>>()?,
        tunnel_mode: options
            .tunnel_mode
            .as_deref()
            .unwrap_or("auto")
            .parse()
            .map_err(anyhow::Error::msg)?,
        vni: options.vni.unwrap_or(1),
        nat_ports,
        nat_timeouts: options.nat_timeouts,
    }))
}

/// The Kubernetes node source the options ask for, if any.
fn kube_source(options: &Options) -> anyhow::Result<Option<KubeNodeSource>> {
    let access = match (&options.kubeconfig, options.in_cluster) {
        (Some(_), true) => bail!("--kubeconfig and --in-cluster exclude each other"),
        (Some(path), false) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            kube::config::parse_kubeconfig(&text, dir)
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        (None, true) => kube::config::in_cluster(
            env_override("MYCNI_API_SERVER_HOST", "KUBERNETES_SERVICE_HOST").as_deref(),
            env_override("MYCNI_API_SERVER_PORT", "KUBERNETES_SERVICE_PORT").as_deref(),
            std::path::Path::new(kube::config::SERVICE_ACCOUNT_DIR),
        )?,
        (None, false) => return Ok(None),
    };
    if options.nodes_file.is_some() {
        bail!("--nodes-file and the Kubernetes API are two node sources; pick one");
    }
    Ok(Some(KubeNodeSource::start(ApiClient::new(access)?)))
}

/// `preferred` when set and not empty, else `fallback`.
fn env_override(preferred: &str, fallback: &str) -> Option<String> {
    std::env::var(preferred)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| std::env::var(fallback).ok())
}

/// Copies the plugin beside this binary into `dir` under a temporary name and renames it
/// into place, so a runtime never executes a half-written file.
fn install_cni_plugin(dir: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = PathBuf::from(dir.context("install-cni-plugin needs the CNI bin directory")?);
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
async fn learn_local_node(source: &KubeNodeSource, options: &mut Options) -> anyhow::Result<()> {
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
    options.node_ip.get_or_insert(ip.to_string());
    options.pod_cidr.get_or_insert(cidr.to_string());
    Ok(())
}

fn run(root: &std::path::Path, options: &Options) -> anyhow::Result<()> {
    mycni::ebpf_log::init(options.bpf_log_level)?;
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
    let pod_cidr = options
        .pod_cidr
        .as_deref()
        .map(Pool::parse)
        .transpose()
        .context("--pod-cidr")?;
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
        let network = options
            .network_name
            .clone()
            .unwrap_or_else(|| "mycni".into());
        if let Some(data_dir) = options.data_dir.clone() {
            let (root, network, counters) = (root.to_path_buf(), network.clone(), counters.clone());
            let interval = options.gc_interval.unwrap_or(Duration::from_secs(60));
            let grace = options.gc_grace.unwrap_or(Duration::from_secs(60));
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

fn print_peers(root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let mut peers = datapath::read_peers(root)?;
    peers.sort();
    if json {
        let rows: Vec<String> = peers.iter().map(|ip| ip.to_string()).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("NODE-IP");
        for ip in peers {
            println!("{ip}");
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
