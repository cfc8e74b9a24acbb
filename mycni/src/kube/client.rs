//! The I/O side of talking to the API server: TLS over TCP (rustls), one request per
//! connection, and a thread that lists and watches Nodes and hands the agent the result
//! through [`KubeNodeSource`].
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::config::{ApiAccess, Credentials, Material};
use super::http::{self, BodyDecoder, HttpError, LineBuffer};
use super::nodes::{self, KubeNode, NodeCache, NodeObjectError};
use crate::agent::{AgentError, NodeSource};
use crate::nodes::NodeEntry;

#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Http {
        path: String,
        #[source]
        source: HttpError,
    },
    #[error("{path}: connection closed before the response ended")]
    Truncated { path: String },
    #[error("{path}: HTTP {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error(transparent)]
    Object(#[from] NodeObjectError),
    #[error("watch ended by the server: {code} {message}")]
    WatchError { code: u16, message: String },
}

/// How long a connection attempt may take, and how long a list may stay silent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Watches are ended by the server after this long (then resumed), so a silently dead
/// connection is noticed within this plus [`READ_TIMEOUT`].
const WATCH_SECONDS: u64 = 240;
/// Longest pause between attempts while the API server is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// A client for one API server.
pub struct ApiClient {
    access: ApiAccess,
    tls: Arc<rustls::ClientConfig>,
}

