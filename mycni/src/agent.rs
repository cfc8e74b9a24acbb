//! The node agent's work: load and pin the datapath, hook it to the uplink and the VXLAN
//! device, and keep `ROUTES` and the kernel's fallback routes in step with the nodes a
//! [`NodeSource`] reports. Route computation is in [`crate::nodes`]; NAT upkeep decisions
//! in [`crate::nat`].
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnetwork::Ipv4Network;
use mycni_common::{
    NodeConfig, LAYOUT_VERSION, MAX_NO_MASQ, ROUTE_LOCAL_CIDR, ROUTE_REMOTE_NODE,
    ROUTE_REMOTE_TUNNEL,
};
use tokio::sync::Notify;

use crate::datapath::{self, DatapathError, Maps, NatTable};
use crate::ipam::Pool;
use crate::metrics::AgentCounters;
use crate::nat::{self, NatOccupancy, NatTimeouts};
use crate::netlink::{Netlink, NetlinkError};
use crate::nodes::{
    self, LocalNode, NodeEntry, NodesError, Path as PeerPath, PeerRetries, PeerRoute, RouteKey,
    TunnelMode,
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
    #[error("nodes file {path} cannot be read: {source}")]
    NodesFileUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{given} --non-masquerade-cidr given; NO_MASQ holds at most {max} besides the cluster CIDR"
    )]
    TooManyNonMasquerade { given: usize, max: usize },
}

/// Refuses more configured non-masquerade CIDRs than `NO_MASQ` holds beside the cluster
/// CIDR (see `write_no_masquerade`), before anything is loaded.
pub fn check_non_masquerade_fits(given: usize) -> Result<(), AgentError> {
    let max = MAX_NO_MASQ as usize - 1;
    if given > max {
        return Err(AgentError::TooManyNonMasquerade { given, max });
    }
    Ok(())
}

/// This node's identity and the cluster-wide settings.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub name: String,
    pub ip: Ipv4Addr,
    pub uplink: String,
    pub cluster_cidr: Pool,
    /// Destinations besides the cluster CIDR that keep pod source addresses.
    pub non_masquerade: Vec<Ipv4Network>,
    pub tunnel_mode: TunnelMode,
    pub vni: u32,
    pub nat_ports: (u16, u16),
    pub nat_timeouts: NatTimeouts,
}

/// Where the agent learns the other nodes.
pub trait NodeSource {
    /// The current node list when it changed since the last call, `None` when it did not.
    /// An error leaves the agent's routes as they are.
    fn poll(&mut self) -> Result<Option<Vec<NodeEntry>>, AgentError>;

    /// Notified when the source may have news, so the agent polls at once instead of at
    /// its next tick. `None`: the tick alone.
    fn wakeup(&self) -> Option<Arc<Notify>> {
        None
    }
}

/// A nodes file (see [`nodes::parse_nodes_file`]), re-read when its modification time or
/// size changes, at once when inotify reports a write to its directory. A file that goes
/// missing or cannot be read is an error (the routes stay), not an empty cluster.
pub struct NodesFile {
    path: PathBuf,
    seen: Option<(Option<SystemTime>, u64)>,
    wakeup: Option<Arc<Notify>>,
    /// Events inotify reported so far, and how many the last poll had seen.
    events: Arc<AtomicU64>,
    seen_events: u64,
}

/// Without an inotify event (a writer still busy), a changed file is read by the tick only
/// once it has been quiet this long: a half-written file must not withdraw routes.
const QUIET_BEFORE_READ: Duration = Duration::from_secs(1);

impl NodesFile {
    pub fn new(path: PathBuf) -> NodesFile {
        let wakeup = Arc::new(Notify::new());
        let events = Arc::new(AtomicU64::new(0));
        let directory = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let wakeup = match watch_directory(&directory, wakeup.clone(), events.clone()) {
            Ok(()) => Some(wakeup),
            Err(e) => {
                log::warn!(
                    "cannot watch {} ({e}); polling {} every 200 ms",
                    directory.display(),
                    path.display()
                );
                None
            }
        };
        NodesFile {
            path,
            seen: None,
            wakeup,
            events,
            seen_events: 0,
        }
    }
}

