//! CNI errors: the spec's well-known codes plus mycni's own (100 and up), rendered as the
//! spec's error JSON.
use serde_json::{json, Value};

use super::version::{supported_list, CniVersion, VersionError};

/// Error codes. 1–11 and 50–51 are the spec's; 100+ are mycni's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodeFailure = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    PluginNotAvailable = 50,
    LimitedConnectivity = 51,
    /// The node's pod CIDR has no free address.
    PoolExhausted = 100,
    /// A requested static IP is outside the pool, reserved or held by another container.
    AddressUnavailable = 101,
    /// The kernel refused a link, address or route operation.
    NetlinkFailure = 102,
    /// The datapath (pinned maps and programs) refused an operation.
    DatapathFailure = 103,
    /// CHECK found the container's network different from `prevResult`.
    CheckMismatch = 104,
    /// A hostPort (hostIP, port, protocol) the container asks for is held by another pod.
    HostPortConflict = 105,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// An error to report to the runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl ToString) -> Self {
        self.details = details.to_string();
        self
    }

    /// The spec's error object, stamped with the version the runtime asked for.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let mut value = json!({
            "cniVersion": version.as_str(),
            "code": self.code.code(),
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            value["details"] = Value::String(self.details.clone());
        }
        value
    }
}

/// An unsupported version is the spec's code 1, with the versions mycni speaks.
impl From<VersionError> for CniError {
    fn from(err: VersionError) -> CniError {
        CniError::new(ErrorCode::IncompatibleVersion, err.to_string())
            .with_details(format!("supported: {}", supported_list()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_versions_are_code_1_with_the_supported_list() {
        let err = CniError::from(CniVersion::parse("0.2.0").unwrap_err());
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
        assert_eq!(err.msg, "incompatible CNI version \"0.2.0\"");
        assert_eq!(err.details, "supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0");
    }

    #[test]
    fn renders_spec_error_shape() {
        let err = CniError::new(ErrorCode::InvalidEnvironment, "CNI_COMMAND is not set")
            .with_details("env");
        let value = err.to_json(CniVersion::V1_0_0);
        assert_eq!(value["code"], 4);
        assert_eq!(value["cniVersion"], "1.0.0");
        assert_eq!(value["msg"], "CNI_COMMAND is not set");
        assert_eq!(value["details"], "env");
    }

    #[test]
    fn omits_empty_details() {
        let value =
            CniError::new(ErrorCode::PoolExhausted, "no address").to_json(CniVersion::V0_3_1);
        assert!(value.get("details").is_none());
        assert_eq!(value["code"], 100);
    }
}
