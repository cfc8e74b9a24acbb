//! The NetworkPolicy maps (`mycni_common::policy` is their contract): the desired contents
//! and their difference from what the maps hold are pure ([`PolicyDesired`], [`diff`],
//! unit-tested); [`PolicyTables`] is the thin adapter that writes a difference in a safe
//! order, then bumps the revision so tracked connections are checked again.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuHashMap};
use ipnetwork::Ipv4Network;
use mycni_common::policy::{
    identity, PolicyCtEntry, PolicyDrops, PolicyEndpoint, PolicyEntry, PolicyKey, PolicyState,
};
use mycni_common::{
    FlowKey, MAP_POLICY, MAP_POLICY_CT, MAP_POLICY_DROPS, MAP_POLICY_ENDPOINTS,
    MAP_POLICY_IDENTITIES, MAP_POLICY_STATE,
};

use crate::datapath::{self, DatapathError};

#[derive(Debug, thiserror::Error)]
pub enum PolicyMapsError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> PolicyMapsError {
    move |source| PolicyMapsError::Map { name, source }
}

/// What the policy maps should hold: the local pods policy selects, the identity of every
/// address prefix, and the allowed keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDesired {
    pub endpoints: BTreeMap<Ipv4Addr, PolicyEndpoint>,
    pub identities: BTreeMap<Ipv4Network, u32>,
    pub rules: BTreeMap<PolicyKey, PolicyEntry>,
}

impl PolicyDesired {
    /// Whether any endpoint enforces anything (`PolicyState::active`).
    pub fn active(&self) -> bool {
        self.endpoints.values().any(|ep| ep.enforce != 0)
    }
}

/// The writes that turn one [`PolicyDesired`] into another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    pub endpoints_set: Vec<(Ipv4Addr, PolicyEndpoint)>,
    pub endpoints_removed: Vec<Ipv4Addr>,
    pub identities_set: Vec<(Ipv4Network, u32)>,
    pub identities_removed: Vec<Ipv4Network>,
    pub rules_set: Vec<(PolicyKey, PolicyEntry)>,
    pub rules_removed: Vec<PolicyKey>,
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.endpoints_set.is_empty()
            && self.endpoints_removed.is_empty()
            && self.identities_set.is_empty()
            && self.identities_removed.is_empty()
            && self.rules_set.is_empty()
            && self.rules_removed.is_empty()
    }
}

/// Entries of `desired` that `current` lacks or holds with another value, and keys of
/// `current` that `desired` lacks.
fn diff_map<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let set = desired
        .iter()
        .filter(|(key, value)| current.get(key) != Some(value))
        .map(|(key, value)| (*key, *value))
        .collect();
    let removed = current
        .keys()
        .filter(|key| !desired.contains_key(key))
        .copied()
        .collect();
    (set, removed)
}

/// The writes from `current` to `desired`.
pub fn diff(current: &PolicyDesired, desired: &PolicyDesired) -> PolicyDiff {
    let (endpoints_set, endpoints_removed) = diff_map(&current.endpoints, &desired.endpoints);
    let (identities_set, identities_removed) = diff_map(&current.identities, &desired.identities);
    let (rules_set, rules_removed) = diff_map(&current.rules, &desired.rules);
    PolicyDiff {
        endpoints_set,
        endpoints_removed,
        identities_set,
        identities_removed,
        rules_set,
        rules_removed,
    }
}

/// Brings `current` (what the agent last wrote) in line with `actual`, the endpoints the
/// map holds: the plugin writes and clears entries behind the agent (its fail-closed
/// marker at ADD, its clearing at DEL, which takes the pod's rows too). For every address
/// whose entry is not what the agent wrote, the rows `desired` wants are forgotten so the
/// diff writes them again; the others stay known, so the diff still removes them.
pub fn reconcile_endpoints(
    current: &mut PolicyDesired,
    actual: &BTreeMap<Ipv4Addr, PolicyEndpoint>,
    desired: &PolicyDesired,
) {
    let changed: BTreeSet<Ipv4Addr> = current
        .endpoints
        .keys()
        .chain(actual.keys())
        .filter(|ip| current.endpoints.get(ip) != actual.get(ip))
        .copied()
        .collect();
    if changed.is_empty() {
        return;
    }
    current.rules.retain(|key, _| {
        !(changed.contains(&Ipv4Addr::from(key.endpoint)) && desired.rules.contains_key(key))
    });
    current.endpoints = actual.clone();
}

