//! The agent keeps every healthy peer routed whatever one peer, one map or the nodes file
//! does wrong, and holds a 5,000-node cluster (see `mycni_tests::lone` for the node).
//! Needs root.
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mycni_common::{LAYOUT_VERSION, ROUTE_LOCAL_CIDR, ROUTE_REMOTE_NODE};
use mycni_tests::cluster::wait_for;
use mycni_tests::lone::{
    cluster_text, nodes_text, peer, wait_next_hop, LoneNode as Lone, CLUSTER_CIDR, LOCAL_POD_CIDR,
    NODE_IP,
};
use mycni_tests::{metric, prefix, Node};

#[test]
fn five_thousand_nodes_from_a_nodes_file_converge_and_the_agent_stays_up() -> Result<()> {
    mycni_tests::require_root!();
    const PEERS: u32 = 5000;
    let text = cluster_text(PEERS, None);
    let start = Instant::now();
    let mut lone = Lone::start("scale", &text, &[])?;
    let converged = wait_for(Duration::from_secs(120), || {
        lone.ensure_alive()?;
        Ok(lone.remote_routes()? == PEERS as usize)
    })
    .with_context(|| format!("ROUTES never held every peer:\n{}", lone.log.text()))?;
    eprintln!(
        "{PEERS} peers in ROUTES {converged:?} after the agent was up ({:?} from its start)",
        start.elapsed()
    );
    let kernel = lone.node.netns.exec(&["ip", "-4", "route", "show"])?;
    let via = kernel.lines().filter(|l| l.contains(" via ")).count();
    let tunnel = kernel
        .lines()
        .filter(|l| l.contains("dev mycni_vxlan"))
        .count();
    ensure!(
        (via, tunnel) == (PEERS as usize / 2, PEERS as usize / 2),
        "kernel routes: {via} direct, {tunnel} VXLAN"
    );
    std::thread::sleep(Duration::from_secs(2));
    lone.ensure_alive()?;
    let body = lone.metrics()?;
    ensure!(
        metric(&body, "mycni_routes{kind=\"direct\"}") == Some(f64::from(PEERS / 2))
            && metric(&body, "mycni_routes{kind=\"vxlan\"}") == Some(f64::from(PEERS / 2))
            && metric(&body, "mycni_peers_unapplied") == Some(0.0)
            && metric(&body, "mycni_peer_errors_total") == Some(0.0),
        "{body}"
    );

    // One node of 5,000 moves: only its route changes, at once.
    let (_, _, cidr) = peer(4321, PEERS);
    let moved_ip = Ipv4Addr::new(172, 17, 200, 200);
    std::fs::write(
        &lone.nodes_file,
        cluster_text(PEERS, Some((4321, moved_ip))),
    )?;
    let took = wait_next_hop(&lone, cidr, moved_ip, Duration::from_secs(10))?;
    eprintln!("one node change applied at {PEERS} nodes in {took:?}");
    ensure!(lone
        .kernel_route(&format!("{cidr}/24"))?
        .contains(&moved_ip.to_string()));
    lone.ensure_alive()
}

