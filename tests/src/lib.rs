//! Test harness: simulated nodes and pods in network namespaces, each named with a per-test
//! prefix and removed on drop (so cleanup runs when a test fails too), a private bpffs
//! mount per node, and a way to call the real `mycni` binary the way a runtime does.
//!
//! Nothing here touches the machine's root namespace: addresses, routes and programs only
//! ever go into namespaces made here.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod bench;
pub mod cgroup;
pub mod cluster;
pub mod cluster_dns;
pub mod conformance;
pub mod http;
pub mod kubelab;
pub mod kubeproxy;
pub mod lone;
pub mod policy_bench;
pub mod policy_decision;
pub mod raw;
pub mod services_bench;
pub mod sock_probe;

/// Where the binaries under test live (`cargo xtask test` sets it; defaults to target/debug).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("MYCNI_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

pub fn mycni_bin() -> PathBuf {
    bin_dir().join("mycni")
}

pub fn agent_bin() -> PathBuf {
    bin_dir().join("mycni-agent")
}

/// The reference plugins (portmap) from Debian's containernetworking-plugins.
pub fn reference_plugin_dir() -> PathBuf {
    std::env::var_os("MYCNI_CNI_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/cni"))
}

pub fn cnitool_bin() -> PathBuf {
    std::env::var_os("MYCNI_CNITOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/cnitool"))
}

/// Where tests, the demo and the benchmark keep their files and bpffs mounts:
/// `$MYCNI_TEST_RUN_DIR`, else `/run/mycni-tests`. Created on first use, so a machine that
/// never ran anything works (the demo test points it at a path that does not exist yet).
pub fn run_dir() -> PathBuf {
    let dir = std::env::var_os("MYCNI_TEST_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/mycni-tests"));
    // Failing here would only move the error: the caller's own write reports it.
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Whether this process may run root-only tests. Without root, says once per test binary
/// that they are skipped (the unit tests still run) and returns false.
pub fn have_root() -> bool {
    static SAID: std::sync::Once = std::sync::Once::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        // Straight to the stream, not eprintln!: the test harness would capture that.
        SAID.call_once(|| {
            let _ = writeln!(
                std::io::stderr(),
                "skipped: the integration tests in this binary need root (network namespaces, bpf); run `sudo cargo xtask test`"
            );
        });
    }
    root
}

/// Returns `Ok(())` from a root-only test when not root (see [`have_root`]).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::have_root() {
            return Ok(());
        }
    };
}

/// A short prefix unique to this test and process: every name a test makes starts with it.
pub fn prefix(test: &str) -> String {
    let short: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect();
    format!("mct{}-{short}", std::process::id() % 100_000)
}

