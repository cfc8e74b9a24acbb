//! `mycni-agent install-cni-plugin DIR`, the DaemonSet's init step: the `mycni` plugin that
//! sits beside the agent's binary, copied onto the node where the container runtime calls it.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PluginInstallError {
    #[error("cannot locate mycni-agent's own binary: {0}")]
    OwnBinary(#[source] std::io::Error),
    #[error("{what} {from} to {to}: {source}")]
    Io {
        what: &'static str,
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Copies the plugin beside this binary into `dir` under a temporary name and renames it
/// into place, so a runtime never executes a half-written file. Returns the installed path.
pub fn install_cni_plugin(dir: &Path) -> Result<PathBuf, PluginInstallError> {
    let exe = std::env::current_exe().map_err(PluginInstallError::OwnBinary)?;
    let source = exe.with_file_name("mycni");
    let staged = dir.join(".mycni.installing");
    let target = dir.join("mycni");
    let failed = |what, from: &Path, to: &Path| {
        let (from, to) = (from.to_path_buf(), to.to_path_buf());
        move |source| PluginInstallError::Io {
            what,
            from,
            to,
            source,
        }
    };
    std::fs::copy(&source, &staged).map_err(failed("copy", &source, &staged))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).map_err(failed(
        "make executable",
        &staged,
        &staged,
    ))?;
    std::fs::rename(&staged, &target).map_err(failed("rename", &staged, &target))?;
    Ok(target)
}
