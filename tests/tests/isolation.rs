//! Isolation: nothing a pod or the outside sends may pretend to be someone else. Each test
//! plays the attacker with raw frames (from inside a pod, or from the external host) and
//! checks on the RECEIVING side that nothing arrives, then that the datapath counted the
//! drops. Needs root.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mycni_common::verdict;
use mycni_tests::cluster::{wait_for, Cluster, EXTERNAL_IP, NODES};
use mycni_tests::kubeproxy;
use mycni_tests::raw::{self, PacketSocket, ARP_REPLY, ARP_REQUEST, ETH_P_ARP, ETH_P_IP};
use mycni_tests::{prefix, udp_echo, Netns, Node, Pod, NODE_IP};

const ALL: [&str; 3] = ["node-1", "node-2", "node-3"];
const FOREIGN_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];
const MARK: &str = "mycni-iso";

/// Packets counted under the verdict called `name` (looked up by name, so a test written
/// before the verdict existed fails on its packets, not on compiling: the counts before an
/// attack read 0 there, the check after it fails).
fn packets(node: &Node, name: &str) -> Result<u64> {
    let index = verdict::NAMES
        .iter()
        .position(|n| *n == name)
        .with_context(|| format!("no verdict named {name}"))?;
    Ok(mycni::datapath::read_stats(&node.pin_root())?[index].packets)
}

fn wait_for_full_mesh(cluster: &Cluster) -> Result<()> {
    for (node, own) in cluster.nodes.iter().zip(NODES.iter()) {
        for spec in NODES.iter().filter(|s| s.name != own.name) {
            wait_for(Duration::from_secs(5), || {
                let routes = mycni::datapath::Maps::open(&node.pin_root())?.routes()?;
                Ok(routes
                    .iter()
                    .any(|(ip, len, _)| format!("{ip}/{len}") == spec.pod_cidr))
            })
            .with_context(|| format!("{} never learned {}", own.name, spec.pod_cidr))?;
        }
    }
    Ok(())
}

/// A pod sending hand-made frames out of its `eth0`, addressed to its host veth.
struct Attacker {
    socket: PacketSocket,
    pod_mac: [u8; 6],
    host_mac: [u8; 6],
}

impl Attacker {
    fn new(node: &Node, pod: &Pod) -> Result<Attacker> {
        let endpoint = mycni::datapath::Maps::open(&node.pin_root())?
            .endpoint(pod.ip)?
            .context("the pod's endpoint")?;
        Ok(Attacker {
            socket: PacketSocket::open(&pod.netns, Some("eth0"))?,
            pod_mac: endpoint.pod_mac,
            host_mac: endpoint.host_mac,
        })
    }

    fn send_ipv4(&self, packet: &[u8]) -> Result<()> {
        self.socket.send(&raw::ethernet(
            self.host_mac,
            self.pod_mac,
            ETH_P_IP,
            packet,
        ))
    }
}

/// Every frame a watcher got, as (watcher name, frame).
fn collect(watchers: &[(&str, PacketSocket)]) -> Vec<(String, Vec<u8>)> {
    watchers
        .iter()
        .flat_map(|(name, socket)| {
            socket
                .received(Duration::from_millis(700))
                .into_iter()
                .map(move |frame| (name.to_string(), frame))
        })
        .collect()
}

fn seen_by<'a>(seen: &'a [(String, Vec<u8>)], marker: &str) -> Vec<&'a str> {
    seen.iter()
        .filter(|(_, frame)| raw::contains(frame, marker.as_bytes()))
        .map(|(name, _)| name.as_str())
        .collect()
}

/// Datagrams a UDP socket got within a short window.
fn datagrams(socket: &UdpSocket) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = socket.recv_from(&mut buf) {
        found.push(buf[..n].to_vec());
    }
    found
}

