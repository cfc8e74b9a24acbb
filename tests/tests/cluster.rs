//! Three nodes (two on one segment, one behind a router), pods on each, an external host:
//! direct routing, VXLAN, SNAT, kube-proxy-style DNAT and hostPort. Needs root.
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mycni_common::verdict;
use mycni_tests::cluster::{has_route, wait_for, Cluster, EXTERNAL_IP};
use mycni_tests::kubeproxy::{self, Service};
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
    mycni_tests::require_root!();
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

/// One UDP round trip from `client` to `target` on a connected socket, which takes a
/// datagram only from `target` itself: a reply rewritten to another source never arrives.
/// Returns the client address the server in `server` saw.
fn connected_udp_echo(server: &Netns, client: &Netns, target: SocketAddr) -> Result<SocketAddr> {
    let socket = server.run_inside(|| Ok(std::net::UdpSocket::bind(target)?))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let serve = std::thread::spawn(move || -> Result<SocketAddr> {
        let mut buf = [0u8; 64];
        let (n, peer) = socket.recv_from(&mut buf)?;
        socket.send_to(&buf[..n], peer)?;
        Ok(peer)
    });
    let reply = client.run_inside(|| {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send(b"from the subnet")?;
        let mut buf = [0u8; 64];
        let n = socket
            .recv(&mut buf)
            .with_context(|| format!("no UDP reply from {target} itself"))?;
        Ok(buf[..n].to_vec())
    })?;
    let seen = serve
        .join()
        .map_err(|_| anyhow::anyhow!("udp echo server panicked"))??;
    ensure!(
        reply == b"from the subnet",
        "udp echo came back as {reply:?}"
    );
    Ok(seen)
}

/// A host on the nodes' subnet that is not a node (a control plane whose API server proxies
/// to pods, a router with routes to the pod CIDRs) reaches pods through each node, and the
/// pods' replies leave with their own addresses: they answer a flow the stack delivered, so
/// `to_netdev` must not masquerade them (the client would reset a reply from the node IP).
#[test]
fn a_host_on_the_node_subnet_reaches_pods_and_hears_their_own_addresses() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("subnet"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    for spec in &mycni_tests::cluster::NODES {
        cluster.router.exec(&[
            "ip",
            "route",
            "add",
            spec.pod_cidr,
            "via",
            &spec.ip.to_string(),
        ])?;
    }
    let pods = [
        cluster.node("node-1").add_pod("p1")?,
        cluster.node("node-2").add_pod("p2")?,
        cluster.node("node-3").add_pod("p3")?,
    ];
    let snat_before: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|node| packets(node, verdict::SNAT))
        .collect::<Result<_>>()?;
    // The router speaks to each node's subnet from its own address there (the gateway).
    for (index, (pod, spec)) in pods.iter().zip(&mycni_tests::cluster::NODES).enumerate() {
        let router_ip = spec.gateway;
        let target = SocketAddr::from((pod.ip, 7500 + index as u16));
        let peers = mycni_tests::tcp_conversation(&pod.netns, target, &cluster.router, target, 3)
            .with_context(|| format!("router -> {target}: tcp"))?;
        ensure!(
            peers.server_saw.ip() == router_ip,
            "{target}: the pod saw {}, not the router",
            peers.server_saw
        );
        ensure!(
            peers.client_saw == target,
            "{target}: the router's socket is connected to {}",
            peers.client_saw
        );
        let seen = connected_udp_echo(&pod.netns, &cluster.router, target)
            .with_context(|| format!("router -> {target}: udp"))?;
        ensure!(
            seen.ip() == router_ip,
            "{target}: the pod saw udp from {seen}"
        );
        cluster
            .router
            .ping(pod.ip)
            .with_context(|| format!("router -> {}: icmp", pod.ip))?;
    }
    let snat_after: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|node| packets(node, verdict::SNAT))
        .collect::<Result<_>>()?;
    ensure!(
        snat_after == snat_before,
        "a reply to the subnet host was masqueraded: SNAT counters {snat_before:?} -> {snat_after:?}"
    );
    Ok(())
}

