//! Thin adapter over the pinned eBPF objects: loading and pinning them (the agent), and
//! reading and writing the maps and attaching `from_pod` (the plugin).
//!
//! Pin layout under the bpffs root (default `/sys/fs/bpf/mycni`): one pin per map, named as
//! in `mycni_common::MAP_NAMES`, and one per program, named as in `PROGRAM_NAMES` and
//! `SERVICE_PROGRAM_NAMES` (plus, in Services eBPF mode, the cgroup links'
//! `<program>-link`, see [`crate::socket_lb::cgroup`]). The
//! programs' log buffer (aya-log's `AYA_LOGS`) and its rate-limit map are not pinned: each
//! load gets fresh ones, read by the agent that loaded it (see [`crate::ebpf_log`]).
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError, MapInfo, PerCpuArray};
use aya::programs::tc::{
    NlOptions, SchedClassifier, TcAttachOptions, TcAttachType, TcError, TcHandle,
};
use aya::programs::{CgroupSockAddr, Program, ProgramError};
use aya::{Ebpf, EbpfError, EbpfLoader};
use mycni_common::{
    pinned_map, verdict, Counter, Endpoint, FlowKey, MapKind, NatEntry, NodeConfig, Route,
    LAYOUT_VERSION, MAP_CONFIG, MAP_ENDPOINTS, MAP_NAMES, MAP_NAT, MAP_NO_MASQ, MAP_PEERS,
    MAP_ROUTES, MAP_STATS, PEER_KNOWN, PROGRAM_NAMES, PROG_FROM_NETDEV, PROG_FROM_POD,
    PROG_TO_NETDEV, PROG_TO_POD, ROUTE_LOCAL_CIDR, ROUTE_LOCAL_ENDPOINT, SERVICE_PROGRAM_NAMES,
};

/// The TC programs, built by `cargo xtask build-ebpf` and embedded at compile time (empty
/// when the build ran before `build-ebpf`: `cargo check` works, loading says what to do).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mycni.bpf.o"));

/// mycni's TC filter priority and handle: fixed, so a re-attach (an agent upgrade, a
/// retried ADD) replaces the filter instead of stacking a second one.
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("the datapath is not loaded: {path} is missing (is mycni-agent running?)")]
    NotLoaded { path: PathBuf },
    #[error("{path} is not on a bpf filesystem: mount one first (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("pinned map {path} has another layout ({found}); expected {expected}. Remove the pins (mycni-agent unload) or run the matching mycni version")]
    IncompatiblePin {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("the pins under {root} were written by mycni layout version {found}; this build uses {expected}. Its maps may hold entries of another shape: remove the pins (mycni-agent unload, which keeps attached programs running until the agent reloads) or run the matching mycni version")]
    LayoutVersion {
        root: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("mycni was built without the eBPF object: run `cargo xtask build-ebpf`, then rebuild (cargo build)")]
    NoObject,
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot add clsact to {ifname}: {source}")]
    Qdisc {
        ifname: String,
        #[source]
        source: TcError,
    },
    #[error("cannot pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn program_error(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// A pinned map's shape as the kernel reports it: (kind, key size, value size, max entries).
