//! Pure: the ordered map writes that take `SERVICES` and `BACKENDS` from what they hold to
//! a desired state, in an order under which a connection racing the update never picks an
//! empty slot (no I/O; [`super::tables`] performs the writes).
//!
//! - a frontend that goes away: its entry first, then (once no frontend names them) its
//!   slots;
//! - a backend list that grows: the new slots first, then the count that covers them;
//! - one that shrinks: the count first, then the slots beyond it;
//! - a backend set that changes: the service's `AFFINITY` entries are cleared last, so no
//!   client stays pinned to a backend that is gone.
use std::collections::{BTreeMap, BTreeSet};

use mycni_common::service::{Backend, BackendKey, ServiceEntry, ServiceKey};

/// What the control plane wants: each frontend with its entry (`backend_count` is taken
/// from the list) and its backends. Frontends sharing a `service_id` share its slots, so
/// they must list the same backends.
pub type DesiredServices = BTreeMap<ServiceKey, (ServiceEntry, Vec<Backend>)>;

/// One map write, in the order [`plan`] returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceOp {
    PutBackend(BackendKey, Backend),
    PutService(ServiceKey, ServiceEntry),
    DeleteService(ServiceKey),
    DeleteBackend(BackendKey),
    /// Delete every `AFFINITY` entry of this service id.
    ClearAffinity(u32),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("frontends {first:?} and {second:?} share service id {service_id} but list different backends")]
    ConflictingBackends {
        service_id: u32,
        first: ServiceKey,
        second: ServiceKey,
    },
    #[error("service id {service_id} lists {count} backends, more than a u32 slot counts")]
    TooManyBackends { service_id: u32, count: usize },
}

/// The writes that turn `current_services`/`current_backends` (what the maps hold) into
/// `desired`, in a safe order.
pub fn plan(
    current_services: &BTreeMap<ServiceKey, ServiceEntry>,
    current_backends: &BTreeMap<BackendKey, Backend>,
    desired: &DesiredServices,
) -> Result<Vec<ServiceOp>, PlanError> {
    let wanted_slots = backends_by_service(desired)?;
    let mut held_slots: BTreeMap<u32, BTreeMap<u32, Backend>> = BTreeMap::new();
    for (key, backend) in current_backends {
        held_slots
            .entry(key.service_id)
            .or_default()
            .insert(key.slot, *backend);
    }
    let wanted_entries: BTreeMap<ServiceKey, ServiceEntry> = desired
        .iter()
        .map(|(key, (entry, _))| {
            let count = wanted_slots[&entry.service_id].len() as u32;
            (
                *key,
                ServiceEntry {
                    backend_count: count,
                    ..*entry
                },
            )
        })
        .collect();

    let mut ops = Vec::new();
    // Frontends that go away stop taking connections before anything else moves.
    for key in current_services.keys() {
        if !wanted_entries.contains_key(key) {
            ops.push(ServiceOp::DeleteService(*key));
        }
    }
    let empty = BTreeMap::new();
    for (service_id, backends) in &wanted_slots {
        let held = held_slots.get(service_id).unwrap_or(&empty);
        let count = backends.len() as u32;
        let entries = wanted_entries
            .iter()
            .filter(|(_, entry)| entry.service_id == *service_id);
        // Shrink: the smaller count first, so no connection picks a slot about to go.
        let (shrinking, others): (Vec<_>, Vec<_>) = entries
            .filter(|(key, entry)| current_services.get(key) != Some(entry))
            .partition(|(key, _)| {
                current_services.get(key).is_some_and(|held| {
                    held.service_id == *service_id && held.backend_count > count
                })
            });
        for (key, entry) in shrinking {
            ops.push(ServiceOp::PutService(*key, *entry));
        }
        // Grow or change: the slots before the counts that cover them.
        for (slot, backend) in backends.iter().enumerate() {
            let slot = slot as u32;
            if held.get(&slot) != Some(backend) {
                ops.push(ServiceOp::PutBackend(
                    BackendKey {
                        service_id: *service_id,
                        slot,
                    },
                    *backend,
                ));
            }
        }
        for (key, entry) in others {
            ops.push(ServiceOp::PutService(*key, *entry));
        }
        for slot in held.keys().filter(|slot| **slot >= count) {
            ops.push(ServiceOp::DeleteBackend(BackendKey {
                service_id: *service_id,
                slot: *slot,
            }));
        }
        let held_set: BTreeSet<&Backend> = held.values().collect();
        let wanted_set: BTreeSet<&Backend> = backends.iter().collect();
        if !held.is_empty() && held_set != wanted_set {
            ops.push(ServiceOp::ClearAffinity(*service_id));
        }
    }
    // Slots of service ids no frontend names any more (their entries are gone above).
    for (service_id, held) in &held_slots {
        if wanted_slots.contains_key(service_id) {
            continue;
        }
        for slot in held.keys() {
            ops.push(ServiceOp::DeleteBackend(BackendKey {
                service_id: *service_id,
                slot: *slot,
            }));
        }
        ops.push(ServiceOp::ClearAffinity(*service_id));
    }
    Ok(ops)
}

