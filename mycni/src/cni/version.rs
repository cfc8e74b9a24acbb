//! CNI specification versions mycni speaks, and how one is chosen. Its errors become the
//! spec's code 1 (incompatible version) where they become `CniError`s.
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(text: &str) -> Result<CniVersion, VersionError> {
        CniVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == text)
            .ok_or_else(|| VersionError::Unsupported(text.to_string()))
    }

    /// Picks the newest version both sides speak from a conflist's `cniVersions` array.
    pub fn negotiate(offered: &[String]) -> Result<CniVersion, VersionError> {
        offered
            .iter()
            .filter_map(|text| CniVersion::parse(text).ok())
            .max()
            .ok_or_else(|| VersionError::NoneSupported(offered.to_vec()))
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version mycni does not speak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("incompatible CNI version {0:?}")]
    Unsupported(String),
    #[error("none of the offered CNI versions {0:?} is supported")]
    NoneSupported(Vec<String>),
}

/// The versions mycni speaks, for an error's details.
pub fn supported_list() -> String {
    CniVersion::ALL.map(CniVersion::as_str).join(", ")
}

/// The VERSION command's answer.
pub fn version_info(requested: CniVersion) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": requested.as_str(),
        "supportedVersions": CniVersion::ALL.map(CniVersion::as_str),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version() {
        for v in CniVersion::ALL {
            assert_eq!(CniVersion::parse(v.as_str()), Ok(v));
        }
    }

    #[test]
    fn rejects_unknown_versions() {
        for text in ["0.2.0", "1.2.0", "", "v1.0.0"] {
            let err = CniVersion::parse(text).unwrap_err();
            assert_eq!(err, VersionError::Unsupported(text.into()));
        }
    }

    #[test]
    fn negotiates_the_newest_common_version() {
        let offered = ["0.3.1", "0.4.0", "9.9.9", "1.0.0"].map(String::from);
        assert_eq!(CniVersion::negotiate(&offered), Ok(CniVersion::V1_0_0));
        let none = ["0.1.0", "2.0.0"].map(String::from);
        assert_eq!(
            CniVersion::negotiate(&none),
            Err(VersionError::NoneSupported(none.to_vec()))
        );
    }

    #[test]
    fn version_info_lists_all() {
        let info = version_info(CniVersion::V1_1_0);
        assert_eq!(info["supportedVersions"].as_array().map(Vec::len), Some(5));
    }
}