type Layout = (&'static str, u32, u32, u32);

/// The shape `mycni_common::map_spec` declares for the map pinned as `name`.
fn expected_layout(name: &str) -> Option<Layout> {
    pinned_map(name).map(|spec| {
        (
            spec.kind.name(),
            spec.key_size,
            spec.value_size,
            spec.max_entries,
        )
    })
}

fn layout_of(info: &MapInfo) -> Layout {
    let kind = match info.map_type() {
        Ok(aya::maps::MapType::LpmTrie) => MapKind::LpmTrie.name(),
        Ok(aya::maps::MapType::Hash) => MapKind::Hash.name(),
        Ok(aya::maps::MapType::PerCpuArray) => MapKind::PerCpuArray.name(),
        Ok(aya::maps::MapType::Array) => MapKind::Array.name(),
        Ok(aya::maps::MapType::LruHash) => MapKind::LruHash.name(),
        Ok(aya::maps::MapType::PerCpuHash) => MapKind::PerCpuHash.name(),
        // No pinned map has another kind: any other is a mismatch, whatever it is.
        Ok(_) => "another kind",
        Err(_) => "unknown",
    };
    (kind, info.key_size(), info.value_size(), info.max_entries())
}

/// Refuses pins left by a build with another map layout: aya would reuse them silently.
/// The shapes are compared map by map, and the layout version the last agent stamped in
/// `CONFIG` against this build's (a layout change that keeps every size shows only there).
fn check_pinned_layouts(root: &Path) -> Result<(), DatapathError> {
    for name in MAP_NAMES {
        let path = root.join(name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path).map_err(map_error(name))?;
        let info = data.info().map_err(map_error(name))?;
        let found = layout_of(&info);
        let Some(expected) = expected_layout(name) else {
            continue;
        };
        if found != expected {
            return Err(DatapathError::IncompatiblePin {
                path,
                found: format!("{found:?}"),
                expected: format!("{expected:?}"),
            });
        }
    }
    if root.join(MAP_CONFIG).exists() {
        let found = read_config(root)?.layout_version;
        check_layout_version(root, found)?;
    }
    Ok(())
}

/// Zero means never stamped (pins made before the stamp existed, or by an agent that was
/// stopped before writing it): accepted, since the shapes matched.
fn check_layout_version(root: &Path, found: u32) -> Result<(), DatapathError> {
    if found != 0 && found != LAYOUT_VERSION {
        return Err(DatapathError::LayoutVersion {
            root: root.to_path_buf(),
            found,
            expected: LAYOUT_VERSION,
        });
    }
    Ok(())
}

/// Records this build's layout version in `CONFIG`, keeping the rest of it, so the next
/// build to load these pins can tell whether it may reuse them.
fn stamp_layout_version(root: &Path) -> Result<(), DatapathError> {
    let mut config = read_config(root)?;
    if config.layout_version != LAYOUT_VERSION {
        config.layout_version = LAYOUT_VERSION;
        write_config(root, &config)?;
    }
    Ok(())
}

/// Loads the programs and maps, pins them under `root`, and reuses maps already pinned
/// there (so endpoints survive an agent restart). Programs are re-pinned by an atomic
/// rename, so a plugin opening the pin never sees it missing.
///
/// The programs log at the level [`crate::ebpf_log::init`] set (nothing if it was never
/// called), and when it was called their messages are forwarded to stderr from here on.
pub fn load_and_pin(root: &Path) -> Result<(), DatapathError> {
    if EBPF_OBJECT.is_empty() {
        return Err(DatapathError::NoObject);
    }
    std::fs::create_dir_all(root).map_err(|source| DatapathError::Io {
        what: "cannot create pin directory",
        path: root.to_path_buf(),
        source,
    })?;
    if !on_bpffs(root) {
        return Err(DatapathError::NotBpffs {
            path: root.to_path_buf(),
        });
    }
    check_pinned_layouts(root)?;
    let map_paths: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, root.join(n))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    // Read-only data: the verifier sees the level as a constant and drops the disabled
    // log statements from the loaded programs.
    let log_level = crate::ebpf_log::level() as u8;
    loader.override_global(aya_log::LEVEL, &log_level, true);
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|e| DatapathError::Load(Box::new(e)))?;
    for name in PROGRAM_NAMES {
        let program: &mut SchedClassifier = program_of(&mut ebpf, name)?;
        program.load().map_err(program_error(name))?;
        replace_pin(root, name, |staging| program.pin(staging))?;
    }
    // The Services programs are loaded (and verified) in every mode, attached only in
    // `--service-mode ebpf` (`crate::socket_lb::cgroup`).
    for name in SERVICE_PROGRAM_NAMES {
        let program: &mut CgroupSockAddr = program_of(&mut ebpf, name)?;
        program.load().map_err(program_error(name))?;
        replace_pin(root, name, |staging| program.pin(staging))?;
    }
    stamp_layout_version(root)?;
    // The datapath works without its log: a reader that cannot start is only reported.
    if let Err(e) = crate::ebpf_log::forward(&mut ebpf) {
        log::warn!("the programs' log messages are lost: {e}");
    }
    Ok(())
}

