//! How long NetworkPolicy takes to be enforced in the Kubernetes lab (issue 14): from
//! `kubectl apply` of a policy, and from `kubectl label` of a pod, until every node's
//! datapath enforces the change; 20 trials of each (and of the reverse: the policy deleted,
//! the label taken back), p50/p99 printed and written to `target/bench/policy-latency.json`.
//! Timings are reported, not asserted (a wait is bounded at 30 s).
//!
//! Probed through each node's maps as its agent writes them (read from the test through the
//! node's mount namespace every 2 ms, decided by [`mycni_tests::policy_decision`]): the
//! programs look these maps up on every packet and the agent bumps the revision, which
//! makes tracked connections re-check, as its last write, so the first poll that sees
//! the new decision and the new revision is when packets start meeting it. A probe by
//! packets would go through `kubectl exec` (hundreds of milliseconds each, and a refused
//! one waits for a timeout), coarser than what is measured. Real packets confirm the
//! first trial of each kind. Run alone with the lab's lock held.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mycni::policy_maps::{PolicyDesired, PolicyTables};
use mycni_common::policy::POLICY_INGRESS;
use mycni_tests::bench::latency_summary;
use mycni_tests::kubelab::{image_archive, KubeLab};
use mycni_tests::policy_decision::allows;
use mycni_tests::prefix;
use serde_json::{json, Value};

const TRIALS: usize = 20;
const PORT: u16 = 8080;
const TCP: u8 = 6;
/// Where the agent pins its maps inside a lab node (deploy/mycni.yaml's `--bpffs-root`).
const PIN_ROOT: &str = "/sys/fs/bpf/mycni";

fn pod_manifest(name: &str, node: &str, labels: &str) -> String {
    mycni_tests::kubelab::httpd_pod_manifest(name, node, labels, "")
}

/// Ingress to every `app=server` pod (one per node) only from `role=client` pods, on 8080.
const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: default}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: 8080, protocol: TCP}]
"#;

/// The pods: a server on each node, a client that is always admitted, one never admitted
/// (on the other node from it), and one whose label the trials change.
const PODS: [(&str, &str, &str); 5] = [
    ("server-1", "node-1", "app: server"),
    ("server-2", "node-2", "app: server"),
    ("client", "node-2", "role: client"),
    ("outsider", "node-1", "role: other"),
    ("relabelled", "node-2", "role: other"),
];

struct Ips {
    servers: Vec<Ipv4Addr>,
    client: Ipv4Addr,
    outsider: Ipv4Addr,
    relabelled: Ipv4Addr,
}

fn pod_ip(lab: &KubeLab, name: &str) -> Result<Option<Ipv4Addr>> {
    let pod = lab.get_json(&["get", "pod", name])?;
    let running = pod["status"]["phase"] == "Running";
    Ok(pod["status"]["podIP"]
        .as_str()
        .filter(|_| running)
        .and_then(|ip| ip.parse().ok()))
}

/// One node's maps, as the test sees them.
struct NodeMaps {
    name: &'static str,
    root: PathBuf,
    /// The server pod on this node: a node's maps hold the decisions of its own pods only.
    server: Ipv4Addr,
}

/// What a node's maps should decide for its own server pod.
type Expectation = dyn Fn(&PolicyDesired, Ipv4Addr) -> bool;

impl NodeMaps {
    /// The maps' revision, and whether `expect` holds of their contents.
    fn read(&self, expect: &Expectation) -> Result<(u32, bool)> {
        let tables = PolicyTables::open(&self.root)
            .with_context(|| format!("{}'s policy maps", self.name))?;
        Ok((
            tables.state()?.revision,
            expect(tables.current(), self.server),
        ))
    }
}

