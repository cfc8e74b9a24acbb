//! Thin adapter: reads `SERVICES` and `BACKENDS` from their pins and writes the
//! [`super::plan`] to them; clears `AFFINITY` entries of services whose backends changed;
//! ends the sockets still connected through a frontend to a backend it lost
//! ([`super::stale_sockets`], [`super::socket_termination`]) and forgets their
//! `SOCK_REVERSE` entries. The control plane builds a [`DesiredServices`] and calls
//! [`ServiceTables::apply`].
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError};
use mycni_common::service::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ServiceEntry, ServiceKey, SockReverseEntry,
    SockReverseKey,
};
use mycni_common::{MAP_AFFINITY, MAP_BACKENDS, MAP_SERVICES, MAP_SOCK_REVERSE};

use super::plan::{plan, DesiredServices, PlanError, ServiceOp};
use super::socket_termination;
use super::stale_sockets::{removed_backends, RemovedBackends};
use crate::datapath::{self, DatapathError};

#[derive(Debug, thiserror::Error)]
pub enum ServiceTablesError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the desired Services are inconsistent: {0}")]
    Plan(#[from] PlanError),
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> ServiceTablesError {
    move |source| ServiceTablesError::Map { name, source }
}

/// The Services maps, opened from their pins.
pub struct ServiceTables {
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    backends: HashMap<MapData, BackendKey, Backend>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    sock_reverse: HashMap<MapData, SockReverseKey, SockReverseEntry>,
    /// The frontends as they were before an `apply` whose writes failed: the next one
    /// ends the sockets of every backend removed since (its own start sees half the
    /// change written).
    unfinished: Option<DesiredServices>,
}

/// What one [`ServiceTables::apply`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub writes: usize,
    pub affinity_cleared: usize,
    /// Sockets ended because their backend left the frontend they connected through.
    pub sockets_destroyed: usize,
    /// Namespaces or sockets the socket termination could not handle (it logged them).
    pub socket_termination_failures: usize,
}

impl ServiceTables {
    pub fn open(root: &Path) -> Result<ServiceTables, ServiceTablesError> {
        datapath::check_loaded(root)?;
        let services = HashMap::try_from(Map::HashMap(datapath::open_pinned(root, MAP_SERVICES)?))
            .map_err(map_error(MAP_SERVICES))?;
        let backends = HashMap::try_from(Map::HashMap(datapath::open_pinned(root, MAP_BACKENDS)?))
            .map_err(map_error(MAP_BACKENDS))?;
        let affinity =
            HashMap::try_from(Map::LruHashMap(datapath::open_pinned(root, MAP_AFFINITY)?))
                .map_err(map_error(MAP_AFFINITY))?;
        let sock_reverse = HashMap::try_from(Map::LruHashMap(datapath::open_pinned(
            root,
            MAP_SOCK_REVERSE,
        )?))
        .map_err(map_error(MAP_SOCK_REVERSE))?;
        Ok(ServiceTables {
            services,
            backends,
            affinity,
            sock_reverse,
            unfinished: None,
        })
    }

