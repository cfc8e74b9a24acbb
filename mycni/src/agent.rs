//! The node agent's work: load and pin the datapath, hook it to the uplink and the VXLAN
//! device, and keep `ROUTES` and the kernel's fallback routes in step with the nodes a
//! [`NodeSource`] reports. Route computation is in [`crate::nodes`]; NAT upkeep decisions
//! in [`crate::nat`].
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mycni_common::{NodeConfig, LAYOUT_VERSION, ROUTE_REMOTE_NODE, ROUTE_REMOTE_TUNNEL};

use crate::datapath::{self, DatapathError, Maps, NatTable};
use crate::ipam::Pool;
use crate::nat::{self, NatOccupancy, NatTimeouts};
use crate::netlink::{Netlink, NetlinkError};
use crate::nodes::{
    self, LocalNode, NodeEntry, NodesError, Path as PeerPath, PeerRoute, TunnelMode,
};

/// The VXLAN device the agent creates in the node.
pub const TUNNEL_DEVICE: &str = "mycni_vxlan";
/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet.
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("address store: {0}")]
    Store(#[source] crate::ipam::store::StoreError),
    #[error("garbage collection: {0}")]
    Garbage(String),
    #[error("uplink {0} does not exist")]
    NoUplink(String),
    #[error("no device holds the node IP {0}")]
    NoUplinkFor(Ipv4Addr),
    #[error("node IP {ip} is not an address of {uplink}")]
    NodeIpNotOnUplink { ip: Ipv4Addr, uplink: String },
    #[error("node watch: {0}")]
    NodeWatch(String),
    #[error("cannot set {path} to {value}: {source}")]
    Sysctl {
        path: &'static str,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nodes file {path}: {source}")]
    NodesFile {
        path: PathBuf,
        #[source]
        source: NodesError,
    },
}

/// This node's identity and the cluster-wide settings.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub name: String,
    pub ip: Ipv4Addr,
    pub uplink: String,
    pub cluster_cidr: Pool,
    /// Destinations besides the cluster CIDR that keep pod source addresses.
    pub non_masquerade: Vec<(Ipv4Addr, u8)>,
    pub tunnel_mode: TunnelMode,
    pub vni: u32,
    pub nat_ports: (u16, u16),
    pub nat_timeouts: NatTimeouts,
}

/// Where the agent learns the other nodes. The static file here; the Kubernetes API later.
pub trait NodeSource {
    /// The current node list when it changed since the last call, `None` when it did not.
    fn poll(&mut self) -> Result<Option<Vec<NodeEntry>>, AgentError>;
}

/// A nodes file (see [`nodes::parse_nodes_file`]), re-read when its modification time or
/// size changes. A missing file means no peers yet.
pub struct NodesFile {
    path: PathBuf,
    seen: Option<(Option<SystemTime>, u64)>,
}

impl NodesFile {
    pub fn new(path: PathBuf) -> NodesFile {
        NodesFile { path, seen: None }
    }
}

impl NodeSource for NodesFile {
    fn poll(&mut self) -> Result<Option<Vec<NodeEntry>>, AgentError> {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(meta) => (meta.modified().ok(), meta.len()),
            Err(_) => (None, u64::MAX),
        };
        if self.seen == Some(stamp) {
            return Ok(None);
        }
        self.seen = Some(stamp);
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        nodes::parse_nodes_file(&text)
            .map(Some)
            .map_err(|source| AgentError::NodesFile {
                path: self.path.clone(),
                source,
            })
    }
}

/// The agent, once the datapath is loaded and hooked to the node's devices.
pub struct Agent {
    root: PathBuf,
    settings: NodeSettings,
    local: LocalNode,
    netlink: Netlink,
    uplink_ifindex: u32,
    uplink_mtu: u32,
    tunnel_ifindex: u32,
    applied: BTreeMap<(Ipv4Addr, u8), PeerRoute>,
}

