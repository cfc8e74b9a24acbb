//! `cargo xtask build-ebpf [--debug]`: the TC programs, built with Debian's rustc (whose
//! library source rust-web-src ships, as build-std needs) and bpf-linker, in their own
//! target dir so that switching compilers never invalidates the userspace build.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::{cmd, repo_root};

pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

fn target_dir() -> PathBuf {
    repo_root().join("mycni-ebpf/target")
}

/// Where the object of a profile lands. The release one is what `mycni`'s build script
/// embeds unless `MYCNI_EBPF_OBJECT` says otherwise.
pub fn object_path(profile: Profile) -> PathBuf {
    target_dir()
        .join("bpfel-unknown-none")
        .join(profile.dir())
        .join("mycni")
}

/// bpf-linker on PATH or in cargo's bin dir (`cargo install` puts it there, and a fresh
/// shell may not have that dir on PATH yet).
pub fn bpf_linker() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("bpf-linker"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(cargo_bin_dir().map(|dir| dir.join("bpf-linker")))
        .find(|p| p.is_file())
}

/// `$CARGO_HOME/bin`, or `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"))
}

#[derive(Debug, clap::Args)]
pub struct BuildOptions {
    /// The debug profile (mycni embeds the release object unless MYCNI_EBPF_OBJECT names
    /// another).
    #[arg(long, conflicts_with = "release")]
    debug: bool,
    /// The release profile (the default).
    #[arg(long)]
    release: bool,
}

pub fn build_and_print(options: &BuildOptions) -> Result<()> {
    let profile = if options.debug {
        Profile::Debug
    } else {
        Profile::Release
    };
    let object = build_profile(profile)?;
    println!("{}", object.display());
    if profile == Profile::Debug {
        log::info!(
            "mycni embeds the release object unless MYCNI_EBPF_OBJECT={} is set",
            object.display()
        );
    }
    Ok(())
}

/// The release build, the one the userspace crate embeds.
pub fn build() -> Result<PathBuf> {
    build_profile(Profile::Release)
}

pub fn build_profile(profile: Profile) -> Result<PathBuf> {
    check_toolchain()?;
    let Some(linker) = bpf_linker() else {
        bail!("bpf-linker is missing (not on PATH, not in ~/.cargo/bin): run `cargo xtask setup`");
    };
    let crate_dir = repo_root().join("mycni-ebpf");
    // The crate's .cargo/config.toml names the linker `bpf-linker`: put its dir first on PATH.
    let mut dirs: Vec<PathBuf> = linker.parent().map(Path::to_path_buf).into_iter().collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    let mut build = cmd::clean("cargo");
    build
        .current_dir(&crate_dir)
        .arg("build")
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", target_dir())
        .env("PATH", std::env::join_paths(dirs)?);
    if profile == Profile::Release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let object = object_path(profile);
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is not there",
            object.display()
        );
    }
    Ok(object)
}

/// Debian's rustc and the library source build-std compiles.
fn check_toolchain() -> Result<()> {
    if !Path::new(DEBIAN_RUSTC).is_file() {
        bail!("{DEBIAN_RUSTC} (Debian's rustc-web) is missing: run `cargo xtask setup`");
    }
    let out = cmd::output(std::process::Command::new(DEBIAN_RUSTC).args(["--print", "sysroot"]))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let library = sysroot.join("lib/rustlib/src/rust/library");
    if !library.is_dir() {
        bail!(
            "{} is missing (Debian's rust-web-src; build-std needs it): run `cargo xtask setup`",
            library.display()
        );
    }
    Ok(())
}
