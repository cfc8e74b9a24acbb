//! Thin adapter over rtnetlink: links, addresses and routes in one network namespace.
//!
//! A netlink socket stays bound to the namespace it was opened in, so [`Netlink::in_netns`]
//! opens its socket on a short-lived thread that has entered the target namespace; the
//! process itself never changes namespace.
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteIpTunnel, RouteScope, RouteType,
};
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(message),
                ..
            } => message.code.map(|code| -code.get()),
            NetlinkError::Netns { source, .. }
            | NetlinkError::Socket(source)
            | NetlinkError::Sysctl { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// What mycni needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

/// A netlink connection bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Bound to the calling thread's namespace. Needs a tokio runtime context.
    pub fn current() -> Result<Netlink, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Bound to the namespace behind `netns` (a `/proc/<pid>/ns/net` or bind-mounted file).
    pub fn in_netns(netns: &File) -> Result<Netlink, NetlinkError> {
        let runtime = tokio::runtime::Handle::current();
        let opened = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this thread only; the fd is valid for the call.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(NetlinkError::Netns {
                            path: "(fd)".into(),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                    let _runtime = runtime.enter();
                    rtnetlink::new_connection().map_err(NetlinkError::Socket)
                })
                .join()
        });
        let (connection, handle, _) = opened
            .map_err(|_| NetlinkError::Socket(std::io::Error::other("netns thread panicked")))??;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(message)) => Ok(Some(link_info(&message))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(request(format!("get link {name}"))(e)),
        }
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let mut stream = self.handle.link().get().execute();
        let mut found = Vec::new();
        while let Some(message) = stream.try_next().await.map_err(request("list links"))? {
            found.push(link_info(&message));
        }
        Ok(found)
    }

    /// Creates a veth pair: `host_name` here, `peer_name` directly inside `peer_netns`.
    pub async fn create_veth(
        &self,
        host_name: &str,
        peer_name: &str,
        peer_netns: &File,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let message = LinkVeth::new(host_name, peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(mtu)
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(request(format!("create veth {host_name}")))
    }

    /// Deletes a link; a link that is already gone is not an error.
    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            other => other.map_err(request(format!("delete link #{index}"))),
        }
    }

    pub async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(request(format!("set link #{index} up")))
    }

    pub async fn add_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .execute()
            .await
            .map_err(request(format!("add {ip}/{prefix_len} to link #{index}")))
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let mut found = Vec::new();
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(message) = stream.try_next().await.map_err(request("list addresses"))? {
            for attribute in &message.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = attribute {
                    found.push((*ip, message.header.prefix_len));
                }
            }
        }
        Ok(found)
    }

    /// Every IPv4 address of the namespace, of every link (the local address, not a
    /// point-to-point link's peer).
    pub async fn ipv4_addresses(&self) -> Result<Vec<Ipv4Addr>, NetlinkError> {
        let mut found = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(message) = stream.try_next().await.map_err(request("list addresses"))? {
            let mut address = None;
            for attribute in &message.attributes {
                match attribute {
                    AddressAttribute::Local(IpAddr::V4(ip)) => address = Some(*ip),
                    AddressAttribute::Address(IpAddr::V4(ip)) if address.is_none() => {
                        address = Some(*ip)
                    }
                    _ => {}
                }
            }
            found.extend(address);
        }
        Ok(found)
    }

    /// Adds `message` to the main table, replacing any route to the same prefix.
    async fn replace_route(
        &self,
        message: rtnetlink::packet_route::route::RouteMessage,
        what: String,
    ) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(request(what))
    }

    /// Deletes the route `message` matches; a route already gone is not an error.
    async fn delete_route_if_present(
        &self,
        message: rtnetlink::packet_route::route::RouteMessage,
        what: String,
    ) -> Result<(), NetlinkError> {
        match self.handle.route().del(message).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            other => other.map_err(request(what)),
        }
    }

    /// `dst/prefix_len dev oif scope link`: the node's way to a local pod.
    pub async fn add_link_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .output_interface(oif)
            .scope(RouteScope::Link)
            .build();
        self.replace_route(message, format!("add route {dst}/{prefix_len} dev #{oif}"))
            .await
    }

    /// `default via gateway dev oif onlink`: the pod's only route.
    pub async fn add_default_route_onlink(
        &self,
        gateway: Ipv4Addr,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(oif)
            .onlink()
            .build();
        self.handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(request(format!("add default route via {gateway}")))
    }

    /// Creates a VXLAN device in collect-metadata mode (the tunnel key is set per packet, in
    /// eBPF or by a route's `encap`), without ARP: peers are reached by route, not by MAC.
    pub async fn create_vxlan(&self, name: &str, port: u16, mtu: u32) -> Result<u32, NetlinkError> {
        let message = LinkVxlan::new(name, 0)
            .collect_metadata(true)
            .port(port)
            .learning(false)
            .build();
        match self.handle.link().add(message).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            other => other.map_err(request(format!("create vxlan {name}")))?,
        }
        let link = self.link_by_name(name).await?.ok_or_else(|| {
            request(format!("find vxlan {name}"))(rtnetlink::Error::RequestFailed)
        })?;
        let message = LinkUnspec::new_with_index(link.index)
            .arp(false)
            .mtu(mtu)
            .up()
            .build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(request(format!("configure vxlan {name}")))?;
        Ok(link.index)
    }

    /// `dst/prefix_len via gateway dev oif`, replacing any route to the same prefix.
    pub async fn replace_route_via(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .gateway(gateway)
            .output_interface(oif)
            .build();
        self.replace_route(
            message,
            format!("add route {dst}/{prefix_len} via {gateway}"),
        )
        .await
    }

    /// `dst/prefix_len dev oif encap ip id vni dst remote`: the node stack's way into the
    /// tunnel, replacing any route to the same prefix.
    pub async fn replace_tunnel_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        oif: u32,
        vni: u32,
        remote: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .output_interface(oif)
            .scope(RouteScope::Link)
            .encap_ip(vec![
                RouteIpTunnel::Id(vni as u64),
                RouteIpTunnel::Destination(remote),
                RouteIpTunnel::Ttl(64),
            ])
            .build();
        self.replace_route(
            message,
            format!("add route {dst}/{prefix_len} into the tunnel to {remote}"),
        )
        .await
    }

    /// `unreachable dst/prefix_len`, replacing any route to the same prefix: the stack
    /// answers ICMP host unreachable for addresses more specific routes do not cover.
    pub async fn replace_unreachable_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .kind(RouteType::Unreachable)
            .build();
        self.replace_route(message, format!("add route unreachable {dst}/{prefix_len}"))
            .await
    }

    /// Deletes `unreachable dst/prefix_len`; a route already gone is not an error.
    pub async fn delete_unreachable_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .kind(RouteType::Unreachable)
            .scope(RouteScope::NoWhere)
            .build();
        self.delete_route_if_present(
            message,
            format!("delete route unreachable {dst}/{prefix_len}"),
        )
        .await
    }

    /// Deletes `dst/prefix_len` from the main table; a route already gone is not an error.
    pub async fn delete_route(&self, dst: Ipv4Addr, prefix_len: u8) -> Result<(), NetlinkError> {
        // Scope "nowhere" matches a route of any scope (link-scoped tunnel routes too).
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .scope(RouteScope::NoWhere)
            .build();
        self.delete_route_if_present(message, format!("delete route {dst}/{prefix_len}"))
            .await
    }

    /// The IPv4 routes of the main table.
    pub async fn routes(&self) -> Result<Vec<RouteInfo>, NetlinkError> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut stream = self.handle.route().get(filter).execute();
        let mut found = Vec::new();
        while let Some(message) = stream.try_next().await.map_err(request("list routes"))? {
            if message.header.address_family != AddressFamily::Inet {
                continue;
            }
            let mut route = RouteInfo {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix_len: message.header.destination_prefix_length,
                gateway: None,
                oif: None,
            };
            for attribute in &message.attributes {
                match attribute {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = *ip,
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
                    RouteAttribute::Oif(index) => route.oif = Some(*index),
                    _ => {}
                }
            }
            found.push(route);
        }
        Ok(found)
    }

    /// Names of the bpf programs attached as TC ingress filters on a link.
    /// (name, kernel program id) of the bpf programs attached as TC ingress filters.
    pub async fn ingress_bpf_programs(
        &self,
        index: u32,
    ) -> Result<Vec<(String, u32)>, NetlinkError> {
        let mut stream = self
            .handle
            .traffic_filter(index as i32)
            .get()
            .ingress()
            .execute();
        let mut names = Vec::new();
        loop {
            let message = match stream.try_next().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                // No clsact qdisc: nothing attached.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EINVAL => break,
                Err(e) => return Err(request(format!("list filters of link #{index}"))(e)),
            };
            for attribute in &message.attributes {
                if let TcAttribute::Options(options) = attribute {
                    let (mut name, mut id) = (None, 0);
                    for option in options {
                        match option {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = Some(n.clone()),
                            TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = *i,
                            _ => {}
                        }
                    }
                    if let Some(name) = name {
                        names.push((name, id));
                    }
                }
            }
        }
        Ok(names)
    }
}

