//! NetworkPolicy enforced by the datapath on real traffic: the policy maps of node-1 are
//! written with `mycni::policy_maps::PolicyTables` (what the agent's policy controller
//! calls), and real TCP, UDP and ping between pods on the same node, across nodes directly
//! and through VXLAN, and from the node, show what passes. Needs root.
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use mycni::policy_endpoint::{
    render_policy_namespaces, unresolved_endpoint, write_policy_namespaces, EndpointPolicyMaps,
};
use mycni::policy_maps::{PolicyDesired, PolicyTables};
use mycni_common::policy::{
    identity, PolicyCtEntry, PolicyEndpoint, PolicyEntry, PolicyKey, ENFORCE_EGRESS,
    ENFORCE_INGRESS, POLICY_EGRESS, POLICY_INGRESS,
};
use mycni_common::{verdict, FlowKey, MAP_POLICY, MAP_POLICY_CT};
use mycni_tests::cluster::{Cluster, NODES};
use mycni_tests::kubeproxy::Service;
use mycni_tests::raw::{self, PacketSocket, TCP_ACK, TCP_SYN};
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

#[test]
fn egress_to_the_pods_own_node_is_enforced_and_probes_still_pass() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("polhost"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let n1 = cluster.node("node-1");
    let pods = Pods::new(&cluster)?;
    let a1 = &pods.a1;
    let node_ip = NODES[0].ip;
    ensure!(
        tcp_connects(&n1.netns, &a1.netns, node_ip, 7700)?,
        "a1 -> its node without policy"
    );

    // a1 may only talk to b1: its own node's addresses are not b1.
    let mut desired = pods.policy(n1, ENFORCE_EGRESS)?;
    allow(&mut desired, a1, ID_B1, 0, TCP, POLICY_EGRESS);
    apply(n1, &desired)?;
    ensure!(
        !tcp_connects(&n1.netns, &a1.netns, node_ip, 7700)?,
        "a1 -> its node's address not denied"
    );
    ensure!(!pings(&a1.netns, node_ip), "a1 pings its node");
    let (_, egress) = drops(&n1.pin_root(), a1.ip)?;
    ensure!(egress > 0, "a1's egress drops: {egress}");
    // The node's probes are the node's egress and a1's ingress: they still pass, and a1's
    // answers are their replies.
    let probe = SocketAddr::from((a1.ip, 7701));
    tcp_echo(&a1.netns, probe, &n1.netns, probe).context("the node's probe")?;

    // An egress rule for the node (an ipBlock over its address, resolved to HOST).
    allow(&mut desired, a1, identity::HOST, 7700, TCP, POLICY_EGRESS);
    apply(n1, &desired)?;
    let on_node = SocketAddr::from((node_ip, 7700));
    tcp_echo(&n1.netns, on_node, &a1.netns, on_node).context("a1 -> its node, allowed")?;
    ensure!(
        !tcp_connects(&n1.netns, &a1.netns, node_ip, 7702)?,
        "a1 -> its node on a port no rule allows"
    );
    Ok(())
}

