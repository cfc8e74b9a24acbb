//! The lab's cluster DNS, without I/O: the answer to one DNS message about the cluster
//! domain (`cluster.local`) or `in-addr.arpa`, from the Services and Endpoints the API
//! server holds, as the Kubernetes DNS specification (schema 1.1.0) and CoreDNS's
//! `kubernetes` plugin in kubeadm's configuration (`pods insecure`) answer it:
//!
//! - `<svc>.<ns>.svc.<zone>`: A, the ClusterIP; for a headless Service the ready
//!   endpoints' IPs; for an ExternalName Service a CNAME (followed when it names a Service of
//!   the zone);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for a named port (to the Service's name,
//!   or for a headless Service to each ready endpoint's name);
//! - `<hostname>.<svc>.<ns>.svc.<zone>`: A for a headless Service's endpoint with that
//!   hostname (a pod's `hostname` and `subdomain`), or without one, its IP with dashes;
//! - `<a-b-c-d>.<ns>.pod.<zone>`: A a.b.c.d;
//! - PTR for a ClusterIP and a headless Service's endpoint;
//! - NXDOMAIN for any other name of those zones (NOERROR without answers for a name that
//!   exists without the asked type), REFUSED for every other name: the lab forwards nothing.
//!
//! src/bin/lab-dns.rs is the adapter: sockets, and kube's watches feeding the
//! [`ProjectionCache`]s this reads.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use mycni::kube::projection::{ObjectName, Projection, ProjectionCache};

/// What every record says about how long it holds: short, so a changed Service shows
/// within seconds, as CoreDNS's default of 5 s.
pub const TTL: u32 = 5;
/// The largest UDP answer without EDNS (RFC 1035), and the most this server offers with
/// it (the DNS flag day's 1,232 bytes: no fragments on any lab path).
const PLAIN_UDP_LIMIT: usize = 512;
const EDNS_UDP_LIMIT: u16 = 1232;

/// One port of a Service or an Endpoints subset, as SRV names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    /// Empty for an unnamed port (no SRV record names it).
    pub name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub port: u16,
}

impl NamedPort {
    fn new(name: Option<&String>, protocol: Option<&String>, port: i32) -> Option<NamedPort> {
        Some(NamedPort {
            name: name.cloned().unwrap_or_default().to_ascii_lowercase(),
            protocol: protocol
                .map(String::as_str)
                .unwrap_or("TCP")
                .to_ascii_lowercase(),
            port: u16::try_from(port).ok().filter(|p| *p != 0)?,
        })
    }

    /// Whether `_<port>._<proto>` (without the underscores) names this port.
    fn is(&self, name: &str, protocol: &str) -> bool {
        !self.name.is_empty() && self.name == name && self.protocol == protocol
    }
}

/// What a Service's name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceKind {
    ClusterIp(Ipv4Addr),
    /// `clusterIP: None`: the ready endpoints' addresses.
    Headless,
    /// A CNAME to this name.
    ExternalName(String),
}

/// A Service as DNS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsService {
    pub kind: ServiceKind,
    pub ports: Vec<NamedPort>,
}

impl Projection<Service> for DnsService {
    /// `None` for a Service DNS does not name: no ClusterIP allocated yet, or an IPv6 one.
    fn project(service: &Service) -> Option<DnsService> {
        let spec = service.spec.as_ref()?;
        let kind = if spec.type_.as_deref() == Some("ExternalName") {
            ServiceKind::ExternalName(spec.external_name.clone()?.to_ascii_lowercase())
        } else {
            match spec.cluster_ip.as_deref() {
                Some("None") => ServiceKind::Headless,
                Some(ip) => ServiceKind::ClusterIp(ip.parse().ok()?),
                None => return None,
            }
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| NamedPort::new(p.name.as_ref(), p.protocol.as_ref(), p.port))
            .collect();
        Some(DnsService { kind, ports })
    }
}