#[test]
fn an_off_link_peer_is_retried_while_the_others_converge() -> Result<()> {
    mycni_tests::require_root!();
    // 192.0.2.9 is not on the uplink's subnet: a direct route via it is refused.
    let first = nodes_text(&[
        ("good-1", "172.16.0.2", "10.1.1.0/24"),
        ("off-link", "192.0.2.9", "10.1.2.0/24"),
        ("good-3", "172.16.0.3", "10.1.3.0/24"),
    ]);
    let mut lone = Lone::start("offlink", &first, &["--tunnel-mode", "direct"])?;
    for cidr in ["10.1.1.0/24", "10.1.3.0/24"] {
        wait_for(Duration::from_secs(5), || lone.has_route(cidr))
            .with_context(|| format!("{cidr} never routed:\n{}", lone.log.text()))?;
        ensure!(lone.kernel_route(cidr)?.contains("via 172.16.0."));
    }
    lone.log
        .wait_for(&["cannot apply peer 192.0.2.9"], Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_secs(2));
    lone.ensure_alive()?;
    ensure!(
        !lone.has_route("10.1.2.0/24")?,
        "ROUTES points at a refused peer"
    );
    let body = lone.metrics()?;
    ensure!(
        metric(&body, "mycni_peers_unapplied") == Some(1.0)
            && metric(&body, "mycni_peer_errors_total").unwrap_or(0.0) >= 2.0,
        "the failing peer is neither counted nor retried:\n{body}"
    );

    // A node added while one peer keeps failing converges like any other.
    let mut peers = vec![
        ("good-1", "172.16.0.2", "10.1.1.0/24"),
        ("off-link", "192.0.2.9", "10.1.2.0/24"),
        ("good-3", "172.16.0.3", "10.1.3.0/24"),
        ("good-4", "172.16.0.4", "10.1.4.0/24"),
    ];
    std::fs::write(&lone.nodes_file, nodes_text(&peers))?;
    wait_for(Duration::from_secs(3), || lone.has_route("10.1.4.0/24"))?;

    // The peer becomes reachable: the next retry routes it, without any file change.
    lone.node
        .netns
        .exec(&["ip", "route", "add", "192.0.2.0/24", "dev", "eth0"])?;
    let took = wait_for(Duration::from_secs(15), || lone.has_route("10.1.2.0/24"))
        .with_context(|| format!("never retried:\n{}", lone.log.text()))?;
    eprintln!("the off-link peer was routed {took:?} after it became reachable");
    ensure!(lone.kernel_route("10.1.2.0/24")?.contains("via 192.0.2.9"));
    lone.log
        .wait_for(&["peer 192.0.2.9", "applied after"], Duration::from_secs(2))?;
    ensure!(metric(&lone.metrics()?, "mycni_peers_unapplied") == Some(0.0));

    // And a removal still works for everyone.
    peers.retain(|(name, _, _)| *name != "good-1");
    std::fs::write(&lone.nodes_file, nodes_text(&peers))?;
    wait_for(Duration::from_secs(3), || {
        Ok(!lone.has_route("10.1.1.0/24")?)
    })?;
    lone.ensure_alive()
}

#[test]
fn a_full_routes_map_fails_one_peer_not_the_agent() -> Result<()> {
    mycni_tests::require_root!();
    let mut peers = vec![("good-1", "172.16.0.2", "10.1.1.0/24")];
    let mut lone = Lone::start("fullmap", &nodes_text(&peers), &[])?;
    wait_for(Duration::from_secs(5), || lone.has_route("10.1.1.0/24"))?;

    // Fill ROUTES for real with /32 entries out of the cluster's way, until the kernel
    // says it is full.
    let mut maps = mycni::datapath::Maps::open(&lone.node.pin_root())?;
    let filler = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
    let mut filled = 0;
    loop {
        match maps.write_remote_route(
            filler(filled),
            32,
            ROUTE_REMOTE_NODE,
            1,
            Ipv4Addr::new(172, 16, 0, 2),
        ) {
            Ok(()) => filled += 1,
            Err(e) => {
                eprintln!("ROUTES full after {filled} fillers: {e}");
                break;
            }
        }
        ensure!(filled <= mycni_common::MAX_ROUTES, "ROUTES never filled");
    }

    peers.push(("good-2", "172.16.0.3", "10.1.2.0/24"));
    std::fs::write(&lone.nodes_file, nodes_text(&peers))?;
    let line = lone
        .log
        .wait_for(&["cannot apply peer 172.16.0.3"], Duration::from_secs(5))?;
    eprintln!("agent log: {line}");
    std::thread::sleep(Duration::from_secs(2));
    lone.ensure_alive()?;
    ensure!(!lone.has_route("10.1.2.0/24")?);
    ensure!(
        lone.has_route("10.1.1.0/24")?,
        "a healthy peer lost its route"
    );
    let body = lone.metrics()?;
    ensure!(
        metric(&body, "mycni_peers_unapplied") == Some(1.0),
        "{body}"
    );

    // Room again: the retry takes it.
    maps.remove_route(filler(0), 32)?;
    wait_for(Duration::from_secs(15), || lone.has_route("10.1.2.0/24"))
        .with_context(|| format!("never retried:\n{}", lone.log.text()))?;
    ensure!(lone.kernel_route("10.1.2.0/24")?.contains("via 172.16.0.3"));
    ensure!(metric(&lone.metrics()?, "mycni_peers_unapplied") == Some(0.0));
    lone.ensure_alive()
}

