//! A pod's policy state over its life on this node, as the CNI plugin sees it (issue 14's
//! gaps between the plugin and the agent):
//! - at ADD, before the pod's link comes up, a pod whose namespace has NetworkPolicies gets
//!   the fail-closed marker ([`unresolved_endpoint`]): until the agent has resolved the
//!   pod, nothing passes either way but the node's probes, so a new pod is never briefly
//!   open;
//! - at DEL (and at ADD, for leftovers of a DEL that never ran), everything keyed by the
//!   pod's IP goes: its `POLICY_ENDPOINTS` entry, its `POLICY` rows, its connections in
//!   `POLICY_CT` and its drop counters, so a pod that reuses the IP inherits nothing.
//!
//! The namespaces with policies reach the plugin as a file the agent writes in the data
//! dir both share ([`POLICY_NAMESPACES_FILE`], one name a line). Rendering and parsing it
//! are pure; reading, writing and the map edits are thin adapters.
use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuHashMap};
use mycni_common::policy::{
    identity, PolicyCtEntry, PolicyDrops, PolicyEndpoint, PolicyEntry, PolicyKey, PolicyState,
    ENFORCE_EGRESS, ENFORCE_INGRESS, POLICY_INGRESS,
};
use mycni_common::{
    FlowKey, MAP_POLICY, MAP_POLICY_CT, MAP_POLICY_DROPS, MAP_POLICY_ENDPOINTS,
    MAP_POLICY_IDENTITIES, MAP_POLICY_STATE,
};

use crate::datapath::{self, ignore_missing, DatapathError};

/// In the data dir: the namespaces that hold at least one NetworkPolicy.
pub const POLICY_NAMESPACES_FILE: &str = "policy-namespaces";

#[derive(Debug, thiserror::Error)]
pub enum PolicyEndpointError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> PolicyEndpointError {
    move |source| PolicyEndpointError::Map { name, source }
}

/// The marker the plugin writes for a pod it cannot tell is unselected: both directions
/// enforced, with no rule.
pub fn unresolved_endpoint() -> PolicyEndpoint {
    PolicyEndpoint {
        identity: identity::UNRESOLVED,
        enforce: ENFORCE_INGRESS | ENFORCE_EGRESS,
        pad: [0; 3],
    }
}

/// The one row the marker comes with: the node's probes in, as the agent allows them for
/// every pod it enforces ingress on (`rules` 0: no policy rule names it), so a new pod's
/// readiness is not held back by the window. Left behind when the agent finds the pod
/// selected by nothing, it is inert (the pod enforces nothing) and DEL clears it.
pub fn unresolved_probe_row(ip: Ipv4Addr) -> PolicyKey {
    PolicyKey {
        endpoint: ip.octets(),
        peer_identity: identity::HOST,
        port: 0,
        protocol: 0,
        direction: POLICY_INGRESS,
    }
}

/// The file's text for `namespaces`, sorted, one a line.
pub fn render_policy_namespaces<'a>(namespaces: impl IntoIterator<Item = &'a str>) -> String {
    let sorted: BTreeSet<&str> = namespaces.into_iter().collect();
    sorted.into_iter().map(|ns| format!("{ns}\n")).collect()
}

/// Whether the file's `text` lists `namespace`.
pub fn lists_namespace(text: &str, namespace: &str) -> bool {
    text.lines().any(|line| line.trim() == namespace)
}

pub fn policy_namespaces_path(data_dir: &Path) -> PathBuf {
    data_dir.join(POLICY_NAMESPACES_FILE)
}

/// Whether the agent last said `namespace` has policies. No file (no agent has computed
/// policy on this node yet) is no.
pub fn namespace_has_policies(
    data_dir: &Path,
    namespace: &str,
) -> Result<bool, PolicyEndpointError> {
    let path = policy_namespaces_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(lists_namespace(&text, namespace)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(PolicyEndpointError::File { path, source }),
    }
}

/// Replaces the file with `text` atomically (a plugin never reads half of it).
pub fn write_policy_namespaces(data_dir: &Path, text: &str) -> Result<(), PolicyEndpointError> {
    let path = policy_namespaces_path(data_dir);
    let temporary = data_dir.join(format!(".{POLICY_NAMESPACES_FILE}.tmp"));
    let file_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyEndpointError::File { path, source }
    };
    std::fs::create_dir_all(data_dir).map_err(file_error(data_dir))?;
    let mut file = std::fs::File::create(&temporary).map_err(file_error(&temporary))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(file_error(&temporary))?;
    std::fs::rename(&temporary, &path).map_err(file_error(&path))
}

/// The policy maps keyed by a local pod, opened without reading them whole.
pub struct EndpointPolicyMaps {
    endpoints: HashMap<MapData, [u8; 4], PolicyEndpoint>,
    rules: HashMap<MapData, PolicyKey, PolicyEntry>,
    ct: HashMap<MapData, FlowKey, PolicyCtEntry>,
    drops: PerCpuHashMap<MapData, [u8; 4], PolicyDrops>,
    state: Array<MapData, PolicyState>,
    identities: LpmTrie<MapData, [u8; 4], u32>,
}

