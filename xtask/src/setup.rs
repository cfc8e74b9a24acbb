//! `cargo xtask setup`: installs what a fresh Debian bookworm machine of this kind lacks and
//! skips what is there. Safe to run twice; non-interactive (CI runs it as root, no stdin).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cmd, ebpf, repo_root};

/// Debian packages the build, the tests and the demo use.
const PACKAGES: &[&str] = &[
    // Debian's compiler with its library source (build-std) and the LLVM it uses.
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Inspection and the simulated clusters.
    "bpftool",
    "iproute2",
    "iputils-ping",
    "iptables",
    "socat",
    "util-linux",
    // Real CNI clients: the reference plugins, and what cnitool is built from.
    "containernetworking-plugins",
    "golang-go",
    "golang-github-appc-cni-dev",
    "dpkg-dev",
    // The Kubernetes lab (cargo xtask k8s): building from source, and the node and control
    // plane daemons Debian packages.
    "rsync",
    "openssl",
    "etcd-server",
    "containerd",
    "runc",
    "busybox-static",
    // kube-proxy clears stale UDP conntrack entries with it (kubeadm requires it too).
    "conntrack",
    // What the conformance specs exec in the agnhost image (cargo xtask k8s copies them in).
    "curl",
    "netcat-openbsd",
    "wget",
    // dig, nslookup and host for the DNS specs' probes (agnhost and jessie-dnsutils images).
    "bind9-dnsutils",
    // reflect2 1.0.2, patched into the Kubernetes source (see kubelab.rs).
    "golang-github-modern-go-reflect2-dev",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's llvm-config on PATH is LLVM 14; rustc-web uses LLVM 22.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const CNI_SOURCE_PACKAGE: &str = "golang-github-appc-cni";
const SUITE: &str = "bookworm";

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
        .is_ok_and(|out| {
            // "install ok installed", "hold ok installed"; not "deinstall ok config-files".
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .nth(2)
                    == Some("installed")
        })
}

/// apt-get with its own source list, lists and cache under `apt_dir`: /etc/apt and the
/// machine's package lists stay as they are.
pub(crate) fn private_apt_get(apt_dir: &Path, source_list: &Path) -> Command {
    let mut cmd = apt_get();
    cmd.arg("-o")
        .arg(format!("Dir::Etc::SourceList={}", source_list.display()))
        .args(["-o", "Dir::Etc::SourceParts=/nonexistent"])
        .arg("-o")
        .arg(format!(
            "Dir::State::Lists={}",
            apt_dir.join("lists").display()
        ))
        .arg("-o")
        .arg(format!("Dir::Cache={}", apt_dir.join("cache").display()));
    cmd
}

pub(crate) fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null());
    cmd
}

