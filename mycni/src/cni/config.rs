//! The network configuration on stdin: a single plugin's `.conf`, or a whole `.conflist`
//! from which mycni's entry is taken. Unknown fields are ignored, as the spec asks.
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::error::{CniError, ErrorCode};
use super::version::CniVersion;
use crate::ipam::Pool;
use crate::socket_lb::ServiceMode;
use mycni_common::service::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/mycni";
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/mycni";
/// The `type` mycni's entry has in a conflist.
pub const PLUGIN_TYPE: &str = "mycni";

/// An attachment the runtime still uses, from GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// A pod's hostPort, from `runtimeConfig.portMappings` (the `portMappings` capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// An IP protocol number (`mycni_common::service::PROTO_*`).
    pub protocol: u8,
    /// `None`: every address of the node (hostIP unset, empty or 0.0.0.0).
    pub host_ip: Option<Ipv4Addr>,
}

/// The conflist a node runs with. With kube-proxy balancing Services: mycni, then the
/// reference portmap for hostPorts (iptables DNAT, as kube-proxy's nodes expect). With
/// mycni balancing them (`ServiceMode::Ebpf`): mycni alone, taking the `portMappings`
/// capability itself (its socket programs translate hostPorts; no iptables).
pub fn conflist(
    network: &str,
    pod_cidr: &Pool,
    mtu: u32,
    data_dir: &std::path::Path,
    bpffs_root: &std::path::Path,
    service_mode: ServiceMode,
) -> Value {
    let mut mycni = serde_json::json!({
        "type": PLUGIN_TYPE,
        "podCIDR": pod_cidr.to_string(),
        "mtu": mtu,
        "dataDir": data_dir,
        "bpffsRoot": bpffs_root,
    });
    let plugins = match service_mode {
        ServiceMode::KubeProxy => vec![
            mycni,
            serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ],
        ServiceMode::Ebpf => {
            mycni["capabilities"] = serde_json::json!({"portMappings": true});
            vec![mycni]
        }
    };
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"],
        "name": network,
        "plugins": plugins,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    /// The network name; allocations are kept per network.
    pub name: String,
    /// The node's pod CIDR; required by ADD only.
    pub pod_cidr: Option<Pool>,
    pub mtu: u32,
    pub data_dir: PathBuf,
    pub bpffs_root: PathBuf,
    /// Static IPs from `runtimeConfig.ips` (the `ips` capability).
    pub runtime_ips: Vec<Ipv4Addr>,
    /// hostPorts from `runtimeConfig.portMappings` (the `portMappings` capability).
    pub port_mappings: Vec<PortMapping>,
    /// The previous plugin's result (CHECK, DEL, and ADD when chained after another).
    pub prev_result: Option<Value>,
    /// GC only: `None` when the key is absent.
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let root: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                ErrorCode::DecodeFailure,
                "network configuration is not valid JSON",
            )
            .with_details(e)
        })?;
        let Value::Object(root) = root else {
            return Err(invalid("network configuration must be a JSON object"));
        };
        let cni_version = version_of(&root)?;
        let name = string_field(&root, "name")?
            .ok_or_else(|| invalid("\"name\" is required"))?
            .to_string();
        // A conflist: mycni's own entry holds the plugin settings.
        let plugin = match root.get("plugins") {
            None => &root,
            Some(Value::Array(plugins)) => plugins
                .iter()
                .filter_map(Value::as_object)
                .find(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
                .ok_or_else(|| invalid("the conflist has no plugin of type \"mycni\""))?,
            Some(_) => return Err(invalid("\"plugins\" must be an array")),
        };
        if root.get("plugins").is_none() && string_field(plugin, "type")?.is_none() {
            return Err(invalid("\"type\" is required"));
        }
        // mycni allocates from the node's pod CIDR itself; a delegated IPAM plugin would be
        // silently ignored, so it is refused instead.
        if let Some(ipam) = plugin.get("ipam").filter(|v| !v.is_null()) {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                format!("unsupported field \"ipam\": {ipam}"),
            )
            .with_details("mycni allocates from \"podCIDR\"; remove the ipam section"));
        }
        let pod_cidr = string_field(plugin, "podCIDR")?
            .map(|text| {
                Pool::parse(text).map_err(|e| {
                    invalid(format!("\"podCIDR\" {text:?} is invalid")).with_details(e)
                })
            })
            .transpose()?;
        let mtu = match plugin.get("mtu") {
            None | Some(Value::Null) => DEFAULT_MTU,
            Some(value) => value
                .as_u64()
                .filter(|mtu| (68..=65535).contains(mtu))
                .map(|mtu| mtu as u32)
                .ok_or_else(|| invalid(format!("\"mtu\" {value} is not between 68 and 65535")))?,
        };
        let path_or = |key: &str, default: &str| -> Result<PathBuf, CniError> {
            Ok(PathBuf::from(string_field(plugin, key)?.unwrap_or(default)))
        };
        Ok(NetConf {
            cni_version,
            name,
            pod_cidr,
            mtu,
            data_dir: path_or("dataDir", DEFAULT_DATA_DIR)?,
            bpffs_root: path_or("bpffsRoot", DEFAULT_BPFFS_ROOT)?,
            runtime_ips: runtime_ips(plugin)?,
            port_mappings: port_mappings(plugin)?,
            prev_result: plugin.get("prevResult").filter(|v| !v.is_null()).cloned(),
            valid_attachments: valid_attachments(plugin)?,
        })
    }

    /// Best effort, for stamping an error when the config itself is what failed.
    pub fn sniff_version(bytes: &[u8]) -> CniVersion {
        serde_json::from_slice::<Value>(bytes)
            .ok()
            .as_ref()
            .and_then(Value::as_object)
            .and_then(|root| version_of(root).ok())
            .unwrap_or(CniVersion::LATEST)
    }
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg)
}

