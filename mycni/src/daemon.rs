//! `mycni-agent run`: wires the pieces together and stays up until SIGTERM/SIGINT. It
//! loads the datapath (with [`crate::agent::Agent`] when this node routes to others),
//! re-attaches existing pods to the new programs, serves [`crate::metrics`], runs
//! [`crate::garbage_collection`] and NAT expiry on threads of their own, writes the
//! [`crate::conflist`] last, and follows the node source until told to stop. No decisions
//! live here; they are in the modules it calls.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::agent::{self, Agent, AgentError, NodeSettings, NodeSource, NodesFile};
use crate::agent_cli::RunOptions;
use crate::datapath::{self, DatapathError, Maps};
use crate::kube::client::{
    ApiServer, KubeClientError, KubeNodeSource, KubeServiceSource, KubeWatches, PolicyWatches,
};
use crate::kube::config::KubeConfigError;
use crate::metrics::AgentCounters;
use crate::netlink::{Netlink, NetlinkError};
use crate::policy_sync::{PolicySync, SharedPolicyReport};
use crate::service_frontends::LocalNode;
use crate::socket_lb::cgroup::{self, CgroupAttachError};
use crate::socket_lb::ServiceMode;

/// The node source, the Services source (ebpf mode only) and the watches they share.
type KubeSources = (KubeNodeSource, Option<KubeServiceSource>, KubeWatches);

