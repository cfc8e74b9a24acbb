//! Thin adapter: `HOST_PORTS` opened from its pin. Claims are atomic in the kernel
//! (`BPF_NOEXIST`), so two ADDs racing for one hostPort cannot both win it.
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError};
use mycni_common::service::{HostPortEntry, ServiceKey};
use mycni_common::MAP_HOST_PORTS;

use super::plan::{owned_by, HostPortEntries};
use crate::datapath::{self, DatapathError};

/// `bpf_map_update_elem` flags.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum HostPortTableError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("map {MAP_HOST_PORTS}: {0}")]
    Map(#[source] MapError),
    /// Every entry of the map is taken (`E2BIG` from the kernel): no room for a new key
    /// until pods with hostPorts go.
    #[error(
        "map {MAP_HOST_PORTS} is full ({} entries)",
        mycni_common::MAX_HOST_PORTS
    )]
    Full,
}

/// What [`HostPortTable::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key was free and is now this attachment's.
    New,
    /// This attachment held it already (a repeated ADD); its entry was rewritten.
    Renewed,
    /// Another attachment holds it; nothing was written.
    Taken(HostPortEntry),
}

pub struct HostPortTable {
    map: HashMap<MapData, ServiceKey, HostPortEntry>,
}

impl HostPortTable {
    pub fn open(root: &Path) -> Result<HostPortTable, HostPortTableError> {
        let data = datapath::open_pinned(root, MAP_HOST_PORTS)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(HostPortTableError::Map)?;
        Ok(HostPortTable { map })
    }

    pub fn entries(&self) -> Result<HostPortEntries, HostPortTableError> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(HostPortTableError::Map)
    }

    /// Writes `entry` at `key` unless another attachment holds the key.
    pub fn claim(
        &mut self,
        key: &ServiceKey,
        entry: &HostPortEntry,
    ) -> Result<Claim, HostPortTableError> {
        match self.map.insert(key, entry, BPF_NOEXIST) {
            Ok(()) => return Ok(Claim::New),
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(insert_error(e)),
        }
        let holder = match self.map.get(key, 0) {
            Ok(holder) => holder,
            // Released between the two calls: try once more from the start.
            Err(MapError::KeyNotFound) => {
                return match self.map.insert(key, entry, BPF_NOEXIST) {
                    Ok(()) => Ok(Claim::New),
                    Err(e) => Err(insert_error(e)),
                }
            }
            Err(e) => return Err(HostPortTableError::Map(e)),
        };
        if holder.attachment_hash != entry.attachment_hash {
            return Ok(Claim::Taken(holder));
        }
        self.map
            .insert(key, entry, BPF_EXIST)
            .map_err(HostPortTableError::Map)?;
        Ok(Claim::Renewed)
    }

    /// Removes `key`; a key already gone is not an error.
    pub fn remove(&mut self, key: &ServiceKey) -> Result<(), HostPortTableError> {
        datapath::ignore_missing(self.map.remove(key)).map_err(HostPortTableError::Map)
    }

    /// Removes every entry of `attachment`; returns how many there were.
    pub fn release(&mut self, attachment: u64) -> Result<usize, HostPortTableError> {
        let keys = owned_by(&self.entries()?, attachment);
        for key in &keys {
            self.remove(key)?;
        }
        Ok(keys.len())
    }
}

/// A full hash map refuses a new key with `E2BIG`.
fn insert_error(e: MapError) -> HostPortTableError {
    if errno(&e) == Some(libc::E2BIG) {
        return HostPortTableError::Full;
    }
    HostPortTableError::Map(e)
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    }
}
