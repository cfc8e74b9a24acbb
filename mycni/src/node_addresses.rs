//! This node's IPv4 addresses in `NODE_ADDRESSES`, where NodePorts and hostPorts without
//! hostIP answer (the datapath looks their wildcard keys up only for these destinations).
//!
//! [`wanted`] and [`changes`] are pure (what the map should hold, and the writes that get
//! it there); [`NodeAddressTable`] is the thin adapter over the pinned map; [`keep_in_step`]
//! is the agent's loop: an rtnetlink address watch (`RTMGRP_IPV4_IFADDR`) wakes it, and
//! each wakeup dumps every address and applies the difference, so a lost or coalesced
//! event costs nothing; a periodic dump covers a watch that stopped (`ENOBUFS`).
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData, MapError};
use futures_util::StreamExt;
use mycni_common::{MAP_NODE_ADDRESSES, NODE_ADDRESS_PRESENT};

use crate::datapath::{self, DatapathError};
use crate::netlink::{Netlink, NetlinkError};

/// How long an address event waits for the ones that follow it (`ip addr flush` sends one
/// per address), so a burst is one dump.
const COALESCE: Duration = Duration::from_millis(20);
/// A full dump even without events, in case the watch lost some.
const RESYNC: Duration = Duration::from_secs(10);
/// How soon a failed dump or write is tried again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NodeAddressError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("map {MAP_NODE_ADDRESSES}: {0}")]
    Map(#[source] MapError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// What `NODE_ADDRESSES` should hold for the addresses the namespace lists: each of them
/// but 0.0.0.0 (the wildcard keys' address), and 127.0.0.1 even while `lo` lacks it
/// (kube-proxy and portmap answer there).
pub fn wanted(listed: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    listed
        .iter()
        .copied()
        .filter(|address| !address.is_unspecified())
        .chain([Ipv4Addr::LOCALHOST])
        .collect()
}

/// The writes from `present` to `wanted`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressChanges {
    pub add: Vec<Ipv4Addr>,
    pub remove: Vec<Ipv4Addr>,
}

impl AddressChanges {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

pub fn changes(wanted: &BTreeSet<Ipv4Addr>, present: &BTreeSet<Ipv4Addr>) -> AddressChanges {
    AddressChanges {
        add: wanted.difference(present).copied().collect(),
        remove: present.difference(wanted).copied().collect(),
    }
}

/// `NODE_ADDRESSES`, opened from its pin.
pub struct NodeAddressTable {
    map: HashMap<MapData, [u8; 4], u32>,
}

impl NodeAddressTable {
    pub fn open(root: &Path) -> Result<NodeAddressTable, NodeAddressError> {
        let data = datapath::open_pinned(root, MAP_NODE_ADDRESSES)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(NodeAddressError::Map)?;
        Ok(NodeAddressTable { map })
    }

    pub fn present(&self) -> Result<BTreeSet<Ipv4Addr>, NodeAddressError> {
        self.map
            .keys()
            .map(|key| key.map(Ipv4Addr::from))
            .collect::<Result<_, _>>()
            .map_err(NodeAddressError::Map)
    }

    /// Makes the map hold `wanted`; returns what it changed.
    pub fn apply(
        &mut self,
        wanted: &BTreeSet<Ipv4Addr>,
    ) -> Result<AddressChanges, NodeAddressError> {
        let changes = changes(wanted, &self.present()?);
        for address in &changes.add {
            self.map
                .insert(address.octets(), NODE_ADDRESS_PRESENT, 0)
                .map_err(NodeAddressError::Map)?;
        }
        for address in &changes.remove {
            datapath::ignore_missing(self.map.remove(&address.octets()))
                .map_err(NodeAddressError::Map)?;
        }
        Ok(changes)
    }
}

/// One dump of the namespace's addresses written to the map.
async fn sync_once(root: &Path, host: &Netlink) -> Result<AddressChanges, NodeAddressError> {
    let listed = host.ipv4_addresses().await?;
    NodeAddressTable::open(root)?.apply(&wanted(&listed))
}

/// Keeps `NODE_ADDRESSES` under `root` equal to the addresses of the calling thread's
/// namespace until dropped. The first sync happens before it returns control to the
/// caller's next await, so NodePorts answer on every address from the agent's start.
pub async fn keep_in_step(root: PathBuf) {
    let (host, mut events) = loop {
        match watch() {
            Ok(opened) => break opened,
            Err(e) => {
                log::warn!("node addresses: cannot watch the addresses: {e}; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    loop {
        let failing = match sync_once(&root, &host).await {
            Ok(changes) => {
                if !changes.is_empty() {
                    log::info!(
                        "node addresses: added {:?}, removed {:?}",
                        changes.add,
                        changes.remove
                    );
                }
                false
            }
            Err(e) => {
                log::warn!("node addresses: {e}; retrying");
                true
            }
        };
        let wait = if failing { RETRY } else { RESYNC };
        tokio::select! {
            event = events.next() => {
                if event.is_none() {
                    // The watch ended: periodic dumps only from here.
                    log::warn!("node addresses: the address watch ended; dumping every {RESYNC:?}");
                    tokio::time::sleep(wait).await;
                    events = Box::pin(futures_util::stream::pending());
                } else {
                    tokio::time::sleep(COALESCE).await;
                    // The events queued meanwhile are covered by the dump that follows.
                    while let Some(Some(_)) = futures_util::FutureExt::now_or_never(events.next()) {}
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

type AddressEvents = std::pin::Pin<Box<dyn futures_util::Stream<Item = ()> + Send>>;

/// A netlink connection for dumps, and the stream of IPv4 address events.
fn watch() -> Result<(Netlink, AddressEvents), NodeAddressError> {
    let host = Netlink::current()?;
    let (connection, _, messages) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Ipv4Ifaddr])
            .map_err(|e| NodeAddressError::Netlink(NetlinkError::Socket(e)))?;
    tokio::spawn(connection);
    Ok((host, Box::pin(messages.map(|_| ()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter()
            .map(|a| a.parse().expect("an IPv4 address"))
            .collect()
    }

    #[test]
    fn every_listed_address_and_loopback_are_wanted_but_not_the_wildcard() {
        let listed: Vec<Ipv4Addr> = ["192.168.1.11", "0.0.0.0", "10.0.2.15", "192.168.1.11"]
            .iter()
            .map(|a| a.parse().expect("an IPv4 address"))
            .collect();
        assert_eq!(
            wanted(&listed),
            set(&["10.0.2.15", "127.0.0.1", "192.168.1.11"])
        );
        // lo's own 127.0.0.1 once.
        assert_eq!(wanted(&[Ipv4Addr::LOCALHOST]), set(&["127.0.0.1"]));
    }

    #[test]
    fn changes_add_what_is_new_and_remove_what_is_gone() {
        let present = set(&["127.0.0.1", "192.168.1.11", "192.168.1.111"]);
        let wanted = set(&["127.0.0.1", "192.168.1.11", "10.9.9.9"]);
        let found = changes(&wanted, &present);
        assert_eq!(found.add, vec![Ipv4Addr::new(10, 9, 9, 9)]);
        assert_eq!(found.remove, vec![Ipv4Addr::new(192, 168, 1, 111)]);
        assert!(changes(&wanted, &wanted).is_empty());
        assert_eq!(changes(&wanted, &BTreeSet::new()).add.len(), 3);
        assert_eq!(changes(&BTreeSet::new(), &present).remove.len(), 3);
    }
}
