//! `cargo xtask k8s`: what the Kubernetes end-to-end and conformance tests need and no
//! package provides: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
//! kube-proxy and kubectl, upstream's conformance suite `e2e.test` and its test server
//! `agnhost`, built from Debian's `kubernetes` source package (GOPATH mode with Debian's Go;
//! its `vendor/` makes the build offline), and local OCI images (pause and busybox from
//! `busybox-static`, agnhost with the Debian tools the specs exec in it), since no registry
//! can be reached.
//!
//! The binaries are cached under `<cache>/<source version>/bin` (`<cache>` is
//! `$MYCNI_K8S_CACHE` or /var/cache/mycni/k8s) and `<cache>/current` names the version, so
//! the ~10 minute build happens once per machine. A cache of this version missing some of
//! the binaries (one made before kube-proxy or e2e.test joined the list) gets only the
//! missing ones, from a fresh source tree (the tree is deleted after every build).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::image::{build_image, ImageSpec};
use crate::{cmd, setup};

const SOURCE_PACKAGE: &str = "kubernetes";
/// Bumped when the build recipe changes, so caches of an older recipe are rebuilt.
const RECIPE: &str = "r2";
/// Kubernetes 1.20 vendors reflect2 1.0.1, whose map iteration faults under Go 1.18+
/// (the API server dies encoding objects); Debian packages the fixed 1.0.2.
const REFLECT2_SOURCE: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";
/// What upstream's tree is: Debian's version is `1.20.5+really1.20.2`.
const GIT_VERSION: &str = "v1.20.2";
/// The tags Kubernetes 1.20's e2e suite names its images by (test/utils/image/manifest.go):
/// pods asking for these find them imported and pull nothing.
pub const AGNHOST_IMAGE: &str = "k8s.gcr.io/e2e-test-images/agnhost:2.21";
pub const E2E_PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";
/// The DNS specs' second prober (`imageutils.JessieDnsutils`: e2eRegistry, 1.0).
pub const JESSIE_DNSUTILS_IMAGE: &str = "gcr.io/kubernetes-e2e-test-images/jessie-dnsutils:1.0";

/// How a binary is built from the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    /// `go build <package>`.
    Command(&'static str),
    /// `go test -c <package>`: a test binary (vet off: it would walk ~1,900 packages).
    TestBinary(&'static str),
}

/// Every cached binary and how it is built.
const BINARIES: &[(&str, Build)] = &[
    ("kube-apiserver", Build::Command("./cmd/kube-apiserver")),
    (
        "kube-controller-manager",
        Build::Command("./cmd/kube-controller-manager"),
    ),
    ("kube-scheduler", Build::Command("./cmd/kube-scheduler")),
    ("kubelet", Build::Command("./cmd/kubelet")),
    ("kube-proxy", Build::Command("./cmd/kube-proxy")),
    ("kubectl", Build::Command("./cmd/kubectl")),
    ("e2e.test", Build::TestBinary("./test/e2e")),
    ("agnhost", Build::Command("./test/images/agnhost")),
];

pub fn cache_dir() -> PathBuf {
    std::env::var_os("MYCNI_K8S_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/mycni/k8s"))
}

pub fn run() -> Result<()> {
    let bin = binaries()?;
    log::info!("ok Kubernetes binaries in {}", bin.display());
    images(&bin)?;
    Ok(())
}

/// The binaries of [`BINARIES`] that `bin` lacks, with how to build them.
fn missing(bin: &Path) -> Vec<(&'static str, Build)> {
    BINARIES
        .iter()
        .copied()
        .filter(|(name, _)| !bin.join(name).is_file())
        .collect()
}