/// Point 1: a pod speaks only as itself, whatever the destination: a local pod, remote pods
/// (direct and VXLAN), its node, a Service IP, the outside. Its own address is the control.
#[test]
fn a_pod_cannot_send_from_an_address_that_is_not_its_own() -> Result<()> {
    let cluster = Cluster::new(&prefix("isospoof"), &ALL, &[])?;
    wait_for_full_mesh(&cluster)?;
    let (n1, n2, n3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let (p11, p12) = (n1.add_pod("p11")?, n1.add_pod("p12")?);
    let (p21, p31) = (n2.add_pod("p21")?, n3.add_pod("p31")?);
    let service = Ipv4Addr::new(10, 96, 0, 10);
    // A kube-proxy-style UDP ClusterIP on node-1 whose backend is p21.
    kubeproxy::add_udp_cluster_ip(&n1.netns, service, 53, SocketAddr::from((p21.ip, 7777)))?;
    let node_socket = n1.netns.run_inside(|| {
        let socket = UdpSocket::bind(("0.0.0.0", 7777))?;
        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(socket)
    })?;
    let watchers = [
        ("p12", PacketSocket::open(&p12.netns, Some("eth0"))?),
        ("p21", PacketSocket::open(&p21.netns, Some("eth0"))?),
        ("p31", PacketSocket::open(&p31.netns, Some("eth0"))?),
        (
            "external",
            PacketSocket::open(&cluster.external, Some("eth0"))?,
        ),
    ];
    let attacker = Attacker::new(n1, &p11)?;
    let node_ip = NODES[0].ip;
    let destinations = [
        (p12.ip, 7777, "p12"),
        (p21.ip, 7777, "p21"),
        (p31.ip, 7777, "p31"),
        (node_ip, 7777, "node-1"),
        (service, 53, "p21"),
        (EXTERNAL_IP, 7777, "external"),
    ];
    let forged = [
        p21.ip,                        // a remote pod
        node_ip,                       // the node itself
        Ipv4Addr::new(10, 244, 1, 99), // unassigned, in the node's own pod CIDR
        Ipv4Addr::new(8, 8, 8, 8),     // the outside
    ];
    let before = packets(n1, "drop_spoofed").unwrap_or(0);
    for _ in 0..2 {
        for (dst, port, _) in destinations {
            let real = format!("{MARK} real to {dst}");
            attacker.send_ipv4(&raw::udp4(p11.ip, dst, 40000, port, real.as_bytes()))?;
            for src in forged {
                let text = format!("{MARK} forged {src} to {dst}");
                attacker.send_ipv4(&raw::udp4(src, dst, 40000, port, text.as_bytes()))?;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut seen = collect(&watchers);
    for datagram in datagrams(&node_socket) {
        seen.push(("node-1".to_string(), datagram));
    }

    for (dst, _, receiver) in destinations {
        let real = format!("{MARK} real to {dst}");
        ensure!(
            seen_by(&seen, &real).contains(&receiver),
            "control: {receiver} never got p11's own packet to {dst}"
        );
        for src in forged {
            let text = format!("{MARK} forged {src} to {dst}");
            let got = seen_by(&seen, &text);
            ensure!(
                got.is_empty(),
                "a packet p11 sent from {src} to {dst} reached {got:?}"
            );
        }
    }
    // The SNATed control left as the node; nothing reached the outside as a pod.
    let external_sources: Vec<Ipv4Addr> = seen
        .iter()
        .filter(|(name, frame)| name == "external" && raw::contains(frame, MARK.as_bytes()))
        .filter_map(|(_, frame)| raw::ipv4_source(frame))
        .collect();
    ensure!(
        external_sources.iter().all(|src| *src == node_ip),
        "the outside saw sources {external_sources:?}"
    );
    let dropped = packets(n1, "drop_spoofed")? - before;
    let expected = (2 * destinations.len() * forged.len()) as u64;
    ensure!(
        dropped >= expected,
        "drop_spoofed rose by {dropped}, expected at least {expected}"
    );
    Ok(())
}

/// Point 2: a host outside the cluster that knows a node's VXLAN port cannot inject into a
/// pod, whatever VNI and inner source it uses; real VXLAN between nodes still works.
#[test]
fn vxlan_from_outside_the_cluster_reaches_no_pod() -> Result<()> {
    let cluster = Cluster::new(&prefix("isovxlan"), &ALL, &[])?;
    wait_for_full_mesh(&cluster)?;
    let (n1, n3) = (&cluster.nodes[0], &cluster.nodes[2]);
    let (p11, p31) = (n1.add_pod("p11")?, n3.add_pod("p31")?);
    let watcher = PacketSocket::open(&p31.netns, Some("eth0"))?;
    let sender = cluster
        .external
        .run_inside(|| Ok(UdpSocket::bind(("0.0.0.0", 0))?))?;
    let node3 = SocketAddr::from((NODES[2].ip, 4789));
    let before = packets(n3, "drop_tunnel_foreign").unwrap_or(0);
    let mut markers = Vec::new();
    for _ in 0..2 {
        for vni in [1u32, 4242] {
            for src in [Ipv4Addr::new(10, 244, 3, 99), Ipv4Addr::new(8, 8, 8, 8)] {
                let text = format!("{MARK} vxlan vni {vni} from {src}");
                let inner = raw::ethernet(
                    [0x02, 0, 0, 0, 0, 0x31],
                    FOREIGN_MAC,
                    ETH_P_IP,
                    &raw::udp4(src, p31.ip, 5555, 7777, text.as_bytes()),
                );
                sender.send_to(&raw::vxlan(vni, &inner), node3)?;
                markers.push(text);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let frames = watcher.received(Duration::from_millis(700));
    for text in &markers {
        ensure!(
            !frames.iter().any(|f| raw::contains(f, text.as_bytes())),
            "pod p31 received the injected datagram {text:?}"
        );
    }
    let dropped = packets(n3, "drop_tunnel_foreign")? - before;
    ensure!(
        dropped >= markers.len() as u64,
        "drop_tunnel_foreign rose by {dropped}, expected at least {}",
        markers.len()
    );

    // Real VXLAN between the nodes: pod to pod (from_pod's tunnel key) and node to pod
    // (the kernel's encap route), both decapsulated on node-3 through the same check.
    let tunnel_before = packets(n1, "remote_tunnel")?;
    p11.netns.ping(p31.ip).context("p11 -> p31 over VXLAN")?;
    let target = SocketAddr::from((p31.ip, 7777));
    let seen = udp_echo(&p31.netns, target, &p11.netns, target)?;
    ensure!(seen.ip() == p11.ip, "p31 saw {seen}, not p11");
    n1.netns.ping(p31.ip).context("node-1 -> p31 over VXLAN")?;
    ensure!(packets(n1, "remote_tunnel")? > tunnel_before);
    ensure!(
        packets(n3, "drop_tunnel_foreign")? - before == dropped,
        "real VXLAN traffic was dropped as foreign"
    );

    // The peers are exactly the other nodes, and follow the node list.
    let peers = |node: &Node| -> Result<Vec<Ipv4Addr>> {
        let mut found = mycni::datapath::read_peers(&node.pin_root())?;
        found.sort();
        Ok(found)
    };
    ensure!(
        peers(n3)? == [NODES[0].ip, NODES[1].ip],
        "PEERS: {:?}",
        peers(n3)?
    );
    cluster.write_nodes_file(&["node-2", "node-3"])?;
    wait_for(Duration::from_secs(5), || Ok(peers(n3)? == [NODES[1].ip]))
        .context("node-1 stays a VXLAN peer of node-3 after leaving the node list")?;
    Ok(())
}

/// Point 3: a pod's router advertisement configures nothing on the node; IPv6 from pods is
/// dropped and counted.
#[test]
fn a_pods_router_advertisement_configures_nothing_on_the_node() -> Result<()> {
    let node = Node::new(&prefix("isora"), "10.244.1.0/24")?;
    let pod = node.add_pod("a")?;
    let host_veth = pod.result["interfaces"][0]["name"]
        .as_str()
        .context("host veth name in the ADD result")?
        .to_string();
    // The veth's carrier comes up a moment after ADD; an IPv6-enabled veth configures
    // itself then (link-local address, all-nodes group), and only then hears an RA.
    wait_for(Duration::from_secs(5), || {
        Ok(node
            .netns
            .exec(&["ip", "-o", "link", "show", "dev", &host_veth])?
            .contains("state UP"))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let attacker = Attacker::new(&node, &pod)?;
    let router: Ipv6Addr = "fe80::bad:1".parse()?;
    let prefix_advertised: Ipv6Addr = "2001:db8:1::".parse()?;
    let ra = raw::router_advertisement(router, attacker.pod_mac, prefix_advertised);
    let before = packets(&node, "drop_ipv6").unwrap_or(0);
    for _ in 0..3 {
        attacker.socket.send(&raw::ethernet(
            [0x33, 0x33, 0, 0, 0, 1],
            attacker.pod_mac,
            raw::ETH_P_IPV6,
            &ra,
        ))?;
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(700));
    let routes = node.netns.exec(&["ip", "-6", "route", "show"])?;
    ensure!(
        !routes.contains("default") && !routes.contains("2001:db8:1:"),
        "the node took routes from the pod's advertisement:\n{routes}"
    );
    let addresses = node
        .netns
        .exec(&["ip", "-6", "addr", "show", "dev", &host_veth])?;
    ensure!(
        !addresses.contains("2001:db8:1:"),
        "the host veth took an address from the pod's advertisement:\n{addresses}"
    );
    for (key, want) in [
        ("accept_ra", "0"),
        ("accept_redirects", "0"),
        ("disable_ipv6", "1"),
    ] {
        let value =
            node.netns
                .exec(&["sysctl", "-n", &format!("net.ipv6.conf.{host_veth}.{key}")])?;
        ensure!(
            value.trim() == want,
            "{host_veth} {key} is {}, want {want}",
            value.trim()
        );
    }
    let dropped = packets(&node, "drop_ipv6")? - before;
    ensure!(dropped >= 3, "drop_ipv6 rose by {dropped}, expected 3");
    Ok(())
}

/// Point 4: what SNAT cannot translate (SCTP, GRE, ICMP other than echo requests) never
/// leaves the node toward the outside with a pod's address; it still reaches other pods.
#[test]
fn protocols_snat_cannot_translate_never_leave_with_a_pod_address() -> Result<()> {
    let cluster = Cluster::new(&prefix("isoproto"), &ALL, &[])?;
    wait_for_full_mesh(&cluster)?;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (p11, p21) = (n1.add_pod("p11")?, n2.add_pod("p21")?);
    let watchers = [
        (
            "external",
            PacketSocket::open(&cluster.external, Some("eth0"))?,
        ),
        ("p21", PacketSocket::open(&p21.netns, Some("eth0"))?),
    ];
    let attacker = Attacker::new(n1, &p11)?;
    let sctp = |text: &str| -> Vec<u8> {
        // Common header: ports 5000 -> 5001, verification tag, checksum (not checked).
        let mut payload = vec![0x13, 0x88, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0];
        payload.extend_from_slice(text.as_bytes());
        payload
    };
    let gre = |text: &str| -> Vec<u8> {
        let mut payload = vec![0, 0, 0x08, 0];
        payload.extend_from_slice(text.as_bytes());
        payload
    };
    let icmp = |kind: u8, text: &str| -> Vec<u8> {
        let mut rest = vec![0x12, 0x34, 0, 1];
        rest.extend_from_slice(text.as_bytes());
        raw::icmp4(kind, 0, &rest)
    };
    let untranslatable = |dst: Ipv4Addr| -> Vec<(String, Vec<u8>)> {
        let (s, g, t, r) = (
            format!("{MARK} sctp to {dst}"),
            format!("{MARK} gre to {dst}"),
            format!("{MARK} icmp timestamp to {dst}"),
            format!("{MARK} icmp echo reply to {dst}"),
        );
        vec![
            (s.clone(), raw::ipv4(p11.ip, dst, 132, &sctp(&s))),
            (g.clone(), raw::ipv4(p11.ip, dst, 47, &gre(&g))),
            (t.clone(), raw::ipv4(p11.ip, dst, 1, &icmp(13, &t))),
            (r.clone(), raw::ipv4(p11.ip, dst, 1, &icmp(0, &r))),
        ]
    };
    let before = packets(n1, "drop_untranslatable").unwrap_or(0);
    let to_outside = untranslatable(EXTERNAL_IP);
    let to_pod = untranslatable(p21.ip);
    let control = format!("{MARK} udp to {EXTERNAL_IP}");
    for _ in 0..2 {
        for (_, packet) in to_outside.iter().chain(to_pod.iter()) {
            attacker.send_ipv4(packet)?;
        }
        attacker.send_ipv4(&raw::udp4(
            p11.ip,
            EXTERNAL_IP,
            40001,
            7777,
            control.as_bytes(),
        ))?;
        std::thread::sleep(Duration::from_millis(300));
    }
    let seen = collect(&watchers);
    let control_sources: Vec<Option<Ipv4Addr>> = seen
        .iter()
        .filter(|(name, f)| name == "external" && raw::contains(f, control.as_bytes()))
        .map(|(_, f)| raw::ipv4_source(f))
        .collect();
    ensure!(
        !control_sources.is_empty() && control_sources.iter().all(|s| *s == Some(NODES[0].ip)),
        "control: UDP to the outside arrived from {control_sources:?}, not as node-1"
    );
    for (text, _) in &to_outside {
        let got = seen_by(&seen, text);
        ensure!(
            got.is_empty(),
            "{text:?} left the cluster and reached {got:?}"
        );
    }
    // Inside the cluster nothing needs translating: those still arrive, as the pod.
    for (text, _) in &to_pod {
        ensure!(
            seen_by(&seen, text).contains(&"p21"),
            "{text:?} no longer reaches the pod p21"
        );
    }
    let dropped = packets(n1, "drop_untranslatable")? - before;
    let expected = 2 * to_outside.len() as u64;
    ensure!(
        dropped >= expected,
        "drop_untranslatable rose by {dropped}, expected at least {expected}"
    );
    Ok(())
}

/// The error a connected UDP socket in `netns` reports after sending to `target`.
/// `IP_RECVERR`: host unreachable is a soft error, reported only to sockets asking for it.
fn udp_error(netns: &Netns, target: SocketAddr, text: &str) -> Result<Option<i32>> {
    netns.run_inside(|| {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        let on: libc::c_int = 1;
        // SAFETY: IP_RECVERR takes an int of the size given; the fd is the socket's own.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                &on as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        ensure!(set == 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        if let Err(e) = socket.connect(target) {
            return Ok(e.raw_os_error());
        }
        if let Err(e) = socket.send(text.as_bytes()) {
            return Ok(e.raw_os_error());
        }
        let mut buf = [0u8; 64];
        Ok(socket.recv(&mut buf).err().and_then(|e| e.raw_os_error()))
    })
}

/// Point 5: addresses of the node's pod CIDR that no pod holds (and its broadcast) are
/// answered on the node with ICMP host unreachable, never sent to the default gateway.
#[test]
fn unassigned_addresses_of_the_nodes_pod_cidr_never_leave_the_node() -> Result<()> {
    let cluster = Cluster::new(&prefix("isounas"), &ALL, &[])?;
    wait_for_full_mesh(&cluster)?;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (p11, p21) = (n1.add_pod("p11")?, n2.add_pod("p21")?);
    // Give the agent its moment to install the route; the checks below judge the result.
    let _ = wait_for(Duration::from_secs(2), || {
        Ok(n1
            .netns
            .exec(&["ip", "route", "show", "type", "unreachable"])?
            .contains("10.244.1.0/24"))
    });
    let watcher = PacketSocket::open(&cluster.router, None)?;
    let unassigned = Ipv4Addr::new(10, 244, 1, 99);
    let broadcast = Ipv4Addr::new(10, 244, 1, 255);
    let before = packets(n1, "to_unassigned").unwrap_or(0);
    let mut sent = Vec::new();
    for (who, netns, dst) in [
        ("p11", &p11.netns, unassigned),
        ("p11", &p11.netns, broadcast),
        ("p21", &p21.netns, unassigned),
        ("node-1", &n1.netns, unassigned),
    ] {
        let text = format!("{MARK} {who} to {dst}");
        let error = udp_error(netns, SocketAddr::from((dst, 7777)), &text)?;
        sent.push((who, dst, text, error));
    }
    // Nothing went to the default gateway...
    let frames = watcher.received(Duration::from_millis(700));
    for (_, _, text, _) in &sent {
        ensure!(
            !frames.iter().any(|f| raw::contains(f, text.as_bytes())),
            "{text:?} left node-1 for its default gateway"
        );
    }
    // ...and the sender heard at once that no one is there.
    for (who, dst, _, error) in &sent {
        ensure!(
            *error == Some(libc::EHOSTUNREACH),
            "{who} -> {dst}: got errno {error:?}, not host unreachable (EHOSTUNREACH) from \
             node-1 (its unreachable routes: {:?})",
            n1.netns
                .exec(&["ip", "route", "show", "type", "unreachable"]),
        );
    }
    let counted = packets(n1, "to_unassigned")? - before;
    ensure!(counted >= 3, "to_unassigned rose by {counted}, expected 3");
    Ok(())
}

/// ARP from a pod speaks only for the pod itself: requests or replies with another sender
/// address, or with a MAC that is not the pod's, are dropped before the node's stack, so
/// the node's neighbour table never learns them. The pod's own ARP still works.
#[test]
fn arp_from_a_pod_speaks_only_for_the_pod_itself() -> Result<()> {
    let node = Node::new(&prefix("isoarp"), "10.244.1.0/24")?;
    let (a, b) = (node.add_pod("a")?, node.add_pod("b")?);
    let attacker = Attacker::new(&node, &a)?;
    // The node's neighbour entry for a, old enough (locktime 1 s) to be overridden.
    node.netns.ping(a.ip)?;
    std::thread::sleep(Duration::from_millis(1200));
    let unassigned = Ipv4Addr::new(10, 244, 1, 99);
    let gateway = Ipv4Addr::new(169, 254, 1, 1);
    let broadcast = [0xff; 6];
    let (me, host) = (attacker.pod_mac, attacker.host_mac);
    let before = packets(&node, "drop_spoofed").unwrap_or(0);
    let lies = [
        // Another pod's address, the pod's own MAC.
        (
            broadcast,
            me,
            raw::arp(ARP_REQUEST, me, b.ip, [0; 6], gateway),
        ),
        // An unassigned address and a foreign MAC, asking for the node's IP.
        (
            broadcast,
            FOREIGN_MAC,
            raw::arp(ARP_REQUEST, FOREIGN_MAC, unassigned, [0; 6], NODE_IP),
        ),
        // Its own address with a foreign MAC: an unsolicited reply and a gratuitous ARP.
        (
            host,
            FOREIGN_MAC,
            raw::arp(ARP_REPLY, FOREIGN_MAC, a.ip, host, NODE_IP),
        ),
        (
            broadcast,
            FOREIGN_MAC,
            raw::arp(ARP_REQUEST, FOREIGN_MAC, a.ip, [0; 6], a.ip),
        ),
    ];
    // Whatever the ping brought (the pod's own ARP for its gateway) is not an answer to a lie.
    let _ = attacker.socket.received(Duration::from_millis(100));
    for _ in 0..2 {
        for (dst, src, packet) in &lies {
            attacker
                .socket
                .send(&raw::ethernet(*dst, *src, ETH_P_ARP, packet))?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let answers: Vec<Vec<u8>> = attacker
        .socket
        .received(Duration::from_millis(500))
        .into_iter()
        .filter(|f| f.len() >= 42 && u16::from_be_bytes([f[12], f[13]]) == ETH_P_ARP)
        .filter(|f| u16::from_be_bytes([f[20], f[21]]) == ARP_REPLY)
        // Not an answer to the pod's own ARP (for its gateway, which the ping may need).
        .filter(|f| f[32..38] != me || f[38..42] != a.ip.octets())
        .collect();
    ensure!(
        answers.is_empty(),
        "the pod got {} ARP replies to its lies",
        answers.len()
    );
    let neighbours = node.netns.exec(&["ip", "neigh", "show"])?;
    ensure!(
        !neighbours.contains("02:de:ad:be:ef:01") && !neighbours.contains(&unassigned.to_string()),
        "the node's neighbour table learned a lie:\n{neighbours}"
    );
    let dropped = packets(&node, "drop_spoofed")? - before;
    let expected = 2 * lies.len() as u64;
    ensure!(
        dropped >= expected,
        "drop_spoofed rose by {dropped}, expected at least {expected}"
    );
    // The pod's own ARP for its gateway is still answered, and it reaches b and the node.
    a.netns.exec(&["ip", "neigh", "flush", "dev", "eth0"])?;
    a.netns.ping(b.ip)?;
    node.netns.ping(a.ip)?;
    Ok(())
}