fn link_info(message: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: message.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => info.name = name.clone(),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::Address(mac) if mac.len() == 6 => info.mac.copy_from_slice(mac),
            _ => {}
        }
    }
    info
}

/// Turns IPv6 off on a host veth, and RAs and redirects with it: a pod must never configure
/// the node's routes or addresses. Written before the link comes up, so it never gets a
/// link-local address either. `accept_ra` and `accept_redirects` are set too, so the veth
/// stays deaf should IPv6 be turned back on (by an operator, or dual-stack later). A kernel
/// without IPv6 has nothing to protect. Uses the calling thread's namespace.
pub fn isolate_ipv6(ifname: &str) -> Result<(), NetlinkError> {
    for (key, value) in [
        ("accept_ra", "0"),
        ("accept_redirects", "0"),
        ("disable_ipv6", "1"),
    ] {
        let path = format!("/proc/sys/net/ipv6/conf/{ifname}/{key}");
        match std::fs::write(&path, value) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !Path::new("/proc/sys/net/ipv6").exists() {
                    return Ok(());
                }
                return Err(NetlinkError::Sysctl { path, source: e });
            }
            other => other.map_err(|source| NetlinkError::Sysctl { path, source })?,
        }
    }
    Ok(())
}

/// Opens a network namespace file, e.g. `CNI_NETNS`.
pub fn open_netns(path: &Path) -> Result<File, NetlinkError> {
    File::open(path).map_err(|source| NetlinkError::Netns {
        path: path.display().to_string(),
        source,
    })
}

/// `aa:bb:cc:dd:ee:ff`
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
