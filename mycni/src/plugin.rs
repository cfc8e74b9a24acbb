//! The CNI commands, driving the pure logic ([`crate::cni`], [`crate::ipam`]) with the
//! adapters ([`crate::netlink`], [`crate::datapath`], [`crate::ipam::store`]).
//!
//! Every ADD step that changes the node is recorded in an [`Undo`] log; a failure part-way
//! rolls back exactly what this invocation did, so a failed ADD leaves nothing behind.
use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;
use serde_json::Value;

use crate::cni::config::{Attachment, NetConf};
use crate::cni::result::{CniResult, Interface, IpConfig, RouteEntry};
use crate::cni::version::{version_info, CniVersion};
use crate::cni::{CniEnv, CniError, Command, ErrorCode};
use crate::datapath::{self, DatapathError, Maps};
use crate::host_ports::plan::{conflicts, describe, plan as plan_host_ports};
use crate::host_ports::{attachment_hash, Claim, HostPortTable, HostPortTableError};
use crate::ipam::store::{IpStore, Owner, StoreError};
use crate::ipam::IpamError;
use crate::netlink::{format_mac, open_netns, Netlink, NetlinkError};
use crate::policy_endpoint::{namespace_has_policies, EndpointPolicyMaps, PolicyEndpointError};
use mycni_common::service::ServiceKey;
use mycni_common::{fnv1a64, Endpoint, GATEWAY_IP, PROG_FROM_POD};

/// `0.0.0.0/0`, the pod's route via the gateway.
const DEFAULT_ROUTE: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::UNSPECIFIED, 0) {
    Some(cidr) => cidr,
    None => panic!("0.0.0.0/0 is a network"),
};

/// What the plugin prints on success (`None`: nothing, as DEL, CHECK, STATUS and GC).
pub type Output = Option<Value>;

/// Runs one CNI invocation. On error, the version to stamp the error JSON with comes along.
pub async fn execute(
    lookup: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Output, (CniError, CniVersion)> {
    let fallback_version = NetConf::sniff_version(stdin);
    let env = CniEnv::from_lookup(lookup).map_err(|e| (e, fallback_version))?;
    if env.command == Command::Version {
        return Ok(Some(version_info(fallback_version)));
    }
    let conf = NetConf::parse(stdin).map_err(|e| (e, fallback_version))?;
    let version = conf.cni_version;
    let result = match env.command {
        Command::Add => add(&env, &conf).await.map(Some),
        Command::Del => del(&env, &conf).await.map(|()| None),
        Command::Check => check(&env, &conf).await.map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Gc => gc(&conf).await.map(|()| None),
        Command::Version => unreachable!("answered above"),
    };
    result.map_err(|e| (e, version))
}

/// The host end of a pod's veth: `lxc` + 12 hex digits of a hash of container ID and
/// interface, so the name is stable, unique per attachment and at most 15 bytes.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let hash = fnv1a64(format!("{container_id}/{ifname}").as_bytes());
    format!("lxc{:012x}", hash & 0xffff_ffff_ffff)
}

fn netlink_error(e: NetlinkError) -> CniError {
    CniError::new(ErrorCode::NetlinkFailure, "netlink operation failed").with_details(e)
}

fn policy_error(e: PolicyEndpointError) -> CniError {
    match e {
        PolicyEndpointError::Datapath(e) => datapath_error(e),
        other => CniError::new(ErrorCode::DatapathFailure, "policy maps operation failed")
            .with_details(other),
    }
}

/// The pod's namespace, as Kubernetes runtimes pass it in `CNI_ARGS`.
const K8S_POD_NAMESPACE: &str = "K8S_POD_NAMESPACE";

fn datapath_error(e: DatapathError) -> CniError {
    match e {
        DatapathError::NotLoaded { .. } => CniError::new(
            ErrorCode::TryAgainLater,
            "the mycni datapath is not loaded on this node yet",
        )
        .with_details(e),
        other => CniError::new(ErrorCode::DatapathFailure, "datapath operation failed")
            .with_details(other),
    }
}

