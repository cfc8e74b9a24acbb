//! The `mycni-agent` command line, declared once with clap: flags, their defaults, and the
//! environment variables the DaemonSet sets them through (a flag wins over its variable).
//! Pure: parsing and validation only, unit-tested below.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnetwork::Ipv4Network;

use crate::ebpf_log::BpfLogLevel;
use crate::ipam::Pool;
use crate::nat::NatTimeouts;
use crate::nodes::TunnelMode;
use crate::socket_lb::ServiceMode;

/// The mycni node agent: loads and pins the datapath, keeps routes to the other nodes in
/// step, expires NAT entries, and prints what the maps hold.
#[derive(Debug, Parser)]
#[command(name = "mycni-agent", version)]
pub struct AgentCli {
    /// Where the programs and maps are pinned (a directory on a bpffs).
    #[arg(long, global = true, value_name = "DIR", default_value = crate::cni::config::DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    #[command(subcommand)]
    pub command: AgentCommand,
}

impl AgentCli {
    /// The level the programs' messages are kept at: `run`'s --bpf-log-level (the other
    /// commands load the programs silent).
    pub fn bpf_log_filter(&self) -> log::LevelFilter {
        match &self.command {
            AgentCommand::Run(options) => options.bpf_log_level.filter(),
            _ => log::LevelFilter::Off,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Load and pin programs and maps, then stay up until SIGTERM/SIGINT. With --node-ip
    /// (or the Kubernetes API), also hook the uplink and keep routes to the other nodes.
    Run(Box<RunOptions>),
    /// Copy the `mycni` plugin that sits beside this binary into DIR (atomically: a
    /// runtime may be executing the old one); the DaemonSet's init step.
    InstallCniPlugin {
        /// The CNI bin directory.
        dir: PathBuf,
    },
    /// Load and pin, then exit (pins keep everything loaded).
    Load,
    /// Remove the pins (attached programs stay until their links go).
    Unload,
    /// Print the ENDPOINTS map.
    Endpoints(TableFormat),
    /// Print the ROUTES map.
    Routes(TableFormat),
    /// Print the PEERS map: the node IPs whose VXLAN traffic is accepted.
    Peers(TableFormat),
    /// Print the NAT map: translated flows, both directions, with idle time.
    Nat(TableFormat),
    /// Print the per-verdict packet and byte counters.
    Stats(TableFormat),
    /// Print the Services maps: each frontend (address:port/protocol, flags, affinity)
    /// with its backends.
    Services(TableFormat),
    /// Print the NetworkPolicy state the running agent computed: per pod on this node that
    /// a policy selects, the policies, the enforced directions, and the allowed peers
    /// (identity, namespace, labels, CIDRs) and ports. Asks the agent at its metrics
    /// address.
    Policy(PolicyArgs),
}

/// The variable both `run` and `policy` read the metrics address from.
pub const METRICS_ADDRESS_ENV: &str = "MYCNI_METRICS_ADDRESS";

#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The running agent's --metrics-address.
    #[arg(long, value_name = "ADDR:PORT", env = METRICS_ADDRESS_ENV)]
    pub metrics_address: String,
}

#[derive(Debug, Clone, Copy, Args)]
pub struct TableFormat {
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `mycni-agent run`.
#[derive(Debug, Clone, Args)]
pub struct RunOptions {
    /// This node's name (with the Kubernetes API: its Node object).
    #[arg(
        long,
        value_name = "NAME",
        env = "MYCNI_NODE_NAME",
        help_heading = "Node"
    )]
    pub node_name: Option<String>,
    /// This node's IP; hooks the uplink and routes to the nodes of --nodes-file. Learned
    /// from the Node object with the Kubernetes API.
    #[arg(long, value_name = "IP", help_heading = "Node")]
    pub node_ip: Option<Ipv4Addr>,
    /// The device holding the node IP [default: the one that holds it].
    #[arg(long, value_name = "IFNAME", help_heading = "Node")]
    pub uplink: Option<String>,
    /// The cluster's pod CIDR (every node's pod CIDR lies in it).
    #[arg(long, value_name = "CIDR", env = "MYCNI_CLUSTER_CIDR", value_parser = Pool::parse, help_heading = "Node")]
    pub cluster_cidr: Option<Pool>,
    /// The other nodes, one `name node-ip pod-cidr` per line [default: /etc/mycni/nodes].
    #[arg(long, value_name = "PATH", help_heading = "Node")]
    pub nodes_file: Option<PathBuf>,
    /// auto: direct to nodes on the uplink's subnet, VXLAN to the others.
    #[arg(
        long,
        value_name = "auto|vxlan|direct",
        env = "MYCNI_TUNNEL_MODE",
        default_value = "auto",
        help_heading = "Node"
    )]
    pub tunnel_mode: TunnelMode,
    /// The VXLAN network identifier.
    #[arg(
        long,
        value_name = "N",
        env = "MYCNI_VNI",
        default_value_t = 1,
        help_heading = "Node"
    )]
    pub vni: u32,

    /// Learn the nodes (and this node's IP and pod CIDR) from Kubernetes with this
    /// kubeconfig.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["in_cluster", "nodes_file"], help_heading = "Kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Learn the nodes from Kubernetes with the pod's service account.
    #[arg(long, conflicts_with = "nodes_file", help_heading = "Kubernetes")]
    pub in_cluster: bool,
    /// The API server's host with --in-cluster, when not the `kubernetes` Service's
    /// (empty: $KUBERNETES_SERVICE_HOST).
    #[arg(
        long,
        value_name = "HOST",
        env = "MYCNI_API_SERVER_HOST",
        help_heading = "Kubernetes"
    )]
    pub api_server_host: Option<String>,
    /// The API server's port with --in-cluster (empty: $KUBERNETES_SERVICE_PORT).
    #[arg(
        long,
        value_name = "PORT",
        env = "MYCNI_API_SERVER_PORT",
        help_heading = "Kubernetes"
    )]
    pub api_server_port: Option<String>,

    /// Destinations besides the cluster CIDR that see pod addresses unchanged; repeat the
    /// flag, or give a list separated by spaces or commas.
    #[arg(long = "non-masquerade-cidr", value_name = "CIDR", env = "MYCNI_NON_MASQUERADE_CIDRS", value_parser = parse_cidr_list, help_heading = "NAT")]
    pub non_masquerade: Vec<CidrList>,
    /// Source ports SNAT may use on the node IP.
    #[arg(long, value_name = "MIN-MAX", env = "MYCNI_NAT_PORTS", default_value = "61000-65535", value_parser = parse_port_range, help_heading = "NAT")]
    pub nat_ports: PortRange,
    /// Idle lifetime of established TCP flows (5 days). Handshakes, closing and closed TCP
    /// and unanswered UDP follow conntrack (120/60/120/5/30 s), capped by these.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 432_000,
        help_heading = "NAT"
    )]
    pub nat_timeout_tcp: u64,
    /// Idle lifetime of answered UDP flows.
    #[arg(long, value_name = "SECS", default_value_t = 120, help_heading = "NAT")]
    pub nat_timeout_udp: u64,
    /// Idle lifetime of ICMP echo flows.
    #[arg(long, value_name = "SECS", default_value_t = 30, help_heading = "NAT")]
    pub nat_timeout_icmp: u64,

    /// Write DIR/10-mycni.conflist once the datapath is ready (needs the pod CIDR).
    #[arg(long, value_name = "DIR", help_heading = "CNI")]
    pub cni_conf_dir: Option<PathBuf>,
    /// This node's pod CIDR, for the conflist (with the Kubernetes API: the Node's).
    #[arg(long, value_name = "CIDR", value_parser = Pool::parse, help_heading = "CNI")]
    pub pod_cidr: Option<Pool>,
    /// The pods' MTU [default: the uplink's, less VXLAN's 50 bytes unless direct].
    #[arg(long, value_name = "N", help_heading = "CNI")]
    pub pod_mtu: Option<u32>,
    /// The network name in the conflist.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "mycni",
        help_heading = "CNI"
    )]
    pub network_name: String,
    /// The plugin's address store: free the addresses and map entries of pods that
    /// vanished without DEL.
    #[arg(long, value_name = "DIR", help_heading = "CNI")]
    pub data_dir: Option<PathBuf>,
    /// Seconds between garbage collections.
    #[arg(long, value_name = "SECS", default_value_t = 60, help_heading = "CNI")]
    pub gc_interval: u64,
    /// How old an allocation without a veth must be to be collected.
    #[arg(long, value_name = "SECS", default_value_t = 60, help_heading = "CNI")]
    pub gc_grace: u64,

    /// Who load-balances Services: kube-proxy (mycni attaches nothing), or ebpf (mycni's
    /// socket-level programs on --cgroup-path translate ClusterIPs and other frontends).
    #[arg(
        long,
        value_name = "kube-proxy|ebpf",
        env = "MYCNI_SERVICE_MODE",
        default_value = "kube-proxy",
        help_heading = "Services"
    )]
    pub service_mode: ServiceMode,
    /// The cgroup v2 directory whose processes (and their children's) get Services in
    /// ebpf mode [default: the cgroup2 mount, /sys/fs/cgroup or /sys/fs/cgroup/unified].
    #[arg(
        long,
        value_name = "DIR",
        env = "MYCNI_CGROUP_PATH",
        help_heading = "Services"
    )]
    pub cgroup_path: Option<PathBuf>,

    /// Serve /metrics, /healthz and /policy here.
    #[arg(long, value_name = "ADDR:PORT", env = METRICS_ADDRESS_ENV, help_heading = "Observability")]
    pub metrics_address: Option<String>,
    /// The programs' messages in this log (warn: spoofing pods, SNAT out of ports; debug:
    /// also malformed packets, new SNAT flows).
    #[arg(long, value_name = "off|error|warn|info|debug|trace", env = crate::ebpf_log::LEVEL_ENV, default_value = "warn", value_parser = parse_bpf_log_level, help_heading = "Observability")]
    pub bpf_log_level: BpfLogLevel,
}

