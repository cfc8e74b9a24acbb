//! The I/O side of Kubernetes: kube's client, built from a kubeconfig or the pod's service
//! account, and kube's watchers (list, then watch from the last resource version; a re-list
//! after 410 Gone; the default backoff while the API server is away), run on a thread and
//! runtime of their own so a long list never stalls the agent's loop. Each watch feeds a
//! pure [`WatchCache`] the agent reads through a mutex, woken by a [`Notify`].
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config};
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, Notify};

use super::config::context_options;
use super::nodes::{KubeNode, NodeCache};
use super::policy_objects::{NamespaceLabels, PodCache};
use super::projection::ProjectionCache;
use super::services::{EndpointsCache, ServiceCache};
use super::WatchCache;
use crate::agent::{AgentError, NodeSource};
use crate::nodes::NodeEntry;
use crate::policy::model::Policy;
use crate::service_frontends::{self, Frontends, LocalNode};

#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("--kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("API server URL {url:?}: {message}")]
    Server { url: String, message: String },
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot start the Kubernetes thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// How to reach the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiServer {
    /// A kubeconfig file's current context (or its only one).
    Kubeconfig(PathBuf),
    /// The pod's service account (token and CA, re-read as they rotate), and the API
    /// server at this URL (see [`super::config::in_cluster_server`]).
    InCluster { server: String },
}

async fn client_config(server: ApiServer) -> Result<Config, KubeClientError> {
    match server {
        ApiServer::Kubeconfig(path) => {
            let bad = |source| KubeClientError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(&path).map_err(bad)?;
            let options = context_options(&kubeconfig);
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(bad)
        }
        ApiServer::InCluster { server } => {
            // The mounted account (token, CA, namespace); the URL kube would pick (the
            // environment's, or kubernetes.default.svc here) gives way to the agent's.
            let mut config = Config::incluster_dns().map_err(KubeClientError::InCluster)?;
            config.cluster_url =
                server
                    .parse::<http::Uri>()
                    .map_err(|e| KubeClientError::Server {
                        url: server.clone(),
                        message: e.to_string(),
                    })?;
            Ok(config)
        }
    }
}

/// The thread and runtime the watches run on, and the client they share. The thread ends
/// (and every watch with it) when the last clone is dropped.
#[derive(Clone)]
pub struct KubeWatches {
    runtime: tokio::runtime::Handle,
    client: Client,
    _stop: Arc<oneshot::Sender<()>>,
}