/// The cached binaries' directory, building first whichever of them the cache lacks.
pub fn binaries() -> Result<PathBuf> {
    let cache = cache_dir();
    if let Ok(version) = std::fs::read_to_string(cache.join("current")) {
        let bin = cache.join(version.trim()).join("bin");
        if version.trim().ends_with(&format!("-{RECIPE}")) && missing(&bin).is_empty() {
            return Ok(bin);
        }
    }
    if !cmd::is_root() {
        bail!("building Kubernetes needs root (apt-get source into a private apt dir)");
    }
    let work = cache.join("build");
    let _ = std::fs::remove_dir_all(&work);
    let tree = fetch_source(&work)?;
    let version = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("kubernetes_")?
                .strip_suffix(".dsc")
                .map(str::to_string)
        })
        .next()
        .context("no kubernetes_*.dsc after apt-get source")?;
    let version = format!("{version}-{RECIPE}");
    let bin = cache.join(&version).join("bin");
    // All of them for a new source version or recipe; the new ones for a cache of this one.
    let to_build = missing(&bin);
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    if !Path::new(REFLECT2_SOURCE).join("reflect2.go").is_file() {
        bail!("{REFLECT2_SOURCE} is missing: install golang-github-modern-go-reflect2-dev (cargo xtask setup)");
    }
    std::fs::remove_dir_all(&vendored).with_context(|| format!("remove {}", vendored.display()))?;
    cmd::run(
        cmd::clean("cp")
            .arg("-r")
            .arg(REFLECT2_SOURCE)
            .arg(&vendored),
    )?;
    if to_build.len() == BINARIES.len() {
        log::info!("building Kubernetes {version} ({GIT_VERSION}) from Debian's source: about 10 minutes on 2 cores");
    } else {
        let names: Vec<&str> = to_build.iter().map(|(name, _)| *name).collect();
        log::info!(
            "building {} of Kubernetes {version} ({GIT_VERSION}) from Debian's source; the cache has the others",
            names.join(", ")
        );
    }
    // `make generated_files` writes the generated code (openapi, deepcopy) the build needs.
    let started = std::time::Instant::now();
    cmd::run(cmd::clean("make").current_dir(&tree).arg("generated_files"))?;
    log::info!("make generated_files took {:.0?}", started.elapsed());
    let gopath = work.join("gopath");
    let package_dir = gopath.join("src/k8s.io/kubernetes");
    std::fs::create_dir_all(gopath.join("src/k8s.io"))?;
    std::os::unix::fs::symlink(&tree, &package_dir)?;
    let ldflags = version_ldflags();
    std::fs::create_dir_all(&bin)?;
    for (name, build) in to_build {
        let started = std::time::Instant::now();
        let (subcommand, package): (&[&str], &str) = match build {
            Build::Command(package) => (&["build"], package),
            Build::TestBinary(package) => (&["test", "-c", "-vet=off"], package),
        };
        log::info!("{name}: go {} {package}", subcommand.join(" "));
        let mut go = cmd::clean("go");
        go.args(subcommand);
        cmd::run(
            go.current_dir(&package_dir)
                .args(["-ldflags", &ldflags, "-o"])
                .arg(bin.join(name))
                .arg(package)
                // Go takes the package's import path from $PWD; without it, the symlink
                // resolves outside GOPATH and vendor/ is ignored.
                .env("PWD", &package_dir)
                .env("GOPATH", &gopath)
                .env("GO111MODULE", "off")
                .env("CGO_ENABLED", "0")
                .env("GOFLAGS", "")
                .env("GOCACHE", work.join("gocache")),
        )?;
        log::info!("built {name} in {:.0?}", started.elapsed());
    }
    std::fs::write(cache.join("current"), &version)?;
    // The tree and Go's build cache are ~3 GB; the binaries are what is kept.
    std::fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    Ok(bin)
}

/// `-X` flags so components report v1.20.2 instead of v0.0.0 (kubelet and the API server
/// compare versions).
fn version_ldflags() -> String {
    let values = [
        ("gitVersion", GIT_VERSION),
        ("gitMajor", "1"),
        ("gitMinor", "20"),
        ("gitTreeState", "clean"),
        ("buildDate", "1970-01-01T00:00:00Z"),
    ];
    let mut flags = Vec::new();
    for package in [
        "k8s.io/kubernetes/vendor/k8s.io/component-base/version",
        "k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version",
    ] {
        for (key, value) in values {
            flags.push(format!("-X {package}.{key}={value}"));
        }
    }
    flags.join(" ")
}

/// Downloads and unpacks Debian's `kubernetes` source into `work/tree` through a private
/// apt dir (`deb-src` lines for bookworm and bookworm-security); /etc/apt is untouched.
fn fetch_source(work: &Path) -> Result<PathBuf> {
    let apt_dir = work.join("apt");
    for dir in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt_dir.join(dir))?;
    }
    let mut list = setup::apt_source("bookworm")?.deb_src_line("bookworm");
    if let Ok(security) = setup::apt_source("bookworm-security") {
        list.push_str(&security.deb_src_line("bookworm-security"));
    }
    let source_list = apt_dir.join("sources.list");
    std::fs::write(&source_list, list)?;
    let private_apt = || setup::private_apt_get(&apt_dir, &source_list);
    cmd::output(private_apt().arg("update"))?;
    cmd::output(private_apt().current_dir(work).args([
        "source",
        "--download-only",
        SOURCE_PACKAGE,
    ]))?;
    let dsc = std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "dsc"))
        .context("apt-get source left no .dsc")?;
    let tree = work.join("tree");
    cmd::output(Command::new("dpkg-source").arg("-x").arg(&dsc).arg(&tree))?;
    Ok(tree)
}