impl RunOptions {
    pub fn nat_timeouts(&self) -> NatTimeouts {
        NatTimeouts {
            tcp: Duration::from_secs(self.nat_timeout_tcp),
            udp: Duration::from_secs(self.nat_timeout_udp),
            icmp: Duration::from_secs(self.nat_timeout_icmp),
            ..NatTimeouts::default()
        }
    }

    /// Every --non-masquerade-cidr, lists flattened.
    pub fn non_masquerade_cidrs(&self) -> Vec<Ipv4Network> {
        self.non_masquerade
            .iter()
            .flat_map(|list| list.0.iter().copied())
            .collect()
    }
}

/// The CIDRs of one --non-masquerade-cidr (or of the whole variable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrList(pub Vec<Ipv4Network>);

#[derive(Debug, thiserror::Error)]
pub enum CliValueError {
    #[error("{0:?} is not an IPv4 CIDR like 10.0.0.0/8")]
    Cidr(String),
    #[error("{0:?}: want MIN-MAX, e.g. 61000-65535, with 0 < MIN <= MAX")]
    PortRange(String),
}

/// Space-, comma- or newline-separated CIDRs, host bits cleared (a bare address is a /32);
/// an empty text is an empty list (the ConfigMap's default).
fn parse_cidr_list(text: &str) -> Result<CidrList, CliValueError> {
    text.split([' ', ',', '\n'])
        .filter(|s| !s.is_empty())
        .map(|text| {
            text.parse::<Ipv4Network>()
                .ok()
                .and_then(|cidr| Ipv4Network::new(cidr.network(), cidr.prefix()).ok())
                .ok_or_else(|| CliValueError::Cidr(text.into()))
        })
        .collect::<Result<_, _>>()
        .map(CidrList)
}

