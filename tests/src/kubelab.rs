//! A real Kubernetes in network namespaces: etcd, kube-apiserver, kube-controller-manager
//! (allocating node pod CIDRs) and kube-scheduler in a control-plane namespace, and per node
//! a namespace running containerd, kubelet and kube-proxy (iptables mode; or none, with
//! [`LabOptions`], for a CNI that balances Services itself), all on one
//! bridge, as kubeadm builds a node: `net.ipv4.ip_forward=1`, a default route (to an outside
//! host with an HTTP server on an address beyond the lab's subnet and no route to pods).
//!
//! The control-plane namespace also runs the lab's cluster DNS (src/bin/lab-dns.rs) on port
//! 53 of its address, behind the `kube-system/kube-dns` Service at [`CLUSTER_DNS_IP`] (no
//! selector, an Endpoints object naming it), and kubelets point pods at that Service, as a
//! kubeadm cluster's CoreDNS is reached.
//!
//! ```text
//!  control 192.168.1.2 ─┐
//!  node-1 192.168.1.11 ─┼─ fabric (br0) ─ outside 192.168.1.1 (the nodes' default route),
//!  node-2 192.168.1.12 ─┘                 HTTP on 203.0.113.10:80
//! ```
//!
//! The bridge's subnet is a /16 and the cluster CIDR a /11, so Node objects without a
//! kubelet (the scale step of tests/tests/kubernetes.rs adds 5,000) can take addresses on
//! the nodes' subnet and pod CIDRs the controller manager accepts.
//!
//! kube-proxy runs with its own client certificate (`system:kube-proxy`, which the default
//! `system:node-proxier` binding covers), `--conntrack-max-per-core=0` (the conntrack table
//! size and hash size are the machine's, not the node's), and its default TCP timeouts, which
//! it writes to the node namespace's own `/proc/sys/net/netfilter`. The API server advertises
//! its address on the bridge, so the `kubernetes` Service's endpoint is reachable from the
//! nodes and their pods.
//!
//! Each node's containerd, kubelet and kube-proxy share a private mount namespace (`unshare
//! --mount --uts --propagation slave` inside the node's network namespace; the node's name is
//! the hostname of that UTS namespace, never the machine's) in which the paths a real node
//! would use are the node's own: tmpfs on /var/lib, /var/log, /run/netns and
//! /run/containerd, a bpffs on /sys/fs/bpf, per-node directories bound on /opt/cni/bin and
//! /etc/cni/net.d, and files bound over the three sysctls kubelet insists on writing
//! (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops), already holding the values it
//! wants. So the DaemonSet in deploy/ runs unchanged, and nothing reaches the machine's own
//! files, sysctls or network. Pod cgroups live under a per-test `--cgroup-root`.
//!
//! Binaries come from `cargo xtask k8s` (cached under /var/cache/mycni/k8s), as do the
//! pause and busybox images; the mycni image is built from the binaries under test.
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{run, Netns};

/// 8,192 /24s (a /12 holds 4,096, fewer than 5,002 nodes): room for the scale step's Nodes.
/// The controller manager allocates from its start (10.224.0.0/24 for the first node).
pub const CLUSTER_CIDR: &str = "10.224.0.0/11";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The prefix length of every address on the bridge: 192.168.0.0/16 is one segment.
pub const FABRIC_PREFIX_LEN: u8 = 16;
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
/// The `kubernetes` Service: the first address of the service CIDR.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The cluster DNS: the `kube-system/kube-dns` Service (kubeadm's address for it), whose
/// one endpoint is the lab's own DNS server (src/bin/lab-dns.rs) in the control-plane
/// namespace, on port 53 of [`CONTROL_IP`]; kubelet's `--cluster-dns`.
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// kubelet's `--cluster-domain`, and e2e.test's default.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The outside host's address on the bridge: the nodes' default gateway.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
/// Where the outside host serves HTTP (`outside` as the body): beyond the lab's subnet.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const OUTSIDE_HTTP_PORT: u16 = 80;
/// kube-proxy's healthz port, on each node's IP.
pub const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;
pub const NODES: [(&str, Ipv4Addr); 2] = [
    ("node-1", Ipv4Addr::new(192, 168, 1, 11)),
    ("node-2", Ipv4Addr::new(192, 168, 1, 12)),
];
const V1_HIERARCHIES: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
];
/// Where pod cgroups appear: the v1 hierarchies kubelet manages, and the v2 one (runc
/// creates the same paths under /sys/fs/cgroup/unified on hybrid hosts).
const CGROUP_TREES: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
    "unified",
];

/// The cache `cargo xtask k8s` fills.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MYCNI_K8S_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/mycni/k8s"))
}

/// The Kubernetes binaries, or an error saying how to get them.
pub fn k8s_bin_dir() -> Result<PathBuf> {
    let cache = cache_dir();
    let version = std::fs::read_to_string(cache.join("current")).with_context(|| {
        format!(
            "no Kubernetes build in {}: run `cargo xtask k8s` (cargo xtask test does)",
            cache.display()
        )
    })?;
    let bin = cache.join(version.trim()).join("bin");
    if !bin.join("kube-proxy").is_file() {
        bail!(
            "{} has no kube-proxy (a cache from before the lab ran it): run `cargo xtask k8s`",
            bin.display()
        );
    }
    Ok(bin)
}

/// The image archive named by `variable`, else `target/image/<default_name>`: `cargo xtask
/// test` builds both mycni images (see xtask/src/test.rs).
pub fn image_archive(variable: &str, default_name: &str) -> Result<PathBuf> {
    let image = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/image")
                .join(default_name)
        });
    if !image.is_file() {
        bail!(
            "{} is missing: run the suite with `cargo xtask test`, which builds it",
            image.display()
        );
    }
    Ok(image)
}

/// Upstream's conformance suite and the images its specs run (agnhost, pause 3.2,
/// jessie-dnsutils), from the
/// cache `cargo xtask k8s` fills.
pub fn conformance_inputs() -> Result<(PathBuf, Vec<PathBuf>)> {
    let e2e = k8s_bin_dir()?.join("e2e.test");
    let images = cache_dir().join("images");
    let archives = vec![
        images.join("agnhost.oci.tar"),
        images.join("e2e-pause.oci.tar"),
        images.join("jessie-dnsutils.oci.tar"),
    ];
    for file in std::iter::once(&e2e).chain(&archives) {
        if !file.is_file() {
            bail!(
                "{} is missing (a cache from before the conformance run): run `cargo xtask k8s`",
                file.display()
            );
        }
    }
    Ok((e2e, archives))
}

