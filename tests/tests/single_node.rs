//! One node, several pods, the real `mycni` binary and the real datapath. Needs root.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{ensure, Context, Result};
use mycni_common::verdict;
use mycni_tests::{http_get, metric, prefix, tcp_round_trip, Node};

fn counters(node: &Node) -> Result<Vec<u64>> {
    Ok(mycni::datapath::read_stats(&node.pin_root())?
        .iter()
        .map(|c| c.packets)
        .collect())
}

#[test]
fn three_pods_reach_each_other_through_ebpf_with_forwarding_off() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("threepods"), "10.244.1.0/24")?;
    // Kernel forwarding off: anything that crosses between pods was moved by from_pod.
    node.netns.sysctl("net.ipv4.ip_forward", "0")?;
    let pods = ["a", "b", "c"]
        .iter()
        .map(|name| node.add_pod(name))
        .collect::<Result<Vec<_>>>()?;
    let ips: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    ensure!(ips.len() == 3, "pods share an address: {ips:?}");
    for ip in &ips {
        ensure!(
            ip.octets()[..3] == [10, 244, 1] && ![0, 1, 255].contains(&ip.octets()[3]),
            "{ip} is outside the pod CIDR or reserved"
        );
    }
    let before = counters(&node)?;
    let mut port = 7100;
    for from in &pods {
        for to in &pods {
            if from.container_id == to.container_id {
                continue;
            }
            from.netns
                .ping(to.ip)
                .with_context(|| format!("ping {} -> {}", from.ip, to.ip))?;
            tcp_round_trip(&to.netns, &from.netns, to.ip, port)
                .with_context(|| format!("tcp {} -> {}", from.ip, to.ip))?;
            port += 1;
        }
    }
    // from_pod routes: one hop, one TTL decrement (and a checksum the receiver accepts).
    let reply = pods[0]
        .netns
        .exec(&["ping", "-c", "1", "-W", "2", &pods[1].ip.to_string()])?;
    ensure!(
        reply.contains("ttl=63"),
        "want ttl=63 after one routed hop: {reply}"
    );
    let after = counters(&node)?;
    let redirected =
        after[verdict::LOCAL_REDIRECT as usize] - before[verdict::LOCAL_REDIRECT as usize];
    // 6 ordered pairs, each 2 echo requests + 2 replies and a TCP exchange of several segments.
    ensure!(
        redirected >= 6 * 4 + 6 * 6,
        "only {redirected} packets redirected: {after:?}"
    );
    ensure!(
        after[verdict::ARP_REPLY as usize] >= 3,
        "the gateway's ARP was not answered in eBPF: {after:?}"
    );
    // Forwarding is still off: the node stack could not have done it.
    ensure!(
        node.netns
            .exec(&["sysctl", "-n", "net.ipv4.ip_forward"])?
            .trim()
            == "0"
    );

    // The node reaches every pod, and every pod the node, through the /32 host routes.
    for pod in &pods {
        node.netns
            .ping(pod.ip)
            .with_context(|| format!("node -> {}", pod.ip))?;
    }
    for pod in &pods {
        node.del_pod(pod)?;
    }
    let left = node.leftovers()?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn thirty_two_concurrent_adds_get_distinct_addresses() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("concurrent"), "10.244.2.0/24")?;
    let pods: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let node = &node;
                scope.spawn(move || node.add_pod(&format!("p{i}")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("ADD thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let ips: BTreeSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    ensure!(
        ips.len() == 32,
        "32 ADDs got {} distinct addresses",
        ips.len()
    );
    ensure!(node.ip_files()?.len() == 32);
    let endpoints = mycni::datapath::Maps::open(&node.pin_root())?.endpoints()?;
    ensure!(
        endpoints.len() == 32,
        "{} endpoints in the map",
        endpoints.len()
    );
    std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                let node = &node;
                scope.spawn(move || node.del_pod(pod))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("DEL thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let left = node.leftovers()?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn two_hundred_add_del_cycles_leave_nothing() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("cycles"), "10.244.3.0/28")?;
    let netns = mycni_tests::Netns::new(&format!("{}-pod", node.prefix))?;
    let path = netns.path().display().to_string();
    let conf = node.conf("1.1.0").to_string();
    let mut seen = BTreeSet::new();
    for cycle in 0..200 {
        let id = format!("{}-c{cycle}", node.prefix);
        let add = node.cni(&Node::cni_env("ADD", &id, &path), &conf)?;
        ensure!(add.exit_ok, "ADD #{cycle}: {} {}", add.stdout, add.stderr);
        seen.insert(mycni_tests::pod_ip(&add.json()?).context("no ip")?);
        let del = node.cni(&Node::cni_env("DEL", &id, &path), &conf)?;
        ensure!(del.exit_ok, "DEL #{cycle}: {} {}", del.stdout, del.stderr);
    }
    // A /28 has 13 assignable addresses: freed ones were handed out again, round robin.
    ensure!(seen.len() == 13, "addresses used: {seen:?}");
    let left = node.leftovers()?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    ensure!(
        netns.links()? == vec!["lo".to_string()],
        "pod netns keeps {:?}",
        netns.links()?
    );
    Ok(())
}

#[test]
fn del_succeeds_without_netns_and_twice() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("delidem"), "10.244.4.0/24")?;
    let conf = node.conf("1.0.0").to_string();
    let pod = node.add_pod("gone")?;
    let id = pod.container_id.clone();
    let path = pod.netns.path().display().to_string();
    drop(pod); // the runtime already removed the netns
    for netns in [path.as_str(), "", ""] {
        let del = node.cni(&Node::cni_env("DEL", &id, netns), &conf)?;
        ensure!(
            del.exit_ok,
            "DEL with netns {netns:?}: {} {}",
            del.stdout,
            del.stderr
        );
    }
    let left = node.leftovers()?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn static_ip_through_cni_args_and_runtime_config() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("staticip"), "10.244.5.0/24")?;
    let a = mycni_tests::Netns::new(&format!("{}-a", node.prefix))?;
    let b = mycni_tests::Netns::new(&format!("{}-b", node.prefix))?;
    let (pa, pb) = (
        a.path().display().to_string(),
        b.path().display().to_string(),
    );
    let mut env = Node::cni_env("ADD", "static-a", &pa);
    env.push(("CNI_ARGS", "IgnoreUnknown=1;IP=10.244.5.77"));
    let add = node.cni(&env, &node.conf("0.4.0").to_string())?;
    ensure!(add.exit_ok, "{} {}", add.stdout, add.stderr);
    ensure!(mycni_tests::pod_ip(&add.json()?) == Some(Ipv4Addr::new(10, 244, 5, 77)));

    let mut conf = node.conf("1.0.0");
    conf["runtimeConfig"] = serde_json::json!({"ips": ["10.244.5.78/24"]});
    let add = node.cni(&Node::cni_env("ADD", "static-b", &pb), &conf.to_string())?;
    ensure!(add.exit_ok, "{} {}", add.stdout, add.stderr);
    ensure!(mycni_tests::pod_ip(&add.json()?) == Some(Ipv4Addr::new(10, 244, 5, 78)));

    // The same address for another container is refused and leaves nothing.
    let c = mycni_tests::Netns::new(&format!("{}-c", node.prefix))?;
    let pc = c.path().display().to_string();
    let mut env = Node::cni_env("ADD", "static-c", &pc);
    env.push(("CNI_ARGS", "IP=10.244.5.77"));
    let add = node.cni(&env, &node.conf("1.0.0").to_string())?;
    ensure!(
        add.error_code() == Some(101),
        "{} {}",
        add.stdout,
        add.stderr
    );
    ensure!(c.links()? == vec!["lo".to_string()]);

    for (id, path) in [("static-a", &pa), ("static-b", &pb)] {
        let del = node.cni(
            &Node::cni_env("DEL", id, path),
            &node.conf("1.0.0").to_string(),
        )?;
        ensure!(del.exit_ok, "{}", del.stdout);
    }
    let left = node.leftovers()?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn check_passes_then_reports_what_differs() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("check"), "10.244.6.0/24")?;
    let pod = node.add_pod("p")?;
    let path = pod.netns.path().display().to_string();
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = pod.result.clone();
    let check = node.cni(
        &Node::cni_env("CHECK", &pod.container_id, &path),
        &conf.to_string(),
    )?;
    ensure!(
        check.exit_ok,
        "CHECK of a fresh pod: {} {}",
        check.stdout,
        check.stderr
    );

    // Remove the pod's address behind the plugin's back.
    pod.netns.exec(&[
        "ip",
        "addr",
        "del",
        &format!("{}/32", pod.ip),
        "dev",
        "eth0",
    ])?;
    let check = node.cni(
        &Node::cni_env("CHECK", &pod.container_id, &path),
        &conf.to_string(),
    )?;
    ensure!(check.error_code() == Some(104), "{}", check.stdout);
    ensure!(
        check.stdout.contains(&pod.ip.to_string()),
        "{}",
        check.stdout
    );
    node.del_pod(&pod)?;
    Ok(())
}

