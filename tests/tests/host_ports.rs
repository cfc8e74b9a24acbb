//! hostPorts without portmap: the real `mycni` binary gets `runtimeConfig.portMappings` (the
//! `portMappings` capability) as a runtime passes it, writes `HOST_PORTS`, and the socket
//! programs (agent in `--service-mode ebpf`, attached to a per-test cgroup) send node-local
//! calls to `<hostIP>:<hostPort>` to the pod. Clients are `mycni-sock-probe` processes in the
//! node's namespace inside that cgroup, as a node process or a hostNetwork pod is. Needs
//! root.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mycni::host_ports::{attachment_hash, HostPortEntries, HostPortTable};
use mycni::node_addresses::NodeAddressTable;
use mycni_common::service::{Backend, HostPortEntry, ServiceKey, PROTO_TCP};
use mycni_common::verdict;
use mycni_common::MAX_HOST_PORTS;
use mycni_tests::cgroup::TestCgroup;
use mycni_tests::sock_probe::{names, probe, servers_behind, Seen, Server};
use mycni_tests::{agent_bin, pod_ip, prefix, AgentLog, CniCall, Netns, Node, Pod, NODE_IP};
use serde_json::{json, Value};

const CONTAINER_PORT: u16 = 8080;
const ECONNREFUSED: i32 = 111;

/// One `runtimeConfig.portMappings` entry as the CNI conventions spell it (hostIP "" when
/// unset).
fn mapping(host_port: u16, protocol: &str, host_ip: &str) -> Value {
    json!({"hostPort": host_port, "containerPort": CONTAINER_PORT, "protocol": protocol, "hostIP": host_ip})
}

/// The same as containerd (go-cni) writes it: its Go field names as keys.
fn containerd_mapping(host_port: u16, protocol: &str, host_ip: &str) -> Value {
    json!({"HostPort": host_port, "ContainerPort": CONTAINER_PORT, "Protocol": protocol, "HostIP": host_ip})
}

/// A node in eBPF Services mode whose socket programs apply to `cgroup`.
struct HostPortNode {
    node: Node,
    cgroup: TestCgroup,
}

impl HostPortNode {
    fn new(test: &str, pod_cidr: &str) -> Result<HostPortNode> {
        let prefix = prefix(test);
        let cgroup = TestCgroup::new(&prefix)?;
        let mut node = Node::bare(&prefix, "node", pod_cidr)?;
        node.netns
            .exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        node.start_agent(&["--service-mode", "ebpf", "--cgroup-path", &cgroup.arg()])?;
        let log = AgentLog::follow(&mut node)?;
        log.wait_for(&["Services load-balanced in eBPF"], Duration::from_secs(20))?;
        let lab = HostPortNode { node, cgroup };
        lab.wait_for_node_address(NODE_IP, true)?;
        Ok(lab)
    }

    /// Waits until the agent has (or no longer has) `address` in `NODE_ADDRESSES`.
    fn wait_for_node_address(&self, address: Ipv4Addr, present: bool) -> Result<Duration> {
        let table = NodeAddressTable::open(&self.node.pin_root())?;
        mycni_tests::cluster::wait_for(Duration::from_secs(5), || {
            Ok(table.present()?.contains(&address) == present)
        })
        .with_context(|| format!("NODE_ADDRESSES never {present} for {address}"))
    }

    /// The network config with `mappings` in `runtimeConfig`, as libcni injects them.
    fn conf(&self, mappings: &[Value]) -> Value {
        let mut conf = self.node.conf("1.0.0");
        conf["runtimeConfig"] = json!({"portMappings": mappings});
        conf
    }

    fn call(&self, command: &str, pod: &Netns, conf: &Value) -> Result<CniCall> {
        let path = pod.path().display().to_string();
        self.node
            .cni(&Node::cni_env(command, &pod.name, &path), &conf.to_string())
    }

    /// ADD of a pod `name` with `mappings`: the call, and the pod if it succeeded.
    fn try_add(&self, name: &str, mappings: &[Value]) -> Result<(CniCall, Option<Pod>)> {
        let netns = Netns::new(&format!("{}-{name}", self.node.prefix))?;
        let call = self.call("ADD", &netns, &self.conf(mappings))?;
        if !call.exit_ok {
            return Ok((call, None));
        }
        let result = call.json()?;
        let ip = pod_ip(&result).context("ADD result has no IP")?;
        let pod = Pod {
            container_id: netns.name.clone(),
            netns,
            ip,
            result,
        };
        Ok((call, Some(pod)))
    }