/// The conntrack settings of the namespace the caller runs in (every readable
/// `/proc/sys/net/netfilter` value but the entry count) and the machine-wide hash size:
/// kube-proxy must change none of them outside the node namespaces.
pub fn conntrack_settings() -> Result<Vec<(String, String)>> {
    let mut settings = Vec::new();
    let dir = Path::new("/proc/sys/net/netfilter");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "nf_conntrack_count")
        .collect();
    names.sort();
    for name in names {
        if let Ok(value) = std::fs::read_to_string(dir.join(&name)) {
            settings.push((name, value.trim().to_string()));
        }
    }
    let hashsize = "/sys/module/nf_conntrack/parameters/hashsize";
    if let Ok(value) = std::fs::read_to_string(hashsize) {
        settings.push((hashsize.to_string(), value.trim().to_string()));
    }
    Ok(settings)
}

/// A background process with its log file, killed on drop.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Daemon> {
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Daemon {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first so daemons remove their sockets; then make sure.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a lab differs from a kubeadm cluster's defaults.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Run kube-proxy (iptables mode) on every node; without it, only a CNI that
    /// balances Services itself makes them work.
    pub kube_proxy: bool,
}

impl Default for LabOptions {
    fn default() -> LabOptions {
        LabOptions { kube_proxy: true }
    }
}

/// One node: its namespace, directories, and the supervisor running containerd and
/// kubelet in the node's private mount namespace.
pub struct LabNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub cgroup_root: String,
    supervisor: Option<Daemon>,
    pub netns: Netns,
}

impl LabNode {
    /// A command run in this node's network, mount and UTS namespaces (what its containerd,
    /// kubelet and hostNetwork pods see).
    pub fn command(&self, program: &str) -> Result<Command> {
        let pid = self
            .supervisor
            .as_ref()
            .map(|d| d.child.id())
            .context("node supervisor not running")?;
        let mut cmd = Command::new("/usr/bin/nsenter");
        cmd.arg(format!("--target={pid}"))
            .args(["--mount", "--uts", "--net", "--"])
            .arg(program);
        Ok(cmd)
    }

    /// `path` as this node's mount namespace has it (its bpffs, where the agent pins its
    /// maps), reached from the test's own through the supervisor's root.
    pub fn path_inside(&self, path: &str) -> Result<PathBuf> {
        let pid = self
            .supervisor
            .as_ref()
            .map(|d| d.child.id())
            .context("node supervisor not running")?;
        Ok(PathBuf::from(format!("/proc/{pid}/root")).join(path.trim_start_matches('/')))
    }

    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let output = run(self.command(argv[0])?.args(&argv[1..]))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The newest error lines of this node's kubelet and containerd, for a failure message.
    pub fn recent_errors(&self) -> String {
        let newest = |log: String, is_error: fn(&str) -> bool| -> String {
            let lines: Vec<String> = log
                .lines()
                .rev()
                .filter(|l| is_error(l))
                .take(15)
                .map(|l| l.chars().take(400).collect())
                .collect();
            lines.join("\n")
        };
        format!(
            "{}: kubelet errors (newest first):\n{}\ncontainerd errors (newest first):\n{}",
            self.name,
            newest(self.log("kubelet"), |l| l.starts_with('E')),
            newest(self.log("containerd"), |l| l.contains("level=error"))
        )
    }

