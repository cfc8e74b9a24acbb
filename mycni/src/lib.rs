//! mycni: the library behind the `mycni` CNI plugin and the `mycni-agent` node agent.
//!
//! Pure logic (no I/O, unit-tested without root): [`cni`] (config, versions, results,
//! errors), [`ipam`] (address allocation). Thin adapters around the kernel: [`netlink`]
//! (links, addresses, routes), [`datapath`] (pinned bpf maps and programs), [`ipam::store`]
//! (the on-disk allocation records), [`kube::client`] (kube-rs watches of the API server). [`plugin`]
//! drives the CNI commands with them.
//!
//! The agent: [`agent_cli`] (its command line), [`daemon`] (`mycni-agent run`, wiring the
//! rest), [`agent`] (the datapath on the node's devices, routes to the other nodes),
//! [`nodes`] and [`nat`] (their pure decisions), [`metrics`] (`/metrics`, `/healthz`),
//! [`garbage_collection`] (what a lost DEL leaves), [`conflist`] (the readiness signal),
//! [`map_tables`] (the maps printed), [`plugin_install`] (the DaemonSet's init step),
//! [`socket_lb`] (Services in eBPF mode: the map writes, the cgroup attachment, and the
//! end of sockets left connected to a removed backend),
//! [`host_ports`] (hostPorts without portmap: the plugin's `HOST_PORTS` entries),
//! [`node_addresses`] (the node's addresses, where NodePorts and wildcard hostPorts answer),
//! [`service_frontends`] (their desired contents, pure) and [`service_sync`] (the loop from
//! the Services and Endpoints watches to the maps),
//! [`policy`] (NetworkPolicy: identities and rules, pure), [`policy_maps`] (the policy maps'
//! contents diffed purely, and their writer), [`policy_sync`] (the policy loop in the agent)
//! and [`policy_client`] (`mycni-agent policy`). The binaries in `src/bin` only parse
//! arguments and call these.
pub mod agent;
pub mod agent_cli;
pub mod cni;
pub mod conflist;
pub mod daemon;
pub mod datapath;
pub mod ebpf_log;
pub mod garbage_collection;
pub mod host_ports;
pub mod ipam;
pub mod kube;
pub mod logging;
pub mod map_tables;
pub mod metrics;
pub mod nat;
pub mod netlink;
pub mod node_addresses;
pub mod nodes;
pub mod plugin;
pub mod plugin_install;
pub mod policy;
pub mod policy_client;
pub mod policy_endpoint;
pub mod policy_maps;
pub mod policy_sync;
pub mod service_frontends;
pub mod service_sync;
pub mod socket_lb;