/// One ready address of an Endpoints subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAddress {
    pub ip: Ipv4Addr,
    /// The pod's `hostname` when its `subdomain` is the Service's name (the endpoints
    /// controller copies it); else the IP with dashes, as CoreDNS names it.
    pub hostname: String,
}

/// The ready addresses of one subset and the ports they serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSubset {
    pub addresses: Vec<DnsAddress>,
    pub ports: Vec<NamedPort>,
}

/// An Endpoints object as DNS sees it: only ready addresses (`notReadyAddresses` are not
/// served; `publishNotReadyAddresses` already puts them among the ready ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEndpoints {
    pub subsets: Vec<DnsSubset>,
}

impl Projection<Endpoints> for DnsEndpoints {
    fn project(endpoints: &Endpoints) -> Option<DnsEndpoints> {
        let subsets = endpoints
            .subsets
            .iter()
            .flatten()
            .map(|subset| DnsSubset {
                addresses: subset
                    .addresses
                    .iter()
                    .flatten()
                    .filter_map(|a| {
                        let ip: Ipv4Addr = a.ip.parse().ok()?;
                        let hostname = match &a.hostname {
                            Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
                            _ => dashed(ip),
                        };
                        Some(DnsAddress { ip, hostname })
                    })
                    .collect(),
                ports: subset
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| NamedPort::new(p.name.as_ref(), p.protocol.as_ref(), p.port))
                    .collect(),
            })
            .collect();
        Some(DnsEndpoints { subsets })
    }
}

/// `10.1.2.3` as a DNS label: `10-1-2-3`.
fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

/// The Services and Endpoints a query is answered from, and the cluster domain.
pub struct Catalog<'a> {
    pub domain: &'a Name,
    pub services: &'a BTreeMap<ObjectName, DnsService>,
    pub endpoints: &'a BTreeMap<ObjectName, DnsEndpoints>,
}

impl<'a> Catalog<'a> {
    pub fn new(
        domain: &'a Name,
        services: &'a ProjectionCache<DnsService>,
        endpoints: &'a ProjectionCache<DnsEndpoints>,
    ) -> Catalog<'a> {
        Catalog {
            domain,
            services: services.objects(),
            endpoints: endpoints.objects(),
        }
    }
}

/// How a message arrived: a UDP answer must fit the datagram size the client offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The records found for a name, and whether the name exists at all.
#[derive(Debug, Default)]
struct Found {
    /// False: NXDOMAIN.
    exists: bool,
    answers: Vec<Record>,
    additionals: Vec<Record>,
}

impl Found {
    fn missing() -> Found {
        Found::default()
    }

    fn exists(answers: Vec<Record>, additionals: Vec<Record>) -> Found {
        Found {
            exists: true,
            answers,
            additionals,
        }
    }
}

/// The answer to `request` (a DNS message as received), or `None` when it is not worth one
/// (too short to carry an ID, or itself a response).
pub fn respond(request: &[u8], catalog: &Catalog, transport: Transport) -> Option<Vec<u8>> {
    let message = match Message::from_vec(request) {
        Ok(message) => message,
        Err(_) => {
            let id = u16::from_be_bytes([*request.first()?, *request.get(1)?]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
    };
    if message.metadata.message_type != MessageType::Query {
        return None;
    }
    let response = answer(&message, catalog);
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => message
            .edns
            .as_ref()
            .map(|edns| usize::from(edns.max_payload().min(EDNS_UDP_LIMIT)))
            .unwrap_or(PLAIN_UDP_LIMIT)
            .max(PLAIN_UDP_LIMIT),
    };
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // Too big for the datagram: the header says so and the client asks again over TCP.
    response.truncate().to_vec().ok()
}

/// The response message to a parsed query.
fn answer(request: &Message, catalog: &Catalog) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.checking_disabled = request.metadata.checking_disabled;
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_UDP_LIMIT);
        response.set_edns(edns);
    }
    response.add_queries(request.queries.iter().cloned());
    if request.metadata.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return response;
    }
    let [query] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response;
    };
    let name = query.name().to_lowercase();
    let reverse = reverse_zone();
    let zone = if catalog.domain.zone_of(&name) {
        catalog.domain.clone()
    } else if reverse.zone_of(&name) {
        reverse
    } else {
        response.metadata.response_code = ResponseCode::Refused;
        return response;
    };
    if query.query_class() != DNSClass::IN {
        response.metadata.response_code = ResponseCode::Refused;
        return response;
    }
    response.metadata.authoritative = true;
    let found = if zone == *catalog.domain {
        catalog.lookup(&name, query.query_type(), 0)
    } else {
        catalog.reverse(&name, query.query_type())
    };
    if found.answers.is_empty() {
        // NXDOMAIN, or NOERROR with nothing (the name exists without this type): either
        // way the zone's SOA says for how long to remember it.
        if !found.exists {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        response.add_authority(soa(&zone));
    }
    response.add_answers(found.answers);
    response.add_additionals(found.additionals);
    response
}