impl KubeWatches {
    /// Builds the client (reading the kubeconfig or the service account now, so a bad one
    /// is an error at start) and the thread.
    pub fn connect(server: ApiServer) -> Result<KubeWatches, KubeClientError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(KubeClientError::Thread(e)));
                        return;
                    }
                };
                // kube's client spawns its request buffer: build it inside the runtime.
                let client = runtime.block_on(async {
                    Client::try_from(client_config(server).await?).map_err(KubeClientError::Client)
                });
                let started = client.is_ok();
                let _ = ready_tx.send(client.map(|client| (client, runtime.handle().clone())));
                if started {
                    // Runs the watches until every KubeWatches is dropped.
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                }
            })
            .map_err(KubeClientError::Thread)?;
        let (client, runtime) = ready_rx.recv().map_err(|_| {
            KubeClientError::Thread(std::io::Error::other("the Kubernetes thread ended"))
        })??;
        Ok(KubeWatches {
            runtime,
            client,
            _stop: Arc::new(stop_tx),
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Starts watching `api`'s objects into `cache`. `kind` names them in logs and errors
    /// ("node": "listing nodes: ...", "node watch resumed ...").
    pub fn watch<K, C>(&self, api: Api<K>, cache: C, kind: &'static str) -> Watched<C>
    where
        K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
        C: WatchCache<K>,
    {
        let wakeup = Arc::new(Notify::new());
        let shared = Arc::new(Mutex::new(Shared {
            cache,
            listed: false,
            generation: 0,
            errors: Vec::new(),
            wakeups: vec![wakeup.clone()],
        }));
        self.runtime.spawn(run_watch(api, shared.clone(), kind));
        Watched {
            shared,
            wakeup,
            _watches: self.clone(),
        }
    }
}

/// What a watch shares with the agent.
struct Shared<C> {
    cache: C,
    /// Set once the first list is complete.
    listed: bool,
    /// Bumped on every change the cache reports.
    generation: u64,
    errors: Vec<String>,
    /// One per reader ([`Watched::subscribe`]): a `Notify` wakes one waiter only.
    wakeups: Vec<Arc<Notify>>,
}

impl<C> Shared<C> {
    fn wake(&self) {
        for wakeup in &self.wakeups {
            wakeup.notify_one();
        }
    }
}

fn lock<C>(shared: &Mutex<Shared<C>>) -> MutexGuard<'_, Shared<C>> {
    // A panic in the watch leaves plain data behind; keep using it.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The agent's handle on one watch.
pub struct Watched<C> {
    shared: Arc<Mutex<Shared<C>>>,
    wakeup: Arc<Notify>,
    _watches: KubeWatches,
}

impl<C> Watched<C> {
    /// `read` on the cache, once the first list is complete.
    pub fn read<T>(&self, read: impl FnOnce(&C) -> T) -> Option<T> {
        let shared = lock(&self.shared);
        shared.listed.then(|| read(&shared.cache))
    }

    /// `read` on the cache when it changed since `seen` (which it moves on); errors the
    /// watch met since the last call come first.
    pub fn read_changed<T>(
        &self,
        seen: &mut u64,
        read: impl FnOnce(&C) -> T,
    ) -> Result<Option<T>, Vec<String>> {
        let mut shared = lock(&self.shared);
        if !shared.errors.is_empty() {
            return Err(std::mem::take(&mut shared.errors));
        }
        if !shared.listed || shared.generation == *seen {
            return Ok(None);
        }
        *seen = shared.generation;
        Ok(Some(read(&shared.cache)))
    }

    /// Errors the watch met since the last call.
    pub fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.shared).errors)
    }

    /// How many changes the cache has reported, once the first list is complete.
    pub fn generation(&self) -> Option<u64> {
        let shared = lock(&self.shared);
        shared.listed.then_some(shared.generation)
    }

    /// Notified on every change and error.
    pub fn wakeup(&self) -> Arc<Notify> {
        self.wakeup.clone()
    }

    /// A second reader of the same watch, with a wakeup of its own.
    pub fn subscribe(&self) -> Watched<C> {
        let wakeup = Arc::new(Notify::new());
        lock(&self.shared).wakeups.push(wakeup.clone());
        Watched {
            shared: self.shared.clone(),
            wakeup,
            _watches: self._watches.clone(),
        }
    }
}

/// "node" → "nodes", "networkpolicy" → "networkpolicies".
fn plural(kind: &str) -> String {
    match kind.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{kind}s"),
    }
}

/// Runs one watcher into its cache until the runtime stops.
async fn run_watch<K, C>(api: Api<K>, shared: Arc<Mutex<Shared<C>>>, kind: &'static str)
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    C: WatchCache<K>,
{
    let events = watcher(api, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut failures = 0u32;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                failures += 1;
                let error = match &e {
                    watcher::Error::InitialListFailed(_) => {
                        format!("listing {}: {e}", plural(kind))
                    }
                    _ => format!("watching {}: {e}", plural(kind)),
                };
                let mut shared = lock(&shared);
                // Keep the backlog bounded while nobody reads it.
                if shared.errors.len() < 16 {
                    shared.errors.push(error);
                }
                shared.wake();
                continue;
            }
        };
        let list_done = matches!(event, watcher::Event::InitDone);
        // Events that prove the watch works again after failures; a watch resumed from
        // the last resource version sends nothing until something changes.
        let proves_recovery = matches!(
            event,
            watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)
        );
        let mut guard = lock(&shared);
        let mut changed = guard.cache.apply(event);
        if list_done && !guard.listed {
            // The first list is news, even an empty one.
            guard.listed = true;
            changed = true;
        }
        if changed {
            guard.generation += 1;
            guard.wake();
        }
        let count = guard.cache.len();
        drop(guard);
        if failures > 0 && proves_recovery {
            if list_done {
                log::info!(
                    "{kind} watch resumed after {failures} failed attempts: {count} {} listed, {}",
                    plural(kind),
                    if changed {
                        "changes applied"
                    } else {
                        "no change"
                    }
                );
            } else {
                log::info!(
                    "{kind} watch resumed after {failures} failed attempts, from the last resource version"
                );
            }
            failures = 0;
        }
    }
}

