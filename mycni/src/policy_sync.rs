//! The agent's NetworkPolicy loop, an adapter: it waits for the pod, namespace, policy and
//! node watches to report a change, recomputes the desired maps with
//! [`crate::policy::engine`], writes the difference with [`PolicyTables`] (which bumps the
//! revision the programs re-check tracked connections against), and publishes the
//! [`PolicyReport`] that `/policy` serves. It also writes, in the data dir it shares with
//! the plugin, the namespaces that have policies: the plugin starts a new pod of those
//! fail-closed ([`crate::policy_endpoint`]) until this loop has resolved it.
//! It runs on a thread of its own: a computation over a large cluster's pods takes tens of
//! milliseconds and must not delay route changes or `/healthz`.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kube::client::{PolicyWatches, Watched};
use crate::kube::nodes::NodeCache;
use crate::metrics::AgentCounters;
use crate::policy::engine::{PolicyEngine, PolicyOutcome, PolicyWorld};
use crate::policy::report::PolicyReport;
use crate::policy_endpoint::{render_policy_namespaces, write_policy_namespaces};
use crate::policy_maps::PolicyTables;

/// The last report, shared with the metrics server; `None` until the first computation.
pub type SharedPolicyReport = Arc<Mutex<Option<PolicyReport>>>;

/// Changes arriving within this long of the first are computed together (a Deployment
/// rolling out changes many pods at once); well inside the 1 s the issue allows.
const COALESCE: Duration = Duration::from_millis(50);

/// A computation, with what applying it needs besides the maps.
pub struct Computed {
    outcome: PolicyOutcome,
    /// The addresses of this node's pods the watch knows: the plugin's fail-closed marker
    /// on any other address stays.
    local_pods: BTreeSet<Ipv4Addr>,
    /// The namespaces file's text.
    policy_namespaces: String,
}

pub struct PolicySync {
    root: PathBuf,
    /// Shared with the plugin (its `dataDir`): where the namespaces file goes.
    data_dir: PathBuf,
    /// The namespaces file as last written.
    written_namespaces: Option<String>,
    counters: Arc<AgentCounters>,
    /// Opened at the first apply and kept: a failed write leaves out of its record only
    /// what it could not write, so a retry against a full map costs the missing writes, not
    /// a re-read of the whole table.
    tables: Option<PolicyTables>,
    /// Whether the last apply failed: a failure that lasts is logged once at warn.
    failing: bool,
    /// A computation not applied yet (the last apply failed): retried every second.
    pending: Option<Computed>,
    watches: PolicyWatches,
    nodes: Watched<NodeCache>,
    node_name: String,
    /// This node's own addresses: the `HOST` identity.
    host_addresses: Vec<Ipv4Addr>,
    engine: PolicyEngine,
    report: SharedPolicyReport,
    /// The generation of each watch last computed from: pods, namespaces, policies, nodes.
    seen: [u64; 4],
    revision: u64,
}

