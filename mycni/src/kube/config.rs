//! Where the API server is, for the two ways the agent reaches it; pure. kube's own
//! `Config` reads kubeconfigs (client certificates, tokens, files or inline data) and the
//! pod's service account; what is left here is what it does not decide the way the agent
//! needs: the in-cluster address with the agent's overrides, and a kubeconfig without a
//! `current-context` but a single context (kubectl takes that one).
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeConfigError {
    #[error("in-cluster: {0} is not set (not running in a pod?)")]
    NotInCluster(&'static str),
    #[error("in-cluster: port {0:?} is not a port number")]
    Port(String),
}

/// The API server's URL as a pod sees it: `host` and `port` are the agent's overrides or,
/// when those are empty, the `kubernetes` Service's address kubelet puts in the
/// environment.
pub fn in_cluster_server(
    host: Option<&str>,
    port: Option<&str>,
) -> Result<String, KubeConfigError> {
    let host = host
        .filter(|h| !h.is_empty())
        .ok_or(KubeConfigError::NotInCluster("KUBERNETES_SERVICE_HOST"))?;
    let port = port
        .filter(|p| !p.is_empty())
        .ok_or(KubeConfigError::NotInCluster("KUBERNETES_SERVICE_PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| KubeConfigError::Port(port.to_string()))?;
    Ok(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// Which context to use: the current one, else the only one there is (kube's loader alone
/// refuses a kubeconfig without `current-context`).
pub fn context_options(kubeconfig: &Kubeconfig) -> KubeConfigOptions {
    let context = match (&kubeconfig.current_context, kubeconfig.contexts.as_slice()) {
        (None, [only]) => Some(only.name.clone()),
        _ => None,
    };
    KubeConfigOptions {
        context,
        ..KubeConfigOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_cluster_server_from_overrides_or_the_environment() {
        assert_eq!(
            in_cluster_server(Some("10.96.0.1"), Some("443")),
            Ok("https://10.96.0.1:443".into())
        );
        assert_eq!(
            in_cluster_server(Some("fd00::1"), Some("6443")),
            Ok("https://[fd00::1]:6443".into())
        );
        assert_eq!(
            in_cluster_server(None, Some("443")),
            Err(KubeConfigError::NotInCluster("KUBERNETES_SERVICE_HOST"))
        );
        assert_eq!(
            in_cluster_server(Some("10.96.0.1"), Some("")),
            Err(KubeConfigError::NotInCluster("KUBERNETES_SERVICE_PORT"))
        );
        assert_eq!(
            in_cluster_server(Some("10.96.0.1"), Some("https")),
            Err(KubeConfigError::Port("https".into()))
        );
    }

    const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: https://192.168.1.2:6443
    certificate-authority: pki/ca.crt
contexts:
- name: agent@lab
  context: {cluster: lab, user: agent}
users:
- name: agent
  user:
    client-certificate: pki/agent.crt
    client-key: /etc/keys/agent.key
"#;

    #[test]
    fn a_single_context_is_used_without_current_context() {
        let one = Kubeconfig::from_yaml(KUBECONFIG).expect("valid");
        assert_eq!(context_options(&one).context.as_deref(), Some("agent@lab"));
        let current = Kubeconfig::from_yaml(&KUBECONFIG.replace(
            "kind: Config\n",
            "kind: Config\ncurrent-context: agent@lab\n",
        ))
        .expect("valid");
        assert_eq!(context_options(&current).context, None, "kube's choice");
        let two = Kubeconfig::from_yaml(&KUBECONFIG.replace(
            "contexts:\n",
            "contexts:\n- name: b\n  context: {cluster: lab}\n",
        ))
        .expect("valid");
        assert_eq!(
            context_options(&two).context,
            None,
            "ambiguous: kube refuses"
        );
    }
}