/// The nodes file when neither it nor the Kubernetes API is named.
pub const DEFAULT_NODES_FILE: &str = "/etc/mycni/nodes";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("Services in eBPF mode: {0}")]
    Services(#[from] CgroupAttachError),
    #[error("--node-name is required {0}")]
    NodeNameMissing(&'static str),
    #[error("--cluster-cidr is required with --node-ip")]
    ClusterCidrMissing,
    #[error("--cni-conf-dir needs --pod-cidr (this node's pod CIDR)")]
    PodCidrMissing,
    #[error("finding the uplink (give --uplink): {0}")]
    Uplink(#[source] AgentError),
    #[error(transparent)]
    InCluster(KubeConfigError),
    #[error(transparent)]
    KubeClient(#[from] KubeClientError),
    #[error("--metrics-address {address}: {source}")]
    MetricsAddress {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {what}: {source}")]
    Start {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the conflist into {dir}: {source}")]
    Conflist {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until SIGTERM or SIGINT. Pins and attachments stay when it returns:
/// pods keep their datapath while the agent is down.
pub fn run(root: &Path, options: RunOptions) -> Result<(), DaemonError> {
    crate::ebpf_log::init(options.bpf_log_level);
    let mut options = options;
    let (kube_source, service_source, kube_watches) = match kube_sources(&options)? {
        Some((nodes, services, watches)) => (Some(nodes), services, Some(watches)),
        None => (None, None, None),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Start {
            what: "the runtime",
            source,
        })?;
    if let Some(source) = &kube_source {
        runtime.block_on(learn_local_node(source, &mut options))?;
    }
    let options = &options;
    let mut settings = node_settings(options)?;
    if options.cni_conf_dir.is_some() && options.pod_cidr.is_none() {
        return Err(DaemonError::PodCidrMissing);
    }
    if let Some(settings) = settings.as_mut().filter(|s| s.uplink.is_empty()) {
        settings.uplink = runtime
            .block_on(agent::uplink_holding(settings.ip))
            .map_err(DaemonError::Uplink)?;
    }
    runtime.block_on(serve(
        root,
        options,
        settings,
        kube_source,
        service_source,
        kube_watches,
    ))?;
    log::info!("stopping; programs and maps stay pinned");
    Ok(())
}

/// Everything after the options are settled, inside the runtime.
async fn serve(
    root: &Path,
    options: &RunOptions,
    settings: Option<NodeSettings>,
    kube_source: Option<KubeNodeSource>,
    service_source: Option<KubeServiceSource>,
    kube_watches: Option<KubeWatches>,
) -> Result<(), DaemonError> {
    let start = |what| move |source| DaemonError::Start { what, source };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(start("the SIGTERM handler"))?;
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
    apply_service_mode(root, options)?;
    // Where NodePorts and hostPorts without hostIP answer: every address of the node.
    tokio::spawn(crate::node_addresses::keep_in_step(root.to_path_buf()));
    if let Some(source) = service_source {
        // The Kubernetes node source filled it in (learn_local_node).
        let node = LocalNode {
            name: options.node_name.clone().unwrap_or_default(),
        };
        tokio::spawn(crate::service_sync::sync_services(
            root.to_path_buf(),
            source,
            node,
            counters.clone(),
        ));
        log::info!("Services: following the API's Services and Endpoints");
    }
    let refreshed = refresh_pod_programs(root).await?;
    log::info!(
        "datapath pinned under {}; programs of {refreshed} existing pods replaced",
        root.display()
    );
    // NetworkPolicy needs the Kubernetes API: pods, namespaces and policies come from it.
    let policy = match (&kube_watches, &kube_source) {
        (Some(watches), Some(source)) => Some(
            start_policy(
                root,
                options
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(crate::cni::config::DEFAULT_DATA_DIR)),
                counters.clone(),
                watches,
                source,
                options.node_name.clone().unwrap_or_default(),
            )
            .await?,
        ),
        _ => None,
    };
    if let Some(address) = &options.metrics_address {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| DaemonError::MetricsAddress {
                address: address.clone(),
                source,
            })?;
        tokio::spawn(crate::metrics::serve_http(
            listener,
            root.to_path_buf(),
            counters.clone(),
            policy,
        ));
    }
    if let Some(data_dir) = &options.data_dir {
        spawn_garbage_collection(
            data_dir.clone(),
            options.network_name.clone(),
            root.to_path_buf(),
            Duration::from_secs(options.gc_interval),
            Duration::from_secs(options.gc_grace),
            counters.clone(),
        )
        .map_err(start("the garbage collection thread"))?;
    }
    // Written last: its presence tells kubelet (and STATUS) the node can take pods.
    if let (Some(dir), Some(pod_cidr)) = (&options.cni_conf_dir, &options.pod_cidr) {
        let mtu = options
            .pod_mtu
            .or_else(|| agent.as_ref().map(Agent::pod_mtu))
            .unwrap_or(crate::cni::config::DEFAULT_MTU);
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::cni::config::DEFAULT_DATA_DIR));
        let conflist = crate::cni::config::conflist(
            &options.network_name,
            pod_cidr,
            mtu,
            &data_dir,
            root,
            options.service_mode,
        );
        let path = crate::conflist::write_conflist(dir, &conflist).map_err(|source| {
            DaemonError::Conflist {
                dir: dir.clone(),
                source,
            }
        })?;
        log::info!("wrote {} (pod MTU {mtu})", path.display());
    }
    let Some(agent) = agent.as_mut() else {
        shutdown.await;
        return Ok(());
    };
    let mut source: Box<dyn NodeSource> = match kube_source {
        Some(source) => Box::new(source),
        None => Box::new(NodesFile::new(
            options
                .nodes_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NODES_FILE)),
        )),
    };
    let stop_nat = Arc::new(AtomicBool::new(false));
    let nat_upkeep = agent::spawn_nat_upkeep(
        root.to_path_buf(),
        agent.nat_timeouts(),
        counters.clone(),
        stop_nat.clone(),
    )
    .map_err(start("the NAT expiry thread"))?;
    agent.run(source.as_mut(), &counters, shutdown).await;
    stop_nat.store(true, Ordering::Relaxed);
    let _ = nat_upkeep.join();
    Ok(())
}

/// Attaches the Services programs in ebpf mode (replacing an earlier run's links), or
/// detaches them when an earlier run attached them and the mode is back to kube-proxy.
fn apply_service_mode(root: &Path, options: &RunOptions) -> Result<(), DaemonError> {
    match options.service_mode {
        ServiceMode::Ebpf => {
            let cgroup = options
                .cgroup_path
                .clone()
                .unwrap_or_else(cgroup::default_cgroup_path);
            cgroup::attach_services(root, &cgroup)?;
            log::info!(
                "Services load-balanced in eBPF for cgroup {}",
                cgroup.display()
            );
        }
        ServiceMode::KubeProxy if cgroup::services_attached(root) => {
            cgroup::detach_services(root)?;
            log::info!("Services left to kube-proxy: the socket-level programs are detached");
        }
        ServiceMode::KubeProxy => {}
    }
    Ok(())
}

/// This node's routing settings, when it routes to others (`--node-ip`, or the Node's IP).
fn node_settings(options: &RunOptions) -> Result<Option<NodeSettings>, DaemonError> {
    let Some(ip) = options.node_ip else {
        return Ok(None);
    };
    Ok(Some(NodeSettings {
        name: options
            .node_name
            .clone()
            .ok_or(DaemonError::NodeNameMissing("with --node-ip"))?,
        ip,
        uplink: options.uplink.clone().unwrap_or_default(),
        cluster_cidr: options
            .cluster_cidr
            .ok_or(DaemonError::ClusterCidrMissing)?,
        non_masquerade: options.non_masquerade_cidrs(),
        tunnel_mode: options.tunnel_mode,
        vni: options.vni,
        nat_ports: (options.nat_ports.min, options.nat_ports.max),
        nat_timeouts: options.nat_timeouts(),
    }))
}

/// Starts the NetworkPolicy watches and their loop ([`PolicySync`]) on a thread of its own;
/// this node's addresses (its `HOST` identity) are read once, here.
async fn start_policy(
    root: &Path,
    data_dir: PathBuf,
    counters: Arc<AgentCounters>,
    watches: &KubeWatches,
    nodes: &KubeNodeSource,
    node_name: String,
) -> Result<SharedPolicyReport, DaemonError> {
    let netlink = Netlink::current()?;
    let mut host_addresses = Vec::new();
    for link in netlink.links().await? {
        for (ip, _) in netlink.addresses(link.index).await? {
            if !ip.is_loopback() {
                host_addresses.push(ip);
            }
        }
    }
    let report = SharedPolicyReport::default();
    PolicySync::new(
        root.to_path_buf(),
        data_dir,
        counters,
        PolicyWatches::start(watches),
        nodes.subscribe(),
        node_name,
        host_addresses,
        report.clone(),
    )
    .spawn()
    .map_err(|source| DaemonError::Start {
        what: "the policy thread",
        source,
    })?;
    Ok(report)
}

/// The Kubernetes node source the options ask for, if any, with the Services and Endpoints
/// source in `--service-mode ebpf` (without the Kubernetes API, the Services maps are left to
/// whoever writes them), and the watches they run on (the policy watches join them).
fn kube_sources(options: &RunOptions) -> Result<Option<KubeSources>, DaemonError> {
    let server = match (&options.kubeconfig, options.in_cluster) {
        (Some(path), _) => ApiServer::Kubeconfig(path.clone()),
        (None, true) => ApiServer::InCluster {
            server: crate::kube::config::in_cluster_server(
                or_env(&options.api_server_host, "KUBERNETES_SERVICE_HOST").as_deref(),
                or_env(&options.api_server_port, "KUBERNETES_SERVICE_PORT").as_deref(),
            )
            .map_err(DaemonError::InCluster)?,
        },
        (None, false) => return Ok(None),
    };
    let watches = KubeWatches::connect(server)?;
    let services =
        (options.service_mode == ServiceMode::Ebpf).then(|| KubeServiceSource::start(&watches));
    Ok(Some((KubeNodeSource::start(&watches), services, watches)))
}

/// `value` when given and not empty (a blank ConfigMap value), else `$fallback`.
fn or_env(value: &Option<String>, fallback: &str) -> Option<String> {
    value
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| std::env::var(fallback).ok())
}