fn host_port_error(e: HostPortTableError) -> CniError {
    match e {
        HostPortTableError::Datapath(e) => datapath_error(e),
        // Room comes back as pods with hostPorts go: the runtime's retry may succeed.
        HostPortTableError::Full => CniError::new(
            ErrorCode::TryAgainLater,
            "no room for the pod's hostPorts: every hostPort entry of this node is taken",
        )
        .with_details(HostPortTableError::Full),
        other => CniError::new(ErrorCode::DatapathFailure, "hostPort map operation failed")
            .with_details(other),
    }
}

fn store_error(e: StoreError) -> CniError {
    match e {
        StoreError::Ipam(IpamError::Exhausted(pool)) => CniError::new(
            ErrorCode::PoolExhausted,
            format!("no free address in {pool}"),
        ),
        StoreError::Ipam(ref inner @ (IpamError::OutOfPool { .. } | IpamError::Reserved(_))) => {
            CniError::new(
                ErrorCode::AddressUnavailable,
                "requested address is unavailable",
            )
            .with_details(inner)
        }
        StoreError::Taken { .. } => CniError::new(
            ErrorCode::AddressUnavailable,
            "requested address is unavailable",
        )
        .with_details(e),
        other => CniError::new(ErrorCode::IoFailure, "address store failed").with_details(other),
    }
}

/// `CNI_NETNS`; one that cannot be opened is the runtime's environment being wrong.
fn open_pod_netns(env: &CniEnv) -> Result<std::fs::File, CniError> {
    open_netns(Path::new(&env.netns)).map_err(|e| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_NETNS {} cannot be opened", env.netns),
        )
        .with_details(e)
    })
}

fn owner_of(env: &CniEnv) -> Owner {
    Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

/// What an ADD has changed so far, undone in reverse on failure.
#[derive(Default)]
struct Undo {
    /// Released unless the container already held it before this ADD.
    allocated_ip: Option<Ipv4Addr>,
    /// Deleting the veth also removes its peer, routes and TC filters.
    host_veth: Option<u32>,
    map_entry: Option<Ipv4Addr>,
    /// `HOST_PORTS` keys this ADD claimed (not those a repeated ADD found its own).
    host_ports: Vec<ServiceKey>,
}

impl Undo {
    async fn run(self, store: &IpStore, owner: &Owner, root: &Path, host: Option<&Netlink>) {
        // Best effort: the original error is what the runtime needs to see.
        if !self.host_ports.is_empty() {
            if let Ok(mut table) = HostPortTable::open(root) {
                for key in &self.host_ports {
                    let _ = table.remove(key);
                }
            }
        }
        if let Some(ip) = self.map_entry {
            if let Ok(mut maps) = Maps::open(root) {
                let _ = maps.remove_endpoint(ip);
            }
            if let Ok(mut policy) = EndpointPolicyMaps::open(root) {
                let _ = policy.clear(ip);
            }
        }
        if let (Some(index), Some(host)) = (self.host_veth, host) {
            let _ = host.delete_link(index).await;
        }
        if self.allocated_ip.is_some() {
            if let Ok(lock) = store.lock() {
                let _ = lock.release(owner);
            }
        }
    }
}

async fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let pool = conf.pod_cidr.as_ref().ok_or_else(|| {
        CniError::new(ErrorCode::InvalidConfig, "\"podCIDR\" is required for ADD")
    })?;
    datapath::check_loaded(&conf.bpffs_root).map_err(datapath_error)?;
    let netns = open_pod_netns(env)?;
    let static_ip = match env.requested_ip()? {
        Some(ip) => Some(ip),
        None => conf.runtime_ips.first().copied(),
    };
    let store = IpStore::open(&conf.data_dir, &conf.name).map_err(store_error)?;
    let owner = owner_of(env);
    let mut undo = Undo::default();
    let ip = {
        let lock = store.lock().map_err(store_error)?;
        let held_before = lock.find(&owner).map_err(store_error)?;
        let ip = match static_ip {
            Some(ip) => lock.reserve(pool, ip, &owner).map(|()| ip),
            None => lock.allocate(pool, &owner),
        }
        .map_err(store_error)?;
        if held_before.is_none() {
            undo.allocated_ip = Some(ip);
        }
        ip
    };
    let host = Netlink::current().map_err(netlink_error)?;
    match setup_pod_network(env, conf, &netns, &host, ip, &mut undo).await {
        Ok(result) => Ok(merge_prev_result(conf, result)),
        Err(e) => {
            undo.run(&store, &owner, &conf.bpffs_root, Some(&host))
                .await;
            Err(e)
        }
    }
}

