//! The CNI protocol, without I/O: environment, network configuration, version negotiation,
//! results and errors, per the CNI specification 0.3.0 through 1.1.0.
pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use config::NetConf;
pub use env::{CniEnv, Command};
pub use error::{CniError, ErrorCode};
pub use result::{CniResult, Interface, IpConfig, RouteEntry};
pub use version::CniVersion;
