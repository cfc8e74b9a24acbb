//! Services in eBPF mode: the socket-level programs on a per-test cgroup, the agent run with
//! `--service-mode ebpf --cgroup-path` at it, frontends and backends written through
//! `mycni::socket_lb::ServiceTables`, and clients run as processes inside the cgroup
//! (`mycni-sock-probe`). Needs root.
//!
//! aya's `BPF_PROG_TEST_RUN` does not run `sock_addr` programs, so these are the programs'
//! tests: each check below fails when the program or the map writes it relies on is broken.
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mycni::socket_lb::{ApplySummary, DesiredServices, ServiceTables};
use mycni_common::service::{
    Backend, ServiceEntry, ServiceKey, PROTO_TCP, PROTO_UDP, SERVICE_AFFINITY_CLIENT_IP,
    SERVICE_EXTERNAL_IP, SERVICE_EXTERNAL_LOCAL, SERVICE_NODE_PORT,
};
use mycni_common::verdict;
use mycni_tests::cgroup::TestCgroup;
use mycni_tests::cluster::Cluster;
use mycni_tests::sock_probe::{names, probe, probe_bin, servers_behind, Seen, Server};
use mycni_tests::{prefix, AgentLog, Netns, Node, Pod, NODE_IP};

const ECONNREFUSED: i32 = 111;
const ECONNABORTED: i32 = 103;
/// What a send on a UDP socket that is no longer connected returns.
const EDESTADDRREQ: i32 = 89;
/// The port of the backends' `serve-held` servers.
const HELD_PORT: u16 = 8081;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_PORT: u16 = 8080;

/// A probe in the cgroup that keeps one socket and sends one message per
/// [`SteppedProbe::next`] on it: a connected UDP socket, or a TCP connection (`tcp-held`,
/// whose line after its `count` messages says how the connection ended).
struct SteppedProbe {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    answered: usize,
}

impl SteppedProbe {
    fn start(
        cgroup: &TestCgroup,
        netns: &Netns,
        target: SocketAddr,
        count: usize,
    ) -> Result<SteppedProbe> {
        SteppedProbe::start_mode(cgroup, netns, "udp-connected", target, count)
    }