async fn setup_pod_network(
    env: &CniEnv,
    conf: &NetConf,
    netns: &std::fs::File,
    host: &Netlink,
    ip: Ipv4Addr,
    undo: &mut Undo,
) -> Result<CniResult, CniError> {
    let pod = Netlink::in_netns(netns).map_err(netlink_error)?;
    let host_name = host_veth_name(&env.container_id, &env.ifname);
    if let Some(existing) = pod.link_by_name(&env.ifname).await.map_err(netlink_error)? {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "{} already exists in the container (index {})",
                env.ifname, existing.index
            ),
        ));
    }
    host.create_veth(&host_name, &env.ifname, netns, conf.mtu)
        .await
        .map_err(netlink_error)?;
    let host_link = host
        .link_by_name(&host_name)
        .await
        .map_err(netlink_error)?
        .ok_or_else(|| CniError::new(ErrorCode::NetlinkFailure, format!("{host_name} vanished")))?;
    undo.host_veth = Some(host_link.index);
    crate::netlink::isolate_ipv6(&host_name).map_err(netlink_error)?;
    let pod_link = pod
        .link_by_name(&env.ifname)
        .await
        .map_err(netlink_error)?
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::NetlinkFailure,
                format!("{} vanished", env.ifname),
            )
        })?;

    pod.add_address(pod_link.index, ip, 32)
        .await
        .map_err(netlink_error)?;
    pod.set_up(pod_link.index).await.map_err(netlink_error)?;
    if let Some(lo) = pod.link_by_name("lo").await.map_err(netlink_error)? {
        pod.set_up(lo.index).await.map_err(netlink_error)?;
    }
    let gateway = Ipv4Addr::from(GATEWAY_IP);
    pod.add_default_route_onlink(gateway, pod_link.index)
        .await
        .map_err(netlink_error)?;
    // The endpoint and from_pod are in place before the link comes up: the pod's very first
    // packet is checked against its own address.
    let mut maps = Maps::open(&conf.bpffs_root).map_err(datapath_error)?;
    let endpoint = Endpoint {
        ifindex: host_link.index,
        pod_mac: pod_link.mac,
        host_mac: host_link.mac,
        container_id_hash: fnv1a64(env.container_id.as_bytes()),
    };
    undo.map_entry = Some(ip);
    // Policy state first, like the endpoint: nothing an earlier holder of the address left
    // applies to this pod, and in a namespace with policies the pod starts fail-closed
    // until the agent has resolved it (see `policy_endpoint`).
    let mut policy = EndpointPolicyMaps::open(&conf.bpffs_root).map_err(policy_error)?;
    policy.clear(ip).map_err(policy_error)?;
    if let Some(namespace) = env.args.get(K8S_POD_NAMESPACE) {
        if namespace_has_policies(&conf.data_dir, namespace).map_err(policy_error)? {
            let mut node_addresses = Vec::new();
            for link in host.links().await.map_err(netlink_error)? {
                for (address, _) in host.addresses(link.index).await.map_err(netlink_error)? {
                    if !address.is_loopback() {
                        node_addresses.push(address);
                    }
                }
            }
            policy
                .mark_unresolved(ip, &node_addresses)
                .map_err(policy_error)?;
        }
    }
    maps.write_endpoint(ip, &endpoint).map_err(datapath_error)?;
    datapath::attach_to_host_veth(&conf.bpffs_root, &host_name).map_err(datapath_error)?;
    host.set_up(host_link.index).await.map_err(netlink_error)?;
    host.add_link_route(ip, 32, host_link.index)
        .await
        .map_err(netlink_error)?;
    // Last: a hostPort leads to the pod only once the pod is reachable.
    if !conf.port_mappings.is_empty() {
        claim_host_ports(env, conf, ip, undo)?;
    }

    Ok(CniResult {
        interfaces: vec![
            Interface {
                name: host_name,
                mac: format_mac(&host_link.mac),
                mtu: Some(conf.mtu),
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: format_mac(&pod_link.mac),
                mtu: Some(conf.mtu),
                sandbox: Some(env.netns.clone()),
            },
        ],
        ips: vec![IpConfig {
            address: Ipv4Network::from(ip),
            gateway: Some(gateway),
            interface: Some(1),
        }],
        routes: vec![RouteEntry {
            dst: DEFAULT_ROUTE,
            gw: Some(gateway),
        }],
        dns: Value::Null,
    })
}