    /// A pod with `mappings` serving its `name` on the container port (TCP and UDP).
    fn add(&self, name: &str, mappings: &[Value]) -> Result<(Pod, Server)> {
        let (call, pod) = self.try_add(name, mappings)?;
        let Some(pod) = pod else {
            bail!("ADD {name}: {} {}", call.stdout, call.stderr);
        };
        let server = Server::start(&pod.netns, CONTAINER_PORT, name)?;
        Ok((pod, server))
    }

    fn entries(&self) -> Result<HostPortEntries> {
        Ok(HostPortTable::open(&self.node.pin_root())?.entries()?)
    }

    /// The entries tagged with `pod`'s attachment.
    fn entries_of(&self, pod: &Pod) -> Result<HostPortEntries> {
        let tag = attachment_hash(&pod.container_id, "eth0");
        Ok(self
            .entries()?
            .into_iter()
            .filter(|(_, entry)| entry.attachment_hash == tag)
            .collect())
    }

    /// `count` calls from a node process (the node's namespace, inside the cgroup).
    fn probe_from_node(&self, mode: &str, target: SocketAddr, count: usize) -> Result<Vec<Seen>> {
        probe(Some(&self.cgroup), &self.node.netns, mode, target, count)
    }

    fn translated(&self) -> Result<u64> {
        let stats = mycni::datapath::read_stats(&self.node.pin_root())?;
        Ok(stats[verdict::HOST_PORT_TRANSLATED as usize].packets)
    }
}

/// The entries of `HOST_PORTS` as "address:port/protocol -> pod address:port".
fn described(entries: &HostPortEntries) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(key, entry)| {
            (
                mycni::host_ports::plan::describe(key),
                format!(
                    "{}:{}",
                    Ipv4Addr::from(entry.backend.address),
                    entry.backend.port
                ),
            )
        })
        .collect()
}