    fn start_mode(
        cgroup: &TestCgroup,
        netns: &Netns,
        mode: &str,
        target: SocketAddr,
        count: usize,
    ) -> Result<SteppedProbe> {
        let probe = probe_bin().display().to_string();
        let (target, count) = (target.to_string(), count.to_string());
        let argv = [probe.as_str(), mode, &target, &count];
        let mut child = TestCgroup::command_in(Some(cgroup), netns, &argv)
            .env("MYCNI_PROBE_STEP", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn the stepped probe")?;
        let stdout = child.stdout.take().context("probe stdout")?;
        Ok(SteppedProbe {
            child,
            lines: BufReader::new(stdout).lines(),
            answered: 0,
        })
    }

    /// Sends the next datagram (the first went at start) and returns its answer.
    fn next(&mut self) -> Result<Seen> {
        if self.answered > 0 {
            let stdin = self.child.stdin.as_mut().context("probe stdin")?;
            // A probe whose socket ended may have printed its last line and exited already.
            match stdin.write_all(b"\n").and_then(|_| stdin.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
        }
        let line = self.lines.next().context("the probe ended")??;
        self.answered += 1;
        Seen::parse(&line)
    }
}

impl Drop for SteppedProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn frontend_key(address: Ipv4Addr, port: u16, protocol: u8) -> ServiceKey {
    ServiceKey {
        address: address.octets(),
        port,
        protocol,
        scope: 0,
    }
}

fn backend(pod: &Pod) -> Backend {
    Backend {
        address: pod.ip.octets(),
        port: BACKEND_PORT,
        pad: 0,
    }
}

fn entry(service_id: u32, flags: u32, affinity_timeout_s: u32) -> ServiceEntry {
    ServiceEntry {
        service_id,
        backend_count: 0,
        affinity_timeout_s,
        flags,
    }
}

/// (Re)starts the node's agent with `args` and `env` and waits until it has applied its
/// Services mode: the pins it waits for may be the last run's.
fn restart_agent(node: &mut Node, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    node.stop_agent();
    node.start_agent_with_env(args, env)?;
    let log = AgentLog::follow(node)?;
    log.wait_for(&["datapath pinned under"], Duration::from_secs(20))?;
    Ok(())
}

fn packets(node: &Node, index: u32) -> Result<u64> {
    Ok(mycni::datapath::read_stats(&node.pin_root())?[index as usize].packets)
}

/// One node in eBPF Services mode: a client pod, `backends` backend pods each serving
/// `b<i>` on 8080 (TCP and UDP), and the node itself serving `node` on `NODE_IP:8080`.
struct ServiceLab {
    backends: Vec<Pod>,
    client: Pod,
    _servers: Vec<Server>,
    // Dropped after the node (whose agent and pins go first), so the links are gone.
    node: Node,
    cgroup: TestCgroup,
}

impl ServiceLab {
    fn new(test: &str, pod_cidr: &str, backends: usize) -> Result<ServiceLab> {
        let prefix = prefix(test);
        let cgroup = TestCgroup::new(&prefix)?;
        let mut node = Node::bare(&prefix, "node", pod_cidr)?;
        node.netns
            .exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        restart_agent(
            &mut node,
            &["--service-mode", "ebpf", "--cgroup-path", &cgroup.arg()],
            &[],
        )?;
        let mut servers = vec![Server::start(&node.netns, BACKEND_PORT, "node")?];
        let pods = (0..backends)
            .map(|i| node.add_pod(&format!("b{i}")))
            .collect::<Result<Vec<_>>>()?;
        for (i, pod) in pods.iter().enumerate() {
            servers.push(Server::start(&pod.netns, BACKEND_PORT, &format!("b{i}"))?);
        }
        let client = node.add_pod("client")?;
        Ok(ServiceLab {
            backends: pods,
            client,
            _servers: servers,
            node,
            cgroup,
        })
    }

    fn apply(&self, desired: &DesiredServices) -> Result<ApplySummary> {
        Ok(ServiceTables::open(&self.node.pin_root())?.apply(desired)?)
    }

    fn probe(&self, mode: &str, target: SocketAddr, count: usize) -> Result<Vec<Seen>> {
        probe(Some(&self.cgroup), &self.client.netns, mode, target, count)
    }

    fn all_backends(&self) -> Vec<Backend> {
        self.backends.iter().map(backend).collect()
    }
}

/// The kernel's id of the link pinned for `connect4`.
fn link_id(node: &Node) -> Result<u32> {
    let pin = node.pin_root().join("service_connect4-link");
    let link = aya::programs::links::PinnedLink::from_pin(&pin)
        .with_context(|| format!("open {}", pin.display()))?;
    let link: aya::programs::links::FdLink = link.into();
    Ok(link.info()?.id())
}

#[test]
fn tcp_to_a_cluster_ip_spreads_over_every_backend_and_sees_the_frontend_as_peer() -> Result<()> {
    mycni_tests::require_root!();
    let lab = ServiceLab::new("svctcp", "10.244.11.0/24", 3)?;
    let frontend = SocketAddr::from((CLUSTER_IP, 80));
    lab.apply(
        &[(
            frontend_key(CLUSTER_IP, 80, PROTO_TCP),
            (entry(1, 0, 0), lab.all_backends()),
        )]
        .into(),
    )?;
    let before = packets(&lab.node, verdict::SERVICE_TRANSLATED)?;
    let seen = lab.probe("tcp", frontend, 30)?;
    // 30 random picks miss one of 3 backends with probability 3 * (2/3)^30, about 1e-5.
    ensure!(
        servers_behind(frontend, &seen)? == names(&["b0", "b1", "b2"]),
        "connections did not reach every backend: {seen:?}"
    );
    let translated = packets(&lab.node, verdict::SERVICE_TRANSLATED)? - before;
    ensure!(translated >= 30, "service_translated counted {translated}");
    Ok(())
}

#[test]
fn udp_replies_come_from_the_frontend_connected_or_not() -> Result<()> {
    mycni_tests::require_root!();
    let lab = ServiceLab::new("svcudp", "10.244.12.0/24", 2)?;
    let frontend = SocketAddr::from((CLUSTER_IP, 53));
    lab.apply(
        &[(
            frontend_key(CLUSTER_IP, 53, PROTO_UDP),
            (entry(2, 0, 0), lab.all_backends()),
        )]
        .into(),
    )?;
    // One unconnected socket: each datagram picks anew, each reply shows the frontend.
    let seen = lab.probe("udp", frontend, 20)?;
    ensure!(
        servers_behind(frontend, &seen)? == names(&["b0", "b1"]),
        "{seen:?}"
    );
    // A connected socket: one backend for its life, getpeername shows the frontend.
    let seen = lab.probe("udp-connected", frontend, 5)?;
    ensure!(servers_behind(frontend, &seen)?.len() == 1, "{seen:?}");
    Ok(())
}

#[test]
fn a_frontend_without_backends_refuses_at_once_and_counts_it() -> Result<()> {
    mycni_tests::require_root!();
    let lab = ServiceLab::new("svcnone", "10.244.13.0/24", 1)?;
    lab.apply(
        &[
            (
                frontend_key(CLUSTER_IP, 80, PROTO_TCP),
                (entry(3, 0, 0), vec![]),
            ),
            (
                frontend_key(CLUSTER_IP, 53, PROTO_UDP),
                (entry(4, 0, 0), vec![]),
            ),
        ]
        .into(),
    )?;
    let before = packets(&lab.node, verdict::SERVICE_NO_BACKEND)?;
    // ECONNREFUSED, not a timeout (ETIMEDOUT) nor EPERM: the program refused the call.
    let seen = lab.probe("tcp", SocketAddr::from((CLUSTER_IP, 80)), 1)?;
    ensure!(seen == [Seen::Errno(ECONNREFUSED)], "tcp: {seen:?}");
    let seen = lab.probe("udp", SocketAddr::from((CLUSTER_IP, 53)), 1)?;
    ensure!(seen == [Seen::Errno(ECONNREFUSED)], "udp: {seen:?}");
    let refused = packets(&lab.node, verdict::SERVICE_NO_BACKEND)? - before;
    ensure!(refused == 2, "service_no_backend counted {refused}");
    Ok(())
}

#[test]
fn affinity_pins_a_client_and_a_removed_backend_is_never_picked_again() -> Result<()> {
    mycni_tests::require_root!();
    let lab = ServiceLab::new("svcaff", "10.244.14.0/24", 3)?;
    let sticky = SocketAddr::from((CLUSTER_IP, 81));
    let spread = SocketAddr::from((CLUSTER_IP, 80));
    let desired = |backends: Vec<Backend>| -> DesiredServices {
        [
            (
                frontend_key(CLUSTER_IP, 81, PROTO_TCP),
                (entry(5, SERVICE_AFFINITY_CLIENT_IP, 600), backends.clone()),
            ),
            (
                frontend_key(CLUSTER_IP, 80, PROTO_TCP),
                (entry(6, 0, 0), backends),
            ),
        ]
        .into()
    };
    lab.apply(&desired(lab.all_backends()))?;
    let pinned = servers_behind(sticky, &lab.probe("tcp", sticky, 20)?)?;
    ensure!(
        pinned.len() == 1,
        "affinity let one client reach {pinned:?}"
    );
    // Separate processes of the same pod share the entry (it is keyed by network namespace).
    ensure!(servers_behind(sticky, &lab.probe("tcp", sticky, 5)?)? == pinned);

    // Take the pinned backend away: neither frontend ever picks it again, and the client
    // is re-pinned to one of the others.
    let gone = pinned.iter().next().context("one backend")?.clone();
    let index: usize = gone.trim_start_matches('b').parse()?;
    let kept: Vec<Backend> = lab
        .backends
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, pod)| backend(pod))
        .collect();
    lab.apply(&desired(kept))?;
    let repinned = servers_behind(sticky, &lab.probe("tcp", sticky, 20)?)?;
    ensure!(
        repinned.len() == 1 && !repinned.contains(&gone),
        "after removing {gone}: {repinned:?}"
    );
    let spread_over = servers_behind(spread, &lab.probe("tcp", spread, 30)?)?;
    ensure!(
        spread_over.len() == 2 && !spread_over.contains(&gone),
        "after removing {gone}: {spread_over:?}"
    );
    Ok(())
}

