//! `cargo xtask install`: the binaries into their directories and the conflist into the
//! CNI config dir, every path overridable (and `--destdir` for packaging).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{cmd, ebpf, repo_root};

struct Options {
    destdir: PathBuf,
    cni_bin_dir: PathBuf,
    cni_conf_dir: PathBuf,
    bin_dir: PathBuf,
    pod_cidr: Option<String>,
    mtu: u32,
    data_dir: String,
    bpffs_root: String,
    build: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        destdir: PathBuf::from("/"),
        cni_bin_dir: PathBuf::from("/opt/cni/bin"),
        cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
        bin_dir: PathBuf::from("/usr/local/bin"),
        pod_cidr: None,
        mtu: 1500,
        data_dir: "/var/lib/cni/mycni".into(),
        bpffs_root: "/sys/fs/bpf/mycni".into(),
        build: true,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--destdir" => options.destdir = PathBuf::from(value()?),
            "--cni-bin-dir" => options.cni_bin_dir = PathBuf::from(value()?),
            "--cni-conf-dir" => options.cni_conf_dir = PathBuf::from(value()?),
            "--bin-dir" => options.bin_dir = PathBuf::from(value()?),
            "--pod-cidr" => options.pod_cidr = Some(value()?.clone()),
            "--mtu" => options.mtu = value()?.parse().context("--mtu")?,
            "--data-dir" => options.data_dir = value()?.clone(),
            "--bpffs-root" => options.bpffs_root = value()?.clone(),
            "--no-build" => options.build = false,
            other => bail!("install: unexpected argument {other:?}"),
        }
    }
    Ok(options)
}

/// `<destdir>/<dir>`, with `dir` taken as relative to the destdir even when absolute.
fn under(destdir: &Path, dir: &Path) -> PathBuf {
    destdir.join(dir.strip_prefix("/").unwrap_or(dir))
}

fn copy_executable(from: &Path, dir: &Path, name: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let to = dir.join(name);
    // Write beside and rename: a runtime calling the plugin mid-install never sees half a file.
    let staging = dir.join(format!(".{name}.new"));
    std::fs::copy(from, &staging)
        .with_context(|| format!("copy {} to {}", from.display(), staging.display()))?;
    std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::rename(&staging, &to)?;
    println!("installed {}", to.display());
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    let pod_cidr = options
        .pod_cidr
        .clone()
        .context("install: --pod-cidr is required (this node's pod CIDR)")?;
    if options.build {
        ebpf::build()?;
        cmd::run(cmd::clean("cargo").current_dir(repo_root()).args([
            "build",
            "--release",
            "-p",
            "mycni",
        ]))?;
    }
    let release = repo_root().join("target/release");
    copy_executable(
        &release.join("mycni"),
        &under(&options.destdir, &options.cni_bin_dir),
        "mycni",
    )?;
    copy_executable(
        &release.join("mycni-agent"),
        &under(&options.destdir, &options.bin_dir),
        "mycni-agent",
    )?;
    let conflist = json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"],
        "name": "mycni",
        "plugins": [
            {
                "type": "mycni",
                "podCIDR": pod_cidr,
                "mtu": options.mtu,
                "dataDir": options.data_dir,
                "bpffsRoot": options.bpffs_root,
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
        ],
    });
    let conf_dir = under(&options.destdir, &options.cni_conf_dir);
    std::fs::create_dir_all(&conf_dir)?;
    let path = conf_dir.join("10-mycni.conflist");
    std::fs::write(&path, serde_json::to_string_pretty(&conflist)? + "\n")?;
    println!("installed {}", path.display());
    Ok(())
}