/// Writes the container's hostPorts into `HOST_PORTS`, or fails with code
/// `HostPortConflict` naming every (hostIP, port, protocol) another pod holds, having
/// written nothing of its own that stays (`undo` removes what it claimed).
fn claim_host_ports(
    env: &CniEnv,
    conf: &NetConf,
    ip: Ipv4Addr,
    undo: &mut Undo,
) -> Result<(), CniError> {
    let attachment = attachment_hash(&env.container_id, &env.ifname);
    let planned = plan_host_ports(&conf.port_mappings, ip, attachment)
        .map_err(|e| CniError::new(ErrorCode::InvalidConfig, e.to_string()))?;
    let mut table = HostPortTable::open(&conf.bpffs_root).map_err(host_port_error)?;
    let taken = |found: Vec<(ServiceKey, mycni_common::service::HostPortEntry)>| {
        let held: Vec<String> = found
            .iter()
            .map(|(key, holder)| {
                format!(
                    "{} (held for {}:{})",
                    describe(key),
                    Ipv4Addr::from(holder.backend.address),
                    holder.backend.port
                )
            })
            .collect();
        CniError::new(
            ErrorCode::HostPortConflict,
            "a hostPort is already held by another pod on this node",
        )
        .with_details(held.join(", "))
    };
    // Every conflict at once, before writing anything.
    let found = conflicts(&planned, &table.entries().map_err(host_port_error)?);
    if !found.is_empty() {
        return Err(taken(found));
    }
    for (key, entry) in &planned {
        // The kernel settles a race with another ADD for the same key: one of them gets it.
        match table.claim(key, entry).map_err(host_port_error)? {
            Claim::New => undo.host_ports.push(*key),
            Claim::Renewed => {}
            Claim::Taken(holder) => return Err(taken(vec![(*key, holder)])),
        }
    }
    // A wildcard and an address on the same port are two keys, which the kernel does not
    // settle: each ADD looks again once its keys are written, so of two racing ADDs with
    // overlapping keys at least the later one sees the other and fails (both may; kubelet
    // retries). Never both win.
    let found = conflicts(&planned, &table.entries().map_err(host_port_error)?);
    if !found.is_empty() {
        return Err(taken(found));
    }
    Ok(())
}

/// When mycni runs after another plugin, its result carries the earlier one's entries.
fn merge_prev_result(conf: &NetConf, ours: CniResult) -> Value {
    let Some(prev) = conf
        .prev_result
        .as_ref()
        .and_then(|v| CniResult::from_json(v).ok())
    else {
        return ours.to_json(conf.cni_version);
    };
    let offset = prev.interfaces.len();
    let mut merged = prev;
    merged.interfaces.extend(ours.interfaces);
    merged.ips.extend(ours.ips.into_iter().map(|mut ip| {
        ip.interface = ip.interface.map(|i| i + offset);
        ip
    }));
    merged.routes.extend(ours.routes);
    merged.to_json(conf.cni_version)
}

/// Everything policy keyed by the pod's address: a later pod with it inherits nothing.
fn clear_policy(root: &Path, ip: Ipv4Addr) -> Result<(), CniError> {
    EndpointPolicyMaps::open(root)
        .and_then(|mut policy| policy.clear(ip))
        .map_err(policy_error)
}