fn string_field<'a>(
    object: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, CniError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(invalid(format!("\"{key}\" must be a string, not {other}"))),
    }
}

/// `cniVersion`, or the newest of a conflist's `cniVersions` that mycni speaks.
fn version_of(root: &Map<String, Value>) -> Result<CniVersion, CniError> {
    if let Some(text) = string_field(root, "cniVersion")? {
        return Ok(CniVersion::parse(text)?);
    }
    match root.get("cniVersions") {
        Some(Value::Array(list)) => {
            let offered: Vec<String> = list
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect();
            Ok(CniVersion::negotiate(&offered)?)
        }
        _ => Err(invalid("\"cniVersion\" is required")),
    }
}

fn runtime_ips(plugin: &Map<String, Value>) -> Result<Vec<Ipv4Addr>, CniError> {
    let Some(ips) = plugin.get("runtimeConfig").and_then(|rc| rc.get("ips")) else {
        return Ok(Vec::new());
    };
    let Value::Array(ips) = ips else {
        return Err(invalid("\"runtimeConfig.ips\" must be an array"));
    };
    ips.iter()
        .map(|ip| {
            if ip.as_str().is_some_and(|text| text.contains(':')) {
                return Err(CniError::new(
                    ErrorCode::UnsupportedField,
                    format!("unsupported field \"runtimeConfig.ips\": {ip} (mycni is IPv4 only)"),
                ));
            }
            // An address, with or without its prefix length.
            ip.as_str()
                .and_then(|text| text.parse::<ipnetwork::Ipv4Network>().ok())
                .map(|cidr| cidr.ip())
                .ok_or_else(|| {
                    invalid(format!(
                        "runtimeConfig.ips entry {ip} is not an IPv4 address"
                    ))
                })
        })
        .collect()
}

/// `runtimeConfig.portMappings`: `[{hostPort, containerPort, protocol, hostIP}]` as
/// runtimes pass them (protocol lower case, hostIP empty when unset). Keys match without
/// regard to case, as Go's JSON decoding (portmap's) does: containerd's go-cni writes
/// `{"HostPort":..,"ContainerPort":..,"Protocol":..,"HostIP":..}`.
fn port_mappings(plugin: &Map<String, Value>) -> Result<Vec<PortMapping>, CniError> {
    let Some(list) = plugin
        .get("runtimeConfig")
        .and_then(|rc| rc.get("portMappings"))
        .filter(|v| !v.is_null())
    else {
        return Ok(Vec::new());
    };
    let Value::Array(list) = list else {
        return Err(invalid("\"runtimeConfig.portMappings\" must be an array"));
    };
    list.iter().map(port_mapping).collect()
}