/// The object's program `name`, as the kind of program it must be.
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(program_error(name))
}

/// Pins something as `root/name` by pinning it beside and renaming it over the old pin,
/// so whoever opens the pin never finds it missing.
pub(crate) fn replace_pin(
    root: &Path,
    name: &str,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), DatapathError> {
    let staging = root.join(format!("{name}-new"));
    let _ = std::fs::remove_file(&staging);
    pin(&staging).map_err(|source| DatapathError::Pin {
        path: staging.clone(),
        source,
    })?;
    let target = root.join(name);
    std::fs::rename(&staging, &target).map_err(|source| DatapathError::Io {
        what: "cannot replace pin",
        path: target,
        source,
    })
}

/// Whether `path` lives on a bpffs, where pins can be made.
fn on_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we pass; the path is NUL-terminated.
    let ok = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } == 0;
    ok && stat.f_type as i64 == BPF_FS_MAGIC
}

/// Every map and program pin under the root.
fn pin_names() -> impl Iterator<Item = &'static str> {
    MAP_NAMES
        .into_iter()
        .chain(PROGRAM_NAMES)
        .chain(SERVICE_PROGRAM_NAMES)
}

/// Removes every map and program pin under `root` (programs stay attached to existing
/// veths until those go, and to the cgroup while their link pins stay).
pub fn unpin_all(root: &Path) -> Result<(), DatapathError> {
    for name in pin_names() {
        let path = root.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(DatapathError::Io {
                    what: "cannot remove pin",
                    path,
                    source: e,
                })
            }
            _ => {}
        }
    }
    let _ = std::fs::remove_dir(root);
    Ok(())
}

/// Whether every program and map is pinned: what STATUS reports.
pub fn check_loaded(root: &Path) -> Result<(), DatapathError> {
    for name in pin_names() {
        let path = root.join(name);
        if !path.exists() {
            return Err(DatapathError::NotLoaded { path });
        }
    }
    check_pinned_layouts(root)
}

pub(crate) fn open_pinned(root: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    let path = root.join(name);
    if !path.exists() {
        return Err(DatapathError::NotLoaded { path });
    }
    MapData::from_pin(&path).map_err(map_error(name))
}

/// The endpoint and route maps, opened from their pins.
pub struct Maps {
    routes: LpmTrie<MapData, [u8; 4], Route>,
    endpoints: HashMap<MapData, [u8; 4], Endpoint>,
}

impl Maps {
    pub fn open(root: &Path) -> Result<Maps, DatapathError> {
        check_pinned_layouts(root)?;
        let routes = LpmTrie::try_from(Map::LpmTrie(open_pinned(root, MAP_ROUTES)?))
            .map_err(map_error(MAP_ROUTES))?;
        let endpoints = HashMap::try_from(Map::HashMap(open_pinned(root, MAP_ENDPOINTS)?))
            .map_err(map_error(MAP_ENDPOINTS))?;
        Ok(Maps { routes, endpoints })
    }

    /// Writes the endpoint and its /32 local route. ENDPOINTS first: `from_pod` checks
    /// sources against it, and a route without its endpoint would be half a pod.
    pub fn write_endpoint(
        &mut self,
        ip: Ipv4Addr,
        endpoint: &Endpoint,
    ) -> Result<(), DatapathError> {
        self.endpoints
            .insert(ip.octets(), endpoint, 0)
            .map_err(map_error(MAP_ENDPOINTS))?;
        let route = Route {
            kind: ROUTE_LOCAL_ENDPOINT,
            ifindex: endpoint.ifindex,
            next_hop: [0; 4],
            pod_mac: endpoint.pod_mac,
            host_mac: endpoint.host_mac,
        };
        self.routes
            .insert(&Key::new(32, ip.octets()), route, 0)
            .map_err(map_error(MAP_ROUTES))
    }