pub fn run(cmd: &mut Command) -> Result<Output> {
    let output = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Netns> {
        // A namespace left by a crashed run of the same test would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command run inside this namespace. `nsenter`, not `ip netns exec`, which would
    /// remount /sys and hide bpffs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        // Absolute: a PATH set for the child must not change which nsenter runs.
        let mut cmd = Command::new("/usr/bin/nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let output = run(self.command(argv[0]).args(&argv[1..]))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a thread that has entered this namespace (sockets opened there stay there).
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let file =
            File::open(self.path()).with_context(|| format!("open {}", self.path().display()))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this scoped thread only.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns: {}", std::io::Error::last_os_error());
                    }
                    f()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// A veth pair: `local` here, `remote` inside `peer`, made from inside this namespace.
    pub fn add_veth(&self, local: &str, peer: &Netns, remote: &str) -> Result<()> {
        self.exec(&[
            "ip", "link", "add", local, "type", "veth", "peer", "name", remote, "netns", &peer.name,
        ])
        .map(|_| ())
    }

    pub fn ping(&self, target: Ipv4Addr) -> Result<()> {
        self.exec(&[
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &target.to_string(),
        ])
        .map(|_| ())
    }

    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.exec(&["ip", "-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A private bpffs instance, unmounted and removed on drop.
pub struct Bpffs {
    pub mount_point: PathBuf,
}

impl Bpffs {
    pub fn new(prefix: &str) -> Result<Bpffs> {
        let mount_point = run_dir().join(prefix);
        std::fs::create_dir_all(&mount_point)?;
        let _ = Command::new("umount").arg(&mount_point).output();
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount_point))?;
        Ok(Bpffs { mount_point })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount_point).output();
        let _ = std::fs::remove_dir(&self.mount_point);
    }
}

/// The result of one plugin call.
#[derive(Debug)]
pub struct CniCall {
    pub exit_ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniCall {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not JSON: {:?}", self.stdout))
    }

    /// Runs a plugin command (program, environment and namespaces already set) with `stdin`
    /// as its network config, as a runtime does.
    pub fn run(cmd: &mut Command, stdin: &str) -> Result<CniCall> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn the plugin")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        Ok(CniCall {
            exit_ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// The error code of a failed call, from the spec's error JSON.
    pub fn error_code(&self) -> Option<u64> {
        if self.exit_ok {
            return None;
        }
        self.json().ok()?.get("code")?.as_u64()
    }
}

/// The simulated node's own address, on its loopback (inside its namespace only).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);

/// A simulated node: a namespace with a private bpffs, an agent that pinned the datapath,
/// and a data dir for address records. Everything goes when it drops.
pub struct Node {
    pub prefix: String,
    /// The node's own address, on the node namespace's loopback.
    pub node_ip: Ipv4Addr,
    pub netns: Netns,
    pub bpffs: Bpffs,
    pub data_dir: PathBuf,
    pub pod_cidr: String,
    /// The pods' MTU in the network config.
    pub mtu: u32,
    agent: Option<Child>,
    agent_args: Vec<String>,
    /// Variables set for the agent (the DaemonSet's way of passing flags).
    agent_env: Vec<(String, String)>,
}

impl Node {
    /// A lone node: its address on loopback, the agent loading the datapath only.
    pub fn new(prefix: &str, pod_cidr: &str) -> Result<Node> {
        let mut node = Node::bare(prefix, "node", pod_cidr)?;
        node.netns
            .exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        node.start_agent(&[])?;
        Ok(node)
    }

    /// A node namespace `<prefix>-<name>` with a private bpffs and data dir, no agent yet.
    pub fn bare(prefix: &str, name: &str, pod_cidr: &str) -> Result<Node> {
        let netns = Netns::new(&format!("{prefix}-{name}"))?;
        let bpffs = Bpffs::new(&format!("{prefix}-{name}"))?;
        let data_dir = run_dir().join(format!("{prefix}-{name}-data"));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)?;
        Ok(Node {
            prefix: prefix.to_string(),
            node_ip: NODE_IP,
            netns,
            bpffs,
            data_dir,
            pod_cidr: pod_cidr.to_string(),
            mtu: 1500,
            agent: None,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
        })
    }

    pub fn pin_root(&self) -> PathBuf {
        self.bpffs.mount_point.join("mycni")
    }

    /// Starts `mycni-agent run` inside the node (with `args`, or the last ones when empty)
    /// and waits until its pins are there and its node config (if any) is written.
    pub fn start_agent(&mut self, args: &[&str]) -> Result<()> {
        if !args.is_empty() {
            self.agent_args = args.iter().map(|a| a.to_string()).collect();
        }
        self.spawn_agent()
    }

    /// Starts `mycni-agent run` with exactly `args` and the variables `env` (kept for
    /// restarts), as [`Node::start_agent`] does.
    pub fn start_agent_with_env(&mut self, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
        self.agent_args = args.iter().map(|a| a.to_string()).collect();
        self.agent_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_agent()
    }

    fn spawn_agent(&mut self) -> Result<()> {
        let child = self
            .netns
            .command(agent_bin())
            .arg("--bpffs-root")
            .arg(self.pin_root())
            .arg("run")
            .args(&self.agent_args)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn mycni-agent")?;
        self.agent = Some(child);
        let wants_config = self.agent_args.iter().any(|a| a == "--node-ip");
        for _ in 0..200 {
            let ready = mycni::datapath::check_loaded(&self.pin_root()).is_ok()
                && (!wants_config
                    || mycni::datapath::read_config(&self.pin_root())
                        .is_ok_and(|c| c.node_ip != [0; 4]));
            if ready {
                return Ok(());
            }
            if let Some(child) = self.agent.as_mut() {
                if let Some(status) = child.try_wait()? {
                    let mut err = String::new();
                    if let Some(mut stderr) = child.stderr.take() {
                        let _ = stderr.read_to_string(&mut err);
                    }
                    bail!("mycni-agent exited with {status}: {err}");
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("mycni-agent did not pin the datapath within 10 s")
    }

    /// The running agent's stderr, for a test that follows its log (otherwise it is only
    /// read when the agent dies while starting).
    pub fn take_agent_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.agent.as_mut()?.stderr.take()
    }

    /// Whether the agent started last is still running.
    pub fn agent_alive(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The single-plugin network config mycni gets from a runtime.
    pub fn conf(&self, cni_version: &str) -> Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "name": "mycni-test",
            "type": "mycni",
            "podCIDR": self.pod_cidr,
            "mtu": self.mtu,
            "dataDir": self.data_dir,
            "bpffsRoot": self.pin_root(),
        })
    }

    /// Calls the real `mycni` binary inside the node, as a runtime would.
    pub fn cni(&self, env: &[(&str, &str)], stdin: &str) -> Result<CniCall> {
        self.cni_with(&mycni_bin(), env, stdin)
    }

    /// Calls the plugin binary at `plugin` (an installed copy, say) inside the node.
    pub fn cni_with(&self, plugin: &Path, env: &[(&str, &str)], stdin: &str) -> Result<CniCall> {
        let mut cmd = self.netns.command(plugin);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (key, value) in env {
            cmd.env(key, value);
        }
        CniCall::run(&mut cmd, stdin)
    }

    pub fn cni_env<'a>(
        command: &'a str,
        container_id: &'a str,
        netns: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
    }

    /// ADD a pod: a new namespace `<prefix>-<name>` joined to this node; returns its IP.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        self.add_pod_with_args(name, "")
    }

    /// ADD a pod with `CNI_ARGS` (`K8S_POD_NAMESPACE=shop;IP=10.244.1.9`, as a runtime
    /// passes them; empty for none).
    pub fn add_pod_with_args(&self, name: &str, cni_args: &str) -> Result<Pod> {
        let netns = Netns::new(&format!("{}-{name}", self.prefix))?;
        let container_id = format!("{}-{name}", self.prefix);
        let path = netns.path().display().to_string();
        let mut env = Node::cni_env("ADD", &container_id, &path);
        if !cni_args.is_empty() {
            env.push(("CNI_ARGS", cni_args));
        }
        let call = self.cni(&env, &self.conf("1.0.0").to_string())?;
        if !call.exit_ok {
            bail!("ADD {name} failed: {} {}", call.stdout, call.stderr);
        }
        let result = call.json()?;
        let ip = pod_ip(&result).context("ADD result has no IP")?;
        Ok(Pod {
            netns,
            container_id,
            ip,
            result,
        })
    }

    pub fn del_pod(&self, pod: &Pod) -> Result<()> {
        let path = pod.netns.path().display().to_string();
        let call = self.cni(
            &Node::cni_env("DEL", &pod.container_id, &path),
            &self.conf("1.0.0").to_string(),
        )?;
        if !call.exit_ok {
            bail!("DEL failed: {} {}", call.stdout, call.stderr);
        }
        Ok(())
    }

    /// Files in the address store (one per allocated IP).
    pub fn ip_files(&self) -> Result<Vec<String>> {
        let dir = self.data_dir.join("mycni-test");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.parse::<Ipv4Addr>().is_ok() {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Everything a pod could leave on the node: host veths, their /32 routes, endpoint
    /// and /32 map entries, IP files. (The node's own links and routes are not counted.)
    pub fn leftovers(&self) -> Result<BTreeMap<&'static str, Vec<String>>> {
        let mut found = BTreeMap::new();
        let links: Vec<String> = self
            .netns
            .links()?
            .into_iter()
            .filter(|l| l.starts_with("lxc"))
            .collect();
        found.insert("links", links);
        let routes: Vec<String> = self
            .netns
            .exec(&["ip", "-4", "route", "show"])?
            .lines()
            .filter(|r| r.contains("lxc") || r.starts_with(&self.pod_cidr_prefix()))
            .map(String::from)
            .collect();
        found.insert("routes", routes);
        let maps = mycni::datapath::Maps::open(&self.pin_root())?;
        found.insert(
            "endpoints",
            maps.endpoints()?
                .iter()
                .map(|(ip, _)| ip.to_string())
                .collect(),
        );
        found.insert(
            "map routes",
            maps.routes()?
                .iter()
                .filter(|(_, len, _)| *len == 32)
                .map(|(ip, len, _)| format!("{ip}/{len}"))
                .collect(),
        );
        found.insert("ip files", self.ip_files()?);
        found.retain(|_, v| !v.is_empty());
        Ok(found)
    }

    /// `10.244.1.` for `10.244.1.0/24`: host routes into this node's pod CIDR start so.
    fn pod_cidr_prefix(&self) -> String {
        let network = self.pod_cidr.split('/').next().unwrap_or("");
        let mut octets: Vec<&str> = network.split('.').collect();
        octets.pop();
        format!("{}.", octets.join("."))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_agent();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        // Pins live in the private bpffs, which the Bpffs field unmounts after this.
    }
}