fn port_mapping(entry: &Value) -> Result<PortMapping, CniError> {
    let Value::Object(fields) = entry else {
        return Err(invalid(format!(
            "portMappings entry {entry} must be an object"
        )));
    };
    // The exact key first, else the first that differs only in case.
    let get = |key: &str| -> Option<&Value> {
        fields.get(key).or_else(|| {
            fields
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(key))
                .map(|(_, value)| value)
        })
    };
    let port = |key: &str| -> Result<u16, CniError> {
        get(key)
            .and_then(Value::as_u64)
            .filter(|port| (1..=65535).contains(port))
            .map(|port| port as u16)
            .ok_or_else(|| {
                invalid(format!(
                    "portMappings entry {entry}: \"{key}\" must be a port from 1 to 65535"
                ))
            })
    };
    let text = |key: &str| -> Result<&str, CniError> {
        match get(key) {
            None | Some(Value::Null) => Ok(""),
            Some(Value::String(text)) => Ok(text),
            Some(other) => Err(invalid(format!(
                "portMappings entry {entry}: \"{key}\" must be a string, not {other}"
            ))),
        }
    };
    let protocol = match text("protocol")?.to_ascii_lowercase().as_str() {
        // Kubernetes' default, and portmap's reading of an absent protocol.
        "" | "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "sctp" => PROTO_SCTP,
        other => {
            return Err(invalid(format!(
                "portMappings entry {entry}: unknown protocol {other:?} (tcp, udp or sctp)"
            )))
        }
    };
    let host_ip = match text("hostIP")? {
        "" => None,
        ip if ip.contains(':') => {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                format!("unsupported portMappings hostIP {ip} (mycni is IPv4 only)"),
            ))
        }
        ip => {
            let ip: Ipv4Addr = ip.parse().map_err(|_| {
                invalid(format!(
                    "portMappings entry {entry}: hostIP {ip:?} is not an IPv4 address"
                ))
            })?;
            Some(ip).filter(|ip| !ip.is_unspecified())
        }
    };
    Ok(PortMapping {
        host_port: port("hostPort")?,
        container_port: port("containerPort")?,
        protocol,
        host_ip,
    })
}