    /// Removes the endpoint and its route; entries already gone are not an error.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        ignore_missing(self.routes.remove(&Key::new(32, ip.octets())))
            .map_err(map_error(MAP_ROUTES))?;
        ignore_missing(self.endpoints.remove(&ip.octets())).map_err(map_error(MAP_ENDPOINTS))
    }

    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>, DatapathError> {
        found_or_none(self.endpoints.get(&ip.octets(), 0)).map_err(map_error(MAP_ENDPOINTS))
    }

    /// The route `ROUTES` holds for exactly `ip/32` (not a covering prefix).
    pub fn local_route(&self, ip: Ipv4Addr) -> Result<Option<Route>, DatapathError> {
        let route = found_or_none(self.routes.get(&Key::new(32, ip.octets()), 0))
            .map_err(map_error(MAP_ROUTES))?;
        Ok(route.filter(|r| r.kind == ROUTE_LOCAL_ENDPOINT))
    }

    /// The route `ROUTES` answers for `ip/prefix_len`: the longest prefix covering it, no
    /// longer than `prefix_len` (one lookup, not a walk).
    pub fn route(&self, ip: Ipv4Addr, prefix_len: u8) -> Result<Option<Route>, DatapathError> {
        found_or_none(
            self.routes
                .get(&Key::new(prefix_len as u32, ip.octets()), 0),
        )
        .map_err(map_error(MAP_ROUTES))
    }

    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
        self.endpoints
            .iter()
            .map(|entry| entry.map(|(ip, ep)| (Ipv4Addr::from(ip), ep)))
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_ENDPOINTS))
    }

    pub fn routes(&self) -> Result<Vec<(Ipv4Addr, u8, Route)>, DatapathError> {
        self.routes
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, route)| (Ipv4Addr::from(key.data()), key.prefix_len() as u8, route))
            })
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_ROUTES))
    }
}

impl Maps {
    /// Points another node's pod CIDR at that node (kind `ROUTE_REMOTE_NODE` or
    /// `ROUTE_REMOTE_TUNNEL`, out of `ifindex`).
    pub fn write_remote_route(
        &mut self,
        cidr: Ipv4Addr,
        prefix_len: u8,
        kind: u32,
        ifindex: u32,
        next_hop: Ipv4Addr,
    ) -> Result<(), DatapathError> {
        let route = Route {
            kind,
            ifindex,
            next_hop: next_hop.octets(),
            pod_mac: [0; 6],
            host_mac: [0; 6],
        };
        self.routes
            .insert(&Key::new(prefix_len as u32, cidr.octets()), route, 0)
            .map_err(map_error(MAP_ROUTES))
    }

    /// Marks this node's own pod CIDR (kind `ROUTE_LOCAL_CIDR`): addresses in it that no
    /// pod holds are counted and left to the stack's unreachable route.
    pub fn write_local_cidr(
        &mut self,
        cidr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), DatapathError> {
        let route = Route {
            kind: ROUTE_LOCAL_CIDR,
            ifindex: 0,
            next_hop: [0; 4],
            pod_mac: [0; 6],
            host_mac: [0; 6],
        };
        self.routes
            .insert(&Key::new(prefix_len as u32, cidr.octets()), route, 0)
            .map_err(map_error(MAP_ROUTES))
    }

    pub fn remove_route(&mut self, cidr: Ipv4Addr, prefix_len: u8) -> Result<(), DatapathError> {
        ignore_missing(
            self.routes
                .remove(&Key::new(prefix_len as u32, cidr.octets())),
        )
        .map_err(map_error(MAP_ROUTES))
    }
}

/// Writes what the programs know about this node.
pub fn write_config(root: &Path, config: &NodeConfig) -> Result<(), DatapathError> {
    let mut array: aya::maps::Array<MapData, NodeConfig> =
        aya::maps::Array::try_from(Map::Array(open_pinned(root, MAP_CONFIG)?))
            .map_err(map_error(MAP_CONFIG))?;
    array.set(0, config, 0).map_err(map_error(MAP_CONFIG))
}

pub fn read_config(root: &Path) -> Result<NodeConfig, DatapathError> {
    let array: aya::maps::Array<MapData, NodeConfig> =
        aya::maps::Array::try_from(Map::Array(open_pinned(root, MAP_CONFIG)?))
            .map_err(map_error(MAP_CONFIG))?;
    array.get(&0, 0).map_err(map_error(MAP_CONFIG))
}

