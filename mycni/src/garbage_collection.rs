//! Garbage collection: the addresses and map entries a crashed ADD or a lost DEL leaves.
//! Which allocations are stale is a pure decision ([`stale_allocations`]); the `async`
//! function around it reads the store, the links and the maps, and frees.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use crate::datapath::{DatapathError, Maps};
use crate::host_ports::plan::{describe, orphaned};
use crate::host_ports::{HostPortTable, HostPortTableError};
use crate::ipam::store::{IpStore, Owner, StoreError};
use crate::netlink::{Netlink, NetlinkError};
use crate::plugin::{host_veth_name, release_attachment};
use crate::policy_endpoint::{EndpointPolicyMaps, PolicyEndpointError};

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("address store: {0}")]
    Store(#[source] StoreError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Policy(#[from] PolicyEndpointError),
    #[error("cannot release a stale allocation: {0}")]
    Release(#[source] crate::cni::CniError),
    #[error(transparent)]
    HostPorts(#[from] HostPortTableError),
}

/// An allocation as garbage collection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub owner: Owner,
    pub age: Duration,
    pub host_veth_exists: bool,
}

/// Allocations whose pod is gone: no host veth, and older than `grace` (an ADD in flight
/// holds its address a moment before its veth exists).
pub fn stale_allocations(allocations: &[Allocation], grace: Duration) -> Vec<&Allocation> {
    allocations
        .iter()
        .filter(|a| !a.host_veth_exists && a.age >= grace)
        .collect()
}

/// Frees every stale allocation of the network's store (address, map entries, a leftover
/// route), endpoint map entries that no allocation backs and whose veth is gone, and
/// hostPort entries whose pod has no endpoint left. Returns how many things it freed.
pub async fn collect_garbage(
    data_dir: &Path,
    network: &str,
    root: &Path,
    grace: Duration,
) -> Result<usize, GcError> {
    let store = IpStore::open(data_dir, network).map_err(GcError::Store)?;
    let netlink = Netlink::current()?;
    let records = store
        .lock()
        .and_then(|lock| {
            let list = lock.list()?;
            Ok(list
                .into_iter()
                .map(|(ip, owner)| {
                    let age = lock.age_of(ip).unwrap_or_default();
                    (ip, owner, age)
                })
                .collect::<Vec<_>>())
        })
        .map_err(GcError::Store)?;
    let mut allocations = Vec::new();
    for (ip, owner, age) in records {
        let veth = host_veth_name(&owner.container_id, &owner.ifname);
        let host_veth_exists = netlink.link_by_name(&veth).await?.is_some();
        allocations.push(Allocation {
            ip,
            owner,
            age,
            host_veth_exists,
        });
    }
    let mut freed = 0;
    for stale in stale_allocations(&allocations, grace) {
        log::info!(
            "freeing {} of container {} ({}): its pod is gone",
            stale.ip,
            stale.owner.container_id,
            stale.owner.ifname
        );
        release_attachment(&store, &stale.owner, root, &netlink)
            .await
            .map_err(GcError::Release)?;
        freed += 1;
    }
    let backed: BTreeSet<Ipv4Addr> = allocations.iter().map(|a| a.ip).collect();
    // Read before the endpoints (see `orphaned`).
    let mut host_ports = HostPortTable::open(root)?;
    let held = host_ports.entries()?;
    let mut maps = Maps::open(root)?;
    let links = netlink.links().await?;
    for (ip, endpoint) in maps.endpoints()? {
        if backed.contains(&ip) {
            continue;
        }
        let veth_alive = links
            .iter()
            .any(|link| link.index == endpoint.ifindex && link.name.starts_with("lxc"));
        if !veth_alive {
            log::info!("removing endpoint {ip}: no allocation and no veth");
            maps.remove_endpoint(ip)?;
            EndpointPolicyMaps::open(root)?.clear(ip)?;
            freed += 1;
        }
    }
    let endpoints: BTreeSet<Ipv4Addr> = maps.endpoints()?.into_iter().map(|(ip, _)| ip).collect();
    for key in orphaned(&held, &endpoints) {
        log::info!(
            "removing hostPort {}: its pod has no endpoint",
            describe(&key)
        );
        host_ports.remove(&key)?;
        freed += 1;
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocation(ip: u8, age_s: u64, veth: bool) -> Allocation {
        Allocation {
            ip: Ipv4Addr::new(10, 0, 0, ip),
            owner: Owner {
                container_id: format!("c{ip}"),
                ifname: "eth0".into(),
            },
            age: Duration::from_secs(age_s),
            host_veth_exists: veth,
        }
    }

    #[test]
    fn only_old_allocations_without_a_veth_are_stale() {
        let all = [
            allocation(2, 600, true),
            allocation(3, 600, false),
            allocation(4, 5, false),
        ];
        let stale = stale_allocations(&all, Duration::from_secs(60));
        assert_eq!(
            stale.iter().map(|a| a.ip.octets()[3]).collect::<Vec<_>>(),
            [3]
        );
    }
}