impl PolicySync {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        root: PathBuf,
        data_dir: PathBuf,
        counters: Arc<AgentCounters>,
        watches: PolicyWatches,
        nodes: Watched<NodeCache>,
        node_name: String,
        host_addresses: Vec<Ipv4Addr>,
        report: SharedPolicyReport,
    ) -> PolicySync {
        PolicySync {
            root,
            data_dir,
            written_namespaces: None,
            failing: false,
            counters,
            tables: None,
            pending: None,
            watches,
            nodes,
            node_name,
            host_addresses,
            engine: PolicyEngine::default(),
            report,
            seen: [0; 4],
            revision: 0,
        }
    }

    /// Runs the loop on a thread and runtime of its own, for the life of the process.
    pub fn spawn(mut self) -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("policy".into())
            .spawn(move || runtime.block_on(async move { self.run().await }))?;
        Ok(())
    }

    async fn run(&mut self) {
        let wakeups = [
            self.watches.pods.wakeup(),
            self.watches.namespaces.wakeup(),
            self.watches.policies.wakeup(),
            self.nodes.wakeup(),
        ];
        loop {
            tokio::select! {
                _ = wakeups[0].notified() => {}
                _ = wakeups[1].notified() => {}
                _ = wakeups[2].notified() => {}
                _ = wakeups[3].notified() => {}
                // Errors and a change whose wakeup raced the last computation.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            tokio::time::sleep(COALESCE).await;
            if self.changed() {
                self.recompute();
            }
            if let Some(computed) = self.pending.take() {
                self.apply(computed);
            }
        }
    }

    /// Whether any watch changed since the last computation (moving `seen` on); logs the
    /// errors the watches met.
    fn changed(&mut self) -> bool {
        let [pods, namespaces, policies, nodes] = &mut self.seen;
        let results = [
            self.watches.pods.read_changed(pods, |_| ()),
            self.watches.namespaces.read_changed(namespaces, |_| ()),
            self.watches.policies.read_changed(policies, |_| ()),
            self.nodes.read_changed(nodes, |_| ()),
        ];
        let mut changed = false;
        for result in results {
            match result {
                Ok(news) => changed |= news.is_some(),
                Err(errors) => {
                    for error in errors {
                        log::warn!("{error}; policies stay as computed last");
                    }
                }
            }
        }
        changed
    }

    fn recompute(&mut self) {
        let started = Instant::now();
        let Some(nodes) = self.nodes.read(NodeCache::entries) else {
            return;
        };
        let remote: Vec<Ipv4Addr> = nodes
            .iter()
            .filter(|n| n.name != self.node_name)
            .map(|n| n.ip)
            .collect();
        let (engine, node_name, host) = (&mut self.engine, &self.node_name, &self.host_addresses);
        let mut local_pods = BTreeSet::new();
        let mut policy_namespaces = String::new();
        // Locked in one order (pods, namespaces, policies); each watch locks only its own.
        let outcome = self.watches.pods.read(|pods| {
            self.watches.namespaces.read(|namespaces| {
                self.watches.policies.read(|policies| {
                    let pod_sets = pods.pod_sets();
                    local_pods = pod_sets
                        .iter()
                        .flat_map(|set| set.pods.iter())
                        .filter(|pod| pod.node == *node_name)
                        .map(|pod| pod.ip)
                        .collect();
                    policy_namespaces = render_policy_namespaces(
                        policies.objects().values().map(|p| p.namespace.as_str()),
                    );
                    let world = PolicyWorld {
                        node_name,
                        host_addresses: host.clone(),
                        remote_node_addresses: remote,
                        pod_sets,
                        namespaces: namespaces
                            .objects()
                            .iter()
                            .map(|((_, name), labels)| (name.as_str(), &labels.0))
                            .collect(),
                        policies: policies.objects().values().collect(),
                    };
                    engine.compute(&world)
                })
            })
        });
        let Some(Some(Some(outcome))) = outcome else {
            return;
        };
        log::debug!(
            "policy computed in {:?}: {} pods here selected, {} rules, {} identity entries, {} identities",
            started.elapsed(),
            outcome.desired.endpoints.len(),
            outcome.desired.rules.len(),
            outcome.desired.identities.len(),
            self.engine.identity_count(),
        );
        self.pending = Some(Computed {
            outcome,
            local_pods,
            policy_namespaces,
        });
    }

    /// Writes the namespaces file and the outcome's maps; on success publishes its
    /// report, on failure counts the error and keeps the computation for the next attempt
    /// (the maps then hold every write that succeeded: with a full map, each endpoint
    /// enforces with the rows that fit, never more than its policies allow).
    fn apply(&mut self, computed: Computed) {
        if self.written_namespaces.as_ref() != Some(&computed.policy_namespaces) {
            match write_policy_namespaces(&self.data_dir, &computed.policy_namespaces) {
                Ok(()) => self.written_namespaces = Some(computed.policy_namespaces.clone()),
                Err(e) => {
                    log::warn!("cannot tell the plugin which namespaces have policies: {e}");
                    self.counters
                        .policy_sync_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let tables = match self.tables.as_mut() {
            Some(tables) => tables,
            None => match PolicyTables::open(&self.root) {
                Ok(tables) => self.tables.insert(tables),
                Err(e) => {
                    log::warn!("cannot open the policy maps: {e}; retrying");
                    self.counters
                        .policy_sync_errors
                        .fetch_add(1, Ordering::Relaxed);
                    self.pending = Some(computed);
                    return;
                }
            },
        };
        let outcome = &computed.outcome;
        match tables.apply_keeping_unresolved(&outcome.desired, &computed.local_pods) {
            Ok(diff) if diff.is_empty() => {}
            Ok(diff) => log::info!(
                "policy applied: endpoints {} set {} removed, identities {} set {} removed, rules {} set {} removed ({} pods here selected, {} rules)",
                diff.endpoints_set.len(),
                diff.endpoints_removed.len(),
                diff.identities_set.len(),
                diff.identities_removed.len(),
                diff.rules_set.len(),
                diff.rules_removed.len(),
                outcome.desired.endpoints.len(),
                outcome.desired.rules.len(),
            ),
            Err(e) => {
                let message = format!(
                    "cannot write all of the policy maps: {e}; what fits is enforced, the rest is denied; retrying every second"
                );
                if self.failing {
                    log::debug!("{message}");
                } else {
                    log::warn!("{message}");
                }
                self.failing = true;
                self.counters
                    .policy_sync_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.pending = Some(computed);
                return;
            }
        }
        if self.failing {
            log::info!("policy maps written in full again");
            self.failing = false;
        }
        self.publish(&computed.outcome);
    }

    fn publish(&mut self, outcome: &PolicyOutcome) {
        self.revision += 1;
        let report = PolicyReport::new(outcome, self.revision);
        *self
            .report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(report);
    }
}
