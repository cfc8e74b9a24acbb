//! Upstream conformance in the lab: which of Kubernetes 1.20's own e2e specs run against mycni,
//! why each other spec of the same areas does not, and the report of a run. Pure: focus
//! expressions, the JUnit report e2e.test writes, the accounting and the markdown summary,
//! without I/O (tests/tests/conformance.rs runs e2e.test in the lab).
//!
//! Three runs, each a [`Suite`]: [`KUBE_PROXY`] (the network specs, kube-proxy balancing
//! Services), [`EBPF_SERVICES`] (the Services specs, kube-proxy absent, mycni balancing
//! them at the sockets) and [`NETWORK_POLICY`] (the NetworkPolicy specs, kube-proxy
//! balancing Services, mycni enforcing the policies). Nothing in a suite's areas is dropped silently: a dry run of
//! e2e.test lists every spec of them, and [`plan`] fails unless each is either listed (and
//! then run) or matched by a not-run entry that says why not.
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConformanceError {
    #[error("the JUnit report is not XML: {0}")]
    Junit(#[from] roxmltree::Error),
    #[error("listed specs that e2e.test does not have (or has more than once): {0:?}")]
    ListedNotFound(Vec<String>),
    #[error("specs in the covered areas that are neither listed nor given a reason: {0:?}")]
    Unaccounted(Vec<String>),
}

/// A spec the lab runs, by its full name (as e2e.test's JUnit report spells it).
#[derive(Debug)]
pub struct ListedSpec {
    pub name: &'static str,
    /// What it checks, for the summary.
    pub checks: &'static str,
}

/// The specs run against mycni.
pub const LISTED: &[ListedSpec] = &[
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: http [NodeConformance] [Conformance]",
        checks: "a pod reaches a server pod on every node over HTTP (TCP)",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: udp [NodeConformance] [Conformance]",
        checks: "a pod reaches a server pod on every node over UDP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Pods should function for node-pod communication: http [LinuxOnly] [NodeConformance] [Conformance]",
        checks: "a hostNetwork pod (the node) reaches a server pod on every node over HTTP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Pods should function for node-pod communication: udp [LinuxOnly] [NodeConformance] [Conformance]",
        checks: "a hostNetwork pod (the node) reaches a server pod on every node over UDP",
    },
    ListedSpec {
        name: "[sig-network] NoSNAT [Feature:NoSNAT] [Slow] Should be able to send traffic between Pods without SNAT",
        checks: "pods on each node see every other pod's own IP as the source",
    },
    ListedSpec {
        name: "[sig-network] Services should preserve source pod IP for traffic thru service cluster IP [LinuxOnly]",
        checks: "pods on both nodes reach a ClusterIP (kube-proxy, iptables) and the backend sees their pod IPs",
    },
    ListedSpec {
        name: "[sig-scheduling] SchedulerPredicates [Serial] validates that there is no conflict between pods with same hostPort but different hostIP and protocol [Conformance]",
        checks: "three pods on one node share hostPort 54321 (127.0.0.1/TCP, node IP/TCP, node IP/UDP), each reachable (portmap)",
    },    ListedSpec {
        name: "[sig-network] DNS should provide DNS for the cluster  [Conformance]",
        checks: "a pod resolves `kubernetes.default.svc.cluster.local` (dig over UDP and TCP, from agnhost and jessie-dnsutils) and its own `a-b-c-d.<ns>.pod` name",
    },
    ListedSpec {
        name: "[sig-network] DNS should resolve DNS of partial qualified names for the cluster [LinuxOnly]",
        checks: "`kubernetes.default` and `kubernetes.default.svc` through the pod's search list; its hostname entries in /etc/hosts",
    },
    ListedSpec {
        name: "[sig-network] DNS should provide /etc/hosts entries for the cluster [LinuxOnly] [Conformance]",
        checks: "kubelet's /etc/hosts names the pod by hostname and FQDN (getent); its pod A record",
    },
    ListedSpec {
        name: "[sig-network] DNS should provide DNS for services  [Conformance]",
        checks: "a headless Service's A records (its ready pod), SRV for named ports of a headless and a ClusterIP Service, PTR for the ClusterIP",
    },
    ListedSpec {
        name: "[sig-network] DNS should resolve DNS of partial qualified names for services [LinuxOnly] [Conformance]",
        checks: "the same names, partially qualified, through the search list",
    },
    ListedSpec {
        name: "[sig-network] DNS should provide DNS for pods for Hostname [LinuxOnly] [Conformance]",
        checks: "a pod with `hostname` and `subdomain` finds its names in /etc/hosts; its pod A record",
    },
    ListedSpec {
        name: "[sig-network] DNS should provide DNS for pods for Subdomain [Conformance]",
        checks: "`<hostname>.<subdomain>.<ns>.svc` and the headless Service's name resolve to the pod",
    },
    ListedSpec {
        name: "[sig-network] DNS should provide DNS for ExternalName services [Conformance]",
        checks: "an ExternalName Service is a CNAME, follows a changed externalName, and turned ClusterIP resolves to its ClusterIP",
    },
    ListedSpec {
        name: "[sig-network] DNS should support configurable pod DNS nameservers [Conformance]",
        checks: "`dnsPolicy: None` with a `dnsConfig`: the pod's resolv.conf has its nameserver and search path (kubelet)",
    },
];

