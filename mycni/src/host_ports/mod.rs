//! hostPorts without portmap (the CNI `portMappings` capability, issue 15): the plugin
//! writes each pod's hostPorts into `HOST_PORTS` at ADD and removes them at DEL; the
//! Services socket programs send node-local calls to `<hostIP>:<hostPort>` to the pod.
//! [`plan`] is pure (the entries a pod's mappings become, conflicts, CHECK's
//! differences); [`table`] is the thin adapter over the pinned map.
pub mod plan;
pub mod table;

pub use plan::{attachment_hash, HostPortEntries, HostPortError};
pub use table::{Claim, HostPortTable, HostPortTableError};