#[test]
fn stack_translated_flows_keep_working_cluster_ip_and_host_port() -> Result<()> {
    mycni_tests::require_root!();
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
    mycni_tests::require_root!();
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
    mycni_tests::require_root!();
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
    mycni_tests::require_root!();
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
    mycni_tests::require_root!();
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
    mycni_tests::require_root!();
    let cluster = Cluster::new(
        &prefix("natexp"),
        &["node-1"],
        &["--nat-timeout-udp", "1", "--nat-timeout-tcp", "3600"],
    )?;
    let n1 = cluster.node("node-1");
    let a1 = n1.add_pod("a1")?;
    let target = SocketAddr::from((EXTERNAL_IP, 9200));
    udp_echo(&cluster.external, target, &a1.netns, target)?;
    // One TCP connection stays open, one is closed both ways.
    let listener = cluster
        .external
        .run_inside(|| Ok(TcpListener::bind(target)?))?;
    let open = a1
        .netns
        .run_inside(|| Ok(TcpStream::connect_timeout(&target, Duration::from_secs(3))?))?;
    let (mut accepted, _) = listener.accept()?;
    let mut open = open;
    open.write_all(b"x")?;
    let mut byte = [0u8; 1];
    accepted.read_exact(&mut byte)?;
    let server = serve_closing(listener, 1);
    a1.netns.run_inside(|| closed_connection(target))?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let occupancy = || -> Result<mycni::nat::NatOccupancy> {
        Ok(mycni::nat::occupancy(
            &mycni::datapath::NatTable::open(&n1.pin_root())?.entries()?,
        ))
    };
    let start = occupancy()?;
    ensure!(start.udp == 1 && start.tcp == 2, "{start:?}");
    // [syn_sent, syn_received, established, closing, closed]
    ensure!(start.tcp_states == [0, 0, 1, 0, 1], "{start:?}");
    // UDP idles out after 1 s (the agent sweeps every second), the closed TCP connection
    // after 5 s; the open one's hour keeps it.
    let took = wait_for(Duration::from_secs(5), || Ok(occupancy()?.udp == 0))?;
    eprintln!("idle UDP flow expired after {took:?}");
    let took = wait_for(Duration::from_secs(10), || Ok(occupancy()?.tcp == 1))?;
    eprintln!("closed TCP flow expired after {took:?} more");
    let end = occupancy()?;
    ensure!(
        end.tcp == 1 && end.tcp_states[2] == 1 && end.entries == 2,
        "{end:?}"
    );
    // And the open connection still works.
    open.write_all(b"y")?;
    accepted.read_exact(&mut byte)?;
    ensure!(&byte == b"y");
    Ok(())
}

#[test]
fn killing_and_restarting_the_agent_drops_no_flow() -> Result<()> {
    mycni_tests::require_root!();
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

/// A one-node cluster whose SNAT has only the ports `nat_ports` (`first-last`), with one
/// pod, `a1`.
fn one_pod_with_nat_ports(name: &str, nat_ports: &str) -> Result<(Cluster, Pod)> {
    let cluster = Cluster::new(&prefix(name), &["node-1"], &["--nat-ports", nat_ports])?;
    let a1 = cluster.node("node-1").add_pod("a1")?;
    Ok((cluster, a1))
}

/// Connects, sends a byte, closes first and waits for the server's FIN.
fn closed_connection(target: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"x")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut byte = [0u8; 1];
    ensure!(stream.read(&mut byte)? == 0, "the server sent data");
    Ok(())
}

/// Accepts `count` connections on `listener`, reading each to its FIN before closing.
fn serve_closing(
    listener: TcpListener,
    count: usize,
) -> std::thread::JoinHandle<Result<Vec<SocketAddr>>> {
    std::thread::spawn(move || -> Result<Vec<SocketAddr>> {
        let mut peers = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..count {
            let (mut conn, peer) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            while conn.read(&mut buf)? > 0 {}
            peers.push(peer);
        }
        Ok(peers)
    })
}

