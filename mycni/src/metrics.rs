//! Prometheus metrics and the health check: `/metrics` from the pinned maps and the
//! counters the agent keeps ([`AgentCounters`]), `/healthz` from the pins. Rendering is a
//! pure function of a [`Snapshot`]; the server and the map reads are the I/O around it.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mycni_common::{
    verdict, Counter, ROUTE_LOCAL_CIDR, ROUTE_LOCAL_ENDPOINT, ROUTE_REMOTE_NODE,
    ROUTE_REMOTE_TUNNEL,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::datapath::{self, Maps, NatTable};
use crate::nat::{self, NatOccupancy};
use crate::policy_sync::SharedPolicyReport;

/// `ROUTES` entries by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteCounts {
    /// One /32 per pod on this node.
    pub local: u64,
    pub direct: u64,
    pub vxlan: u64,
    /// This node's own pod CIDR (0 until the agent knows it).
    pub own_cidr: u64,
}

/// What `/metrics` reports, gathered from the pinned maps.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub counters: Vec<Counter>,
    pub nat: NatOccupancy,
    pub nat_capacity: u32,
    pub endpoints: usize,
    pub routes: RouteCounts,
    pub node_source_errors: u64,
    pub garbage_collected: u64,
    pub peer_errors: u64,
    pub peers_unapplied: u64,
    /// What the Services control plane last wrote, when it runs (`--service-mode ebpf`
    /// with the Kubernetes API).
    pub services: Option<ServiceCounts>,
    pub service_sync_errors: u64,
    pub policy_sync_errors: u64,
    /// Sockets ended because their backend left the frontend they connected through.
    pub service_sockets_destroyed: u64,
    pub service_socket_termination_failures: u64,
}

/// Frontends in `SERVICES` and backend slots in `BACKENDS` the agent last wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounts {
    pub frontends: u64,
    pub backends: u64,
}

/// Reads the maps for `/metrics`. The NAT figures are the ones the expiry thread last
/// published (walking a full NAT table per scrape would cost a second); without an expiry
/// thread (no `--node-ip`) the table is walked here.
pub fn snapshot(
    root: &Path,
    counters: &AgentCounters,
) -> Result<Snapshot, datapath::DatapathError> {
    let maps = Maps::open(root)?;
    let endpoints = maps.endpoints()?.len();
    // The agent's own count of what it applied, when it runs: a walk of an LPM trie costs
    // a full descent per key, tens of milliseconds at 5,000 nodes. Each endpoint has one
    // local /32 route.
    let routes = match counters.routes() {
        Some(applied) => RouteCounts {
            local: endpoints as u64,
            ..applied
        },
        None => {
            let mut routes = RouteCounts::default();
            for (_, _, route) in maps.routes()? {
                match route.kind {
                    ROUTE_LOCAL_ENDPOINT => routes.local += 1,
                    ROUTE_REMOTE_NODE => routes.direct += 1,
                    ROUTE_REMOTE_TUNNEL => routes.vxlan += 1,
                    ROUTE_LOCAL_CIDR => routes.own_cidr += 1,
                    _ => {}
                }
            }
            routes
        }
    };
    Ok(Snapshot {
        counters: datapath::read_stats(root)?,
        nat: match counters.nat() {
            Some(occupancy) => occupancy,
            None => nat::occupancy(&NatTable::open(root)?.entries()?),
        },
        nat_capacity: mycni_common::MAX_NAT,
        endpoints,
        routes,
        node_source_errors: counters.node_source_errors.load(Ordering::Relaxed),
        garbage_collected: counters.garbage_collected.load(Ordering::Relaxed),
        peer_errors: counters.peer_errors.load(Ordering::Relaxed),
        peers_unapplied: counters.peers_unapplied.load(Ordering::Relaxed),
        services: counters.services(),
        service_sync_errors: counters.service_sync_errors.load(Ordering::Relaxed),
        policy_sync_errors: counters.policy_sync_errors.load(Ordering::Relaxed),
        service_sockets_destroyed: counters.service_sockets_destroyed.load(Ordering::Relaxed),
        service_socket_termination_failures: counters
            .service_socket_termination_failures
            .load(Ordering::Relaxed),
    })
}

