//! Where the API server is and how to prove who we are, from a kubeconfig or from the
//! service account Kubernetes mounts into every pod. Pure: file contents come in, file
//! paths to read come out.
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where a service account's credentials are mounted in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeConfigError {
    #[error("kubeconfig is not valid YAML: {0}")]
    Syntax(String),
    #[error("kubeconfig has no current-context and more than one context")]
    NoContext,
    #[error("kubeconfig names {kind} {name:?}, which it does not define")]
    Missing { kind: &'static str, name: String },
    #[error("server {0:?}: only https://host[:port] is supported")]
    Server(String),
    #[error("{0}: not valid base64")]
    Base64(&'static str),
    #[error("user {0:?} has a client certificate without a key, or a key without a certificate")]
    HalfClientCert(String),
    #[error("in-cluster: {0} is not set (not running in a pod?)")]
    NotInCluster(&'static str),
}

/// Bytes given inline or a file to read them from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Material {
    Inline(Vec<u8>),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    ClientCertificate {
        cert: Material,
        key: Material,
    },
    /// A bearer token; a file is re-read for every request, since projected tokens rotate.
    Token(Material),
    Anonymous,
}

/// Everything needed to reach the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAccess {
    pub host: String,
    pub port: u16,
    /// CA bundle that signs the server's certificate.
    pub certificate_authority: Material,
    pub credentials: Credentials,
}

impl ApiAccess {
    /// The `Host` header value.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Splits `https://host[:port][/]` into host and port.
pub fn parse_server(server: &str) -> Result<(String, u16), KubeConfigError> {
    let bad = || KubeConfigError::Server(server.to_string());
    let rest = server.strip_prefix("https://").ok_or_else(bad)?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(bad());
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(text) => text.parse().map_err(|_| bad())?,
        None => 443,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

#[derive(Deserialize)]
struct KubeConfigYaml {
    #[serde(rename = "current-context", default)]
    current_context: String,
    #[serde(default)]
    contexts: Vec<Named<ContextYaml>>,
    #[serde(default)]
    clusters: Vec<Named<ClusterYaml>>,
    #[serde(default)]
    users: Vec<Named<UserYaml>>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "context", alias = "cluster", alias = "user")]
    value: T,
}

#[derive(Deserialize)]
struct ContextYaml {
    cluster: String,
    #[serde(default)]
    user: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterYaml {
    server: String,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct UserYaml {
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
}

/// Reads a kubeconfig's current context. Relative file paths are taken from `dir`, the
/// kubeconfig's own directory, as kubectl does.
pub fn parse_kubeconfig(text: &str, dir: &Path) -> Result<ApiAccess, KubeConfigError> {
    let config: KubeConfigYaml =
        serde_yaml_ng::from_str(text).map_err(|e| KubeConfigError::Syntax(e.to_string()))?;
    let context = if config.current_context.is_empty() {
        match config.contexts.as_slice() {
            [only] => &only.value,
            _ => return Err(KubeConfigError::NoContext),
        }
    } else {
        find(&config.contexts, &config.current_context, "context")?
    };
    let cluster = find(&config.clusters, &context.cluster, "cluster")?;
    let user = if context.user.is_empty() {
        &UserYaml::default()
    } else {
        find(&config.users, &context.user, "user")?
    };
    let (host, port) = parse_server(&cluster.server)?;
    let material =
        |data: &Option<String>, file: &Option<String>, what: &'static str| match (data, file) {
            (Some(data), _) => base64_decode(data)
                .map(|bytes| Some(Material::Inline(bytes)))
                .ok_or(KubeConfigError::Base64(what)),
            (None, Some(path)) => Ok(Some(Material::File(dir.join(path)))),
            (None, None) => Ok(None),
        };
    let certificate_authority = material(
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
        "certificate-authority-data",
    )?
    // No CA given: the system's bundle, as kubectl would use.
    .unwrap_or_else(|| Material::File(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")));
    let cert = material(
        &user.client_certificate_data,
        &user.client_certificate,
        "client-certificate-data",
    )?;
    let key = material(&user.client_key_data, &user.client_key, "client-key-data")?;
    let credentials = match (cert, key, &user.token, &user.token_file) {
        (Some(cert), Some(key), _, _) => Credentials::ClientCertificate { cert, key },
        (Some(_), None, _, _) | (None, Some(_), _, _) => {
            return Err(KubeConfigError::HalfClientCert(context.user.clone()))
        }
        (None, None, Some(token), _) => Credentials::Token(Material::Inline(token.clone().into())),
        (None, None, None, Some(file)) => Credentials::Token(Material::File(dir.join(file))),
        (None, None, None, None) => Credentials::Anonymous,
    };
    Ok(ApiAccess {
        host,
        port,
        certificate_authority,
        credentials,
    })
}

fn find<'a, T>(
    items: &'a [Named<T>],
    name: &str,
    kind: &'static str,
) -> Result<&'a T, KubeConfigError> {
    items
        .iter()
        .find(|item| item.name == name)
        .map(|item| &item.value)
        .ok_or_else(|| KubeConfigError::Missing {
            kind,
            name: name.to_string(),
        })
}

/// The API server as a pod sees it: the `kubernetes` Service from the environment kubelet
/// sets, and the mounted service account token and CA.
pub fn in_cluster(
    service_host: Option<&str>,
    service_port: Option<&str>,
    account_dir: &Path,
) -> Result<ApiAccess, KubeConfigError> {
    let host = service_host
        .filter(|h| !h.is_empty())
        .ok_or(KubeConfigError::NotInCluster("KUBERNETES_SERVICE_HOST"))?;
    let port = service_port
        .ok_or(KubeConfigError::NotInCluster("KUBERNETES_SERVICE_PORT"))?
        .parse()
        .map_err(|_| KubeConfigError::Server(format!("port {service_port:?}")))?;
    Ok(ApiAccess {
        host: host.to_string(),
        port,
        certificate_authority: Material::File(account_dir.join("ca.crt")),
        credentials: Credentials::Token(Material::File(account_dir.join("token"))),
    })
}

/// Standard base64 (with or without padding), as kubeconfig `*-data` fields hold.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in text.bytes().filter(|b| !b.is_ascii_whitespace()) {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers() {
        assert_eq!(
            parse_server("https://10.0.0.1:6443"),
            Ok(("10.0.0.1".into(), 6443))
        );
        assert_eq!(
            parse_server("https://api.example/"),
            Ok(("api.example".into(), 443))
        );
        assert_eq!(
            parse_server("https://[fd00::1]:6443"),
            Ok(("fd00::1".into(), 6443))
        );
        for bad in [
            "http://h:80",
            "https://",
            "https://h:x",
            "https://h/prefix",
            "h:6443",
        ] {
            assert!(parse_server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("aGVsbG8"), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("aGk=\n"), Some(b"hi".to_vec()));
        assert_eq!(base64_decode("a$b"), None);
    }