#[test]
fn del_clears_the_pods_policy_and_a_pod_reusing_its_address_inherits_nothing() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("poldel"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let n1 = cluster.node("node-1");
    let pods = Pods::new(&cluster)?;
    let (a1, a2, b1) = (&pods.a1, &pods.a2, &pods.b1);
    // The agent's view of the maps, kept across the DEL as the agent keeps it.
    let mut agent = PolicyTables::open(&n1.pin_root())?;
    let mut desired = pods.policy(n1, ENFORCE_INGRESS)?;
    allow(&mut desired, a1, identity::HOST, 0, 0, POLICY_INGRESS);
    allow(&mut desired, a1, ID_B1, 7801, TCP, POLICY_INGRESS);
    agent.apply(&desired)?;
    let allowed = SocketAddr::from((a1.ip, 7801));
    tcp_echo(&a1.netns, allowed, &b1.netns, allowed).context("b1 -> a1 allowed")?;
    ensure!(
        !tcp_connects(&a1.netns, &a2.netns, a1.ip, 7800)?,
        "a2 -> a1 not denied"
    );

    n1.del_pod(a1)?;
    let after = PolicyTables::open(&n1.pin_root())?;
    let held = |ip: Ipv4Addr| {
        let o = ip.octets();
        let current = after.current();
        let rows = current.rules.keys().filter(|k| k.endpoint == o).count();
        let flows = after.connections().map(|c| {
            c.iter()
                .filter(|(f, _)| f.saddr == o || f.daddr == o)
                .count()
        });
        let drops = after.drops().map(|d| d.contains_key(&ip));
        (current.endpoints.contains_key(&ip), rows, flows, drops)
    };
    let (endpoint, rows, flows, counted) = held(a1.ip);
    ensure!(
        !endpoint && rows == 0 && flows? == 0 && !counted?,
        "DEL left a1's policy: endpoint {endpoint}, {rows} rows"
    );

    // A new pod on the same address, in a namespace without policies: nothing inherited.
    let reused = n1.add_pod_with_args("r1", &format!("IP={}", a1.ip))?;
    ensure!(
        reused.ip == a1.ip,
        "the address was not reused: {}",
        reused.ip
    );
    ensure!(
        tcp_connects(&reused.netns, &a2.netns, reused.ip, 7800)?,
        "the new pod inherited the old pod's deny"
    );
    // The agent, whose last write still shows the old pod's entries, now selects the new
    // pod with the same policy: it must write them again, not find nothing to do.
    agent.apply(&desired)?;
    ensure!(
        !tcp_connects(&reused.netns, &a2.netns, reused.ip, 7800)?,
        "the agent did not write the reused address's policy again"
    );
    tcp_echo(&reused.netns, allowed, &b1.netns, allowed).context("b1 -> the new pod")?;
    Ok(())
}

#[test]
fn a_new_pod_of_a_namespace_with_policies_starts_closed_until_the_agent_resolves_it() -> Result<()>
{
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("polnew"), &["node-1"], &[])?;
    let n1 = cluster.node("node-1");
    let peer = n1.add_pod("peer")?;
    // What the agent writes: "shop" has policies, "blog" none.
    write_policy_namespaces(&n1.data_dir, &render_policy_namespaces(["shop"]))?;
    let fresh = n1.add_pod_with_args("fresh", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=fresh")?;
    let other = n1.add_pod_with_args("other", "K8S_POD_NAMESPACE=blog;K8S_POD_NAME=other")?;
    let marker = EndpointPolicyMaps::open(&n1.pin_root())?.endpoint(fresh.ip)?;
    ensure!(
        marker == Some(unresolved_endpoint()),
        "fresh's entry: {marker:?}"
    );
    let closed = |what: &str| -> Result<()> {
        ensure!(
            !tcp_connects(&fresh.netns, &peer.netns, fresh.ip, 7900)?,
            "{what}: into the unresolved pod"
        );
        ensure!(
            !tcp_connects(&peer.netns, &fresh.netns, peer.ip, 7901)?,
            "{what}: out of the unresolved pod"
        );
        Ok(())
    };
    closed("after ADD")?;
    // The kubelet's probes pass: readiness is not held back by the window.
    let probe = SocketAddr::from((fresh.ip, 7903));
    tcp_echo(&fresh.netns, probe, &n1.netns, probe).context("the node's probe")?;
    // The node is no exception the other way.
    ensure!(
        !tcp_connects(&n1.netns, &fresh.netns, NODES[0].ip, 7904)?,
        "the unresolved pod reaches its node"
    );
    ensure!(
        tcp_connects(&other.netns, &peer.netns, other.ip, 7902)?,
        "a pod of a namespace without policies is not open"
    );

    // An agent write before its watch brings fresh's IP keeps the marker.
    let mut agent = PolicyTables::open(&n1.pin_root())?;
    let mut known: BTreeSet<Ipv4Addr> = [peer.ip, other.ip].into_iter().collect();
    agent.apply_keeping_unresolved(&PolicyDesired::default(), &known)?;
    closed("after an agent write that does not know the pod")?;
    // Once the agent knows the pod (here selected by nothing), the marker goes.
    known.insert(fresh.ip);
    agent.apply_keeping_unresolved(&PolicyDesired::default(), &known)?;
    ensure!(
        tcp_connects(&fresh.netns, &peer.netns, fresh.ip, 7900)?,
        "the resolved pod is still closed"
    );
    Ok(())
}

/// A pod sending hand-made frames out of its `eth0`, to its host veth.
struct RawSender {
    socket: PacketSocket,
    pod_mac: [u8; 6],
    host_mac: [u8; 6],
}