/// A pod made by ADD. Its namespace goes on drop (DEL is the test's business).
pub struct Pod {
    pub netns: Netns,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub result: Value,
}

/// The pod's IP from an ADD result of any version.
pub fn pod_ip(result: &Value) -> Option<Ipv4Addr> {
    let address = result.get("ips")?.get(0)?.get("address")?.as_str()?;
    address.split('/').next()?.parse().ok()
}

/// Echo server on `ip:port` in `server`'s namespace, one TCP round trip from `client`'s.
pub fn tcp_round_trip(server: &Netns, client: &Netns, ip: Ipv4Addr, port: u16) -> Result<()> {
    let target = SocketAddr::from((ip, port));
    tcp_echo(server, target, client, target).map(|_| ())
}

/// Echo server listening on `listen` in `server`'s namespace; `client` connects to
/// `connect` (which a DNAT may send to `listen`) and must get its bytes back. Returns the
/// client address the server saw.
pub fn tcp_echo(
    server: &Netns,
    listen: SocketAddr,
    client: &Netns,
    connect: SocketAddr,
) -> Result<SocketAddr> {
    let listener = server.run_inside(|| Ok(TcpListener::bind(listen)?))?;
    let accept = std::thread::spawn(move || -> Result<SocketAddr> {
        let (mut conn, peer) = listener.accept()?;
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf)?;
        conn.write_all(&buf[..n])?;
        Ok(peer)
    });
    let reply = client.run_inside(|| {
        let mut stream = TcpStream::connect_timeout(&connect, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"hello mycni")?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf)?;
        Ok(buf[..n].to_vec())
    })?;
    let peer = accept
        .join()
        .map_err(|_| anyhow::anyhow!("echo server panicked"))??;
    if reply != b"hello mycni" {
        bail!("echo came back as {reply:?}");
    }
    Ok(peer)
}