/// Nodes from the API server; routes change only when a node's name, InternalIP or pod
/// CIDR does.
pub struct KubeNodeSource {
    nodes: Watched<NodeCache>,
    seen_generation: u64,
}

impl KubeNodeSource {
    pub fn start(watches: &KubeWatches) -> KubeNodeSource {
        KubeNodeSource {
            nodes: watches.watch(
                Api::<Node>::all(watches.client()),
                NodeCache::default(),
                "node",
            ),
            seen_generation: 0,
        }
    }

    /// The named node as last seen, once the first list has arrived.
    pub fn node(&self, name: &str) -> Option<KubeNode> {
        self.nodes.read(|cache| cache.get(name).cloned()).flatten()
    }

    /// Errors the watch met since the last call.
    pub fn take_errors(&self) -> Vec<String> {
        self.nodes.take_errors()
    }

    /// Another reader of the node watch (the policy engine reads the nodes' addresses).
    pub fn subscribe(&self) -> Watched<NodeCache> {
        self.nodes.subscribe()
    }
}

/// The watches the policy engine reads: every pod, namespace and NetworkPolicy of the
/// cluster (peers are cluster-wide), each projected into a [`ProjectionCache`].
pub struct PolicyWatches {
    pub pods: Watched<PodCache>,
    pub namespaces: Watched<ProjectionCache<NamespaceLabels>>,
    pub policies: Watched<ProjectionCache<Policy>>,
}

impl PolicyWatches {
    pub fn start(watches: &KubeWatches) -> PolicyWatches {
        let client = watches.client();
        PolicyWatches {
            pods: watches.watch(Api::<Pod>::all(client.clone()), PodCache::default(), "pod"),
            namespaces: watches.watch(
                Api::<Namespace>::all(client.clone()),
                ProjectionCache::default(),
                "namespace",
            ),
            policies: watches.watch(
                Api::<NetworkPolicy>::all(client),
                ProjectionCache::default(),
                "networkpolicy",
            ),
        }
    }
}

impl NodeSource for KubeNodeSource {
    fn poll(&mut self) -> Result<Option<Vec<NodeEntry>>, AgentError> {
        self.nodes
            .read_changed(&mut self.seen_generation, NodeCache::entries)
            .map_err(|errors| AgentError::NodeWatch(errors.join("; ")))
    }

    fn wakeup(&self) -> Option<Arc<Notify>> {
        Some(self.nodes.wakeup())
    }
}

/// Services and Endpoints from the API server, for the Services datapath.
pub struct KubeServiceSource {
    services: Watched<ServiceCache>,
    endpoints: Watched<EndpointsCache>,
    /// The generations of both caches the frontends were last computed from.
    seen: Option<(u64, u64)>,
}

impl KubeServiceSource {
    pub fn start(watches: &KubeWatches) -> KubeServiceSource {
        KubeServiceSource {
            services: watches.watch(
                Api::<Service>::all(watches.client()),
                ServiceCache::default(),
                "service",
            ),
            endpoints: watches.watch(
                Api::<Endpoints>::all(watches.client()),
                EndpointsCache::default(),
                // Logs say "listing endpoints", "endpoint watch resumed".
                "endpoint",
            ),
            seen: None,
        }
    }

    /// The frontends on `node`, when both first lists are complete and either cache
    /// changed since the last call (a partial picture would delete every frontend whose
    /// kind has not arrived yet).
    pub fn poll(&mut self, node: &LocalNode) -> Option<Frontends> {
        let now = (self.services.generation()?, self.endpoints.generation()?);
        if self.seen == Some(now) {
            return None;
        }
        self.seen = Some(now);
        self.services
            .read(|services| {
                self.endpoints.read(|endpoints| {
                    service_frontends::frontends(services.objects(), endpoints.objects(), node)
                })
            })
            .flatten()
    }

    /// Forgets what was computed last, so the next poll computes again (after a failed
    /// write to the maps).
    pub fn recompute(&mut self) {
        self.seen = None;
    }

    /// Errors both watches met since the last call.
    pub fn take_errors(&self) -> Vec<String> {
        let mut errors = self.services.take_errors();
        errors.extend(self.endpoints.take_errors());
        errors
    }

    /// Notified on every change and error of either watch.
    pub fn wakeups(&self) -> (Arc<Notify>, Arc<Notify>) {
        (self.services.wakeup(), self.endpoints.wakeup())
    }
}