#[test]
fn a_process_outside_the_cgroup_is_untouched() -> Result<()> {
    mycni_tests::require_root!();
    let lab = ServiceLab::new("svcout", "10.244.15.0/24", 1)?;
    // The node's own address as a frontend (a NodePort or hostPort): the node answers as
    // "node" to whoever is not translated.
    let frontend = SocketAddr::from((NODE_IP, BACKEND_PORT));
    lab.apply(
        &[(
            frontend_key(NODE_IP, BACKEND_PORT, PROTO_TCP),
            (entry(7, 0, 0), lab.all_backends()),
        )]
        .into(),
    )?;
    let inside = servers_behind(frontend, &lab.probe("tcp", frontend, 3)?)?;
    ensure!(inside == names(&["b0"]), "inside the cgroup: {inside:?}");
    let outside = servers_behind(
        frontend,
        &probe(None, &lab.client.netns, "tcp", frontend, 3)?,
    )?;
    ensure!(
        outside == names(&["node"]),
        "outside the cgroup: {outside:?}"
    );
    Ok(())
}

#[test]
fn an_agent_restart_keeps_services_and_kube_proxy_mode_detaches_them() -> Result<()> {
    mycni_tests::require_root!();
    let mut lab = ServiceLab::new("svcmode", "10.244.16.0/24", 1)?;
    let frontend = SocketAddr::from((NODE_IP, BACKEND_PORT));
    lab.apply(
        &[
            (
                frontend_key(NODE_IP, BACKEND_PORT, PROTO_TCP),
                (entry(8, 0, 0), lab.all_backends()),
            ),
            (
                frontend_key(NODE_IP, BACKEND_PORT, PROTO_UDP),
                (entry(8, 0, 0), lab.all_backends()),
            ),
        ]
        .into(),
    )?;
    let cgroup = lab.cgroup.arg();
    let old_link = link_id(&lab.node)?;
    // A connected UDP socket kept across the restart: its replies keep showing the frontend.
    let mut socket = SteppedProbe::start(&lab.cgroup, &lab.client.netns, frontend, 3)?;
    let mut kept = vec![socket.next()?];
    lab.node.stop_agent();
    // While the agent is down the pinned links keep the programs attached.
    let down = servers_behind(frontend, &lab.probe("tcp", frontend, 3)?)?;
    ensure!(down == names(&["b0"]), "agent down: {down:?}");
    kept.push(socket.next()?);
    restart_agent(
        &mut lab.node,
        &["--service-mode", "ebpf", "--cgroup-path", &cgroup],
        &[],
    )?;
    ensure!(
        link_id(&lab.node)? != old_link,
        "the restarted agent did not replace the link"
    );
    let restarted = servers_behind(frontend, &lab.probe("tcp", frontend, 3)?)?;
    ensure!(
        restarted == names(&["b0"]),
        "agent restarted: {restarted:?}"
    );
    kept.push(socket.next()?);
    ensure!(
        servers_behind(frontend, &kept)? == names(&["b0"]),
        "the connected UDP socket across the restart: {kept:?}"
    );

    // Back to kube-proxy mode (given through the DaemonSet's variable): nothing translated.
    restart_agent(&mut lab.node, &[], &[("MYCNI_SERVICE_MODE", "kube-proxy")])?;
    let detached = servers_behind(frontend, &lab.probe("tcp", frontend, 3)?)?;
    ensure!(
        detached == names(&["node"]),
        "kube-proxy mode: {detached:?}"
    );
    Ok(())
}

