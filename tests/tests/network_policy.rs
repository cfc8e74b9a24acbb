//! NetworkPolicy on the Kubernetes lab (issue 14): a default-deny plus allow-by-label policy
//! on a server pod, enforced for clients on the other node and on the same node, the
//! kubelet's probes still passing, a label change that admits a client, what `mycni-agent
//! policy` reports, and everything allowed again once the policy is deleted. Run alone with
//! the lab's lock held (see tests/src/kubelab.rs for how the lab keeps to its namespaces).
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mycni_tests::kubelab::{image_archive, KubeLab};
use mycni_tests::prefix;
use serde_json::Value;

/// With the named port `http` and a readiness probe from the kubelet.
fn pod_manifest(name: &str, node: &str, labels: &str) -> String {
    mycni_tests::kubelab::httpd_pod_manifest(
        name,
        node,
        labels,
        "    ports: [{name: http, containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /, port: 8080}
      periodSeconds: 1
      failureThreshold: 1
",
    )
}

/// Ingress to `app=server` only from `role=client` pods of the namespace, on the named port.
const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: default}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: http, protocol: TCP}]
"#;

/// What a client gets from the server: its body, or `None` when nothing answered within
/// 3 s (busybox nc; `timeout` ends a connection that stalls after the handshake).
fn fetch(lab: &KubeLab, client: &str, server_ip: &str) -> Option<String> {
    let request = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox timeout 5 /bin/busybox nc -w 3 {server_ip} 8080"
    );
    lab.kubectl(&["exec", client, "--", "/bin/busybox", "sh", "-c", &request])
        .ok()
        .filter(|body| body.contains("server"))
}

/// Waits until each client in `allowed` reaches the server and each in `denied` does not,
/// and prints how long that took (an upper bound: a denied fetch takes 3 s to give up).
fn wait_for_access(
    lab: &mut KubeLab,
    server_ip: &str,
    allowed: &[&str],
    denied: &[&str],
    when: &str,
) -> Result<()> {
    let took = lab.wait(when, Duration::from_secs(60), |lab| {
        Ok(allowed.iter().all(|c| fetch(lab, c, server_ip).is_some())
            && denied.iter().all(|c| fetch(lab, c, server_ip).is_none()))
    })?;
    println!("{when}: within {took:?}");
    Ok(())
}

/// `mycni-agent policy --json` in the agent pod of `node`.
fn agent_policy_report(lab: &KubeLab, node: &str) -> Result<Value> {
    let selector = format!("spec.nodeName={node}");
    let pod = lab.kubectl(&[
        "-n",
        "kube-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=mycni",
        "--field-selector",
        &selector,
        "-o",
        "name",
    ])?;
    let pod = pod.trim();
    if pod.is_empty() {
        bail!("no mycni agent pod on {node}");
    }
    let text = lab.kubectl(&[
        "-n",
        "kube-system",
        "exec",
        pod,
        "-c",
        "agent",
        "--",
        "/usr/local/bin/mycni-agent",
        "policy",
        "--json",
    ])?;
    serde_json::from_str(&text).with_context(|| format!("mycni-agent policy --json: {text}"))
}

fn ready(lab: &KubeLab, pod: &str) -> Result<bool> {
    let pod = lab.get_json(&["get", "pod", pod])?;
    Ok(pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

#[test]
fn default_deny_with_an_allowed_label_across_nodes_and_on_one_node() -> Result<()> {
    mycni_tests::require_root!();
    let image = image_archive("MYCNI_TEST_IMAGE", "mycni-test.oci.tar")?;
    let mut lab = KubeLab::new(&prefix("netpol"), &[image])?;
    lab.install_mycni()?;
    lab.wait(
        "the default service account",
        Duration::from_secs(60),
        |lab| Ok(lab.kubectl(&["get", "serviceaccount", "default"]).is_ok()),
    )?;
    let pods = [
        ("server", "node-1", "app: server"),
        ("client-far", "node-2", "role: client"),
        ("other-far", "node-2", "role: other"),
        ("other-near", "node-1", "role: other"),
    ];
    let manifests: Vec<String> = pods
        .iter()
        .map(|(name, node, labels)| pod_manifest(name, node, labels))
        .collect();
    lab.apply(&manifests.join("---\n"))?;
    let mut server_ip = String::new();
    lab.wait("four pods Ready", Duration::from_secs(120), |lab| {
        for (name, _, _) in &pods {
            if !ready(lab, name)? {
                return Ok(false);
            }
        }
        let server = lab.get_json(&["get", "pod", "server"])?;
        server_ip = server["status"]["podIP"].as_str().unwrap_or("").to_string();
        Ok(!server_ip.is_empty())
    })?;
    let clients = ["client-far", "other-far", "other-near"];
    wait_for_access(
        &mut lab,
        &server_ip,
        &clients,
        &[],
        "every client to reach the server",
    )?;

    lab.apply(POLICY)?;
    wait_for_access(
        &mut lab,
        &server_ip,
        &["client-far"],
        &["other-far", "other-near"],
        "the policy to admit role=client only (other node and same node)",
    )?;
    // The kubelet's probes come from the node: default-deny must not fail them.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        ready(&lab, "server")?,
        "the server's readiness probe fails under the policy"
    );

    let report = agent_policy_report(&lab, "node-1")?;
    let endpoints = report["endpoints"].as_array().context("endpoints")?;
    let server = endpoints
        .iter()
        .find(|e| e["name"] == "server")
        .with_context(|| format!("the server is not in the report: {report}"))?;
    assert_eq!(
        server["policies"],
        serde_json::json!(["default/server-ingress"])
    );
    assert_eq!(server["enforce"], serde_json::json!(["ingress"]));
    let peers = server["ingress"].as_array().context("ingress peers")?;
    assert!(
        peers.iter().any(|p| p["peer"]["kind"] == "pods"
            && p["peer"]["labels"]["role"] == "client"
            && p["ports"] == serde_json::json!(["tcp/8080"])),
        "no role=client peer on tcp/8080: {server}"
    );
    assert!(
        peers.iter().any(|p| p["peer"]["kind"] == "host"),
        "no probe entry: {server}"
    );
    let dropped = server["dropped"]["ingress"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "no ingress drop counted: {server}");
    assert!(
        endpoints.iter().all(|e| e["name"] != "other-near"),
        "a pod no policy selects is reported: {report}"
    );

    // A label change admits a pod.
    lab.kubectl(&["label", "pod", "other-far", "role=client", "--overwrite"])?;
    wait_for_access(
        &mut lab,
        &server_ip,
        &["client-far", "other-far"],
        &["other-near"],
        "the relabelled pod to be admitted",
    )?;

    lab.kubectl(&["delete", "networkpolicy", "server-ingress"])?;
    wait_for_access(
        &mut lab,
        &server_ip,
        &clients,
        &[],
        "everything allowed again",
    )?;
    Ok(())
}