fn valid_attachments(plugin: &Map<String, Value>) -> Result<Option<Vec<Attachment>>, CniError> {
    let Some(list) = plugin.get("cni.dev/valid-attachments") else {
        return Ok(None);
    };
    let Value::Array(list) = list else {
        return Err(invalid("\"cni.dev/valid-attachments\" must be an array"));
    };
    list.iter()
        .map(|entry| {
            let field = |key: &str| entry.get(key).and_then(Value::as_str).map(String::from);
            match (field("containerID"), field("ifname")) {
                (Some(container_id), Some(ifname)) => Ok(Attachment {
                    container_id,
                    ifname,
                }),
                _ => Err(invalid(format!(
                    "valid-attachments entry {entry} needs containerID and ifname"
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NetConf, CniError> {
        NetConf::parse(text.as_bytes())
    }

    #[test]
    fn reads_a_plain_conf_with_defaults() {
        let conf = parse(
            r#"{"cniVersion":"0.4.0","name":"pods","type":"mycni","podCIDR":"10.244.1.0/24"}"#,
        )
        .unwrap();
        assert_eq!(conf.cni_version, CniVersion::V0_4_0);
        assert_eq!(conf.name, "pods");
        assert_eq!(conf.mtu, DEFAULT_MTU);
        assert_eq!(conf.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(
            conf.pod_cidr.map(|p| p.to_string()),
            Some("10.244.1.0/24".into())
        );
    }

    #[test]
    fn reads_mycni_entry_of_a_conflist_and_negotiates_cni_versions() {
        let conf = parse(
            r#"{"cniVersions":["0.3.1","1.0.0","7.0.0"],"name":"k8s","plugins":[
                {"type":"mycni","podCIDR":"10.244.2.0/24","mtu":1450,"future":{"x":1}},
                {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        assert_eq!(conf.cni_version, CniVersion::V1_0_0);
        assert_eq!(conf.mtu, 1450);
    }

    #[test]
    fn reads_runtime_ips_prev_result_and_gc_attachments() {
        let conf = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"mycni",
                "runtimeConfig":{"ips":["10.244.1.9/24"]},
                "prevResult":{"cniVersion":"1.1.0","ips":[]},
                "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.runtime_ips, vec![Ipv4Addr::new(10, 244, 1, 9)]);
        assert!(conf.prev_result.is_some());
        assert_eq!(conf.valid_attachments.map(|a| a.len()), Some(1));
    }

    #[test]
    fn reads_port_mappings_with_kubernetes_defaults() {
        let conf = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"mycni","runtimeConfig":{"portMappings":[
                {"hostPort":54321,"containerPort":8080,"protocol":"tcp","hostIP":"127.0.0.1"},
                {"hostPort":54321,"containerPort":8080,"protocol":"UDP","hostIP":""},
                {"hostPort":80,"containerPort":8080,"protocol":"sctp","hostIP":"0.0.0.0"},
                {"hostPort":81,"containerPort":81}]}}"#,
        )
        .unwrap();
        let mapping = |host_port, protocol, host_ip| PortMapping {
            host_port,
            container_port: if host_port == 81 { 81 } else { 8080 },
            protocol,
            host_ip,
        };
        assert_eq!(
            conf.port_mappings,
            [
                mapping(54321, PROTO_TCP, Some(Ipv4Addr::LOCALHOST)),
                mapping(54321, PROTO_UDP, None),
                mapping(80, PROTO_SCTP, None),
                mapping(81, PROTO_TCP, None),
            ]
        );
        // containerd's go-cni names the keys as its Go fields.
        let containerd = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"mycni","runtimeConfig":{"portMappings":[
                {"ContainerPort":80,"HostIP":"127.0.0.1","HostPort":54321,"Protocol":"tcp"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            containerd.port_mappings,
            [PortMapping {
                host_port: 54321,
                container_port: 80,
                protocol: PROTO_TCP,
                host_ip: Some(Ipv4Addr::LOCALHOST),
            }]
        );
        let none = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"mycni"}"#).unwrap();
        assert!(none.port_mappings.is_empty());
    }

    #[test]
    fn bad_port_mappings_are_refused() {
        let with = |mappings: &str| {
            format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"mycni","runtimeConfig":{{"portMappings":{mappings}}}}}"#
            )
        };
        let cases = [
            (with(r#"{"hostPort":80}"#), ErrorCode::InvalidConfig),
            (with(r#"[80]"#), ErrorCode::InvalidConfig),
            (with(r#"[{"containerPort":80}]"#), ErrorCode::InvalidConfig),
            (
                with(r#"[{"hostPort":0,"containerPort":80}]"#),
                ErrorCode::InvalidConfig,
            ),
            (
                with(r#"[{"hostPort":70000,"containerPort":80}]"#),
                ErrorCode::InvalidConfig,
            ),
            (
                with(r#"[{"hostPort":80,"containerPort":80,"protocol":"icmp"}]"#),
                ErrorCode::InvalidConfig,
            ),
            (
                with(r#"[{"hostPort":80,"containerPort":80,"hostIP":"node"}]"#),
                ErrorCode::InvalidConfig,
            ),
            (
                with(r#"[{"hostPort":80,"containerPort":80,"hostIP":"::1"}]"#),
                ErrorCode::UnsupportedField,
            ),
        ];
        for (text, code) in cases {
            assert_eq!(parse(&text).unwrap_err().code, code, "{text}");
        }
    }

    #[test]
    fn bad_configs_get_the_right_codes() {
        let cases = [
            ("{not json", ErrorCode::DecodeFailure),
            ("[]", ErrorCode::InvalidConfig),
            (r#"{"name":"n","type":"mycni"}"#, ErrorCode::InvalidConfig),
            (
                r#"{"cniVersion":"0.2.0","name":"n","type":"mycni"}"#,
                ErrorCode::IncompatibleVersion,
            ),
            (
                r#"{"cniVersion":"1.0.0","type":"mycni"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"mycni","mtu":10}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"mycni","mtu":"x"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"mycni","podCIDR":"10.1.0.0/33"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersions":["0.1.0"],"name":"n","plugins":[{"type":"mycni"}]}"#,
                ErrorCode::IncompatibleVersion,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"mycni","ipam":{"type":"host-local"}}"#,
                ErrorCode::UnsupportedField,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"mycni","runtimeConfig":{"ips":["fd00::5/64"]}}"#,
                ErrorCode::UnsupportedField,
            ),
        ];
        for (text, code) in cases {
            assert_eq!(parse(text).unwrap_err().code, code, "{text}");
        }
    }

    #[test]
    fn the_node_conflist_parses_back() {
        let pool = Pool::parse("10.244.1.0/24").unwrap();
        for mode in [ServiceMode::KubeProxy, ServiceMode::Ebpf] {
            let list = conflist(
                "mycni",
                &pool,
                1450,
                std::path::Path::new("/d"),
                std::path::Path::new("/b"),
                mode,
            );
            let conf = NetConf::parse(list.to_string().as_bytes()).unwrap();
            // cniVersion wins over cniVersions: 1.0.0 is what runtimes with libcni 1.1 speak.
            assert_eq!(conf.cni_version, CniVersion::V1_0_0);
            assert_eq!((conf.mtu, conf.pod_cidr), (1450, Some(pool)));
            assert_eq!(conf.bpffs_root, PathBuf::from("/b"));
        }
    }

    /// kube-proxy mode chains portmap for hostPorts; eBPF mode takes them itself.
    #[test]
    fn host_ports_go_to_portmap_or_to_mycni_by_service_mode() {
        let pool = Pool::parse("10.244.1.0/24").unwrap();
        let list = |mode| {
            let path = std::path::Path::new("/d");
            conflist("mycni", &pool, 1500, path, path, mode)
        };
        let kube_proxy = list(ServiceMode::KubeProxy);
        let plugins = kube_proxy["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0].get("capabilities"), None);
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
        let ebpf = list(ServiceMode::Ebpf);
        let plugins = ebpf["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 1, "no portmap: {ebpf}");
        assert_eq!(plugins[0]["type"], PLUGIN_TYPE);
        assert_eq!(plugins[0]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn sniffs_a_version_for_error_replies() {
        assert_eq!(
            NetConf::sniff_version(br#"{"cniVersion":"0.3.1"}"#),
            CniVersion::V0_3_1
        );
        assert_eq!(NetConf::sniff_version(b"garbage"), CniVersion::LATEST);
    }
}