#[test]
fn status_reports_whether_the_datapath_is_loaded() -> Result<()> {
    mycni_tests::require_root!();
    let mut node = Node::new(&prefix("status"), "10.244.7.0/24")?;
    let env = [("CNI_COMMAND", "STATUS")];
    let conf = node.conf("1.1.0").to_string();
    let status = node.cni(&env, &conf)?;
    ensure!(status.exit_ok, "{} {}", status.stdout, status.stderr);
    node.stop_agent();
    run_unload(&node)?;
    let status = node.cni(&env, &conf)?;
    ensure!(status.error_code() == Some(50), "{}", status.stdout);
    // ADD while the datapath is missing: try again later, nothing allocated.
    let pod_ns = mycni_tests::Netns::new(&format!("{}-p", node.prefix))?;
    let path = pod_ns.path().display().to_string();
    let add = node.cni(&Node::cni_env("ADD", "early", &path), &conf)?;
    ensure!(add.error_code() == Some(11), "{}", add.stdout);
    ensure!(node.ip_files()?.is_empty());
    node.start_agent(&[])?;
    let status = node.cni(&env, &conf)?;
    ensure!(status.exit_ok, "{}", status.stdout);
    Ok(())
}

fn run_unload(node: &Node) -> Result<()> {
    mycni_tests::run(
        node.netns
            .command(mycni_tests::agent_bin())
            .arg("--bpffs-root")
            .arg(node.pin_root())
            .arg("unload"),
    )
    .map(|_| ())
}