/// Waits until this node's Node object has an InternalIP and a pod CIDR (the controller
/// manager assigns the CIDR shortly after kubelet registers the node), then fills in the
/// options the operator left out.
async fn learn_local_node(
    source: &KubeNodeSource,
    options: &mut RunOptions,
) -> Result<(), DaemonError> {
    let name = options
        .node_name
        .clone()
        .ok_or(DaemonError::NodeNameMissing("with the Kubernetes API"))?;
    let mut waited = Duration::ZERO;
    let step = Duration::from_millis(100);
    let (ip, cidr) = loop {
        for error in source.take_errors() {
            log::warn!("{error}");
        }
        let seen = source.node(&name);
        if let Some((Some(ip), Some(cidr))) = seen.as_ref().map(|n| (n.internal_ip, n.pod_cidr)) {
            break (ip, cidr);
        }
        if waited.as_millis().is_multiple_of(5000) {
            let why = match seen {
                None => "to be registered",
                Some(n) if n.internal_ip.is_none() => "to report an InternalIP",
                Some(_) => "to be given a pod CIDR",
            };
            log::info!("waiting for node {name} {why}");
        }
        tokio::time::sleep(step).await;
        waited += step;
    };
    log::info!("node {name} has IP {ip} and pod CIDR {cidr}");
    options.node_ip.get_or_insert(ip);
    options.pod_cidr.get_or_insert(cidr);
    Ok(())
}

/// Collects garbage every `interval` on a thread and runtime of its own: it waits on the
/// address store's file lock, which a slow ADD may hold, and must not stall route changes
/// or `/healthz` meanwhile.
fn spawn_garbage_collection(
    data_dir: PathBuf,
    network: String,
    root: PathBuf,
    interval: Duration,
    grace: Duration,
    counters: Arc<AgentCounters>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("garbage-collection".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
                loop {
                    tick.tick().await;
                    let collected = crate::garbage_collection::collect_garbage(
                        &data_dir, &network, &root, grace,
                    );
                    match collected.await {
                        Ok(freed) => {
                            counters
                                .garbage_collected
                                .fetch_add(freed as u64, Ordering::Relaxed);
                        }
                        Err(e) => log::warn!("garbage collection failed: {e}"),
                    }
                }
            })
        })?;
    Ok(())
}

/// Re-attaches the pinned (just loaded) `from_pod`/`to_pod` to every pod's host veth, in
/// place: after an upgrade, existing pods run the new programs too, without a gap.
async fn refresh_pod_programs(root: &Path) -> Result<usize, DaemonError> {
    let netlink = Netlink::current()?;
    let links = netlink.links().await?;
    let mut refreshed = 0;
    for (_, endpoint) in Maps::open(root)?.endpoints()? {
        if let Some(link) = links
            .iter()
            .find(|l| l.index == endpoint.ifindex && l.name.starts_with("lxc"))
        {
            datapath::attach_to_host_veth(root, &link.name)?;
            refreshed += 1;
        }
    }
    Ok(refreshed)
}