/// Spec-name prefixes whose every spec is accounted for: run, or not run with a reason.
pub const AREAS: &[&str] = &[
    "[sig-network] Networking ",
    "[sig-network] NoSNAT ",
    "[sig-network] DNS ",
    "[sig-network] ClusterDns ",
    "[sig-network] [Feature:PerformanceDNS]",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Needs what these machines do not have (the internet, a cloud provider, SSH to nodes,
    /// a DNS server image, a kernel module the lab may not load).
    CannotRunHere,
    /// Could run, but is not in the list yet (another issue extends it).
    NotListedYet,
}

/// Why the specs whose names contain `name_contains` are not run. The first match counts.
#[derive(Debug)]
pub struct NotRun {
    pub name_contains: &'static str,
    pub why: Why,
    pub reason: &'static str,
}

pub const NOT_RUN: &[NotRun] = &[
    NotRun {
        name_contains: "[Feature:Networking-IPv4]",
        why: Why::CannotRunHere,
        reason: "needs the internet (dials 8.8.8.8:53); the lab's nodes reach only the lab",
    },
    NotRun {
        name_contains: "[Feature:Networking-IPv6]",
        why: Why::CannotRunHere,
        reason: "needs the internet over IPv6; mycni is IPv4-only (pods' IPv6 is dropped)",
    },
    NotRun {
        name_contains: ": sctp [",
        why: Why::CannotRunHere,
        reason: "[Disruptive]: an SCTP socket in a pod loads the sctp module into the machine's \
                 kernel, a host change the lab does not make",
    },
    NotRun {
        name_contains: "should recreate its iptables rules if they are deleted [Disruptive]",
        why: Why::CannotRunHere,
        reason: "[Disruptive]: deletes the nodes' iptables rules and restarts kubelet over SSH; \
                 the skeleton provider has no SSH to the nodes",
    },
    NotRun {
        name_contains: "[sig-network] Networking IPerf",
        why: Why::CannotRunHere,
        reason: "a throughput benchmark with iperf, which the agnhost image here lacks; \
                 `cargo xtask bench` measures mycni's throughput",
    },
    NotRun {
        name_contains: "[Provider:GCE]",
        why: Why::CannotRunHere,
        reason: "needs the GCE cloud provider",
    },
    NotRun {
        name_contains: "DNS should support configurable pod resolv.conf",
        why: Why::CannotRunHere,
        reason: "its test DNS server is CoreDNS run from upstream's agnhost image (`/coredns \
                 -conf ...`); CoreDNS is not packaged for Debian, so the lab's agnhost has none",
    },
    NotRun {
        name_contains: "[sig-network] DNS configMap nameserver ",
        why: Why::CannotRunHere,
        reason: "[Serial]: rewrites the cluster's CoreDNS ConfigMap (stub domains, upstream \
                 servers) and restarts its pods to forward to a CoreDNS pod of the test; the \
                 lab's DNS is no CoreDNS, forwards nothing, and the PTR spec asks for 8.8.8.8 \
                 (the internet)",
    },
    NotRun {
        name_contains: "[sig-network] ClusterDns ",
        why: Why::CannotRunHere,
        reason: "deploys the k8s.io/examples repository's cluster-dns manifests (read from \
                 $GOPATH, not part of the Kubernetes source) and their Python images",
    },
    NotRun {
        name_contains: "[Feature:PerformanceDNS]",
        why: Why::NotListedYet,
        reason: "[Serial]: creates 10,000 Services (maxServicesPerCluster) and resolves 1% of \
                 them; minutes alone in the lab, and no other spec may run beside it",
    },
    NotRun {
        name_contains: "[sig-network] Networking Granular Checks: Services ",
        why: Why::NotListedYet,
        reason: "Services through kube-proxy; the ones that can run here run without kube-proxy, \
                 in EBPF_SERVICES",
    },
    NotRun {
        name_contains: "[sig-network] Networking should check kube-proxy urls",
        why: Why::NotListedYet,
        reason: "kube-proxy's own endpoints: the Services issue extends the list with it",
    },
    NotRun {
        name_contains: "[sig-network] Networking should provide unchanging, static URL paths",
        why: Why::NotListedYet,
        reason: "API server paths only, no pod traffic",
    },
];

/// The specs run with kube-proxy absent and mycni balancing Services at the pods' sockets
/// (`service-mode: "ebpf"`): the Services specs that need neither a cloud provider, cluster
/// DNS, the internet nor SSH to the nodes.
pub const EBPF_LISTED: &[ListedSpec] = &[
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for endpoint-Service: http",
        checks: "a backend pod reaches its own Service's ClusterIP and NodePort over HTTP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for endpoint-Service: udp",
        checks: "a backend pod reaches its own Service's ClusterIP and NodePort over UDP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for multiple endpoint-Services with same selector",
        checks: "two Services over the same pods, one deleted: the other keeps working",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should update endpoints: http",
        checks: "a deleted backend pod stops answering through the ClusterIP (HTTP)",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should update endpoints: udp",
        checks: "a deleted backend pod stops answering through the ClusterIP (UDP)",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for client IP based session affinity: http [LinuxOnly]",
        checks: "sessionAffinity ClientIP pins a pod to one backend (HTTP)",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for client IP based session affinity: udp [LinuxOnly]",
        checks: "sessionAffinity ClientIP pins a pod to one backend (UDP)",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should be able to handle large requests: http",
        checks: "a large HTTP request through a ClusterIP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should be able to handle large requests: udp",
        checks: "a large UDP datagram through a ClusterIP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for pod-Service: http",
        checks: "a pod on either node reaches a ClusterIP and the first node's NodePort over HTTP (from the second node: the TC path)",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for pod-Service: udp",
        checks: "the same over UDP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for node-Service: http",
        checks: "a hostNetwork pod on either node reaches a ClusterIP and the first node's NodePort over HTTP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for node-Service: udp",
        checks: "the same over UDP",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should support basic nodePort: udp functionality",
        checks: "UDP to the first node's NodePort reaches every backend",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should update nodePort: http [Slow]",
        checks: "a changed NodePort answers on the new port and no longer on the old one (HTTP)",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should update nodePort: udp [Slow]",
        checks: "the same over UDP",
    },
    ListedSpec {
        name: "[sig-network] Services should provide secure master service  [Conformance]",
        checks: "the `kubernetes` Service exists (API only)",
    },
    ListedSpec {
        name: "[sig-network] Services should serve a basic endpoint from pods  [Conformance]",
        checks: "Endpoints follow the pods of a Service (API only)",
    },
    ListedSpec {
        name: "[sig-network] Services should serve multiport endpoints from pods  [Conformance]",
        checks: "Endpoints of a multiport Service follow its pods (API only)",
    },
    ListedSpec {
        name: "[sig-network] Services should find a service from listing all namespaces [Conformance]",
        checks: "Services listed across namespaces (API only)",
    },
    ListedSpec {
        name: "[sig-network] Services should test the lifecycle of an Endpoint [Conformance]",
        checks: "create, patch, list and delete an Endpoints object (API only)",
    },
    ListedSpec {
        name: "[sig-network] Services should check NodePort out-of-range",
        checks: "the API server refuses a NodePort outside its range (API only)",
    },
    ListedSpec {
        name: "[sig-network] Services should prevent NodePort collisions",
        checks: "the API server refuses a NodePort already taken (API only)",
    },
    ListedSpec {
        name: "[sig-network] Services should release NodePorts on delete",
        checks: "a deleted Service's NodePort is free again and nothing listens on it",
    },
    ListedSpec {
        name: "[sig-network] Services should preserve source pod IP for traffic thru service cluster IP [LinuxOnly]",
        checks: "pods on both nodes reach a ClusterIP and the backend sees their pod IPs",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to create a functioning NodePort service [Conformance]",
        checks: "an exec pod reaches a NodePort Service by its name and each node's NodePort (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should be rejected when no endpoints exist",
        checks: "`agnhost connect` to a Service without endpoints, by its name, is refused at once, not left to time out (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should allow pods to hairpin back to themselves through services",
        checks: "a pod reaches itself through its Service, by the Service's name (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to update service type to NodePort listening on same port number but different protocols",
        checks: "a ClusterIP Service turned NodePort with TCP and UDP on one port answers by name and on the NodePort (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to change the type from ExternalName to ClusterIP [Conformance]",
        checks: "an ExternalName Service turned ClusterIP is reached by its name (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to change the type from ExternalName to NodePort [Conformance]",
        checks: "an ExternalName Service turned NodePort is reached by its name and NodePort (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to change the type from ClusterIP to ExternalName [Conformance]",
        checks: "a Service turned ExternalName (a CNAME to another Service's name) resolves (`nslookup`) (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to change the type from NodePort to ExternalName [Conformance]",
        checks: "the same from a NodePort Service (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should have session affinity work for service with type clusterIP [LinuxOnly] [Conformance]",
        checks: "ClientIP affinity through a ClusterIP, from an exec pod that first reaches the Service by name (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should have session affinity timeout work for service with type clusterIP [LinuxOnly] [Conformance]",
        checks: "ClientIP affinity ends after its timeout (ClusterIP) (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to switch session affinity for service with type clusterIP [LinuxOnly] [Conformance]",
        checks: "affinity switched on and off on a ClusterIP Service (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should have session affinity work for NodePort service [LinuxOnly] [Conformance]",
        checks: "ClientIP affinity through a NodePort (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should have session affinity timeout work for NodePort service [LinuxOnly] [Conformance]",
        checks: "ClientIP affinity ends after its timeout (NodePort) (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to switch session affinity for NodePort service [LinuxOnly] [Conformance]",
        checks: "affinity switched on and off on a NodePort Service (the lab's cluster DNS)",
    },
    ListedSpec {
        name: "[sig-network] Services should create endpoints for unready pods",
        checks: "a Service publishing not-ready addresses reaches its unready pod by the Service's name (the lab's cluster DNS), each pod first through the API server's proxy",
    },
    ListedSpec {
        name: "[sig-scheduling] SchedulerPredicates [Serial] validates that there is no conflict between pods with same hostPort but different hostIP and protocol [Conformance]",
        checks: "three pods on one node share hostPort 54321 (127.0.0.1/TCP, node IP/TCP, node IP/UDP), each reached from a hostNetwork pod on that node: mycni's HOST_PORTS, no portmap in the conflist or on the node",
    },
    ListedSpec {
        name: "[sig-network] Networking Granular Checks: Services should function for service endpoints using hostNetwork",
        checks: "hostNetwork backends on both nodes (each answers with its node's name) through a ClusterIP and a NodePort, from a hostNetwork pod, over HTTP and UDP, large requests too",
    },
    ListedSpec {
        name: "[sig-network] Services should be able to up and down services",
        checks: "three Services of 3 serve-hostname pods: every backend answers through its ClusterIP from a pod and a hostNetwork pod; a deleted Service stops answering, the others keep going",
    },
    ListedSpec {
        name: "[sig-network] Services should implement service.kubernetes.io/service-proxy-name",
        checks: "a Service labelled for another proxy is not balanced; adding the label stops a working one, removing it brings it back",
    },
    ListedSpec {
        name: "[sig-network] Services should implement service.kubernetes.io/headless",
        checks: "the same with the `service.kubernetes.io/headless` label",
    },
];