/// Frees everything an attachment holds. Each step tolerates its object being gone, so DEL
/// succeeds with a vanished netns, an empty `CNI_NETNS`, and when called twice.
pub async fn release_attachment(
    store: &IpStore,
    owner: &Owner,
    root: &Path,
    host: &Netlink,
) -> Result<(), CniError> {
    let ip = store
        .lock()
        .and_then(|lock| lock.find(owner))
        .map_err(store_error)?;
    let host_name = host_veth_name(&owner.container_id, &owner.ifname);
    let host_link = host.link_by_name(&host_name).await.map_err(netlink_error)?;
    match Maps::open(root) {
        Ok(mut maps) => {
            match ip {
                Some(ip) => {
                    maps.remove_endpoint(ip).map_err(datapath_error)?;
                    clear_policy(root, ip)?;
                }
                // The allocation record is lost (a crash mid-ADD or mid-DEL): entries
                // still naming the container are found by its hash.
                None => {
                    let hash = fnv1a64(owner.container_id.as_bytes());
                    for (stale_ip, endpoint) in maps.endpoints().map_err(datapath_error)? {
                        if endpoint.container_id_hash == hash {
                            maps.remove_endpoint(stale_ip).map_err(datapath_error)?;
                            clear_policy(root, stale_ip)?;
                        }
                    }
                }
            }
        }
        // No datapath, no map entries to remove.
        Err(DatapathError::NotLoaded { .. }) => {}
        Err(e) => return Err(datapath_error(e)),
    }
    // Found by the attachment's tag: neither the pod nor its address record is needed.
    match HostPortTable::open(root) {
        Ok(mut table) => {
            table
                .release(attachment_hash(&owner.container_id, &owner.ifname))
                .map_err(host_port_error)?;
        }
        Err(HostPortTableError::Datapath(DatapathError::NotLoaded { .. })) => {}
        Err(e) => return Err(host_port_error(e)),
    }
    if let Some(link) = host_link {
        host.delete_link(link.index).await.map_err(netlink_error)?;
    }
    if let Some(ip) = ip {
        // The veth's deletion took its /32 with it; this covers a route left by a crash.
        host.delete_route(ip, 32).await.map_err(netlink_error)?;
    }
    store
        .lock()
        .and_then(|lock| lock.release(owner))
        .map_err(store_error)?;
    Ok(())
}

async fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let store = IpStore::open(&conf.data_dir, &conf.name).map_err(store_error)?;
    let host = Netlink::current().map_err(netlink_error)?;
    release_attachment(&store, &owner_of(env), &conf.bpffs_root, &host).await
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    datapath::check_loaded(&conf.bpffs_root).map_err(|e| {
        CniError::new(
            ErrorCode::PluginNotAvailable,
            "the mycni datapath is not loaded",
        )
        .with_details(e)
    })
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: Vec<Attachment> = conf.valid_attachments.clone().unwrap_or_default();
    let store = IpStore::open(&conf.data_dir, &conf.name).map_err(store_error)?;
    let host = Netlink::current().map_err(netlink_error)?;
    let allocations = store
        .lock()
        .and_then(|lock| lock.list())
        .map_err(store_error)?;
    for (_, owner) in &allocations {
        let in_use = valid
            .iter()
            .any(|a| a.container_id == owner.container_id && a.ifname == owner.ifname);
        if !in_use {
            release_attachment(&store, owner, &conf.bpffs_root, &host).await?;
        }
    }
    Ok(())
}

async fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidConfig, "CHECK needs prevResult"))?;
    let prev = CniResult::from_json(prev)?;
    let netns = open_pod_netns(env)?;
    let host = Netlink::current().map_err(netlink_error)?;
    let pod = Netlink::in_netns(&netns).map_err(netlink_error)?;
    let maps = Maps::open(&conf.bpffs_root).map_err(datapath_error)?;
    let store = IpStore::open(&conf.data_dir, &conf.name).map_err(store_error)?;
    let mut differences = Vec::new();

    let host_name = host_veth_name(&env.container_id, &env.ifname);
    let expected_pod = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some());
    let Some(pod_index) = expected_pod else {
        return Err(mismatch(vec![format!(
            "prevResult has no interface {} in a sandbox",
            env.ifname
        )]));
    };
    let expected_ip = prev
        .ips
        .iter()
        .find(|ip| ip.interface == Some(pod_index))
        .map(|ip| ip.address.ip());

    let host_link = host.link_by_name(&host_name).await.map_err(netlink_error)?;
    match &host_link {
        None => differences.push(format!("host veth {host_name} is missing")),
        Some(link) if !link.up => differences.push(format!("host veth {host_name} is down")),
        Some(_) => {}
    }
    let pod_link = pod.link_by_name(&env.ifname).await.map_err(netlink_error)?;
    match &pod_link {
        None => differences.push(format!("{} is missing in the container", env.ifname)),
        Some(link) => {
            let mac = format_mac(&link.mac);
            if !prev.interfaces[pod_index].mac.is_empty() && prev.interfaces[pod_index].mac != mac {
                differences.push(format!(
                    "{} has MAC {mac}, prevResult says {}",
                    env.ifname, prev.interfaces[pod_index].mac
                ));
            }
            if link.mtu != conf.mtu {
                differences.push(format!(
                    "{} has MTU {}, config says {}",
                    env.ifname, link.mtu, conf.mtu
                ));
            }
            let addresses = pod.addresses(link.index).await.map_err(netlink_error)?;
            if let Some(ip) = expected_ip {
                if !addresses.contains(&(ip, 32)) {
                    differences.push(format!("{} lacks {ip}/32 (has {addresses:?})", env.ifname));
                }
            }
            let routes = pod.routes().await.map_err(netlink_error)?;
            let gateway = Ipv4Addr::from(GATEWAY_IP);
            for expected in &prev.routes {
                let present = routes.iter().any(|r| {
                    r.dst == expected.dst.ip()
                        && r.prefix_len == expected.dst.prefix()
                        && (expected.gw.is_none() || r.gateway == expected.gw)
                });
                if !present {
                    differences.push(format!(
                        "route {} via {:?} is missing in the container",
                        expected.dst, expected.gw
                    ));
                }
            }
            if !routes
                .iter()
                .any(|r| r.prefix_len == 0 && r.gateway == Some(gateway))
            {
                differences.push(format!("the container has no default route via {gateway}"));
            }
        }
    }
    match expected_ip {
        None => differences.push("prevResult has no address for the container interface".into()),
        Some(ip) => {
            let owner = owner_of(env);
            let held = store
                .lock()
                .and_then(|lock| lock.find(&owner))
                .map_err(store_error)?;
            if held != Some(ip) {
                differences.push(format!(
                    "address store holds {held:?} for the container, not {ip}"
                ));
            }
            if let Some(link) = &host_link {
                let host_routes = host.routes().await.map_err(netlink_error)?;
                if !host_routes
                    .iter()
                    .any(|r| r.dst == ip && r.prefix_len == 32 && r.oif == Some(link.index))
                {
                    differences.push(format!("node route {ip}/32 dev {host_name} is missing"));
                }
                match maps.endpoint(ip).map_err(datapath_error)? {
                    None => differences.push(format!("ENDPOINTS has no entry for {ip}")),
                    Some(endpoint) => {
                        if endpoint.ifindex != link.index
                            || Some(endpoint.pod_mac) != pod_link.as_ref().map(|l| l.mac)
                        {
                            differences
                                .push(format!("ENDPOINTS entry for {ip} is stale: {endpoint:?}"));
                        }
                    }
                }
                match maps.local_route(ip).map_err(datapath_error)? {
                    None => differences.push(format!("ROUTES has no local entry for {ip}/32")),
                    Some(route) if route.ifindex != link.index => differences.push(format!(
                        "ROUTES entry for {ip}/32 points at ifindex {}",
                        route.ifindex
                    )),
                    Some(_) => {}
                }
                if !conf.port_mappings.is_empty() {
                    let planned = plan_host_ports(
                        &conf.port_mappings,
                        ip,
                        attachment_hash(&env.container_id, &env.ifname),
                    )
                    .map_err(|e| CniError::new(ErrorCode::InvalidConfig, e.to_string()))?;
                    let table = HostPortTable::open(&conf.bpffs_root).map_err(host_port_error)?;
                    differences.extend(crate::host_ports::plan::differences(
                        &planned,
                        &table.entries().map_err(host_port_error)?,
                    ));
                }
                let programs = host
                    .ingress_bpf_programs(link.index)
                    .await
                    .map_err(netlink_error)?;
                if !programs.iter().any(|(name, _)| name == PROG_FROM_POD) {
                    differences.push(format!(
                        "{PROG_FROM_POD} is not attached to {host_name} (found {programs:?})"
                    ));
                }
            }
        }
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(mismatch(differences))
    }
}

fn mismatch(differences: Vec<String>) -> CniError {
    CniError::new(
        ErrorCode::CheckMismatch,
        "the container's network differs from prevResult",
    )
    .with_details(differences.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("lxc"));
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        assert_ne!(a, host_veth_name("0123456789abcdeg", "eth0"));
    }
}