/// The images the lab's pods run: `pause` (a sandbox process that exits on SIGTERM) and
/// `busybox`, both from Debian's static busybox; and for the conformance suite, the same
/// pause under the name its specs use and agnhost (see [`agnhost_spec`]). `bin` holds the
/// cached binaries ([`binaries`]).
pub fn images(bin: &Path) -> Result<()> {
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox is missing: install busybox-static (cargo xtask setup)");
    }
    let dir = cache_dir().join("images");
    let links = busybox_links(&["sh", "sleep", "ping", "wget", "nc", "ip", "cat", "hostname"]);
    let pause = vec![
        "/bin/busybox".to_string(),
        "sh".into(),
        "-c".into(),
        "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done".into(),
    ];
    let busybox_image = |entrypoint: Vec<String>, reference: &str| ImageSpec {
        files: vec![(busybox.clone(), PathBuf::from("/bin/busybox"))],
        links: links.clone(),
        entrypoint,
        cmd: Vec::new(),
        reference: reference.to_string(),
    };
    for (file, spec) in [
        ("pause", busybox_image(pause.clone(), "mycni.test/pause:1")),
        (
            "busybox",
            busybox_image(vec!["/bin/sh".to_string()], "mycni.test/busybox:1"),
        ),
        ("e2e-pause", busybox_image(pause, E2E_PAUSE_IMAGE)),
        ("agnhost", agnhost_spec(bin)?),
        ("jessie-dnsutils", jessie_dnsutils_spec()?),
    ] {
        let out = dir.join(format!("{file}.oci.tar"));
        build_image(&spec, &out)?;
        log::info!("ok image {} in {}", spec.reference, out.display());
    }
    Ok(())
}

/// `/bin/<applet>` -> busybox, for each applet.
fn busybox_links(applets: &[&str]) -> Vec<(PathBuf, String)> {
    applets
        .iter()
        .map(|applet| (PathBuf::from("/bin").join(applet), "busybox".to_string()))
        .collect()
}

/// What the DNS specs' probe loops run (test/e2e/network/dns_common.go): `dig` over UDP
/// and TCP, `getent hosts`, `hostname -i` (Debian's: it resolves the pod's name through
/// /etc/hosts), and busybox's `awk`, `tr` and `seq` (linked by the callers); nslookup and
/// host as upstream's images carry them. (file on this machine, path in the image, package).
fn dns_tool_files() -> Vec<(PathBuf, &'static str, &'static str)> {
    vec![
        (
            PathBuf::from("/usr/bin/dig"),
            "/usr/bin/dig",
            "bind9-dnsutils",
        ),
        (
            PathBuf::from("/usr/bin/nslookup"),
            "/usr/bin/nslookup",
            "bind9-dnsutils",
        ),
        (
            PathBuf::from("/usr/bin/host"),
            "/usr/bin/host",
            "bind9-dnsutils",
        ),
        (
            PathBuf::from("/usr/bin/getent"),
            "/usr/bin/getent",
            "libc-bin",
        ),
        (PathBuf::from("/bin/hostname"), "/bin/hostname", "hostname"),
        // glibc's lookup order for getent and every dynamic tool: /etc/hosts, then DNS.
        (
            PathBuf::from("/etc/nsswitch.conf"),
            "/etc/nsswitch.conf",
            "base-files",
        ),
    ]
}

/// Adds (file on this machine, path in the image, the package that has it) to `spec`; a
/// missing file is an error naming its package.
fn add_files(spec: &mut ImageSpec, files: Vec<(PathBuf, &str, &str)>) -> Result<()> {
    for (source, target, from) in files {
        if !source.is_file() {
            bail!("{} is missing (from {from})", source.display());
        }
        spec.files.push((source, PathBuf::from(target)));
    }
    Ok(())
}

/// Busybox applets both images link for the DNS probes and a shell session.
const DNS_PROBE_APPLETS: &[&str] = &["awk", "tr", "seq", "sleep", "cat", "ls", "echo"];

