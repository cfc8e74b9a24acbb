//! kube-proxy's iptables mode (the shape Kubernetes 1.20 writes) inside a node namespace:
//! the filter table's `KUBE-FORWARD` with its `ctstate INVALID` drop, the nat table's
//! `KUBE-SERVICES` -> `KUBE-SVC-*` -> `KUBE-SEP-*` DNAT chains, and `KUBE-POSTROUTING`
//! masquerading what `KUBE-MARK-MASQ` marked. Written as kube-proxy writes them: the
//! chains with one `iptables-restore --noflush`, the jumps from the built-in chains
//! inserted first in them. Only ever into namespaces a test made.
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::Netns;

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
pub const MASQ_MARK: &str = "0x4000/0x4000";

/// A TCP ClusterIP service and its endpoints.
pub struct Service {
    /// `namespace/name:port`, as kube-proxy names a service port in its comments.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
}

/// The jumps kube-proxy inserts at the top of the built-in chains: (table, chain, match).
const JUMPS: [(&str, &str, &[&str]); 8] = [
    (
        "filter",
        "INPUT",
        &[
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "comment",
            "--comment",
            "kubernetes externally-visible service portals",
            "-j",
            "KUBE-EXTERNAL-SERVICES",
        ],
    ),
    (
        "filter",
        "FORWARD",
        &[
            "-m",
            "comment",
            "--comment",
            "kubernetes forwarding rules",
            "-j",
            "KUBE-FORWARD",
        ],
    ),
    (
        "filter",
        "FORWARD",
        &[
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
    ),
    (
        "filter",
        "FORWARD",
        &[
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "comment",
            "--comment",
            "kubernetes externally-visible service portals",
            "-j",
            "KUBE-EXTERNAL-SERVICES",
        ],
    ),
    (
        "filter",
        "OUTPUT",
        &[
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
    ),
    (
        "nat",
        "OUTPUT",
        &[
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
    ),
    (
        "nat",
        "PREROUTING",
        &[
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
    ),
    (
        "nat",
        "POSTROUTING",
        &[
            "-m",
            "comment",
            "--comment",
            "kubernetes postrouting rules",
            "-j",
            "KUBE-POSTROUTING",
        ],
    ),
];

/// A chain name suffix like kube-proxy's (16 characters from a hash of what it names).
fn chain_suffix(what: &str) -> String {
    format!("{:016X}", mycni_common::fnv1a64(what.as_bytes()))
}

/// The `iptables-restore` input kube-proxy would write for `services`.
pub fn restore_input(cluster_cidr: &str, services: &[Service]) -> String {
    let mut filter = vec![
        "*filter".to_string(),
        ":KUBE-EXTERNAL-SERVICES - [0:0]".into(),
        ":KUBE-FORWARD - [0:0]".into(),
        ":KUBE-SERVICES - [0:0]".into(),
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".into(),
        format!(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK} -j ACCEPT"
        ),
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack pod source rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack pod destination rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
        "COMMIT".into(),
    ];
    let mut chains = vec![
        "*nat".to_string(),
        ":KUBE-MARK-DROP - [0:0]".into(),
        ":KUBE-MARK-MASQ - [0:0]".into(),
        ":KUBE-NODEPORTS - [0:0]".into(),
        ":KUBE-POSTROUTING - [0:0]".into(),
        ":KUBE-SERVICES - [0:0]".into(),
    ];
    let mut rules = vec![
        "-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000".to_string(),
        format!("-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}"),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into(),
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0".into(),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
    ];
    for service in services {
        let svc = format!(
            "KUBE-SVC-{}",
            chain_suffix(&format!("{}/tcp", service.name))
        );
        let comment = format!("\"{} cluster IP\"", service.name);
        let vip = format!("{}/32", service.cluster_ip);
        chains.push(format!(":{svc} - [0:0]"));
        // Traffic from outside the cluster CIDR (the node itself) is masqueraded.
        rules.push(format!(
            "-A KUBE-SERVICES ! -s {cluster_cidr} -d {vip} -p tcp -m comment --comment {comment} -m tcp --dport {} -j KUBE-MARK-MASQ",
            service.port
        ));
        rules.push(format!(
            "-A KUBE-SERVICES -d {vip} -p tcp -m comment --comment {comment} -m tcp --dport {} -j {svc}",
            service.port
        ));
        let count = service.endpoints.len();
        for (index, endpoint) in service.endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                chain_suffix(&format!("{}/tcp/{endpoint}", service.name))
            );
            chains.push(format!(":{sep} - [0:0]"));
            let left = count - index;
            if left > 1 {
                rules.push(format!(
                    "-A {svc} -m comment --comment \"{}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    service.name,
                    1.0 / left as f64
                ));
            } else {
                rules.push(format!(
                    "-A {svc} -m comment --comment \"{}\" -j {sep}",
                    service.name
                ));
            }
            // Hairpin: an endpoint reaching itself through the service is masqueraded.
            rules.push(format!(
                "-A {sep} -s {}/32 -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                endpoint.ip(),
                service.name
            ));
            rules.push(format!(
                "-A {sep} -p tcp -m comment --comment \"{}\" -m tcp -j DNAT --to-destination {endpoint}",
                service.name
            ));
        }
    }
    rules.push("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into());
    filter.extend(chains);
    filter.extend(rules);
    filter.push("COMMIT".into());
    filter.join("\n") + "\n"
}

/// Writes kube-proxy's rules for `services` into `netns` (replacing its chains, as a
/// kube-proxy sync does) and makes sure the built-in chains jump to them.
pub fn install(netns: &Netns, cluster_cidr: &str, services: &[Service]) -> Result<()> {
    let input = restore_input(cluster_cidr, services);
    let mut child = netns
        .command("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn iptables-restore")?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("iptables-restore stdin")?,
        input.as_bytes(),
    )?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore in {}: {}\n{input}",
            netns.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (table, chain, rule) in JUMPS {
        let mut check = vec!["iptables", "-w", "-t", table, "-C", chain];
        check.extend_from_slice(rule);
        if netns.exec(&check).is_err() {
            let mut insert = vec!["iptables", "-w", "-t", table, "-I", chain];
            insert.extend_from_slice(rule);
            netns.exec(&insert)?;
        }
    }
    Ok(())
}

/// Packets `KUBE-FORWARD`'s `ctstate INVALID` rule dropped in `netns`: half-seen flows.
pub fn invalid_drops(netns: &Netns) -> Result<u64> {
    let listing = netns.exec(&[
        "iptables",
        "-w",
        "-t",
        "filter",
        "-L",
        "KUBE-FORWARD",
        "-v",
        "-x",
        "-n",
    ])?;
    let line = listing
        .lines()
        .find(|line| line.contains("ctstate INVALID") && line.contains("DROP"))
        .with_context(|| format!("no INVALID drop rule in {}:\n{listing}", netns.name))?;
    let packets = line
        .split_whitespace()
        .next()
        .context("empty counter line")?;
    packets
        .parse()
        .with_context(|| format!("counter {packets:?} in {line:?}"))
}
