//! How long a Service's backend change takes to reach every node in the Kubernetes lab
//! without kube-proxy (issue 15: "backend changes take effect within 1 s"): a Deployment
//! scaled up and down, and one of its pods turned unready and ready again; `TRIALS` trials
//! of each, p50/p99 printed and written to `target/bench/services-latency.json`. Timed from
//! the kubectl command's start (what an operator waits for: it includes the pod's start or
//! its readiness probe, then the endpoints controller) and from the moment the Endpoints
//! object showed the change (the agents' own share: their watch, the computation, the map
//! writes). Timings are reported, not asserted (a wait is bounded at 60 s).
//!
//! Probed through each node's maps as its agent writes them (`SERVICES` and `BACKENDS`,
//! read from the test through the node's mount namespace every 2 ms): `connect4` looks
//! them up on every connection, so the first poll that sees the new backend set is when new
//! connections start meeting it. The Endpoints are followed by a `kubectl get --watch`
//! whose every object is time-stamped as it arrives. Real connections confirm the first
//! trial of each kind. Run alone with the lab's lock held (`cargo xtask services-latency`).
use std::collections::BTreeSet;
use std::io::BufReader;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mycni::socket_lb::ServiceTables;
use mycni_common::service::{ServiceKey, PROTO_TCP};
use mycni_tests::bench::latency_summary;
use mycni_tests::kubelab::{image_archive, lab_manifest_ebpf_services, KubeLab, LabOptions};
use mycni_tests::prefix;
use serde_json::{json, Value};

const TRIALS: usize = 10;
/// Where the agent pins its maps inside a lab node (deploy/mycni.yaml's `--bpffs-root`).
const PIN_ROOT: &str = "/sys/fs/bpf/mycni";
/// A pod whose `/tmp/ready` is gone fails its readiness probe (checked every second).
const READY_FILE: &str = "/tmp/ready";

/// Two to three busybox httpd pods answering their own name, ready while `READY_FILE`
/// exists, behind a ClusterIP; and a client pod that fetches through it.
fn manifests(replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      automountServiceAccountToken: false
      containers:
      - name: main
        image: mycni.test/busybox:1
        imagePullPolicy: Never
        command: ["/bin/busybox", "sh", "-c", "mkdir -p /www && /bin/busybox hostname > /www/index.html && touch {READY_FILE} && exec /bin/busybox httpd -f -p 8080 -h /www"]
        readinessProbe:
          exec: {{command: ["/bin/busybox", "test", "-f", "{READY_FILE}"]}}
          periodSeconds: 1
          failureThreshold: 1
          successThreshold: 1
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
---
{}"#,
        mycni_tests::kubelab::httpd_pod_manifest("client", "node-1", "role: client", "")
    )
}

/// The web pods: (name, IP, ready), of those not terminating and with an IP.
fn web_pods(lab: &KubeLab) -> Result<Vec<(String, Ipv4Addr, bool)>> {
    let pods = lab.get_json(&["get", "pods", "-l", "app=web"])?;
    Ok(pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| {
            let ready = p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            Some((
                p["metadata"]["name"].as_str()?.to_string(),
                p["status"]["podIP"].as_str()?.parse().ok()?,
                ready,
            ))
        })
        .collect())
}