fn read_material(material: &Material) -> Result<Vec<u8>, KubeClientError> {
    match material {
        Material::Inline(bytes) => Ok(bytes.clone()),
        Material::File(path) => std::fs::read(path).map_err(|source| KubeClientError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

impl ApiClient {
    pub fn new(access: ApiAccess) -> Result<ApiClient, KubeClientError> {
        let tls_error = |e: &dyn std::fmt::Display| KubeClientError::Tls(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        let ca = read_material(&access.certificate_authority)?;
        for cert in CertificateDer::pem_slice_iter(&ca) {
            roots
                .add(cert.map_err(|e| tls_error(&e))?)
                .map_err(|e| tls_error(&e))?;
        }
        if roots.is_empty() {
            return Err(KubeClientError::Tls(
                "the certificate authority holds no PEM certificate".into(),
            ));
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&e))?
        .with_root_certificates(roots);
        let config = match &access.credentials {
            Credentials::ClientCertificate { cert, key } => {
                let cert_pem = read_material(cert)?;
                let chain = CertificateDer::pem_slice_iter(&cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls_error(&e))?;
                let key = PrivateKeyDer::from_pem_slice(&read_material(key)?)
                    .map_err(|e| tls_error(&e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_error(&e))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(ApiClient {
            access,
            tls: Arc::new(config),
        })
    }

    fn connect(
        &self,
        path: &str,
        read_timeout: Duration,
    ) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, KubeClientError> {
        let address = self.access.authority();
        let connect_error = |source| KubeClientError::Connect {
            address: address.clone(),
            source,
        };
        let target = (self.access.host.as_str(), self.access.port)
            .to_socket_addrs()
            .map_err(connect_error)?
            .next()
            .ok_or_else(|| connect_error(std::io::ErrorKind::NotFound.into()))?;
        let tcp = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(connect_error)?;
        let io_error = |source| KubeClientError::Io {
            path: path.to_string(),
            source,
        };
        tcp.set_read_timeout(Some(read_timeout)).map_err(io_error)?;
        tcp.set_nodelay(true).map_err(io_error)?;
        let name = ServerName::try_from(self.access.host.clone())
            .map_err(|e| KubeClientError::Tls(e.to_string()))?;
        let connection = rustls::ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| KubeClientError::Tls(e.to_string()))?;
        Ok(rustls::StreamOwned::new(connection, tcp))
    }

    fn bearer_token(&self) -> Result<Option<String>, KubeClientError> {
        match &self.access.credentials {
            Credentials::Token(material) => {
                let bytes = read_material(material)?;
                Ok(Some(String::from_utf8_lossy(&bytes).trim().to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Sends a GET and feeds the decoded body to `on_body` as it arrives; `on_body`
    /// returns `false` to stop early. Non-2xx answers become [`KubeClientError::Status`].
    fn get(
        &self,
        path: &str,
        read_timeout: Duration,
        mut on_body: impl FnMut(&[u8]) -> Result<bool, KubeClientError>,
    ) -> Result<(), KubeClientError> {
        let mut stream = self.connect(path, read_timeout)?;
        let io_error = |source| KubeClientError::Io {
            path: path.to_string(),
            source,
        };
        let http_error = |source| KubeClientError::Http {
            path: path.to_string(),
            source,
        };
        let request = http::get_request(
            &self.access.authority(),
            path,
            self.bearer_token()?.as_deref(),
        );
        stream.write_all(&request).map_err(io_error)?;
        stream.flush().map_err(io_error)?;
        let mut received = Vec::new();
        let mut head: Option<(u16, BodyDecoder)> = None;
        let mut body = Vec::new();
        let mut error_body = Vec::new();
        let mut buffer = vec![0u8; 32 * 1024];
        loop {
            let read = match stream.read(&mut buffer) {
                Ok(n) => n,
                // Servers often close without TLS close_notify once the body is complete.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(io_error(e)),
            };
            let mut input = &buffer[..read];
            if head.is_none() {
                received.extend_from_slice(input);
                match http::parse_head(&received).map_err(http_error)? {
                    None if read == 0 => {
                        return Err(KubeClientError::Truncated {
                            path: path.to_string(),
                        })
                    }
                    None => continue,
                    Some((parsed, used)) => {
                        head = Some((parsed.status, parsed.body));
                        received.drain(..used);
                        input = &received;
                    }
                }
            }
            let Some((status, decoder)) = head.as_mut() else {
                continue;
            };
            let ok = (200..300).contains(status);
            body.clear();
            decoder.feed(input, &mut body).map_err(http_error)?;
            if ok {
                if !body.is_empty() && !on_body(&body)? {
                    return Ok(());
                }
            } else if error_body.len() < 4096 {
                error_body.extend_from_slice(&body);
            }
            received.clear();
            let finished = decoder.is_done() || read == 0;
            if finished {
                if !ok {
                    return Err(KubeClientError::Status {
                        path: path.to_string(),
                        status: *status,
                        body: String::from_utf8_lossy(&error_body).trim().to_string(),
                    });
                }
                if read == 0 && !matches!(decoder, BodyDecoder::UntilClose) && !decoder.is_done() {
                    return Err(KubeClientError::Truncated {
                        path: path.to_string(),
                    });
                }
                return Ok(());
            }
        }
    }

    /// Lists every Node (following `continue` pages) and the list's resource version.
    pub fn list_nodes(&self) -> Result<(Vec<KubeNode>, String), KubeClientError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = String::from("/api/v1/nodes?limit=500");
            if let Some(token) = &token {
                path.push_str("&continue=");
                path.push_str(&percent_encode(token));
            }
            let mut body = Vec::new();
            self.get(&path, READ_TIMEOUT, |bytes| {
                body.extend_from_slice(bytes);
                Ok(true)
            })?;
            let page = nodes::parse_node_list(&body)?;
            all.extend(page.nodes);
            match page.continue_token {
                Some(next) => token = Some(next),
                None => return Ok((all, page.resource_version)),
            }
        }
    }

    /// Watches Nodes from `resource_version`, handing each event to `on_event` (an error
    /// it returns ends the watch). Returns when the server ends the watch, or `stop` is set.
    pub fn watch_nodes(
        &self,
        resource_version: &str,
        stop: &AtomicBool,
        mut on_event: impl FnMut(nodes::WatchEvent) -> Result<(), KubeClientError>,
    ) -> Result<(), KubeClientError> {
        let path = format!(
            "/api/v1/nodes?watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={}",
            percent_encode(resource_version)
        );
        let mut lines = LineBuffer::default();
        let read_timeout = Duration::from_secs(WATCH_SECONDS) + READ_TIMEOUT;
        self.get(&path, read_timeout, |bytes| {
            lines.push(bytes);
            while let Some(line) = lines.next_line() {
                if line.is_empty() {
                    continue;
                }
                on_event(nodes::parse_watch_event(&line)?)?;
            }
            Ok(!stop.load(Ordering::Relaxed))
        })
    }
}

/// Percent-encodes a query value (resource versions are digits; continue tokens base64).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What the watch thread shares with the agent. The thread edits the cache in place, event
/// by event: a copy per event would cost a walk of every node for each one (at 5,000
/// nodes joining, 12.5 million node copies).
#[derive(Default)]
struct Shared {
    /// `None` until the first list.
    cache: Option<NodeCache>,
    generation: u64,
    errors: Vec<String>,
}

/// Nodes from the API server: a background thread lists, then watches; the server's own
/// timeout resumes the watch from the last version, and a broken watch (or 410 Gone)
/// re-lists. Routes change only when a node's name, InternalIP or pod CIDR does.
pub struct KubeNodeSource {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    seen_generation: u64,
    /// Notified by the watch thread on every change and error: the agent applies a
    /// change as the event arrives, without polling.
    wakeup: Arc<tokio::sync::Notify>,
}

impl KubeNodeSource {
    pub fn start(client: ApiClient) -> KubeNodeSource {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let wakeup = Arc::new(tokio::sync::Notify::new());
        let (thread_shared, thread_stop, thread_wakeup) =
            (shared.clone(), stop.clone(), wakeup.clone());
        std::thread::Builder::new()
            .name("node-watch".into())
            .spawn(move || watch_loop(&client, &thread_shared, &thread_stop, &thread_wakeup))
            .map(drop)
            .unwrap_or_else(|e| {
                lock(&shared)
                    .errors
                    .push(format!("cannot start the node watch thread: {e}"))
            });
        KubeNodeSource {
            shared,
            stop,
            seen_generation: 0,
            wakeup,
        }
    }

    /// The named node as last seen, once the first list has arrived.
    pub fn node(&self, name: &str) -> Option<KubeNode> {
        lock(&self.shared).cache.as_ref()?.get(name).cloned()
    }

    /// Errors the watch met since the last call.
    pub fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.shared).errors)
    }
}

impl Drop for KubeNodeSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic in the watch thread leaves plain data behind; keep using it.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl NodeSource for KubeNodeSource {
    fn poll(&mut self) -> Result<Option<Vec<NodeEntry>>, AgentError> {
        let mut shared = lock(&self.shared);
        if !shared.errors.is_empty() {
            let errors = std::mem::take(&mut shared.errors);
            return Err(AgentError::NodeWatch(errors.join("; ")));
        }
        if shared.generation == self.seen_generation {
            return Ok(None);
        }
        self.seen_generation = shared.generation;
        Ok(shared.cache.as_ref().map(NodeCache::entries))
    }

    fn wakeup(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.wakeup.clone())
    }
}

fn watch_loop(
    client: &ApiClient,
    shared: &Mutex<Shared>,
    stop: &AtomicBool,
    wakeup: &tokio::sync::Notify,
) {
    // A change to the routable nodes: the agent's next poll takes the new list.
    let changed = |shared: &mut Shared| {
        shared.generation += 1;
        wakeup.notify_one();
    };
    let report = |error: String| {
        let mut shared = lock(shared);
        // Keep the backlog bounded while nobody polls.
        if shared.errors.len() < 16 {
            shared.errors.push(error);
        }
        wakeup.notify_one();
    };
    let mut listed = false;
    let mut first_list = true;
    let mut failures = 0u32;
    let mut backoff = Duration::from_millis(250);
    while !stop.load(Ordering::Relaxed) {
        if !listed {
            match client.list_nodes() {
                Ok((nodes, version)) => {
                    let count = nodes.len();
                    let mut shared = lock(shared);
                    // Same nodes as before the break: no route is touched.
                    let replaced = shared
                        .cache
                        .get_or_insert_with(NodeCache::default)
                        .replace(nodes, version);
                    // The first list always counts as news, even an empty one.
                    if replaced || first_list {
                        changed(&mut shared);
                    }
                    drop(shared);
                    if failures > 0 {
                        log::info!(
                            "node watch resumed after {failures} failed attempts: {count} nodes listed, {}",
                            if replaced { "routes updated" } else { "no change" }
                        );
                    }
                    first_list = false;
                    listed = true;
                    failures = 0;
                    backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    report(format!("listing nodes: {e}"));
                    failures += 1;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let started = Instant::now();
        let version = lock(shared)
            .cache
            .as_ref()
            .map(|cache| cache.resource_version().to_string())
            .unwrap_or_default();
        let watched = client.watch_nodes(&version, stop, |event| {
            let mut shared = lock(shared);
            let cache = shared.cache.get_or_insert_with(NodeCache::default);
            match cache.apply(event) {
                Ok(true) => {
                    changed(&mut shared);
                    Ok(())
                }
                Ok(false) => Ok(()),
                Err((code, message)) => Err(KubeClientError::WatchError { code, message }),
            }
        });
        match watched {
            // The server's timeout: resume from the last version seen.
            Ok(()) => {}
            Err(KubeClientError::WatchError { code: 410, .. })
            | Err(KubeClientError::Status { status: 410, .. }) => listed = false,
            Err(e) => {
                // Events may have been missed while the connection was down: re-list, and
                // let the comparison keep unchanged routes as they are.
                report(format!("watching nodes: {e}"));
                failures += 1;
                listed = false;
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        if started.elapsed() < Duration::from_secs(1) {
            // A server that keeps ending watches at once must not be hammered.
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(percent_encode("12345"), "12345");
        assert_eq!(percent_encode("ab+/="), "ab%2B%2F%3D");
    }
}