#[test]
fn gc_frees_attachments_not_listed_as_valid() -> Result<()> {
    mycni_tests::require_root!();
    let node = Node::new(&prefix("gc"), "10.244.8.0/24")?;
    let keep = node.add_pod("keep")?;
    let drop_me = node.add_pod("drop")?;
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": keep.container_id, "ifname": "eth0"}]);
    let gc = node.cni(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &conf.to_string(),
    )?;
    ensure!(gc.exit_ok, "{} {}", gc.stdout, gc.stderr);
    ensure!(
        node.ip_files()? == vec![keep.ip.to_string()],
        "{:?}",
        node.ip_files()?
    );
    ensure!(
        drop_me.netns.links()? == vec!["lo".to_string()],
        "GC left the pod's eth0"
    );
    let endpoints = mycni::datapath::Maps::open(&node.pin_root())?.endpoints()?;
    ensure!(
        endpoints.len() == 1 && endpoints[0].0 == keep.ip,
        "{endpoints:?}"
    );
    node.del_pod(&keep)?;
    let left = node.leftovers()?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn pins_of_another_layout_are_refused_not_reused() -> Result<()> {
    mycni_tests::require_root!();
    let prefix = prefix("layout");
    let bpffs = mycni_tests::Bpffs::new(&prefix)?;
    let root = bpffs.mount_point.join("mycni");
    std::fs::create_dir_all(&root)?;
    // A ROUTES pin as an older build might have left it: another kind and value size.
    mycni_tests::run(
        std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(root.join("ROUTES"))
            .args([
                "type", "hash", "key", "4", "value", "4", "entries", "8", "name", "ROUTES",
            ]),
    )?;
    let netns = mycni_tests::Netns::new(&format!("{prefix}-node"))?;
    let load = netns
        .command(mycni_tests::agent_bin())
        .arg("--bpffs-root")
        .arg(&root)
        .arg("load")
        .env("RUST_BACKTRACE", "0")
        .output()?;
    let stderr = String::from_utf8_lossy(&load.stderr);
    ensure!(
        !load.status.success(),
        "the agent reused an incompatible pin"
    );
    ensure!(
        stderr.contains("another layout"),
        "unclear refusal: {stderr}"
    );
    // The plugin refuses too, instead of writing into the wrong map.
    ensure!(mycni::datapath::Maps::open(&root).is_err());
    Ok(())
}

#[test]
fn agent_writes_the_conflist_serves_metrics_and_collects_garbage() -> Result<()> {
    mycni_tests::require_root!();
    let mut node = Node::bare(&prefix("upkeep"), "node", "10.244.13.0/24")?;
    node.netns
        .exec(&["ip", "addr", "add", "192.168.50.1/32", "dev", "lo"])?;
    let conf_dir = node.data_dir.join("net.d");
    let data_dir = node.data_dir.display().to_string();
    let conf_dir_text = conf_dir.display().to_string();
    let metrics = "127.0.0.1:9962";
    node.start_agent(&[
        "--cni-conf-dir",
        &conf_dir_text,
        "--pod-cidr",
        "10.244.13.0/24",
        "--pod-mtu",
        "1400",
        "--network-name",
        "mycni-test",
        "--data-dir",
        &data_dir,
        "--gc-interval",
        "1",
        "--gc-grace",
        "0",
        "--metrics-address",
        metrics,
    ])?;
    let conflist_path = conf_dir.join("10-mycni.conflist");
    mycni_tests::cluster::wait_for(std::time::Duration::from_secs(5), || {
        Ok(conflist_path.exists())
    })?;
    let conflist = std::fs::read_to_string(&conflist_path)?;

    // The conflist the agent wrote is what the runtime hands the plugin.
    let a = mycni_tests::Netns::new(&format!("{}-a", node.prefix))?;
    let b = mycni_tests::Netns::new(&format!("{}-b", node.prefix))?;
    let mut ips = Vec::new();
    for (id, ns) in [("live-a", &a), ("live-b", &b)] {
        let path = ns.path().display().to_string();
        let add = node.cni(&Node::cni_env("ADD", id, &path), &conflist)?;
        ensure!(
            add.exit_ok,
            "ADD with the agent's conflist: {} {}",
            add.stdout,
            add.stderr
        );
        ips.push(mycni_tests::pod_ip(&add.json()?).context("no ip")?);
    }
    ensure!(a
        .exec(&["ip", "-o", "link", "show", "eth0"])?
        .contains("mtu 1400 "));

    let (status, body) = http_get(&node.netns, metrics, "/healthz")?;
    ensure!(status.contains("200"), "{status} {body}");
    let (_, before) = http_get(&node.netns, metrics, "/metrics")?;
    ensure!(metric(&before, "mycni_endpoints") == Some(2.0), "{before}");
    a.ping(ips[1])?;
    let (_, after) = http_get(&node.netns, metrics, "/metrics")?;
    let redirected =
        |text: &str| metric(text, "mycni_packets_total{verdict=\"local_redirect\"}").unwrap_or(0.0);
    ensure!(
        redirected(&after) >= redirected(&before) + 4.0,
        "counters did not move:\n{after}"
    );

    // A node crash mid-ADD: an address claimed, an endpoint written, no veth. GC frees both.
    let store = mycni::ipam::store::IpStore::open(&node.data_dir, "mycni-test")?;
    let pool = mycni::ipam::Pool::parse("10.244.13.0/24")?;
    let owner = mycni::ipam::store::Owner {
        container_id: "crashed".into(),
        ifname: "eth0".into(),
    };
    let orphan = store.lock()?.allocate(&pool, &owner)?;
    let ghost = std::net::Ipv4Addr::new(10, 244, 13, 200);
    let endpoint = mycni_common::Endpoint {
        ifindex: 99999,
        pod_mac: [2; 6],
        host_mac: [4; 6],
        container_id_hash: 1,
    };
    mycni::datapath::Maps::open(&node.pin_root())?.write_endpoint(ghost, &endpoint)?;
    mycni_tests::cluster::wait_for(std::time::Duration::from_secs(5), || {
        let files = node.ip_files()?;
        let endpoints = mycni::datapath::Maps::open(&node.pin_root())?.endpoints()?;
        Ok(!files.contains(&orphan.to_string()) && !endpoints.iter().any(|(ip, _)| *ip == ghost))
    })
    .context("GC did not free the crashed ADD's leftovers")?;
    let mut live: Vec<String> = node.ip_files()?;
    live.sort();
    let mut expected: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    expected.sort();
    ensure!(live == expected, "GC touched live pods: {live:?}");
    let (_, end) = http_get(&node.netns, metrics, "/metrics")?;
    ensure!(
        metric(&end, "mycni_garbage_collected_total").unwrap_or(0.0) >= 2.0,
        "{end}"
    );

    for (id, ns) in [("live-a", &a), ("live-b", &b)] {
        let path = ns.path().display().to_string();
        let del = node.cni(&Node::cni_env("DEL", id, &path), &conflist)?;
        ensure!(del.exit_ok, "{}", del.stdout);
    }
    Ok(())
}
