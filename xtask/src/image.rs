//! `cargo xtask image`: an OCI image archive holding `mycni-agent`, the `mycni` plugin and
//! the shared libraries they load, for the DaemonSet in deploy/. Built without a container
//! engine: a layer tarball, its config, manifest and index, written by hand.
//!
//! Import it with `ctr -n k8s.io images import target/image/mycni-<version>.oci.tar`
//! (containerd) or `podman load -i ...`.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use crate::{cmd, ebpf, repo_root};

/// The name deploy/mycni.yaml refers to.
pub const IMAGE_NAME: &str = "docker.io/library/mycni";

#[derive(Debug, clap::Args)]
pub struct ImageOptions {
    /// The archive to write [default: target/image/mycni-TAG.oci.tar].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Package the release binaries already built.
    #[arg(long)]
    no_build: bool,
    /// Package already-built binaries from DIR (e.g. target/debug); implies --no-build.
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Another tag than the version, e.g. the end-to-end test's upgrade target.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
}

pub fn run(options: &ImageOptions) -> Result<()> {
    let tag = &options.tag;
    let root = repo_root();
    if !options.no_build && options.bin_dir.is_none() {
        ebpf::build()?;
        build_release_binaries()?;
    }
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| root.join(format!("target/image/mycni-{tag}.oci.tar")));
    let bin_dir = options
        .bin_dir
        .clone()
        .unwrap_or_else(|| root.join("target/release"));
    let mut spec = mycni_spec(&bin_dir);
    spec.reference = format!("{IMAGE_NAME}:{tag}");
    build_image(&spec, &out)?;
    println!("image {IMAGE_NAME}:{tag}: {}", out.display());
    Ok(())
}

/// `cargo build --release -p mycni` (the plugin and the agent, embedding the eBPF object
/// already built); returns the directory they land in.
pub fn build_release_binaries() -> Result<PathBuf> {
    let root = repo_root();
    cmd::run(
        cmd::clean("cargo")
            .current_dir(&root)
            .args(["build", "--release", "-p", "mycni"]),
    )?;
    Ok(root.join("target/release"))
}

/// The mycni image of the binaries in `bin_dir`, under the name deploy/mycni.yaml uses.
pub fn mycni_spec(bin_dir: &Path) -> ImageSpec {
    ImageSpec {
        files: ["mycni-agent", "mycni"]
            .iter()
            .map(|name| {
                (
                    bin_dir.join(name),
                    PathBuf::from("/usr/local/bin").join(name),
                )
            })
            .collect(),
        links: Vec::new(),
        entrypoint: vec!["/usr/local/bin/mycni-agent".into()],
        cmd: Vec::new(),
        reference: format!("{IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION")),
    }
}

/// What goes into a one-layer image.
pub struct ImageSpec {
    /// (file on this machine, absolute path in the image); dynamic executables bring the
    /// shared libraries `ldd` names.
    pub files: Vec<(PathBuf, PathBuf)>,
    /// (absolute path in the image, symlink target).
    pub links: Vec<(PathBuf, String)>,
    pub entrypoint: Vec<String>,
    /// The default arguments (a pod's `args` replace them); empty for none.
    pub cmd: Vec<String>,
    /// `registry/name:tag`, the name containerd imports it under.
    pub reference: String,
}

/// Writes an OCI archive to `out` with one layer holding the spec's files, links, and the
/// shared libraries its dynamic executables need, at the paths the loader looks for.
pub fn build_image(spec: &ImageSpec, out: &Path) -> Result<()> {
    let reference = spec.reference.as_str();
    let work = out.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    for dir in [blobs.clone(), rootfs.join("tmp")] {
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let inside = |path: &Path| rootfs.join(path.strip_prefix("/").unwrap_or(path));
    let mut libraries = std::collections::BTreeSet::new();
    for (source, target) in &spec.files {
        let target = inside(target);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(source, &target).with_context(|| format!("copy {}", source.display()))?;
        // Debug info is most of a debug build's size and no use inside the image.
        let _ = cmd::clean("strip")
            .arg("--strip-debug")
            .arg(&target)
            .output();
        // A static executable makes ldd fail; it needs nothing more.
        let ldd = cmd::clean("ldd").arg(source).output();
        if let Ok(ldd) = ldd {
            if ldd.status.success() {
                libraries.extend(library_paths(&String::from_utf8_lossy(&ldd.stdout)));
            }
        }
    }
    for (path, target) in &spec.links {
        let link = inside(path);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink(target, &link)
            .with_context(|| format!("link {}", link.display()))?;
    }
    for library in &libraries {
        let target = inside(library);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Follows symlinks: the image gets the file itself under the name the loader asks for.
        std::fs::copy(library, &target).with_context(|| format!("copy {}", library.display()))?;
    }
    let layer = work.join("layer.tar");
    cmd::run(
        reproducible_tar()
            .arg(&layer)
            .arg("-C")
            .arg(&rootfs)
            .arg("."),
    )?;
    let (layer_digest, layer_size) = add_blob(&blobs, &std::fs::read(&layer)?)?;
    let mut config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    if !spec.cmd.is_empty() {
        config["config"]["Cmd"] = json!(spec.cmd);
    }
    let (config_digest, config_size) = add_blob(&blobs, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest, "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = add_blob(&blobs, &serde_json::to_vec(&manifest)?)?;
    let tag = reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    cmd::run(reproducible_tar().arg(out).arg("-C").arg(&layout).args([
        "oci-layout",
        "index.json",
        "blobs",
    ]))?;
    std::fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    Ok(())
}

/// `tar --create --file` with fixed owners, times and order, so the same files give the
/// same digest.
fn reproducible_tar() -> std::process::Command {
    let mut tar = cmd::clean("tar");
    tar.args([
        "--create",
        "--sort=name",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--mtime=@0",
        "--file",
    ]);
    tar
}

/// Stores `bytes` as a content-addressed blob; returns its digest and size.
fn add_blob(blobs: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let staged = blobs.join("staged");
    std::fs::write(&staged, bytes)?;
    let sum = cmd::output(cmd::clean("sha256sum").arg(&staged))?;
    let hex = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .context("sha256sum printed no digest")?
        .to_string();
    std::fs::rename(&staged, blobs.join(&hex))?;
    Ok((format!("sha256:{hex}"), bytes.len()))
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and the
/// loader's own `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
pub fn library_paths(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_files_to_copy() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f49)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f49)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f49)\n";
        assert_eq!(
            library_paths(ldd),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
