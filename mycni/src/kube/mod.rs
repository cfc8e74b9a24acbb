//! Kubernetes as the source of nodes: kubeconfig and in-cluster credentials
//! ([`config`]), a small HTTP/1.1 codec ([`http`]) and the Node cache ([`nodes`]), all
//! pure; [`client`] is the TLS adapter and the watch thread.
pub mod client;
pub mod config;
pub mod http;
pub mod nodes;