fn packages() -> Result<()> {
    let mut missing = Vec::new();
    for &package in PACKAGES {
        if installed(package) {
            log::info!("ok package {package} (already present)");
        } else {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "missing Debian packages: {}; run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    cmd::run(apt_get().arg("update"))?;
    cmd::run(
        apt_get()
            .args(["install", "-y", "-o", "Dpkg::Options::=--force-confold"])
            .args(&missing),
    )?;
    for package in missing {
        if !installed(package) {
            bail!("apt-get install finished but {package} is still not installed");
        }
        log::info!("installed package {package}");
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if let Some(path) = ebpf::bpf_linker() {
        if cmd::works(&path, &["--version"]) {
            log::info!("ok bpf-linker {} (already present)", path.display());
            return Ok(());
        }
    }
    let llvm_config = Path::new(LLVM_PREFIX).join("bin/llvm-config");
    if !llvm_config.is_file() {
        bail!(
            "{} is missing (package llvm-22-dev): cannot build bpf-linker",
            llvm_config.display()
        );
    }
    // rustup's stable toolchain, as in TOOLCHAIN.md; `cargo` on PATH may be Debian's, and
    // the proxy is what understands `+stable`.
    let rustup_cargo = ebpf::cargo_bin_dir()
        .filter(|dir| dir.join("rustup").is_file() && dir.join("cargo").is_file())
        .map(|dir| dir.join("cargo"));
    let mut install = match &rustup_cargo {
        Some(cargo) => {
            let mut c = cmd::clean(cargo);
            c.arg("+stable");
            c
        }
        None => cmd::clean("cargo"),
    };
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .stdin(std::process::Stdio::null());
    log::info!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    cmd::run(&mut install)?;
    let Some(path) = ebpf::bpf_linker().filter(|p| cmd::works(p, &["--version"])) else {
        bail!("cargo install bpf-linker finished but no working bpf-linker is on PATH or in ~/.cargo/bin");
    };
    log::info!(
        "installed bpf-linker {BPF_LINKER_VERSION} {}",
        path.display()
    );
    Ok(())
}

pub fn cnitool_path() -> PathBuf {
    repo_root().join("target/tools/cnitool")
}

/// cnitool with no arguments prints its usage (and exits 1).
fn cnitool_runs(path: &Path) -> bool {
    Command::new(path).output().is_ok_and(|out| {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        text.contains("cnitool add")
    })
}

/// cnitool from Debian's `golang-github-appc-cni` source package, built in GOPATH mode
/// against the packaged libcni (golang-github-appc-cni-dev, /usr/share/gocode). Nothing
/// under /etc/apt changes: the `deb-src` line lives in a private apt dir.
fn cnitool() -> Result<()> {
    let target = cnitool_path();
    if target.is_file() && cnitool_runs(&target) {
        log::info!("ok cnitool {} (already present)", target.display());
        return Ok(());
    }
    let tools = repo_root().join("target/tools");
    let apt_dir = tools.join("apt");
    let source = apt_source(SUITE)?;
    log::info!(
        "building cnitool from Debian's {CNI_SOURCE_PACKAGE} source ({}, private apt dir {})",
        source.uri,
        apt_dir.display()
    );

    // A private apt: its own source list, lists and cache; /etc/apt stays as it is.
    for dir in ["lists", "cache"] {
        let _ = std::fs::remove_dir_all(apt_dir.join(dir));
    }
    for dir in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt_dir.join(dir))
            .with_context(|| format!("create {}", apt_dir.join(dir).display()))?;
    }
    let source_list = apt_dir.join("sources.list");
    std::fs::write(&source_list, source.deb_src_line(SUITE))
        .with_context(|| format!("write {}", source_list.display()))?;
    let private_apt = || private_apt_get(&apt_dir, &source_list);
    cmd::output(private_apt().arg("update"))?;

    let work = tools.join("cnitool-build");
    let _ = std::fs::remove_dir_all(&work);
    let download = work.join("download");
    std::fs::create_dir_all(&download)?;
    cmd::output(private_apt().current_dir(&download).args([
        "source",
        "--download-only",
        CNI_SOURCE_PACKAGE,
    ]))?;
    let dsc = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "dsc"))
        .with_context(|| format!("apt-get source left no .dsc in {}", download.display()))?;
    let tree = work.join("tree");
    cmd::output(Command::new("dpkg-source").arg("-x").arg(&dsc).arg(&tree))?;

    // cnitool.go imports "github.com/containernetworking/cni/libcni". In GOPATH mode the
    // package dir must sit at <gopath>/src/<import path>: put cnitool there alone, so libcni
    // (and the pkg/ it uses) resolve from the second GOPATH entry, Debian's /usr/share/gocode.
    let main_go = tree.join("cnitool/cnitool.go");
    let text =
        std::fs::read_to_string(&main_go).with_context(|| format!("read {}", main_go.display()))?;
    if !text.contains("\"github.com/containernetworking/cni/libcni\"") {
        bail!(
            "{} does not import github.com/containernetworking/cni/libcni; the build layout needs a look",
            main_go.display()
        );
    }
    let gopath = work.join("gopath");
    let package_dir = gopath.join("src/github.com/containernetworking/cni/cnitool");
    std::fs::create_dir_all(&package_dir)?;
    std::fs::copy(&main_go, package_dir.join("cnitool.go"))?;
    std::fs::create_dir_all(&tools)?;
    cmd::output(
        cmd::clean("go")
            .current_dir(&package_dir)
            .args(["build", "-o"])
            .arg(&target)
            .arg(".")
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
            .env("GOCACHE", work.join("gocache")),
    )?;
    if !cnitool_runs(&target) {
        bail!(
            "{} was built but does not print its usage when run",
            target.display()
        );
    }
    // The source lists are ~20 MB; the sources.list stays for inspection.
    let _ = std::fs::remove_dir_all(&work);
    for dir in ["lists", "cache"] {
        let _ = std::fs::remove_dir_all(apt_dir.join(dir));
    }
    log::info!("installed cnitool {}", target.display());
    Ok(())
}

/// A `deb` source of the machine's: its URI and the key it is signed with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AptSource {
    uri: String,
    signed_by: Option<String>,
}

impl AptSource {
    pub(crate) fn deb_src_line(&self, suite: &str) -> String {
        match &self.signed_by {
            Some(key) => format!("deb-src [signed-by={key}] {} {suite} main\n", self.uri),
            None => format!("deb-src {} {suite} main\n", self.uri),
        }
    }
}

/// The first enabled `deb` source for bookworm in the machine's apt configuration
/// (one-line `.list` files and deb822 `.sources` files alike).
pub(crate) fn apt_source(suite: &str) -> Result<AptSource> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".list") {
            one_line_source(&text, suite)
        } else if name.ends_with(".sources") {
            deb822_source(&text, suite)
        } else {
            None
        };
        if let Some(source) = found {
            return Ok(source);
        }
    }
    bail!(
        "no enabled `deb` source for {suite} in /etc/apt/sources.list or /etc/apt/sources.list.d/*.{{list,sources}}: \
         cannot tell which mirror serves the {CNI_SOURCE_PACKAGE} source package"
    )
}

