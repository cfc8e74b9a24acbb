//! `cargo xtask setup`: installs what a fresh machine of this kind lacks, skips what is
//! there. Safe to run twice.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cmd, ebpf, repo_root};

/// Debian packages the build, the tests and the demo use.
const PACKAGES: [&str; 16] = [
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "iptables",
    "containernetworking-plugins",
    "golang-go",
    "golang-github-appc-cni-dev",
    "dpkg-dev",
    "util-linux",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    packages()?;
    bpf_linker()?;
    cnitool()?;
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("ok Debian packages (already present)");
        return Ok(());
    }
    if !cmd::is_root() {
        bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root");
    }
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    println!("installed Debian packages {missing:?}");
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if let Some(path) = ebpf::bpf_linker() {
        if cmd::works(&path.display().to_string(), &["--version"]) {
            println!("ok bpf-linker at {} (already present)", path.display());
            return Ok(());
        }
    }
    // Debian's llvm-config on PATH is LLVM 14; the prefix picks LLVM 22, which rustc-web uses.
    cmd::run(
        cmd::clean("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )?;
    println!("installed bpf-linker {BPF_LINKER_VERSION}");
    Ok(())
}

pub fn cnitool_path() -> PathBuf {
    repo_root().join("target/tools/cnitool")
}

/// The first `deb` mirror serving bookworm, from the machine's own apt sources (one-line
/// `.list` files and deb822 `.sources` files alike).
fn bookworm_mirror() -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for file in files {
        let name = file.display().to_string();
        if !(name.ends_with(".list") || name.ends_with(".sources")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if name.ends_with(".list") {
            for line in text.lines().map(str::trim) {
                let fields: Vec<&str> = line
                    .split_whitespace()
                    .filter(|f| !f.starts_with('['))
                    .collect();
                if fields.len() >= 3 && fields[0] == "deb" && fields[2] == "bookworm" {
                    return Ok(fields[1].to_string());
                }
            }
        } else {
            for stanza in text.split("\n\n") {
                let field = |key: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
                };
                let is_deb =
                    field("Types:").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
                let has_bookworm =
                    field("Suites:").is_some_and(|s| s.split_whitespace().any(|s| s == "bookworm"));
                if let (true, true, Some(uris)) = (is_deb, has_bookworm, field("URIs:")) {
                    if let Some(uri) = uris.split_whitespace().next() {
                        return Ok(uri.to_string());
                    }
                }
            }
        }
    }
    bail!("no apt source for bookworm found in /etc/apt")
}

/// cnitool from Debian's `golang-github-appc-cni` source package, built against the
/// packaged libcni in GOPATH mode. Nothing in /etc/apt changes: a private source list.
fn cnitool() -> Result<()> {
    let target = cnitool_path();
    if target.is_file() {
        println!("ok cnitool at {} (already present)", target.display());
        return Ok(());
    }
    let work = repo_root().join("target/tools/cnitool-build");
    let _ = std::fs::remove_dir_all(&work);
    let apt = work.join("apt");
    for dir in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(dir))?;
    }
    let mirror = bookworm_mirror()?;
    std::fs::write(
        apt.join("sources.list"),
        format!("deb-src {mirror} bookworm main\n"),
    )?;
    let private = |cmd: &mut Command| {
        cmd.arg("-o")
            .arg(format!(
                "Dir::Etc::SourceList={}",
                apt.join("sources.list").display()
            ))
            .arg("-o")
            .arg("Dir::Etc::SourceParts=/nonexistent")
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", apt.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", apt.join("cache").display()));
    };
    let mut update = Command::new("apt-get");
    private(&mut update);
    cmd::output(update.arg("update"))?;
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;
    let mut source = Command::new("apt-get");
    private(&mut source);
    cmd::output(source.current_dir(&src).args([
        "source",
        "--download-only",
        "golang-github-appc-cni",
    ]))?;
    let dsc = std::fs::read_dir(&src)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "dsc"))
        .context("no .dsc downloaded")?;
    let tree = src.join("tree");
    cmd::output(Command::new("dpkg-source").arg("-x").arg(&dsc).arg(&tree))?;
    // GOPATH mode: the tree stands where its import path says, libcni comes from it too.
    let gopath = work.join("gopath");
    let import_dir = gopath.join("src/github.com/containernetworking");
    std::fs::create_dir_all(&import_dir)?;
    std::os::unix::fs::symlink(&tree, import_dir.join("cni"))?;
    std::fs::create_dir_all(target.parent().unwrap_or(Path::new(".")))?;
    cmd::output(
        Command::new("go")
            .current_dir(import_dir.join("cni/cnitool"))
            .args(["build", "-o"])
            .arg(&target)
            .arg(".")
            .env("GO111MODULE", "off")
            .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
            .env("GOCACHE", work.join("gocache")),
    )?;
    let _ = std::fs::remove_dir_all(&work);
    println!("installed cnitool at {}", target.display());
    Ok(())
}