/// `in-addr.arpa.`
fn reverse_zone() -> Name {
    Name::from_labels(["in-addr", "arpa"]).unwrap_or_else(|_| Name::root())
}

/// The zone's SOA record, for negative answers.
fn soa(zone: &Name) -> Record {
    let child = |label: &str| {
        Name::from_labels([label])
            .and_then(|l| l.append_domain(zone))
            .unwrap_or_else(|_| zone.clone())
    };
    Record::from_rdata(
        zone.clone(),
        TTL,
        RData::SOA(SOA::new(
            child("ns.dns"),
            child("hostmaster"),
            1,
            7200,
            1800,
            86400,
            TTL,
        )),
    )
}

fn a_record(name: &Name, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name.clone(), TTL, RData::A(A(ip)))
}

/// How deep CNAMEs inside the zone are followed (an ExternalName naming another).
const MAX_CNAME_CHAIN: usize = 8;

impl Catalog<'_> {
    /// `<labels>.<domain>`, when every label is a valid one.
    fn name(&self, labels: &[&str]) -> Option<Name> {
        Name::from_labels(labels.iter().copied())
            .ok()?
            .append_domain(self.domain)
            .ok()
    }

    fn service(&self, namespace: &str, name: &str) -> Option<&DnsService> {
        self.services
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// The ready addresses of a Service's Endpoints, each with the ports its subset serves.
    fn ready(&self, namespace: &str, name: &str) -> Vec<(&DnsAddress, &[NamedPort])> {
        self.endpoints
            .get(&(namespace.to_string(), name.to_string()))
            .into_iter()
            .flat_map(|e| &e.subsets)
            .flat_map(|s| s.addresses.iter().map(move |a| (a, s.ports.as_slice())))
            .collect()
    }

    /// The records of `qtype` at `name` (lowercase, inside the domain).
    fn lookup(&self, name: &Name, qtype: RecordType, depth: usize) -> Found {
        let labels: Vec<String> = name
            .iter()
            .take(usize::from(
                name.num_labels().saturating_sub(self.domain.num_labels()),
            ))
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
        match labels.as_slice() {
            // The domain, `svc` and `pod`: names that exist, without records of their own
            // (but the domain's SOA).
            [] => {
                let answers = if wants(RecordType::SOA) {
                    vec![soa(self.domain)]
                } else {
                    Vec::new()
                };
                Found::exists(answers, Vec::new())
            }
            ["svc"] | ["pod"] => Found::exists(Vec::new(), Vec::new()),
            [namespace, "svc"] => {
                let exists = self.services.keys().any(|(ns, _)| ns == namespace);
                Found {
                    exists,
                    ..Found::default()
                }
            }
            [service, namespace, "svc"] => match self.service(namespace, service) {
                Some(svc) => self.service_records(name, namespace, service, svc, qtype, depth),
                None => Found::missing(),
            },
            [port, protocol, service, namespace, "svc"]
                if port.starts_with('_') && protocol.starts_with('_') =>
            {
                let (port, protocol) = (&port[1..], &protocol[1..]);
                match self.service(namespace, service) {
                    Some(svc) => self.srv_records(namespace, service, svc, port, protocol, qtype),
                    None => Found::missing(),
                }
            }
            [host, service, namespace, "svc"] => {
                let Some(ServiceKind::Headless) = self.service(namespace, service).map(|s| &s.kind)
                else {
                    return Found::missing();
                };
                let ips: Vec<Ipv4Addr> = self
                    .ready(namespace, service)
                    .into_iter()
                    .filter(|(a, _)| a.hostname == *host)
                    .map(|(a, _)| a.ip)
                    .collect();
                if ips.is_empty() {
                    return Found::missing();
                }
                let answers = if wants(RecordType::A) {
                    dedup(ips)
                        .into_iter()
                        .map(|ip| a_record(name, ip))
                        .collect()
                } else {
                    Vec::new()
                };
                Found::exists(answers, Vec::new())
            }
            // `pods insecure`: any well-formed address in any namespace, as kubeadm's
            // CoreDNS answers it.
            [address, _namespace, "pod"] => match address.replace('-', ".").parse::<Ipv4Addr>() {
                Ok(ip) if address.matches('-').count() == 3 => {
                    let answers = if wants(RecordType::A) {
                        vec![a_record(name, ip)]
                    } else {
                        Vec::new()
                    };
                    Found::exists(answers, Vec::new())
                }
                _ => Found::missing(),
            },
            _ => Found::missing(),
        }
    }

    /// The records at a Service's own name.
    fn service_records(
        &self,
        name: &Name,
        namespace: &str,
        service_name: &str,
        service: &DnsService,
        qtype: RecordType,
        depth: usize,
    ) -> Found {
        let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
        match &service.kind {
            ServiceKind::ClusterIp(ip) => {
                let mut found = Found::exists(Vec::new(), Vec::new());
                if wants(RecordType::A) {
                    found.answers.push(a_record(name, *ip));
                }
                if qtype == RecordType::SRV {
                    // Every named port, as CoreDNS answers a bare Service name.
                    for port in service.ports.iter().filter(|p| !p.name.is_empty()) {
                        let srv = SRV::new(0, 100, port.port, name.clone());
                        found
                            .answers
                            .push(Record::from_rdata(name.clone(), TTL, RData::SRV(srv)));
                    }
                    found.additionals.push(a_record(name, *ip));
                }
                found
            }
            ServiceKind::Headless => {
                let ready = self.ready(namespace, service_name);
                let ips = dedup(ready.iter().map(|(a, _)| a.ip).collect());
                let answers = if wants(RecordType::A) {
                    ips.into_iter().map(|ip| a_record(name, ip)).collect()
                } else {
                    Vec::new()
                };
                Found::exists(answers, Vec::new())
            }
            ServiceKind::ExternalName(target) => {
                let Ok(target) = Name::from_ascii(target).map(|mut t| {
                    t.set_fqdn(true);
                    t
                }) else {
                    return Found::exists(Vec::new(), Vec::new());
                };
                let mut found = Found::exists(
                    vec![Record::from_rdata(
                        name.clone(),
                        TTL,
                        RData::CNAME(CNAME(target.clone())),
                    )],
                    Vec::new(),
                );
                // A CNAME query gets the CNAME alone; others follow it inside the zone.
                if qtype != RecordType::CNAME
                    && self.domain.zone_of(&target)
                    && depth < MAX_CNAME_CHAIN
                {
                    let next = self.lookup(&target.to_lowercase(), qtype, depth + 1);
                    found.answers.extend(next.answers);
                    found.additionals.extend(next.additionals);
                }
                found
            }
        }
    }

    /// `_<port>._<protocol>.<service>.<namespace>.svc.<domain>`.
    fn srv_records(
        &self,
        namespace: &str,
        service_name: &str,
        service: &DnsService,
        port: &str,
        protocol: &str,
        qtype: RecordType,
    ) -> Found {
        let Some(owner) = self.name(&[
            &format!("_{port}"),
            &format!("_{protocol}"),
            service_name,
            namespace,
            "svc",
        ]) else {
            return Found::missing();
        };
        let Some(service_fqdn) = self.name(&[service_name, namespace, "svc"]) else {
            return Found::missing();
        };
        let wants_srv = qtype == RecordType::SRV || qtype == RecordType::ANY;
        let mut found = Found::exists(Vec::new(), Vec::new());
        match &service.kind {
            ServiceKind::ClusterIp(ip) => {
                let Some(named) = service.ports.iter().find(|p| p.is(port, protocol)) else {
                    return Found::missing();
                };
                if wants_srv {
                    let srv = SRV::new(0, 100, named.port, service_fqdn.clone());
                    found
                        .answers
                        .push(Record::from_rdata(owner, TTL, RData::SRV(srv)));
                    found.additionals.push(a_record(&service_fqdn, *ip));
                }
            }
            ServiceKind::Headless => {
                let targets: Vec<(&DnsAddress, u16)> = self
                    .ready(namespace, service_name)
                    .into_iter()
                    .filter_map(|(address, ports)| {
                        let named = ports.iter().find(|p| p.is(port, protocol))?;
                        Some((address, named.port))
                    })
                    .collect();
                if targets.is_empty() {
                    return Found::missing();
                }
                if wants_srv {
                    // Equal shares, as CoreDNS weighs them.
                    let weight = u16::try_from(100 / targets.len()).unwrap_or(1).max(1);
                    for (address, number) in targets {
                        let Some(target) =
                            self.name(&[&address.hostname, service_name, namespace, "svc"])
                        else {
                            continue;
                        };
                        let srv = SRV::new(0, weight, number, target.clone());
                        found
                            .answers
                            .push(Record::from_rdata(owner.clone(), TTL, RData::SRV(srv)));
                        found.additionals.push(a_record(&target, address.ip));
                    }
                }
            }
            ServiceKind::ExternalName(_) => return Found::missing(),
        }
        found
    }

    /// PTR at `<d>.<c>.<b>.<a>.in-addr.arpa`: the ClusterIP Services and the headless
    /// Services' endpoints with that address.
    fn reverse(&self, name: &Name, qtype: RecordType) -> Found {
        // `<d>.<c>.<b>.<a>` before `in-addr.arpa`.
        let octets: Vec<Option<u8>> = name
            .iter()
            .take(usize::from(name.num_labels()).saturating_sub(2))
            .map(|l| std::str::from_utf8(l).ok()?.parse().ok())
            .collect();
        let ip = match octets.as_slice() {
            [Some(d), Some(c), Some(b), Some(a)] => Ipv4Addr::new(*a, *b, *c, *d),
            // `in-addr.arpa` and the networks above an address exist, without records.
            partial if partial.len() < 4 && partial.iter().all(Option::is_some) => {
                return Found::exists(Vec::new(), Vec::new())
            }
            _ => return Found::missing(),
        };
        let mut targets = Vec::new();
        for ((namespace, service_name), service) in self.services {
            match service.kind {
                ServiceKind::ClusterIp(cluster_ip) if cluster_ip == ip => {
                    targets.extend(self.name(&[service_name, namespace, "svc"]));
                }
                ServiceKind::Headless => {
                    for (address, _) in self.ready(namespace, service_name) {
                        if address.ip == ip {
                            targets.extend(self.name(&[
                                &address.hostname,
                                service_name,
                                namespace,
                                "svc",
                            ]));
                        }
                    }
                }
                _ => {}
            }
        }
        if targets.is_empty() {
            return Found::missing();
        }
        targets.sort();
        targets.dedup();
        let answers = if qtype == RecordType::PTR || qtype == RecordType::ANY {
            targets
                .into_iter()
                .map(|target| Record::from_rdata(name.clone(), TTL, RData::PTR(PTR(target))))
                .collect()
        } else {
            Vec::new()
        };
        Found::exists(answers, Vec::new())
    }
}

