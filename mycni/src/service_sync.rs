//! The Services control loop of `mycni-agent run --service-mode ebpf` with the Kubernetes
//! API: wakes on every Service or Endpoints change, computes the frontends
//! ([`crate::service_frontends`]) and writes them to the pinned maps
//! ([`crate::socket_lb::ServiceTables`]); the sockets connected to a backend a frontend
//! lost are ended by a thread of their own ([`crate::socket_lb::socket_terminator`]).
//! Wiring only: the decisions are in those modules.
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::kube::client::KubeServiceSource;
use crate::metrics::AgentCounters;
use crate::service_frontends::{self, LocalNode, ServiceIds};
use crate::socket_lb::socket_terminator::SocketTerminator;
use crate::socket_lb::ServiceTables;

/// How long a change waits for the ones that follow it (a scale change updates the
/// Endpoints once per pod that turns ready), so a burst is one write; small against the
/// 1 s the issue allows from the API to the maps.
const COALESCE: Duration = Duration::from_millis(50);
/// How soon a failed write is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Keeps `SERVICES` and `BACKENDS` under `root` in step with the API until dropped.
pub async fn sync_services(
    root: PathBuf,
    mut source: KubeServiceSource,
    node: LocalNode,
    counters: Arc<AgentCounters>,
) {
    let mut tables = loop {
        match ServiceTables::open(&root) {
            Ok(tables) => break tables,
            Err(e) => {
                log::warn!("services: cannot open the maps: {e}; retrying");
                counters.service_sync_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    // Ending a removed backend's sockets walks every network namespace (seconds with a
    // thousand pods): a thread of its own, so the loop writes the next change meanwhile.
    let terminator = loop {
        let tally = counters.clone();
        let report = move |(destroyed, failures): (usize, usize)| {
            tally
                .service_sockets_destroyed
                .fetch_add(destroyed as u64, Ordering::Relaxed);
            tally
                .service_socket_termination_failures
                .fetch_add(failures as u64, Ordering::Relaxed);
        };
        match SocketTerminator::start(&root, report) {
            Ok(terminator) => break terminator,
            Err(e) => {
                log::warn!("services: {e}; retrying");
                counters.service_sync_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    // Ids continue from what the maps hold: a restarted agent rewrites nothing that stayed.
    let mut ids = match tables.frontends() {
        Ok(current) => ServiceIds::resume(
            current
                .iter()
                .map(|(key, (entry, _))| (*key, entry.service_id)),
        ),
        Err(e) => {
            log::warn!("services: cannot read the maps: {e}; numbering afresh");
            ServiceIds::default()
        }
    };
    let (services_changed, endpoints_changed) = source.wakeups();
    let mut failing = false;
    let mut last_conflicts = Vec::new();
    loop {
        let retry = async {
            if failing {
                tokio::time::sleep(RETRY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = services_changed.notified() => {}
            _ = endpoints_changed.notified() => {}
            _ = retry => {}
        }
        tokio::time::sleep(COALESCE).await;
        for error in source.take_errors() {
            log::warn!("services: {error}");
        }
        let Some(frontends) = source.poll(&node) else {
            continue;
        };
        if frontends.conflicts != last_conflicts {
            for (key, (namespace, name)) in &frontends.conflicts {
                log::warn!(
                    "services: {namespace}/{name} claims {}:{}/{} too; another Service has it",
                    std::net::Ipv4Addr::from(key.address),
                    key.port,
                    key.protocol
                );
            }
            last_conflicts = frontends.conflicts.clone();
        }
        let desired = ids.assign(&frontends.frontends);
        match tables.apply_leaving_sockets(&desired) {
            Ok((summary, removed)) => {
                terminator.end(removed);
                let (frontend_count, backend_count) = service_frontends::counts(&desired);
                counters.publish_services(frontend_count, backend_count);
                if summary.writes > 0 {
                    log::info!(
                        "services: {frontend_count} frontends, {backend_count} backends ({} map writes)",
                        summary.writes
                    );
                }
                failing = false;
            }
            Err(e) => {
                log::warn!("services: writing the maps failed: {e}; retrying");
                counters.service_sync_errors.fetch_add(1, Ordering::Relaxed);
                source.recompute();
                failing = true;
            }
        }
    }
}