impl RawSender {
    fn new(node: &Node, pod: &Pod) -> Result<RawSender> {
        let endpoint = mycni::datapath::Maps::open(&node.pin_root())?
            .endpoint(pod.ip)?
            .context("the pod's endpoint")?;
        Ok(RawSender {
            socket: PacketSocket::open(&pod.netns, Some("eth0"))?,
            pod_mac: endpoint.pod_mac,
            host_mac: endpoint.host_mac,
        })
    }

    fn send(&self, packet: &[u8]) -> Result<()> {
        self.socket
            .send(&raw::ethernet(self.host_mac, self.pod_mac, 0x0800, packet))
    }
}

#[test]
fn forged_replies_open_no_door_and_a_spoofed_peer_is_refused() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("polforge"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let (n1, n2) = (cluster.node("node-1"), cluster.node("node-2"));
    let pods = Pods::new(&cluster)?;
    let (a1, a2, b1) = (&pods.a1, &pods.a2, &pods.b1);
    // a1 takes nothing in but b1 on 7801 (and the node); its egress is free.
    let mut desired = pods.policy(n1, ENFORCE_INGRESS)?;
    allow(&mut desired, a1, identity::HOST, 0, 0, POLICY_INGRESS);
    allow(&mut desired, a1, ID_B1, 7801, TCP, POLICY_INGRESS);
    apply(n1, &desired)?;
    let watch_a1 = PacketSocket::open(&a1.netns, Some("eth0"))?;
    let spoofs_before = packets(n1, verdict::DROP_SPOOFED)?;

    // a1 "answers" a connection a2 never opened (a SYN-ACK from its port 7800 to a2's
    // 7802), then a2 opens one from that very port: a SYN is no reply.
    RawSender::new(n1, a1)?.send(&raw::tcp4(a1.ip, a2.ip, 7800, 7802, TCP_SYN | TCP_ACK, &[]))?;
    let from_a2 = RawSender::new(n1, a2)?;
    from_a2.send(&raw::tcp4(a2.ip, a1.ip, 7802, 7800, TCP_SYN, &[]))?;
    // a2 claims b1's address, which a1 admits on 7801: the source check stops it.
    from_a2.send(&raw::tcp4(b1.ip, a1.ip, 7803, 7801, TCP_SYN, &[]))?;
    // b1's own SYN to 7801 arrives: the watcher sees what passes.
    RawSender::new(n2, b1)?.send(&raw::tcp4(b1.ip, a1.ip, 7804, 7801, TCP_SYN, &[]))?;

    let syns: Vec<(u16, u16)> = watch_a1
        .received(Duration::from_millis(500))
        .iter()
        .filter_map(|frame| raw::tcp_of_frame(frame))
        .filter(|&(_, _, flags)| flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
        .map(|(sport, dport, _)| (sport, dport))
        .collect();
    ensure!(
        syns == vec![(7804, 7801)],
        "SYNs that reached a1 (only b1's from 7804 may): {syns:?}"
    );
    ensure!(
        packets(n1, verdict::DROP_SPOOFED)? > spoofs_before,
        "the spoofed SYN was not dropped as spoofed"
    );
    let (ingress, _) = drops(&n1.pin_root(), a1.ip)?;
    ensure!(ingress > 0, "a1's ingress drops: {ingress}");
    Ok(())
}

fn pinned_hash<K: aya::Pod, V: aya::Pod>(
    node: &Node,
    name: &str,
) -> Result<BpfHashMap<MapData, K, V>> {
    let data = MapData::from_pin(node.pin_root().join(name))?;
    let map = if name == MAP_POLICY_CT {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    Ok(BpfHashMap::try_from(map)?)
}

#[test]
fn an_evicted_connection_is_decided_again_like_a_new_one_and_carries_on() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("polevict"), &ALL, &[])?;
    cluster.wait_for_full_mesh()?;
    let n1 = cluster.node("node-1");
    let pods = Pods::new(&cluster)?;
    let (a1, b1) = (&pods.a1, &pods.b1);
    // a1 takes nothing in (but the node) and may open TCP to b1: b1's answers pass only as
    // replies of a tracked flow.
    let mut desired = pods.policy(n1, ENFORCE_INGRESS | ENFORCE_EGRESS)?;
    allow(&mut desired, a1, identity::HOST, 0, 0, POLICY_INGRESS);
    allow(&mut desired, a1, ID_B1, 0, TCP, POLICY_EGRESS);
    apply(n1, &desired)?;
    let mut stream = Stream::open(&b1.netns, &a1.netns, b1.ip, 7810)?;
    for n in 0..2 {
        stream.round(n).context("before the eviction")?;
    }
    // What the LRU does when POLICY_CT is full: the flow's entry is gone.
    let mut ct = pinned_hash::<FlowKey, PolicyCtEntry>(n1, MAP_POLICY_CT)?;
    let a1_flows: Vec<FlowKey> = ct
        .keys()
        .filter_map(|key| key.ok())
        .filter(|key| key.saddr == a1.ip.octets() || key.daddr == a1.ip.octets())
        .collect();
    ensure!(!a1_flows.is_empty(), "a1's connection was not tracked");
    for key in &a1_flows {
        ct.remove(key)?;
    }
    // a1's next segment is decided as a new flow of a1 (allowed) and tracked again, so
    // b1's answer is its reply once more.
    for n in 2..4 {
        stream.round(n).context("after the eviction")?;
    }
    let original = FlowKey {
        saddr: a1.ip.octets(),
        daddr: b1.ip.octets(),
        sport: stream.stream.local_addr()?.port(),
        dport: 7810,
        proto: TCP,
        pad: [0; 3],
    };
    ensure!(
        ct.get(&original, 0).is_ok(),
        "the connection is not tracked again in its own direction"
    );
    Ok(())
}

