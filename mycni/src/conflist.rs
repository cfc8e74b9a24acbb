//! The agent's readiness signal: the CNI conflist, written into the runtime's config
//! directory once the datapath is loaded (its content comes from [`crate::cni::config::conflist`]).
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The file name: `10-` sorts it before the defaults runtimes ship.
pub const CONFLIST_NAME: &str = "10-mycni.conflist";

/// Writes the conflist beside and renames it into place: kubelet never reads half a file,
/// and finds none at all until the datapath is loaded (so the node stays NotReady).
pub fn write_conflist(conf_dir: &Path, conflist: &Value) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(conf_dir)?;
    let target = conf_dir.join(CONFLIST_NAME);
    // Not ending in .conf/.conflist: a runtime scanning the directory skips the staging file.
    let staging = conf_dir.join(format!(".{CONFLIST_NAME}.tmp"));
    let text = serde_json::to_string_pretty(conflist).map_err(std::io::Error::other)? + "\n";
    std::fs::write(&staging, text)?;
    std::fs::rename(&staging, &target)?;
    Ok(target)
}