#[test]
fn tcp_and_udp_host_ports_reach_the_pod_from_the_node_on_loopback_and_the_node_ip() -> Result<()> {
    mycni_tests::require_root!();
    let lab = HostPortNode::new("hpreach", "10.244.31.0/24")?;
    let (pod, _server) = lab.add(
        "web",
        &[
            containerd_mapping(30080, "tcp", ""),
            containerd_mapping(30053, "udp", ""),
        ],
    )?;
    let to_pod = format!("{}:{CONTAINER_PORT}", pod.ip);
    // Unset hostIPs: one key each, for every node address.
    let want: BTreeMap<String, String> = [("*:30053/udp", &to_pod), ("*:30080/tcp", &to_pod)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    ensure!(described(&lab.entries()?) == want, "{:?}", lab.entries()?);
    // `mycni-agent services` lists them with the Service frontends.
    let root = lab.node.pin_root().display().to_string();
    let agent = agent_bin().display().to_string();
    let table = lab
        .node
        .netns
        .exec(&[&agent, "--bpffs-root", &root, "services"])?;
    let row = table
        .lines()
        .find(|line| line.starts_with("*:30080/tcp "))
        .with_context(|| format!("no hostPort row in:\n{table}"))?;
    ensure!(row.contains("host-port") && row.ends_with(&to_pod), "{row}");
    ensure!(
        table.contains(&format!("* = every node address: 127.0.0.1 {NODE_IP}")),
        "{table}"
    );

    let before = lab.translated()?;
    // Each address as IPv4, and IPv4-mapped through AF_INET6 sockets (a dual-stack client).
    let addresses = [Ipv4Addr::LOCALHOST, NODE_IP]
        .into_iter()
        .flat_map(|a| [IpAddr::V4(a), IpAddr::V6(a.to_ipv6_mapped())]);
    for address in addresses {
        let tcp = SocketAddr::new(address, 30080);
        let seen = servers_behind(tcp, &lab.probe_from_node("tcp", tcp, 2)?)?;
        ensure!(seen == names(&["web"]), "tcp to {tcp}: {seen:?}");
        // Unconnected (recvmsg shows the hostPort) and connected (getpeername does).
        let udp = SocketAddr::new(address, 30053);
        for mode in ["udp", "udp-connected"] {
            let seen = servers_behind(udp, &lab.probe_from_node(mode, udp, 2)?)?;
            ensure!(seen == names(&["web"]), "{mode} to {udp}: {seen:?}");
        }
    }
    // 2 TCP connects, 2 unconnected datagrams and 1 connect per address and family.
    let translated = lab.translated()? - before;
    ensure!(
        translated == 20,
        "host_port_translated counted {translated}"
    );
    // The port is the pod's for TCP and UDP only as mapped: UDP to the TCP hostPort is not.
    let unmapped = SocketAddr::from((NODE_IP, 30080));
    let seen = lab.probe_from_node("udp-connected", unmapped, 1)?;
    ensure!(
        seen == [Seen::Errno(ECONNREFUSED)],
        "udp to {unmapped}: {seen:?}"
    );
    lab.node.del_pod(&pod)?;
    Ok(())
}

/// The upstream conformance spec's three pods on one node (same hostPort, different
/// hostIP or protocol), each reached at its own; a fourth asking for a held triple is
/// refused with code 105 and leaves nothing behind.
#[test]
fn same_host_port_with_another_host_ip_or_protocol_coexists_and_a_held_one_is_refused() -> Result<()>
{
    mycni_tests::require_root!();
    let lab = HostPortNode::new("hpconfl", "10.244.32.0/24")?;
    let node_ip = NODE_IP.to_string();
    let (p1, _s1) = lab.add("p1", &[mapping(54321, "tcp", "127.0.0.1")])?;
    let (p2, _s2) = lab.add("p2", &[mapping(54321, "tcp", &node_ip)])?;
    let (p3, _s3) = lab.add("p3", &[mapping(54321, "udp", &node_ip)])?;
    for (mode, address, pod) in [
        ("tcp", Ipv4Addr::LOCALHOST, "p1"),
        ("tcp", NODE_IP, "p2"),
        ("udp", NODE_IP, "p3"),
    ] {
        let target = SocketAddr::from((address, 54321));
        let seen = servers_behind(target, &lab.probe_from_node(mode, target, 2)?)?;
        ensure!(seen == names(&[pod]), "{mode} to {target}: {seen:?}");
    }

    let entries = lab.entries()?;
    let leftovers = lab.node.leftovers()?;
    for (name, mappings) in [
        ("p4", vec![mapping(54321, "tcp", "127.0.0.1")]),
        // A free port first: it must not stay claimed when the held one fails the ADD.
        (
            "p5",
            vec![mapping(40000, "udp", ""), mapping(54321, "udp", "")],
        ),
    ] {
        let (call, pod) = lab.try_add(name, &mappings)?;
        ensure!(pod.is_none(), "{name} got a held hostPort: {}", call.stdout);
        ensure!(call.error_code() == Some(105), "{name}: {}", call.stdout);
        let message = call.json()?;
        ensure!(
            message["details"]
                .as_str()
                .is_some_and(|d| d.contains(":54321/")),
            "{name}: {message}"
        );
        ensure!(lab.entries()? == entries, "{name} changed HOST_PORTS");
        ensure!(lab.node.leftovers()? == leftovers, "{name} left something");
    }
    for pod in [&p1, &p2, &p3] {
        lab.node.del_pod(pod)?;
    }
    ensure!(lab.entries()?.is_empty(), "{:?}", lab.entries()?);
    Ok(())
}

/// `HOST_PORTS` full: the ADD whose keys do not all fit fails with the spec's "try again
/// later" (11), having undone everything (its veth, its address, its endpoint and the keys
/// it did claim); once a key is free again the same ADD succeeds.
#[test]
fn a_full_host_ports_map_fails_the_add_with_try_again_later_and_leaves_nothing() -> Result<()> {
    mycni_tests::require_root!();
    let lab = HostPortNode::new("hpfull", "10.244.36.0/24")?;
    let mut table = HostPortTable::open(&lab.node.pin_root())?;
    let filler = |i: u32| {
        let [_, _, hi, lo] = i.to_be_bytes();
        let key = ServiceKey {
            address: [198, 18, hi, lo],
            port: 9,
            protocol: PROTO_TCP,
            scope: 0,
        };
        let entry = HostPortEntry {
            backend: Backend {
                address: [10, 244, 36, 250],
                port: 9,
                pad: 0,
            },
            attachment_hash: 1,
        };
        (key, entry)
    };
    // One key short of full: the pod's two wildcard hostPorts need two keys (one each), so
    // the ADD claims one before it finds no room and must give it back.
    for i in 0..MAX_HOST_PORTS - 1 {
        let (key, entry) = filler(i);
        table.claim(&key, &entry)?;
    }
    let entries = lab.entries()?;
    ensure!(entries.len() == MAX_HOST_PORTS as usize - 1);
    let leftovers = lab.node.leftovers()?;
    let mappings = [mapping(30080, "tcp", ""), mapping(30081, "tcp", "")];
    let (call, pod) = lab.try_add("late", &mappings)?;
    ensure!(
        pod.is_none(),
        "ADD succeeded on a full map: {}",
        call.stdout
    );
    ensure!(call.error_code() == Some(11), "{}", call.stdout);
    let message = call.json()?;
    ensure!(
        message["msg"]
            .as_str()
            .is_some_and(|m| m.contains("hostPort"))
            && message["details"]
                .as_str()
                .is_some_and(|d| d.contains("full")),
        "{message}"
    );
    ensure!(lab.entries()? == entries, "the failed ADD left keys behind");
    ensure!(
        lab.node.leftovers()? == leftovers,
        "the failed ADD left something"
    );
    // A key freed: the runtime's retry gets both.
    table.remove(&filler(0).0)?;
    let (pod, _server) = lab.add("late", &mappings)?;
    ensure!(lab.entries_of(&pod)?.len() == 2);
    lab.node.del_pod(&pod)?;
    Ok(())
}

#[test]
fn del_removes_exactly_the_pods_host_ports_even_after_its_netns_is_gone() -> Result<()> {
    mycni_tests::require_root!();
    let lab = HostPortNode::new("hpdel", "10.244.33.0/24")?;
    let (kept, _kept_server) = lab.add("kept", &[mapping(30081, "tcp", "")])?;
    let (gone, gone_server) = lab.add("gone", &[mapping(30080, "tcp", "")])?;
    let gone_conf = lab.conf(&[mapping(30080, "tcp", "")]);
    let kept_entries = lab.entries_of(&kept)?;
    ensure!(kept_entries.len() == 1, "{kept_entries:?}");

    // The runtime removed the sandbox before DEL: the plugin finds the entries by tag.
    drop(gone_server);
    let Pod {
        netns,
        container_id,
        ..
    } = gone;
    let path = netns.path().display().to_string();
    drop(netns);
    for round in ["first", "second"] {
        let call = lab.node.cni(
            &Node::cni_env("DEL", &container_id, &path),
            &gone_conf.to_string(),
        )?;
        ensure!(call.exit_ok, "{round} DEL: {} {}", call.stdout, call.stderr);
        ensure!(lab.entries()? == kept_entries, "after the {round} DEL");
    }
    let freed = SocketAddr::from((Ipv4Addr::LOCALHOST, 30080));
    let seen = lab.probe_from_node("tcp", freed, 1)?;
    ensure!(seen == [Seen::Errno(ECONNREFUSED)], "{freed}: {seen:?}");
    let still = SocketAddr::from((Ipv4Addr::LOCALHOST, 30081));
    let seen = servers_behind(still, &lab.probe_from_node("tcp", still, 1)?)?;
    ensure!(seen == names(&["kept"]), "{still}: {seen:?}");
    lab.node.del_pod(&kept)?;
    ensure!(lab.entries()?.is_empty(), "{:?}", lab.entries()?);
    Ok(())
}

#[test]
fn check_verifies_the_pods_host_ports() -> Result<()> {
    mycni_tests::require_root!();
    let lab = HostPortNode::new("hpcheck", "10.244.34.0/24")?;
    let mappings = [
        mapping(30080, "tcp", ""),
        mapping(30080, "tcp", &NODE_IP.to_string()),
    ];
    let (pod, _server) = lab.add("p", &mappings)?;
    let mut conf = lab.conf(&mappings);
    conf["prevResult"] = pod.result.clone();
    let check = lab.call("CHECK", &pod.netns, &conf)?;
    ensure!(check.exit_ok, "CHECK: {} {}", check.stdout, check.stderr);

    // Take one entry away behind the plugin's back.
    let mut table = HostPortTable::open(&lab.node.pin_root())?;
    let key = *table
        .entries()?
        .keys()
        .find(|key| key.address == NODE_IP.octets() && key.protocol == PROTO_TCP)
        .context("the node IP's entry")?;
    table.remove(&key)?;
    let check = lab.call("CHECK", &pod.netns, &conf)?;
    ensure!(check.error_code() == Some(104), "{}", check.stdout);
    ensure!(
        check.stdout.contains("192.168.50.1:30080/tcp"),
        "{}",
        check.stdout
    );
    lab.node.del_pod(&pod)?;
    Ok(())
}

/// A pod whose DEL never came and whose address record was lost (a crash): the agent's
/// garbage collection removes its endpoint, then its hostPorts, and keeps the others'.
#[test]
fn garbage_collection_removes_the_host_ports_of_a_pod_without_endpoint() -> Result<()> {
    mycni_tests::require_root!();
    let mut lab = HostPortNode::new("hpgc", "10.244.35.0/24")?;
    // Again, with garbage collection of the node's address store.
    let data_dir = lab.node.data_dir.display().to_string();
    let cgroup = lab.cgroup.arg();
    lab.node.stop_agent();
    lab.node.start_agent(&[
        "--service-mode",
        "ebpf",
        "--cgroup-path",
        &cgroup,
        "--data-dir",
        &data_dir,
        "--network-name",
        "mycni-test",
        "--gc-interval",
        "1",
    ])?;
    let log = AgentLog::follow(&mut lab.node)?;
    let (kept, _kept_server) = lab.add("kept", &[mapping(30081, "tcp", "")])?;
    let (lost, _lost_server) = lab.add("lost", &[mapping(30080, "tcp", "")])?;
    let kept_entries = lab.entries_of(&kept)?;
    ensure!(lab.entries()?.len() == 2, "{:?}", lab.entries()?);

    let store = mycni::ipam::store::IpStore::open(&lab.node.data_dir, "mycni-test")?;
    let owner = mycni::ipam::store::Owner {
        container_id: lost.container_id.clone(),
        ifname: "eth0".into(),
    };
    store.lock()?.release(&owner)?;
    let veth = mycni::plugin::host_veth_name(&lost.container_id, "eth0");
    lab.node.netns.exec(&["ip", "link", "del", &veth])?;
    mycni_tests::cluster::wait_for(Duration::from_secs(20), || {
        Ok(lab.entries()? == kept_entries)
    })
    .with_context(|| {
        format!(
            "HOST_PORTS kept {:?}; agent:\n{}",
            lab.entries(),
            log.text()
        )
    })?;
    lab.node.del_pod(&kept)?;
    Ok(())
}

/// portmap's `0.0.0.0` rule answers on any address the node has, whenever it got it: a
/// hostPort without hostIP reaches the pod on an address added after the pod's ADD, and
/// stops when the address goes; a pod asking for that port on the new address later is
/// refused.
#[test]
fn a_wildcard_host_port_answers_on_an_address_added_after_the_add() -> Result<()> {
    mycni_tests::require_root!();
    let lab = HostPortNode::new("hpaddr", "10.244.36.0/24")?;
    let (pod, _server) = lab.add("web", &[mapping(30080, "tcp", "")])?;
    let added = Ipv4Addr::new(10, 77, 0, 1);
    let added_cidr = format!("{added}/32");
    lab.node
        .netns
        .exec(&["ip", "addr", "add", &added_cidr, "dev", "lo"])?;
    lab.wait_for_node_address(added, true)?;
    let target = SocketAddr::from((added, 30080));
    let seen = servers_behind(target, &lab.probe_from_node("tcp", target, 2)?)?;
    ensure!(seen == names(&["web"]), "tcp to {target}: {seen:?}");
    // The same port on that address is the wildcard's: another pod cannot have it.
    let (call, other) = lab.try_add("other", &[mapping(30080, "tcp", &added.to_string())])?;
    ensure!(
        other.is_none(),
        "a held hostPort was given: {}",
        call.stdout
    );
    ensure!(call.error_code() == Some(105), "{}", call.stdout);
    lab.node
        .netns
        .exec(&["ip", "addr", "del", &added_cidr, "dev", "lo"])?;
    lab.wait_for_node_address(added, false)?;
    let seen = lab.probe_from_node("tcp", target, 1)?;
    ensure!(
        matches!(seen[..], [Seen::Errno(_)]),
        "a removed address still reaches the hostPort: {seen:?}"
    );
    lab.node.del_pod(&pod)?;
    Ok(())
}