/// The Prometheus text exposition of a snapshot.
pub fn render_metrics(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_verdict = |f: fn(&Counter) -> u64| -> Vec<(String, String)> {
        s.counters
            .iter()
            .zip(verdict::NAMES)
            .map(|(c, name)| (format!("{{verdict=\"{name}\"}}"), f(c).to_string()))
            .collect()
    };
    family(
        "mycni_packets_total",
        "counter",
        "Packets by datapath verdict (drop_* are drops by reason).",
        &per_verdict(|c| c.packets),
    );
    family(
        "mycni_bytes_total",
        "counter",
        "Bytes by datapath verdict.",
        &per_verdict(|c| c.bytes),
    );
    let nat = [("tcp", s.nat.tcp), ("udp", s.nat.udp), ("icmp", s.nat.icmp)]
        .map(|(p, n)| (format!("{{proto=\"{p}\"}}"), n.to_string()));
    family(
        "mycni_nat_flows",
        "gauge",
        "Masqueraded flows in the NAT table.",
        &nat,
    );
    let tcp_states: Vec<(String, String)> = nat::TCP_STATE_NAMES
        .iter()
        .zip(s.nat.tcp_states)
        .map(|(state, n)| (format!("{{state=\"{state}\"}}"), n.to_string()))
        .collect();
    family(
        "mycni_nat_tcp_flows",
        "gauge",
        "Masqueraded TCP flows by connection state.",
        &tcp_states,
    );
    family(
        "mycni_nat_entries",
        "gauge",
        "NAT table entries (both directions).",
        &[(String::new(), s.nat.entries.to_string())],
    );
    family(
        "mycni_nat_capacity",
        "gauge",
        "NAT table capacity.",
        &[(String::new(), s.nat_capacity.to_string())],
    );
    let failures = s
        .counters
        .get(verdict::DROP_NAT_EXHAUSTED as usize)
        .map(|c| c.packets)
        .unwrap_or(0);
    family(
        "mycni_nat_allocation_failures_total",
        "counter",
        "Packets dropped for want of a free SNAT port (new TCP connections get a RST).",
        &[(String::new(), failures.to_string())],
    );
    family(
        "mycni_endpoints",
        "gauge",
        "Pods on this node in ENDPOINTS.",
        &[(String::new(), s.endpoints.to_string())],
    );
    let routes = [
        ("local", s.routes.local),
        ("direct", s.routes.direct),
        ("vxlan", s.routes.vxlan),
        ("own-cidr", s.routes.own_cidr),
    ]
    .map(|(k, n)| (format!("{{kind=\"{k}\"}}"), n.to_string()));
    family("mycni_routes", "gauge", "ROUTES entries by kind.", &routes);
    family(
        "mycni_node_source_errors_total",
        "counter",
        "Failed reads of the node source.",
        &[(String::new(), s.node_source_errors.to_string())],
    );
    family(
        "mycni_peer_errors_total",
        "counter",
        "Failed attempts to apply or remove a peer node's routes (each is retried with backoff).",
        &[(String::new(), s.peer_errors.to_string())],
    );
    family(
        "mycni_peers_unapplied",
        "gauge",
        "Peer nodes whose routes are not applied yet (failing, waiting for a retry).",
        &[(String::new(), s.peers_unapplied.to_string())],
    );
    if let Some(services) = s.services {
        family(
            "mycni_service_frontends",
            "gauge",
            "Service frontends in SERVICES (ClusterIP, externalIP, NodePort per port).",
            &[(String::new(), services.frontends.to_string())],
        );
        family(
            "mycni_service_backends",
            "gauge",
            "Backend slots in BACKENDS, over every frontend.",
            &[(String::new(), services.backends.to_string())],
        );
        family(
            "mycni_service_sync_errors_total",
            "counter",
            "Failed writes of the Services maps (each is retried).",
            &[(String::new(), s.service_sync_errors.to_string())],
        );
        family(
            "mycni_service_sockets_destroyed_total",
            "counter",
            "Sockets ended because their backend left the Service frontend they connected through.",
            &[(String::new(), s.service_sockets_destroyed.to_string())],
        );
        family(
            "mycni_service_socket_termination_failures_total",
            "counter",
            "Network namespaces or sockets the socket termination could not handle (logged).",
            &[(
                String::new(),
                s.service_socket_termination_failures.to_string(),
            )],
        );
    }
    family(
        "mycni_policy_sync_errors_total",
        "counter",
        "Failed writes of the NetworkPolicy maps or the plugin's namespaces file (each is retried; a full map leaves the rows that did not fit denied).",
        &[(String::new(), s.policy_sync_errors.to_string())],
    );
    family(
        "mycni_garbage_collected_total",
        "counter",
        "Allocations and endpoints freed after their pod vanished.",
        &[(String::new(), s.garbage_collected.to_string())],
    );
    out
}