/// A client on node-1, backends on node-2 (same segment: direct routing) and node-3 (in
/// another subnet: VXLAN); only node-1's agent runs in eBPF Services mode.
#[test]
fn backends_on_other_nodes_direct_and_vxlan_are_reached() -> Result<()> {
    mycni_tests::require_root!();
    let prefix = prefix("svcnodes");
    let cgroup = TestCgroup::new(&prefix)?;
    let mut cluster = Cluster::new(&prefix, &["node-1", "node-2", "node-3"], &[])?;
    cluster.wait_for_full_mesh()?;
    let mut args = cluster.agent_args(0);
    args.extend(["--service-mode", "ebpf", "--cgroup-path", &cgroup.arg()].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    restart_agent(&mut cluster.nodes[0], &args, &[])?;
    let client = cluster.nodes[0].add_pod("client")?;
    let direct = cluster.nodes[1].add_pod("direct")?;
    let tunneled = cluster.nodes[2].add_pod("tunneled")?;
    let _servers = [
        Server::start(&direct.netns, BACKEND_PORT, "direct")?,
        Server::start(&tunneled.netns, BACKEND_PORT, "vxlan")?,
    ];
    let frontend = SocketAddr::from((CLUSTER_IP, 80));
    ServiceTables::open(&cluster.nodes[0].pin_root())?.apply(
        &[
            (
                frontend_key(CLUSTER_IP, 80, PROTO_TCP),
                (entry(9, 0, 0), vec![backend(&direct), backend(&tunneled)]),
            ),
            (
                frontend_key(CLUSTER_IP, 53, PROTO_UDP),
                (entry(10, 0, 0), vec![backend(&direct), backend(&tunneled)]),
            ),
        ]
        .into(),
    )?;
    let tcp = probe(Some(&cgroup), &client.netns, "tcp", frontend, 20)?;
    ensure!(
        servers_behind(frontend, &tcp)? == names(&["direct", "vxlan"]),
        "{tcp:?}"
    );
    let dns = SocketAddr::from((CLUSTER_IP, 53));
    let udp = probe(Some(&cgroup), &client.netns, "udp", dns, 20)?;
    ensure!(
        servers_behind(dns, &udp)? == names(&["direct", "vxlan"]),
        "{udp:?}"
    );
    Ok(())
}

/// A TCP connection and a connected UDP socket through a ClusterIP to b0; b0 leaves the
/// Service (`ServiceTables::apply`, the write the agent's Services loop makes): both end at
/// once (the TCP one wakes from a blocked read with ECONNABORTED, the UDP one's next send
/// fails) while sockets connected to b0's own address carry on, and new connections go to b1.
#[test]
fn a_removed_backend_s_service_sockets_end_at_once_and_direct_ones_stay() -> Result<()> {
    mycni_tests::require_root!();
    let lab = ServiceLab::new("svcend", "10.244.17.0/24", 2)?;
    let _held: Vec<Server> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, pod)| Server::start_held(&pod.netns, HELD_PORT, &format!("b{i}")))
        .collect::<Result<_>>()?;
    let (b0, b1) = (&lab.backends[0], &lab.backends[1]);
    let held = |pod: &Pod| Backend {
        port: HELD_PORT,
        ..backend(pod)
    };
    let tcp = SocketAddr::from((CLUSTER_IP, 80));
    let dns = SocketAddr::from((CLUSTER_IP, 53));
    let services = |tcp_backend: Backend, udp_backend: Backend| -> DesiredServices {
        [
            (
                frontend_key(CLUSTER_IP, 80, PROTO_TCP),
                (entry(11, 0, 0), vec![tcp_backend]),
            ),
            (
                frontend_key(CLUSTER_IP, 53, PROTO_UDP),
                (entry(12, 0, 0), vec![udp_backend]),
            ),
        ]
        .into()
    };
    lab.apply(&services(held(b0), backend(b0)))?;
    let reply = |peer: SocketAddr, server: &str| Seen::Reply {
        peer,
        server: server.to_string(),
    };
    let start = |mode: &str, target: SocketAddr, count: usize| {
        SteppedProbe::start_mode(&lab.cgroup, &lab.client.netns, mode, target, count)
    };
    let mut through_tcp = start("tcp-held", tcp, 1)?;
    ensure!(
        through_tcp.next()? == reply(tcp, "b0"),
        "through the Service"
    );
    let mut through_udp = start("udp-connected", dns, 2)?;
    ensure!(through_udp.next()? == reply(dns, "b0"));
    let direct_tcp_address = SocketAddr::from((b0.ip, HELD_PORT));
    let mut direct_tcp = start("tcp-held", direct_tcp_address, 2)?;
    ensure!(direct_tcp.next()? == reply(direct_tcp_address, "b0"));
    let direct_udp_address = SocketAddr::from((b0.ip, BACKEND_PORT));
    let mut direct_udp = start("udp-connected", direct_udp_address, 2)?;
    ensure!(direct_udp.next()? == reply(direct_udp_address, "b0"));

    let summary = lab.apply(&services(held(b1), backend(b1)))?;
    // The TCP client sits in a read that only the connection's end returns from.
    let ended = through_tcp.next()?;
    ensure!(
        ended == Seen::Errno(ECONNABORTED),
        "the TCP connection to the removed backend: {ended:?}"
    );
    let ended = through_udp.next()?;
    ensure!(
        ended == Seen::Errno(EDESTADDRREQ),
        "the connected UDP socket to the removed backend: {ended:?}"
    );
    ensure!(
        direct_tcp.next()? == reply(direct_tcp_address, "b0"),
        "a TCP connection to b0's own address was touched"
    );
    ensure!(
        direct_udp.next()? == reply(direct_udp_address, "b0"),
        "a UDP socket connected to b0's own address was touched"
    );
    ensure!(
        summary.sockets_destroyed == 2 && summary.socket_termination_failures == 0,
        "{summary:?}"
    );
    // New sockets pick the live backend.
    let mut again = start("tcp-held", tcp, 1)?;
    ensure!(again.next()? == reply(tcp, "b1"), "a new connection");
    let seen = lab.probe("udp-connected", dns, 1)?;
    ensure!(seen == [reply(dns, "b1")], "a new UDP socket: {seen:?}");
    Ok(())
}

