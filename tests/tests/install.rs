//! `cargo xtask install`, as an operator runs it: the files it lays out under a destdir, and
//! a pod added on a node by the installed plugin reading the installed conflist.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use mycni::ipam::Pool;
use mycni_tests::{bin_dir, pod_ip, prefix, run, Netns, Node};

/// Removes the install tree even when the test fails.
struct InstallTree(PathBuf);

impl Drop for InstallTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn xtask_install_lays_out_a_node_that_adds_pods() -> Result<()> {
    mycni_tests::require_root!();
    let prefix = prefix("install");
    let node = Node::new(&prefix, "10.244.21.0/24")?;
    let tree = InstallTree(mycni_tests::run_dir().join(format!("{prefix}-dest")));
    let _ = std::fs::remove_dir_all(&tree.0);
    // The release binaries `cargo xtask test` built; --no-build so the test never compiles.
    run(Command::new(bin_dir().join("xtask"))
        .args(["install", "--no-build", "--pod-cidr", "10.244.21.0/24"])
        .args(["--mtu", "1400"])
        .arg("--destdir")
        .arg(&tree.0)
        .arg("--data-dir")
        .arg(&node.data_dir)
        .arg("--bpffs-root")
        .arg(node.pin_root()))?;

    let plugin = tree.0.join("opt/cni/bin/mycni");
    let agent = tree.0.join("usr/local/bin/mycni-agent");
    let conflist_path = tree.0.join("etc/cni/net.d/10-mycni.conflist");
    for file in [&plugin, &agent] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(file)?.permissions());
        ensure!(mode & 0o111 != 0, "{} is not executable", file.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(tree.0.join("etc/cni/net.d"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    ensure!(leftovers.is_empty(), "staging files left: {leftovers:?}");
    let conflist = std::fs::read_to_string(&conflist_path)?;
    let parsed: serde_json::Value = serde_json::from_str(&conflist)?;
    ensure!(
        parsed["plugins"][1]["type"] == "portmap",
        "portmap is not chained:\n{conflist}"
    );

    // The installed plugin, given the installed conflist, adds a pod the node reaches, and
    // removes it again.
    let pod = Netns::new(&format!("{prefix}-pod"))?;
    let container_id = format!("{prefix}-pod");
    let netns = pod.path().display().to_string();
    let added = node.cni_with(
        &plugin,
        &Node::cni_env("ADD", &container_id, &netns),
        &conflist,
    )?;
    ensure!(added.exit_ok, "ADD through the installed plugin: {added:?}");
    let result = added.json()?;
    let ip = pod_ip(&result).context("no IP in the result")?;
    ensure!(
        Pool::parse("10.244.21.0/24")?.contains(ip),
        "{ip} outside the CIDR"
    );
    let link = pod.exec(&["ip", "-o", "link", "show", "eth0"])?;
    ensure!(
        link.contains(" mtu 1400 "),
        "installed with --mtu 1400, the pod has {link}"
    );
    node.netns.ping(ip)?;
    let deleted = node.cni_with(
        &plugin,
        &Node::cni_env("DEL", &container_id, &netns),
        &conflist,
    )?;
    ensure!(
        deleted.exit_ok,
        "DEL through the installed plugin: {deleted:?}"
    );
    let records = std::fs::read_dir(node.data_dir.join("mycni"))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .parse::<std::net::Ipv4Addr>()
                .is_ok()
        })
        .count();
    ensure!(records == 0, "{records} address records left after DEL");
    Ok(())
}