fn usable_uri(uri: &str) -> bool {
    !uri.starts_with("cdrom:")
}

/// `deb [opt=value ...] URI SUITE COMPONENT...` lines.
fn one_line_source(text: &str, suite: &str) -> Option<AptSource> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb") else {
            continue;
        };
        if !rest.starts_with([' ', '\t']) {
            continue; // deb-src
        }
        let rest = rest.trim_start();
        let (options, rest) = match rest.strip_prefix('[') {
            Some(inner) => {
                let end = inner.find(']')?;
                (&inner[..end], &inner[end + 1..])
            }
            None => ("", rest),
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 2 || fields[1] != suite || !usable_uri(fields[0]) {
            continue;
        }
        let signed_by = options
            .split_whitespace()
            .find_map(|opt| opt.strip_prefix("signed-by="))
            .map(str::to_string);
        return Some(AptSource {
            uri: fields[0].to_string(),
            signed_by,
        });
    }
    None
}

/// deb822 stanzas: `Types:`, `URIs:`, `Suites:`, `Signed-By:`, `Enabled:` (field names are
/// case-insensitive, `#` lines are comments, continuation lines start with a blank).
fn deb822_source(text: &str, suite: &str) -> Option<AptSource> {
    let mut stanzas: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !stanzas.last().is_some_and(Vec::is_empty) {
                stanzas.push(Vec::new());
            }
            continue;
        }
        let stanza = stanzas.last_mut()?;
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = stanza.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            stanza.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    for stanza in stanzas {
        let field = |key: &str| {
            stanza
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let words = |key: &str| field(key).map(|v| v.split_whitespace().collect::<Vec<_>>());
        let enabled = field("enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let is_deb = words("types").is_some_and(|t| t.contains(&"deb"));
        let has_suite = words("suites").is_some_and(|s| s.contains(&suite));
        if !(enabled && is_deb && has_suite) {
            continue;
        }
        let Some(uri) = words("uris").and_then(|u| u.into_iter().find(|u| usable_uri(u))) else {
            continue;
        };
        // A key file path carries over; an inline key block cannot go on one line, and the
        // keys in /etc/apt/trusted.gpg.d then have to do.
        let signed_by = field("signed-by")
            .filter(|v| !v.contains('\n') && !v.contains("BEGIN PGP"))
            .map(str::to_string);
        return Some(AptSource {
            uri: uri.to_string(),
            signed_by,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_with_comments_and_several_suites() {
        let text = "Types: deb\n\
            # http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
            URIs: http://deb.debian.org/debian\n\
            Suites: bookworm bookworm-updates\n\
            Components: main\n\
            Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
            \n\
            Types: deb\n\
            URIs: http://deb.debian.org/debian-security\n\
            Suites: bookworm-security\n\
            Components: main\n";
        let source = deb822_source(text, "bookworm").unwrap();
        assert_eq!(source.uri, "http://deb.debian.org/debian");
        assert_eq!(
            source.deb_src_line("bookworm"),
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian bookworm main\n"
        );
    }

    #[test]
    fn deb822_skips_disabled_security_and_source_only() {
        let text = "types: deb\nuris: http://a/debian\nsuites: bookworm\nenabled: no\n\n\
            Types: deb-src\nURIs: http://b/debian\nSuites: bookworm\n\n\
            Types: deb\nURIs: http://c/debian-security\nSuites: bookworm-security\n\n\
            Types: deb deb-src\nURIs: http://d/debian\nSuites: bookworm\n\
            Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n xyz\n";
        let source = deb822_source(text, "bookworm").unwrap();
        assert_eq!(
            source,
            AptSource {
                uri: "http://d/debian".into(),
                signed_by: None
            }
        );
    }

    #[test]
    fn one_line_with_options_and_comments() {
        let text = "# deb http://old/debian bookworm main\n\
            deb-src http://src/debian bookworm main\n\
            deb http://security.debian.org/debian-security bookworm-security main\n\
            deb [ arch=amd64 signed-by=/k.gpg ] http://mirror.example/debian bookworm main contrib # x\n";
        let source = one_line_source(text, "bookworm").unwrap();
        assert_eq!(source.uri, "http://mirror.example/debian");
        assert_eq!(source.signed_by.as_deref(), Some("/k.gpg"));
        assert!(one_line_source("deb cdrom:[Debian]/ bookworm main\n", "bookworm").is_none());
        assert_eq!(
            one_line_source("deb http://m/debian bookworm main\n", "bookworm")
                .unwrap()
                .deb_src_line("bookworm"),
            "deb-src http://m/debian bookworm main\n"
        );
    }
}