/// What each end of a TCP conversation saw as its peer.
#[derive(Debug, Clone, Copy)]
pub struct TcpPeers {
    /// The client address the server accepted.
    pub server_saw: SocketAddr,
    /// The address the client's socket is connected to (a ClusterIP if the stack
    /// translated the replies back).
    pub client_saw: SocketAddr,
}

/// A TCP conversation past the handshake: the client connects from `client`'s namespace
/// to `connect`, sends `rounds` messages and reads each echo back from a server listening
/// on `listen` in `server`'s namespace, then both ends close. Half-tracked flows that a
/// firewall drops after the handshake fail here (3 s per step).
pub fn tcp_conversation(
    server: &Netns,
    listen: SocketAddr,
    client: &Netns,
    connect: SocketAddr,
    rounds: usize,
) -> Result<TcpPeers> {
    let listener = server.run_inside(|| Ok(TcpListener::bind(listen)?))?;
    listener.set_nonblocking(true)?;
    let accept = std::thread::spawn(move || -> Result<SocketAddr> {
        let deadline = std::time::Instant::now() + Duration::from_secs(4);
        let (mut conn, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        bail!("no connection arrived at {listen}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => bail!("accept on {listen}: {e}"),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 256];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(peer);
            }
            conn.write_all(&buf[..n])?;
        }
    });
    let client_saw = client.run_inside(|| {
        let mut stream = TcpStream::connect_timeout(&connect, Duration::from_secs(3))
            .with_context(|| format!("connect to {connect}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        for round in 0..rounds {
            let message = format!("round {round} of the conversation");
            stream.write_all(message.as_bytes())?;
            let mut got = vec![0u8; message.len()];
            stream
                .read_exact(&mut got)
                .with_context(|| format!("echo of round {round} from {connect}"))?;
            if got != message.as_bytes() {
                bail!("round {round} came back as {got:?}");
            }
        }
        let peer = stream.peer_addr()?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .context("the server's close")?;
        Ok(peer)
    });
    let server_saw = accept
        .join()
        .map_err(|_| anyhow::anyhow!("tcp server panicked"))?;
    let client_saw = client_saw?;
    Ok(TcpPeers {
        server_saw: server_saw?,
        client_saw,
    })
}

/// UDP echo: a server on `listen` in `server`'s namespace answers one datagram that
/// `client` sends to `connect`. Returns the client address the server saw.
pub fn udp_echo(
    server: &Netns,
    listen: SocketAddr,
    client: &Netns,
    connect: SocketAddr,
) -> Result<SocketAddr> {
    let socket = server.run_inside(|| Ok(std::net::UdpSocket::bind(listen)?))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let serve = std::thread::spawn(move || -> Result<SocketAddr> {
        let mut buf = [0u8; 64];
        let (n, peer) = socket.recv_from(&mut buf)?;
        socket.send_to(&buf[..n], peer)?;
        Ok(peer)
    });
    let reply = client.run_inside(|| {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send_to(b"hello udp", connect)?;
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf)?;
        Ok(buf[..n].to_vec())
    })?;
    let peer = serve
        .join()
        .map_err(|_| anyhow::anyhow!("udp echo server panicked"))??;
    if reply != b"hello udp" {
        bail!("udp echo came back as {reply:?}");
    }
    Ok(peer)
}