impl Agent {
    /// Loads and pins the datapath, creates the VXLAN device, writes `CONFIG` and
    /// `NO_MASQ`, and attaches the uplink and tunnel programs. Needs a tokio runtime.
    pub async fn start(root: &Path, settings: NodeSettings) -> Result<Agent, AgentError> {
        datapath::load_and_pin(root)?;
        let netlink = Netlink::current()?;
        let uplink = netlink
            .link_by_name(&settings.uplink)
            .await?
            .ok_or_else(|| AgentError::NoUplink(settings.uplink.clone()))?;
        let (_, uplink_prefix_len) = netlink
            .addresses(uplink.index)
            .await?
            .into_iter()
            .find(|(ip, _)| *ip == settings.ip)
            .ok_or_else(|| AgentError::NodeIpNotOnUplink {
                ip: settings.ip,
                uplink: settings.uplink.clone(),
            })?;
        let mask = if uplink_prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - uplink_prefix_len as u32)
        };
        let local = LocalNode {
            name: settings.name.clone(),
            ip: settings.ip,
            uplink_network: Ipv4Addr::from(u32::from(settings.ip) & mask),
            uplink_prefix_len,
        };
        let tunnel_ifindex = netlink
            .create_vxlan(
                TUNNEL_DEVICE,
                VXLAN_PORT,
                uplink.mtu.saturating_sub(VXLAN_OVERHEAD),
            )
            .await?;
        datapath::write_config(
            root,
            &NodeConfig {
                node_ip: settings.ip.octets(),
                uplink_ifindex: uplink.index,
                tunnel_ifindex,
                vni: settings.vni,
                nat_port_min: settings.nat_ports.0,
                nat_port_max: settings.nat_ports.1,
                layout_version: LAYOUT_VERSION,
            },
        )?;
        datapath::attach_to_uplink(root, &settings.uplink)?;
        datapath::attach_to_tunnel(root, TUNNEL_DEVICE)?;
        let mut agent = Agent {
            root: root.to_path_buf(),
            settings,
            local,
            netlink,
            uplink_ifindex: uplink.index,
            uplink_mtu: uplink.mtu,
            tunnel_ifindex,
            applied: BTreeMap::new(),
        };
        agent.applied = agent.routes_in_map()?;
        agent.write_no_masquerade()?;
        enable_forwarding()?;
        loosen_reverse_path_filter(&["all", &agent.settings.uplink, TUNNEL_DEVICE]);
        Ok(agent)
    }

    /// Pod traffic keeps its source address to the cluster CIDR and the configured CIDRs.
    /// Node IPs are not among them: a pod's flow to another node is masqueraded like any
    /// flow leaving the cluster (a router between nodes has no route back to pods), while
    /// replies to a node's own probes keep the pod's address because `to_netdev` leaves
    /// flows the node stack delivered alone. The own node IP never reaches `to_netdev`.
    fn write_no_masquerade(&self) -> Result<(), AgentError> {
        let cluster = &self.settings.cluster_cidr;
        let prefixes: Vec<(Ipv4Addr, u8)> =
            std::iter::once((cluster.network(), cluster.prefix_len()))
                .chain(self.settings.non_masquerade.iter().copied())
                .collect();
        Ok(datapath::write_no_masquerade(&self.root, &prefixes)?)
    }

    /// The MTU pods should get: the uplink's, less VXLAN's overhead unless every peer is
    /// reached directly.
    pub fn pod_mtu(&self) -> u32 {
        match self.settings.tunnel_mode {
            TunnelMode::Direct => self.uplink_mtu,
            _ => self.uplink_mtu.saturating_sub(VXLAN_OVERHEAD),
        }
    }

    /// Remote-node routes already in `ROUTES` (left by a previous run), so a restart
    /// removes the stale ones instead of forgetting them.
    fn routes_in_map(&self) -> Result<BTreeMap<(Ipv4Addr, u8), PeerRoute>, AgentError> {
        let maps = Maps::open(&self.root)?;
        Ok(maps
            .routes()?
            .into_iter()
            .filter_map(|(cidr, prefix_len, route)| {
                let path = match route.kind {
                    ROUTE_REMOTE_NODE => PeerPath::Direct,
                    ROUTE_REMOTE_TUNNEL => PeerPath::Tunnel,
                    _ => return None,
                };
                let peer = PeerRoute {
                    cidr,
                    prefix_len,
                    node_ip: Ipv4Addr::from(route.next_hop),
                    path,
                };
                Some(((cidr, prefix_len), peer))
            })
            .collect())
    }

    /// Brings `ROUTES` and the kernel routes to what `nodes` implies.
    pub async fn apply_nodes(&mut self, nodes: &[NodeEntry]) -> Result<(), AgentError> {
        let desired = nodes::peer_routes(&self.local, self.settings.tunnel_mode, nodes);
        let (removed, changed) = nodes::diff_routes(&self.applied, &desired);
        let mut maps = Maps::open(&self.root)?;
        for route in &removed {
            maps.remove_route(route.cidr, route.prefix_len)?;
            self.netlink
                .delete_route(route.cidr, route.prefix_len)
                .await?;
            self.applied.remove(&(route.cidr, route.prefix_len));
            eprintln!(
                "mycni-agent: removed route {}/{} via {}",
                route.cidr, route.prefix_len, route.node_ip
            );
        }
        for route in &changed {
            let (kind, ifindex) = match route.path {
                PeerPath::Direct => (ROUTE_REMOTE_NODE, self.uplink_ifindex),
                PeerPath::Tunnel => (ROUTE_REMOTE_TUNNEL, self.tunnel_ifindex),
            };
            maps.write_remote_route(route.cidr, route.prefix_len, kind, ifindex, route.node_ip)?;
            match route.path {
                PeerPath::Direct => {
                    self.netlink
                        .replace_route_via(route.cidr, route.prefix_len, route.node_ip, ifindex)
                        .await?
                }
                PeerPath::Tunnel => {
                    self.netlink
                        .replace_tunnel_route(
                            route.cidr,
                            route.prefix_len,
                            ifindex,
                            self.settings.vni,
                            route.node_ip,
                        )
                        .await?
                }
            }
            self.applied
                .insert((route.cidr, route.prefix_len), route.clone());
            eprintln!(
                "mycni-agent: route {}/{} via {} ({:?})",
                route.cidr, route.prefix_len, route.node_ip, route.path
            );
        }
        Ok(())
    }

    /// Deletes idle SNAT entries and reports how full the table is.
    pub fn expire_nat(&self) -> Result<NatOccupancy, AgentError> {
        let mut table = NatTable::open(&self.root)?;
        let entries = table.entries()?;
        let now = monotonic_ns();
        for key in nat::expired(&entries, now, &self.settings.nat_timeouts) {
            table.remove(&key.0)?;
        }
        Ok(nat::occupancy(&table.entries()?))
    }

    /// Runs until `shutdown` resolves: polls the node source every 200 ms (so a change is
    /// applied well within a second) and expires NAT entries every second. The programs
    /// and maps stay pinned and attached when it returns.
    pub async fn run(
        &mut self,
        source: &mut dyn NodeSource,
        counters: &crate::upkeep::AgentCounters,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut ticks: u64 = 0;
        let mut last_occupancy = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tick.tick() => {}
            }
            match source.poll() {
                Ok(Some(nodes)) => self.apply_nodes(&nodes).await?,
                Ok(None) => {}
                // Keep the last good routes: a half-edited file must not flap them.
                Err(e) => {
                    counters
                        .node_source_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    eprintln!("mycni-agent: {e}; keeping the current routes")
                }
            }
            ticks += 1;
            if ticks.is_multiple_of(5) {
                let occupancy = self.expire_nat()?;
                if last_occupancy != Some(occupancy) {
                    eprintln!(
                        "mycni-agent: NAT flows tcp={} udp={} icmp={} (entries {})",
                        occupancy.tcp, occupancy.udp, occupancy.icmp, occupancy.entries
                    );
                    last_occupancy = Some(occupancy);
                }
            }
        }
    }
}