/// Upstream's jessie-dnsutils (Debian's dnsutils for the DNS specs' second prober): dash as
/// `/bin/sh`, [`dns_tool_files`], busybox for the rest. No entrypoint: the specs give the
/// command.
fn jessie_dnsutils_spec() -> Result<ImageSpec> {
    let mut spec = ImageSpec {
        files: Vec::new(),
        links: busybox_links(DNS_PROBE_APPLETS),
        entrypoint: vec!["/bin/sh".to_string()],
        cmd: Vec::new(),
        reference: JESSIE_DNSUTILS_IMAGE.to_string(),
    };
    let mut files = vec![
        (PathBuf::from("/bin/dash"), "/bin/sh", "dash"),
        (
            PathBuf::from("/bin/busybox"),
            "/bin/busybox",
            "busybox-static",
        ),
    ];
    files.extend(dns_tool_files());
    add_files(&mut spec, files)?;
    Ok(spec)
}

/// Upstream's agnhost image (entrypoint `/agnhost`, default argument `pause`) with what the
/// specs exec in it from Debian's packages instead of Alpine's: dash as `/bin/sh` (busybox's
/// shell would run its own `nc` applet, which has no `-u`), curl, netcat-openbsd's `nc`,
/// grep, wget and the DNS probes' tools ([`dns_tool_files`]); busybox for the small tools a
/// shell session expects.
fn agnhost_spec(bin: &Path) -> Result<ImageSpec> {
    let mut files = vec![
        (bin.join("agnhost"), "/agnhost", "cargo xtask k8s"),
        (PathBuf::from("/bin/dash"), "/bin/sh", "dash"),
        (PathBuf::from("/usr/bin/curl"), "/usr/bin/curl", "curl"),
        (
            PathBuf::from("/bin/nc.openbsd"),
            "/bin/nc",
            "netcat-openbsd",
        ),
        (PathBuf::from("/bin/grep"), "/bin/grep", "grep"),
        // The serve-hostname Services specs count backends with `wget -q -T 1 -O -`; GNU
        // wget, as busybox-static 1.35's wget applet dies of a segmentation fault at start.
        (PathBuf::from("/usr/bin/wget"), "/usr/bin/wget", "wget"),
        (
            PathBuf::from("/bin/busybox"),
            "/bin/busybox",
            "busybox-static",
        ),
    ];
    files.extend(dns_tool_files());
    let mut links = busybox_links(&[
        "ps", "env", "mkdir", "rm", "timeout",
        // The NetworkPolicy specs' clients retry with `for i in $(seq 1 5)`.
        "seq",
        // "create endpoints for unready pods" keeps its pod unready with an exec probe
        // of `/bin/false` (which, missing, errs: unready too, but for the wrong reason).
        "false",
    ]);
    links.extend(busybox_links(
        &DNS_PROBE_APPLETS
            .iter()
            .copied()
            .filter(|applet| *applet != "seq")
            .collect::<Vec<_>>(),
    ));
    let mut spec = ImageSpec {
        files: Vec::new(),
        links,
        entrypoint: vec!["/agnhost".to_string()],
        cmd: vec!["pause".to_string()],
        reference: AGNHOST_IMAGE.to_string(),
    };
    add_files(&mut spec, files)?;
    // As upstream's image has it: some specs run the same binary under another name.
    spec.links
        .push((PathBuf::from("/agnhost-2"), "agnhost".to_string()));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::{missing, Build, BINARIES};

    #[test]
    fn builds_only_what_the_cache_lacks() -> anyhow::Result<()> {
        let bin = std::env::temp_dir().join(format!("xtask-k8s-cache-{}", std::process::id()));
        std::fs::create_dir_all(&bin)?;
        assert_eq!(missing(&bin), BINARIES, "an empty cache lacks everything");
        // A cache from before the conformance suite joined the list.
        for (name, _) in BINARIES
            .iter()
            .filter(|(name, _)| !["e2e.test", "agnhost"].contains(name))
        {
            std::fs::write(bin.join(name), "")?;
        }
        let names: Vec<&str> = missing(&bin).iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["e2e.test", "agnhost"]);
        assert_eq!(
            missing(&bin)[0].1,
            Build::TestBinary("./test/e2e"),
            "e2e.test is a test binary"
        );
        std::fs::write(bin.join("e2e.test"), "")?;
        std::fs::write(bin.join("agnhost"), "")?;
        assert!(missing(&bin).is_empty());
        std::fs::remove_dir_all(&bin)?;
        Ok(())
    }
}