/// The SNAT port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

fn parse_port_range(text: &str) -> Result<PortRange, CliValueError> {
    let bad = || CliValueError::PortRange(text.to_string());
    let (min, max) = text.split_once('-').ok_or_else(bad)?;
    let (min, max): (u16, u16) = (
        min.trim().parse().map_err(|_| bad())?,
        max.trim().parse().map_err(|_| bad())?,
    );
    if min == 0 || min > max {
        return Err(bad());
    }
    Ok(PortRange { min, max })
}

/// A level; empty (a blank ConfigMap value) is the default, warn.
fn parse_bpf_log_level(text: &str) -> Result<BpfLogLevel, crate::ebpf_log::ParseLevelError> {
    if text.trim().is_empty() {
        return Ok(BpfLogLevel::default());
    }
    text.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<AgentCli, clap::Error> {
        AgentCli::try_parse_from(std::iter::once("mycni-agent").chain(args.iter().copied()))
    }

    fn run_options(args: &[&str]) -> RunOptions {
        match parse(args).expect("parses").command {
            AgentCommand::Run(options) => *options,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        AgentCli::command().debug_assert();
    }

    #[test]
    fn flags_take_their_value_after_a_space_or_an_equals_sign() {
        let spaced = run_options(&[
            "run",
            "--node-name",
            "n1",
            "--node-ip",
            "10.0.0.1",
            "--vni",
            "7",
        ]);
        let joined = run_options(&["run", "--node-name=n1", "--node-ip=10.0.0.1", "--vni=7"]);
        assert_eq!(spaced.node_name.as_deref(), Some("n1"));
        assert_eq!(joined.node_name, spaced.node_name);
        assert_eq!(joined.node_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!((joined.vni, spaced.vni), (7, 7));
    }

    #[test]
    fn the_bpffs_root_goes_before_or_after_the_command() {
        let before = parse(&["--bpffs-root", "/x", "routes", "--json"]).unwrap();
        let after = parse(&["routes", "--bpffs-root=/x"]).unwrap();
        assert_eq!(before.bpffs_root, PathBuf::from("/x"));
        assert_eq!(after.bpffs_root, PathBuf::from("/x"));
        assert!(matches!(
            before.command,
            AgentCommand::Routes(TableFormat { json: true })
        ));
        assert!(matches!(
            after.command,
            AgentCommand::Routes(TableFormat { json: false })
        ));
        let default = parse(&["stats"]).unwrap();
        assert_eq!(
            default.bpffs_root,
            PathBuf::from(crate::cni::config::DEFAULT_BPFFS_ROOT)
        );
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let o = run_options(&["run"]);
        assert_eq!(
            o.nat_ports,
            PortRange {
                min: 61000,
                max: 65535
            }
        );
        assert_eq!(o.tunnel_mode, TunnelMode::Auto);
        assert_eq!(o.vni, 1);
        assert_eq!(o.network_name, "mycni");
        assert_eq!((o.gc_interval, o.gc_grace), (60, 60));
        assert_eq!(o.bpf_log_level, BpfLogLevel::Warn);
        assert_eq!(o.nat_timeouts(), NatTimeouts::default());
        assert_eq!(o.service_mode, ServiceMode::KubeProxy);
        assert_eq!(o.cgroup_path, None);
    }

    #[test]
    fn service_mode_and_cgroup_path_parse() {
        let o = run_options(&[
            "run",
            "--service-mode=ebpf",
            "--cgroup-path",
            "/sys/fs/cgroup/x",
        ]);
        assert_eq!(o.service_mode, ServiceMode::Ebpf);
        assert_eq!(o.cgroup_path, Some(PathBuf::from("/sys/fs/cgroup/x")));
        assert!(parse(&["run", "--service-mode", "ipvs"]).is_err());
    }

    #[test]
    fn non_masquerade_cidrs_are_repeated_flags_or_lists() {
        let o = run_options(&[
            "run",
            "--non-masquerade-cidr",
            "10.0.0.0/8",
            "--non-masquerade-cidr=192.168.0.0/16, 172.16.0.0/12",
        ]);
        let cidr = |text: &str| text.parse::<Ipv4Network>().unwrap();
        assert_eq!(
            o.non_masquerade_cidrs(),
            [
                cidr("10.0.0.0/8"),
                cidr("192.168.0.0/16"),
                cidr("172.16.0.0/12")
            ]
        );
        assert_eq!(
            parse_cidr_list("10.1.2.3/8 192.0.2.1").unwrap(),
            CidrList(vec![cidr("10.0.0.0/8"), cidr("192.0.2.1/32")])
        );
        assert_eq!(parse_cidr_list("").unwrap(), CidrList(vec![]));
        assert_eq!(parse_cidr_list(" \n").unwrap(), CidrList(vec![]));
        assert!(parse(&["run", "--non-masquerade-cidr", "10.0.0.0/33"]).is_err());
        assert!(parse(&["run", "--non-masquerade-cidr", "fd00::/8"]).is_err());
    }

    #[test]
    fn port_ranges_must_be_ordered_and_not_start_at_zero() {
        assert_eq!(
            parse_port_range("1024-2048").unwrap(),
            PortRange {
                min: 1024,
                max: 2048
            }
        );
        assert_eq!(
            parse_port_range("7-7").unwrap(),
            PortRange { min: 7, max: 7 }
        );
        for bad in ["0-10", "10-9", "10", "a-b", "1-70000", ""] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn blank_bpf_log_level_is_the_default() {
        assert_eq!(parse_bpf_log_level("").unwrap(), BpfLogLevel::Warn);
        assert_eq!(parse_bpf_log_level("debug").unwrap(), BpfLogLevel::Debug);
        assert!(parse_bpf_log_level("loud").is_err());
    }

    #[test]
    fn bad_values_and_conflicts_are_refused() {
        assert!(parse(&["run", "--node-ip", "10.0.0.300"]).is_err());
        assert!(parse(&["run", "--cluster-cidr", "10.0.0.0/31"]).is_err());
        assert!(parse(&["run", "--tunnel-mode", "gre"]).is_err());
        assert!(parse(&["run", "--kubeconfig", "k", "--in-cluster"]).is_err());
        assert!(parse(&["run", "--in-cluster", "--nodes-file", "f"]).is_err());
        assert!(parse(&["run", "--frobnicate"]).is_err());
        assert!(parse(&["routes", "--json=yes"]).is_err());
        assert!(parse(&["install-cni-plugin"]).is_err());
        assert!(parse(&[]).is_err());
    }

    /// The DaemonSet's agent container, as kubelet would start it: the ConfigMap's values
    /// in its variables, `$(VAR)`s in its arguments expanded.
    fn daemonset_agent() -> (Vec<String>, Vec<(String, String)>) {
        use serde::Deserialize;
        use serde_yaml_ng::Value;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mycni.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/mycni.yaml");
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("YAML"))
            .collect();
        let kind = |kind: &str| {
            docs.iter()
                .find(|d| d["kind"].as_str() == Some(kind))
                .unwrap_or_else(|| panic!("no {kind}"))
        };
        let config = &kind("ConfigMap")["data"];
        let containers = kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .expect("containers");
        let agent = containers
            .iter()
            .find(|c| c["name"].as_str() == Some("agent"))
            .expect("the agent container");
        let vars: Vec<(String, String)> = agent["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .map(|var| {
                let name = var["name"].as_str().expect("name").to_string();
                let from = &var["valueFrom"];
                let value = match (
                    var["value"].as_str(),
                    from["configMapKeyRef"]["key"].as_str(),
                ) {
                    (Some(value), _) => value,
                    (None, Some(key)) => config[key].as_str().expect("a ConfigMap value"),
                    (None, None) => match from["fieldRef"]["fieldPath"].as_str() {
                        Some("spec.nodeName") => "node-1",
                        Some("status.hostIP") => "192.168.1.11",
                        other => panic!("{name}: unexpected source {other:?}"),
                    },
                };
                (name, value.to_string())
            })
            .collect::<Vec<(String, String)>>();
        // kubelet expands `$(VAR)` in a value from the variables before it.
        let mut expanded: Vec<(String, String)> = Vec::new();
        for (name, mut value) in vars {
            for (earlier, earlier_value) in &expanded {
                value = value.replace(&format!("$({earlier})"), earlier_value);
            }
            expanded.push((name, value));
        }
        let vars = expanded;
        let args = agent["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .map(|arg| {
                let mut arg = arg.as_str().expect("a string").to_string();
                for (name, value) in &vars {
                    arg = arg.replace(&format!("$({name})"), value);
                }
                arg
            })
            .collect();
        (args, vars)
    }

    #[test]
    fn the_daemonsets_arguments_and_variables_parse() {
        let (args, vars) = daemonset_agent();
        // Each MYCNI_* variable must be a `run` flag's variable; given here as that flag
        // (clap reads variables from the process environment, which a test must not set).
        let command = AgentCli::command();
        let run = command.find_subcommand("run").expect("run");
        let mut flags = Vec::new();
        for (name, value) in &vars {
            let flag = run
                .get_arguments()
                .find(|arg| arg.get_env() == Some(std::ffi::OsStr::new(name)));
            match flag.and_then(|arg| arg.get_long()) {
                Some(long) => flags.push(format!("--{long}={value}")),
                None => assert!(!name.starts_with("MYCNI_"), "{name} is no flag's variable"),
            }
        }
        let cli = AgentCli::try_parse_from(
            std::iter::once("mycni-agent".to_string())
                .chain(args)
                .chain(flags),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.bpffs_root, PathBuf::from("/sys/fs/bpf/mycni"));
        let AgentCommand::Run(o) = cli.command else {
            panic!("not run");
        };
        assert!(o.in_cluster);
        assert_eq!(o.node_name.as_deref(), Some("node-1"));
        assert_eq!(
            o.cluster_cidr.map(|c| c.to_string()).as_deref(),
            Some("10.244.0.0/16")
        );
        assert_eq!(o.metrics_address.as_deref(), Some("192.168.1.11:9964"));
        assert_eq!(
            o.nat_ports,
            PortRange {
                min: 61000,
                max: 65535
            }
        );
        assert_eq!((o.tunnel_mode, o.vni), (TunnelMode::Auto, 1));
        assert_eq!(o.bpf_log_level, BpfLogLevel::Warn);
        assert!(o.non_masquerade_cidrs().is_empty());
        assert_eq!(o.api_server_port.as_deref(), Some("6443"));
        // Services stay kube-proxy's until the operator switches.
        assert_eq!(o.service_mode, crate::socket_lb::ServiceMode::KubeProxy);
        assert_eq!(o.cgroup_path, Some(PathBuf::from("/host/sys/fs/cgroup")));
    }

    #[test]
    fn the_cluster_role_only_reads_what_the_agent_watches() {
        use serde::Deserialize;
        use serde_yaml_ng::Value;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mycni.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/mycni.yaml");
        let role = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("YAML"))
            .find(|d| d["kind"].as_str() == Some("ClusterRole"))
            .expect("a ClusterRole");
        let strings = |v: &Value| -> Vec<String> {
            v.as_sequence()
                .expect("a list")
                .iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        };
        let mut granted: Vec<(String, String, Vec<String>)> = Vec::new();
        for rule in role["rules"].as_sequence().expect("rules") {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    granted.push((group.clone(), resource, strings(&rule["verbs"])));
                }
            }
        }
        granted.sort();
        let read = vec!["get".to_string(), "list".into(), "watch".into()];
        assert_eq!(
            granted,
            [
                ("".into(), "endpoints".into(), read.clone()),
                ("".into(), "namespaces".into(), read.clone()),
                ("".into(), "nodes".into(), read.clone()),
                ("".into(), "pods".into(), read.clone()),
                ("".into(), "services".into(), read.clone()),
                ("networking.k8s.io".into(), "networkpolicies".into(), read),
            ]
        );
    }

    #[test]
    fn the_policy_command_needs_the_agents_address() {
        let cli =
            parse(&["policy", "--metrics-address", "192.168.1.11:9964", "--json"]).expect("parses");
        let AgentCommand::Policy(args) = cli.command else {
            panic!("not policy");
        };
        assert_eq!(args.metrics_address, "192.168.1.11:9964");
        assert!(args.json);
    }

    #[test]
    fn every_subcommand_has_help() {
        for sub in AgentCli::command().get_subcommands() {
            let name = sub.get_name().to_string();
            let err = parse(&[&name, "--help"]).expect_err("help exits");
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{name}");
        }
    }
}
