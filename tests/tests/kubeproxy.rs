//! The 3-node lab with kube-proxy's real iptables rules (Kubernetes 1.20, iptables mode) on
//! every node, and forwarding off until the agent turns it on: the flows every cluster
//! needs, over TCP past the handshake, with `KUBE-FORWARD`'s `ctstate INVALID` drop
//! counter checked on every node (a flow that crossed netfilter in one direction only is
//! INVALID there). Each test runs all its checks and reports every failure. Needs root.
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mycni_common::verdict;
use mycni_tests::cluster::{wait_for, Cluster, EXTERNAL_IP, NODES};
use mycni_tests::kubeproxy::Service;
use mycni_tests::{prefix, tcp_conversation, Netns, Node};

const ALL: [&str; 3] = ["node-1", "node-2", "node-3"];
/// Round trips per conversation: enough segments after the handshake that a flow the
/// node's conntrack saw only half of is dropped.
const ROUNDS: usize = 3;

fn packets(node: &Node, which: u32) -> Result<u64> {
    Ok(mycni::datapath::read_stats(&node.pin_root())?[which as usize].packets)
}

/// Every check of a test runs; the failures are reported together at the end.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn run(&mut self, what: &str, check: impl FnOnce() -> Result<()>) {
        match check() {
            Ok(()) => eprintln!("ok    {what}"),
            Err(e) => {
                eprintln!("FAIL  {what}: {e:#}");
                self.failed.push(format!("{what}: {e:#}"));
            }
        }
    }

    fn finish(self) -> Result<()> {
        if !self.failed.is_empty() {
            bail!(
                "{} check(s) failed:\n  {}",
                self.failed.len(),
                self.failed.join("\n  ")
            );
        }
        Ok(())
    }
}

/// A TCP conversation whose server must see `want_source` as the client's address.
fn conversation_from(
    server: &Netns,
    listen: SocketAddr,
    client: &Netns,
    connect: SocketAddr,
    want_source: Ipv4Addr,
) -> Result<()> {
    let peers = tcp_conversation(server, listen, client, connect, ROUNDS)?;
    ensure!(
        peers.server_saw.ip() == want_source,
        "the server saw {}, not {want_source}",
        peers.server_saw
    );
    ensure!(
        peers.client_saw == connect,
        "the client is connected to {}, not {connect}",
        peers.client_saw
    );
    Ok(())
}

/// The INVALID drop counters did not move since `before`.
fn no_invalid_drops(cluster: &Cluster, before: &[u64]) -> Result<()> {
    let after = cluster.invalid_drops()?;
    for ((spec, before), after) in NODES.iter().zip(before).zip(&after) {
        ensure!(
            after == before,
            "{}: KUBE-FORWARD dropped {} INVALID packets",
            spec.name,
            after - before
        );
    }
    Ok(())
}

fn sysctl(netns: &Netns, key: &str) -> Result<String> {
    Ok(netns.exec(&["sysctl", "-n", key])?.trim().to_string())
}