/// `desired` plus the plugin's fail-closed markers in `actual` for addresses the agent
/// does not know a local pod at yet (the watch has not brought its IP): those stay until
/// it does. A marker on an address the agent knows is replaced by what `desired` says.
pub fn keep_unresolved(
    desired: &PolicyDesired,
    actual: &BTreeMap<Ipv4Addr, PolicyEndpoint>,
    known_local_pods: &BTreeSet<Ipv4Addr>,
) -> PolicyDesired {
    let mut kept = desired.clone();
    for (ip, endpoint) in actual {
        if endpoint.identity == identity::UNRESOLVED
            && !known_local_pods.contains(ip)
            && !kept.endpoints.contains_key(ip)
        {
            kept.endpoints.insert(*ip, *endpoint);
        }
    }
    kept
}

/// The pinned policy maps, with what they hold (read once at open, then kept in step with
/// every write), so an apply costs the difference, not the whole table.
pub struct PolicyTables {
    endpoints: HashMap<MapData, [u8; 4], PolicyEndpoint>,
    identities: LpmTrie<MapData, [u8; 4], u32>,
    rules: HashMap<MapData, PolicyKey, PolicyEntry>,
    state: Array<MapData, PolicyState>,
    drops: PerCpuHashMap<MapData, [u8; 4], PolicyDrops>,
    ct: HashMap<MapData, FlowKey, PolicyCtEntry>,
    current: PolicyDesired,
}

impl PolicyTables {
    pub fn open(root: &Path) -> Result<PolicyTables, PolicyMapsError> {
        datapath::check_loaded(root)?;
        let open = |name| datapath::open_pinned(root, name);
        let endpoints = HashMap::try_from(Map::HashMap(open(MAP_POLICY_ENDPOINTS)?))
            .map_err(map_error(MAP_POLICY_ENDPOINTS))?;
        let identities = LpmTrie::try_from(Map::LpmTrie(open(MAP_POLICY_IDENTITIES)?))
            .map_err(map_error(MAP_POLICY_IDENTITIES))?;
        let rules =
            HashMap::try_from(Map::HashMap(open(MAP_POLICY)?)).map_err(map_error(MAP_POLICY))?;
        let state = Array::try_from(Map::Array(open(MAP_POLICY_STATE)?))
            .map_err(map_error(MAP_POLICY_STATE))?;
        let drops = PerCpuHashMap::try_from(Map::PerCpuHashMap(open(MAP_POLICY_DROPS)?))
            .map_err(map_error(MAP_POLICY_DROPS))?;
        let ct = HashMap::try_from(Map::LruHashMap(open(MAP_POLICY_CT)?))
            .map_err(map_error(MAP_POLICY_CT))?;
        let mut tables = PolicyTables {
            endpoints,
            identities,
            rules,
            state,
            drops,
            ct,
            current: PolicyDesired::default(),
        };
        tables.current = tables.read()?;
        Ok(tables)
    }