/// Replaces the set of destinations never masqueraded.
pub fn write_no_masquerade(root: &Path, prefixes: &[(Ipv4Addr, u8)]) -> Result<(), DatapathError> {
    let mut trie: LpmTrie<MapData, [u8; 4], u32> =
        LpmTrie::try_from(Map::LpmTrie(open_pinned(root, MAP_NO_MASQ)?))
            .map_err(map_error(MAP_NO_MASQ))?;
    let present: Vec<Key<[u8; 4]>> = trie
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_error(MAP_NO_MASQ))?;
    for (addr, len) in prefixes {
        trie.insert(&Key::new(*len as u32, addr.octets()), 1, 0)
            .map_err(map_error(MAP_NO_MASQ))?;
    }
    for key in present {
        let wanted = prefixes
            .iter()
            .any(|(addr, len)| key.prefix_len() == *len as u32 && key.data() == addr.octets());
        if !wanted {
            ignore_missing(trie.remove(&key)).map_err(map_error(MAP_NO_MASQ))?;
        }
    }
    Ok(())
}

/// Replaces the set of peer nodes whose VXLAN `from_netdev` accepts.
pub fn write_peers(root: &Path, peers: &[Ipv4Addr]) -> Result<(), DatapathError> {
    let mut map: HashMap<MapData, [u8; 4], u32> =
        HashMap::try_from(Map::HashMap(open_pinned(root, MAP_PEERS)?))
            .map_err(map_error(MAP_PEERS))?;
    // Sets, not lists: at 5,000 nodes a list lookup per peer made every pass quadratic.
    let present: std::collections::HashSet<[u8; 4]> = map
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_error(MAP_PEERS))?;
    let wanted: std::collections::HashSet<[u8; 4]> = peers.iter().map(|p| p.octets()).collect();
    for peer in &wanted {
        if !present.contains(peer) {
            map.insert(*peer, PEER_KNOWN, 0)
                .map_err(map_error(MAP_PEERS))?;
        }
    }
    for key in present {
        if !wanted.contains(&key) {
            ignore_missing(map.remove(&key)).map_err(map_error(MAP_PEERS))?;
        }
    }
    Ok(())
}

/// The peer nodes `PEERS` holds.
pub fn read_peers(root: &Path) -> Result<Vec<Ipv4Addr>, DatapathError> {
    let map: HashMap<MapData, [u8; 4], u32> =
        HashMap::try_from(Map::HashMap(open_pinned(root, MAP_PEERS)?))
            .map_err(map_error(MAP_PEERS))?;
    map.keys()
        .map(|key| key.map(Ipv4Addr::from))
        .collect::<Result<_, _>>()
        .map_err(map_error(MAP_PEERS))
}

/// The SNAT table, for expiry and inspection.
pub struct NatTable {
    map: HashMap<MapData, FlowKey, NatEntry>,
}

impl NatTable {
    pub fn open(root: &Path) -> Result<NatTable, DatapathError> {
        let map = HashMap::try_from(Map::LruHashMap(open_pinned(root, MAP_NAT)?))
            .map_err(map_error(MAP_NAT))?;
        Ok(NatTable { map })
    }

    pub fn entries(&self) -> Result<Vec<(FlowKey, NatEntry)>, DatapathError> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_NAT))
    }

    pub fn remove(&mut self, key: &FlowKey) -> Result<(), DatapathError> {
        ignore_missing(self.map.remove(key)).map_err(map_error(MAP_NAT))
    }

    /// Writes an entry as the programs would (benchmarks fill the table with it).
    pub fn insert(&mut self, key: &FlowKey, entry: &NatEntry) -> Result<(), DatapathError> {
        self.map.insert(key, entry, 0).map_err(map_error(MAP_NAT))
    }
}