/// `GET path` on `addr` from inside `netns`: (status line, body).
pub fn http_get(netns: &Netns, addr: &str, path: &str) -> Result<(String, String)> {
    let addr: SocketAddr = addr.parse()?;
    netns.run_inside(|| {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        // A server that keeps connections alive (Go's: kube-proxy's healthz) must close
        // this one, and a silent one must not hang the test.
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
        Ok((
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        ))
    })
}

/// The value of one series (name and labels, as rendered) in a Prometheus text body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// One line of the agent's log, as its logger writes it:
/// `[2026-12-02T09:48:28.123Z WARN  bpf] from_pod: dropped ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The module (`mycni::agent`), or `bpf` for the programs' messages.
    pub target: String,
    pub message: String,
}

impl LogLine {
    /// `None` unless the line has the logger's shape, a UTC timestamp with milliseconds
    /// included.
    pub fn parse(line: &str) -> Option<LogLine> {
        let rest = line.strip_prefix('[')?;
        let (stamp, rest) = rest.split_once(' ')?;
        let shaped = stamp.len() == 24
            && stamp.ends_with('Z')
            && stamp.as_bytes()[10] == b'T'
            && stamp.as_bytes()[19] == b'.';
        if !shaped {
            return None;
        }
        let (head, message) = rest.split_once("] ")?;
        let mut words = head.split_whitespace();
        let level = words.next()?;
        let target = words.next()?;
        if words.next().is_some() || !["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level) {
            return None;
        }
        Some(LogLine {
            level: level.to_string(),
            target: target.to_string(),
            message: message.to_string(),
        })
    }
}

/// A running agent's stderr, drained by a thread as it comes (an agent logging thousands
/// of routes would otherwise block on a full pipe), kept for the test to search.
pub struct AgentLog {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl AgentLog {
    pub fn follow(node: &mut Node) -> Result<AgentLog> {
        use std::io::BufRead;
        let stderr = node.take_agent_stderr().context("the agent's stderr")?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut all) = sink.lock() {
                    all.push(line);
                }
            }
        });
        Ok(AgentLog { lines })
    }

    /// The first line holding every needle, if the agent wrote one yet.
    pub fn find(&self, needles: &[&str]) -> Option<String> {
        let all = self.lines.lock().ok()?;
        all.iter()
            .find(|line| needles.iter().all(|n| line.contains(n)))
            .cloned()
    }

    /// Waits up to `limit` for a line holding every needle.
    pub fn wait_for(&self, needles: &[&str], limit: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(line) = self.find(needles) {
                return Ok(line);
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "no line with {needles:?} in the agent's log within {limit:?}:\n{}",
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the agent wrote so far (the last 200 lines).
    pub fn text(&self) -> String {
        let all = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
        let skip = all.len().saturating_sub(200);
        all[skip..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::LogLine;

    #[test]
    fn log_lines_are_read_in_the_loggers_shape_only() {
        let line = "[2026-12-02T09:48:28.123Z WARN  bpf] from_pod: dropped spoofed IPv4";
        assert_eq!(
            LogLine::parse(line),
            Some(LogLine {
                level: "WARN".into(),
                target: "bpf".into(),
                message: "from_pod: dropped spoofed IPv4".into(),
            })
        );
        for other in [
            "mycni-agent: bpf: warn from_pod: dropped",
            "[2026-12-02T09:48:28Z WARN  bpf] no milliseconds",
            "[2026-12-02T09:48:28.123Z LOUD  bpf] unknown level",
            "[2026-12-02T09:48:28.123Z WARN] no target",
        ] {
            assert_eq!(LogLine::parse(other), None, "{other}");
        }
    }
}