    /// Stops kubelet and containerd, then whatever they left: shims (which re-parent
    /// themselves away), container processes, and the pod cgroups.
    fn stop(&mut self) {
        self.supervisor.take();
        // containerd (orphaned once kubelet, which the supervisor became, exits) names its
        // config and the shims its socket: both under the node's directory.
        let marker = self.dir.display().to_string();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&marker) {
                    // SAFETY: kill(2) on a pid we just found under /proc.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for hierarchy in CGROUP_TREES {
            let root = Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join(&self.cgroup_root);
            kill_cgroup_tree(&root);
        }
        for _ in 0..50 {
            let mut left = false;
            for hierarchy in CGROUP_TREES {
                let root = Path::new("/sys/fs/cgroup")
                    .join(hierarchy)
                    .join(&self.cgroup_root);
                remove_cgroup_tree(&root);
                left |= root.exists();
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn cgroup_children(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn kill_cgroup_tree(dir: &Path) {
    for child in cgroup_children(dir) {
        kill_cgroup_tree(&child);
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: kill(2) on a process in the test's own cgroup tree.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn remove_cgroup_tree(dir: &Path) {
    for child in cgroup_children(dir) {
        remove_cgroup_tree(&child);
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for LabNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The control plane and the nodes. Drops in field order: nodes (kubelet, containerd,
/// their pods), control-plane daemons, then the namespaces and directories.
pub struct KubeLab {
    pub prefix: String,
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub nodes: Vec<LabNode>,
    control_daemons: Vec<Daemon>,
    apiserver_args: Vec<String>,
    pub control: Netns,
    pub outside: Netns,
    pub fabric: Netns,
}

/// Writes a key and a certificate signed by the lab CA.
fn issue(dir: &Path, name: &str, subject: &str, extensions: &str) -> Result<()> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, extensions)?;
    run(Command::new("openssl")
        .args([
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&csr))?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(dir.join("ca.crt"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(dir.join(format!("{name}.crt"))))?;
    Ok(())
}

/// A kubeconfig with client-certificate files, or a token.
pub fn kubeconfig(ca: &Path, user: &str, credentials: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
         clusters:\n- name: lab\n  cluster:\n    server: https://{CONTROL_IP}:6443\n    certificate-authority: {ca}\n\
         contexts:\n- name: lab\n  context: {{cluster: lab, user: {user}}}\n\
         users:\n- name: {user}\n  user:\n{credentials}",
        ca = ca.display()
    )
}

fn cert_credentials(pki: &Path, name: &str) -> String {
    format!(
        "    client-certificate: {}\n    client-key: {}\n",
        pki.join(format!("{name}.crt")).display(),
        pki.join(format!("{name}.key")).display()
    )
}

impl KubeLab {
    /// Builds the namespaces, certificates and control plane, and starts every node's
    /// containerd and kubelet with the images imported. No CNI runs yet: that is the
    /// caller's (the DaemonSet, or an agent it starts).
    pub fn new(prefix: &str, extra_images: &[PathBuf]) -> Result<KubeLab> {
        KubeLab::with_options(prefix, extra_images, LabOptions::default())
    }

    /// [`KubeLab::new`], shaped by `options`.
    pub fn with_options(
        prefix: &str,
        extra_images: &[PathBuf],
        options: LabOptions,
    ) -> Result<KubeLab> {
        let bin = k8s_bin_dir()?;
        // kubelet 1.20's cgroupfs driver here runs on the v1 hierarchies.
        for hierarchy in V1_HIERARCHIES {
            let path = Path::new("/sys/fs/cgroup").join(hierarchy);
            if !path.join("cgroup.procs").exists() {
                bail!("the Kubernetes lab needs the cgroup v1 hierarchy {} (kubelet 1.20 with cgroupfs)", path.display());
            }
        }
        let dir = PathBuf::from("/run/mycni-tests").join(format!("{prefix}-k8s"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Mount points a node's private mounts need; created empty if the machine lacks
        // them, and left: another lab running at the same time has its mounts on them.
        for path in ["/opt/cni/bin", "/etc/cni/net.d", "/run/containerd"] {
            let path = PathBuf::from(path);
            std::fs::create_dir_all(&path)?;
        }
        let fabric = Netns::new(&format!("{prefix}-fabric"))?;
        let control = Netns::new(&format!("{prefix}-ctl"))?;
        let outside = Netns::new(&format!("{prefix}-out"))?;
        let mut lab = KubeLab {
            prefix: prefix.to_string(),
            dir,
            bin,
            nodes: Vec::new(),
            control_daemons: Vec::new(),
            apiserver_args: Vec::new(),
            control,
            outside,
            fabric,
        };
        lab.fabric
            .exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        lab.fabric.exec(&["ip", "link", "set", "br0", "up"])?;
        attach(&lab.fabric, &lab.control, "ctl", CONTROL_IP)?;
        lab.start_outside()?;
        lab.make_pki()?;
        lab.start_control_plane()?;
        lab.start_cluster_dns()?;
        for (name, ip) in NODES {
            let netns = Netns::new(&format!("{prefix}-{name}"))?;
            attach(&lab.fabric, &netns, name, ip)?;
            // What kubeadm's preflight requires of a node, and where its traffic to
            // anything beyond the subnet goes.
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            netns.exec(&[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &GATEWAY_IP.to_string(),
            ])?;
            let node = LabNode {
                name: name.to_string(),
                ip,
                dir: lab.dir.join(name),
                cgroup_root: format!("{prefix}-{name}"),
                supervisor: None,
                netns,
            };
            lab.nodes.push(node);
        }
        for index in 0..lab.nodes.len() {
            lab.start_node(index, extra_images, &options)?;
        }
        Ok(lab)
    }

    /// The outside host: the nodes' gateway on the bridge, holding `OUTSIDE_IP` (on its
    /// loopback) where busybox httpd answers `outside`. It has no route to any pod CIDR, so
    /// only a pod's traffic translated to its node's IP gets an answer.
    fn start_outside(&mut self) -> Result<()> {
        attach(&self.fabric, &self.outside, "out", GATEWAY_IP)?;
        self.outside.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{OUTSIDE_IP}/32"),
            "dev",
            "lo",
        ])?;
        let www = self.dir.join("outside-www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("index.html"), "outside\n")?;
        let mut httpd = self.outside.command("/bin/busybox");
        httpd
            .args(["httpd", "-f", "-p"])
            .arg(format!("{OUTSIDE_IP}:{OUTSIDE_HTTP_PORT}"))
            .arg("-h")
            .arg(&www);
        self.control_daemons.push(Daemon::spawn(
            "outside httpd",
            httpd,
            self.dir.join("outside-httpd.log"),
        )?);
        Ok(())
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    fn make_pki(&self) -> Result<()> {
        let pki = self.pki();
        std::fs::create_dir_all(&pki)?;
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=mycni-lab-ca", "-keyout"])
            .arg(pki.join("ca.key"))
            .arg("-out")
            .arg(pki.join("ca.crt")))?;
        let server = format!(
            "subjectAltName=IP:{CONTROL_IP},IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default.svc\n\
             extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
        );
        issue(&pki, "apiserver", "/CN=kube-apiserver", &server)?;
        let client = "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n";
        issue(&pki, "admin", "/O=system:masters/CN=admin", client)?;
        issue(
            &pki,
            "controller-manager",
            "/CN=system:kube-controller-manager",
            client,
        )?;
        issue(&pki, "scheduler", "/CN=system:kube-scheduler", client)?;
        issue(
            &pki,
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            client,
        )?;
        for (name, _) in NODES {
            issue(
                &pki,
                name,
                &format!("/O=system:nodes/CN=system:node:{name}"),
                client,
            )?;
        }
        // The user the default `system:node-proxier` ClusterRoleBinding names.
        issue(&pki, "kube-proxy", "/CN=system:kube-proxy", client)?;
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(pki.join("sa.key"))
            .arg("2048"))?;
        run(Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(pki.join("sa.key"))
            .arg("-out")
            .arg(pki.join("sa.pub")))?;
        let ca = pki.join("ca.crt");
        for name in ["admin", "controller-manager", "scheduler"] {
            std::fs::write(
                self.dir.join(format!("{name}.kubeconfig")),
                kubeconfig(&ca, name, &cert_credentials(&pki, name)),
            )?;
        }
        Ok(())
    }

    fn start_control_plane(&mut self) -> Result<()> {
        let pki = self.pki();
        let state = self.dir.join("control");
        std::fs::create_dir_all(&state)?;
        let p = |name: &str| pki.join(name).display().to_string();
        let mut etcd = self.control.command("etcd");
        etcd.arg(format!("--data-dir={}", state.join("etcd").display()))
            .args([
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=default=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
            ]);
        self.control_daemons
            .push(Daemon::spawn("etcd", etcd, state.join("etcd.log"))?);
        self.apiserver_args = vec![
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            format!("--advertise-address={CONTROL_IP}"),
            format!("--bind-address={CONTROL_IP}"),
            "--secure-port=6443".into(),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", state.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!(
                "--kubelet-client-certificate={}",
                p("apiserver-kubelet-client.crt")
            ),
            format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
        ];
        let apiserver = self.spawn_apiserver("kube-apiserver.log")?;
        self.control_daemons.push(apiserver);
        self.wait("the API server to answer", Duration::from_secs(90), |lab| {
            Ok(lab.kubectl(&["get", "--raw", "/readyz"]).is_ok())
        })?;
        let mut manager = self
            .control
            .command(self.bin.join("kube-controller-manager"));
        manager.args([
            format!(
                "--kubeconfig={}",
                self.dir.join("controller-manager.kubeconfig").display()
            ),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            "--node-cidr-mask-size=24".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            format!("--cert-dir={}", state.join("cm-certs").display()),
            format!(
                "--flex-volume-plugin-dir={}",
                state.join("flexvolume").display()
            ),
        ]);
        self.control_daemons.push(Daemon::spawn(
            "kube-controller-manager",
            manager,
            state.join("kube-controller-manager.log"),
        )?);
        let mut scheduler = self.control.command(self.bin.join("kube-scheduler"));
        scheduler.args([
            format!(
                "--kubeconfig={}",
                self.dir.join("scheduler.kubeconfig").display()
            ),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            format!("--cert-dir={}", state.join("scheduler-certs").display()),
        ]);
        self.control_daemons.push(Daemon::spawn(
            "kube-scheduler",
            scheduler,
            state.join("kube-scheduler.log"),
        )?);
        Ok(())
    }

    /// The cluster DNS as kubeadm's CoreDNS is reached: the `kube-system/kube-dns`
    /// Service at [`CLUSTER_DNS_IP`], 53 over UDP and TCP. Its server is the lab's own
    /// (src/bin/lab-dns.rs, the admin kubeconfig) in the control-plane namespace, so the
    /// Service has no selector and an Endpoints object naming that address, as the
    /// `kubernetes` Service's does: kube-proxy or mycni's socket balancing takes pods to it,
    /// and the node's SNAT brings their packets back. Waits until it answers.
    fn start_cluster_dns(&mut self) -> Result<()> {
        let server = crate::bin_dir().join("lab-dns");
        if !server.is_file() {
            bail!(
                "{} is missing: build the tests crate's binaries (cargo build -p mycni-tests --bins)",
                server.display()
            );
        }
        let mut dns = self.control.command(&server);
        dns.arg(format!(
            "--kubeconfig={}",
            self.admin_kubeconfig().display()
        ))
        .arg(format!("--listen={CONTROL_IP}:53"))
        .arg(format!("--domain={CLUSTER_DOMAIN}"));
        let log = self.dir.join("control").join("lab-dns.log");
        self.control_daemons
            .push(Daemon::spawn("lab-dns", dns, log)?);
        self.apply(&format!(
            r#"apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns, kubernetes.io/name: CoreDNS}}
spec:
  clusterIP: {CLUSTER_DNS_IP}
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}
  - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}}
---
apiVersion: v1
kind: Endpoints
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
subsets:
- addresses: [{{ip: "{CONTROL_IP}"}}]
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
"#
        ))?;
        let name = format!("kubernetes.default.svc.{CLUSTER_DOMAIN}.");
        self.wait(
            "the cluster DNS to answer",
            Duration::from_secs(60),
            |lab| {
                let answer = lab
                    .control
                    .run_inside(|| dns_query_udp(SocketAddr::from((CONTROL_IP, 53)), &name))?;
                Ok(answer == [KUBERNETES_SERVICE_IP])
            },
        )?;
        Ok(())
    }

    fn start_node(
        &mut self,
        index: usize,
        extra_images: &[PathBuf],
        options: &LabOptions,
    ) -> Result<()> {
        let pki = self.pki();
        let bin = self.bin.clone();
        let images = cache_dir().join("images");
        let node = &mut self.nodes[index];
        let dir = node.dir.clone();
        for sub in ["cni-bin", "cni-conf", "sys", "containerd"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(
            dir.join("kubelet.kubeconfig"),
            kubeconfig(
                &pki.join("ca.crt"),
                &node.name,
                &cert_credentials(&pki, &node.name),
            ),
        )?;
        // Under the node's directory, so stop() finds kube-proxy by its command line.
        std::fs::write(
            dir.join("kube-proxy.kubeconfig"),
            kubeconfig(
                &pki.join("ca.crt"),
                "kube-proxy",
                &cert_credentials(&pki, "kube-proxy"),
            ),
        )?;
        for (file, value) in [
            ("overcommit_memory", "1"),
            ("panic", "10"),
            ("panic_on_oops", "1"),
        ] {
            std::fs::write(dir.join("sys").join(file), format!("{value}\n"))?;
        }
        // The node's cgroup v2 directory too (runc creates it with the first pod): an
        // agent in Services' eBPF mode attaches to it, possibly before.
        let unified = Path::new("/sys/fs/cgroup/unified");
        if unified.join("cgroup.procs").exists() {
            std::fs::create_dir_all(unified.join(&node.cgroup_root))?;
        }
        for hierarchy in V1_HIERARCHIES {
            let parent = Path::new("/sys/fs/cgroup").join(hierarchy);
            let cgroup = parent.join(&node.cgroup_root);
            std::fs::create_dir_all(&cgroup)
                .with_context(|| format!("create {}", cgroup.display()))?;
            if *hierarchy == "cpuset" {
                // A new cpuset has no CPUs or memory nodes until told.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let value = std::fs::read_to_string(parent.join(file))?;
                    std::fs::write(cgroup.join(file), value.trim())?;
                }
            }
        }
        let containerd_config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "mycni.test/pause:1"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
"#,
            root = dir.join("containerd/root").display(),
            state = dir.join("containerd/state").display(),
            sock = node.containerd_socket().display(),
            opt = dir.join("containerd/opt").display(),
        );
        std::fs::write(dir.join("containerd.toml"), containerd_config)?;
        // The loopback plugin containerd runs for every sandbox, and portmap, which the
        // conflist mycni writes in kube-proxy mode chains after it. A lab without
        // kube-proxy runs mycni in eBPF Services mode, whose conflist has no portmap: it
        // gets none, so a hostPort there can only work through mycni.
        let plugins: &[&str] = if options.kube_proxy {
            &["loopback", "portmap"]
        } else {
            &["loopback"]
        };
        for plugin in plugins {
            std::fs::copy(
                crate::reference_plugin_dir().join(plugin),
                dir.join("cni-bin").join(plugin),
            )?;
        }
        let mut imports = vec![images.join("pause.oci.tar"), images.join("busybox.oci.tar")];
        imports.extend(extra_images.iter().cloned());
        let import_lines: String = imports
            .iter()
            .map(|image| {
                format!(
                    "ctr --address {sock} -n k8s.io images import {image} >/dev/null\n",
                    sock = node.containerd_socket().display(),
                    image = image.display()
                )
            })
            .collect();
        let kubelet_args = [
            format!("--kubeconfig={}", dir.join("kubelet.kubeconfig").display()),
            format!("--hostname-override={}", node.name),
            format!("--node-ip={}", node.ip),
            "--container-runtime=remote".into(),
            format!(
                "--container-runtime-endpoint=unix://{}",
                node.containerd_socket().display()
            ),
            "--cgroup-driver=cgroupfs".into(),
            format!("--cgroup-root=/{}", node.cgroup_root),
            "--fail-swap-on=false".into(),
            format!("--client-ca-file={}", pki.join("ca.crt").display()),
            "--anonymous-auth=false".into(),
            "--authorization-mode=AlwaysAllow".into(),
            "--read-only-port=0".into(),
            "--pod-infra-container-image=mycni.test/pause:1".into(),
            format!("--cluster-dns={CLUSTER_DNS_IP}"),
            format!("--cluster-domain={CLUSTER_DOMAIN}"),
            format!(
                "--volume-plugin-dir={}",
                dir.join("volume-plugins").display()
            ),
            // No disk thresholds at all (the flag replaces kubelet's defaults, it does not
            // merge with them): on a machine whose disk runs low, DiskPressure evicted the
            // e2e pods and deleted the imported images, which no registry can bring back.
            "--eviction-hard=memory.available<1Ki".into(),
            "--image-gc-high-threshold=100".into(),
            "--image-gc-low-threshold=99".into(),
            "--node-status-update-frequency=2s".into(),
            "--v=2".into(),
        ];
        // As kubeadm runs it (iptables mode), on the node's IP but for metrics, which stay on
        // the node's loopback as kubeadm leaves them (e2e's Services specs ask a hostNetwork
        // pod for localhost:10249/proxyMode). Conntrack: no table size
        // (nf_conntrack_max and the hash size are the machine's); the TCP timeouts it sets
        // by default are per network namespace, so they land in the node's.
        let kube_proxy_args = [
            format!(
                "--kubeconfig={}",
                dir.join("kube-proxy.kubeconfig").display()
            ),
            format!("--hostname-override={}", node.name),
            "--proxy-mode=iptables".into(),
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            format!("--bind-address={}", node.ip),
            format!(
                "--healthz-bind-address={}:{KUBE_PROXY_HEALTHZ_PORT}",
                node.ip
            ),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--conntrack-max-per-core=0".into(),
            "--v=2".into(),
        ];
        let quoted = |args: &[String]| -> String {
            args.iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let sys = dir.join("sys");
        // The test's own UTS namespace, where the script must never set a hostname.
        let own_uts = std::fs::read_link("/proc/self/ns/uts").context("read /proc/self/ns/uts")?;
        let kube_proxy_line = if options.kube_proxy {
            format!(
                "{} {} > {}/kube-proxy.log 2>&1 &\n",
                bin.join("kube-proxy").display(),
                quoted(&kube_proxy_args),
                dir.display()
            )
        } else {
            String::new()
        };
        let script = format!(
            r#"set -e
[ "$(readlink /proc/self/ns/uts)" != '{own_uts}' ] || exit 4
hostname {name}
mount -t tmpfs tmpfs /var/lib
mount -t tmpfs tmpfs /var/log
mount -t tmpfs tmpfs /run/netns
mount --make-shared /run/netns
mount -t tmpfs tmpfs /run/containerd
mount -t bpf bpf /sys/fs/bpf
mount --make-shared /sys/fs/bpf
mount --bind {dir}/cni-bin /opt/cni/bin
mount --bind {dir}/cni-conf /etc/cni/net.d
mount --bind {sys}/overcommit_memory /proc/sys/vm/overcommit_memory
mount --bind {sys}/panic /proc/sys/kernel/panic
mount --bind {sys}/panic_on_oops /proc/sys/kernel/panic_on_oops
containerd --config {dir}/containerd.toml > {dir}/containerd.log 2>&1 &
i=0; while [ ! -S {sock} ]; do i=$((i+1)); [ $i -lt 300 ] || exit 3; sleep 0.1; done
{import_lines}{kube_proxy_line}exec {kubelet} {kubelet_args} > {dir}/kubelet.log 2>&1
"#,
            name = node.name,
            own_uts = own_uts.display(),
            dir = dir.display(),
            sys = sys.display(),
            sock = node.containerd_socket().display(),
            kubelet = bin.join("kubelet").display(),
            kubelet_args = quoted(&kubelet_args),
        );
        std::fs::write(dir.join("node.sh"), &script)?;
        // Its own UTS namespace too, named as the node: hostNetwork pods share the runtime's,
        // and answer with their node's name as on a real node. The script refuses to set a
        // hostname in the test's own UTS namespace.
        let mut cmd = node.netns.command("unshare");
        cmd.args(["--mount", "--uts", "--propagation", "slave", "--", "sh"])
            .arg(dir.join("node.sh"));
        node.supervisor = Some(Daemon::spawn(
            &format!("{} supervisor", node.name),
            cmd,
            dir.join("supervisor.log"),
        )?);
        Ok(())
    }

    fn spawn_apiserver(&self, log: &str) -> Result<Daemon> {
        let mut cmd = self.control.command(self.bin.join("kube-apiserver"));
        cmd.args(&self.apiserver_args);
        Daemon::spawn("kube-apiserver", cmd, self.dir.join("control").join(log))
    }

    /// Kills the API server with SIGKILL, leaves it down for `outage`, starts it again and
    /// waits until it is ready.
    pub fn restart_apiserver(&mut self, outage: Duration) -> Result<()> {
        let index = self
            .control_daemons
            .iter()
            .position(|d| d.name == "kube-apiserver")
            .context("no API server running")?;
        let mut old = self.control_daemons.remove(index);
        old.child.kill()?;
        old.child.wait()?;
        std::thread::sleep(outage);
        let new = self.spawn_apiserver("kube-apiserver-restarted.log")?;
        self.control_daemons.insert(index, new);
        self.wait("the restarted API server", Duration::from_secs(90), |lab| {
            Ok(lab.kubectl(&["get", "--raw", "/readyz"]).is_ok())
        })?;
        Ok(())
    }

    /// A kubectl command as cluster admin, without a request timeout (for long execs).
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = self.control.command(self.bin.join("kubectl"));
        cmd.arg(format!(
            "--kubeconfig={}",
            self.admin_kubeconfig().display()
        ));
        cmd
    }

    /// kubectl as cluster admin; stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        // Inside the control-plane namespace: the API server is reachable nowhere else.
        let output = run(self
            .control
            .command(self.bin.join("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.admin_kubeconfig().display()
            ))
            .arg("--request-timeout=20s")
            .args(args))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// kubectl applying `yaml` from stdin.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .control
            .command(self.bin.join("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.admin_kubeconfig().display()
            ))
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(yaml.as_bytes())?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!("kubectl apply: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A merge patch to a status subresource (kubectl 1.20 cannot).
    pub fn patch_status(&self, path: &str, patch: &str) -> Result<()> {
        let request = ApiRequest {
            method: "PATCH",
            path: path.to_string(),
            body: Some(("application/merge-patch+json", patch.to_string())),
        };
        let responses = self.api_requests(std::slice::from_ref(&request), 1)?;
        match responses.first() {
            Some(response) if (200..300).contains(&response.status) => Ok(()),
            Some(response) => bail!("PATCH {path}: {} {}", response.status, response.body),
            None => bail!("PATCH {path}: no answer"),
        }
    }

    /// Sends `requests` to the API server as cluster admin, `parallel` at a time, through a
    /// `kubectl proxy` in the control-plane namespace; the answers come back in order.
    /// kubectl itself sends at most 5 requests a second (client-go's default rate limit,
    /// which `kubectl proxy` does not apply): 5,000 objects would take 17 minutes.
    pub fn api_requests(
        &self,
        requests: &[ApiRequest],
        parallel: usize,
    ) -> Result<Vec<ApiResponse>> {
        let _proxy = ApiProxy::start(self)?;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let answers: Vec<std::sync::Mutex<Option<ApiResponse>>> = requests
            .iter()
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..parallel.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        self.control.run_inside(|| {
                            let mut connection = None;
                            loop {
                                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let Some(request) = requests.get(index) else {
                                    return Ok(());
                                };
                                let answer = request.send(&mut connection)?;
                                if let Ok(mut slot) = answers[index].lock() {
                                    *slot = Some(answer);
                                }
                            }
                        })
                    })
                })
                .collect();
            for worker in workers {
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("an API request thread panicked"))??;
            }
            Ok(())
        })?;
        answers
            .into_iter()
            .zip(requests)
            .map(|(slot, request)| {
                slot.into_inner()
                    .ok()
                    .flatten()
                    .with_context(|| format!("{} {}: no answer", request.method, request.path))
            })
            .collect()
    }

    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.kubectl(&all)?;
        serde_json::from_str(&text).context("kubectl output is not JSON")
    }

    /// Every daemon still running (else the error carries the dead one's log).
    pub fn check_alive(&mut self) -> Result<()> {
        for daemon in &mut self.control_daemons {
            daemon.check_alive()?;
        }
        for node in &mut self.nodes {
            if let Some(daemon) = node.supervisor.as_mut() {
                daemon.check_alive().map_err(|e| {
                    e.context(format!(
                        "containerd log:\n{}",
                        tail(&node.log("containerd"), 20)
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Polls `check` until it holds, failing with `what` (and any dead daemon's log).
    pub fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&KubeLab) -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        let mut last_error = None;
        while start.elapsed() < limit {
            self.check_alive()?;
            match check(self) {
                Ok(true) => return Ok(start.elapsed()),
                Ok(false) => {}
                Err(e) => last_error = Some(e),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let health = self.health();
        match last_error {
            Some(e) => {
                bail!("timed out after {limit:?} waiting for {what}; last error: {e:#}\n{health}")
            }
            None => bail!("timed out after {limit:?} waiting for {what}\n{health}"),
        }
    }

    pub fn node(&self, name: &str) -> &LabNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Installs mycni as an operator does: [`lab_manifest`], deploy/mycni.yaml filled in for
    /// this lab; waits until the DaemonSet is ready on every node
    /// and the nodes are Ready (the error carries the agents' pods and logs).
    pub fn install_mycni(&mut self) -> Result<()> {
        self.install_mycni_manifest(&lab_manifest()?)
    }

    /// [`KubeLab::install_mycni`] with another filling-in of deploy/mycni.yaml.
    pub fn install_mycni_manifest(&mut self, manifest: &str) -> Result<()> {
        self.apply(manifest)?;
        let nodes = self.nodes.len();
        let ready = self
            .wait(
                "the mycni DaemonSet to be ready on every node",
                // Generous: on a loaded 2-core machine the nodes register, and the agents'
                // image is imported and started, well after the manifest is applied.
                Duration::from_secs(300),
                |lab| {
                    let ds = lab.get_json(&["-n", "kube-system", "get", "daemonset", "mycni"])?;
                    Ok(ds["status"]["numberReady"] == nodes)
                },
            )
            .and_then(|_| {
                self.wait("every node Ready", Duration::from_secs(60), |lab| {
                    Ok(lab.nodes_ready()?.iter().all(|(_, ready)| *ready))
                })
            });
        if let Err(e) = ready {
            let pods = self
                .kubectl(&["-n", "kube-system", "get", "pods", "-o", "wide"])
                .unwrap_or_default();
            let logs = self.agent_logs(&["--tail=30"]).unwrap_or_default();
            let nodes: Vec<String> = self.nodes.iter().map(LabNode::recent_errors).collect();
            bail!(
                "{e:#}\npods:\n{pods}\nagent logs:\n{logs}\n{}",
                nodes.join("\n")
            );
        }
        self.route_control_plane_to_pods()
    }

    /// Routes in the control-plane namespace to each node's pod CIDR via that node's IP,
    /// as a real control plane has them (it runs on a node, or the network routes pod
    /// CIDRs): the API server's proxy to pods and Services (`.../pods/P/proxy/...`) dials
    /// pod IPs. The nodes have their CIDRs once they are Ready.
    fn route_control_plane_to_pods(&self) -> Result<()> {
        for node in &self.nodes {
            let object = self.get_json(&["get", "node", &node.name])?;
            let cidr = object["spec"]["podCIDR"]
                .as_str()
                .with_context(|| format!("{} has no pod CIDR", node.name))?;
            self.control
                .exec(&["ip", "route", "replace", cidr, "via", &node.ip.to_string()])?;
        }
        Ok(())
    }

    /// The mycni agents' logs (`kubectl logs` over the DaemonSet's pods), with `extra`
    /// options such as `--tail=30` or `--prefix`.
    pub fn agent_logs(&self, extra: &[&str]) -> Result<String> {
        let mut args = vec![
            "-n",
            "kube-system",
            "logs",
            "-l",
            "app.kubernetes.io/name=mycni",
        ];
        args.extend_from_slice(extra);
        self.kubectl(&args)
    }

    /// Whether every node reports Ready.
    /// What explains a lab that stopped making progress: every node condition that is not
    /// as it should be (DiskPressure, MemoryPressure, NotReady ...) and the free space
    /// where the nodes keep their images.
    pub fn health(&self) -> String {
        let conditions = self
            .get_json(&["get", "nodes"])
            .map(|list| {
                let mut lines = Vec::new();
                for node in list["items"].as_array().into_iter().flatten() {
                    let name = node["metadata"]["name"].as_str().unwrap_or("?");
                    for condition in node["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        let healthy = if condition["type"] == "Ready" {
                            "True"
                        } else {
                            "False"
                        };
                        if condition["status"] != healthy {
                            lines.push(format!(
                                "{name}: {}={} ({})",
                                condition["type"].as_str().unwrap_or("?"),
                                condition["status"].as_str().unwrap_or("?"),
                                condition["message"].as_str().unwrap_or("")
                            ));
                        }
                    }
                }
                if lines.is_empty() {
                    "every node condition as expected".to_string()
                } else {
                    lines.join("\n")
                }
            })
            .unwrap_or_else(|e| format!("node conditions unavailable: {e:#}"));
        let disk = Command::new("df")
            .args(["-h", "--output=avail,size,pcent,target"])
            .arg(&self.dir)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
            .unwrap_or_else(|e| format!("df: {e}"));
        format!("lab health:\n{conditions}\n{disk}")
    }

    pub fn nodes_ready(&self) -> Result<Vec<(String, bool)>> {
        let list = self.get_json(&["get", "nodes"])?;
        Ok(list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|node| {
                        let ready = node["status"]["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True");
                        (
                            node["metadata"]["name"].as_str().unwrap_or("").to_string(),
                            ready,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Where [`ApiProxy`] listens, in the control-plane namespace.
const API_PROXY_ADDRESS: &str = "127.0.0.1:8001";

/// `kubectl proxy` in the control-plane namespace: plain HTTP on its loopback to the API
/// server as cluster admin. Killed on drop.
struct ApiProxy {
    child: Child,
}

impl ApiProxy {
    fn start(lab: &KubeLab) -> Result<ApiProxy> {
        let (_, port) = API_PROXY_ADDRESS
            .rsplit_once(':')
            .context("proxy address")?;
        let child = lab
            .control
            .command(lab.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", lab.admin_kubeconfig().display()))
            .args(["proxy", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn kubectl proxy")?;
        let proxy = ApiProxy { child };
        let address: std::net::SocketAddr = API_PROXY_ADDRESS.parse()?;
        for _ in 0..100 {
            let listening = lab.control.run_inside(|| {
                Ok(std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok())
            })?;
            if listening {
                return Ok(proxy);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("kubectl proxy never listened on {API_PROXY_ADDRESS}")
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request to the API server (see [`KubeLab::api_requests`]).
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: &'static str,
    /// The path and query, e.g. `/api/v1/nodes`.
    pub path: String,
    /// The content type and the body.
    pub body: Option<(&'static str, String)>,
}

/// What the API server answered.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiRequest {
    /// Sends this request on `connection` (opened to the proxy when `None`, kept open for the
    /// next request when the proxy allows). A kept connection the proxy closed meanwhile
    /// is replaced once, when nothing of an answer came on it.
    fn send(&self, connection: &mut Option<std::net::TcpStream>) -> Result<ApiResponse> {
        for attempt in 0..2 {
            let reused = connection.is_some();
            let stream = match connection {
                Some(stream) => stream,
                None => {
                    let stream = std::net::TcpStream::connect(API_PROXY_ADDRESS)
                        .context("connect to kubectl proxy")?;
                    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
                    connection.insert(stream)
                }
            };
            match self.exchange(stream) {
                Ok(Some((answer, keep))) => {
                    if !keep {
                        *connection = None;
                    }
                    return Ok(answer);
                }
                // Closed before any answer: the proxy dropped an idle kept connection.
                Ok(None) if reused && attempt == 0 => *connection = None,
                Ok(None) => bail!("{} {}: connection closed", self.method, self.path),
                Err(e) => {
                    *connection = None;
                    return Err(e.context(format!("{} {}", self.method, self.path)));
                }
            }
        }
        bail!("{} {}: connection closed twice", self.method, self.path)
    }

    /// One request and its answer on `stream`: `None` when the stream closed before any
    /// byte of an answer; else the answer and whether the stream can carry another.
    fn exchange(&self, stream: &mut std::net::TcpStream) -> Result<Option<(ApiResponse, bool)>> {
        use crate::http::{parse_head, BodyDecoder};
        use std::io::{Read, Write};
        let mut request = format!(
            "{} {} HTTP/1.1\r\nHost: {API_PROXY_ADDRESS}\r\nAccept: application/json\r\n",
            self.method, self.path
        );
        let body = match &self.body {
            Some((content_type, body)) => {
                request.push_str(&format!(
                    "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                    body.len()
                ));
                body.as_str()
            }
            None => "",
        };
        request.push_str("\r\n");
        request.push_str(body);
        if stream.write_all(request.as_bytes()).is_err() {
            return Ok(None);
        }
        let mut received = Vec::new();
        let mut buffer = [0u8; 16384];
        let (head, used) = loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                if received.is_empty() {
                    return Ok(None);
                }
                bail!("connection closed inside the response head");
            }
            received.extend_from_slice(&buffer[..n]);
            if let Some(parsed) = parse_head(&received)? {
                break parsed;
            }
        };
        let mut decoder = head.body;
        let mut body = Vec::new();
        decoder.feed(&received[used..], &mut body)?;
        while !decoder.is_done() {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                if matches!(decoder, BodyDecoder::UntilClose) {
                    let answer = ApiResponse {
                        status: head.status,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    return Ok(Some((answer, false)));
                }
                bail!("connection closed inside the response body");
            }
            decoder.feed(&buffer[..n], &mut body)?;
        }
        let answer = ApiResponse {
            status: head.status,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        Ok(Some((answer, true)))
    }
}

/// The A records `server` answers for `name` over UDP, in the caller's namespace (an
/// empty list for an answer without any; an error for none within a second).
pub fn dns_query_udp(server: SocketAddr, name: &str) -> Result<Vec<Ipv4Addr>> {
    use hickory_proto::op::Message;
    use hickory_proto::rr::{RData, RecordType};
    let query = crate::cluster_dns::query_message(0x4d59, name, RecordType::A)
        .with_context(|| format!("a query for {name}"))?;
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    socket.send_to(&query, server)?;
    let mut buffer = [0u8; 1500];
    let length = socket
        .recv(&mut buffer)
        .with_context(|| format!("no answer from {server}"))?;
    let answer = Message::from_vec(&buffer[..length])?;
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A veth from `ns`'s `eth0` to the fabric bridge, with `ip/FABRIC_PREFIX_LEN`.
fn attach(fabric: &Netns, ns: &Netns, short: &str, ip: Ipv4Addr) -> Result<()> {
    let bridge_end = format!("{short}-br");
    fabric.add_veth(&bridge_end, ns, "eth0")?;
    fabric.exec(&["ip", "link", "set", &bridge_end, "master", "br0", "up"])?;
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{ip}/{FABRIC_PREFIX_LEN}"),
        "dev",
        "eth0",
    ])?;
    ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    Ok(())
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        // Nodes first (their pods' processes and cgroups), then the control plane.
        self.nodes.clear();
        while let Some(daemon) = self.control_daemons.pop() {
            drop(daemon);
        }
        if std::env::var_os("MYCNI_KEEP_LAB_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A test pod pinned to `node`: busybox's httpd on 8080 serving the pod's own name (so a
/// fetch shows which pod answered), labelled with `labels` (YAML flow-map entries such as
/// `app: server, role: client`); `container_extra` is appended to the container (indented
/// YAML lines: ports, probes), empty for none.
pub fn httpd_pod_manifest(name: &str, node: &str, labels: &str, container_extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{{labels}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  automountServiceAccountToken: false
  containers:
  - name: main
    image: mycni.test/busybox:1
    imagePullPolicy: Never
    command: ["/bin/busybox", "sh", "-c", "mkdir -p /www && echo {name} > /www/index.html && exec /bin/busybox httpd -f -p 8080 -h /www"]
{container_extra}"#
    )
}

/// deploy/mycni.yaml as an operator fills it in for this lab: the API server's address and the
/// lab's cluster CIDR in the ConfigMap, nothing else changed.
pub fn lab_manifest() -> Result<String> {
    let shipped = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/mycni.yaml"),
    )?;
    let mut manifest = shipped.clone();
    for (placeholder, value) in [
        (
            "api-server-host: \"\"",
            format!("api-server-host: \"{CONTROL_IP}\""),
        ),
        (
            "cluster-cidr: \"10.244.0.0/16\"",
            format!("cluster-cidr: \"{CLUSTER_CIDR}\""),
        ),
    ] {
        if !shipped.contains(placeholder) {
            bail!("deploy/mycni.yaml has no `{placeholder}` to fill in");
        }
        manifest = manifest.replace(placeholder, &value);
    }
    Ok(manifest)
}

/// [`lab_manifest`] with Services balanced by mycni (`service-mode: "ebpf"` in the
/// ConfigMap) for a lab without kube-proxy. The lab's nodes share the machine's cgroup v2
/// tree, each with its pods under its own `--cgroup-root`, so each agent attaches to its
/// node's (`<prefix>-<node name>`, from the node name the DaemonSet already passes): the
/// one value the ConfigMap cannot hold, as it differs per node.
pub fn lab_manifest_ebpf_services(prefix: &str) -> Result<String> {
    let manifest = lab_manifest()?;
    let cgroup_variable = "            - name: MYCNI_CGROUP_PATH\n              valueFrom: {configMapKeyRef: {name: mycni-config, key: cgroup-path}}\n";
    let per_node = format!(
        "            - name: MYCNI_CGROUP_PATH\n              value: \"{HOST_CGROUP_MOUNT}/unified/{prefix}-$(MYCNI_NODE_NAME)\"\n"
    );
    let mode = "service-mode: \"kube-proxy\"";
    for wanted in [cgroup_variable, mode] {
        if !manifest.contains(wanted) {
            bail!("deploy/mycni.yaml has no `{wanted}` to fill in");
        }
    }
    Ok(manifest
        .replace(mode, "service-mode: \"ebpf\"")
        .replace(cgroup_variable, &per_node))
}

/// Where deploy/mycni.yaml mounts the host's /sys/fs/cgroup in the agent's container.
pub const HOST_CGROUP_MOUNT: &str = "/host/sys/fs/cgroup";