#[test]
fn nodes_reach_pods_on_other_nodes_over_tcp_through_kube_proxys_forward_chain() -> Result<()> {
    mycni_tests::require_root!();
    // The lab starts every node with net.ipv4.ip_forward=0; the agents start after that.
    let mut cluster = Cluster::new(&prefix("kpnode"), &ALL, &[])?;
    let agent_log = cluster.nodes[0]
        .take_agent_stderr()
        .context("node-1's agent log")?;
    cluster.install_kube_proxy(&[])?;
    cluster.wait_for_full_mesh()?;
    let (n1, n2, n3) = (
        cluster.node("node-1"),
        cluster.node("node-2"),
        cluster.node("node-3"),
    );
    let mut checks = Checks::default();
    checks.run("every agent turned forwarding on", || {
        for node in &cluster.nodes {
            let value = sysctl(&node.netns, "net.ipv4.ip_forward")?;
            ensure!(value == "1", "{}: ip_forward is {value}", node.netns.name);
        }
        Ok(())
    });
    checks.run("the agent said so in its log", || {
        let (lines, seen) = std::sync::mpsc::channel();
        // Reads the log until the agent exits; the test only waits for the one line.
        std::thread::spawn(move || {
            for line in BufReader::new(agent_log).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match seen.recv_timeout(left) {
                Ok(line) if line.contains("set net.ipv4.ip_forward=1") => return Ok(()),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        bail!("no line about net.ipv4.ip_forward in node-1's agent log")
    });
    let a1 = n1.add_pod("a1")?;
    let b1 = n2.add_pod("b1")?;
    let c1 = n3.add_pod("c1")?;
    let invalid_before = cluster.invalid_drops()?;
    let delivered_before = [
        packets(n1, verdict::DELIVERED_FROM_NETDEV)?,
        packets(n2, verdict::DELIVERED_FROM_NETDEV)?,
        packets(n3, verdict::DELIVERED_FROM_NETDEV)?,
    ];
    for (what, node, pod, port) in [
        ("node-1 -> pod on node-2 (direct)", n1, &b1, 7601),
        ("node-2 -> pod on node-1 (direct)", n2, &a1, 7602),
        ("node-1 -> pod on node-3 (VXLAN)", n1, &c1, 7603),
        ("node-3 -> pod on node-1 (VXLAN)", n3, &a1, 7604),
    ] {
        checks.run(&format!("{what}: tcp"), || {
            let target = SocketAddr::from((pod.ip, port));
            conversation_from(&pod.netns, target, &node.netns, target, node.node_ip)
        });
        checks.run(&format!("{what}: icmp"), || node.netns.ping(pod.ip));
    }
    checks.run("no INVALID drops", || {
        no_invalid_drops(&cluster, &invalid_before)
    });
    checks.run(
        "node traffic to pods went through the stack, not from_netdev's redirect",
        || {
            for (index, node) in [n1, n2, n3].into_iter().enumerate() {
                let now = packets(node, verdict::DELIVERED_FROM_NETDEV)?;
                ensure!(
                    now == delivered_before[index],
                    "{}: from_netdev delivered {} packets itself",
                    NODES[index].name,
                    now - delivered_before[index]
                );
            }
            Ok(())
        },
    );
    checks.finish()
}

#[test]
fn pods_reach_the_outside_and_node_ips_over_tcp_masqueraded_under_kube_proxy() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("kpegress"), &ALL, &["--nat-timeout-udp", "1"])?;
    cluster.install_kube_proxy(&[])?;
    cluster.wait_for_full_mesh()?;
    // A router that drops what it has no route back for (the pod CIDRs).
    for key in ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.a0.rp_filter"] {
        cluster.router.sysctl(key, "1")?;
    }
    let (n1, n2, n3) = (
        cluster.node("node-1"),
        cluster.node("node-2"),
        cluster.node("node-3"),
    );
    let a1 = n1.add_pod("a1")?;
    let b1 = n2.add_pod("b1")?;
    let c1 = n3.add_pod("c1")?;
    let invalid_before = cluster.invalid_drops()?;
    let snat_before = packets(n1, verdict::SNAT)?;
    let mut checks = Checks::default();
    for (what, node, pod, port) in [
        ("pod on node-1 -> outside", n1, &a1, 7701),
        ("pod on node-2 -> outside", n2, &b1, 7702),
        ("pod on node-3 -> outside", n3, &c1, 7703),
    ] {
        checks.run(&format!("{what}: tcp, seen from the node IP"), || {
            let target = SocketAddr::from((EXTERNAL_IP, port));
            conversation_from(&cluster.external, target, &pod.netns, target, node.node_ip)
        });
    }
    for (what, client_node, pod, server_node, port) in [
        ("pod on node-1 -> node-2's IP", n1, &a1, n2, 7711),
        ("pod on node-2 -> node-1's IP", n2, &b1, n1, 7712),
        (
            "pod on node-1 -> node-3's IP behind the router",
            n1,
            &a1,
            n3,
            7713,
        ),
        (
            "pod on node-3 -> node-1's IP behind the router",
            n3,
            &c1,
            n1,
            7714,
        ),
    ] {
        checks.run(&format!("{what}: tcp, masqueraded"), || {
            let target = SocketAddr::from((server_node.node_ip, port));
            conversation_from(
                &server_node.netns,
                target,
                &pod.netns,
                target,
                client_node.node_ip,
            )
        });
    }
    checks.run(
        "pod on node-1 -> outside: udp from one port, again after its NAT entry expired",
        || {
            let target = SocketAddr::from((EXTERNAL_IP, 7730));
            let server = cluster
                .external
                .run_inside(|| Ok(UdpSocket::bind(target)?))?;
            let client = a1
                .netns
                .run_inside(|| Ok(UdpSocket::bind((a1.ip, 7731))?))?;
            for socket in [&server, &client] {
                socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            }
            let mut buf = [0u8; 64];
            for round in 0..2 {
                if round == 1 {
                    // The reply came back through the stack; the flow must not now look
                    // like one the stack delivered to the pod (which is never masqueraded).
                    wait_for(Duration::from_secs(5), || {
                        let table = mycni::datapath::NatTable::open(&n1.pin_root())?;
                        Ok(mycni::nat::occupancy(&table.entries()?).udp == 0)
                    })
                    .context("the UDP NAT entry never expired")?;
                }
                client.send_to(b"are you there", target)?;
                let (n, peer) = server
                    .recv_from(&mut buf)
                    .with_context(|| format!("round {round}: nothing arrived"))?;
                ensure!(
                    peer.ip() == n1.node_ip,
                    "round {round}: the outside saw {peer}, not {}",
                    n1.node_ip
                );
                server.send_to(&buf[..n], peer)?;
                let (_, from) = client
                    .recv_from(&mut buf)
                    .with_context(|| format!("round {round}: no reply"))?;
                ensure!(from == target, "round {round}: the reply came from {from}");
            }
            Ok(())
        },
    );
    checks.run(
        "pod on node-1 -> its own node's IP: tcp, not masqueraded",
        || {
            let target = SocketAddr::from((n1.node_ip, 7720));
            conversation_from(&n1.netns, target, &a1.netns, target, a1.ip)
        },
    );
    checks.run("no INVALID drops", || {
        no_invalid_drops(&cluster, &invalid_before)
    });
    checks.run("node-1 masqueraded", || {
        ensure!(packets(n1, verdict::SNAT)? > snat_before, "no snat verdict");
        Ok(())
    });
    checks.finish()
}

