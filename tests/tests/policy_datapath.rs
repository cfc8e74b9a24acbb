//! NetworkPolicy enforced by the datapath on real traffic: the policy maps of node-1 are
//! written with `mycni::policy_maps::PolicyTables` (what the agent's policy controller
//! calls), and real TCP, UDP and ping between pods on the same node, across nodes directly
//! and through VXLAN, and from the node, show what passes. Needs root.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mycni::policy_maps::{PolicyDesired, PolicyTables};
use mycni_common::policy::{
    identity, PolicyEndpoint, PolicyEntry, PolicyKey, ENFORCE_EGRESS, ENFORCE_INGRESS,
    POLICY_EGRESS, POLICY_INGRESS,
};
use mycni_common::verdict;
use mycni_tests::cluster::Cluster;
use mycni_tests::kubeproxy::Service;
use mycni_tests::{prefix, tcp_echo, udp_echo, Netns, Node, Pod};

const ALL: [&str; 3] = ["node-1", "node-2", "node-3"];
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

/// The cluster's pods and the identity each gets (one label set per pod here).
struct Pods {
    /// Server pods on node-1, where policy is written.
    a1: Pod,
    a2: Pod,
    /// On node-2 (direct routing) and node-3 (VXLAN).
    b1: Pod,
    c1: Pod,
}

const ID_A1: u32 = 256;
const ID_A2: u32 = 257;
const ID_B1: u32 = 258;
const ID_C1: u32 = 259;

impl Pods {
    fn new(cluster: &Cluster) -> Result<Pods> {
        Ok(Pods {
            a1: cluster.node("node-1").add_pod("a1")?,
            a2: cluster.node("node-1").add_pod("a2")?,
            b1: cluster.node("node-2").add_pod("b1")?,
            c1: cluster.node("node-3").add_pod("c1")?,
        })
    }

    /// node-1's policy maps with `enforce` on a1 (a2 selected by nothing) and no rule:
    /// every pod's identity, node-1's own addresses as `HOST`, the other nodes as
    /// `REMOTE_NODE`.
    fn policy(&self, node1: &Node, enforce: u8) -> Result<PolicyDesired> {
        let mut desired = PolicyDesired::default();
        desired.endpoints.insert(
            self.a1.ip,
            PolicyEndpoint {
                identity: ID_A1,
                enforce,
                pad: [0; 3],
            },
        );
        for (pod, id) in [
            (&self.a1, ID_A1),
            (&self.a2, ID_A2),
            (&self.b1, ID_B1),
            (&self.c1, ID_C1),
        ] {
            desired.identities.insert(host(pod.ip), id);
        }
        for spec in mycni_tests::cluster::NODES.iter().skip(1) {
            desired
                .identities
                .insert(host(spec.ip), identity::REMOTE_NODE);
        }
        for addr in addresses(&node1.netns)? {
            desired.identities.insert(host(addr), identity::HOST);
        }
        Ok(desired)
    }
}

fn host(ip: Ipv4Addr) -> ipnetwork::Ipv4Network {
    ipnetwork::Ipv4Network::from(ip)
}

/// Every IPv4 address of a namespace (the node's own: what the `HOST` identity covers).
fn addresses(netns: &Netns) -> Result<Vec<Ipv4Addr>> {
    let out = netns.exec(&["ip", "-4", "-o", "addr", "show"])?;
    out.lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .map(|cidr| {
            let ip = cidr.split('/').next().unwrap_or(cidr);
            ip.parse().with_context(|| format!("address {cidr}"))
        })
        .collect()
}

fn allow(desired: &mut PolicyDesired, pod: &Pod, peer: u32, port: u16, proto: u8, dir: u8) {
    let key = PolicyKey {
        endpoint: pod.ip.octets(),
        peer_identity: peer,
        port,
        protocol: proto,
        direction: dir,
    };
    desired.rules.insert(key, PolicyEntry { rules: 1 });
}

fn apply(node: &Node, desired: &PolicyDesired) -> Result<()> {
    PolicyTables::open(&node.pin_root())?.apply(desired)?;
    Ok(())
}