impl NodeSource for NodesFile {
    fn poll(&mut self) -> Result<Option<Vec<NodeEntry>>, AgentError> {
        let unreadable = |source| AgentError::NodesFileUnreadable {
            path: self.path.clone(),
            source,
        };
        let meta = std::fs::metadata(&self.path);
        let stamp = match &meta {
            Ok(meta) => (meta.modified().ok(), meta.len()),
            Err(_) => (None, u64::MAX),
        };
        // Reported once per change of state: a file that stays missing is not re-logged.
        if self.seen == Some(stamp) {
            return Ok(None);
        }
        let events = self.events.load(Ordering::Acquire);
        let closed_since = events != self.seen_events;
        let quiet = stamp
            .0
            .and_then(|modified| modified.elapsed().ok())
            .is_none_or(|age| age >= QUIET_BEFORE_READ);
        if self.wakeup.is_some() && self.seen.is_some() && !closed_since && !quiet {
            return Ok(None);
        }
        self.seen_events = events;
        self.seen = Some(stamp);
        meta.map_err(unreadable)?;
        let text = std::fs::read_to_string(&self.path).map_err(unreadable)?;
        nodes::parse_nodes_file(&text)
            .map(Some)
            .map_err(|source| AgentError::NodesFile {
                path: self.path.clone(),
                source,
            })
    }

    fn wakeup(&self) -> Option<Arc<Notify>> {
        self.wakeup.clone()
    }
}

/// Notifies `wakeup` (and counts in `events`) whenever a file in `dir` is closed after
/// writing, renamed, deleted or changes mode (inotify, read by a thread that lives as long
/// as the process).
fn watch_directory(dir: &Path, wakeup: Arc<Notify>, events: Arc<AtomicU64>) -> std::io::Result<()> {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: inotify_init1 takes flags only; a non-negative result is a new fd we own.
    let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is an open descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Not IN_CREATE or IN_MODIFY: a file being written would be read half-way.
    let mask = libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_DELETE
        | libc::IN_ATTRIB
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;
    // SAFETY: `fd` is an inotify descriptor and `c_dir` a NUL-terminated path.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_dir.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::Builder::new()
        .name("nodes-file-watch".into())
        .spawn(move || {
            let mut inotify = std::fs::File::from(fd);
            let mut buf = [0u8; 4096];
            while matches!(inotify.read(&mut buf), Ok(n) if n > 0) {
                events.fetch_add(1, Ordering::Release);
                wakeup.notify_one();
            }
        })?;
    Ok(())
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
    /// This node's pod CIDR as installed by this run (unreachable route and `ROUTES` entry).
    own_cidr: Option<Ipv4Network>,
    /// What `ROUTES` and the kernel hold for each peer, as last applied successfully.
    applied: BTreeMap<RouteKey, PeerRoute>,
    /// Peers whose last apply failed, with their backoff.
    retries: PeerRetries,
    /// The last node list the source gave, re-applied while peers are pending.
    nodes: Option<Vec<NodeEntry>>,
    /// Failure lines still allowed in this pass (a cluster's worth of failing peers is
    /// summarised, not logged peer by peer).
    failure_lines: usize,
    failures_unlogged: usize,
}