#[test]
fn pods_reach_cluster_ips_whose_backends_are_node_ips_outside_hosts_and_pods() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("kpsvc"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let (n1, n2, n3) = (
        cluster.node("node-1"),
        cluster.node("node-2"),
        cluster.node("node-3"),
    );
    let web = n1.add_pod("web")?;
    let a2 = n1.add_pod("a2")?;
    let b1 = n2.add_pod("b1")?;
    let c1 = n3.add_pod("c1")?;
    // The API server listens on node-2's IP (a control-plane node, hostNetwork).
    let api_server = SocketAddr::from((n2.node_ip, 6443));
    let outside_api = SocketAddr::from((EXTERNAL_IP, 6443));
    let web_backend = SocketAddr::from((web.ip, 8080));
    let kubernetes: SocketAddr = "10.96.0.1:443".parse()?;
    let external_api: SocketAddr = "10.96.0.2:443".parse()?;
    let web_vip: SocketAddr = "10.96.0.10:80".parse()?;
    let service = |name: &str, vip: SocketAddr, endpoint: SocketAddr| Service {
        name: name.to_string(),
        cluster_ip: match vip.ip() {
            std::net::IpAddr::V4(ip) => ip,
            std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        },
        port: vip.port(),
        endpoints: vec![endpoint],
    };
    cluster.install_kube_proxy(&[
        service("default/kubernetes:https", kubernetes, api_server),
        service("default/external-api:https", external_api, outside_api),
        service("default/web:http", web_vip, web_backend),
    ])?;
    let invalid_before = cluster.invalid_drops()?;
    let mut checks = Checks::default();
    for (what, client_node, pod) in [
        ("pod on node-1", n1, &a2),
        ("pod on node-3 (behind the router)", n3, &c1),
    ] {
        checks.run(
            &format!("{what} -> the kubernetes Service (API server on node-2's IP)"),
            || {
                conversation_from(
                    &n2.netns,
                    api_server,
                    &pod.netns,
                    kubernetes,
                    client_node.node_ip,
                )
            },
        );
        checks.run(
            &format!("{what} -> a ClusterIP whose endpoint is outside the cluster"),
            || {
                conversation_from(
                    &cluster.external,
                    outside_api,
                    &pod.netns,
                    external_api,
                    client_node.node_ip,
                )
            },
        );
    }
    checks.run(
        "pod on node-2 -> the kubernetes Service (its own node's IP)",
        || conversation_from(&n2.netns, api_server, &b1.netns, kubernetes, b1.ip),
    );
    for (what, pod) in [
        ("same node", &a2),
        ("across nodes, direct", &b1),
        ("across nodes, VXLAN", &c1),
    ] {
        checks.run(&format!("ClusterIP with a pod endpoint, {what}"), || {
            conversation_from(&web.netns, web_backend, &pod.netns, web_vip, pod.ip)
        });
    }
    // A pod that reached a backend through the ClusterIP and then opens a connection
    // straight to that backend from the same source port (ephemeral ports get reused): the
    // stack's conntrack still holds the old DNAT, so the new connection's replies must not
    // be sent into it.
    for (what, pod, source_port) in [
        ("same node", &a2, 41001),
        ("across nodes, direct", &b1, 41002),
        ("across nodes, VXLAN", &c1, 41003),
    ] {
        checks.run(
            &format!("ClusterIP, then the backend's pod IP from the same port, {what}"),
            || {
                let server = echo_server(&web.netns, web_backend)?;
                echo_from_port(&pod.netns, source_port, web_vip)
                    .context("through the ClusterIP")?;
                echo_from_port(&pod.netns, source_port, web_backend)
                    .context("straight to the backend afterwards")?;
                drop(server);
                Ok(())
            },
        );
    }
    checks.run("no INVALID drops", || {
        no_invalid_drops(&cluster, &invalid_before)
    });
    checks.finish()
}

