//! `cargo xtask install`: the binaries into their directories and the conflist into the
//! CNI config dir, every path overridable (and `--destdir` for packaging).
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::{ebpf, image, repo_root};

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
        // `--flag value` and `--flag=value` alike.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => args
                    .next()
                    .cloned()
                    .with_context(|| format!("install: {flag} needs a value")),
            }
        };
        match flag {
            "--destdir" => options.destdir = PathBuf::from(value()?),
            "--cni-bin-dir" => options.cni_bin_dir = PathBuf::from(value()?),
            "--cni-conf-dir" => options.cni_conf_dir = PathBuf::from(value()?),
            "--bin-dir" => options.bin_dir = PathBuf::from(value()?),
            "--pod-cidr" => options.pod_cidr = Some(check_cidr(&value()?)?),
            "--mtu" => {
                let text = value()?;
                options.mtu = text
                    .parse()
                    .ok()
                    .filter(|mtu| (68..=65535).contains(mtu))
                    .with_context(|| format!("install: --mtu {text:?} is not an MTU (68-65535)"))?;
            }
            "--data-dir" => options.data_dir = value()?,
            "--bpffs-root" => options.bpffs_root = value()?,
            "--no-build" if inline.is_none() => options.build = false,
            _ => bail!("install: unexpected argument {arg:?}"),
        }
    }
    Ok(options)
}

/// An IPv4 prefix `a.b.c.d/n` with no host bits set.
fn check_cidr(text: &str) -> Result<String> {
    let parsed = text.split_once('/').and_then(|(addr, len)| {
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u32 = len.parse().ok().filter(|len| *len <= 32)?;
        Some((addr, len))
    });
    let Some((addr, len)) = parsed else {
        bail!("install: --pod-cidr {text:?} is not an IPv4 CIDR like 10.244.1.0/24");
    };
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    let network = Ipv4Addr::from(u32::from(addr) & mask);
    if network != addr {
        bail!("install: --pod-cidr {text:?} has host bits set; did you mean {network}/{len}?");
    }
    Ok(text.to_string())
}

/// The conflist, pretty-printed in the order a reader expects (serde_json's map would
/// sort the keys). Strings go through serde_json for escaping.
fn conflist(pod_cidr: &str, mtu: u32, data_dir: &str, bpffs_root: &str) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string();
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "cniVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"],
  "name": "mycni",
  "plugins": [
    {{
      "type": "mycni",
      "podCIDR": {pod_cidr},
      "mtu": {mtu},
      "dataDir": {data_dir},
      "bpffsRoot": {bpffs_root}
    }},
    {{
      "type": "portmap",
      "capabilities": {{"portMappings": true}},
      "snat": true
    }}
  ]
}}
"#,
        pod_cidr = s(pod_cidr),
        data_dir = s(data_dir),
        bpffs_root = s(bpffs_root),
    )
}

/// `<destdir>/<dir>`, with `dir` taken as relative to the destdir even when absolute.
fn under(destdir: &Path, dir: &Path) -> PathBuf {
    destdir.join(dir.strip_prefix("/").unwrap_or(dir))
}

fn copy_executable(from: &Path, dir: &Path, name: &str) -> Result<()> {
    if !from.is_file() {
        bail!(
            "{} is not built: run `cargo xtask install` without --no-build (or `cargo build --release -p mycni`)",
            from.display()
        );
    }
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
        image::build_release_binaries()?;
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
    let text = conflist(
        &pod_cidr,
        options.mtu,
        &options.data_dir,
        &options.bpffs_root,
    );
    let conf_dir = under(&options.destdir, &options.cni_conf_dir);
    std::fs::create_dir_all(&conf_dir).with_context(|| format!("create {}", conf_dir.display()))?;
    let path = conf_dir.join("10-mycni.conflist");
    // Runtimes watch this dir and read only *.conf, *.conflist, *.json: stage, then rename.
    let staging = conf_dir.join(".10-mycni.conflist.new");
    std::fs::write(&staging, text).with_context(|| format!("write {}", staging.display()))?;
    std::fs::rename(&staging, &path)
        .with_context(|| format!("rename {} to {}", staging.display(), path.display()))?;
    println!("installed {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cidrs() {
        assert!(check_cidr("10.244.1.0/24").is_ok());
        assert!(check_cidr("0.0.0.0/0").is_ok());
        assert!(check_cidr("10.244.1.5/32").is_ok());
        let err = check_cidr("10.244.1.5/24").unwrap_err().to_string();
        assert!(err.contains("10.244.1.0/24"), "{err}");
        for bad in ["10.244.1.0", "10.244.1.0/33", "fd00::/64", "x/24", ""] {
            assert!(check_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn conflist_is_the_expected_json() {
        let text = conflist(
            "10.244.1.0/24",
            1450,
            "/var/lib/cni/my \"cni\"",
            "/sys/fs/bpf/mycni",
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let expected = serde_json::json!({
            "cniVersion": "1.0.0",
            "cniVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"],
            "name": "mycni",
            "plugins": [
                {
                    "type": "mycni",
                    "podCIDR": "10.244.1.0/24",
                    "mtu": 1450,
                    "dataDir": "/var/lib/cni/my \"cni\"",
                    "bpffsRoot": "/sys/fs/bpf/mycni",
                },
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            ],
        });
        assert_eq!(value, expected);
    }

    #[test]
    fn options() {
        let o = parse(&args(&[
            "--destdir",
            "/tmp/d",
            "--pod-cidr=10.244.2.0/24",
            "--mtu",
            "1450",
            "--no-build",
        ]))
        .unwrap();
        assert_eq!(o.pod_cidr.as_deref(), Some("10.244.2.0/24"));
        assert_eq!(o.mtu, 1450);
        assert!(!o.build);
        assert_eq!(
            under(&o.destdir, &o.cni_bin_dir),
            PathBuf::from("/tmp/d/opt/cni/bin")
        );
        assert!(parse(&args(&["--mtu", "9"])).is_err());
        assert!(parse(&args(&["--pod-cidr"])).is_err());
        assert!(parse(&args(&["--frobnicate"])).is_err());
    }
}
