//! Kubernetes as a source of state, through kube-rs: [`config`] (where the API server is),
//! [`nodes`] (the Node cache) and [`services`] (the Service and Endpoints caches) are pure;
//! [`client`] is the adapter that connects, runs kube's watchers with their default
//! backoff, and hands each event to a [`WatchCache`]. A new kind (Pods, NetworkPolicies) is
//! a new cache plus one `watch` call; [`projection::ProjectionCache`] serves any kind kept
//! as a projection (Services, Endpoints, Namespaces, NetworkPolicies), and
//! [`policy_objects`] holds the policy engine's projections.
pub mod client;
pub mod config;
pub mod nodes;
pub mod policy_objects;
pub mod projection;
pub mod services;

use kube::runtime::watcher::Event;

/// The agent's own picture of one kind, edited by the watcher's events: `Init`, then
/// `InitApply` for every listed object, then `InitDone` (a complete list, to be swapped in
/// whole), and `Apply`/`Delete` as objects change. Pure: no I/O, unit-tested with objects
/// built from JSON.
pub trait WatchCache<K>: Send + 'static {
    /// Applies one event; returns whether what the agent acts on changed.
    fn apply(&mut self, event: Event<K>) -> bool;

    /// How many objects the cache holds (for logs).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