/// Runs `change` and polls every node's maps until each holds a new revision for which
/// `expect` holds; returns the time from before `change` on every node, and from `change`'s
/// return.
fn time_until_enforced(
    nodes: &[NodeMaps],
    change: impl FnOnce() -> Result<()>,
    expect: &Expectation,
) -> Result<(Duration, Duration)> {
    let before: Vec<u32> = nodes
        .iter()
        .map(|n| n.read(expect).map(|(revision, _)| revision))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    change()?;
    let returned = start.elapsed();
    let mut done: Vec<Option<Duration>> = vec![None; nodes.len()];
    while done.iter().any(Option::is_none) {
        for (index, node) in nodes.iter().enumerate() {
            if done[index].is_some() {
                continue;
            }
            let (revision, holds) = node.read(expect)?;
            if revision != before[index] && holds {
                done[index] = Some(start.elapsed());
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            let maps: Vec<String> = nodes
                .iter()
                .map(|n| match PolicyTables::open(&n.root) {
                    Ok(t) => format!("{}: {:?} {:?}", n.name, t.state().ok(), t.current()),
                    Err(e) => format!("{}: {e}", n.name),
                })
                .collect();
            bail!(
                "not every node enforced the change within 30 s: {done:?}; maps: {}",
                maps.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let every = done.into_iter().flatten().max().unwrap_or_default();
    Ok((every, every.saturating_sub(returned)))
}

/// What a client gets from `server_ip`: its body, or `None` when nothing answered in 3 s.
fn fetch(lab: &KubeLab, client: &str, server_ip: Ipv4Addr) -> Option<String> {
    let request = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox timeout 5 /bin/busybox nc -w 3 {server_ip} 8080"
    );
    lab.kubectl(&["exec", client, "--", "/bin/busybox", "sh", "-c", &request])
        .ok()
        .filter(|body| body.contains("server"))
}

/// Real packets agree with the maps: `admitted` reach every server, `refused` reach none.
fn confirm_by_packets(lab: &KubeLab, ips: &Ips, admitted: &[&str], refused: &[&str]) -> Result<()> {
    for &server in &ips.servers {
        for client in admitted {
            if fetch(lab, client, server).is_none() {
                bail!("{client} does not reach {server} though the maps admit it");
            }
        }
        for client in refused {
            if fetch(lab, client, server).is_some() {
                bail!("{client} reaches {server} though the maps refuse it");
            }
        }
    }
    Ok(())
}

#[test]
fn policy_and_label_changes_reach_every_node_and_the_latency_is_reported() -> Result<()> {
    mycni_tests::require_root!();
    let image = image_archive("MYCNI_TEST_IMAGE", "mycni-test.oci.tar")?;
    let mut lab = KubeLab::new(&prefix("netpol-lat"), &[image])?;
    lab.install_mycni()?;
    lab.wait(
        "the default service account",
        Duration::from_secs(60),
        |lab| Ok(lab.kubectl(&["get", "serviceaccount", "default"]).is_ok()),
    )?;
    let manifests: Vec<String> = PODS
        .iter()
        .map(|(name, node, labels)| pod_manifest(name, node, labels))
        .collect();
    lab.apply(&manifests.join("---\n"))?;
    let mut found = Vec::new();
    lab.wait("the pods running", Duration::from_secs(120), |lab| {
        found = PODS
            .iter()
            .map(|(name, _, _)| pod_ip(lab, name))
            .collect::<Result<Vec<_>>>()?;
        Ok(found.iter().all(Option::is_some))
    })?;
    let found: Vec<Ipv4Addr> = found.into_iter().flatten().collect();
    let ips = Ips {
        servers: found[0..2].to_vec(),
        client: found[2],
        outsider: found[3],
        relabelled: found[4],
    };
    let nodes = ["node-1", "node-2"]
        .into_iter()
        .zip(ips.servers.iter().copied())
        .map(|(name, server)| {
            Ok(NodeMaps {
                name,
                root: lab.node(name).path_inside(PIN_ROOT)?,
                server,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Both nodes' agents have opened their maps (the policy watches are up once a pod of
    // theirs has been seen: wait for the same decision the trials look for).
    lab.wait("both nodes' policy maps", Duration::from_secs(60), |_| {
        Ok(nodes.iter().all(|n| n.read(&|_, _| true).is_ok()))
    })?;

    let admits = |who: Ipv4Addr| {
        move |maps: &PolicyDesired, server: Ipv4Addr| {
            allows(maps, server, who, PORT, TCP, POLICY_INGRESS)
        }
    };
    let refuses = |who: Ipv4Addr| {
        move |maps: &PolicyDesired, server: Ipv4Addr| {
            !allows(maps, server, who, PORT, TCP, POLICY_INGRESS)
        }
    };
    let enforced = {
        let (client, outsider) = (admits(ips.client), refuses(ips.outsider));
        move |maps: &PolicyDesired, server: Ipv4Addr| client(maps, server) && outsider(maps, server)
    };

    let mut results: Vec<(&str, Vec<Duration>, Vec<Duration>)> = Vec::new();
    let mut record = |what: &'static str, (every, after_return): (Duration, Duration)| match results
        .iter_mut()
        .find(|(w, _, _)| *w == what)
    {
        Some((_, a, b)) => {
            a.push(every);
            b.push(after_return);
        }
        None => results.push((what, vec![every], vec![after_return])),
    };
    for trial in 0..TRIALS {
        eprintln!("trial {}/{TRIALS}", trial + 1);
        // A policy applied: the client admitted, the outsider refused on both nodes.
        let timing = time_until_enforced(&nodes, || lab.apply(POLICY).map(drop), &enforced)
            .context("applying the policy")?;
        record("kubectl apply of a policy", timing);
        if trial == 0 {
            confirm_by_packets(&lab, &ips, &["client"], &["outsider", "relabelled"])?;
        }
        // A label change admits a pod, and its reversal refuses it again.
        let timing = time_until_enforced(
            &nodes,
            || {
                lab.kubectl(&["label", "pod", "relabelled", "role=client", "--overwrite"])
                    .map(drop)
            },
            &admits(ips.relabelled),
        )
        .context("relabelling to admit")?;
        record("kubectl label: a pod admitted", timing);
        if trial == 0 {
            confirm_by_packets(&lab, &ips, &["client", "relabelled"], &["outsider"])?;
        }
        let timing = time_until_enforced(
            &nodes,
            || {
                lab.kubectl(&["label", "pod", "relabelled", "role=other", "--overwrite"])
                    .map(drop)
            },
            &refuses(ips.relabelled),
        )
        .context("relabelling to refuse")?;
        record("kubectl label: a pod refused", timing);
        // The policy deleted: the outsider admitted again.
        let timing = time_until_enforced(
            &nodes,
            || {
                lab.kubectl(&["delete", "networkpolicy", "server-ingress"])
                    .map(drop)
            },
            &admits(ips.outsider),
        )
        .context("deleting the policy")?;
        record("kubectl delete of the policy", timing);
    }

    let mut report = serde_json::Map::new();
    println!(
        "\nNetworkPolicy enforcement latency, {TRIALS} trials, until every node's maps hold it (ms):"
    );
    println!(
        "| change | from the command's start: p50 / p99 / max | from its return: p50 / p99 / max |"
    );
    println!("|---|---|---|");
    for (what, every, after_return) in &results {
        let (a, b) = (latency_summary(every), latency_summary(after_return));
        println!(
            "| {what} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} |",
            a["p50_ms"].as_f64().unwrap_or(f64::NAN),
            a["p99_ms"].as_f64().unwrap_or(f64::NAN),
            a["max_ms"].as_f64().unwrap_or(f64::NAN),
            b["p50_ms"].as_f64().unwrap_or(f64::NAN),
            b["p99_ms"].as_f64().unwrap_or(f64::NAN),
            b["max_ms"].as_f64().unwrap_or(f64::NAN),
        );
        report.insert(
            what.to_string(),
            json!({"from_command_start": a, "from_command_return": b}),
        );
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("policy-latency.json"),
        serde_json::to_string_pretty(&Value::Object(report))?,
    )?;
    Ok(())
}