/// Counters the agent keeps itself (the rest comes from the maps).
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub node_source_errors: AtomicU64,
    pub garbage_collected: AtomicU64,
    pub peer_errors: AtomicU64,
    pub peers_unapplied: AtomicU64,
    pub service_sync_errors: AtomicU64,
    pub policy_sync_errors: AtomicU64,
    pub service_sockets_destroyed: AtomicU64,
    pub service_socket_termination_failures: AtomicU64,
    /// What the Services control plane last wrote; `services_published` once it did.
    services_published: AtomicBool,
    service_frontends: AtomicU64,
    service_backends: AtomicU64,
    /// NAT occupancy as the expiry thread last counted it; `nat_published` once it did.
    nat_published: AtomicBool,
    nat_tcp: AtomicU64,
    nat_udp: AtomicU64,
    nat_icmp: AtomicU64,
    nat_entries: AtomicU64,
    nat_tcp_states: [AtomicU64; 5],
    /// Routes the agent applied (remote ones by path, its own pod CIDR);
    /// `routes_published` once it did.
    routes_published: AtomicBool,
    routes_direct: AtomicU64,
    routes_tunnel: AtomicU64,
    routes_own_cidr: AtomicU64,
}

impl AgentCounters {
    pub fn publish_nat(&self, occupancy: &NatOccupancy) {
        self.nat_tcp.store(occupancy.tcp as u64, Ordering::Relaxed);
        self.nat_udp.store(occupancy.udp as u64, Ordering::Relaxed);
        self.nat_icmp
            .store(occupancy.icmp as u64, Ordering::Relaxed);
        self.nat_entries
            .store(occupancy.entries as u64, Ordering::Relaxed);
        for (slot, count) in self.nat_tcp_states.iter().zip(occupancy.tcp_states) {
            slot.store(count as u64, Ordering::Relaxed);
        }
        self.nat_published.store(true, Ordering::Release);
    }

    pub fn publish_routes(&self, direct: usize, tunnel: usize, own_cidr: bool) {
        self.routes_direct.store(direct as u64, Ordering::Relaxed);
        self.routes_tunnel.store(tunnel as u64, Ordering::Relaxed);
        self.routes_own_cidr
            .store(u64::from(own_cidr), Ordering::Relaxed);
        self.routes_published.store(true, Ordering::Release);
    }

    pub fn publish_services(&self, frontends: usize, backends: usize) {
        self.service_frontends
            .store(frontends as u64, Ordering::Relaxed);
        self.service_backends
            .store(backends as u64, Ordering::Relaxed);
        self.services_published.store(true, Ordering::Release);
    }

    /// What the Services control plane last wrote, if it runs and wrote once.
    pub fn services(&self) -> Option<ServiceCounts> {
        if !self.services_published.load(Ordering::Acquire) {
            return None;
        }
        Some(ServiceCounts {
            frontends: self.service_frontends.load(Ordering::Relaxed),
            backends: self.service_backends.load(Ordering::Relaxed),
        })
    }

    /// The routes the agent last applied (`local` is the caller's: one per endpoint).
    pub fn routes(&self) -> Option<RouteCounts> {
        if !self.routes_published.load(Ordering::Acquire) {
            return None;
        }
        Some(RouteCounts {
            local: 0,
            direct: self.routes_direct.load(Ordering::Relaxed),
            vxlan: self.routes_tunnel.load(Ordering::Relaxed),
            own_cidr: self.routes_own_cidr.load(Ordering::Relaxed),
        })
    }

    /// The last published NAT occupancy, if the expiry thread has counted once.
    pub fn nat(&self) -> Option<NatOccupancy> {
        if !self.nat_published.load(Ordering::Acquire) {
            return None;
        }
        Some(NatOccupancy {
            tcp: self.nat_tcp.load(Ordering::Relaxed) as usize,
            udp: self.nat_udp.load(Ordering::Relaxed) as usize,
            icmp: self.nat_icmp.load(Ordering::Relaxed) as usize,
            entries: self.nat_entries.load(Ordering::Relaxed) as usize,
            tcp_states: self
                .nat_tcp_states
                .each_ref()
                .map(|slot| slot.load(Ordering::Relaxed) as usize),
        })
    }
}