    const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
current-context: agent@lab
clusters:
- name: lab
  cluster:
    server: https://192.168.1.2:6443
    certificate-authority: pki/ca.crt
- name: other
  cluster:
    server: https://10.9.9.9
contexts:
- name: agent@lab
  context: {cluster: lab, user: agent}
users:
- name: agent
  user:
    client-certificate-data: aGVsbG8=
    client-key: /etc/keys/agent.key
"#;

    #[test]
    fn kubeconfig_current_context() {
        let access = parse_kubeconfig(KUBECONFIG, Path::new("/etc/mycni")).expect("valid");
        assert_eq!((access.host.as_str(), access.port), ("192.168.1.2", 6443));
        assert_eq!(access.authority(), "192.168.1.2:6443");
        assert_eq!(
            access.certificate_authority,
            Material::File(PathBuf::from("/etc/mycni/pki/ca.crt"))
        );
        assert_eq!(
            access.credentials,
            Credentials::ClientCertificate {
                cert: Material::Inline(b"hello".to_vec()),
                key: Material::File(PathBuf::from("/etc/keys/agent.key")),
            }
        );
    }

    #[test]
    fn kubeconfig_with_a_token_and_one_context() {
        let text = r#"{"clusters":[{"name":"c","cluster":{"server":"https://k:6443","certificate-authority-data":"aGk="}}],
            "contexts":[{"name":"x","context":{"cluster":"c","user":"u"}}],
            "users":[{"name":"u","user":{"token":"secret"}}]}"#;
        let access = parse_kubeconfig(text, Path::new("/")).expect("JSON is YAML too");
        assert_eq!(
            access.certificate_authority,
            Material::Inline(b"hi".to_vec())
        );
        assert_eq!(
            access.credentials,
            Credentials::Token(Material::Inline(b"secret".to_vec()))
        );
    }

    #[test]
    fn kubeconfig_errors() {
        let missing_user = KUBECONFIG.replace("user: agent}", "user: nobody}");
        assert_eq!(
            parse_kubeconfig(&missing_user, Path::new("/")),
            Err(KubeConfigError::Missing {
                kind: "user",
                name: "nobody".into()
            })
        );
        let half = KUBECONFIG.replace("    client-key: /etc/keys/agent.key\n", "");
        assert!(matches!(
            parse_kubeconfig(&half, Path::new("/")),
            Err(KubeConfigError::HalfClientCert(_))
        ));
        assert!(matches!(
            parse_kubeconfig("clusters: [", Path::new("/")),
            Err(KubeConfigError::Syntax(_))
        ));
        let two = KUBECONFIG
            .replace("current-context: agent@lab\n", "")
            .replace(
                "contexts:\n",
                "contexts:\n- name: b\n  context: {cluster: other}\n",
            );
        assert_eq!(
            parse_kubeconfig(&two, Path::new("/")),
            Err(KubeConfigError::NoContext)
        );
    }

    #[test]
    fn in_cluster_uses_the_mounted_account() {
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let access = in_cluster(Some("10.96.0.1"), Some("443"), dir).expect("in a pod");
        assert_eq!(access.authority(), "10.96.0.1:443");
        assert_eq!(
            access.credentials,
            Credentials::Token(Material::File(dir.join("token")))
        );
        assert_eq!(
            in_cluster(None, Some("443"), dir),
            Err(KubeConfigError::NotInCluster("KUBERNETES_SERVICE_HOST"))
        );
    }
}
