//! A table of bad inputs: each gets the spec's error JSON with the right code, a non-zero
//! exit, and leaves nothing behind. Needs root (the plugin runs against a real node).
use anyhow::{ensure, Result};
use mycni_tests::{prefix, Netns, Node};
use serde_json::json;

/// CNI environment variables as owned pairs.
type Env = Vec<(String, String)>;

#[test]
fn bad_inputs_get_the_right_code_and_leave_nothing() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("badinput"), "10.244.9.0/30")?;
    let pod_ns = Netns::new(&format!("{}-pod", node.prefix))?;
    let path = pod_ns.path().display().to_string();
    let good = node.conf("1.0.0");
    let not_a_netns = node.data_dir.join("not-a-netns");
    std::fs::write(&not_a_netns, b"")?;
    let not_a_netns = not_a_netns.display().to_string();

    let with = |key: &str, value: serde_json::Value| {
        let mut conf = good.clone();
        conf[key] = value;
        conf.to_string()
    };
    let add = |netns: &str| {
        Node::cni_env("ADD", "bad-input", netns)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let without = |key: &str| {
        add(&path)
            .into_iter()
            .filter(|(k, _)| k != key)
            .collect::<Vec<_>>()
    };
    let also = |key: &str, value: &str| {
        let mut env = add(&path);
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
        env
    };

    let cases: Vec<(&str, Env, String, u64)> = vec![
        ("malformed JSON", add(&path), "{\"cniVersion\":".into(), 6),
        (
            "unknown cniVersion",
            add(&path),
            with("cniVersion", json!("0.2.0")),
            1,
        ),
        (
            "missing name",
            add(&path),
            {
                let mut c = good.clone();
                c.as_object_mut().map(|o| o.remove("name"));
                c.to_string()
            },
            7,
        ),
        ("bad mtu", add(&path), with("mtu", json!(20)), 7),
        (
            "delegated ipam",
            add(&path),
            with("ipam", json!({"type": "host-local"})),
            2,
        ),
        (
            "unwritable dataDir",
            add(&path),
            with("dataDir", json!("/proc/mycni")),
            5,
        ),
        (
            "bad podCIDR",
            add(&path),
            with("podCIDR", json!("10.244.9.0/99")),
            7,
        ),
        (
            "no CNI_COMMAND",
            without("CNI_COMMAND"),
            good.to_string(),
            4,
        ),
        (
            "unknown CNI_COMMAND",
            also("CNI_COMMAND", "FROB"),
            good.to_string(),
            4,
        ),
        (
            "no CNI_CONTAINERID",
            without("CNI_CONTAINERID"),
            good.to_string(),
            4,
        ),
        ("no CNI_NETNS", without("CNI_NETNS"), good.to_string(), 4),
        ("no CNI_IFNAME", without("CNI_IFNAME"), good.to_string(), 4),
        ("no CNI_PATH", without("CNI_PATH"), good.to_string(), 4),
        (
            "malformed CNI_ARGS",
            also("CNI_ARGS", "IP"),
            good.to_string(),
            4,
        ),
        (
            "vanished netns",
            add("/run/netns/mycni-does-not-exist"),
            good.to_string(),
            4,
        ),
        (
            "interface exists in pod",
            also("CNI_IFNAME", "lo"),
            good.to_string(),
            4,
        ),
        (
            "static IP outside pool",
            also("CNI_ARGS", "IP=10.9.9.9"),
            good.to_string(),
            101,
        ),
        (
            "static IP reserved",
            also("CNI_ARGS", "IP=10.244.9.1"),
            good.to_string(),
            101,
        ),
        // Fails after the address is taken: the rollback must free it.
        (
            "netns path is not a namespace",
            add(&not_a_netns),
            good.to_string(),
            102,
        ),
    ];
    for (what, env, stdin, code) in &cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let call = node.cni(&env, stdin)?;
        ensure!(!call.exit_ok, "{what}: succeeded: {}", call.stdout);
        let reply = call.json()?;
        ensure!(
            reply["code"] == json!(code),
            "{what}: want code {code}, got {reply}"
        );
        ensure!(reply["msg"].is_string(), "{what}: no msg in {reply}");
        let left = node.leftovers()?;
        ensure!(left.is_empty(), "{what}: left behind {left:?}");
        ensure!(
            pod_ns.links()? == vec!["lo".to_string()],
            "{what}: pod keeps {:?}",
            pod_ns.links()?
        );
    }

    // A /30 holds one assignable address: the second ADD finds the pool exhausted.
    let first = node.add_pod("first")?;
    let call = node.cni(&Node::cni_env("ADD", "second", &path), &good.to_string())?;
    ensure!(
        call.error_code() == Some(100),
        "exhausted pool: {}",
        call.stdout
    );
    ensure!(node.ip_files()? == vec![first.ip.to_string()]);
    ensure!(pod_ns.links()? == vec!["lo".to_string()]);
    node.del_pod(&first)?;
    let left = node.leftovers()?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn version_lists_every_supported_version() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("version"), "10.244.10.0/24")?;
    let call = node.cni(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#)?;
    ensure!(call.exit_ok, "{}", call.stderr);
    let reply = call.json()?;
    ensure!(reply["cniVersion"] == "0.4.0");
    ensure!(reply["supportedVersions"] == json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    Ok(())
}

#[test]
fn results_are_shaped_per_requested_version() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("shapes"), "10.244.11.0/24")?;
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let ns = Netns::new(&format!("{}-v{i}", node.prefix))?;
        let path = ns.path().display().to_string();
        let id = format!("shape{i}");
        let mut conf = node.conf(version);
        conf["mtu"] = json!(1400);
        let add = node.cni(&Node::cni_env("ADD", &id, &path), &conf.to_string())?;
        ensure!(add.exit_ok, "{version}: {}", add.stdout);
        let result = add.json()?;
        ensure!(result["cniVersion"] == *version);
        let has_ip_version = result["ips"][0].get("version").is_some();
        ensure!(
            has_ip_version == version.starts_with("0."),
            "{version}: {result}"
        );
        let link = ns.exec(&["ip", "-o", "link", "show", "eth0"])?;
        ensure!(
            link.contains("mtu 1400 "),
            "{version}: eth0 MTU is not 1400: {link}"
        );
        ensure!(
            result["interfaces"][1]["sandbox"] == json!(path),
            "{result}"
        );
        let del = node.cni(
            &Node::cni_env("DEL", &id, &path),
            &node.conf(version).to_string(),
        )?;
        ensure!(del.exit_ok, "{version}: {}", del.stdout);
    }
    Ok(())
}