pub const EBPF_AREAS: &[&str] = &[
    "[sig-network] Services ",
    "[sig-network] Networking Granular Checks: Services ",
];

pub const EBPF_NOT_RUN: &[NotRun] = &[
    NotRun {
        name_contains: "[Feature:SCTPConnectivity]",
        why: Why::CannotRunHere,
        reason: "[Disruptive]: an SCTP socket in a pod loads the sctp module into the machine's \
                 kernel, a host change the lab does not make",
    },
    NotRun {
        name_contains: "oad balancer",
        why: Why::CannotRunHere,
        reason: "LoadBalancer: needs a cloud provider",
    },
    NotRun {
        name_contains: "LoadBalancer service",
        why: Why::CannotRunHere,
        reason: "LoadBalancer: needs a cloud provider",
    },
    NotRun {
        name_contains: "loadbalancer source ranges",
        why: Why::CannotRunHere,
        reason: "LoadBalancer: needs a cloud provider",
    },
    NotRun {
        name_contains: "should reconcile LB health check interval",
        why: Why::CannotRunHere,
        reason: "LoadBalancer: needs the GCE cloud provider",
    },
    NotRun {
        name_contains: "should be able to change the type and ports of a service",
        why: Why::CannotRunHere,
        reason: "turns the Services into LoadBalancers: needs a cloud provider",
    },
    NotRun {
        name_contains: "should work after restarting kube-proxy [Disruptive]",
        why: Why::CannotRunHere,
        reason: "[Disruptive]: restarts kube-proxy over SSH; the lab runs no kube-proxy and the \
                 skeleton provider has no SSH to the nodes",
    },
    NotRun {
        name_contains: "should work after restarting apiserver [Disruptive]",
        why: Why::CannotRunHere,
        reason: "[Disruptive]: restarts the API server over SSH to the master; the skeleton \
                 provider has none",
    },
    NotRun {
        name_contains: "Granular Checks: Services should function for pod-Service(hostNetwork)",
        why: Why::CannotRunHere,
        reason: "skips itself everywhere (`e2eskipper.Skipf`: pods cannot reach a hostNetwork \
                 endpoint on their own node over UDP, kubernetes#95565)",
    },
];