    /// What `POLICY_ENDPOINTS` holds now (one entry per local pod: cheap to read).
    fn read_endpoints(&self) -> Result<BTreeMap<Ipv4Addr, PolicyEndpoint>, PolicyMapsError> {
        self.endpoints
            .iter()
            .map(|entry| entry.map(|(ip, ep)| (Ipv4Addr::from(ip), ep)))
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_POLICY_ENDPOINTS))
    }

    /// What the maps hold now.
    fn read(&self) -> Result<PolicyDesired, PolicyMapsError> {
        let endpoints = self.read_endpoints()?;
        let mut identities = BTreeMap::new();
        for entry in self.identities.iter() {
            let (key, identity) = entry.map_err(map_error(MAP_POLICY_IDENTITIES))?;
            // The kernel only holds prefixes it accepted: at most 32 bits.
            if let Ok(net) = Ipv4Network::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8) {
                identities.insert(net, identity);
            }
        }
        let rules = self
            .rules
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_POLICY))?;
        Ok(PolicyDesired {
            endpoints,
            identities,
            rules,
        })
    }

    /// What the maps hold, as the last apply (or open) left them.
    pub fn current(&self) -> &PolicyDesired {
        &self.current
    }

    /// Makes the maps hold `desired`, every local pod's state included: a fail-closed
    /// marker the plugin wrote for a pod `desired` does not select is removed.
    pub fn apply(&mut self, desired: &PolicyDesired) -> Result<PolicyDiff, PolicyMapsError> {
        let actual = self.read_endpoints()?;
        reconcile_endpoints(&mut self.current, &actual, desired);
        self.write(desired)
    }

    /// As [`PolicyTables::apply`], for a caller that knows only `known_local_pods` (the
    /// agent, whose watch brings a pod's IP after its CNI ADD): the plugin's fail-closed
    /// markers on other addresses stay.
    pub fn apply_keeping_unresolved(
        &mut self,
        desired: &PolicyDesired,
        known_local_pods: &BTreeSet<Ipv4Addr>,
    ) -> Result<PolicyDiff, PolicyMapsError> {
        let actual = self.read_endpoints()?;
        let desired = keep_unresolved(desired, &actual, known_local_pods);
        reconcile_endpoints(&mut self.current, &actual, &desired);
        self.write(&desired)
    }

    /// Writes the difference: rules and identities first, then the endpoints (a pod starts
    /// enforcing only once its rules are there), removals last (a pod stops enforcing
    /// before its rules go); then, if anything changed, the revision is bumped so every
    /// tracked connection is checked against the new policy on its next packet.
    ///
    /// A failed write (a full map) does not stop the others: what could not be written is
    /// an allow missing, so every endpoint still enforces what `desired` says with the rows
    /// that fit, and nothing is allowed that `desired` does not allow. The first error is
    /// returned after the revision bump; the next apply writes the rest.
    fn write(&mut self, desired: &PolicyDesired) -> Result<PolicyDiff, PolicyMapsError> {
        let diff = diff(&self.current, desired);
        let mut first_error: Option<PolicyMapsError> = None;
        let mut note = |result: Result<(), MapError>, name: &'static str| match result {
            Ok(()) => true,
            Err(source) => {
                first_error.get_or_insert(PolicyMapsError::Map { name, source });
                false
            }
        };
        for (key, entry) in &diff.rules_set {
            if note(self.rules.insert(key, entry, 0), MAP_POLICY) {
                self.current.rules.insert(*key, *entry);
            }
        }
        for (net, identity) in &diff.identities_set {
            let written = self.identities.insert(&lpm_key(net), identity, 0);
            if note(written, MAP_POLICY_IDENTITIES) {
                self.current.identities.insert(*net, *identity);
            }
        }
        for (ip, endpoint) in &diff.endpoints_set {
            let written = self.endpoints.insert(ip.octets(), endpoint, 0);
            if note(written, MAP_POLICY_ENDPOINTS) {
                self.current.endpoints.insert(*ip, *endpoint);
            }
        }
        for ip in &diff.endpoints_removed {
            let removed = ignore_missing(self.endpoints.remove(&ip.octets()));
            if note(removed, MAP_POLICY_ENDPOINTS) {
                note(
                    ignore_missing(self.drops.remove(&ip.octets())),
                    MAP_POLICY_DROPS,
                );
                self.current.endpoints.remove(ip);
            }
        }
        for key in &diff.rules_removed {
            if note(ignore_missing(self.rules.remove(key)), MAP_POLICY) {
                self.current.rules.remove(key);
            }
        }
        for net in &diff.identities_removed {
            let removed = ignore_missing(self.identities.remove(&lpm_key(net)));
            if note(removed, MAP_POLICY_IDENTITIES) {
                self.current.identities.remove(net);
            }
        }
        let mut state = self.state()?;
        let active = u32::from(desired.active());
        if !diff.is_empty() || state.active != active {
            state.revision = state.revision.wrapping_add(1);
            state.active = active;
            self.state
                .set(0, state, 0)
                .map_err(map_error(MAP_POLICY_STATE))?;
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(diff),
        }
    }

    /// `{revision, active}` as the programs see it.
    pub fn state(&self) -> Result<PolicyState, PolicyMapsError> {
        self.state.get(&0, 0).map_err(map_error(MAP_POLICY_STATE))
    }

    /// Packets policy dropped, per local pod, summed over CPUs.
    pub fn drops(&self) -> Result<BTreeMap<Ipv4Addr, PolicyDrops>, PolicyMapsError> {
        let mut drops = BTreeMap::new();
        for entry in self.drops.iter() {
            let (ip, per_cpu) = entry.map_err(map_error(MAP_POLICY_DROPS))?;
            let sum = per_cpu
                .iter()
                .fold(PolicyDrops::default(), |sum, cpu| PolicyDrops {
                    ingress_packets: sum.ingress_packets + cpu.ingress_packets,
                    egress_packets: sum.egress_packets + cpu.egress_packets,
                });
            drops.insert(Ipv4Addr::from(ip), sum);
        }
        Ok(drops)
    }

    /// The tracked flows (original direction) and the revision each was allowed under.
    pub fn connections(&self) -> Result<Vec<(FlowKey, PolicyCtEntry)>, PolicyMapsError> {
        self.ct
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_POLICY_CT))
    }
}

