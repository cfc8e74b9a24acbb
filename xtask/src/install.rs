//! `cargo xtask install`: the binaries into their directories and the conflist into the
//! CNI config dir, every path overridable (and `--destdir` for packaging).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ipnetwork::Ipv4Network;

use crate::{ebpf, image, repo_root};

#[derive(Debug, clap::Args)]
pub struct InstallOptions {
    /// Install under this root instead of / (packaging).
    #[arg(long, value_name = "DIR", default_value = "/")]
    destdir: PathBuf,
    /// Where the runtime looks for CNI plugins.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// Where the runtime looks for CNI network configurations.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where mycni-agent goes.
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// This node's pod CIDR, for the conflist.
    #[arg(long, value_name = "CIDR", value_parser = check_cidr)]
    pod_cidr: String,
    /// The pods' MTU (68-65535).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(68..=65535))]
    mtu: u32,
    /// The plugin's address store.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cni/mycni")]
    data_dir: String,
    /// Where the agent pins the datapath.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/mycni")]
    bpffs_root: String,
    /// Who balances Services on the node, as the agent's `--service-mode`: with
    /// `kube-proxy` the conflist chains portmap for hostPorts; with `ebpf` mycni takes the
    /// `portMappings` capability itself.
    #[arg(long, value_name = "MODE", default_value = "kube-proxy", value_parser = ["kube-proxy", "ebpf"])]
    service_mode: String,
    /// Install the release binaries already built.
    #[arg(long)]
    no_build: bool,
}

/// An IPv4 prefix `a.b.c.d/n` with no host bits set, as the text the conflist will hold.
fn check_cidr(text: &str) -> Result<String> {
    let Ok(cidr) = text.parse::<Ipv4Network>() else {
        bail!("{text:?} is not an IPv4 CIDR like 10.244.1.0/24");
    };
    if !text.contains('/') {
        bail!("{text:?} has no prefix length (want a.b.c.d/len)");
    }
    if cidr.ip() != cidr.network() {
        bail!(
            "{text:?} has host bits set; did you mean {}/{}?",
            cidr.network(),
            cidr.prefix()
        );
    }
    Ok(cidr.to_string())
}

/// The conflist, pretty-printed in the order a reader expects (serde_json's map would
/// sort the keys). Strings go through serde_json for escaping. The same content as the
/// agent's `--cni-conf-dir` conflist (`mycni::cni::config::conflist`): portmap chained for
/// hostPorts, or in eBPF Services mode mycni taking them.
fn conflist(pod_cidr: &str, mtu: u32, data_dir: &str, bpffs_root: &str, ebpf: bool) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string();
    let (capabilities, portmap) = if ebpf {
        (",\n      \"capabilities\": {\"portMappings\": true}", "")
    } else {
        (
            "",
            ",\n    {\n      \"type\": \"portmap\",\n      \"capabilities\": {\"portMappings\": true},\n      \"snat\": true\n    }",
        )
    };
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
      "bpffsRoot": {bpffs_root}{capabilities}
    }}{portmap}
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

pub fn run(options: &InstallOptions) -> Result<()> {
    if !options.no_build {
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
        &options.pod_cidr,
        options.mtu,
        &options.data_dir,
        &options.bpffs_root,
        options.service_mode == "ebpf",
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

    #[test]
    fn cidrs() {
        assert!(check_cidr("10.244.1.0/24").is_ok());
        assert!(check_cidr("0.0.0.0/0").is_ok());
        assert!(check_cidr("10.244.1.5/32").is_ok());
        let err = check_cidr("10.244.1.5/24").unwrap_err().to_string();
        assert!(err.contains("10.244.1.0/24"), "{err}");
        assert_eq!(
            check_cidr("10.244.1.0/255.255.255.0").unwrap(),
            "10.244.1.0/24"
        );
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
            false,
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
        let ebpf: serde_json::Value =
            serde_json::from_str(&conflist("10.244.1.0/24", 1450, "/d", "/b", true)).unwrap();
        assert_eq!(
            ebpf["plugins"],
            serde_json::json!([{
                "type": "mycni",
                "podCIDR": "10.244.1.0/24",
                "mtu": 1450,
                "dataDir": "/d",
                "bpffsRoot": "/b",
                "capabilities": {"portMappings": true},
            }])
        );
    }

    /// `cargo xtask install ...` as clap parses it.
    fn parse(args: &[&str]) -> Result<InstallOptions, clap::Error> {
        #[derive(clap::Parser)]
        struct Install {
            #[command(flatten)]
            options: InstallOptions,
        }
        let args = std::iter::once("install").chain(args.iter().copied());
        <Install as clap::Parser>::try_parse_from(args).map(|install| install.options)
    }

    #[test]
    fn options() {
        let o = parse(&[
            "--destdir",
            "/tmp/d",
            "--pod-cidr=10.244.2.0/24",
            "--mtu",
            "1450",
            "--no-build",
        ])
        .unwrap();
        assert_eq!(o.pod_cidr, "10.244.2.0/24");
        assert_eq!(o.mtu, 1450);
        assert!(o.no_build);
        assert_eq!(
            under(&o.destdir, &o.cni_bin_dir),
            PathBuf::from("/tmp/d/opt/cni/bin")
        );
        assert_eq!(o.data_dir, "/var/lib/cni/mycni");
        assert_eq!(o.service_mode, "kube-proxy");
        let ebpf = parse(&["--pod-cidr=10.244.2.0/24", "--service-mode", "ebpf"]).unwrap();
        assert_eq!(ebpf.service_mode, "ebpf");
        assert!(parse(&["--pod-cidr=10.244.2.0/24", "--service-mode", "ipvs"]).is_err());
        assert!(parse(&["--pod-cidr=10.244.2.0/24", "--mtu", "9"]).is_err());
        assert!(parse(&["--pod-cidr"]).is_err());
        assert!(parse(&["--mtu", "1450"]).is_err(), "--pod-cidr is required");
        assert!(parse(&["--pod-cidr=10.244.2.0/24", "--frobnicate"]).is_err());
        assert!(parse(&["--pod-cidr=10.244.2.0/24", "--no-build=yes"]).is_err());
    }
}