/// The run with kube-proxy absent: [`EBPF_LISTED`], [`EBPF_AREAS`], [`EBPF_NOT_RUN`].
pub const EBPF_SERVICES: Suite = Suite {
    services_by: "mycni's socket load balancing (eBPF), kube-proxy absent",
    listed: EBPF_LISTED,
    areas: EBPF_AREAS,
    not_run: EBPF_NOT_RUN,
};

/// The NetworkPolicy specs, run with kube-proxy (iptables) on every node, as
/// [`KUBE_PROXY`]: every spec's client reaches its server through the server's ClusterIP
/// (`/agnhost connect <ClusterIP>:<port>`, five tries of 8 s), so the policy is enforced on
/// the flow kube-proxy translated (ingress after the stack's DNAT, egress at the client's
/// `from_pod` before it). In an order that balances `POLICY_SHARDS` (8) round-robin shards
/// by the specs' measured times (one spec takes 220 s, most 60-120 s: each "cannot
/// connect" waits out five tries).
pub const POLICY_LISTED: &[ListedSpec] = &[
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce updated policy [Feature:NetworkPolicy]",
        checks: "an updated policy replaces the old rules",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector [Feature:NetworkPolicy]",
        checks: "one pod of another namespace admitted, its neighbours not",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should support a 'default-deny-all' policy [Feature:NetworkPolicy]",
        checks: "ingress and egress default-deny: no client gets out, no server lets in",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should allow ingress access from updated pod [Feature:NetworkPolicy]",
        checks: "a client's label change admits it",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should stop enforcing policies after they are deleted [Feature:NetworkPolicy]",
        checks: "a deleted policy no longer isolates its pods",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policy based on PodSelector and NamespaceSelector [Feature:NetworkPolicy]",
        checks: "podSelector and namespaceSelector in one peer are an intersection",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policy to allow traffic from pods within server namespace based on PodSelector [Feature:NetworkPolicy]",
        checks: "a podSelector peer admits only the named pod of the server's namespace",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should work with Ingress,Egress specified together [Feature:NetworkPolicy]",
        checks: "policyTypes Ingress and Egress in one policy",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policy based on PodSelector or NamespaceSelector [Feature:NetworkPolicy]",
        checks: "two peers of one rule are a union",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should allow egress access on one named port [Feature:NetworkPolicy]",
        checks: "a named egress port resolves to the peer pods' container port",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce except clause while egress access to server in CIDR block [Feature:NetworkPolicy]",
        checks: "egress ipBlock whose except holds the server",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should allow egress access to server in CIDR block [Feature:NetworkPolicy]",
        checks: "egress ipBlock with a pod's /32",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policy based on PodSelector with MatchExpressions[Feature:NetworkPolicy]",
        checks: "a podSelector with matchExpressions (In)",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce multiple egress policies with egress allow-all policy taking precedence [Feature:NetworkPolicy]",
        checks: "an allow-all egress policy beside a narrower one",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector [Feature:NetworkPolicy]",
        checks: "an egress deny on one pod leaves its ingress open, and the reverse",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector [Feature:NetworkPolicy]",
        checks: "egress to pods selected by namespace and pod labels, through their ClusterIP",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce multiple, stacked policies with overlapping podSelectors [Feature:NetworkPolicy]",
        checks: "two policies on one pod are their union (ports 80 and 81)",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should not allow access by TCP when a policy specifies only SCTP [Feature:NetworkPolicy] [Feature:SCTP]",
        checks: "an SCTP-only rule admits no TCP (no SCTP socket is opened; its check that the \
                 sctp module stayed unloaded cannot look: the image has no nsenter, logged)",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector [Feature:NetworkPolicy]",
        checks: "a namespaceSelector peer admits the other namespace's pods only",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should allow ingress access on one named port [Feature:NetworkPolicy]",
        checks: "a named ingress port resolves to the server's container port",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policy based on Ports [Feature:NetworkPolicy]",
        checks: "a numeric port admits that port only",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should allow ingress access from namespace on one named port [Feature:NetworkPolicy]",
        checks: "a namespaceSelector peer with a named port",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed [Feature:NetworkPolicy]",
        checks: "an address excepted by one block and allowed by another is allowed",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should allow ingress access from updated namespace [Feature:NetworkPolicy]",
        checks: "a namespace label change admits its pods",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy API should support creating NetworkPolicy API operations",
        checks: "create, get, list, watch, patch, update and delete NetworkPolicies (API only)",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should support allow-all policy [Feature:NetworkPolicy]",
        checks: "an empty ingress rule allows every peer and port",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should support a 'default-deny-ingress' policy [Feature:NetworkPolicy]",
        checks: "an empty podSelector with no ingress rule isolates the server",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce multiple ingress policies with ingress allow-all policy taking precedence [Feature:NetworkPolicy]",
        checks: "an allow-all ingress policy beside a narrower one",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should enforce policy based on NamespaceSelector with MatchExpressions[Feature:NetworkPolicy]",
        checks: "a namespaceSelector with matchExpressions (In)",
    },
    ListedSpec {
        name: "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should deny ingress access to updated pod [Feature:NetworkPolicy]",
        checks: "a server's label change puts it under a deny policy",
    },
];

pub const POLICY_AREAS: &[&str] = &["[sig-network] NetworkPolicy "];

pub const POLICY_NOT_RUN: &[NotRun] = &[NotRun {
    name_contains: "[Feature:SCTPConnectivity]",
    why: Why::CannotRunHere,
    reason: "[Disruptive]: the server listens on SCTP, which loads the sctp module into the \
             machine's kernel, a host change the lab does not make; an SCTP-only rule is \
             checked without an SCTP socket by the TCP-under-an-SCTP-rule spec",
}];

