//! Three nodes (two on one segment, one behind a router), pods on each, an external host:
//! direct routing, VXLAN, SNAT, kube-proxy-style DNAT and hostPort. Needs root.
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mycni_common::verdict;
use mycni_tests::cluster::{has_route, wait_for, Cluster, EXTERNAL_IP};
use mycni_tests::kubeproxy::Service;
use mycni_tests::{prefix, tcp_echo, udp_echo, Netns, Node, Pod};

const ALL: [&str; 3] = ["node-1", "node-2", "node-3"];

fn packets(node: &Node, which: u32) -> Result<u64> {
    Ok(mycni::datapath::read_stats(&node.pin_root())?[which as usize].packets)
}

/// ICMP, TCP and UDP from `from` to `to`; the server must see the client's own address.
fn check_pair(
    what: &str,
    from: &Netns,
    from_ip: Ipv4Addr,
    to: &Netns,
    to_ip: Ipv4Addr,
    port: u16,
) -> Result<()> {
    from.ping(to_ip).with_context(|| format!("{what}: icmp"))?;
    let target = SocketAddr::from((to_ip, port));
    let seen = tcp_echo(to, target, from, target).with_context(|| format!("{what}: tcp"))?;
    ensure!(
        seen.ip() == from_ip,
        "{what}: tcp server saw {seen}, not {from_ip}"
    );
    let seen = udp_echo(to, target, from, target).with_context(|| format!("{what}: udp"))?;
    ensure!(
        seen.ip() == from_ip,
        "{what}: udp server saw {seen}, not {from_ip}"
    );
    Ok(())
}