/// Serves `GET /metrics`, `GET /healthz` (200 while the datapath is pinned, 503 not) and
/// `GET /policy` (the last [`crate::policy::report::PolicyReport`] as JSON; 503 before the
/// first computation, 404 when the agent computes no policy).
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    root: PathBuf,
    counters: Arc<AgentCounters>,
    policy: Option<SharedPolicyReport>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let (root, counters, policy) = (root.clone(), counters.clone(), policy.clone());
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
            });
            if read.await.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                // Off the runtime's thread: walking ROUTES and ENDPOINTS of a large
                // cluster takes thousands of syscalls.
                "/metrics" => {
                    let read = tokio::task::spawn_blocking(move || snapshot(&root, &counters));
                    match read.await {
                        Ok(Ok(s)) => ("200 OK", render_metrics(&s)),
                        Ok(Err(e)) => ("503 Service Unavailable", format!("{e}\n")),
                        Err(e) => ("500 Internal Server Error", format!("{e}\n")),
                    }
                }
                "/healthz" => match datapath::check_loaded(&root) {
                    Ok(()) => ("200 OK", "ok\n".to_string()),
                    Err(e) => ("503 Service Unavailable", format!("{e}\n")),
                },
                "/policy" => policy_response(policy.as_ref()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

/// The `/policy` answer: status line and body.
fn policy_response(policy: Option<&SharedPolicyReport>) -> (&'static str, String) {
    let Some(policy) = policy else {
        return (
            "404 Not Found",
            "this agent enforces no NetworkPolicy (it needs the Kubernetes API)\n".into(),
        );
    };
    let report = policy.lock().unwrap_or_else(|p| p.into_inner());
    match report.as_ref() {
        Some(report) => ("200 OK", report.render_json()),
        None => (
            "503 Service Unavailable",
            "no policy computed yet (waiting for the first lists)\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let mut counters = vec![Counter::default(); verdict::COUNT as usize];
        counters[verdict::SNAT as usize] = Counter {
            packets: 7,
            bytes: 700,
        };
        let text = render_metrics(&Snapshot {
            counters,
            nat: NatOccupancy {
                tcp: 2,
                udp: 1,
                icmp: 0,
                entries: 6,
                tcp_states: [0, 0, 1, 0, 1],
            },
            nat_capacity: 100,
            endpoints: 3,
            routes: RouteCounts {
                local: 3,
                direct: 1,
                vxlan: 1,
                own_cidr: 1,
            },
            node_source_errors: 4,
            garbage_collected: 0,
            peer_errors: 3,
            peers_unapplied: 1,
            services: Some(ServiceCounts {
                frontends: 5,
                backends: 9,
            }),
            service_sync_errors: 2,
            policy_sync_errors: 6,
            service_sockets_destroyed: 6,
            service_socket_termination_failures: 0,
        });
        assert!(text.contains("mycni_policy_sync_errors_total 6\n"));
        assert!(text.contains("mycni_service_sockets_destroyed_total 6\n"));
        assert!(text.contains("mycni_service_frontends 5\n"));
        assert!(text.contains("mycni_service_backends 9\n"));
        assert!(text.contains("mycni_service_sync_errors_total 2\n"));
        assert!(text.contains("mycni_peer_errors_total 3\n"));
        assert!(text.contains("mycni_peers_unapplied 1\n"));
        assert!(text.contains("mycni_packets_total{verdict=\"snat\"} 7\n"));
        assert!(text.contains("mycni_bytes_total{verdict=\"snat\"} 700\n"));
        assert!(text.contains("mycni_nat_flows{proto=\"tcp\"} 2\n"));
        assert!(text.contains("mycni_nat_tcp_flows{state=\"closed\"} 1\n"));
        assert!(text.contains("mycni_routes{kind=\"vxlan\"} 1\n"));
        assert!(text.contains("mycni_routes{kind=\"own-cidr\"} 1\n"));
        assert!(text.contains("mycni_node_source_errors_total 4\n"));
        assert!(text.contains("# TYPE mycni_endpoints gauge\n"));
    }
}

#[cfg(test)]
mod service_metric_tests {
    use super::*;

    #[test]
    fn service_gauges_appear_only_once_the_control_plane_wrote() {
        let counters = AgentCounters::default();
        let without = render_metrics(&Snapshot {
            services: counters.services(),
            ..Snapshot::default()
        });
        assert!(!without.contains("mycni_service_frontends"));
        counters.publish_services(3, 7);
        let with = render_metrics(&Snapshot {
            services: counters.services(),
            ..Snapshot::default()
        });
        assert!(with.contains("# TYPE mycni_service_frontends gauge\nmycni_service_frontends 3\n"));
        assert!(with.contains("mycni_service_backends 7\n"));
    }
}