/// Whether a TCP connection from `client` to `ip:port` completes (a server listens there).
/// A SYN policy drops is never answered: 2 s without an answer is a refusal.
fn tcp_connects(server: &Netns, client: &Netns, ip: Ipv4Addr, port: u16) -> Result<bool> {
    let target = SocketAddr::from((ip, port));
    let _listener = server.run_inside(|| Ok(TcpListener::bind(target)?))?;
    client.run_inside(|| Ok(TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok()))
}

fn pings(from: &Netns, to: Ipv4Addr) -> bool {
    from.ping(to).is_ok()
}

fn packets(node: &Node, which: u32) -> Result<u64> {
    Ok(mycni::datapath::read_stats(&node.pin_root())?[which as usize].packets)
}

fn drops(root: &Path, pod: Ipv4Addr) -> Result<(u64, u64)> {
    let drops = PolicyTables::open(root)?.drops()?;
    let d = drops.get(&pod).copied().unwrap_or_default();
    Ok((d.ingress_packets, d.egress_packets))
}

/// An echo conversation over one connection, a round at a time.
struct Stream {
    stream: TcpStream,
}

impl Stream {
    /// Connects from `client` to an echo server on `ip:port` in `server`.
    fn open(server: &Netns, client: &Netns, ip: Ipv4Addr, port: u16) -> Result<Stream> {
        let target = SocketAddr::from((ip, port));
        let listener = server.run_inside(|| Ok(TcpListener::bind(target)?))?;
        std::thread::spawn(move || -> Result<()> {
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = [0u8; 256];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                conn.write_all(&buf[..n])?;
            }
        });
        let stream = client.run_inside(|| {
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(stream)
        })?;
        Ok(Stream { stream })
    }

    /// One message and its echo.
    fn round(&mut self, n: usize) -> Result<()> {
        let message = format!("round {n}");
        self.stream.write_all(message.as_bytes())?;
        let mut got = vec![0u8; message.len()];
        self.stream.read_exact(&mut got)?;
        ensure!(got == message.as_bytes(), "echo came back as {got:?}");
        Ok(())
    }
}

#[test]
fn default_deny_ingress_blocks_every_path_an_allow_admits_and_probes_pass() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("polin"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let n1 = cluster.node("node-1");
    let pods = Pods::new(&cluster)?;
    let (a1, a2, b1, c1) = (&pods.a1, &pods.a2, &pods.b1, &pods.c1);
    // No policy: everything reaches a1.
    ensure!(
        tcp_connects(&a1.netns, &a2.netns, a1.ip, 7500)?,
        "same node without policy"
    );

    // Default deny ingress for a1, with the node's probes allowed (as the agent writes it)
    // and b1 allowed on TCP 7501.
    let mut desired = pods.policy(n1, ENFORCE_INGRESS)?;
    allow(&mut desired, a1, identity::HOST, 0, 0, POLICY_INGRESS);
    allow(&mut desired, a1, ID_B1, 7501, TCP, POLICY_INGRESS);
    apply(n1, &desired)?;
    ensure!(
        !tcp_connects(&a1.netns, &a2.netns, a1.ip, 7500)?,
        "same node: tcp not denied"
    );
    ensure!(!pings(&a2.netns, a1.ip), "same node: ping not denied");
    let target = SocketAddr::from((a1.ip, 7500));
    ensure!(
        udp_echo(&a1.netns, target, &a2.netns, target).is_err(),
        "same node: udp not denied"
    );
    ensure!(
        !tcp_connects(&a1.netns, &c1.netns, a1.ip, 7501)?,
        "vxlan: c1 not denied"
    );
    ensure!(
        !tcp_connects(&a1.netns, &b1.netns, a1.ip, 7502)?,
        "direct: b1 denied on another port"
    );
    let target = SocketAddr::from((a1.ip, 7501));
    tcp_echo(&a1.netns, target, &b1.netns, target).context("direct: the allowed port")?;
    // The node's probe (a kubelet's, from a node address) passes the default deny.
    tcp_echo(&a1.netns, target, &n1.netns, target).context("the node's probe")?;
    // Another node's address is not the node: denied where the stack delivers it (to_pod).
    let n2 = cluster.node("node-2");
    ensure!(
        !tcp_connects(&a1.netns, &n2.netns, a1.ip, 7501)?,
        "node-2 not denied"
    );
    // a2, which no policy selects, still takes anything.
    ensure!(
        tcp_connects(&a2.netns, &a1.netns, a2.ip, 7503)?,
        "a2 is selected by nothing"
    );

    // Allowing c1's identity too admits it through VXLAN.
    allow(&mut desired, a1, ID_C1, 0, TCP, POLICY_INGRESS);
    apply(n1, &desired)?;
    tcp_echo(&a1.netns, target, &c1.netns, target).context("vxlan: c1 now allowed")?;
    ensure!(!pings(&c1.netns, a1.ip), "vxlan: ping is not TCP");

    // Every drop counted: per reason and for a1's ingress.
    let (ingress, egress) = drops(&n1.pin_root(), a1.ip)?;
    ensure!(
        ingress > 0 && egress == 0,
        "a1's drops: ingress {ingress}, egress {egress}"
    );
    ensure!(packets(n1, verdict::DROP_POLICY_INGRESS)? >= ingress);
    ensure!(packets(n1, verdict::DROP_POLICY_EGRESS)? == 0);
    Ok(())
}