#[test]
fn a_missing_or_unreadable_nodes_file_keeps_the_routes() -> Result<()> {
    mycni_tests::require_root!();
    let peers = [
        ("good-1", "172.16.0.2", "10.1.1.0/24"),
        ("good-2", "172.17.0.3", "10.1.2.0/24"),
    ];
    let mut lone = Lone::start("nofile", &nodes_text(&peers), &[])?;
    for (_, _, cidr) in peers {
        wait_for(Duration::from_secs(5), || lone.has_route(cidr))?;
    }
    let kernel_before = lone.node.netns.exec(&["ip", "-4", "route", "show"])?;

    std::fs::remove_file(&lone.nodes_file)?;
    lone.log.wait_for(
        &["cannot be read", "keeping the current routes"],
        Duration::from_secs(3),
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    for (_, _, cidr) in peers {
        ensure!(lone.has_route(cidr)?, "{cidr} withdrawn when the file went");
    }
    ensure!(lone.node.netns.exec(&["ip", "-4", "route", "show"])? == kernel_before);

    // Unreadable: a directory where the file was.
    std::fs::create_dir(&lone.nodes_file)?;
    lone.log.wait_for(
        &["Is a directory", "keeping the current routes"],
        Duration::from_secs(3),
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    for (_, _, cidr) in peers {
        ensure!(
            lone.has_route(cidr)?,
            "{cidr} withdrawn when the file became unreadable"
        );
    }
    let body = lone.metrics()?;
    ensure!(
        metric(&body, "mycni_node_source_errors_total").unwrap_or(0.0) >= 2.0,
        "{body}"
    );

    // A readable file again is applied as usual.
    std::fs::remove_dir(&lone.nodes_file)?;
    std::fs::write(&lone.nodes_file, nodes_text(&peers[..1]))?;
    wait_for(Duration::from_secs(3), || {
        Ok(!lone.has_route("10.1.2.0/24")?)
    })?;
    ensure!(lone.has_route("10.1.1.0/24")?);
    lone.ensure_alive()
}

/// This node's own pod CIDR as the datapath and the kernel hold it: the `own-cidr` entries
/// of `ROUTES`, and the kernel's `unreachable` routes.
fn own_cidr_state(lone: &Lone) -> Result<(Vec<String>, Vec<String>)> {
    let in_map = lone
        .routes()?
        .into_iter()
        .filter(|(_, _, route)| route.kind == ROUTE_LOCAL_CIDR)
        .map(|(ip, len, _)| format!("{ip}/{len}"))
        .collect();
    let kernel = lone
        .node
        .netns
        .exec(&["ip", "-4", "route", "show", "type", "unreachable"])?
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1).map(String::from))
        .collect();
    Ok((in_map, kernel))
}

#[test]
fn a_new_own_pod_cidr_replaces_the_old_one_in_routes_and_the_kernel() -> Result<()> {
    mycni_tests::require_root!();
    let peers = [("good-1", "172.16.0.2", "10.1.1.0/24")];
    let mut lone = Lone::start("owncidr", &nodes_text(&peers), &[])?;
    let first = vec![LOCAL_POD_CIDR.to_string()];
    wait_for(Duration::from_secs(5), || {
        Ok(own_cidr_state(&lone)? == (first.clone(), first.clone()))
    })
    .with_context(|| format!("own CIDR never installed:\n{}", lone.log.text()))?;
    let own_cidr_routes = |lone: &Lone| -> Result<Option<f64>> {
        Ok(metric(&lone.metrics()?, "mycni_routes{kind=\"own-cidr\"}"))
    };
    ensure!(own_cidr_routes(&lone)? == Some(1.0), "{}", lone.metrics()?);

    // The controller manager gave this node another CIDR (its Node was re-created): the
    // old one leaves ROUTES and the kernel, the new one takes its place.
    let moved = "10.254.0.0/24";
    let text = nodes_text(&peers).replace(LOCAL_POD_CIDR, moved);
    std::fs::write(&lone.nodes_file, text)?;
    let second = vec![moved.to_string()];
    let took = wait_for(Duration::from_secs(5), || {
        Ok(own_cidr_state(&lone)? == (second.clone(), second.clone()))
    })
    .with_context(|| {
        format!(
            "own CIDR not moved ({:?}):\n{}",
            own_cidr_state(&lone).ok(),
            lone.log.text()
        )
    })?;
    eprintln!("own pod CIDR moved in ROUTES and the kernel {took:?} after the file changed");
    ensure!(own_cidr_routes(&lone)? == Some(1.0), "{}", lone.metrics()?);
    ensure!(
        lone.has_route("10.1.1.0/24")?,
        "the peer lost its route meanwhile"
    );
    lone.ensure_alive()
}