/// The NetworkPolicy run: [`POLICY_LISTED`], [`POLICY_AREAS`], [`POLICY_NOT_RUN`].
pub const NETWORK_POLICY: Suite = Suite {
    services_by: "kube-proxy (iptables), NetworkPolicy by mycni (eBPF)",
    listed: POLICY_LISTED,
    areas: POLICY_AREAS,
    not_run: POLICY_NOT_RUN,
};

/// `text` as an RE2 literal (ginkgo's focus is a Go regular expression).
pub fn regex_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// ginkgo v1 matches its focus against "<suite> [Top Level] <full name>": after "[Top Level] ",
/// a name starts.
const TOP_LEVEL: &str = "\\[Top Level\\] ";

/// One conformance run: the specs it runs, the areas it accounts for, and why each other spec
/// of those areas is not run.
#[derive(Debug)]
pub struct Suite {
    /// How the lab balances Services in this run, for the summary's title.
    pub services_by: &'static str,
    pub listed: &'static [ListedSpec],
    /// Spec-name prefixes whose every spec is accounted for: run, or not run with a reason.
    pub areas: &'static [&'static str],
    /// The first entry whose text a spec's name contains gives its reason.
    pub not_run: &'static [NotRun],
}

/// The run with kube-proxy (iptables) on every node: [`LISTED`], [`AREAS`], [`NOT_RUN`].
pub const KUBE_PROXY: Suite = Suite {
    services_by: "kube-proxy (iptables)",
    listed: LISTED,
    areas: AREAS,
    not_run: NOT_RUN,
};

impl Suite {
    /// A focus matching exactly the listed specs.
    pub fn focus_listed(&self) -> String {
        self.focus_of(self.listed.iter())
    }

    /// A focus matching the listed specs `shard`, `shard + shards`, `shard + 2 × shards` ...:
    /// `shards` e2e.test processes with shards `0..shards` run each listed spec once. `None`
    /// when this shard has no spec (a focus matching nothing would run the whole suite's
    /// skips, not nothing).
    pub fn focus_shard(&self, shard: usize, shards: usize) -> Option<String> {
        let specs = self.shard_specs(shard, shards);
        (!specs.is_empty()).then(|| self.focus_of(specs.into_iter()))
    }

    /// The listed specs of shard `shard` of `shards` (what [`Suite::focus_shard`] selects).
    pub fn shard_specs(&self, shard: usize, shards: usize) -> Vec<&'static ListedSpec> {
        self.listed
            .iter()
            .skip(shard)
            .step_by(shards.max(1))
            .collect()
    }

    /// What shard `shard` of `shards` reports about its own specs: every e2e.test report
    /// also lists the specs outside its focus, as skipped, including the ones another shard
    /// ran. Keeps the shard's listed specs and every spec that is not listed (a failed
    /// BeforeSuite, say).
    pub fn shard_results(
        &self,
        shard: usize,
        shards: usize,
        results: Vec<SpecResult>,
    ) -> Vec<SpecResult> {
        let own = self.shard_specs(shard, shards);
        results
            .into_iter()
            .filter(|r| {
                own.iter().any(|spec| spec.name == r.name)
                    || !self.listed.iter().any(|spec| spec.name == r.name)
            })
            .collect()
    }

    fn focus_of<'a>(&self, specs: impl Iterator<Item = &'a ListedSpec>) -> String {
        specs
            .map(|spec| format!("{TOP_LEVEL}{}$", regex_literal(spec.name)))
            .collect::<Vec<_>>()
            .join("|")
    }

    /// A focus matching every spec of the areas and the listed specs (for the dry run).
    pub fn focus_areas(&self) -> String {
        let areas = self
            .areas
            .iter()
            .map(|area| format!("{TOP_LEVEL}{}", regex_literal(area)));
        let listed = self
            .listed
            .iter()
            .map(|spec| format!("{TOP_LEVEL}{}$", regex_literal(spec.name)));
        areas.chain(listed).collect::<Vec<_>>().join("|")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Passed,
    /// With the failure's message (code location, message, location).
    Failed(String),
    /// Skipped: not selected by the focus, or skipped by the spec itself at run time.
    Skipped,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpecResult {
    pub name: String,
    pub outcome: Outcome,
    pub seconds: f64,
}

/// The test cases of a ginkgo v1 JUnit report (`<testcase name=.. time=..>` holding
/// `<failure>` or `<skipped>`, or nothing when it passed). A failed BeforeSuite appears
/// as a test case of that name.
pub fn parse_junit(xml: &str) -> Result<Vec<SpecResult>, ConformanceError> {
    let document = roxmltree::Document::parse(xml)?;
    let mut results = Vec::new();
    for case in document
        .descendants()
        .filter(|node| node.has_tag_name("testcase"))
    {
        let name = case.attribute("name").unwrap_or_default().to_string();
        let seconds = case
            .attribute("time")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0.0);
        let failure = case
            .children()
            .find(|child| child.has_tag_name("failure") || child.has_tag_name("error"));
        let outcome = if let Some(failure) = failure {
            let text = failure.text().unwrap_or_default().trim();
            let message = if text.is_empty() {
                failure.attribute("message").unwrap_or_default()
            } else {
                text
            };
            Outcome::Failed(message.to_string())
        } else if case.children().any(|child| child.has_tag_name("skipped")) {
            Outcome::Skipped
        } else {
            Outcome::Passed
        };
        results.push(SpecResult {
            name,
            outcome,
            seconds,
        });
    }
    Ok(results)
}

/// Every spec of the covered areas that is not run, with why.
#[derive(Debug)]
pub struct Plan {
    pub not_run: Vec<(String, &'static NotRun)>,
}

/// From a dry run's report (the specs the focus of [`focus_areas`] selected pass, all others
/// are skipped): checks that each listed spec exists once, and gives every other selected
/// spec its [`NOT_RUN`] reason; a spec without one is an error.
pub fn plan(suite: &'static Suite, dry_run: &[SpecResult]) -> Result<Plan, ConformanceError> {
    let selected: Vec<&str> = dry_run
        .iter()
        .filter(|r| r.outcome == Outcome::Passed)
        .map(|r| r.name.as_str())
        .collect();
    let not_found: Vec<String> = suite
        .listed
        .iter()
        .filter(|spec| selected.iter().filter(|name| **name == spec.name).count() != 1)
        .map(|spec| spec.name.to_string())
        .collect();
    if !not_found.is_empty() {
        return Err(ConformanceError::ListedNotFound(not_found));
    }
    let mut not_run = Vec::new();
    let mut unaccounted = Vec::new();
    for name in selected {
        if suite.listed.iter().any(|spec| spec.name == name) {
            continue;
        }
        match suite
            .not_run
            .iter()
            .find(|n| name.contains(n.name_contains))
        {
            Some(reason) => not_run.push((name.to_string(), reason)),
            None => unaccounted.push(name.to_string()),
        }
    }
    if !unaccounted.is_empty() {
        return Err(ConformanceError::Unaccounted(unaccounted));
    }
    not_run.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Plan { not_run })
}

