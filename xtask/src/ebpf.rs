//! `cargo xtask build-ebpf`: the TC programs, built with Debian's rustc (whose library
//! source rust-web-src ships, as build-std needs) and bpf-linker, in their own target dir.
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::{cmd, repo_root};

pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

pub fn object_path() -> PathBuf {
    repo_root().join("mycni-ebpf/target/bpfel-unknown-none/release/mycni")
}

pub fn bpf_linker() -> Option<PathBuf> {
    let in_cargo_home =
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin/bpf-linker"));
    let candidates = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("bpf-linker"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain(in_cargo_home)
        .find(|p| p.is_file())
}

pub fn build() -> Result<PathBuf> {
    if !PathBuf::from(DEBIAN_RUSTC).exists() {
        bail!("{DEBIAN_RUSTC} (Debian's rustc-web) is missing: run `cargo xtask setup`");
    }
    let Some(linker) = bpf_linker() else {
        bail!("bpf-linker is missing: run `cargo xtask setup`");
    };
    let crate_dir = repo_root().join("mycni-ebpf");
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = linker.parent() {
        let mut dirs: Vec<PathBuf> = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        path = std::env::join_paths(dirs)?;
    }
    cmd::run(
        cmd::clean("cargo")
            .current_dir(&crate_dir)
            .args(["build", "--release"])
            .env("RUSTC", DEBIAN_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", crate_dir.join("target"))
            .env("PATH", path),
    )?;
    Ok(object_path())
}