#[test]
fn too_many_non_masquerade_cidrs_are_refused_at_start() -> Result<()> {
    mycni_tests::require_root!();
    let mut node = Node::bare(&prefix("nomasq"), "node", "10.255.0.0/24")?;
    node.netns
        .exec(&["ip", "addr", "add", &format!("{NODE_IP}/16"), "dev", "lo"])?;
    let cidrs: Vec<String> = (0..mycni_common::MAX_NO_MASQ)
        .map(|i| format!("192.168.{i}.0/24"))
        .collect();
    let mut cmd = node.netns.command(mycni_tests::agent_bin());
    cmd.arg("--bpffs-root")
        .arg(node.pin_root())
        .args(["run", "--node-name", "node-0", "--node-ip", NODE_IP])
        .args(["--uplink", "lo", "--cluster-cidr", CLUSTER_CIDR]);
    for cidr in &cidrs {
        cmd.args(["--non-masquerade-cidr", cidr]);
    }
    let out = cmd.env("RUST_BACKTRACE", "0").output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the agent started");
    ensure!(
        stderr.contains(&format!(
            "{} --non-masquerade-cidr given; NO_MASQ holds at most {}",
            cidrs.len(),
            mycni_common::MAX_NO_MASQ - 1
        )),
        "unclear refusal: {stderr}"
    );
    ensure!(
        !node.pin_root().join("ROUTES").exists(),
        "refused only after loading"
    );
    node.stop_agent();
    Ok(())
}

#[test]
fn pins_of_another_layout_version_are_refused_until_unloaded() -> Result<()> {
    mycni_tests::require_root!();
    let prefix = prefix("layoutver");
    let bpffs = mycni_tests::Bpffs::new(&prefix)?;
    let root = bpffs.mount_point.join("mycni");
    let netns = mycni_tests::Netns::new(&format!("{prefix}-node"))?;
    let agent = |command: &str| -> Result<std::process::Output> {
        Ok(netns
            .command(mycni_tests::agent_bin())
            .arg("--bpffs-root")
            .arg(&root)
            .arg(command)
            .env("RUST_BACKTRACE", "0")
            .output()?)
    };
    let first = agent("load")?;
    ensure!(first.status.success(), "{first:?}");
    let stamped = mycni::datapath::read_config(&root)?;
    ensure!(
        stamped.layout_version == LAYOUT_VERSION,
        "load did not stamp the layout version: {stamped:?}"
    );

    // Pins as another build (same map shapes, another layout) left them.
    let other = mycni_common::NodeConfig {
        layout_version: LAYOUT_VERSION + 1,
        ..stamped
    };
    mycni::datapath::write_config(&root, &other)?;
    let refused = agent("load")?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "reused pins of another layout");
    ensure!(
        stderr.contains(&format!(
            "layout version {}; this build uses {LAYOUT_VERSION}",
            LAYOUT_VERSION + 1
        )) && stderr.contains("mycni-agent unload"),
        "unclear refusal: {stderr}"
    );
    // The plugin refuses to write into them as well.
    ensure!(mycni::datapath::Maps::open(&root).is_err());

    // The documented way out: unload, load afresh.
    ensure!(agent("unload")?.status.success());
    let again = agent("load")?;
    ensure!(again.status.success(), "{again:?}");
    ensure!(mycni::datapath::read_config(&root)?.layout_version == LAYOUT_VERSION);
    ensure!(mycni::datapath::Maps::open(&root).is_ok());
    agent("unload")?;
    Ok(())
}