impl Agent {
    /// Loads and pins the datapath, creates the VXLAN device, writes `CONFIG` and
    /// `NO_MASQ`, and attaches the uplink and tunnel programs. Needs a tokio runtime.
    pub async fn start(root: &Path, settings: NodeSettings) -> Result<Agent, AgentError> {
        check_non_masquerade_fits(settings.non_masquerade.len())?;
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
        // The kernel reports prefix lengths of at most 32.
        let uplink_subnet = Ipv4Network::new(settings.ip, uplink_prefix_len.min(32))
            .unwrap_or_else(|_| Ipv4Network::from(settings.ip));
        let local = LocalNode {
            name: settings.name.clone(),
            ip: settings.ip,
            uplink_subnet,
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
            own_cidr: None,
            retries: PeerRetries::default(),
            nodes: None,
            failure_lines: 0,
            failures_unlogged: 0,
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
        let prefixes: Vec<(Ipv4Addr, u8)> = std::iter::once(cluster.cidr())
            .chain(self.settings.non_masquerade.iter().copied())
            .map(|cidr| (cidr.network(), cidr.prefix()))
            .collect();
        Ok(datapath::write_no_masquerade(&self.root, &prefixes)?)
    }

    pub fn nat_timeouts(&self) -> NatTimeouts {
        self.settings.nat_timeouts
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
    fn routes_in_map(&self) -> Result<BTreeMap<RouteKey, PeerRoute>, AgentError> {
        let maps = Maps::open(&self.root)?;
        Ok(maps
            .routes()?
            .into_iter()
            .filter_map(|(network, prefix_len, route)| {
                let path = match route.kind {
                    ROUTE_REMOTE_NODE => PeerPath::Direct,
                    ROUTE_REMOTE_TUNNEL => PeerPath::Tunnel,
                    _ => return None,
                };
                let peer = PeerRoute {
                    cidr: Ipv4Network::new(network, prefix_len).ok()?,
                    node_ip: Ipv4Addr::from(route.next_hop),
                    path,
                };
                Some((peer.cidr, peer))
            })
            .collect())
    }

    /// Brings `ROUTES` and the kernel routes to what `nodes` implies, peer by peer: a peer
    /// that fails (a full map, a route the kernel refuses) is logged, counted and left for
    /// a retry with backoff, and every other peer is still applied. Peers still backing off
    /// are skipped. Returns how many peers are not applied.
    pub async fn apply_nodes(&mut self, nodes: &[NodeEntry], counters: &AgentCounters) -> usize {
        // The VXLAN senders the programs accept, and this node's own pod CIDR: failures are
        // counted and retried with the next pass like a peer's.
        if let Err(e) = datapath::write_peers(&self.root, &nodes::peer_ips(&self.local, nodes)) {
            counters.peer_errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("cannot write the VXLAN peers: {e}");
        }
        if let Some(cidr) = nodes::own_pod_cidr(&self.local, nodes) {
            if let Err(e) = self.apply_own_cidr(cidr).await {
                counters.peer_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("cannot install the own pod CIDR {cidr}: {e}");
            }
        }
        let desired = nodes::peer_routes(&self.local, self.settings.tunnel_mode, nodes);
        let (removed, changed) = nodes::diff_routes(&self.applied, &desired);
        // A peer that left the cluster, or came back to what is applied, needs no retry.
        let pending: std::collections::BTreeSet<RouteKey> =
            removed.iter().chain(&changed).map(|r| r.cidr).collect();
        self.retries.retain(|key| pending.contains(key));
        let now = Instant::now();
        // One line per route for small changes; a summary for a cluster's worth.
        let verbose = removed.len() + changed.len() <= 20;
        let (mut done_removed, mut done_changed) = (0, 0);
        self.failure_lines = 10;
        self.failures_unlogged = 0;
        match Maps::open(&self.root) {
            Ok(mut maps) => {
                for route in &removed {
                    let key = route.cidr;
                    if !self.retries.due(&key, now) {
                        continue;
                    }
                    let result = self.remove_peer(&mut maps, route).await;
                    if result.is_ok() {
                        done_removed += 1;
                        if verbose {
                            log::info!("removed route {} via {}", route.cidr, route.node_ip);
                        }
                    }
                    self.settle(route, "remove", result, now, counters);
                }
                for route in &changed {
                    let key = route.cidr;
                    if !self.retries.due(&key, now) {
                        continue;
                    }
                    let result = self.add_peer(&mut maps, route).await;
                    if result.is_ok() {
                        done_changed += 1;
                        if verbose {
                            log::info!(
                                "route {} via {} ({:?})",
                                route.cidr,
                                route.node_ip,
                                route.path
                            );
                        }
                    }
                    self.settle(route, "apply", result, now, counters);
                }
            }
            Err(e) => {
                counters.peer_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("cannot open the maps to apply routes: {e}");
                for route in removed.iter().chain(&changed) {
                    self.retries.failed(route.cidr, now);
                }
            }
        }
        if self.failures_unlogged > 0 {
            log::warn!(
                "{} more peers failed in this pass (not logged one by one)",
                self.failures_unlogged
            );
        }
        if !verbose {
            log::info!(
                "{done_changed} routes added or changed, {done_removed} removed; {} peers routed, {} not applied",
                self.applied.len(),
                self.retries.len()
            );
        }
        counters
            .peers_unapplied
            .store(self.retries.len() as u64, Ordering::Relaxed);
        let direct = self
            .applied
            .values()
            .filter(|r| r.path == PeerPath::Direct)
            .count();
        counters.publish_routes(direct, self.applied.len() - direct, self.own_cidr.is_some());
        self.retries.len()
    }

    /// Withdraws a peer that left: its `ROUTES` entry, then its kernel route.
    async fn remove_peer(&mut self, maps: &mut Maps, route: &PeerRoute) -> Result<(), AgentError> {
        let (network, prefix_len) = (route.cidr.network(), route.cidr.prefix());
        maps.remove_route(network, prefix_len)?;
        self.netlink.delete_route(network, prefix_len).await?;
        self.applied.remove(&route.cidr);
        Ok(())
    }

    /// Keeps the node's own pod CIDR on the node: an `unreachable` kernel route under the
    /// pods' /32 routes (so the stack answers ICMP host unreachable instead of sending the
    /// packet to the default gateway) and a `ROUTE_LOCAL_CIDR` entry, so the programs count
    /// such packets. A CIDR left by an earlier run or assignment is removed.
    async fn apply_own_cidr(&mut self, cidr: Ipv4Network) -> Result<(), AgentError> {
        if self.own_cidr == Some(cidr) {
            return Ok(());
        }
        let own = (cidr.network(), cidr.prefix());
        self.netlink.replace_unreachable_route(own.0, own.1).await?;
        let mut maps = Maps::open(&self.root)?;
        maps.write_local_cidr(own.0, own.1)?;
        let stale: Vec<(Ipv4Addr, u8)> = maps
            .routes()?
            .into_iter()
            .filter(|(ip, len, route)| route.kind == ROUTE_LOCAL_CIDR && (*ip, *len) != own)
            .map(|(ip, len, _)| (ip, len))
            .collect();
        for (ip, len) in stale {
            maps.remove_route(ip, len)?;
            self.netlink.delete_unreachable_route(ip, len).await?;
        }
        self.own_cidr = Some(cidr);
        log::info!("own pod CIDR {cidr}: addresses no pod holds are answered unreachable");
        Ok(())
    }

    /// Routes a new or changed peer: the kernel route first (the stack's path, and the
    /// check that the next hop is reachable at all), then `ROUTES`, so the datapath never
    /// points at a peer the kernel refused.
    async fn add_peer(&mut self, maps: &mut Maps, route: &PeerRoute) -> Result<(), AgentError> {
        let (kind, ifindex) = match route.path {
            PeerPath::Direct => (ROUTE_REMOTE_NODE, self.uplink_ifindex),
            PeerPath::Tunnel => (ROUTE_REMOTE_TUNNEL, self.tunnel_ifindex),
        };
        let (network, prefix_len) = (route.cidr.network(), route.cidr.prefix());
        match route.path {
            PeerPath::Direct => {
                self.netlink
                    .replace_route_via(network, prefix_len, route.node_ip, ifindex)
                    .await?
            }
            PeerPath::Tunnel => {
                self.netlink
                    .replace_tunnel_route(
                        network,
                        prefix_len,
                        ifindex,
                        self.settings.vni,
                        route.node_ip,
                    )
                    .await?
            }
        }
        maps.write_remote_route(network, prefix_len, kind, ifindex, route.node_ip)?;
        self.applied.insert(route.cidr, route.clone());
        Ok(())
    }

    /// Books the outcome of one peer: a failure is counted and logged (at the first
    /// attempt, then at every power of two, so a peer failing for hours stays readable).
    fn settle(
        &mut self,
        route: &PeerRoute,
        what: &str,
        result: Result<(), AgentError>,
        now: Instant,
        counters: &AgentCounters,
    ) {
        let key = route.cidr;
        match result {
            Ok(()) => {
                let attempts = self.retries.succeeded(&key);
                if attempts > 0 {
                    log::info!(
                        "peer {} ({}) applied after {attempts} failed attempts",
                        route.node_ip,
                        route.cidr
                    );
                }
            }
            Err(e) => {
                counters.peer_errors.fetch_add(1, Ordering::Relaxed);
                let attempts = self.retries.failed(key, now);
                if attempts.is_power_of_two() && self.failure_lines == 0 {
                    self.failures_unlogged += 1;
                } else if attempts.is_power_of_two() {
                    self.failure_lines -= 1;
                    log::warn!(
                        "cannot {what} peer {} ({} via {:?}): {e}; attempt {attempts}, retrying in {:?}",
                        route.node_ip,
                        route.cidr,
                        route.path,
                        nodes::retry_delay(attempts)
                    );
                }
            }
        }
    }

    /// Runs until `shutdown` resolves: applies node changes as soon as the source reports
    /// them (polling it every 200 ms besides), and retries failed peers when their backoff
    /// ends. NAT expiry runs on its own thread ([`spawn_nat_upkeep`]), so nothing here
    /// waits for a walk of the NAT table. The programs and maps stay pinned and attached
    /// when it returns; no error ends it.
    pub async fn run(
        &mut self,
        source: &mut dyn NodeSource,
        counters: &AgentCounters,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let wakeup = source.wakeup();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retries.next_due();
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
                _ = async {
                    match &wakeup {
                        Some(notify) => notify.notified().await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            let news = match source.poll() {
                Ok(Some(nodes)) => {
                    self.nodes = Some(nodes);
                    true
                }
                Ok(None) => false,
                // Keep the last good routes: a half-edited file, a vanished file or an API
                // server away must not flap them.
                Err(e) => {
                    counters.node_source_errors.fetch_add(1, Ordering::Relaxed);
                    log::warn!("{e}; keeping the current routes");
                    false
                }
            };
            let retry_due = self
                .retries
                .next_due()
                .is_some_and(|at| at <= Instant::now());
            if news || retry_due {
                if let Some(nodes) = self.nodes.take() {
                    self.apply_nodes(&nodes, counters).await;
                    self.nodes = Some(nodes);
                }
            }
        }
    }
}

/// Expires idle SNAT entries and publishes the table's occupancy into `counters`, on a
/// thread of its own: a walk of a full table (hundreds of thousands of syscalls) must not
/// delay route changes or `/healthz`. Stops when `stop` is set.
pub fn spawn_nat_upkeep(
    root: PathBuf,
    timeouts: NatTimeouts,
    counters: Arc<AgentCounters>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nat-expiry".into())
        .spawn(move || {
            let interval = nat::expiry_interval(&timeouts);
            let mut last_occupancy = None;
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                match expire_nat(&root, &timeouts) {
                    Ok(occupancy) => {
                        counters.publish_nat(&occupancy);
                        if last_occupancy != Some(occupancy) {
                            log::info!(
                                "NAT flows tcp={} udp={} icmp={} (entries {})",
                                occupancy.tcp,
                                occupancy.udp,
                                occupancy.icmp,
                                occupancy.entries
                            );
                            last_occupancy = Some(occupancy);
                        }
                        last_error = None;
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if last_error.as_ref() != Some(&text) {
                            log::warn!("NAT expiry failed: {text}");
                            last_error = Some(text);
                        }
                    }
                }
                // Sleep in short steps so a stop is noticed quickly.
                let until = Instant::now() + interval;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
}

/// Deletes idle SNAT entries and reports how full the table is, from one walk.
pub fn expire_nat(root: &Path, timeouts: &NatTimeouts) -> Result<NatOccupancy, AgentError> {
    let mut table = NatTable::open(root)?;
    let mut entries = table.entries()?;
    let now = monotonic_ns();
    let doomed = nat::expired(&entries, now, timeouts);
    for key in &doomed {
        table.remove(&key.0)?;
    }
    entries.retain(|(key, _)| !doomed.contains(&nat::FlowKeyOrd(*key)));
    Ok(nat::occupancy(&entries))
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
        log::info!("net.ipv4.ip_forward is already 1");
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1").map_err(sysctl_error)?;
    log::info!(
        "set net.ipv4.ip_forward=1 (was {}): the node stack forwards node-to-pod, Service and masqueraded pod flows",
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
                Ok(()) => log::info!("set {path} to 2 (loose, was strict)"),
                Err(e) => log::warn!("cannot set {path} to 2: {e}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_masquerade_cidrs_must_fit_beside_the_cluster_cidr() {
        let room = MAX_NO_MASQ as usize - 1;
        assert!(check_non_masquerade_fits(0).is_ok());
        assert!(check_non_masquerade_fits(room).is_ok());
        let refused = check_non_masquerade_fits(room + 1)
            .expect_err("one too many")
            .to_string();
        assert!(refused.contains(&format!("at most {room}")), "{refused}");
    }
}