/// An echo server on `listen` in `netns`, one line per connection, until dropped.
struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn echo_server(netns: &Netns, listen: SocketAddr) -> Result<EchoServer> {
    use std::sync::atomic::Ordering;
    let listener = netns.run_inside(|| Ok(std::net::TcpListener::bind(listen)?))?;
    // Non-blocking accept, so dropping the server ends the thread and closes the socket.
    listener.set_nonblocking(true)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        use std::io::{Read, Write};
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 64];
                    if let Ok(n) = conn.read(&mut buf) {
                        let _ = conn.write_all(&buf[..n]);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Ok(EchoServer {
        stop,
        thread: Some(thread),
    })
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from `source_port` in `netns` to `target` and has one line echoed; the
/// client closes first (its TIME_WAIT is for this 4-tuple only, so the port is reusable
/// towards another address). A connect the datapath breaks fails within the timeout.
fn echo_from_port(netns: &Netns, source_port: u16, target: SocketAddr) -> Result<()> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    netns.run_inside(|| {
        // SAFETY: plain socket calls on a descriptor this function owns; it is handed to
        // TcpStream (which closes it) right after creation.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: valid option values of the sizes given.
        let options_set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
                && libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                ) == 0
        };
        ensure!(
            options_set,
            "setsockopt: {}",
            std::io::Error::last_os_error()
        );
        let address = |addr: SocketAddr| -> Result<libc::sockaddr_in> {
            let SocketAddr::V4(v4) = addr else {
                bail!("{addr} is not IPv4");
            };
            Ok(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            })
        };
        let local = address(SocketAddr::from((Ipv4Addr::UNSPECIFIED, source_port)))?;
        let remote = address(target)?;
        let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: sockaddr_in values of the size given.
        ensure!(
            unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), size) } == 0,
            "bind to port {source_port}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: as above.
        ensure!(
            unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), size) } == 0,
            "connect from port {source_port} to {target}: {}",
            std::io::Error::last_os_error()
        );
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"ping\n")?;
        let mut answer = [0u8; 5];
        stream.read_exact(&mut answer)?;
        ensure!(&answer == b"ping\n", "echoed {answer:?}");
        stream.shutdown(std::net::Shutdown::Both)?;
        Ok(())
    })
}