/// The ready addresses an Endpoints object lists.
fn ready_addresses(endpoints: &Value) -> BTreeSet<Ipv4Addr> {
    endpoints["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a["ip"].as_str()?.parse().ok())
        .collect()
}

/// Each Endpoints object the watch delivered, with when it arrived, and its ready addresses.
type Arrivals = Arc<Mutex<Vec<(Instant, BTreeSet<Ipv4Addr>)>>>;

/// `kubectl get endpoints web --watch`, each object time-stamped as it arrives.
struct EndpointsWatch {
    child: Child,
    seen: Arrivals,
}

impl EndpointsWatch {
    fn start(lab: &KubeLab) -> Result<EndpointsWatch> {
        let mut child = lab
            .kubectl_command()
            .args(["get", "endpoints", "web", "--watch", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("kubectl get --watch")?;
        let stdout = child.stdout.take().context("watch stdout")?;
        let seen: Arrivals = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            let objects = serde_json::Deserializer::from_reader(BufReader::new(stdout));
            for object in objects.into_iter::<Value>() {
                let Ok(object) = object else { break };
                let at = Instant::now();
                if let Ok(mut seen) = record.lock() {
                    seen.push((at, ready_addresses(&object)));
                }
            }
        });
        Ok(EndpointsWatch { child, seen })
    }

    /// When the Endpoints first listed `wanted` after `since`.
    fn first(
        &self,
        since: Instant,
        wanted: &dyn Fn(&BTreeSet<Ipv4Addr>) -> bool,
    ) -> Option<Instant> {
        let seen = self.seen.lock().ok()?;
        seen.iter()
            .find(|(at, ready)| *at >= since && wanted(ready))
            .map(|(at, _)| *at)
    }
}

impl Drop for EndpointsWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The backends one node's maps hold for `frontend`.
fn node_backends(root: &std::path::Path, frontend: &ServiceKey) -> Result<BTreeSet<Ipv4Addr>> {
    let tables = ServiceTables::open(root)?;
    Ok(tables
        .frontends()?
        .get(frontend)
        .map(|(_, backends)| backends.iter().map(|b| Ipv4Addr::from(b.address)).collect())
        .unwrap_or_default())
}

/// One trial's timings.
struct Timing {
    /// From the command's start until every node's maps held the change.
    from_command: Duration,
    /// From the Endpoints showing the change (as the watch saw it) until every node held it.
    from_endpoints: Option<Duration>,
}

/// Runs `change` and polls every node's maps until each holds a backend set for which
/// `expect` holds.
fn time_until_every_node(
    roots: &[(String, PathBuf)],
    frontend: &ServiceKey,
    watch: &EndpointsWatch,
    change: impl FnOnce() -> Result<()>,
    expect: &dyn Fn(&BTreeSet<Ipv4Addr>) -> bool,
) -> Result<Timing> {
    let start = Instant::now();
    change()?;
    let mut done: Vec<Option<Instant>> = vec![None; roots.len()];
    while done.iter().any(Option::is_none) {
        for (index, (_, root)) in roots.iter().enumerate() {
            if done[index].is_none() && expect(&node_backends(root, frontend)?) {
                done[index] = Some(Instant::now());
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            let maps: Vec<String> = roots
                .iter()
                .map(|(name, root)| format!("{name}: {:?}", node_backends(root, frontend)))
                .collect();
            bail!(
                "not every node's maps held the change within 60 s: {}",
                maps.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let every = done.into_iter().flatten().max().unwrap_or(start);
    // The watch may deliver the object a moment after the first poll saw the maps: wait
    // for it briefly rather than miss it.
    let mut listed = watch.first(start, expect);
    let deadline = Instant::now() + Duration::from_secs(2);
    while listed.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        listed = watch.first(start, expect);
    }
    Ok(Timing {
        from_command: every - start,
        from_endpoints: listed.map(|at| every.saturating_duration_since(at)),
    })
}

/// The names `client` reaches through `cluster_ip` in `tries` fetches (one `kubectl exec`).
fn reached(lab: &KubeLab, cluster_ip: Ipv4Addr, tries: u32) -> Result<BTreeSet<String>> {
    // busybox's nc (its wget crashes in this image): each answer's body is the pod's name.
    let script = format!(
        "for i in $(/bin/busybox seq {tries}); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox timeout 5 /bin/busybox nc -w 3 {cluster_ip} 80; done"
    );
    let out = lab.kubectl(&["exec", "client", "--", "/bin/busybox", "sh", "-c", &script])?;
    Ok(out
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| l.starts_with("web-"))
        .collect())
}

/// Real connections agree with the maps: `tries` fetches reach exactly the ready pods.
fn confirm_by_connections(lab: &KubeLab, cluster_ip: Ipv4Addr) -> Result<()> {
    let ready: BTreeSet<String> = web_pods(lab)?
        .into_iter()
        .filter(|(_, _, ready)| *ready)
        .map(|(name, _, _)| name)
        .collect();
    // Three equally likely backends: one missed in 30 tries with probability 3 × (2/3)^30.
    let seen = reached(lab, cluster_ip, 30)?;
    if seen != ready {
        bail!("30 fetches through {cluster_ip} reached {seen:?}, the ready pods are {ready:?}");
    }
    Ok(())
}

#[test]
fn backend_changes_reach_every_node_and_the_latency_is_reported() -> Result<()> {
    mycni_tests::require_root!();
    let image = image_archive("MYCNI_TEST_IMAGE", "mycni-test.oci.tar")?;
    let prefix = prefix("svc-lat");
    let mut lab = KubeLab::with_options(&prefix, &[image], LabOptions { kube_proxy: false })?;
    lab.install_mycni_manifest(&lab_manifest_ebpf_services(&prefix)?)?;
    lab.wait(
        "the default service account",
        Duration::from_secs(60),
        |lab| Ok(lab.kubectl(&["get", "serviceaccount", "default"]).is_ok()),
    )?;
    lab.apply(&manifests(2))?;
    lab.wait(
        "two web pods ready and the client running",
        Duration::from_secs(180),
        |lab| {
            let client = lab.get_json(&["get", "pod", "client"])?;
            Ok(client["status"]["phase"] == "Running"
                && web_pods(lab)?.iter().filter(|(_, _, ready)| *ready).count() == 2)
        },
    )?;
    let service = lab.get_json(&["get", "service", "web"])?;
    let cluster_ip: Ipv4Addr = service["spec"]["clusterIP"]
        .as_str()
        .context("web's ClusterIP")?
        .parse()?;
    let frontend = ServiceKey {
        address: cluster_ip.octets(),
        port: 80,
        protocol: PROTO_TCP,
        scope: 0,
    };
    let roots = lab
        .nodes
        .iter()
        .map(|node| Ok((node.name.clone(), node.path_inside(PIN_ROOT)?)))
        .collect::<Result<Vec<_>>>()?;
    let count_is = |n: usize| move |backends: &BTreeSet<Ipv4Addr>| backends.len() == n;
    lab.wait(
        "every node's maps listing two backends",
        Duration::from_secs(60),
        |_| {
            Ok(roots
                .iter()
                .all(|(_, root)| node_backends(root, &frontend).is_ok_and(|b| b.len() == 2)))
        },
    )?;
    let watch = EndpointsWatch::start(&lab)?;

    let mut results: Vec<(&'static str, Vec<Timing>)> = Vec::new();
    let mut record =
        |what: &'static str, timing: Timing| match results.iter_mut().find(|(w, _)| *w == what) {
            Some((_, timings)) => timings.push(timing),
            None => results.push((what, vec![timing])),
        };
    for trial in 0..TRIALS {
        eprintln!("trial {}/{TRIALS}", trial + 1);
        let timing = time_until_every_node(
            &roots,
            &frontend,
            &watch,
            || {
                lab.kubectl(&["scale", "deployment", "web", "--replicas=3"])
                    .map(drop)
            },
            &count_is(3),
        )
        .context("scaling up")?;
        record("scale up (2 -> 3 pods)", timing);
        // The new pod is ready in every node's maps; the API may say so a moment later.
        lab.wait("three web pods ready", Duration::from_secs(60), |lab| {
            Ok(web_pods(lab)?.iter().filter(|(_, _, ready)| *ready).count() == 3)
        })?;
        if trial == 0 {
            confirm_by_connections(&lab, cluster_ip)?;
        }
        let pods = web_pods(&lab)?;
        let (name, ip, _) = pods.first().cloned().context("a web pod")?;
        let without =
            move |backends: &BTreeSet<Ipv4Addr>| backends.len() == 2 && !backends.contains(&ip);
        let timing = time_until_every_node(
            &roots,
            &frontend,
            &watch,
            || {
                lab.kubectl(&["exec", &name, "--", "/bin/busybox", "rm", READY_FILE])
                    .map(drop)
            },
            &without,
        )
        .context("a pod turning unready")?;
        record("a pod unready (readiness probe fails)", timing);
        lab.wait(&format!("{name} unready"), Duration::from_secs(30), |lab| {
            Ok(web_pods(lab)?
                .iter()
                .any(|(n, _, ready)| *n == name && !*ready))
        })?;
        if trial == 0 {
            confirm_by_connections(&lab, cluster_ip)?;
        }
        let with =
            move |backends: &BTreeSet<Ipv4Addr>| backends.len() == 3 && backends.contains(&ip);
        let timing = time_until_every_node(
            &roots,
            &frontend,
            &watch,
            || {
                lab.kubectl(&["exec", &name, "--", "/bin/busybox", "touch", READY_FILE])
                    .map(drop)
            },
            &with,
        )
        .context("the pod ready again")?;
        record("the pod ready again", timing);
        lab.wait("three web pods ready", Duration::from_secs(30), |lab| {
            Ok(web_pods(lab)?.iter().filter(|(_, _, ready)| *ready).count() == 3)
        })?;
        let timing = time_until_every_node(
            &roots,
            &frontend,
            &watch,
            || {
                lab.kubectl(&["scale", "deployment", "web", "--replicas=2"])
                    .map(drop)
            },
            &count_is(2),
        )
        .context("scaling down")?;
        record("scale down (3 -> 2 pods)", timing);
        lab.wait("two web pods left", Duration::from_secs(60), |lab| {
            let pods = lab.get_json(&["get", "pods", "-l", "app=web"])?;
            Ok(pods["items"].as_array().map_or(0, Vec::len) == 2)
        })?;
        if trial == 0 {
            confirm_by_connections(&lab, cluster_ip)?;
        }
    }

    let mut report = serde_json::Map::new();
    println!(
        "\nService backend change latency, {TRIALS} trials, until every node's maps hold it (ms):"
    );
    println!(
        "| change | from the kubectl command: p50 / p99 / max | from the Endpoints update: p50 / p99 / max |"
    );
    println!("|---|---|---|");
    for (what, timings) in &results {
        let from_command: Vec<Duration> = timings.iter().map(|t| t.from_command).collect();
        let from_endpoints: Vec<Duration> =
            timings.iter().filter_map(|t| t.from_endpoints).collect();
        let (a, b) = (
            latency_summary(&from_command),
            latency_summary(&from_endpoints),
        );
        let cell = |v: &Value| {
            format!(
                "{:.0} / {:.0} / {:.0}",
                v["p50_ms"].as_f64().unwrap_or(f64::NAN),
                v["p99_ms"].as_f64().unwrap_or(f64::NAN),
                v["max_ms"].as_f64().unwrap_or(f64::NAN)
            )
        };
        println!(
            "| {what} | {} | {} ({} of {} seen by the watch) |",
            cell(&a),
            cell(&b),
            from_endpoints.len(),
            timings.len()
        );
        report.insert(
            what.to_string(),
            json!({"from_kubectl_command": a, "from_endpoints_update": b}),
        );
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("services-latency.json"),
        serde_json::to_string_pretty(&Value::Object(report))?,
    )?;
    Ok(())
}
