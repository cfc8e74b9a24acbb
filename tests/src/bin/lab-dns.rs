//! lab-dns: the Kubernetes lab's cluster DNS (CoreDNS is not packaged for Debian). Watches
//! Services and Endpoints through mycni's kube client and answers queries about the cluster
//! domain and `in-addr.arpa` over UDP and TCP (`mycni_tests::cluster_dns` says what with);
//! every other name is REFUSED: nothing is forwarded. The lab runs it in its control-plane
//! namespace behind the `kube-system/kube-dns` Service (tests/src/kubelab.rs).
//!
//! ```text
//! lab-dns --kubeconfig FILE [--listen ADDR:PORT] [--domain cluster.local]
//! ```
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use hickory_proto::rr::Name;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::Api;
use mycni::kube::client::{ApiServer, KubeWatches, Watched};
use mycni::kube::projection::ProjectionCache;
use mycni_tests::cluster_dns::{
    domain_name, respond, server_failure, Catalog, DnsEndpoints, DnsService, Transport,
};

#[derive(Debug, Parser)]
#[command(about = "The Kubernetes lab's cluster DNS")]
struct Args {
    /// The API server and credentials (the lab's admin kubeconfig).
    #[arg(long, value_name = "FILE")]
    kubeconfig: PathBuf,
    /// Where to answer, over UDP and TCP.
    #[arg(long, default_value = "0.0.0.0:53", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The cluster domain (kubelet's --cluster-domain).
    #[arg(long, default_value = "cluster.local")]
    domain: String,
}

/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The watched objects and the domain every answer reads.
struct Zone {
    domain: Name,
    services: Watched<ProjectionCache<DnsService>>,
    endpoints: Watched<ProjectionCache<DnsEndpoints>>,
}

impl Zone {
    /// The answer to one message; SERVFAIL until both first lists are in.
    fn answer(&self, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let answer = self.services.read(|services| {
            self.endpoints.read(|endpoints| {
                respond(
                    request,
                    &Catalog::new(&self.domain, services, endpoints),
                    transport,
                )
            })
        });
        match answer {
            Some(Some(answer)) => answer,
            _ => server_failure(request),
        }
    }
}

fn main() -> Result<()> {
    mycni::logging::init(log::LevelFilter::Info, log::LevelFilter::Off);
    let args = Args::parse();
    let domain = domain_name(&args.domain).context("--domain")?;
    let watches = KubeWatches::connect(ApiServer::Kubeconfig(args.kubeconfig.clone()))?;
    let client = watches.client();
    let zone = Arc::new(Zone {
        domain,
        services: watches.watch(
            Api::<Service>::all(client.clone()),
            ProjectionCache::default(),
            "service",
        ),
        endpoints: watches.watch(
            Api::<Endpoints>::all(client),
            ProjectionCache::default(),
            "endpoint",
        ),
    });
    let udp = UdpSocket::bind(args.listen).with_context(|| format!("UDP {}", args.listen))?;
    let tcp = TcpListener::bind(args.listen).with_context(|| format!("TCP {}", args.listen))?;
    log::info!(
        "answering for {} and in-addr.arpa on {} (UDP and TCP)",
        zone.domain,
        args.listen
    );
    let tcp_zone = zone.clone();
    std::thread::spawn(move || serve_tcp(tcp, tcp_zone));
    let log_zone = zone.clone();
    std::thread::spawn(move || loop {
        for error in log_zone
            .services
            .take_errors()
            .into_iter()
            .chain(log_zone.endpoints.take_errors())
        {
            log::warn!("{error}");
        }
        std::thread::sleep(Duration::from_secs(1));
    });
    let mut buffer = [0u8; 4096];
    loop {
        let (length, peer) = match udp.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(e) => {
                log::warn!("UDP receive: {e}");
                continue;
            }
        };
        if let Some(answer) = zone.answer(&buffer[..length], Transport::Udp) {
            if let Err(e) = udp.send_to(&answer, peer) {
                log::warn!("UDP answer to {peer}: {e}");
            }
        }
    }
}

fn serve_tcp(listener: TcpListener, zone: Arc<Zone>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let zone = zone.clone();
                std::thread::spawn(move || {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = serve_connection(stream, &zone) {
                        log::debug!("TCP {peer:?}: {e:#}");
                    }
                });
            }
            Err(e) => log::warn!("TCP accept: {e}"),
        }
    }
}

/// Messages on one connection, each behind its two-byte length (RFC 1035 4.2.2), until the
/// client closes it or stays silent for [`TCP_IDLE`].
fn serve_connection(mut stream: TcpStream, zone: &Zone) -> Result<()> {
    stream.set_read_timeout(Some(TCP_IDLE))?;
    loop {
        let mut length = [0u8; 2];
        match stream.read_exact(&mut length) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let mut request = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut request)?;
        let Some(answer) = zone.answer(&request, Transport::Tcp) else {
            continue;
        };
        let length = u16::try_from(answer.len()).context("an answer over 64 KiB")?;
        let mut framed = length.to_be_bytes().to_vec();
        framed.extend_from_slice(&answer);
        stream.write_all(&framed)?;
    }
}
