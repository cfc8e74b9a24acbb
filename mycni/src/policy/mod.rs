//! NetworkPolicy (issue 14), the control-plane side, pure: [`model`] (pods, namespaces and
//! policies as the engine reads them), [`identity`] (numeric identities per label set),
//! [`engine`] (the desired `POLICY_*` map contents on this node) and [`report`] (what
//! `mycni-agent policy` prints). The watches that feed it are in [`crate::kube`]; the
//! datapath writes the maps.
pub mod engine;
pub mod identity;
pub mod model;
pub mod report;