#[test]
fn replies_of_allowed_egress_return_and_a_new_deny_cuts_established_streams() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("poleg"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let n1 = cluster.node("node-1");
    let pods = Pods::new(&cluster)?;
    let (a1, a2, b1, c1) = (&pods.a1, &pods.a2, &pods.b1, &pods.c1);

    // a1 denies everything in (but the node) and may only talk to b1 (TCP, ICMP) and c1
    // (UDP): its replies must come back through its own default-deny ingress.
    let mut desired = pods.policy(n1, ENFORCE_INGRESS | ENFORCE_EGRESS)?;
    allow(&mut desired, a1, identity::HOST, 0, 0, POLICY_INGRESS);
    allow(&mut desired, a1, ID_B1, 0, TCP, POLICY_EGRESS);
    allow(&mut desired, a1, ID_B1, 0, ICMP, POLICY_EGRESS);
    allow(&mut desired, a1, ID_C1, 7601, UDP, POLICY_EGRESS);
    allow(&mut desired, a1, ID_A2, 7602, TCP, POLICY_INGRESS);
    apply(n1, &desired)?;
    let to_b1 = SocketAddr::from((b1.ip, 7600));
    tcp_echo(&b1.netns, to_b1, &a1.netns, to_b1).context("a1 -> b1 tcp")?;
    ensure!(pings(&a1.netns, b1.ip), "a1 -> b1 ping");
    let to_c1 = SocketAddr::from((c1.ip, 7601));
    udp_echo(&c1.netns, to_c1, &a1.netns, to_c1).context("a1 -> c1 udp over vxlan")?;
    ensure!(
        !tcp_connects(&a2.netns, &a1.netns, a2.ip, 7600)?,
        "a1 -> a2 not denied"
    );
    ensure!(
        !tcp_connects(&a1.netns, &b1.netns, a1.ip, 7603)?,
        "b1 -> a1 not denied"
    );

    // Established streams, one each way, then a policy that denies both: the next round
    // of each is cut.
    let mut outgoing = Stream::open(&b1.netns, &a1.netns, b1.ip, 7610)?;
    let mut incoming = Stream::open(&a1.netns, &a2.netns, a1.ip, 7602)?;
    for n in 0..3 {
        outgoing.round(n).context("a1 -> b1 before the deny")?;
        incoming.round(n).context("a2 -> a1 before the deny")?;
    }
    let mut denied = pods.policy(n1, ENFORCE_INGRESS | ENFORCE_EGRESS)?;
    allow(&mut denied, a1, identity::HOST, 0, 0, POLICY_INGRESS);
    apply(n1, &denied)?;
    if outgoing.round(3).is_ok() {
        bail!("the a1 -> b1 stream outlived the deny");
    }
    if incoming.round(3).is_ok() {
        bail!("the a2 -> a1 stream outlived the deny");
    }
    let (ingress, egress) = drops(&n1.pin_root(), a1.ip)?;
    ensure!(
        ingress > 0 && egress > 0,
        "a1's drops: ingress {ingress}, egress {egress}"
    );
    ensure!(packets(n1, verdict::DROP_POLICY_EGRESS)? > 0);
    Ok(())
}

