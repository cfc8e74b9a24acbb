//! mycni: the library behind the `mycni` CNI plugin and the `mycni-agent` node agent.
//!
//! Pure logic (no I/O, unit-tested without root): [`cni`] (config, versions, results,
//! errors), [`ipam`] (address allocation). Thin adapters around the kernel: [`netlink`]
//! (links, addresses, routes), [`datapath`] (pinned bpf maps and programs), [`ipam::store`]
//! (the on-disk allocation records), [`kube::client`] (the API server over TLS). [`plugin`] drives the CNI commands with them.
pub mod agent;
pub mod agent_cli;
pub mod cni;
pub mod datapath;
pub mod ebpf_log;
pub mod ipam;
pub mod kube;
pub mod nat;
pub mod netlink;
pub mod nodes;
pub mod plugin;
pub mod upkeep;