#[test]
fn closed_connections_give_their_ports_back_at_once() -> Result<()> {
    let (cluster, a1) = one_pod_with_nat_ports("natclose", "61000-61009")?;
    let n1 = cluster.node("node-1");
    let target = SocketAddr::from((EXTERNAL_IP, 9400));
    let listener = cluster
        .external
        .run_inside(|| Ok(TcpListener::bind(target)?))?;
    let server = serve_closing(listener, 20);
    let started = Instant::now();
    a1.netns.run_inside(|| {
        for attempt in 1..=20 {
            closed_connection(target).with_context(|| format!("connection {attempt} of 20"))?;
        }
        Ok(())
    })?;
    let took = started.elapsed();
    let peers = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(
        peers
            .iter()
            .all(|p| p.ip() == n1.node_ip && (61000..=61009).contains(&p.port())),
        "connections left from outside the port range: {peers:?}"
    );
    eprintln!("20 closed connections through 10 ports in {took:?}");
    ensure!(
        took < Duration::from_secs(5),
        "20 connections took {took:?}: ports waited for expiry"
    );
    ensure!(packets(n1, verdict::DROP_NAT_EXHAUSTED)? == 0);
    Ok(())
}

/// Seconds of the churn test (`MYCNI_CHURN_SECS`, default 12: more connections than the
/// 4536 ports; `cargo xtask bench` runs 60).
fn churn_seconds() -> u64 {
    std::env::var("MYCNI_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

#[test]
fn a_pod_sustains_500_new_connections_per_second_to_one_peer() -> Result<()> {
    let cluster = Cluster::new(&prefix("natchurn"), &["node-1"], &[])?;
    let n1 = cluster.node("node-1");
    let a1 = n1.add_pod("a1")?;
    let target = SocketAddr::from((EXTERNAL_IP, 9450));
    let seconds = churn_seconds();
    let churn = mycni_tests::bench::connection_churn(
        &cluster.external,
        &a1.netns,
        target,
        500,
        Duration::from_secs(seconds),
    )?;
    eprintln!(
        "{} of {} connections in {:?}: {:.0}/s",
        churn.completed,
        churn.attempted,
        churn.elapsed,
        churn.rate()
    );
    ensure!(churn.completed == churn.attempted, "{churn:?}");
    ensure!(
        packets(n1, verdict::DROP_NAT_EXHAUSTED)? == 0,
        "SNAT ran out of ports"
    );
    // Paced at 500/s; a loaded machine falls somewhat behind (the NAT never refuses).
    ensure!(
        churn.completed >= 400 * seconds,
        "only {:.0} connections/s",
        churn.rate()
    );
    // More connections than the 4536 ports: closed flows' ports were reused.
    ensure!(
        seconds < 12 || churn.completed > 4536,
        "{} connections",
        churn.completed
    );
    Ok(())
}

#[test]
fn the_port_search_finds_the_last_free_port_and_refuses_beyond() -> Result<()> {
    let (cluster, a1) = one_pod_with_nat_ports("natfull", "61000-61199")?;
    let n1 = cluster.node("node-1");
    let target = SocketAddr::from((EXTERNAL_IP, 9500));
    let listener = cluster
        .external
        .run_inside(|| Ok(TcpListener::bind(target)?))?;
    let server = std::thread::spawn(move || -> Result<Vec<TcpStream>> {
        (0..200).map(|_| Ok(listener.accept()?.0)).collect()
    });
    let held = a1.netns.run_inside(|| {
        (1..=200)
            .map(|n| {
                TcpStream::connect_timeout(&target, Duration::from_secs(3))
                    .with_context(|| format!("connection {n} of 200"))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let accepted = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let ports: BTreeSet<u16> = accepted
        .iter()
        .map(|c| Ok(c.peer_addr()?.port()))
        .collect::<Result<_>>()?;
    ensure!(ports.len() == 200 && ports.iter().all(|p| (61000..=61199).contains(p)));
    ensure!(packets(n1, verdict::DROP_NAT_EXHAUSTED)? == 0);
    // Every port is held by an open connection: the 201st is refused, at once.
    let started = Instant::now();
    let refused = a1
        .netns
        .run_inside(|| Ok(TcpStream::connect_timeout(&target, Duration::from_secs(3))));
    let took = started.elapsed();
    match refused? {
        Ok(_) => bail!("a 201st connection got through 200 ports"),
        Err(e) => ensure!(
            e.kind() == std::io::ErrorKind::ConnectionRefused,
            "the 201st connection failed with {e} after {took:?}, not refused"
        ),
    }
    ensure!(
        took < Duration::from_millis(500),
        "refused only after {took:?}"
    );
    ensure!(packets(n1, verdict::DROP_NAT_EXHAUSTED)? >= 1);
    drop(held);
    Ok(())
}

#[test]
fn icmp_errors_about_masqueraded_flows_reach_the_pod() -> Result<()> {
    let cluster = Cluster::new(&prefix("naticmp"), &["node-1"], &[])?;
    let n1 = cluster.node("node-1");
    let a1 = n1.add_pod("a1")?;
    // Port unreachable from the external host: the pod's UDP socket sees ECONNREFUSED.
    let closed = SocketAddr::from((EXTERNAL_IP, 9701));
    let answer = a1.netns.run_inside(|| {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        socket.connect(closed)?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send(b"anyone?")?;
        let mut buf = [0u8; 16];
        Ok(socket.recv(&mut buf).map(|_| ()))
    })?;
    match answer {
        Ok(()) => bail!("a closed port answered"),
        Err(e) => ensure!(
            e.kind() == std::io::ErrorKind::ConnectionRefused,
            "UDP to a closed port: {e}, not ECONNREFUSED"
        ),
    }
    ensure!(packets(n1, verdict::ICMP_ERROR_TRANSLATED)? >= 1);

    // A 1200-byte hop after the router: fragmentation-needed must reach the pod, or the
    // upload stalls (path MTU black hole).
    cluster
        .router
        .exec(&["ip", "link", "set", "x0", "mtu", "1200"])?;
    let target = SocketAddr::from((EXTERNAL_IP, 9702));
    let listener = cluster
        .external
        .run_inside(|| Ok(TcpListener::bind(target)?))?;
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
    let before = packets(n1, verdict::ICMP_ERROR_TRANSLATED)?;
    let started = Instant::now();
    a1.netns.run_inside(|| {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&vec![0x5a; 300 * 1024])?;
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })?;
    let received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?
        .context("the upload through the 1200-byte hop stalled (path MTU black hole)")?;
    ensure!(
        received == 300 * 1024,
        "the external host received {received} of {} bytes",
        300 * 1024
    );
    eprintln!("300 kB through a 1200-byte hop in {:?}", started.elapsed());
    ensure!(packets(n1, verdict::ICMP_ERROR_TRANSLATED)? > before);

    // The other way: the pod's port unreachable about a late reply (its socket is gone)
    // leaves from the node IP quoting the translated tuple, so the peer's socket, which
    // knows only the node IP and port, sees ECONNREFUSED.
    let service = SocketAddr::from((EXTERNAL_IP, 9703));
    let peer_socket = cluster
        .external
        .run_inside(|| Ok(std::net::UdpSocket::bind(service)?))?;
    peer_socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    a1.netns.run_inside(|| {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        socket.send_to(b"hello", service)?;
        Ok(())
    })?;
    let mut buf = [0u8; 16];
    let (_, translated) = peer_socket.recv_from(&mut buf)?;
    ensure!(translated.ip() == n1.node_ip, "{translated}");
    peer_socket.connect(translated)?;
    let before = packets(n1, verdict::ICMP_ERROR_TRANSLATED)?;
    peer_socket.send(b"late reply")?;
    match peer_socket.recv(&mut buf) {
        Ok(_) => bail!("the pod's closed socket answered"),
        Err(e) => ensure!(
            e.kind() == std::io::ErrorKind::ConnectionRefused,
            "a late reply to the pod's closed port: {e}, not ECONNREFUSED at the peer"
        ),
    }
    ensure!(packets(n1, verdict::ICMP_ERROR_TRANSLATED)? > before);
    Ok(())
}

/// Sends one `size`-byte datagram from `client` to an echo server on `server` and waits
/// for it to come back whole.
fn big_udp_echo(server: &Netns, client: &Netns, target: SocketAddr, size: usize) -> Result<()> {
    let socket = server.run_inside(|| Ok(std::net::UdpSocket::bind(target)?))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let echo = std::thread::spawn(move || -> Result<usize> {
        let mut buf = vec![0u8; 65536];
        let (n, peer) = socket.recv_from(&mut buf)?;
        socket.send_to(&buf[..n], peer)?;
        Ok(n)
    });
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let reply = client.run_inside(|| {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send_to(&payload, target)?;
        let mut buf = vec![0u8; 65536];
        let (n, _) = socket.recv_from(&mut buf).context("no echo")?;
        buf.truncate(n);
        Ok(buf)
    })?;
    let seen = echo
        .join()
        .map_err(|_| anyhow::anyhow!("echo panicked"))??;
    ensure!(seen == size, "the server got {seen} of {size} bytes");
    ensure!(
        reply == payload,
        "the echo came back as {} bytes",
        reply.len()
    );
    Ok(())
}

#[test]
fn fragments_follow_their_first_fragment_through_snat() -> Result<()> {
    let cluster = Cluster::new(&prefix("natfrag"), &["node-1"], &[])?;
    let n1 = cluster.node("node-1");
    let a1 = n1.add_pod("a1")?;
    let out = a1.netns.exec(&[
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "-s",
        "3000",
        &EXTERNAL_IP.to_string(),
    ]);
    let out = out.context("ping -s 3000 to the external host")?;
    ensure!(out.contains("2 received"), "{out}");
    big_udp_echo(
        &cluster.external,
        &a1.netns,
        SocketAddr::from((EXTERNAL_IP, 9800)),
        4000,
    )
    .context("4000-byte UDP to the external host and back")?;
    ensure!(packets(n1, verdict::FRAGMENT_TRANSLATED)? >= 4);
    ensure!(packets(n1, verdict::DROP_FRAGMENT_UNTRACKED)? == 0);
    Ok(())
}

/// Pins the calling thread to one CPU.
fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch the set we own; pid 0 is the calling thread.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    ensure!(pinned == 0, "cannot pin to CPU {cpu}");
    Ok(())
}

#[test]
fn two_cpus_sending_a_new_flows_first_packets_at_once_agree_on_one_port() -> Result<()> {
    const FLOWS: usize = 1500;
    ensure!(
        std::thread::available_parallelism()?.get() >= 2,
        "needs two CPUs"
    );
    let cluster = Cluster::new(&prefix("natrace"), &["node-1"], &[])?;
    let n1 = cluster.node("node-1");
    let a1 = n1.add_pod("a1")?;
    let target = SocketAddr::from((EXTERNAL_IP, 9900));
    let server = cluster
        .external
        .run_inside(|| Ok(std::net::UdpSocket::bind(target)?))?;
    server.set_read_timeout(Some(Duration::from_secs(3)))?;
    let receiver = std::thread::spawn(move || -> Result<Vec<(u32, SocketAddr)>> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 16];
        while seen.len() < 2 * FLOWS {
            match server.recv_from(&mut buf) {
                Ok((4, peer)) => {
                    seen.push((u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]), peer))
                }
                Ok(_) => bail!("a datagram of the wrong size"),
                Err(_) => break,
            }
        }
        Ok(seen)
    });
    // One socket per flow; two threads on two CPUs send each flow's first datagram at once.
    let sockets = a1.netns.run_inside(|| {
        (0..FLOWS)
            .map(|_| Ok(std::net::UdpSocket::bind(("0.0.0.0", 0))?))
            .collect::<Result<Vec<_>>>()
    })?;
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|scope| -> Result<()> {
        let senders: Vec<_> = (0..2)
            .map(|cpu| {
                let (sockets, barrier) = (&sockets, &barrier);
                scope.spawn(move || -> Result<()> {
                    pin_to_cpu(cpu)?;
                    for (index, socket) in sockets.iter().enumerate() {
                        barrier.wait();
                        socket.send_to(&(index as u32).to_be_bytes(), target)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for sender in senders {
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        }
        Ok(())
    })?;
    let seen = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let mut ports: std::collections::BTreeMap<u32, BTreeSet<u16>> = Default::default();
    for (index, peer) in &seen {
        ports.entry(*index).or_default().insert(peer.port());
    }
    let split: Vec<_> = ports.iter().filter(|(_, p)| p.len() > 1).collect();
    eprintln!(
        "{} datagrams of {FLOWS} flows arrived; {} flows left with two ports",
        seen.len(),
        split.len()
    );
    ensure!(split.is_empty(), "flows with two ports: {split:?}");
    ensure!(
        seen.len() == 2 * FLOWS,
        "only {} datagrams arrived",
        seen.len()
    );
    // And no reply entry was left behind by a loser: one ingress entry per flow.
    let entries = mycni::datapath::NatTable::open(&n1.pin_root())?.entries()?;
    let udp = |direction| {
        entries
            .iter()
            .filter(|(k, e)| k.proto == 17 && e.direction == direction)
            .count()
    };
    let (egress, ingress) = (
        udp(mycni_common::NAT_EGRESS),
        udp(mycni_common::NAT_INGRESS),
    );
    ensure!(
        egress == FLOWS && ingress == FLOWS,
        "{egress} egress and {ingress} ingress UDP entries for {FLOWS} flows"
    );
    Ok(())
}

#[test]
fn large_udp_replies_through_a_cluster_ip_keep_their_fragments_together() -> Result<()> {
    let cluster = Cluster::new(&prefix("fragsvc"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let (n1, n2) = (cluster.node("node-1"), cluster.node("node-2"));
    let client = n1.add_pod("cl")?;
    let local = n1.add_pod("be1")?;
    let remote = n2.add_pod("be2")?;
    // kube-proxy-style UDP ClusterIPs (like DNS): one backend on this node, one on another.
    for (vip, backend) in [([10, 96, 0, 53], &local), ([10, 96, 0, 54], &remote)] {
        let backend = SocketAddr::from((backend.ip, 5353));
        kubeproxy::add_udp_cluster_ip(&n1.netns, Ipv4Addr::from(vip), 53, backend)?;
    }
    // The echo answers 4000 bytes: three fragments at the pods' 1450-byte MTU, of which
    // only the first has ports; all must be un-DNATed by the stack.
    for (what, vip, backend) in [
        ("backend on the same node", "10.96.0.53", &local),
        ("backend on another node", "10.96.0.54", &remote),
    ] {
        let listen = SocketAddr::from((backend.ip, 5353));
        let socket = backend
            .netns
            .run_inside(|| Ok(std::net::UdpSocket::bind(listen)?))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        let answer = std::thread::spawn(move || -> Result<()> {
            let mut buf = [0u8; 64];
            let (_, peer) = socket.recv_from(&mut buf)?;
            socket.send_to(&[0x42; 4000], peer)?;
            Ok(())
        });
        let vip: SocketAddr = format!("{vip}:53").parse()?;
        let reply = client.netns.run_inside(|| {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.send_to(b"big answer please", vip)?;
            let mut buf = vec![0u8; 65536];
            let (n, from) = socket.recv_from(&mut buf).context("no answer")?;
            Ok((n, from))
        });
        answer
            .join()
            .map_err(|_| anyhow::anyhow!("backend panicked"))??;
        let (n, from) = reply.with_context(|| what.to_string())?;
        ensure!(n == 4000 && from == vip, "{what}: {n} bytes from {from}");
    }
    ensure!(packets(n1, verdict::STACK_FLOW_REPLY)? >= 2);
    Ok(())
}

#[test]
fn a_new_udp_flow_without_a_free_port_is_told_at_once() -> Result<()> {
    let (cluster, a1) = one_pod_with_nat_ports("natudpfull", "61000-61001")?;
    let n1 = cluster.node("node-1");
    let target = SocketAddr::from((EXTERNAL_IP, 9550));
    let server = cluster
        .external
        .run_inside(|| Ok(std::net::UdpSocket::bind(target)?))?;
    server.set_read_timeout(Some(Duration::from_secs(3)))?;
    let sockets = a1.netns.run_inside(|| {
        (0..3)
            .map(|_| {
                let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
                socket.connect(target)?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                Ok(socket)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    // Two flows hold both ports (unanswered UDP lives 30 s).
    let mut buf = [0u8; 16];
    let mut ports = BTreeSet::new();
    for socket in &sockets[..2] {
        socket.send(b"hold")?;
        ports.insert(server.recv_from(&mut buf)?.1.port());
    }
    ensure!(ports == BTreeSet::from([61000, 61001]), "{ports:?}");
    ensure!(packets(n1, verdict::DROP_NAT_EXHAUSTED)? == 0);
    // The third is answered by the node at once instead of vanishing.
    let started = Instant::now();
    sockets[2].send(b"no room")?;
    match sockets[2].recv(&mut buf) {
        Ok(_) => bail!("the third flow got an answer"),
        Err(e) => ensure!(
            e.kind() == std::io::ErrorKind::HostUnreachable,
            "the third flow failed with {e} after {:?}, not EHOSTUNREACH",
            started.elapsed()
        ),
    }
    ensure!(started.elapsed() < Duration::from_millis(500));
    ensure!(packets(n1, verdict::DROP_NAT_EXHAUSTED)? == 1);
    Ok(())
}
