//! Services without kube-proxy: the lab (tests/src/kubelab.rs) runs no kube-proxy, and
//! mycni, installed from deploy/mycni.yaml with `service-mode: "ebpf"`, balances every
//! Service itself at the pods' sockets. agnhost's netexec serves HTTP and UDP (its pod name
//! as the answer) and, on the client pods, dials a Service many times (`/dial`), so each
//! check is a connection from a pod's socket, as an application makes it. Pods also
//! resolve Services by name through the cluster DNS's ClusterIP (the lab's DNS server, only
//! reachable through mycni's balancing here), over UDP and TCP.
//!
//! Holds the lab lock: `flock /tmp/mycni-lab.lock cargo test ... --test kubernetes_services`.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mycni_tests::kubelab::{
    cache_dir, image_archive, lab_manifest_ebpf_services, KubeLab, LabNode, LabOptions,
    CLUSTER_DNS_IP, CLUSTER_DOMAIN, CONTROL_IP,
};
use mycni_tests::{agent_bin, http_get, metric, prefix};
use serde_json::Value;

const AGNHOST: &str = "k8s.gcr.io/e2e-test-images/agnhost:2.21";
const NODE_PORT: u16 = 30080;
/// The echo Service's externalIP: no host holds it; only the pods' sockets are translated.
const EXTERNAL_IP: &str = "203.0.113.50";
/// Dials per check: with four equally likely backends, one is missed in 40 tries with
/// probability 4 × (3/4)^40, about 4 in 100,000.
const TRIES: u32 = 40;

fn servers_manifest(replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      terminationGracePeriodSeconds: 1
      automountServiceAccountToken: false
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: echo}}}}}}
      containers:
      - name: netexec
        image: {AGNHOST}
        imagePullPolicy: Never
        args: ["netexec", "--http-port=8080", "--udp-port=8081"]
        ports:
        - {{name: http, containerPort: 8080}}
        - {{name: udp, containerPort: 8081, protocol: UDP}}
        readinessProbe: {{httpGet: {{path: /hostname, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  externalIPs: ["{EXTERNAL_IP}"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http}}
  - {{name: udp, protocol: UDP, port: 90, targetPort: udp}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-sticky, namespace: default}}
spec:
  selector: {{app: echo}}
  sessionAffinity: ClientIP
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-nodeport, namespace: default}}
spec:
  type: NodePort
  selector: {{app: echo}}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: {NODE_PORT}}}
"#
    )
}

/// A netexec pod on `node` that the test asks to dial.
fn client_manifest(node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: client-{node}, namespace: default}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  automountServiceAccountToken: false
  containers:
  - name: netexec
    image: {AGNHOST}
    imagePullPolicy: Never
    args: ["netexec", "--http-port=8080", "--udp-port=8081"]
"#
    )
}

/// What one `/dial` asked of a client pod came back with.
#[derive(Debug, Default)]
struct Dialed {
    /// The pod names that answered, one per successful try.
    responses: Vec<String>,
    errors: Vec<String>,
}