    /// The frontends as the maps hold them.
    pub fn services(&self) -> Result<BTreeMap<ServiceKey, ServiceEntry>, ServiceTablesError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_SERVICES))
    }

    /// Every filled backend slot.
    pub fn backend_slots(&self) -> Result<BTreeMap<BackendKey, Backend>, ServiceTablesError> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_BACKENDS))
    }

    /// Each frontend with its entry and the backends of its counted slots (for printing).
    pub fn frontends(&self) -> Result<DesiredServices, ServiceTablesError> {
        Ok(frontends_of(&self.services()?, &self.backend_slots()?))
    }

    /// Makes the maps hold `desired`, writing only the difference in an order that never
    /// lets a connection pick an empty slot (see [`super::plan`]). A failed write leaves
    /// the maps consistent up to that write; the next `apply` finishes the job. Then the
    /// sockets connected through a frontend to a backend it lost are destroyed (after the
    /// writes, so a client reconnecting at once already picks a live backend).
    pub fn apply(&mut self, desired: &DesiredServices) -> Result<ApplySummary, ServiceTablesError> {
        let (mut summary, removed) = self.apply_leaving_sockets(desired)?;
        let (destroyed, failures) = self.end_sockets(&removed)?;
        summary.sockets_destroyed = destroyed;
        summary.socket_termination_failures = failures;
        Ok(summary)
    }

    /// [`Self::apply`]'s map writes only: returns the (frontend, backend) pairs the change
    /// removed, whose sockets the caller ends ([`Self::end_sockets`], on a thread of its
    /// own: the walk over every network namespace takes seconds on a busy node).
    pub fn apply_leaving_sockets(
        &mut self,
        desired: &DesiredServices,
    ) -> Result<(ApplySummary, RemovedBackends), ServiceTablesError> {
        let (services, slots) = (self.services()?, self.backend_slots()?);
        // What the maps held before an apply that failed half-way, else what they hold.
        let before = self
            .unfinished
            .take()
            .unwrap_or_else(|| frontends_of(&services, &slots));
        let summary = match self.write(&services, &slots, desired) {
            Ok(summary) => summary,
            Err(e) => {
                self.unfinished = Some(before);
                return Err(e);
            }
        };
        Ok((summary, removed_backends(&before, desired)))
    }

    /// Ends, in every network namespace, the sockets connected through a frontend to a
    /// backend `removed` took from it, and forgets their `SOCK_REVERSE` entries. Returns
    /// how many it ended and how many namespaces or sockets failed (logged).
    pub fn end_sockets(
        &mut self,
        removed: &RemovedBackends,
    ) -> Result<(usize, usize), ServiceTablesError> {
        if removed.is_empty() {
            return Ok((0, 0));
        }
        let started = std::time::Instant::now();
        let reverse = &self.sock_reverse;
        let report =
            socket_termination::end_stale_sockets(removed, &|cookie: u64, backend: Backend| {
                reverse
                    .get(
                        &SockReverseKey {
                            socket_cookie: cookie,
                            backend,
                        },
                        0,
                    )
                    .ok()
            });
        if !report.destroyed.is_empty() || report.failures > 0 {
            log::info!(
                "services: ended {} sockets ({} failures) in {} network namespaces ({} ms) for {}",
                report.destroyed.len(),
                report.failures,
                report.namespaces,
                started.elapsed().as_millis(),
                removed.describe().join(", ")
            );
        }
        for (cookie, backend) in &report.destroyed {
            let key = SockReverseKey {
                socket_cookie: *cookie,
                backend: *backend,
            };
            // The socket is gone; a missing entry was evicted meanwhile.
            datapath::ignore_missing(self.sock_reverse.remove(&key))
                .map_err(map_error(MAP_SOCK_REVERSE))?;
        }
        Ok((report.destroyed.len(), report.failures))
    }

    /// The plan's writes, then the `AFFINITY` entries of services whose backends changed.
    fn write(
        &mut self,
        services: &BTreeMap<ServiceKey, ServiceEntry>,
        slots: &BTreeMap<BackendKey, Backend>,
        desired: &DesiredServices,
    ) -> Result<ApplySummary, ServiceTablesError> {
        let ops = plan(services, slots, desired)?;
        let mut summary = ApplySummary::default();
        let mut clear = BTreeSet::new();
        for op in &ops {
            match op {
                ServiceOp::PutBackend(key, backend) => self
                    .backends
                    .insert(key, backend, 0)
                    .map_err(map_error(MAP_BACKENDS))?,
                ServiceOp::PutService(key, entry) => self
                    .services
                    .insert(key, entry, 0)
                    .map_err(map_error(MAP_SERVICES))?,
                ServiceOp::DeleteService(key) => {
                    datapath::ignore_missing(self.services.remove(key))
                        .map_err(map_error(MAP_SERVICES))?
                }
                ServiceOp::DeleteBackend(key) => {
                    datapath::ignore_missing(self.backends.remove(key))
                        .map_err(map_error(MAP_BACKENDS))?
                }
                ServiceOp::ClearAffinity(service_id) => {
                    clear.insert(*service_id);
                    continue;
                }
            }
            summary.writes += 1;
        }
        // One walk of the LRU for every service whose backends changed, after the slots.
        if !clear.is_empty() {
            let stale: Vec<AffinityKey> = self
                .affinity
                .keys()
                .filter_map(Result::ok)
                .filter(|key| clear.contains(&key.service_id))
                .collect();
            for key in stale {
                datapath::ignore_missing(self.affinity.remove(&key))
                    .map_err(map_error(MAP_AFFINITY))?;
                summary.affinity_cleared += 1;
            }
        }
        Ok(summary)
    }
}

/// Each frontend with its entry and the backends of its counted slots.
fn frontends_of(
    services: &BTreeMap<ServiceKey, ServiceEntry>,
    slots: &BTreeMap<BackendKey, Backend>,
) -> DesiredServices {
    services
        .iter()
        .map(|(key, entry)| {
            let backends = (0..entry.backend_count)
                .filter_map(|slot| {
                    slots
                        .get(&BackendKey {
                            service_id: entry.service_id,
                            slot,
                        })
                        .copied()
                })
                .collect();
            (*key, (*entry, backends))
        })
        .collect()
}
