//! A real CNI client (cnitool, built from Debian's libcni source) drives a conflist of
//! mycni + the reference portmap plugin: ADD, CHECK and DEL. Needs root, cnitool, portmap.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use mycni_tests::{cnitool_bin, prefix, reference_plugin_dir, run, tcp_echo, Netns, Node};
use serde_json::json;

/// A directory holding `mycni` and the reference plugins side by side, as a CNI bin dir does.
struct PluginDir(PathBuf);

impl PluginDir {
    fn new(prefix: &str) -> Result<PluginDir> {
        let dir = mycni_tests::run_dir().join(format!("{prefix}-bin"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::symlink(mycni_tests::mycni_bin(), dir.join("mycni"))?;
        let portmap = reference_plugin_dir().join("portmap");
        ensure!(
            portmap.exists(),
            "{} is missing: run cargo xtask setup",
            portmap.display()
        );
        std::os::unix::fs::symlink(portmap, dir.join("portmap"))?;
        Ok(PluginDir(dir))
    }
}

/// A PATH for the plugins with IPv4 iptables only. Debian bookworm's portmap (1.1.1) CHECKs
/// ip6tables chains whenever ip6tables exists, even for an IPv4-only pod, and fails
/// (containernetworking/plugins#819, fixed upstream later); without ip6tables on its PATH it
/// checks what it created.
fn ipv4_only_path(dir: &std::path::Path) -> Result<PathBuf> {
    let tools = dir.join("path");
    std::fs::create_dir_all(&tools)?;
    for tool in ["iptables", "iptables-save", "iptables-restore"] {
        std::os::unix::fs::symlink(PathBuf::from("/usr/sbin").join(tool), tools.join(tool))?;
    }
    Ok(tools)
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn cnitool_adds_checks_and_deletes_mycni_with_portmap() -> Result<()> {
    mycni_tests::require_root!();
    ensure!(
        cnitool_bin().exists(),
        "{} is missing: run cargo xtask setup",
        cnitool_bin().display()
    );
    let node = Node::new(&prefix("cnitool"), "10.244.12.0/24")?;
    let plugins = PluginDir::new(&node.prefix)?;
    let conf_dir = node.data_dir.join("net.d");
    std::fs::create_dir_all(&conf_dir)?;
    let mycni = node.conf("1.0.0");
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "mycni-test",
        "plugins": [
            {"type": "mycni", "podCIDR": mycni["podCIDR"], "mtu": 1500,
             "dataDir": mycni["dataDir"], "bpffsRoot": mycni["bpffsRoot"]},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
        ],
    });
    std::fs::write(
        conf_dir.join("10-mycni.conflist"),
        serde_json::to_vec_pretty(&conflist)?,
    )?;
    let pod = Netns::new(&format!("{}-web", node.prefix))?;
    let path = ipv4_only_path(&plugins.0)?;
    // libcni caches results under /var/lib/cni and cnitool cannot move it: each call runs
    // in a private mount namespace where that path is the test's own directory, so the
    // machine's /var/lib stays as it was and CHECK and DEL still find what ADD cached.
    let cache = node.data_dir.join("libcni-cache");
    std::fs::create_dir_all(&cache)?;
    let private_cache = format!(
        "/bin/mount -t tmpfs tmpfs /var/lib && /bin/mkdir /var/lib/cni && /bin/mount --bind '{}' /var/lib/cni && exec \"$0\" \"$@\"",
        cache.display()
    );
    let cnitool = |verb: &str| {
        let mut cmd = node.netns.command("/usr/bin/unshare");
        cmd.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg(&private_cache)
            .arg(cnitool_bin())
            .args([verb, "mycni-test"])
            .arg(pod.path())
            .env("NETCONFPATH", &conf_dir)
            .env("PATH", &path)
            .env("CNI_PATH", &plugins.0)
            .env(
                "CAP_ARGS",
                json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
                    .to_string(),
            );
        cmd
    };
    let added = run(&mut cnitool("add")).context("cnitool add")?;
    let result: serde_json::Value = serde_json::from_slice(&added.stdout)?;
    let ip = mycni_tests::pod_ip(&result).context("no IP in cnitool's result")?;
    ensure!(ip.octets()[..3] == [10, 244, 12]);

    // portmap's DNAT runs in the node's stack; the reply comes back through it too.
    let hostport = node.netns.exec(&["iptables-save", "-t", "nat"])?;
    ensure!(
        hostport.contains("8080"),
        "portmap wrote no DNAT rule: {hostport}"
    );
    tcp_echo(
        &pod,
        SocketAddr::from(([0, 0, 0, 0], 80)),
        &node.netns,
        SocketAddr::from((node.node_ip, 8080)),
    )
    .context("hostPort 8080 -> pod:80")?;

    run(&mut cnitool("check")).context("cnitool check")?;
    run(&mut cnitool("del")).context("cnitool del")?;
    let left = node.leftovers()?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    ensure!(
        !node
            .netns
            .exec(&["iptables-save", "-t", "nat"])?
            .contains("8080"),
        "portmap rule left"
    );
    Ok(())
}