/// Each service id's backends, sorted and without duplicates (a duplicate would take two
/// slots and twice the share), checked equal across the frontends that share the id.
fn backends_by_service(
    desired: &DesiredServices,
) -> Result<BTreeMap<u32, Vec<Backend>>, PlanError> {
    let mut by_id: BTreeMap<u32, (ServiceKey, Vec<Backend>)> = BTreeMap::new();
    for (key, (entry, backends)) in desired {
        let mut backends = backends.clone();
        backends.sort();
        backends.dedup();
        if u32::try_from(backends.len()).is_err() {
            return Err(PlanError::TooManyBackends {
                service_id: entry.service_id,
                count: backends.len(),
            });
        }
        match by_id.get(&entry.service_id) {
            Some((first, held)) if *held != backends => {
                return Err(PlanError::ConflictingBackends {
                    service_id: entry.service_id,
                    first: *first,
                    second: *key,
                })
            }
            Some(_) => {}
            None => {
                by_id.insert(entry.service_id, (*key, backends));
            }
        }
    }
    Ok(by_id
        .into_iter()
        .map(|(id, (_, backends))| (id, backends))
        .collect())
}

/// Applies `ops` to an in-memory copy of the maps: what the maps hold after [`plan`]'s
/// writes, and (for tests) what a connection could see after each step.
pub fn apply_to(
    services: &mut BTreeMap<ServiceKey, ServiceEntry>,
    backends: &mut BTreeMap<BackendKey, Backend>,
    op: &ServiceOp,
) {
    match op {
        ServiceOp::PutBackend(key, backend) => {
            backends.insert(*key, *backend);
        }
        ServiceOp::PutService(key, entry) => {
            services.insert(*key, *entry);
        }
        ServiceOp::DeleteService(key) => {
            services.remove(key);
        }
        ServiceOp::DeleteBackend(key) => {
            backends.remove(key);
        }
        ServiceOp::ClearAffinity(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycni_common::service::{PROTO_TCP, PROTO_UDP};

    fn frontend(last: u8, port: u16, protocol: u8) -> ServiceKey {
        ServiceKey {
            address: [10, 96, 0, last],
            port,
            protocol,
            scope: 0,
        }
    }

    fn backend(last: u8) -> Backend {
        Backend {
            address: [10, 244, 1, last],
            port: 8080,
            pad: 0,
        }
    }

    fn entry(service_id: u32) -> ServiceEntry {
        ServiceEntry {
            service_id,
            backend_count: 0,
            affinity_timeout_s: 0,
            flags: 0,
        }
    }

    /// Runs the plan on copies of the maps, checking after every write that each frontend's
    /// count covers only filled slots (what a racing connection relies on).
    fn run(
        services: &mut BTreeMap<ServiceKey, ServiceEntry>,
        backends: &mut BTreeMap<BackendKey, Backend>,
        desired: &DesiredServices,
    ) -> Vec<ServiceOp> {
        let ops = plan(services, backends, desired).expect("a valid desired state");
        for op in &ops {
            apply_to(services, backends, op);
            for (key, entry) in services.iter() {
                for slot in 0..entry.backend_count {
                    assert!(
                        backends.contains_key(&BackendKey {
                            service_id: entry.service_id,
                            slot
                        }),
                        "after {op:?}, {key:?} counts slot {slot}, which is empty"
                    );
                }
            }
        }
        ops
    }

    fn expected_state(
        desired: &DesiredServices,
    ) -> (
        BTreeMap<ServiceKey, ServiceEntry>,
        BTreeMap<BackendKey, Backend>,
    ) {
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        for (key, (entry, list)) in desired {
            let mut list = list.clone();
            list.sort();
            list.dedup();
            services.insert(
                *key,
                ServiceEntry {
                    backend_count: list.len() as u32,
                    ..*entry
                },
            );
            for (slot, b) in list.into_iter().enumerate() {
                backends.insert(
                    BackendKey {
                        service_id: entry.service_id,
                        slot: slot as u32,
                    },
                    b,
                );
            }
        }
        (services, backends)
    }

    #[test]
    fn a_new_frontend_gets_its_slots_before_its_entry() {
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let desired: DesiredServices = [(
            frontend(1, 80, PROTO_TCP),
            (entry(7), vec![backend(2), backend(1)]),
        )]
        .into();
        let ops = run(&mut services, &mut backends, &desired);
        assert!(matches!(ops.last(), Some(ServiceOp::PutService(_, e)) if e.backend_count == 2));
        assert_eq!((services, backends), expected_state(&desired));
    }

    #[test]
    fn growing_writes_slots_then_count_and_shrinking_count_then_slots() {
        let key = frontend(1, 80, PROTO_TCP);
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let two: DesiredServices = [(key, (entry(7), vec![backend(1), backend(2)]))].into();
        run(&mut services, &mut backends, &two);

        let four: DesiredServices = [(
            key,
            (
                entry(7),
                vec![backend(1), backend(2), backend(3), backend(4)],
            ),
        )]
        .into();
        let ops = run(&mut services, &mut backends, &four);
        assert_eq!(
            ops.iter()
                .position(|op| matches!(op, ServiceOp::PutService(..))),
            Some(2),
            "two slots, then the count: {ops:?}"
        );
        assert_eq!((services.clone(), backends.clone()), expected_state(&four));

        let one: DesiredServices = [(key, (entry(7), vec![backend(4)]))].into();
        let ops = run(&mut services, &mut backends, &one);
        assert!(
            matches!(ops[0], ServiceOp::PutService(_, e) if e.backend_count == 1),
            "{ops:?}"
        );
        assert_eq!((services, backends), expected_state(&one));
    }

    #[test]
    fn a_removed_frontend_goes_before_its_slots_and_its_affinity() {
        let key = frontend(1, 53, PROTO_UDP);
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let desired: DesiredServices = [(key, (entry(3), vec![backend(1), backend(2)]))].into();
        run(&mut services, &mut backends, &desired);
        let ops = run(&mut services, &mut backends, &BTreeMap::new());
        assert_eq!(ops[0], ServiceOp::DeleteService(key));
        assert_eq!(ops.last(), Some(&ServiceOp::ClearAffinity(3)));
        assert!(services.is_empty() && backends.is_empty());
    }

    #[test]
    fn a_changed_backend_set_clears_affinity_and_an_unchanged_one_writes_nothing() {
        let key = frontend(1, 80, PROTO_TCP);
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let desired: DesiredServices = [(key, (entry(5), vec![backend(1), backend(2)]))].into();
        let first = run(&mut services, &mut backends, &desired);
        assert!(
            !first.contains(&ServiceOp::ClearAffinity(5)),
            "nothing to clear yet"
        );
        // Same set in another order: no write at all.
        let reordered: DesiredServices = [(key, (entry(5), vec![backend(2), backend(1)]))].into();
        assert_eq!(run(&mut services, &mut backends, &reordered), vec![]);
        let replaced: DesiredServices = [(key, (entry(5), vec![backend(1), backend(3)]))].into();
        let ops = run(&mut services, &mut backends, &replaced);
        assert_eq!(ops.last(), Some(&ServiceOp::ClearAffinity(5)));
        assert_eq!((services, backends), expected_state(&replaced));
    }

    #[test]
    fn no_backend_keeps_the_frontend_with_a_zero_count() {
        let key = frontend(1, 80, PROTO_TCP);
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        run(
            &mut services,
            &mut backends,
            &[(key, (entry(1), vec![backend(1)]))].into(),
        );
        let none: DesiredServices = [(key, (entry(1), vec![]))].into();
        let ops = run(&mut services, &mut backends, &none);
        assert!(matches!(ops[0], ServiceOp::PutService(_, e) if e.backend_count == 0));
        assert_eq!(services[&key].backend_count, 0);
        assert!(backends.is_empty());
    }

    #[test]
    fn frontends_sharing_an_id_share_slots_and_must_agree() {
        let cluster_ip = frontend(1, 80, PROTO_TCP);
        let node_port = ServiceKey {
            address: [192, 168, 1, 10],
            port: 30080,
            protocol: PROTO_TCP,
            scope: 0,
        };
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let shared: DesiredServices = [
            (cluster_ip, (entry(9), vec![backend(1), backend(2)])),
            (node_port, (entry(9), vec![backend(2), backend(1)])),
        ]
        .into();
        run(&mut services, &mut backends, &shared);
        assert_eq!(backends.len(), 2, "one set of slots for both frontends");
        // Dropping one frontend keeps the slots the other still counts.
        let one: DesiredServices = [(cluster_ip, (entry(9), vec![backend(1), backend(2)]))].into();
        run(&mut services, &mut backends, &one);
        assert_eq!((services.clone(), backends.clone()), expected_state(&one));

        let conflicting: DesiredServices = [
            (cluster_ip, (entry(9), vec![backend(1)])),
            (node_port, (entry(9), vec![backend(2)])),
        ]
        .into();
        assert!(matches!(
            plan(&services, &backends, &conflicting),
            Err(PlanError::ConflictingBackends { service_id: 9, .. })
        ));
    }

    #[test]
    fn a_frontend_moving_to_another_id_frees_the_old_slots() {
        let key = frontend(1, 80, PROTO_TCP);
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        run(
            &mut services,
            &mut backends,
            &[(key, (entry(1), vec![backend(1)]))].into(),
        );
        let moved: DesiredServices = [(key, (entry(2), vec![backend(1), backend(2)]))].into();
        let ops = run(&mut services, &mut backends, &moved);
        assert!(ops.contains(&ServiceOp::ClearAffinity(1)));
        assert_eq!((services, backends), expected_state(&moved));
    }

    #[test]
    fn duplicate_backends_take_one_slot() {
        let key = frontend(1, 80, PROTO_TCP);
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        run(
            &mut services,
            &mut backends,
            &[(key, (entry(1), vec![backend(1), backend(1), backend(2)]))].into(),
        );
        assert_eq!(services[&key].backend_count, 2);
    }
}