#[test]
fn pods_reach_each_other_across_nodes_and_the_outside_through_snat() -> Result<()> {
    let cluster = Cluster::new(&prefix("matrix"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let (n1, n2, n3) = (
        cluster.node("node-1"),
        cluster.node("node-2"),
        cluster.node("node-3"),
    );
    let a1 = n1.add_pod("a1")?;
    let a2 = n1.add_pod("a2")?;
    let b1 = n2.add_pod("b1")?;
    let c1 = n3.add_pod("c1")?;
    let pairs: [(&str, &Pod, &Pod); 6] = [
        ("same node", &a1, &a2),
        ("cross node direct", &a1, &b1),
        ("cross node direct, back", &b1, &a2),
        ("cross node vxlan", &a1, &c1),
        ("cross node vxlan, back", &c1, &b1),
        ("vxlan to the first segment", &c1, &a2),
    ];
    for (index, (what, from, to)) in pairs.iter().enumerate() {
        check_pair(
            what,
            &from.netns,
            from.ip,
            &to.netns,
            to.ip,
            7200 + index as u16,
        )?;
    }
    ensure!(
        packets(n1, verdict::REMOTE_DIRECT)? > 0,
        "node-1 sent nothing direct"
    );
    ensure!(
        packets(n1, verdict::REMOTE_TUNNEL)? > 0,
        "node-1 sent nothing through VXLAN"
    );
    ensure!(
        packets(n3, verdict::DELIVERED_FROM_NETDEV)? > 0,
        "node-3 delivered nothing from the wire"
    );

    // The nodes reach pods on every node through the kernel's fallback routes, and the
    // receiving node's stack forwards to the pod (from_netdev delivers only other nodes'
    // pods itself), so its conntrack sees both directions.
    let delivered = |node: &Node| packets(node, verdict::DELIVERED_FROM_NETDEV);
    let delivered_before = [delivered(n1)?, delivered(n2)?, delivered(n3)?];
    for (node, pod, port) in [(n1, &b1, 7300), (n1, &c1, 7301), (n3, &a1, 7302)] {
        node.netns
            .ping(pod.ip)
            .with_context(|| format!("{} -> {}", node.netns.name, pod.ip))?;
        let target = SocketAddr::from((pod.ip, port));
        let seen = tcp_echo(&pod.netns, target, &node.netns, target)?;
        ensure!(
            seen.ip() == node.node_ip,
            "pod saw node traffic from {seen}"
        );
    }
    ensure!(
        [delivered(n1)?, delivered(n2)?, delivered(n3)?] == delivered_before,
        "from_netdev delivered node traffic to a pod itself"
    );

    // Pods reach the outside masqueraded to their node's IP; the outside has no pod routes.
    ensure!(
        !cluster
            .external
            .exec(&["ip", "route", "show"])?
            .contains("10.244."),
        "the external host must not know pod routes"
    );
    for (node, pod, port) in [(n1, &a1, 7400), (n3, &c1, 7401), (n2, &b1, 7402)] {
        pod.netns
            .ping(EXTERNAL_IP)
            .with_context(|| format!("{} -> external icmp", pod.ip))?;
        let target = SocketAddr::from((EXTERNAL_IP, port));
        let seen = tcp_echo(&cluster.external, target, &pod.netns, target)?;
        ensure!(
            seen.ip() == node.node_ip,
            "external saw tcp from {seen}, not {}",
            node.node_ip
        );
        let seen = udp_echo(&cluster.external, target, &pod.netns, target)?;
        ensure!(
            seen.ip() == node.node_ip,
            "external saw udp from {seen}, not {}",
            node.node_ip
        );
    }
    // Replies are translated back and handed to the stack (reverse_nat), never delivered
    // past it.
    ensure!(packets(n1, verdict::SNAT)? > 0 && packets(n1, verdict::REVERSE_NAT)? > 0);
    let nat = mycni::datapath::NatTable::open(&n1.pin_root())?.entries()?;
    let occupancy = mycni::nat::occupancy(&nat);
    ensure!(
        occupancy.tcp >= 1 && occupancy.udp >= 1 && occupancy.icmp >= 1,
        "{occupancy:?}"
    );
    Ok(())
}

#[test]
fn stack_translated_flows_keep_working_cluster_ip_and_host_port() -> Result<()> {
    let cluster = Cluster::new(&prefix("svc"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let (n1, n2, n3) = (
        cluster.node("node-1"),
        cluster.node("node-2"),
        cluster.node("node-3"),
    );
    let backend_1 = n1.add_pod("be1")?;
    let backend_2 = n2.add_pod("be2")?;
    let client_1 = n1.add_pod("cl1")?;
    let client_3 = n3.add_pod("cl3")?;
    let local_svc = SocketAddr::from((backend_1.ip, 8080));
    let remote_svc = SocketAddr::from((backend_2.ip, 8080));
    let service = |name: &str, ip: [u8; 4], endpoint: SocketAddr| Service {
        name: name.to_string(),
        cluster_ip: ip.into(),
        port: 80,
        endpoints: vec![endpoint],
    };
    cluster.install_kube_proxy(&[
        service("default/local:http", [10, 96, 0, 10], local_svc),
        service("default/remote:http", [10, 96, 0, 11], remote_svc),
    ])?;
    let invalid_before = cluster.invalid_drops()?;
    let vip_10: SocketAddr = "10.96.0.10:80".parse()?;
    let vip_11: SocketAddr = "10.96.0.11:80".parse()?;
    for (what, backend, listen, client, vip) in [
        (
            "ClusterIP, backend on the same node",
            &backend_1,
            local_svc,
            &client_1,
            vip_10,
        ),
        (
            "ClusterIP, backend on another node (direct)",
            &backend_2,
            remote_svc,
            &client_1,
            vip_11,
        ),
        (
            "ClusterIP, backend across VXLAN",
            &backend_1,
            local_svc,
            &client_3,
            vip_10,
        ),
    ] {
        let seen = tcp_echo(&backend.netns, listen, &client.netns, vip)
            .with_context(|| what.to_string())?;
        ensure!(
            seen.ip() == client.ip,
            "{what}: backend saw {seen}, not the client {}",
            client.ip
        );
    }
    ensure!(
        packets(n1, verdict::STACK_FLOW_REPLY)? > 0,
        "no reply went back through the stack"
    );

    // hostPort: mycni then the reference portmap, chained the way a runtime does it.
    let web = n2.add_pod("web")?;
    let portmap = |command: &str| -> Result<mycni_tests::CniCall> {
        let mut conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "mycni-test", "type": "portmap", "snat": true,
            "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
            "prevResult": web.result,
        });
        conf["capabilities"] = serde_json::json!({"portMappings": true});
        let path = web.netns.path().display().to_string();
        let mut cmd = n2
            .netns
            .command(mycni_tests::reference_plugin_dir().join("portmap"));
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &web.container_id)
            .env("CNI_NETNS", &path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", mycni_tests::reference_plugin_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        Ok(mycni_tests::CniCall {
            exit_ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    };
    let added = portmap("ADD")?;
    ensure!(
        added.exit_ok,
        "portmap ADD: {} {}",
        added.stdout,
        added.stderr
    );
    let host_port = SocketAddr::from((n2.node_ip, 8080));
    tcp_echo(&web.netns, "0.0.0.0:80".parse()?, &n1.netns, host_port)
        .context("hostPort from node-1")?;
    tcp_echo(
        &web.netns,
        "0.0.0.0:80".parse()?,
        &client_3.netns,
        host_port,
    )
    .context("hostPort from a pod on node-3")?;
    ensure!(
        cluster.invalid_drops()? == invalid_before,
        "kube-proxy's INVALID rule dropped packets: {:?} -> {:?}",
        invalid_before,
        cluster.invalid_drops()?
    );
    let deleted = portmap("DEL")?;
    ensure!(
        deleted.exit_ok,
        "portmap DEL: {} {}",
        deleted.stdout,
        deleted.stderr
    );
    Ok(())
}

#[test]
fn a_thousand_egress_connections_get_distinct_translated_ports() -> Result<()> {
    let cluster = Cluster::new(&prefix("snat1k"), &["node-1"], &[])?;
    let n1 = cluster.node("node-1");
    let pods = (0..10)
        .map(|i| n1.add_pod(&format!("p{i}")))
        .collect::<Result<Vec<_>>>()?;
    let listener = cluster
        .external
        .run_inside(|| Ok(TcpListener::bind((EXTERNAL_IP, 9000))?))?;
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || -> Result<(Vec<SocketAddr>, Vec<TcpStream>)> {
        let (mut peers, mut held) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while peers.len() < 1000 && Instant::now() < deadline {
            match listener.accept() {
                Ok((conn, peer)) => {
                    peers.push(peer);
                    held.push(conn);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => bail!("accept: {e}"),
            }
        }
        Ok((peers, held))
    });
    let clients: Vec<Vec<TcpStream>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                scope.spawn(move || {
                    pod.netns.run_inside(|| {
                        (0..100)
                            .map(|_| {
                                let target = SocketAddr::from((EXTERNAL_IP, 9000));
                                let mut stream =
                                    TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
                                stream.write_all(b"x")?;
                                Ok(stream)
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let (peers, _held) = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(clients.iter().map(Vec::len).sum::<usize>() == 1000);
    ensure!(
        peers.len() == 1000,
        "the external host accepted {} of 1000 connections",
        peers.len()
    );
    ensure!(
        peers.iter().all(|p| p.ip() == n1.node_ip),
        "a connection arrived unmasqueraded"
    );
    let ports: BTreeSet<u16> = peers.iter().map(|p| p.port()).collect();
    ensure!(
        ports.len() == 1000,
        "only {} distinct translated ports",
        ports.len()
    );
    let occupancy =
        mycni::nat::occupancy(&mycni::datapath::NatTable::open(&n1.pin_root())?.entries()?);
    ensure!(occupancy.tcp >= 1000, "{occupancy:?}");
    Ok(())
}

#[test]
fn nodes_file_changes_add_and_remove_routes() -> Result<()> {
    let cluster = Cluster::new(&prefix("nodesfile"), &["node-1", "node-2"], &[])?;
    let (n1, n3) = (cluster.node("node-1"), cluster.node("node-3"));
    let a1 = n1.add_pod("a1")?;
    let c1 = n3.add_pod("c1")?;
    wait_for(Duration::from_secs(5), || has_route(n1, "10.244.2.0/24"))?;
    ensure!(!has_route(n1, "10.244.3.0/24")?);
    ensure!(
        a1.netns
            .exec(&["ping", "-c", "1", "-W", "1", &c1.ip.to_string()])
            .is_err(),
        "reached an unknown node"
    );

    cluster.write_nodes_file(&ALL)?;
    let took = wait_for(Duration::from_secs(3), || has_route(n1, "10.244.3.0/24"))?;
    eprintln!("node-3 learned by node-1 after {took:?}");
    let kernel = n1.netns.exec(&["ip", "route", "show", "10.244.3.0/24"])?;
    ensure!(
        kernel.contains("mycni_vxlan"),
        "no kernel fallback route: {kernel:?}"
    );
    wait_for(Duration::from_secs(3), || has_route(n3, "10.244.1.0/24"))?;
    a1.netns.ping(c1.ip)?;

    cluster.write_nodes_file(&["node-1", "node-2"])?;
    let took = wait_for(Duration::from_secs(3), || {
        Ok(!has_route(n1, "10.244.3.0/24")?)
    })?;
    eprintln!("node-3 forgotten by node-1 after {took:?}");
    ensure!(
        n1.netns
            .exec(&["ip", "route", "show", "10.244.3.0/24"])?
            .trim()
            .is_empty(),
        "kernel route left"
    );
    Ok(())
}

#[test]
fn ten_megabytes_cross_vxlan_without_a_pmtu_black_hole() -> Result<()> {
    let cluster = Cluster::new(&prefix("bulk"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let a1 = cluster.node("node-1").add_pod("a1")?;
    let c1 = cluster.node("node-3").add_pod("c1")?;
    const SIZE: usize = 10 * 1024 * 1024;
    let listener = c1
        .netns
        .run_inside(|| Ok(TcpListener::bind((c1.ip, 9100))?))?;
    let server = std::thread::spawn(move || -> Result<usize> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n;
        }
        conn.write_all(&(total as u64).to_be_bytes())?;
        Ok(total)
    });
    let echoed = a1.netns.run_inside(|| {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::from((c1.ip, 9100)), Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let chunk = vec![0x5au8; 65536];
        for _ in 0..SIZE / chunk.len() {
            stream.write_all(&chunk)?;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut count = [0u8; 8];
        stream.read_exact(&mut count)?;
        Ok(u64::from_be_bytes(count) as usize)
    })?;
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(
        received == SIZE && echoed == SIZE,
        "sent {SIZE}, received {received}"
    );
    Ok(())
}

#[test]
fn forced_vxlan_mode_tunnels_even_on_link_peers() -> Result<()> {
    let cluster = Cluster::new(&prefix("forcevx"), &ALL, &["--tunnel-mode", "vxlan"])?;
    cluster.wait_for_full_mesh()?;
    let (n1, n2) = (cluster.node("node-1"), cluster.node("node-2"));
    let routes = mycni::datapath::Maps::open(&n1.pin_root())?.routes()?;
    let to_node_2 = routes
        .iter()
        .find(|(ip, len, _)| format!("{ip}/{len}") == "10.244.2.0/24")
        .context("no route to node-2")?;
    ensure!(
        to_node_2.2.kind == mycni_common::ROUTE_REMOTE_TUNNEL,
        "{:?}",
        to_node_2.2
    );
    let a1 = n1.add_pod("a1")?;
    let b1 = n2.add_pod("b1")?;
    let before = packets(n1, verdict::REMOTE_TUNNEL)?;
    check_pair(
        "forced vxlan on one segment",
        &a1.netns,
        a1.ip,
        &b1.netns,
        b1.ip,
        7500,
    )?;
    ensure!(packets(n1, verdict::REMOTE_TUNNEL)? > before);
    ensure!(
        packets(n1, verdict::REMOTE_DIRECT)? == 0,
        "something went direct"
    );
    Ok(())
}

#[test]
fn the_agent_expires_idle_nat_entries_per_protocol() -> Result<()> {
    let cluster = Cluster::new(
        &prefix("natexp"),
        &["node-1"],
        &["--nat-timeout-udp", "1", "--nat-timeout-tcp", "3600"],
    )?;
    let n1 = cluster.node("node-1");
    let a1 = n1.add_pod("a1")?;
    let target = SocketAddr::from((EXTERNAL_IP, 9200));
    udp_echo(&cluster.external, target, &a1.netns, target)?;
    tcp_echo(&cluster.external, target, &a1.netns, target)?;
    let occupancy = || -> Result<mycni::nat::NatOccupancy> {
        Ok(mycni::nat::occupancy(
            &mycni::datapath::NatTable::open(&n1.pin_root())?.entries()?,
        ))
    };
    let start = occupancy()?;
    ensure!(start.udp == 1 && start.tcp == 1, "{start:?}");
    // UDP idles out after 1 s (the agent sweeps every second); TCP's hour keeps it.
    let took = wait_for(Duration::from_secs(5), || Ok(occupancy()?.udp == 0))?;
    eprintln!("idle UDP flow expired after {took:?}");
    let end = occupancy()?;
    ensure!(end.tcp == 1 && end.entries == 2, "{end:?}");
    Ok(())
}

#[test]
fn killing_and_restarting_the_agent_drops_no_flow() -> Result<()> {
    let mut cluster = Cluster::new(&prefix("restart"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let a1 = cluster.node("node-1").add_pod("a1")?;
    let b1 = cluster.node("node-2").add_pod("b1")?;
    let c1 = cluster.node("node-3").add_pod("c1")?;

    // A long TCP stream node-1 -> node-2 and a ping node-1 -> node-3 (VXLAN) run throughout.
    let listener = b1
        .netns
        .run_inside(|| Ok(TcpListener::bind((b1.ip, 9300))?))?;
    let reader = std::thread::spawn(move || -> Result<u64> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (mut total, mut buf) = (0u64, vec![0u8; 65536]);
        loop {
            match conn.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let mut stream = a1.netns.run_inside(|| {
        Ok(TcpStream::connect_timeout(
            &SocketAddr::from((b1.ip, 9300)),
            Duration::from_secs(3),
        )?)
    })?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let writer = std::thread::spawn(move || -> Result<u64> {
        let chunk = vec![0x42u8; 16 * 1024];
        let (start, mut sent) = (Instant::now(), 0u64);
        while start.elapsed() < Duration::from_secs(4) {
            stream.write_all(&chunk).context("the stream broke")?;
            sent += chunk.len() as u64;
            std::thread::sleep(Duration::from_millis(2));
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(sent)
    });
    let ping = a1
        .netns
        .command("ping")
        .args([
            "-q",
            "-i",
            "0.02",
            "-c",
            "150",
            "-W",
            "1",
            &c1.ip.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;

    std::thread::sleep(Duration::from_millis(800));
    // kill -9 every agent, leave them down a moment, then start them again (an upgrade is
    // the same: the new build re-pins its programs and replaces the uplink filters).
    for node in cluster.nodes.iter_mut() {
        node.stop_agent();
    }
    std::thread::sleep(Duration::from_millis(800));
    let from_pod_id = |node: &Node, pod: &Pod| -> Result<u32> {
        let link = pod.result["interfaces"][0]["name"]
            .as_str()
            .context("no host veth")?
            .to_string();
        node.netns.run_inside(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let netlink = mycni::netlink::Netlink::current()?;
                let index = netlink
                    .link_by_name(&link)
                    .await?
                    .context("veth gone")?
                    .index;
                let programs = netlink.ingress_bpf_programs(index).await?;
                Ok(programs.first().context("nothing attached")?.1)
            })
        })
    };
    let old_program = from_pod_id(cluster.node("node-1"), &a1)?;
    for node in cluster.nodes.iter_mut() {
        node.start_agent(&[])?;
    }
    // The restarted agent loaded its programs afresh and swapped them in on old pods too.
    wait_for(Duration::from_secs(5), || {
        Ok(from_pod_id(cluster.node("node-1"), &a1)? != old_program)
    })
    .context("the old pod still runs the old program")?;
    // New pods can be added at once, and reach the old ones.
    let a2 = cluster.node("node-1").add_pod("a2")?;
    a2.netns.ping(c1.ip)?;

    let sent = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    ensure!(
        sent == received,
        "sent {sent} bytes, the other node received {received}"
    );
    let out = ping.wait_with_output()?;
    let summary = String::from_utf8_lossy(&out.stdout);
    ensure!(
        summary.contains("150 received"),
        "ping lost packets across the restart: {summary}"
    );
    Ok(())
}
