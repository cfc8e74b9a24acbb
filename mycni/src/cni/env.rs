//! The CNI environment variables, read through a lookup function so tests need no process
//! environment.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::error::{CniError, ErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(text: &str) -> Option<Command> {
        Some(match text {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

/// What the runtime told us through the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    /// Empty when the runtime has no netns any more (DEL only).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
    pub path: String,
}

impl CniEnv {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let command_text = lookup("CNI_COMMAND").ok_or_else(|| missing("CNI_COMMAND"))?;
        let command = Command::parse(&command_text)
            .ok_or_else(|| invalid(format!("unknown CNI_COMMAND {command_text:?}")))?;
        let needs = |name: &str, required: bool| -> Result<String, CniError> {
            match lookup(name) {
                Some(value) if !value.is_empty() => Ok(value),
                _ if required => Err(missing(name)),
                _ => Ok(String::new()),
            }
        };
        let sandboxed = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = needs("CNI_CONTAINERID", sandboxed)?;
        let netns = needs(
            "CNI_NETNS",
            matches!(command, Command::Add | Command::Check),
        )?;
        let ifname = needs("CNI_IFNAME", sandboxed)?;
        let path = needs("CNI_PATH", sandboxed)?;
        if sandboxed {
            validate_container_id(&container_id)?;
            validate_ifname(&ifname)?;
        }
        let args = parse_args(&lookup("CNI_ARGS").unwrap_or_default())?;
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }

    /// A static IP asked for with `CNI_ARGS=IP=a.b.c.d`.
    pub fn requested_ip(&self) -> Result<Option<Ipv4Addr>, CniError> {
        match self.args.get("IP") {
            None => Ok(None),
            Some(text) => text
                .split('/')
                .next()
                .and_then(|ip| ip.parse().ok())
                .map(Some)
                .ok_or_else(|| invalid(format!("CNI_ARGS IP={text:?} is not an IPv4 address"))),
        }
    }
}

fn missing(name: &str) -> CniError {
    CniError::new(ErrorCode::InvalidEnvironment, format!("{name} is not set"))
}

fn invalid(msg: String) -> CniError {
    CniError::new(ErrorCode::InvalidEnvironment, msg)
}

/// The spec allows letters, digits, `_`, `.` and `-`; the ID also names files and links.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("invalid CNI_CONTAINERID {id:?}")))
    }
}

/// Linux interface names: at most 15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("invalid CNI_IFNAME {name:?}")))
    }
}

/// `K1=V1;K2=V2`. Unknown keys are kept and ignored by the plugin.
fn parse_args(text: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut args = BTreeMap::new();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("CNI_ARGS entry {pair:?} is not KEY=VALUE")))?;
        args.insert(key.to_string(), value.to_string());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|name| map.get(name).cloned())
    }

    const ADD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn reads_a_complete_add() {
        let env = env_of(&ADD).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.container_id, "abc123");
        assert_eq!(env.ifname, "eth0");
    }

    #[test]
    fn every_missing_variable_is_code_4() {
        for (skip, missing) in ADD.iter().enumerate() {
            let pairs: Vec<_> = ADD
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, p)| *p)
                .collect();
            let err = env_of(&pairs).unwrap_err();
            assert_eq!(
                err.code,
                ErrorCode::InvalidEnvironment,
                "without {missing:?}"
            );
        }
    }

    #[test]
    fn del_tolerates_an_empty_netns() {
        let mut pairs = ADD.to_vec();
        pairs[0] = ("CNI_COMMAND", "DEL");
        pairs[2] = ("CNI_NETNS", "");
        assert_eq!(env_of(&pairs).unwrap().netns, "");
    }

    #[test]
    fn version_needs_nothing_else() {
        assert_eq!(
            env_of(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
    }

    #[test]
    fn rejects_bad_identifiers_and_commands() {
        for (key, value) in [
            ("CNI_COMMAND", "FROB"),
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_IFNAME", "a-very-long-interface-name"),
            ("CNI_IFNAME", "eth/0"),
            ("CNI_ARGS", "IP"),
        ] {
            let mut pairs = ADD.to_vec();
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, value));
            assert_eq!(
                env_of(&pairs).unwrap_err().code,
                ErrorCode::InvalidEnvironment,
                "{key}={value}"
            );
        }
    }

    #[test]
    fn parses_static_ip_and_ignores_unknown_args() {
        let mut pairs = ADD.to_vec();
        pairs.push(("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.244.1.7"));
        let env = env_of(&pairs).unwrap();
        assert_eq!(
            env.requested_ip().unwrap(),
            Some(Ipv4Addr::new(10, 244, 1, 7))
        );
        let mut bad = ADD.to_vec();
        bad.push(("CNI_ARGS", "IP=ten"));
        assert!(env_of(&bad).unwrap().requested_ip().is_err());
    }
}
