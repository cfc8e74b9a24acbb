//! Services in eBPF mode: socket-level load balancing (cgroup v2 `sock_addr` programs,
//! issue 15). [`plan`] is pure (the ordered writes from one map state to another);
//! [`tables`] writes them to the pinned maps, [`cgroup`] attaches the programs.
//! [`stale_sockets`] (pure) picks the sockets a removed backend leaves connected,
//! [`sock_diag`] (pure) encodes the netlink messages that list and destroy them,
//! [`socket_termination`] sends them in every network namespace, and
//! [`socket_terminator`] does that on a thread of its own for the agent's sync loop.
//!
//! The control plane's entry point: build a [`DesiredServices`] and call
//! [`ServiceTables::apply`].
pub mod cgroup;
pub mod plan;
pub mod sock_diag;
pub mod socket_termination;
pub mod socket_terminator;
pub mod stale_sockets;
pub mod tables;

pub use plan::{DesiredServices, PlanError, ServiceOp};
pub use tables::{ApplySummary, ServiceTables, ServiceTablesError};

/// Who translates Services on this node (`mycni-agent run --service-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceMode {
    /// kube-proxy's iptables does; mycni attaches nothing (and detaches what an earlier
    /// `ebpf` run attached).
    #[default]
    KubeProxy,
    /// mycni's cgroup programs do, at the socket.
    Ebpf,
}

impl std::str::FromStr for ServiceMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "kube-proxy" => Ok(ServiceMode::KubeProxy),
            "ebpf" => Ok(ServiceMode::Ebpf),
            other => Err(format!(
                "unknown service mode {other:?} (kube-proxy or ebpf)"
            )),
        }
    }
}