pub(crate) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn found_or_none<V>(result: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Attaches a pinned program to a link's TC hook as a netlink (cls_bpf) filter: it
/// outlives this process (the agent may restart, the plugin exits at once) and vanishes
/// with the link, so a deleted pod leaves no attachment behind.
pub fn attach(
    root: &Path,
    program: &'static str,
    ifname: &str,
    hook: TcAttachType,
) -> Result<(), DatapathError> {
    match aya::programs::tc::qdisc_add_clsact(ifname) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(source) => {
            return Err(DatapathError::Qdisc {
                ifname: ifname.to_string(),
                source,
            })
        }
    }
    let path = root.join(program);
    if !path.exists() {
        return Err(DatapathError::NotLoaded { path });
    }
    let mut loaded = SchedClassifier::from_pin(&path).map_err(program_error(program))?;
    let options = NlOptions {
        priority: FILTER_PRIORITY,
        handle: FILTER_HANDLE,
        classid: None,
    };
    let link_id = match loaded.attach_with_options(ifname, hook, TcAttachOptions::Netlink(options))
    {
        Ok(link_id) => link_id,
        // A filter is there already (agent restart): replace its program in place.
        Err(ProgramError::TcError(TcError::NetlinkError(e)))
            if e.raw_os_error() == Some(libc::EEXIST) =>
        {
            let existing = aya::programs::tc::SchedClassifierLink::attached(
                ifname,
                hook,
                FILTER_PRIORITY,
                FILTER_HANDLE,
                None,
            )
            .map_err(|source| DatapathError::Io {
                what: "cannot find the filter on",
                path: PathBuf::from(ifname),
                source,
            })?;
            loaded
                .attach_to_link(existing)
                .map_err(program_error(program))?
        }
        Err(e) => return Err(program_error(program)(e)),
    };
    // Dropping the link would detach the filter; it must outlive this process.
    let link = loaded.take_link(link_id).map_err(program_error(program))?;
    std::mem::forget(link);
    Ok(())
}

/// A pod's host veth: `from_pod` on ingress, `to_pod` on egress.
pub fn attach_to_host_veth(root: &Path, ifname: &str) -> Result<(), DatapathError> {
    attach(root, PROG_FROM_POD, ifname, TcAttachType::Ingress)?;
    attach(root, PROG_TO_POD, ifname, TcAttachType::Egress)
}

/// The node's uplink: `from_netdev` on ingress, `to_netdev` on egress.
pub fn attach_to_uplink(root: &Path, ifname: &str) -> Result<(), DatapathError> {
    attach(root, PROG_FROM_NETDEV, ifname, TcAttachType::Ingress)?;
    attach(root, PROG_TO_NETDEV, ifname, TcAttachType::Egress)
}

/// The VXLAN device: `from_netdev` on ingress delivers decapsulated packets to pods;
/// `to_netdev` on egress remembers pod-to-pod flows the stack sends into the tunnel.
pub fn attach_to_tunnel(root: &Path, ifname: &str) -> Result<(), DatapathError> {
    attach(root, PROG_FROM_NETDEV, ifname, TcAttachType::Ingress)?;
    attach(root, PROG_TO_NETDEV, ifname, TcAttachType::Egress)
}

/// Per-verdict counters summed over CPUs, indexed by `mycni_common::verdict`.
pub fn read_stats(root: &Path) -> Result<Vec<Counter>, DatapathError> {
    let stats: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(open_pinned(root, MAP_STATS)?))
            .map_err(map_error(MAP_STATS))?;
    (0..verdict::COUNT)
        .map(|index| {
            let per_cpu = stats.get(&index, 0).map_err(map_error(MAP_STATS))?;
            Ok(per_cpu.iter().fold(Counter::default(), |sum, c| Counter {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_layout_version_is_refused_with_what_to_do() {
        let root = Path::new("/sys/fs/bpf/mycni");
        assert!(check_layout_version(root, LAYOUT_VERSION).is_ok());
        assert!(check_layout_version(root, 0).is_ok(), "never stamped");
        let refused = check_layout_version(root, LAYOUT_VERSION + 1)
            .expect_err("another version")
            .to_string();
        assert!(refused.contains(&format!("layout version {}", LAYOUT_VERSION + 1)));
        assert!(refused.contains("mycni-agent unload"), "{refused}");
    }
}