/// node-1 in eBPF Services mode serves NodePorts and an externalIP to the external host
/// (beyond the router) and to a pod on node-2; backends on node-1, node-2 (direct) and
/// node-3 (VXLAN) answer with the client address they see.
#[test]
fn node_ports_and_external_ips_from_outside_reach_every_backend_and_local_keeps_the_source(
) -> Result<()> {
    mycni_tests::require_root!();
    let prefix = prefix("svcext");
    let cgroup = TestCgroup::new(&prefix)?;
    let mut cluster = Cluster::new(&prefix, &["node-1", "node-2", "node-3"], &[])?;
    cluster.wait_for_full_mesh()?;
    let mut args = cluster.agent_args(0);
    args.extend(["--service-mode", "ebpf", "--cgroup-path", &cgroup.arg()].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    restart_agent(&mut cluster.nodes[0], &args, &[])?;
    let local = cluster.nodes[0].add_pod("local")?;
    let direct = cluster.nodes[1].add_pod("direct")?;
    let tunneled = cluster.nodes[2].add_pod("tunneled")?;
    let client_pod = cluster.nodes[1].add_pod("client")?;
    let _servers = [
        Server::start_naming_clients(&local.netns, BACKEND_PORT, "local")?,
        Server::start_naming_clients(&direct.netns, BACKEND_PORT, "direct")?,
        Server::start_naming_clients(&tunneled.netns, BACKEND_PORT, "vxlan")?,
    ];
    let node_ip = cluster.nodes[0].node_ip;
    // The external host reaches the externalIP through node-1, as a cloud's route would.
    let external_ip = Ipv4Addr::new(192, 168, 100, 7);
    cluster.router.exec(&[
        "ip",
        "route",
        "add",
        &external_ip.to_string(),
        "via",
        &node_ip.to_string(),
    ])?;
    let everywhere = vec![backend(&local), backend(&direct), backend(&tunneled)];
    let (cluster_tcp, cluster_udp, local_tcp, empty_tcp) = (30080, 30053, 30081, 30082);
    let node_port = SERVICE_NODE_PORT;
    let local_only = SERVICE_NODE_PORT | SERVICE_EXTERNAL_LOCAL;
    ServiceTables::open(&cluster.nodes[0].pin_root())?.apply(
        &[
            (
                frontend_key(node_ip, cluster_tcp, PROTO_TCP),
                (entry(1, node_port, 0), everywhere.clone()),
            ),
            (
                frontend_key(node_ip, cluster_udp, PROTO_UDP),
                (entry(2, node_port, 0), everywhere.clone()),
            ),
            (
                frontend_key(external_ip, 80, PROTO_TCP),
                (entry(3, SERVICE_EXTERNAL_IP, 0), everywhere.clone()),
            ),
            (
                frontend_key(node_ip, local_tcp, PROTO_TCP),
                (entry(4, local_only, 0), vec![backend(&local)]),
            ),
            (
                frontend_key(node_ip, empty_tcp, PROTO_TCP),
                (entry(5, local_only, 0), vec![]),
            ),
        ]
        .into(),
    )?;
    let outside = mycni_tests::cluster::EXTERNAL_IP;
    // Cluster policy: the local backend sees the client; the others see node-1, which
    // their replies go back through.
    let spread = names(&[
        &format!("local from {outside}"),
        &format!("direct from {node_ip}"),
        &format!("vxlan from {node_ip}"),
    ]);
    let before = packets(&cluster.nodes[0], verdict::EXTERNAL_TRANSLATED)?;
    for frontend in [
        SocketAddr::from((node_ip, cluster_tcp)),
        SocketAddr::from((external_ip, 80)),
    ] {
        let seen = probe(None, &cluster.external, "tcp", frontend, 30)?;
        let servers = servers_behind(frontend, &seen)?;
        ensure!(servers == spread, "tcp to {frontend}: {servers:?}");
    }
    // A UDP flow keeps its backend: one socket (one source port) per datagram.
    let frontend = SocketAddr::from((node_ip, cluster_udp));
    let seen = (0..30)
        .map(|_| probe(None, &cluster.external, "udp", frontend, 1))
        .collect::<Result<Vec<_>>>()?
        .concat();
    let servers = servers_behind(frontend, &seen)?;
    ensure!(servers == spread, "udp to {frontend}: {servers:?}");
    let translated = packets(&cluster.nodes[0], verdict::EXTERNAL_TRANSLATED)? - before;
    ensure!(
        translated >= 90 * 2,
        "external_translated counted {translated}"
    );
    // A pod of another node reaches the NodePort too (masqueraded by its node on the way).
    let frontend = SocketAddr::from((node_ip, cluster_tcp));
    let seen = probe(None, &client_pod.netns, "tcp", frontend, 10)?;
    servers_behind(frontend, &seen)?;
    // Local policy: only the local backend, which sees the client's own address.
    let frontend = SocketAddr::from((node_ip, local_tcp));
    let seen = probe(None, &cluster.external, "tcp", frontend, 10)?;
    let servers = servers_behind(frontend, &seen)?;
    ensure!(
        servers == names(&[&format!("local from {outside}")]),
        "{servers:?}"
    );
    // No backend on this node: dropped and counted, nothing answers.
    let before = packets(&cluster.nodes[0], verdict::EXTERNAL_NO_BACKEND)?;
    let seen = probe(
        None,
        &cluster.external,
        "tcp",
        SocketAddr::from((node_ip, empty_tcp)),
        1,
    )?;
    ensure!(
        matches!(seen[..], [Seen::Errno(_)]),
        "a frontend without backends answered: {seen:?}"
    );
    let dropped = packets(&cluster.nodes[0], verdict::EXTERNAL_NO_BACKEND)? - before;
    ensure!(dropped >= 1, "external_no_backend counted {dropped}");
    Ok(())
}

/// hostNetwork backends (a Service whose endpoints are nodes' addresses) behind a NodePort
/// of node-1 reached from outside it: node-1 itself answers with the client's address kept
/// and its reply leaves as the frontend; node-2 answers through node-1's SNAT (the
/// translated packet leaves node-1's uplink at once: its stack would drop it as a martian,
/// coming from node-1's own address).
#[test]
fn node_ports_from_outside_reach_host_network_backends_here_and_on_another_node() -> Result<()> {
    mycni_tests::require_root!();
    let prefix = prefix("svchost");
    let cgroup = TestCgroup::new(&prefix)?;
    let mut cluster = Cluster::new(&prefix, &["node-1", "node-2", "node-3"], &[])?;
    cluster.wait_for_full_mesh()?;
    let mut args = cluster.agent_args(0);
    args.extend(["--service-mode", "ebpf", "--cgroup-path", &cgroup.arg()].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    restart_agent(&mut cluster.nodes[0], &args, &[])?;
    let (node_1, node_2) = (cluster.nodes[0].node_ip, cluster.nodes[1].node_ip);
    let host_port = 8090;
    let _servers = [
        Server::start_naming_clients(&cluster.nodes[0].netns, host_port, "node-1")?,
        Server::start_naming_clients(&cluster.nodes[1].netns, host_port, "node-2")?,
    ];
    let client_pod = cluster.nodes[1].add_pod("client")?;
    let hosts = vec![
        Backend {
            address: node_1.octets(),
            port: host_port,
            pad: 0,
        },
        Backend {
            address: node_2.octets(),
            port: host_port,
            pad: 0,
        },
    ];
    let (tcp_port, udp_port) = (30090, 30091);
    ServiceTables::open(&cluster.nodes[0].pin_root())?.apply(
        &[
            (
                frontend_key(node_1, tcp_port, PROTO_TCP),
                (entry(1, SERVICE_NODE_PORT, 0), hosts.clone()),
            ),
            (
                frontend_key(node_1, udp_port, PROTO_UDP),
                (entry(2, SERVICE_NODE_PORT, 0), hosts.clone()),
            ),
        ]
        .into(),
    )?;
    let outside = mycni_tests::cluster::EXTERNAL_IP;
    let spread = names(&[
        &format!("node-1 from {outside}"),
        &format!("node-2 from {node_1}"),
    ]);
    let tcp = SocketAddr::from((node_1, tcp_port));
    let seen = probe(None, &cluster.external, "tcp", tcp, 30)?;
    ensure!(
        servers_behind(tcp, &seen)? == spread,
        "tcp to {tcp}: {seen:?}"
    );
    // One socket (one flow) per datagram, so each may pick either backend.
    let udp = SocketAddr::from((node_1, udp_port));
    let seen = (0..30)
        .map(|_| probe(None, &cluster.external, "udp", udp, 1))
        .collect::<Result<Vec<_>>>()?
        .concat();
    ensure!(
        servers_behind(udp, &seen)? == spread,
        "udp to {udp}: {seen:?}"
    );
    // A pod of node-2 (masqueraded by node-2 on its way to node-1's NodePort), as the
    // upstream spec "service endpoints using hostNetwork" dials it.
    let seen = probe(None, &client_pod.netns, "tcp", tcp, 30)?;
    let from_pod = names(&[
        &format!("node-1 from {node_2}"),
        &format!("node-2 from {node_1}"),
    ]);
    ensure!(
        servers_behind(tcp, &seen)? == from_pod,
        "tcp from a pod of node-2 to {tcp}: {seen:?}"
    );
    Ok(())
}