fn dedup(mut ips: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
    ips.sort();
    ips.dedup();
    ips
}

/// SERVFAIL for `request` (the server cannot answer yet: its first lists are not in), or
/// `None` when the request carries no ID.
pub fn server_failure(request: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*request.first()?, *request.get(1)?]);
    let mut message = Message::error_msg(id, OpCode::Query, ResponseCode::ServFail);
    if let Ok(parsed) = Message::from_vec(request) {
        message.add_queries(parsed.queries);
    }
    message.to_vec().ok()
}

/// A query message for `name` and `qtype` (recursion desired, as a stub resolver sends
/// it), for probes and tests.
pub fn query_message(id: u16, name: &str, qtype: RecordType) -> Option<Vec<u8>> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).ok()?, qtype));
    message.to_vec().ok()
}

/// The cluster domain `domain` (e.g. `cluster.local`) as a fully qualified name.
pub fn domain_name(domain: &str) -> Result<Name, hickory_proto::ProtoError> {
    let mut name = Name::from_ascii(domain)?.to_lowercase();
    name.set_fqdn(true);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycni::kube::WatchCache;
    use serde_json::json;

    /// The caches as the watches fill them, from API objects written as JSON.
    struct Cluster {
        domain: Name,
        services: ProjectionCache<DnsService>,
        endpoints: ProjectionCache<DnsEndpoints>,
    }

    impl Cluster {
        fn new() -> Cluster {
            let mut cluster = Cluster {
                domain: domain_name("cluster.local").expect("domain"),
                services: ProjectionCache::default(),
                endpoints: ProjectionCache::default(),
            };
            cluster.service(json!({
                "metadata": {"name": "kubernetes", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}
            }));
            cluster.service(json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.7.7", "ports": [
                    {"name": "http", "port": 80, "protocol": "TCP"},
                    {"name": "dns", "port": 53, "protocol": "UDP"}]}
            }));
            cluster.service(json!({
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
            }));
            cluster.endpoints(json!({
                "metadata": {"name": "db", "namespace": "shop"},
                "subsets": [{
                    "addresses": [
                        {"ip": "10.224.1.5", "hostname": "db-0"},
                        {"ip": "10.224.2.6"}],
                    "notReadyAddresses": [{"ip": "10.224.1.9", "hostname": "db-2"}],
                    "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]
                }]
            }));
            cluster.service(json!({
                "metadata": {"name": "away", "namespace": "shop"},
                "spec": {"type": "ExternalName", "externalName": "Foo.Example.com"}
            }));
            cluster.service(json!({
                "metadata": {"name": "alias", "namespace": "shop"},
                "spec": {"type": "ExternalName", "externalName": "web.shop.svc.cluster.local"}
            }));
            cluster
        }

        fn service(&mut self, object: serde_json::Value) {
            let service: Service = serde_json::from_value(object).expect("a Service");
            self.services
                .apply(kube::runtime::watcher::Event::Apply(service));
        }

        fn endpoints(&mut self, object: serde_json::Value) {
            let endpoints: Endpoints = serde_json::from_value(object).expect("an Endpoints");
            self.endpoints
                .apply(kube::runtime::watcher::Event::Apply(endpoints));
        }

        fn ask(&self, name: &str, qtype: RecordType, transport: Transport) -> Message {
            let catalog = Catalog::new(&self.domain, &self.services, &self.endpoints);
            let query = query_message(7, name, qtype).expect("a query");
            let bytes = respond(&query, &catalog, transport).expect("an answer");
            let message = Message::from_vec(&bytes).expect("a DNS message");
            assert_eq!(message.metadata.id, 7);
            assert_eq!(message.metadata.message_type, MessageType::Response);
            message
        }

        fn query(&self, name: &str, qtype: RecordType) -> (ResponseCode, Vec<String>) {
            let message = self.ask(name, qtype, Transport::Udp);
            let answers = message
                .answers
                .iter()
                .map(|r| format!("{} {}", r.record_type(), r.data))
                .collect();
            (message.metadata.response_code, answers)
        }
    }

    fn ok(answers: &[&str]) -> (ResponseCode, Vec<String>) {
        (
            ResponseCode::NoError,
            answers.iter().map(|a| a.to_string()).collect(),
        )
    }

    #[test]
    fn a_cluster_ip_service_resolves_to_its_cluster_ip() {
        let cluster = Cluster::new();
        assert_eq!(
            cluster.query("kubernetes.default.svc.cluster.local.", RecordType::A),
            ok(&["A 10.96.0.1"])
        );
        // Names are case-insensitive.
        assert_eq!(
            cluster.query("Web.SHOP.svc.Cluster.Local.", RecordType::A),
            ok(&["A 10.96.7.7"])
        );
        // The name exists without IPv6: NOERROR and nothing, so a resolver asking A and
        // AAAA at once keeps the A.
        let aaaa = cluster.ask(
            "web.shop.svc.cluster.local.",
            RecordType::AAAA,
            Transport::Udp,
        );
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());
        assert_eq!(aaaa.authorities.len(), 1, "the zone's SOA");
        assert!(aaaa.metadata.authoritative);
    }

    #[test]
    fn names_not_in_the_cluster_are_nxdomain_or_refused() {
        let cluster = Cluster::new();
        for name in [
            "nothing.shop.svc.cluster.local.",
            "web.elsewhere.svc.cluster.local.",
            // What a search list tries first for `web.shop` from namespace `shop`.
            "web.shop.shop.svc.cluster.local.",
            "a.b.web.shop.svc.cluster.local.",
            "10-1-2.shop.pod.cluster.local.",
        ] {
            assert_eq!(
                cluster.query(name, RecordType::A),
                (ResponseCode::NXDomain, Vec::new()),
                "{name}"
            );
        }
        // Outside the cluster's zones nothing is forwarded.
        assert_eq!(
            cluster.query("example.com.", RecordType::A),
            (ResponseCode::Refused, Vec::new())
        );
        // A namespace with Services exists as a name.
        assert_eq!(
            cluster.query("shop.svc.cluster.local.", RecordType::A),
            ok(&[])
        );
    }

    #[test]
    fn a_headless_service_resolves_to_its_ready_endpoints() {
        let cluster = Cluster::new();
        assert_eq!(
            cluster.query("db.shop.svc.cluster.local.", RecordType::A),
            ok(&["A 10.224.1.5", "A 10.224.2.6"])
        );
        // A pod's hostname under its subdomain; the other endpoint by its dashed IP.
        assert_eq!(
            cluster.query("db-0.db.shop.svc.cluster.local.", RecordType::A),
            ok(&["A 10.224.1.5"])
        );
        assert_eq!(
            cluster.query("10-224-2-6.db.shop.svc.cluster.local.", RecordType::A),
            ok(&["A 10.224.2.6"])
        );
        // Not ready: not served.
        assert_eq!(
            cluster.query("db-2.db.shop.svc.cluster.local.", RecordType::A),
            (ResponseCode::NXDomain, Vec::new())
        );
        // Hostnames exist only under headless Services.
        assert_eq!(
            cluster.query("db-0.web.shop.svc.cluster.local.", RecordType::A),
            (ResponseCode::NXDomain, Vec::new())
        );
    }

    #[test]
    fn named_ports_have_srv_records() {
        let cluster = Cluster::new();
        let web = cluster.ask(
            "_http._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV,
            Transport::Tcp,
        );
        let answers: Vec<String> = web.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(answers, ["0 100 80 web.shop.svc.cluster.local."]);
        assert_eq!(web.additionals.len(), 1, "the target's A record");
        assert_eq!(
            cluster.query("_dns._udp.web.shop.svc.cluster.local.", RecordType::SRV),
            ok(&["SRV 0 100 53 web.shop.svc.cluster.local."])
        );
        // The protocol is part of the name.
        assert_eq!(
            cluster
                .query("_dns._tcp.web.shop.svc.cluster.local.", RecordType::SRV)
                .0,
            ResponseCode::NXDomain
        );
        // A headless Service: one record per ready endpoint, to its own name.
        assert_eq!(
            cluster.query("_pg._tcp.db.shop.svc.cluster.local.", RecordType::SRV),
            ok(&[
                "SRV 0 50 5432 db-0.db.shop.svc.cluster.local.",
                "SRV 0 50 5432 10-224-2-6.db.shop.svc.cluster.local."
            ])
        );
    }

    #[test]
    fn an_external_name_service_is_a_cname() {
        let cluster = Cluster::new();
        assert_eq!(
            cluster.query("away.shop.svc.cluster.local.", RecordType::CNAME),
            ok(&["CNAME foo.example.com."])
        );
        // An A query gets the CNAME; its target is outside and not looked up.
        assert_eq!(
            cluster.query("away.shop.svc.cluster.local.", RecordType::A),
            ok(&["CNAME foo.example.com."])
        );
        // A target inside the cluster is followed.
        assert_eq!(
            cluster.query("alias.shop.svc.cluster.local.", RecordType::A),
            ok(&["CNAME web.shop.svc.cluster.local.", "A 10.96.7.7"])
        );
    }

    #[test]
    fn pod_names_resolve_to_the_address_they_spell() {
        let cluster = Cluster::new();
        assert_eq!(
            cluster.query("10-224-1-5.any.pod.cluster.local.", RecordType::A),
            ok(&["A 10.224.1.5"])
        );
        assert_eq!(
            cluster.query("10-224-1-500.any.pod.cluster.local.", RecordType::A),
            (ResponseCode::NXDomain, Vec::new())
        );
    }

    #[test]
    fn cluster_ips_and_headless_endpoints_have_ptr_records() {
        let cluster = Cluster::new();
        assert_eq!(
            cluster.query("7.7.96.10.in-addr.arpa.", RecordType::PTR),
            ok(&["PTR web.shop.svc.cluster.local."])
        );
        assert_eq!(
            cluster.query("5.1.224.10.in-addr.arpa.", RecordType::PTR),
            ok(&["PTR db-0.db.shop.svc.cluster.local."])
        );
        assert_eq!(
            cluster.query("9.9.9.10.in-addr.arpa.", RecordType::PTR),
            (ResponseCode::NXDomain, Vec::new())
        );
    }

    #[test]
    fn changes_and_deletions_show_at_once() {
        let mut cluster = Cluster::new();
        cluster.service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.8.8", "ports": [{"name": "http", "port": 80}]}
        }));
        assert_eq!(
            cluster.query("web.shop.svc.cluster.local.", RecordType::A),
            ok(&["A 10.96.8.8"])
        );
        let gone: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"}
        }))
        .expect("a Service");
        cluster
            .services
            .apply(kube::runtime::watcher::Event::Delete(gone));
        assert_eq!(
            cluster
                .query("web.shop.svc.cluster.local.", RecordType::A)
                .0,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn a_udp_answer_too_big_for_the_datagram_is_truncated() {
        let mut cluster = Cluster::new();
        let addresses: Vec<serde_json::Value> = (0..60)
            .map(|i| json!({"ip": format!("10.224.3.{i}")}))
            .collect();
        cluster.endpoints(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "subsets": [{"addresses": addresses, "ports": [{"name": "pg", "port": 5432}]}]
        }));
        let name = "db.shop.svc.cluster.local.";
        let udp = cluster.ask(name, RecordType::A, Transport::Udp);
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = cluster.ask(name, RecordType::A, Transport::Tcp);
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 60);
    }

    #[test]
    fn garbage_gets_formerr_and_responses_get_nothing() {
        let cluster = Cluster::new();
        let catalog = Catalog::new(&cluster.domain, &cluster.services, &cluster.endpoints);
        let reply = respond(&[0x12, 0x34, 0xff], &catalog, Transport::Udp).expect("FORMERR");
        let reply = Message::from_vec(&reply).expect("a DNS message");
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(respond(&[0x12], &catalog, Transport::Udp).is_none());
        let mut response = Message::response(9, OpCode::Query);
        response.add_query(Query::query(
            Name::from_ascii("web.shop.svc.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let bytes = response.to_vec().expect("encode");
        assert!(respond(&bytes, &catalog, Transport::Udp).is_none());
    }
}