impl EndpointPolicyMaps {
    pub fn open(root: &Path) -> Result<EndpointPolicyMaps, PolicyEndpointError> {
        let open = |name| datapath::open_pinned(root, name);
        Ok(EndpointPolicyMaps {
            endpoints: HashMap::try_from(Map::HashMap(open(MAP_POLICY_ENDPOINTS)?))
                .map_err(map_error(MAP_POLICY_ENDPOINTS))?,
            rules: HashMap::try_from(Map::HashMap(open(MAP_POLICY)?))
                .map_err(map_error(MAP_POLICY))?,
            ct: HashMap::try_from(Map::LruHashMap(open(MAP_POLICY_CT)?))
                .map_err(map_error(MAP_POLICY_CT))?,
            drops: PerCpuHashMap::try_from(Map::PerCpuHashMap(open(MAP_POLICY_DROPS)?))
                .map_err(map_error(MAP_POLICY_DROPS))?,
            state: Array::try_from(Map::Array(open(MAP_POLICY_STATE)?))
                .map_err(map_error(MAP_POLICY_STATE))?,
            identities: LpmTrie::try_from(Map::LpmTrie(open(MAP_POLICY_IDENTITIES)?))
                .map_err(map_error(MAP_POLICY_IDENTITIES))?,
        })
    }

    /// Removes everything keyed by `ip`: the endpoint entry first (the pod stops being
    /// enforced as the old pod before its rows go), then its rows, its tracked connections
    /// (either end) and its drop counters.
    pub fn clear(&mut self, ip: Ipv4Addr) -> Result<(), PolicyEndpointError> {
        let octets = ip.octets();
        ignore_missing(self.endpoints.remove(&octets)).map_err(map_error(MAP_POLICY_ENDPOINTS))?;
        // Keys are collected first: deleting while walking a hash restarts the walk.
        let rows = self
            .rules
            .keys()
            .filter(|key| key.as_ref().map_or(true, |key| key.endpoint == octets))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error(MAP_POLICY))?;
        for key in rows {
            ignore_missing(self.rules.remove(&key)).map_err(map_error(MAP_POLICY))?;
        }
        let flows = self
            .ct
            .keys()
            .filter(|key| {
                key.as_ref()
                    .map_or(true, |key| key.saddr == octets || key.daddr == octets)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error(MAP_POLICY_CT))?;
        for key in flows {
            ignore_missing(self.ct.remove(&key)).map_err(map_error(MAP_POLICY_CT))?;
        }
        ignore_missing(self.drops.remove(&octets)).map_err(map_error(MAP_POLICY_DROPS))
    }

    /// Marks `ip` fail-closed until the agent resolves it, and makes sure the programs
    /// look at policy at all (no pod of this node may have been selected yet; the agent's
    /// next write keeps `active` so while a marker stays) and know `node_addresses` as
    /// `HOST` (the agent writes no identity while no pod here is selected): the probes'
    /// row needs them, and a pod's packets to the node are decided only for `HOST`
    /// addresses. They are what the agent writes for them too.
    pub fn mark_unresolved(
        &mut self,
        ip: Ipv4Addr,
        node_addresses: &[Ipv4Addr],
    ) -> Result<(), PolicyEndpointError> {
        for address in node_addresses {
            self.identities
                .insert(&Key::new(32, address.octets()), identity::HOST, 0)
                .map_err(map_error(MAP_POLICY_IDENTITIES))?;
        }
        self.rules
            .insert(unresolved_probe_row(ip), PolicyEntry { rules: 0 }, 0)
            .map_err(map_error(MAP_POLICY))?;
        self.endpoints
            .insert(ip.octets(), unresolved_endpoint(), 0)
            .map_err(map_error(MAP_POLICY_ENDPOINTS))?;
        let mut state = self.state.get(&0, 0).map_err(map_error(MAP_POLICY_STATE))?;
        if state.active == 0 {
            state.active = 1;
            self.state
                .set(0, state, 0)
                .map_err(map_error(MAP_POLICY_STATE))?;
        }
        Ok(())
    }

    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<PolicyEndpoint>, PolicyEndpointError> {
        match self.endpoints.get(&ip.octets(), 0) {
            Ok(endpoint) => Ok(Some(endpoint)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(MAP_POLICY_ENDPOINTS)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespaces_file_lists_each_namespace_once_and_matches_whole_names() {
        let text = render_policy_namespaces(["shop", "default", "shop"]);
        assert_eq!(text, "default\nshop\n");
        assert!(lists_namespace(&text, "shop"));
        assert!(lists_namespace(&text, "default"));
        assert!(!lists_namespace(&text, "sho"));
        assert!(!lists_namespace(&text, "kube-system"));
        assert!(!lists_namespace("", "default"));
    }

    #[test]
    fn the_marker_denies_both_directions_under_the_reserved_identity() {
        let marker = unresolved_endpoint();
        assert_eq!(marker.identity, identity::UNRESOLVED);
        assert_eq!(marker.enforce, ENFORCE_INGRESS | ENFORCE_EGRESS);
    }

    #[test]
    fn a_missing_file_means_no_policies_and_a_written_one_is_read_back() {
        let dir = std::env::temp_dir().join(format!("mycni-policy-ns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!namespace_has_policies(&dir, "default").expect("no file is no"));
        write_policy_namespaces(&dir, &render_policy_namespaces(["default"])).expect("written");
        assert!(namespace_has_policies(&dir, "default").expect("read"));
        assert!(!namespace_has_policies(&dir, "other").expect("read"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