#[test]
fn clusterip_flows_are_decided_for_the_backend_pod_after_kube_proxys_dnat() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("polsvc"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let n1 = cluster.node("node-1");
    let pods = Pods::new(&cluster)?;
    let (a1, a2, b1, c1) = (&pods.a1, &pods.a2, &pods.b1, &pods.c1);
    let on_a1 = SocketAddr::from((a1.ip, 8080));
    let on_b1 = SocketAddr::from((b1.ip, 8080));
    let service = |name: &str, ip: [u8; 4], endpoint: SocketAddr| Service {
        name: name.to_string(),
        cluster_ip: ip.into(),
        port: 80,
        endpoints: vec![endpoint],
    };
    cluster.install_kube_proxy(&[
        service("default/a1:http", [10, 96, 0, 10], on_a1),
        service("default/b1:http", [10, 96, 0, 11], on_b1),
    ])?;
    let vip_a1: SocketAddr = "10.96.0.10:80".parse()?;
    let vip_b1: SocketAddr = "10.96.0.11:80".parse()?;

    // a1 takes port 8080 from c1 only; a2 may only reach b1's 8080 and takes nothing in.
    let mut desired = pods.policy(n1, ENFORCE_INGRESS)?;
    allow(&mut desired, a1, identity::HOST, 0, 0, POLICY_INGRESS);
    allow(&mut desired, a1, ID_C1, 8080, TCP, POLICY_INGRESS);
    desired.endpoints.insert(
        a2.ip,
        PolicyEndpoint {
            identity: ID_A2,
            enforce: ENFORCE_INGRESS | ENFORCE_EGRESS,
            pad: [0; 3],
        },
    );
    allow(&mut desired, a2, identity::HOST, 0, 0, POLICY_INGRESS);
    allow(&mut desired, a2, ID_B1, 8080, TCP, POLICY_EGRESS);
    apply(n1, &desired)?;

    // Through VXLAN to the ClusterIP: node-3's stack translates, node-1 checks a1's ingress.
    tcp_echo(&a1.netns, on_a1, &c1.netns, vip_a1).context("c1 -> ClusterIP -> a1")?;
    // From a2 to the same node's backend: a2's egress, checked after the DNAT.
    let connects = |server: &Netns, listen: SocketAddr, client: &Netns, vip: SocketAddr| {
        let _listener = server.run_inside(|| Ok(TcpListener::bind(listen)?))?;
        client.run_inside(|| Ok(TcpStream::connect_timeout(&vip, Duration::from_secs(2)).is_ok()))
    };
    ensure!(
        !connects(&a1.netns, on_a1, &a2.netns, vip_a1)?,
        "a2 -> ClusterIP -> a1 not denied"
    );
    // From b1 (another node's stack translates): a1's ingress does not allow it.
    ensure!(
        !connects(&a1.netns, on_a1, &b1.netns, vip_a1)?,
        "b1 -> ClusterIP -> a1 not denied"
    );
    // To the other node's backend a2 may reach: its replies come back from the ClusterIP,
    // past a2's default-deny ingress.
    let seen = tcp_echo(&b1.netns, on_b1, &a2.netns, vip_b1).context("a2 -> ClusterIP -> b1")?;
    ensure!(seen.ip() == a2.ip, "b1 saw {seen}, not a2");
    let (_, a2_egress) = drops(&n1.pin_root(), a2.ip)?;
    let (a1_ingress, _) = drops(&n1.pin_root(), a1.ip)?;
    ensure!(
        a2_egress > 0 && a1_ingress > 0,
        "drops: a2 egress {a2_egress}, a1 ingress {a1_ingress}"
    );
    Ok(())
}
