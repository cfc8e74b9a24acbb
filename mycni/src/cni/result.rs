//! The ADD result, shaped per the requested version, and its reading back from
//! `prevResult` (CHECK compares against it).
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde_json::{json, Value};

use super::error::{CniError, ErrorCode};
use super::version::CniVersion;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; `None` on the host.
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// The address with its prefix length, as the spec writes it (`10.244.1.2/32`).
    pub address: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: Ipv4Network,
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteEntry>,
    pub dns: Value,
}

impl CniResult {
    pub fn to_json(&self, version: CniVersion) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|iface| {
                let mut value = json!({ "name": iface.name, "mac": iface.mac });
                if let (Some(mtu), true) = (iface.mtu, version >= CniVersion::V1_1_0) {
                    value["mtu"] = json!(mtu);
                }
                if let Some(sandbox) = &iface.sandbox {
                    value["sandbox"] = json!(sandbox);
                }
                value
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut value = json!({ "address": ip.address.to_string() });
                // 0.3.x and 0.4.0 tag each address with its IP version; 1.0.0 dropped it.
                if version < CniVersion::V1_0_0 {
                    value["version"] = json!("4");
                }
                if let Some(gateway) = ip.gateway {
                    value["gateway"] = json!(gateway.to_string());
                }
                if let Some(interface) = ip.interface {
                    value["interface"] = json!(interface);
                }
                value
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|route| {
                let mut value = json!({ "dst": route.dst.to_string() });
                if let Some(gw) = route.gw {
                    value["gw"] = json!(gw.to_string());
                }
                value
            })
            .collect();
        let dns = if self.dns.is_null() {
            json!({})
        } else {
            self.dns.clone()
        };
        json!({
            "cniVersion": version.as_str(),
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": dns,
        })
    }

    /// Reads a result of any supported version (a `prevResult`).
    pub fn from_json(value: &Value) -> Result<CniResult, CniError> {
        let bad =
            |what: String| CniError::new(ErrorCode::DecodeFailure, format!("prevResult: {what}"));
        let list = |key: &str| -> Result<Vec<Value>, CniError> {
            match value.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => Ok(items.clone()),
                Some(_) => Err(bad(format!("\"{key}\" must be an array"))),
            }
        };
        let text =
            |item: &Value, key: &str| item.get(key).and_then(Value::as_str).map(String::from);
        let interfaces = list("interfaces")?
            .iter()
            .map(|item| {
                Ok(Interface {
                    name: text(item, "name").ok_or_else(|| bad("interface without name".into()))?,
                    mac: text(item, "mac").unwrap_or_default(),
                    mtu: item.get("mtu").and_then(Value::as_u64).map(|m| m as u32),
                    sandbox: text(item, "sandbox").filter(|s| !s.is_empty()),
                })
            })
            .collect::<Result<Vec<_>, CniError>>()?;
        let ips = list("ips")?
            .iter()
            .filter(|item| text(item, "version").as_deref() != Some("6"))
            .filter_map(|item| {
                // IPv6 entries of another plugin are carried, not checked.
                let address = text(item, "address")?.parse().ok()?;
                Some((item, address))
            })
            .map(|(item, address)| IpConfig {
                address,
                gateway: text(item, "gateway").and_then(|g| g.parse().ok()),
                interface: item
                    .get("interface")
                    .and_then(Value::as_u64)
                    .map(|i| i as usize),
            })
            .collect();
        let routes = list("routes")?
            .iter()
            .filter_map(|item| {
                Some(RouteEntry {
                    dst: text(item, "dst")?.parse().ok()?,
                    gw: text(item, "gw").and_then(|g| g.parse().ok()),
                })
            })
            .collect();
        Ok(CniResult {
            interfaces,
            ips,
            routes,
            dns: value.get("dns").cloned().unwrap_or(Value::Null),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "lxc1".into(),
                    mac: "aa:bb:cc:dd:ee:01".into(),
                    mtu: Some(1500),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:02".into(),
                    mtu: Some(1500),
                    sandbox: Some("/var/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: Ipv4Network::from(Ipv4Addr::new(10, 244, 1, 2)),
                gateway: Some(Ipv4Addr::new(169, 254, 1, 1)),
                interface: Some(1),
            }],
            routes: vec![RouteEntry {
                dst: Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).unwrap(),
                gw: Some(Ipv4Addr::new(169, 254, 1, 1)),
            }],
            dns: Value::Null,
        }
    }

    #[test]
    fn old_versions_tag_ips_with_version_4() {
        for version in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let value = sample().to_json(version);
            assert_eq!(value["cniVersion"], version.as_str());
            assert_eq!(value["ips"][0]["version"], "4");
            assert!(value["interfaces"][0].get("mtu").is_none());
        }
    }

    #[test]
    fn new_versions_drop_ip_version_and_1_1_adds_mtu() {
        let v100 = sample().to_json(CniVersion::V1_0_0);
        assert!(v100["ips"][0].get("version").is_none());
        assert!(v100["interfaces"][1].get("mtu").is_none());
        let v110 = sample().to_json(CniVersion::V1_1_0);
        assert_eq!(v110["interfaces"][1]["mtu"], 1500);
        assert_eq!(v110["ips"][0]["address"], "10.244.1.2/32");
        assert_eq!(v110["ips"][0]["interface"], 1);
        assert_eq!(v110["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(v110["interfaces"][1]["sandbox"], "/var/run/netns/p");
        assert!(v110["interfaces"][0].get("sandbox").is_none());
    }

    #[test]
    fn round_trips_through_prev_result() {
        for version in CniVersion::ALL {
            let back = CniResult::from_json(&sample().to_json(version)).unwrap();
            assert_eq!(back.ips, sample().ips, "{version}");
            assert_eq!(back.routes, sample().routes);
            assert_eq!(back.interfaces[1].sandbox, sample().interfaces[1].sandbox);
        }
    }

    #[test]
    fn cidrs_keep_their_text_through_a_round_trip() {
        // Host bits stay (an address is not a network), prefixes as written.
        let prev = json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1"},
                    {"address": "fd00::7/64"}],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.244.1.1"},
                       {"dst": "fd00::/8"}],
        });
        let result = CniResult::from_json(&prev).unwrap();
        assert_eq!(result.ips.len(), 1, "IPv6 entries are not ours to check");
        assert_eq!(result.ips[0].address.ip(), Ipv4Addr::new(10, 244, 1, 7));
        assert_eq!(result.ips[0].address.prefix(), 24);
        let back = result.to_json(CniVersion::V1_0_0);
        assert_eq!(back["ips"][0]["address"], "10.244.1.7/24");
        assert_eq!(back["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(back["routes"][1]["dst"], "192.168.0.0/16");
        assert_eq!(back["routes"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn the_result_json_is_byte_for_byte_the_spec_shape() {
        assert_eq!(
            serde_json::to_string(&sample().to_json(CniVersion::V1_1_0)).unwrap(),
            r#"{"cniVersion":"1.1.0","dns":{},"interfaces":[{"mac":"aa:bb:cc:dd:ee:01","mtu":1500,"name":"lxc1"},{"mac":"aa:bb:cc:dd:ee:02","mtu":1500,"name":"eth0","sandbox":"/var/run/netns/p"}],"ips":[{"address":"10.244.1.2/32","gateway":"169.254.1.1","interface":1}],"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"}]}"#
        );
    }

    #[test]
    fn rejects_malformed_prev_result() {
        let err = CniResult::from_json(&json!({"interfaces": 3})).unwrap_err();
        assert_eq!(err.code, ErrorCode::DecodeFailure);
    }
}