/// What became of a listed spec in the run.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Passed,
    Failed(String),
    /// The spec skipped itself (the log says why): a listed spec must run, so this fails.
    SkippedAtRunTime,
    /// No test case in the report: e2e.test ended before reporting it.
    NoResult,
}

#[derive(Debug)]
pub struct Report {
    /// The suite's [`Suite::services_by`].
    pub services_by: &'static str,
    pub listed: Vec<(&'static ListedSpec, Verdict, f64)>,
    /// Failed test cases that are no listed spec (a failed BeforeSuite, say).
    pub suite_failures: Vec<(String, String)>,
    pub not_run: Vec<(String, &'static NotRun)>,
}

/// The verdict on every listed spec from the run's report.
pub fn report(suite: &'static Suite, plan: Plan, run: &[SpecResult]) -> Report {
    let listed = suite
        .listed
        .iter()
        .map(|spec| match run.iter().find(|r| r.name == spec.name) {
            Some(r) => {
                let verdict = match &r.outcome {
                    Outcome::Passed => Verdict::Passed,
                    Outcome::Failed(message) => Verdict::Failed(message.clone()),
                    Outcome::Skipped => Verdict::SkippedAtRunTime,
                };
                (spec, verdict, r.seconds)
            }
            None => (spec, Verdict::NoResult, 0.0),
        })
        .collect();
    let suite_failures = run
        .iter()
        .filter(|r| !suite.listed.iter().any(|spec| spec.name == r.name))
        .filter_map(|r| match &r.outcome {
            Outcome::Failed(message) => Some((r.name.clone(), message.clone())),
            _ => None,
        })
        .collect();
    Report {
        services_by: suite.services_by,
        listed,
        suite_failures,
        not_run: plan.not_run,
    }
}

impl Report {
    fn count(&self, f: impl Fn(&Verdict) -> bool) -> usize {
        self.listed.iter().filter(|(_, v, _)| f(v)).count()
    }

    pub fn passed(&self) -> usize {
        self.count(|v| *v == Verdict::Passed)
    }

    /// Failed, or without a result.
    pub fn failed(&self) -> usize {
        self.count(|v| matches!(v, Verdict::Failed(_) | Verdict::NoResult))
    }

    pub fn skipped_at_run_time(&self) -> usize {
        self.count(|v| *v == Verdict::SkippedAtRunTime)
    }

    pub fn not_run(&self, why: Why) -> usize {
        self.not_run.iter().filter(|(_, n)| n.why == why).count()
    }

    /// Every listed spec passed and the suite itself did not fail.
    pub fn ok(&self) -> bool {
        self.passed() == self.listed.len() && self.suite_failures.is_empty()
    }

    /// One line: the counts.
    pub fn counts(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped at run time; not run: {} that cannot run here, {} not listed yet",
            self.passed(),
            self.failed(),
            self.skipped_at_run_time(),
            self.not_run(Why::CannotRunHere),
            self.not_run(Why::NotListedYet),
        )
    }

    /// The summary in markdown: counts, each listed spec's verdict, each spec not run with
    /// its reason. `version` names the suite (e.g. "v1.20.2"); `took` is the run's time.
    pub fn markdown(&self, version: &str, took: Duration) -> String {
        let mut out = format!(
            "# Upstream conformance: Kubernetes {version} `e2e.test` against mycni, Services by {}\n\n\
             {} (run took {} s).\n\n## Run\n\n| Spec | Checks | Result | Time |\n|---|---|---|---|\n",
            self.services_by,
            self.counts(),
            took.as_secs()
        );
        for (spec, verdict, seconds) in &self.listed {
            let result = match verdict {
                Verdict::Passed => "passed".to_string(),
                Verdict::Failed(message) => format!("**failed**: {}", one_line(message)),
                Verdict::SkippedAtRunTime => {
                    "**skipped at run time** (see e2e.log; a listed spec must run)".to_string()
                }
                Verdict::NoResult => {
                    "**no result** (e2e.test ended before it; see e2e.log)".to_string()
                }
            };
            out.push_str(&format!(
                "| {} | {} | {result} | {seconds:.0} s |\n",
                cell(spec.name),
                spec.checks
            ));
        }
        if !self.suite_failures.is_empty() {
            out.push_str("\n## Suite failures\n\n");
            for (name, message) in &self.suite_failures {
                out.push_str(&format!("- {}: {}\n", cell(name), one_line(message)));
            }
        }
        for (why, title) in [
            (Why::CannotRunHere, "Not run: cannot run on these machines"),
            (Why::NotListedYet, "Not run: not in the list yet"),
        ] {
            out.push_str(&format!("\n## {title}\n\n| Spec | Reason |\n|---|---|\n"));
            for (name, reason) in self.not_run.iter().filter(|(_, n)| n.why == why) {
                out.push_str(&format!("| {} | {} |\n", cell(name), reason.reason));
            }
        }
        out
    }
}

/// A failure message on one line without ginkgo's code locations (`/path/x.go:629` lines),
/// shortened for a table cell.
fn one_line(message: &str) -> String {
    let joined = message
        .lines()
        .filter(|line| !is_code_location(line.trim()))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ");
    let short: String = joined.chars().take(300).collect();
    cell(&short)
}

/// `/go/src/k8s.io/kubernetes/test/e2e/framework/framework.go:629`.
fn is_code_location(line: &str) -> bool {
    line.starts_with('/')
        && !line.contains(' ')
        && line
            .rsplit_once(".go:")
            .is_some_and(|(_, n)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Text safe in a markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, outcome: Outcome) -> SpecResult {
        SpecResult {
            name: name.to_string(),
            outcome,
            seconds: 1.0,
        }
    }

    const JUNIT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuite name="Kubernetes e2e suite" tests="3" failures="1" errors="0" time="42.1">
  <testcase name="[sig-network] A passes" classname="Kubernetes e2e suite" time="12.5"></testcase>
  <testcase name="[sig-network] B fails" classname="Kubernetes e2e suite" time="3">
    <failure type="Failure">/go/src/x.go:10
failed dialing endpoint
/go/src/x.go:20</failure>
  </testcase>
  <testcase name="[sig-apps] C not focused" classname="Kubernetes e2e suite" time="0">
    <skipped></skipped>
  </testcase>
</testsuite>"#;

    #[test]
    fn a_junit_report_gives_each_case_its_outcome() -> Result<(), ConformanceError> {
        let results = parse_junit(JUNIT)?;
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].outcome, Outcome::Passed);
        assert_eq!(results[0].seconds, 12.5);
        match &results[1].outcome {
            Outcome::Failed(message) => assert!(message.contains("failed dialing endpoint")),
            other => panic!("B: {other:?}"),
        }
        assert_eq!(results[2].outcome, Outcome::Skipped);
        assert!(parse_junit("<testsuite").is_err());
        Ok(())
    }

    #[test]
    fn regex_literals_escape_the_brackets_of_spec_tags() {
        assert_eq!(
            regex_literal("[sig-network] a: b (c) [Conformance]"),
            "\\[sig-network\\] a: b \\(c\\) \\[Conformance\\]"
        );
        let focus = KUBE_PROXY.focus_listed();
        assert_eq!(focus.split('|').count(), LISTED.len());
        assert!(focus.starts_with("\\[Top Level\\] \\[sig-network\\] Networking Granular"));
        assert!(focus.ends_with("\\[Conformance\\]$"));
        assert!(KUBE_PROXY
            .focus_areas()
            .contains("|\\[Top Level\\] \\[sig-network\\] NoSNAT |"));
    }

    /// A dry run that selected every listed spec plus `others`.
    fn dry_run(others: &[&str]) -> Vec<SpecResult> {
        let mut run: Vec<SpecResult> = LISTED
            .iter()
            .map(|spec| result(spec.name, Outcome::Passed))
            .collect();
        run.extend(others.iter().map(|name| result(name, Outcome::Passed)));
        run.push(result("[sig-apps] not in the focus", Outcome::Skipped));
        run
    }

    #[test]
    fn every_spec_of_the_areas_is_run_or_has_a_reason() -> Result<(), ConformanceError> {
        let internet = "[sig-network] Networking should provide Internet connection for containers [Feature:Networking-IPv4]";
        let dns = "[sig-network] DNS configMap nameserver Forward PTR lookup should forward PTR records lookup to upstream nameserver [Slow][Serial]";
        let plan = plan(&KUBE_PROXY, &dry_run(&[internet, dns]))?;
        let reasons: Vec<(&str, Why)> = plan
            .not_run
            .iter()
            .map(|(name, n)| (name.as_str(), n.why))
            .collect();
        assert_eq!(
            reasons,
            [(dns, Why::CannotRunHere), (internet, Why::CannotRunHere)]
        );
        Ok(())
    }

    #[test]
    fn a_spec_without_a_reason_fails_the_plan() {
        let unknown = "[sig-network] Networking should do something new";
        match plan(&KUBE_PROXY, &dry_run(&[unknown])) {
            Err(ConformanceError::Unaccounted(names)) => assert_eq!(names, [unknown]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_listed_spec_missing_from_the_suite_fails_the_plan() {
        let mut run = dry_run(&[]);
        run.remove(0);
        match plan(&KUBE_PROXY, &run) {
            Err(ConformanceError::ListedNotFound(names)) => assert_eq!(names, [LISTED[0].name]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_report_counts_failures_runtime_skips_and_missing_results() -> Result<(), ConformanceError>
    {
        let plan = plan(
            &KUBE_PROXY,
            &dry_run(&["[sig-network] Networking IPerf IPv4 [Experimental] should transfer"]),
        )?;
        let mut run: Vec<SpecResult> = LISTED
            .iter()
            .skip(3)
            .map(|spec| result(spec.name, Outcome::Passed))
            .collect();
        run.push(result(
            LISTED[0].name,
            Outcome::Failed("/go/src/framework.go:629\nno | route\n/go/src/runner.go:113".into()),
        ));
        run.push(result(LISTED[1].name, Outcome::Skipped));
        run.push(result(
            "BeforeSuite",
            Outcome::Failed("nodes not Ready".into()),
        ));
        let report = report(&KUBE_PROXY, plan, &run);
        assert_eq!(report.passed(), LISTED.len() - 3);
        assert_eq!(report.failed(), 2, "one failed, one without a result");
        assert_eq!(report.skipped_at_run_time(), 1);
        assert_eq!(report.not_run(Why::CannotRunHere), 1);
        assert!(!report.ok());
        let markdown = report.markdown("v1.20.2", Duration::from_secs(90));
        assert!(
            markdown.contains("**failed**: no \\| route |"),
            "the message without code locations:\n{markdown}"
        );
        assert!(markdown.contains("**skipped at run time**"));
        assert!(markdown.contains("**no result**"));
        assert!(markdown.contains("BeforeSuite: nodes not Ready"));
        assert!(markdown.contains("| [sig-network] Networking IPerf IPv4 [Experimental] should transfer | a throughput benchmark"));
        Ok(())
    }

    #[test]
    fn a_report_of_passes_is_ok() -> Result<(), ConformanceError> {
        let plan = plan(&KUBE_PROXY, &dry_run(&[]))?;
        let run: Vec<SpecResult> = LISTED
            .iter()
            .map(|spec| result(spec.name, Outcome::Passed))
            .collect();
        let report = report(&KUBE_PROXY, plan, &run);
        assert!(report.ok());
        assert_eq!(report.counts(), format!("{} passed, 0 failed, 0 skipped at run time; not run: 0 that cannot run here, 0 not listed yet", LISTED.len()));
        Ok(())
    }

    #[test]
    fn shards_run_every_listed_spec_once() {
        for suite in [&EBPF_SERVICES, &NETWORK_POLICY] {
            let listed = suite.listed;
            for shards in 1..=listed.len() + 1 {
                let mut seen: Vec<&str> = Vec::new();
                for shard in 0..shards {
                    let Some(focus) = suite.focus_shard(shard, shards) else {
                        assert!(shard >= listed.len(), "shard {shard} of {shards} is empty");
                        continue;
                    };
                    for spec in listed {
                        let pattern = format!("{TOP_LEVEL}{}$", regex_literal(spec.name));
                        if focus.split('|').any(|part| part == pattern) {
                            seen.push(spec.name);
                        }
                    }
                }
                seen.sort_unstable();
                let mut all: Vec<&str> = listed.iter().map(|spec| spec.name).collect();
                all.sort_unstable();
                assert_eq!(seen, all, "{shards} shards");
            }
        }
    }

    #[test]
    fn the_policy_suite_runs_every_spec_but_sctp_connectivity() -> Result<(), ConformanceError> {
        let sctp = "[sig-network] NetworkPolicy [Feature:SCTPConnectivity][LinuxOnly][Disruptive] NetworkPolicy between server and client using SCTP should support a 'default-deny' policy [Feature:NetworkPolicy]";
        let mut run: Vec<SpecResult> = POLICY_LISTED
            .iter()
            .map(|spec| result(spec.name, Outcome::Passed))
            .collect();
        run.push(result(sctp, Outcome::Passed));
        run.push(result(
            "[sig-network] Networking should provide Internet connection for containers [Feature:Networking-IPv4]",
            Outcome::Skipped,
        ));
        let plan = plan(&NETWORK_POLICY, &run)?;
        assert_eq!(plan.not_run.len(), 1);
        assert_eq!(plan.not_run[0].0, sctp);
        assert_eq!(plan.not_run[0].1.why, Why::CannotRunHere);
        // The focus selects the whole area, the API spec included.
        let focus = NETWORK_POLICY.focus_areas();
        assert!(focus.starts_with("\\[Top Level\\] \\[sig-network\\] NetworkPolicy "));
        assert!(POLICY_LISTED
            .iter()
            .all(|spec| spec.name.starts_with(POLICY_AREAS[0])));
        let unknown = "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should do something new [Feature:NetworkPolicy]";
        run.push(result(unknown, Outcome::Passed));
        match super::plan(&NETWORK_POLICY, &run) {
            Err(ConformanceError::Unaccounted(names)) => assert_eq!(names, [unknown]),
            other => panic!("{other:?}"),
        }
        Ok(())
    }

    #[test]
    fn the_services_suite_accounts_for_load_balancers_and_sctp() -> Result<(), ConformanceError> {
        let load_balancer =
            "[sig-network] Services should be able to create an internal type load balancer [Slow]";
        let sctp = "[sig-network] Networking Granular Checks: Services should function for node-Service: sctp [Feature:SCTPConnectivity][Disruptive]";
        let unknown = "[sig-network] Services should do something new";
        let mut run: Vec<SpecResult> = EBPF_LISTED
            .iter()
            .map(|spec| result(spec.name, Outcome::Passed))
            .collect();
        // A LoadBalancer spec that also names session affinity gets the LoadBalancer reason
        // (the NodePort and ClusterIP ones run, with the lab's cluster DNS).
        let affinity_lb = "[sig-network] Services should have session affinity work for LoadBalancer service with ESIPP on [Slow] [DisabledForLargeClusters] [LinuxOnly]";
        let affinity = "[sig-network] Services should have session affinity work for NodePort service [LinuxOnly] [Conformance]";
        assert!(EBPF_LISTED.iter().any(|spec| spec.name == affinity));
        run.extend([load_balancer, sctp, affinity_lb].map(|name| result(name, Outcome::Passed)));
        let plan = plan(&EBPF_SERVICES, &run)?;
        let reasons: Vec<(&str, &str)> = plan
            .not_run
            .iter()
            .map(|(name, n)| (name.as_str(), n.reason))
            .collect();
        assert_eq!(reasons.len(), 3);
        assert!(plan
            .not_run
            .iter()
            .all(|(_, n)| n.why == Why::CannotRunHere));
        for (name, reason) in reasons {
            let wanted = if name == sctp { "sctp" } else { "LoadBalancer" };
            assert!(reason.contains(wanted), "{name}: {reason}");
        }
        run.push(result(unknown, Outcome::Passed));
        match super::plan(&EBPF_SERVICES, &run) {
            Err(ConformanceError::Unaccounted(names)) => assert_eq!(names, [unknown]),
            other => panic!("{other:?}"),
        }
        let report = report(&EBPF_SERVICES, plan, &run);
        assert!(report.ok());
        assert!(report
            .markdown("v1.20.2", Duration::from_secs(1))
            .contains("Services by mycni's socket load balancing"));
        Ok(())
    }

    #[test]
    fn merged_shard_reports_keep_each_spec_from_the_shard_that_ran_it() {
        let shards = 2;
        let shard_report = |shard: usize| -> Vec<SpecResult> {
            let own = EBPF_SERVICES.shard_specs(shard, shards);
            let mut report: Vec<SpecResult> = EBPF_LISTED
                .iter()
                .map(|spec| {
                    if own.iter().any(|o| o.name == spec.name) {
                        result(spec.name, Outcome::Passed)
                    } else {
                        result(spec.name, Outcome::Skipped)
                    }
                })
                .collect();
            if shard == 1 {
                report.push(result("BeforeSuite", Outcome::Failed("nodes".into())));
            }
            report
        };
        let mut merged = Vec::new();
        for shard in 0..shards {
            merged.extend(EBPF_SERVICES.shard_results(shard, shards, shard_report(shard)));
        }
        let plan = Plan {
            not_run: Vec::new(),
        };
        let report = report(&EBPF_SERVICES, plan, &merged);
        assert_eq!(report.passed(), EBPF_LISTED.len());
        assert_eq!(report.skipped_at_run_time(), 0);
        assert_eq!(report.suite_failures.len(), 1);
    }
}