#[test]
fn a_full_policy_map_fails_closed_and_the_apply_reports_it() -> Result<()> {
    mycni_tests::require_root!();
    let cluster = Cluster::new(&prefix("polfull"), &["node-1"], &[])?;
    let n1 = cluster.node("node-1");
    let a1 = n1.add_pod("a1")?;
    let a2 = n1.add_pod("a2")?;
    // The agent, opened before the rows below exist: they are not its own to remove.
    let mut agent = PolicyTables::open(&n1.pin_root())?;
    // Fill POLICY with rows of an address no pod holds, then make room for exactly one.
    let mut rows = pinned_hash::<PolicyKey, PolicyEntry>(n1, MAP_POLICY)?;
    let filler = |n: u32| PolicyKey {
        endpoint: [10, 99, (n >> 8) as u8, n as u8],
        peer_identity: n >> 16,
        port: 1,
        protocol: TCP,
        direction: POLICY_INGRESS,
    };
    let mut filled = 0u32;
    while rows
        .insert(filler(filled), PolicyEntry { rules: 1 }, 0)
        .is_ok()
    {
        filled += 1;
        ensure!(
            filled <= mycni_common::MAX_POLICY,
            "POLICY takes more than its capacity"
        );
    }
    rows.remove(&filler(filled - 1))?;

    // a1 admits the node and a2 on 8000: two rows, one fits (the node's, first in order).
    let mut desired = PolicyDesired::default();
    desired.endpoints.insert(
        a1.ip,
        PolicyEndpoint {
            identity: ID_A1,
            enforce: ENFORCE_INGRESS,
            pad: [0; 3],
        },
    );
    desired.identities.insert(host(a2.ip), ID_A2);
    for addr in addresses(&n1.netns)? {
        desired.identities.insert(host(addr), identity::HOST);
    }
    allow(&mut desired, &a1, identity::HOST, 0, 0, POLICY_INGRESS);
    allow(&mut desired, &a1, ID_A2, 8000, TCP, POLICY_INGRESS);
    ensure!(
        agent.apply(&desired).is_err(),
        "writing more rows than fit reported no error"
    );
    // Nothing more than the policy allows: a1 enforces, with the rows that fit.
    ensure!(
        !tcp_connects(&a1.netns, &a2.netns, a1.ip, 7999)?,
        "a full map left a1 open"
    );
    ensure!(
        !tcp_connects(&a1.netns, &a2.netns, a1.ip, 8000)?,
        "a row that did not fit allows"
    );
    let probe = SocketAddr::from((a1.ip, 8001));
    tcp_echo(&a1.netns, probe, &n1.netns, probe).context("the row that fit")?;
    // Room again: the next apply writes the rest.
    rows.remove(&filler(filled - 2))?;
    agent.apply(&desired)?;
    ensure!(
        tcp_connects(&a1.netns, &a2.netns, a1.ip, 8000)?,
        "the retried row does not allow"
    );
    Ok(())
}