/// The device that holds `ip`: the node's uplink when the operator did not name it.
pub async fn uplink_holding(ip: Ipv4Addr) -> Result<String, AgentError> {
    let netlink = Netlink::current()?;
    for link in netlink.links().await? {
        if netlink
            .addresses(link.index)
            .await?
            .iter()
            .any(|(address, _)| *address == ip)
        {
            return Ok(link.name);
        }
    }
    Err(AgentError::NoUplinkFor(ip))
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The node stack forwards node-to-pod flows, Service (ClusterIP, NodePort) flows and
/// masqueraded pod flows, so IPv4 forwarding must be on in the agent's network namespace
/// (kubeadm requires it too; flannel and Calico set it the same way).
fn enable_forwarding() -> Result<(), AgentError> {
    let sysctl_error = |source| AgentError::Sysctl {
        path: IP_FORWARD,
        value: "1",
        source,
    };
    let was = std::fs::read_to_string(IP_FORWARD).map_err(sysctl_error)?;
    if was.trim() == "1" {
        eprintln!("mycni-agent: net.ipv4.ip_forward is already 1");
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1").map_err(sysctl_error)?;
    eprintln!(
        "mycni-agent: set net.ipv4.ip_forward=1 (was {}): the node stack forwards node-to-pod, Service and masqueraded pod flows",
        was.trim()
    );
    Ok(())
}

/// Pods' replies to the node stack arrive on the uplink from pod addresses routed through
/// the tunnel, and other nodes' traffic for pods arrives on the tunnel from node addresses
/// routed through the uplink; strict reverse-path filtering would drop both. Loose mode
/// (2) keeps the spoofing check against having any route back.
fn loosen_reverse_path_filter(devices: &[&str]) {
    for device in devices {
        let path = format!("/proc/sys/net/ipv4/conf/{device}/rp_filter");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            match std::fs::write(&path, "2") {
                Ok(()) => eprintln!("mycni-agent: set {path} to 2 (loose, was strict)"),
                Err(e) => eprintln!("mycni-agent: cannot set {path} to 2: {e}"),
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