/// Asks the client pod at `client_ip` (from its node, which reaches it directly) to dial
/// `host:port` over `protocol` (`http` or `udp`) `tries` times and say who answered.
fn dial(node: &LabNode, client_ip: &str, protocol: &str, host: &str, port: u16) -> Result<Dialed> {
    let url = format!(
        "http://{client_ip}:8080/dial?request=hostname&protocol={protocol}&host={host}&port={port}&tries={TRIES}"
    );
    let body = node.exec(&["curl", "-sS", "-m", "300", &url])?;
    let answer: Value =
        serde_json::from_str(&body).with_context(|| format!("/dial answered {body:?}"))?;
    let strings = |field: &str| -> Vec<String> {
        answer[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    Ok(Dialed {
        responses: strings("responses"),
        errors: strings("errors"),
    })
}

/// The echo pods that are Ready, by name.
fn ready_servers(lab: &KubeLab) -> Result<BTreeSet<String>> {
    let pods = lab.get_json(&["get", "pods", "-l", "app=echo"])?;
    Ok(pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .collect())
}

/// Frontend (`address:port/protocol`) → sorted backends (`address:port`).
type FrontendTable = BTreeMap<String, Vec<String>>;

/// What `mycni-agent services --json` prints on `node`.
fn agent_frontends(node: &LabNode) -> Result<FrontendTable> {
    let agent = agent_bin().display().to_string();
    let text = node.exec(&[
        &agent,
        "--bpffs-root=/sys/fs/bpf/mycni",
        "services",
        "--json",
    ])?;
    let rows: Value = serde_json::from_str(&text).context("services --json")?;
    let mut table = FrontendTable::new();
    for row in rows.as_array().into_iter().flatten() {
        let frontend = format!(
            "{}:{}/{}",
            row["address"].as_str().unwrap_or(""),
            row["port"],
            row["protocol"].as_str().unwrap_or("")
        );
        let mut backends: Vec<String> = row["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str().map(str::to_string))
            .collect();
        backends.sort();
        table.insert(frontend, backends);
    }
    Ok(table)
}

/// The frontends `node` should have, worked out from the API's Services and Endpoints
/// independently of the agent: every IPv4 ClusterIP and externalIP per port, and one
/// wildcard frontend (0.0.0.0, every node address) per nodePort, with the ready addresses of the Endpoints port of the same
/// name (of `node`'s pods only for a NodePort with `externalTrafficPolicy: Local`).
fn api_frontends(lab: &KubeLab, node: &LabNode) -> Result<FrontendTable> {
    let services = lab.get_json(&["get", "services", "--all-namespaces"])?;
    let endpoints = lab.get_json(&["get", "endpoints", "--all-namespaces"])?;
    let id = |o: &Value| {
        (
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            o["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    };
    let endpoints: BTreeMap<_, &Value> = endpoints["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (id(e), e))
        .collect();
    let mut table = FrontendTable::new();
    for service in services["items"].as_array().into_iter().flatten() {
        let spec = &service["spec"];
        let Some(cluster_ip) = spec["clusterIP"]
            .as_str()
            .filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
        else {
            continue;
        };
        if spec["type"] == "ExternalName" {
            continue;
        }
        let local = spec["externalTrafficPolicy"] == "Local";
        for port in spec["ports"].as_array().into_iter().flatten() {
            let name = port["name"].as_str().unwrap_or("");
            let protocol = port["protocol"].as_str().unwrap_or("TCP");
            let mut all = Vec::new();
            let mut on_node = Vec::new();
            if let Some(e) = endpoints.get(&id(service)) {
                for subset in e["subsets"].as_array().into_iter().flatten() {
                    let Some(target) = subset["ports"].as_array().into_iter().flatten().find(|p| {
                        p["name"].as_str().unwrap_or("") == name
                            && p["protocol"].as_str().unwrap_or("TCP") == protocol
                    }) else {
                        continue;
                    };
                    for address in subset["addresses"].as_array().into_iter().flatten() {
                        let backend = format!(
                            "{}:{}",
                            address["ip"].as_str().unwrap_or(""),
                            target["port"]
                        );
                        if address["nodeName"].as_str() == Some(node.name.as_str()) {
                            on_node.push(backend.clone());
                        }
                        all.push(backend);
                    }
                }
            }
            all.sort();
            on_node.sort();
            let protocol = protocol.to_lowercase();
            let mut addresses = vec![cluster_ip.to_string()];
            addresses.extend(
                spec["externalIPs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|ip| ip.as_str().map(str::to_string)),
            );
            for address in addresses {
                table.insert(
                    format!("{address}:{}/{protocol}", port["port"]),
                    all.clone(),
                );
            }
            if let Some(node_port) = port["nodePort"].as_u64() {
                let backends = if local { &on_node } else { &all };
                // One frontend for every node address (`*:port` in the table, 0.0.0.0 in JSON).
                table.insert(format!("0.0.0.0:{node_port}/{protocol}"), backends.clone());
            }
        }
    }
    Ok(table)
}

/// How many ready addresses echo's Endpoints list.
fn endpoints_ready(lab: &KubeLab) -> Result<usize> {
    let endpoints = lab.get_json(&["get", "endpoints", "echo"])?;
    Ok(endpoints["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["addresses"].as_array().map_or(0, Vec::len))
        .sum())
}

/// Polls every node's maps (round robin, no pause: one `mycni-agent services` takes tens
/// of milliseconds) until each lists `wanted` backends for the echo ClusterIP's HTTP port;
/// returns when each node was first seen so, by node name.
fn wait_backends_on_every_node(
    lab: &mut KubeLab,
    cluster_ip: &str,
    wanted: usize,
) -> Result<Vec<(String, Instant)>> {
    let frontend = format!("{cluster_ip}:80/tcp");
    let start = Instant::now();
    let mut seen: Vec<Option<Instant>> = vec![None; lab.nodes.len()];
    while seen.iter().any(Option::is_none) {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the maps of some node never listed {wanted} backends for {frontend}: {seen:?}");
        }
        lab.check_alive()?;
        for (index, node) in lab.nodes.iter().enumerate() {
            if seen[index].is_none()
                && agent_frontends(node)?.get(&frontend).map(Vec::len) == Some(wanted)
            {
                seen[index] = Some(Instant::now());
            }
        }
    }
    Ok(lab
        .nodes
        .iter()
        .zip(seen)
        .filter_map(|(node, at)| Some((node.name.clone(), at?)))
        .collect())
}

/// Prints when each node's maps followed, after each of `since`'s moments.
fn print_times(what: &str, times: &[(String, Instant)], since: &[(&str, Instant)]) {
    for (label, from) in since {
        let per_node: Vec<String> = times
            .iter()
            .map(|(node, at)| format!("{node} {:?}", at.saturating_duration_since(*from)))
            .collect();
        println!("{what}: maps updated {label}: {}", per_node.join(", "));
    }
}

/// Every node's `mycni-agent services --json` equals what the API says.
fn check_agents_list_the_api(lab: &mut KubeLab) -> Result<()> {
    for index in 0..lab.nodes.len() {
        let name = lab.nodes[index].name.clone();
        // The endpoints controller and the agents settle after a change; converge, then
        // compare once more for the message.
        let settled = lab.wait(
            &format!("{name}'s services to match the API"),
            Duration::from_secs(60),
            |lab| {
                let node = &lab.nodes[index];
                Ok(agent_frontends(node)? == api_frontends(lab, node)?)
            },
        );
        if let Err(e) = settled {
            let node = &lab.nodes[index];
            bail!(
                "{e:#}\nagent on {name}: {:#?}\nAPI: {:#?}",
                agent_frontends(node)?,
                api_frontends(lab, node)?
            );
        }
    }
    Ok(())
}

/// Each client pod reaches exactly `servers` through `host:port` over `protocol`.
fn check_reaches_all(
    lab: &KubeLab,
    clients: &[(String, String)],
    protocol: &str,
    host_of: impl Fn(&LabNode) -> String,
    port: u16,
    servers: &BTreeSet<String>,
) -> Result<()> {
    for (node_name, client_ip) in clients {
        let node = lab.node(node_name);
        let host = host_of(node);
        let dialed = dial(node, client_ip, protocol, &host, port)?;
        let seen: BTreeSet<String> = dialed.responses.iter().cloned().collect();
        if !dialed.errors.is_empty() || &seen != servers {
            bail!(
                "from {node_name}'s client, {protocol} to {host}:{port}: answered by {seen:?}, \
                 expected every one of {servers:?}; errors: {:?}",
                dialed.errors
            );
        }
        println!(
            "{node_name}: {protocol} {host}:{port} reached {} backends in {TRIES} tries",
            seen.len()
        );
    }
    Ok(())
}

/// The A records in `dig +noall +answer +stats` output, and its `;; SERVER:` line.
fn dig_answers(output: &str) -> (Vec<String>, String) {
    let answers = output
        .lines()
        .filter(|line| !line.starts_with(';') && !line.trim().is_empty())
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(3) == Some(&"A")).then(|| fields[4].to_string())
        })
        .collect();
    let server = output
        .lines()
        .find_map(|line| line.strip_prefix(";; SERVER: "))
        .unwrap_or("")
        .to_string();
    (answers, server)
}

/// A pod on each node resolves the echo Service by name through the cluster DNS's
/// ClusterIP (kubelet's --cluster-dns, which mycni's socket balancing alone takes to the
/// lab's DNS server): `dig` over UDP and over TCP, the search list of the pod's
/// resolv.conf, and agnhost's own resolver (Go's, UDP) dialing `echo` by name. Every node's
/// agent balances the DNS Service's two frontends to the server.
fn check_pods_resolve_services_by_name(
    lab: &KubeLab,
    clients: &[(String, String)],
    cluster_ip: &str,
    servers: &BTreeSet<String>,
) -> Result<()> {
    let dns = format!("{CLUSTER_DNS_IP}:53/");
    for node in &lab.nodes {
        let table = agent_frontends(node)?;
        let frontends: Vec<(&String, &Vec<String>)> =
            table.iter().filter(|(f, _)| f.starts_with(&dns)).collect();
        let backend = format!("{CONTROL_IP}:53");
        if frontends.len() != 2 || frontends.iter().any(|(_, b)| **b != [backend.clone()]) {
            bail!(
                "{}: the cluster DNS's frontends: {frontends:?}, expected UDP and TCP to {backend}",
                node.name
            );
        }
    }
    let fqdn = format!("echo.default.svc.{CLUSTER_DOMAIN}");
    for (node_name, _) in clients {
        let pod = format!("client-{node_name}");
        for transport in ["+notcp", "+tcp"] {
            let output = lab.kubectl(&[
                "exec", &pod, "--", "dig", transport, "+noall", "+answer", "+stats", &fqdn,
            ])?;
            let (answers, server) = dig_answers(&output);
            if answers != [cluster_ip] || !server.starts_with(&format!("{CLUSTER_DNS_IP}#53")) {
                bail!("{pod}: dig {transport} {fqdn}: {output}");
            }
            println!("{pod}: dig {transport} {fqdn} -> {answers:?} from {server}");
        }
        let short = lab.kubectl(&["exec", &pod, "--", "dig", "+short", "+search", "echo"])?;
        if short.trim() != cluster_ip {
            bail!("{pod}: dig +search echo answered {short:?}, expected {cluster_ip}");
        }
        // A name outside the cluster: the lab forwards nothing.
        let outside = lab.kubectl(&[
            "exec",
            &pod,
            "--",
            "dig",
            "+noall",
            "+comments",
            "example.com",
        ])?;
        if !outside.contains("status: REFUSED") {
            bail!("{pod}: dig example.com: {outside}");
        }
    }
    let by_name = |_: &LabNode| "echo".to_string();
    check_reaches_all(lab, clients, "http", by_name, 80, servers)?;
    check_reaches_all(lab, clients, "udp", by_name, 90, servers)?;
    Ok(())
}

#[test]
fn services_are_balanced_by_mycni_without_kube_proxy() -> Result<()> {
    mycni_tests::require_root!();
    let agnhost = cache_dir().join("images/agnhost.oci.tar");
    if !agnhost.is_file() {
        bail!("{} is missing: run `cargo xtask k8s`", agnhost.display());
    }
    let images = [
        image_archive("MYCNI_TEST_IMAGE", "mycni-test.oci.tar")?,
        agnhost,
    ];
    let prefix = prefix("ksvc");
    let mut lab = KubeLab::with_options(&prefix, &images, LabOptions { kube_proxy: false })?;
    lab.install_mycni_manifest(&lab_manifest_ebpf_services(&prefix)?)?;
    for node in &lab.nodes {
        assert!(
            !node.dir.join("kube-proxy.log").exists(),
            "{}: kube-proxy started",
            node.name
        );
    }
    lab.wait(
        "the default service account",
        Duration::from_secs(60),
        |lab| Ok(lab.kubectl(&["get", "serviceaccount", "default"]).is_ok()),
    )?;

    let node_names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    let mut manifests = vec![servers_manifest(4)];
    manifests.extend(node_names.iter().map(|n| client_manifest(n)));
    lab.apply(&manifests.join("---\n"))?;
    let mut clients: Vec<(String, String)> = Vec::new();
    lab.wait(
        "four echo pods Ready and a client on each node",
        Duration::from_secs(180),
        |lab| {
            let pods = lab.get_json(&["get", "pods"])?;
            clients = pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| {
                    p["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("client-"))
                })
                .filter(|p| p["status"]["phase"] == "Running")
                .filter_map(|p| {
                    Some((
                        p["spec"]["nodeName"].as_str()?.to_string(),
                        p["status"]["podIP"].as_str()?.to_string(),
                    ))
                })
                .collect();
            Ok(clients.len() == 2 && ready_servers(lab)?.len() == 4)
        },
    )?;
    let service = lab.get_json(&["get", "service", "echo"])?;
    let cluster_ip = service["spec"]["clusterIP"]
        .as_str()
        .context("echo's ClusterIP")?
        .to_string();
    let servers = ready_servers(&lab)?;
    let placed = lab.get_json(&["get", "pods", "-l", "app=echo"])?;
    let nodes_used: BTreeSet<&str> = placed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    assert_eq!(nodes_used.len(), 2, "the servers spread over both nodes");
    wait_backends_on_every_node(&mut lab, &cluster_ip, 4)?;
    check_agents_list_the_api(&mut lab)?;

    // TCP and UDP from a pod on each node reach every backend, on this node and the other.
    let ip = cluster_ip.clone();
    check_reaches_all(&lab, &clients, "http", |_| ip.clone(), 80, &servers)?;
    check_reaches_all(&lab, &clients, "udp", |_| ip.clone(), 90, &servers)?;
    // The NodePort on the client's own node's address.
    check_reaches_all(
        &lab,
        &clients,
        "http",
        |n| n.ip.to_string(),
        NODE_PORT,
        &servers,
    )?;
    // The NodePort on the other node's address: packets from outside that node, which its
    // TC path sends to a backend (SNATed to it for a backend on the client's node).
    let other_node_ip = |n: &LabNode| {
        lab.nodes
            .iter()
            .find(|other| other.name != n.name)
            .map(|other| other.ip.to_string())
            .unwrap_or_default()
    };
    check_reaches_all(&lab, &clients, "http", other_node_ip, NODE_PORT, &servers)?;

    // The externalIP, from the pods.
    check_reaches_all(
        &lab,
        &clients,
        "http",
        |_| EXTERNAL_IP.to_string(),
        80,
        &servers,
    )?;
    // The cluster DNS through its ClusterIP, which only mycni balances here.
    check_pods_resolve_services_by_name(&lab, &clients, &cluster_ip, &servers)?;

    // ClientIP affinity: every try of one client lands on one backend.
    let sticky = lab.get_json(&["get", "service", "echo-sticky"])?;
    let sticky_ip = sticky["spec"]["clusterIP"]
        .as_str()
        .context("echo-sticky's ClusterIP")?
        .to_string();
    for (node_name, client_ip) in &clients {
        let dialed = dial(lab.node(node_name), client_ip, "http", &sticky_ip, 80)?;
        let seen: BTreeSet<&String> = dialed.responses.iter().collect();
        if seen.len() != 1 || dialed.responses.len() != TRIES as usize {
            bail!("{node_name}: {sticky_ip} with ClientIP affinity: {dialed:?}");
        }
        println!("{node_name}: {sticky_ip} (ClientIP affinity) always {seen:?}");
    }

    // No backend: connections are refused at once, not left to time out.
    let scaled = Instant::now();
    lab.kubectl(&["scale", "deployment", "echo", "--replicas=0"])?;
    let times = wait_backends_on_every_node(&mut lab, &cluster_ip, 0)?;
    print_times("scale 4 -> 0", &times, &[("after the scale call", scaled)]);
    for (node_name, client_ip) in &clients {
        let node = lab.node(node_name);
        for (protocol, port) in [("http", 80), ("udp", 90)] {
            let dialed = dial(node, client_ip, protocol, &cluster_ip, port)?;
            let refused = |e: &String| {
                e.contains("connection refused") || e.contains("operation not permitted")
            };
            if !dialed.responses.is_empty()
                || dialed.errors.len() != TRIES as usize
                || !dialed.errors.iter().all(refused)
            {
                bail!(
                    "{node_name}: {protocol} to {cluster_ip}:{port} without backends: {dialed:?}"
                );
            }
            println!(
                "{node_name}: {protocol} {cluster_ip}:{port} without backends: {:?}",
                dialed.errors.first()
            );
        }
    }

    // New backends are used as soon as they are ready.
    let scaled = Instant::now();
    lab.kubectl(&["scale", "deployment", "echo", "--replicas=3"])?;
    // Pods take seconds to start: time the agents from the Endpoints update the test sees
    // too (polled, so the agents may have been quicker still).
    let mut listed = Instant::now();
    lab.wait(
        "echo's Endpoints to list 3 ready pods",
        Duration::from_secs(180),
        |lab| {
            listed = Instant::now();
            Ok(endpoints_ready(lab)? == 3)
        },
    )?;
    let times = wait_backends_on_every_node(&mut lab, &cluster_ip, 3)?;
    print_times(
        "scale 0 -> 3",
        &times,
        &[
            ("after the scale call", scaled),
            ("after the Endpoints listed 3 (as polled)", listed),
        ],
    );
    lab.wait(
        "three new echo pods Ready",
        Duration::from_secs(60),
        |lab| Ok(ready_servers(lab)?.len() == 3),
    )?;
    let new_servers = ready_servers(&lab)?;
    assert!(new_servers.is_disjoint(&servers), "new pods, new names");
    check_reaches_all(&lab, &clients, "http", |_| ip.clone(), 80, &new_servers)?;
    check_reaches_all(&lab, &clients, "udp", |_| ip.clone(), 90, &new_servers)?;
    check_agents_list_the_api(&mut lab)?;

    // The agents counted what they translated and refused, and /metrics reports what the
    // maps hold.
    for node in &lab.nodes {
        let (_, metrics) = http_get(&node.netns, &format!("{}:9964", node.ip), "/metrics")?;
        let table = agent_frontends(node)?;
        let backends: usize = table.values().map(Vec::len).sum();
        assert_eq!(
            (
                metric(&metrics, "mycni_service_frontends"),
                metric(&metrics, "mycni_service_backends")
            ),
            (Some(table.len() as f64), Some(backends as f64)),
            "{}: /metrics against services --json",
            node.name
        );
        assert!(
            metric(
                &metrics,
                "mycni_packets_total{verdict=\"service_translated\"}"
            )
            .is_some_and(|n| n > 0.0),
            "{}: no service_translated in /metrics",
            node.name
        );
        // Scaling to zero removed every backend: each agent looked for the sockets left
        // connected to them in every namespace on its node (from its container, through
        // hostPID), and none of that failed.
        assert_eq!(
            metric(&metrics, "mycni_service_socket_termination_failures_total"),
            Some(0.0),
            "{}: socket termination failures",
            node.name
        );
        println!(
            "{}: sockets ended for removed backends: {:?}",
            node.name,
            metric(&metrics, "mycni_service_sockets_destroyed_total")
        );
        let stats = node.exec(&[
            &agent_bin().display().to_string(),
            "--bpffs-root=/sys/fs/bpf/mycni",
            "stats",
            "--json",
        ])?;
        let stats: Value = serde_json::from_str(&stats)?;
        let translated = stats["service_translated"]["packets"].as_u64().unwrap_or(0);
        let refused = stats["service_no_backend"]["packets"].as_u64().unwrap_or(0);
        println!(
            "{}: service_translated {translated}, service_no_backend {refused}",
            node.name
        );
        assert!(translated > 0 && refused > 0, "{}: {stats}", node.name);
        let external = stats["external_translated"]["packets"]
            .as_u64()
            .unwrap_or(0);
        println!("{}: external_translated {external}", node.name);
        assert!(
            external > 0,
            "{}: the TC path translated nothing: {stats}",
            node.name
        );
    }
    Ok(())
}