fn lpm_key(net: &Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix()), net.network().octets())
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::ElementNotFound) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycni_common::policy::{identity, ENFORCE_INGRESS, POLICY_INGRESS};

    fn endpoint(identity: u32, enforce: u8) -> PolicyEndpoint {
        PolicyEndpoint {
            identity,
            enforce,
            pad: [0; 3],
        }
    }

    fn rule(endpoint: [u8; 4], peer_identity: u32, port: u16) -> PolicyKey {
        PolicyKey {
            endpoint,
            peer_identity,
            port,
            protocol: 6,
            direction: POLICY_INGRESS,
        }
    }

    fn net(text: &str) -> Ipv4Network {
        text.parse().expect("a test prefix")
    }

    #[test]
    fn nothing_to_write_when_the_maps_hold_what_is_desired() {
        let mut desired = PolicyDesired::default();
        desired
            .endpoints
            .insert(Ipv4Addr::new(10, 0, 0, 5), endpoint(256, ENFORCE_INGRESS));
        desired.identities.insert(net("10.0.0.5/32"), 256);
        desired
            .rules
            .insert(rule([10, 0, 0, 5], 256, 80), PolicyEntry { rules: 1 });
        assert!(diff(&desired, &desired).is_empty());
        assert!(desired.active());
    }

    #[test]
    fn changed_values_are_rewritten_and_absent_keys_removed() {
        let mut current = PolicyDesired::default();
        current
            .endpoints
            .insert(Ipv4Addr::new(10, 0, 0, 5), endpoint(256, ENFORCE_INGRESS));
        current
            .endpoints
            .insert(Ipv4Addr::new(10, 0, 0, 6), endpoint(257, ENFORCE_INGRESS));
        current.identities.insert(net("10.0.0.7/32"), 300);
        current.identities.insert(net("192.168.0.0/16"), 301);
        current
            .rules
            .insert(rule([10, 0, 0, 5], 300, 80), PolicyEntry { rules: 1 });
        let mut desired = current.clone();
        // A label change: the pod's one identity entry moves.
        desired.identities.insert(net("10.0.0.7/32"), 302);
        desired.identities.remove(&net("192.168.0.0/16"));
        desired.endpoints.remove(&Ipv4Addr::new(10, 0, 0, 6));
        desired
            .rules
            .insert(rule([10, 0, 0, 5], 300, 80), PolicyEntry { rules: 2 });
        desired.rules.insert(
            rule([10, 0, 0, 5], identity::HOST, 0),
            PolicyEntry { rules: 1 },
        );
        let writes = diff(&current, &desired);
        assert_eq!(writes.identities_set, vec![(net("10.0.0.7/32"), 302)]);
        assert_eq!(writes.identities_removed, vec![net("192.168.0.0/16")]);
        assert_eq!(writes.endpoints_set, vec![]);
        assert_eq!(writes.endpoints_removed, vec![Ipv4Addr::new(10, 0, 0, 6)]);
        assert_eq!(
            writes.rules_set,
            vec![
                (
                    rule([10, 0, 0, 5], identity::HOST, 0),
                    PolicyEntry { rules: 1 }
                ),
                (rule([10, 0, 0, 5], 300, 80), PolicyEntry { rules: 2 }),
            ]
        );
        assert!(writes.rules_removed.is_empty());
    }

    #[test]
    fn an_endpoint_the_plugin_cleared_has_its_rows_written_again() {
        // The agent wrote 10.0.0.5 and its row; a DEL cleared both, and a new pod with the
        // same address and the same policy is due: the diff must write both again.
        let ip = Ipv4Addr::new(10, 0, 0, 5);
        let mut desired = PolicyDesired::default();
        desired.endpoints.insert(ip, endpoint(256, ENFORCE_INGRESS));
        desired
            .rules
            .insert(rule([10, 0, 0, 5], 300, 80), PolicyEntry { rules: 1 });
        let mut current = desired.clone();
        // A row of another pod, and one of the cleared pod that is no longer desired.
        current
            .rules
            .insert(rule([10, 0, 0, 9], 300, 80), PolicyEntry { rules: 1 });
        current
            .rules
            .insert(rule([10, 0, 0, 5], 300, 443), PolicyEntry { rules: 1 });
        let mut wanted = desired.clone();
        wanted
            .rules
            .insert(rule([10, 0, 0, 9], 300, 80), PolicyEntry { rules: 1 });
        reconcile_endpoints(&mut current, &BTreeMap::new(), &wanted);
        let writes = diff(&current, &wanted);
        assert_eq!(
            writes.endpoints_set,
            vec![(ip, endpoint(256, ENFORCE_INGRESS))]
        );
        assert_eq!(
            writes.rules_set,
            vec![(rule([10, 0, 0, 5], 300, 80), PolicyEntry { rules: 1 })]
        );
        assert_eq!(writes.rules_removed, vec![rule([10, 0, 0, 5], 300, 443)]);
    }

    #[test]
    fn nothing_is_forgotten_when_the_map_holds_what_the_agent_wrote() {
        let mut current = PolicyDesired::default();
        current
            .endpoints
            .insert(Ipv4Addr::new(10, 0, 0, 5), endpoint(256, ENFORCE_INGRESS));
        current
            .rules
            .insert(rule([10, 0, 0, 5], 300, 80), PolicyEntry { rules: 1 });
        let actual = current.endpoints.clone();
        let before = current.clone();
        reconcile_endpoints(&mut current, &actual, &before);
        assert_eq!(current, before);
    }

    #[test]
    fn markers_stay_until_the_agent_knows_the_pod_then_follow_the_policy() {
        let marker = PolicyEndpoint {
            identity: identity::UNRESOLVED,
            enforce: ENFORCE_INGRESS | mycni_common::policy::ENFORCE_EGRESS,
            pad: [0; 3],
        };
        let (new_pod, unselected, selected) = (
            Ipv4Addr::new(10, 0, 0, 7),
            Ipv4Addr::new(10, 0, 0, 8),
            Ipv4Addr::new(10, 0, 0, 9),
        );
        let actual: BTreeMap<_, _> = [(new_pod, marker), (unselected, marker), (selected, marker)]
            .into_iter()
            .collect();
        let mut desired = PolicyDesired::default();
        desired
            .endpoints
            .insert(selected, endpoint(256, ENFORCE_INGRESS));
        let known: BTreeSet<_> = [unselected, selected].into_iter().collect();
        let kept = keep_unresolved(&desired, &actual, &known);
        assert_eq!(kept.endpoints.get(&new_pod), Some(&marker));
        assert_eq!(kept.endpoints.get(&unselected), None);
        assert_eq!(
            kept.endpoints.get(&selected),
            Some(&endpoint(256, ENFORCE_INGRESS))
        );
        assert!(kept.active());
        // The plugin's marker is news to the agent: reconciled, the unselected pod's
        // marker is removed and the selected pod's replaced.
        let mut current = PolicyDesired::default();
        reconcile_endpoints(&mut current, &actual, &kept);
        let writes = diff(&current, &kept);
        assert_eq!(writes.endpoints_removed, vec![unselected]);
        assert_eq!(
            writes.endpoints_set,
            vec![(selected, endpoint(256, ENFORCE_INGRESS))]
        );
    }

    #[test]
    fn endpoints_selected_by_nothing_leave_policy_inactive() {
        let mut desired = PolicyDesired::default();
        desired
            .endpoints
            .insert(Ipv4Addr::new(10, 0, 0, 5), endpoint(256, 0));
        assert!(!desired.active());
        let writes = diff(&PolicyDesired::default(), &desired);
        assert_eq!(writes.endpoints_set.len(), 1);
    }
}
