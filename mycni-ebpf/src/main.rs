//! mycni's TC programs.
//!
//! - `from_pod` (host veth ingress: packets a pod sends) sends a Service backend's replies
//!   to clients outside the node back as the frontend ([`external`]), drops anything the
//!   pod sends as
//!   someone else (IPv4 or ARP from an address or MAC not its own) and its IPv6, answers the
//!   pod's ARP for its gateway, redirects packets for pods on this node straight into the
//!   destination pod
//!   (`bpf_redirect_peer`), sends packets for other nodes' pods to them (`bpf_redirect_neigh`
//!   on the uplink, or the VXLAN device with the tunnel key set), and hands everything else
//!   to the node stack (services, hostPorts, the node itself, the outside).
//! - `to_pod` (host veth egress: packets the node stack sends to a pod) remembers every flow
//!   the stack delivered, so its replies go back through the stack too: it can undo its
//!   own translations (kube-proxy DNAT) and its conntrack sees both directions.
//! - `from_netdev` (uplink and VXLAN ingress) drops VXLAN that is not from a known peer
//!   node with our VNI, delivers packets from other nodes' pods to
//!   local pods with `bpf_redirect_peer`, sends packets for NodePort and externalIP
//!   frontends to a backend ([`external`]), and hands everything else to the node stack:
//!   replies of masqueraded flows (and ICMP errors about them, and their later fragments)
//!   after translating them back.
//! - `to_netdev` (uplink and VXLAN egress) masquerades pod traffic leaving the cluster to
//!   the node IP (except replies of flows the stack delivered to the pod; dropping what
//!   SNAT cannot translate), tracking each
//!   flow's state (TCP handshake, FINs, RST; UDP answered or not) for the agent's expiry,
//!   and remembers pod-to-pod flows the stack sent to other nodes.
//!
//! - `service_connect4`, `service_sendmsg4`, `service_recvmsg4`, `service_getpeername4`
//!   (cgroup v2 `sock_addr` hooks, attached in `--service-mode ebpf`) translate Service
//!   frontends to backends at the socket and back ([`service`]); `service_connect6`,
//!   `service_recvmsg6` and `service_getpeername6` do it for IPv4-mapped addresses of
//!   AF_INET6 sockets.
//!
//! The rule behind the split: a flow crosses the node's netfilter in both directions or in
//! neither, because kube-proxy drops what conntrack saw only half of (`ctstate INVALID`).
//!
//! This file holds the entry points, one per hook; the maps are in [`maps`], and the logic in
//! modules shared by the hooks: [`packet`] and [`headers`] (parsing), [`arp`], [`forward`]
//! (redirects to pods and nodes), [`stack_flows`] and [`fragments`] (what the node stack
//! and first fragments decided), [`nat`] (SNAT, reverse NAT, ICMP errors, refusals),
//! [`rewrite`] (address and port rewrites with their checksums), [`tunnel`], [`counters`]
//! and [`log`]. [`pod`] and [`netdev`] hold each side's decision.
#![no_std]
#![no_main]

#[macro_use]
mod log;
mod arp;
mod counters;
mod external;
mod forward;
mod fragments;
mod headers;
mod maps;
mod nat;
mod netdev;
mod packet;
mod pod;
mod policy;
mod rewrite;
mod service;
mod stack_flows;
mod tunnel;

use aya_ebpf::macros::{cgroup_sock_addr, classifier};
use aya_ebpf::programs::{SockAddrContext, TcContext};
use mycni_common::verdict;
use service::Family;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (verdict, action) = pod::classify_from_pod(&ctx);
    counters::count(verdict, ctx.len());
    action
}

/// Packets the redirects of `from_pod` and `from_netdev` never produce: anything here was
/// delivered by the stack.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let (verdict, action) = pod::classify_to_pod(&ctx);
    if let Some(verdict) = verdict {
        counters::count(verdict, ctx.len());
    }
    action
}

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    let (verdict, action) = netdev::classify_from_netdev(&ctx);
    counters::count(verdict, ctx.len());
    action
}

#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    let (verdict, action) = netdev::classify_to_netdev(&ctx);
    if verdict != verdict::TO_STACK {
        counters::count(verdict, ctx.len());
    }
    action
}

#[cgroup_sock_addr(connect4)]
pub fn service_connect4(ctx: SockAddrContext) -> i32 {
    service::to_backend(&ctx, Family::Inet)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn service_sendmsg4(ctx: SockAddrContext) -> i32 {
    service::to_backend(&ctx, Family::Inet)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn service_recvmsg4(ctx: SockAddrContext) -> i32 {
    service::to_frontend(&ctx, Family::Inet)
}

#[cgroup_sock_addr(getpeername4)]
pub fn service_getpeername4(ctx: SockAddrContext) -> i32 {
    service::to_frontend(&ctx, Family::Inet)
}

#[cgroup_sock_addr(connect6)]
pub fn service_connect6(ctx: SockAddrContext) -> i32 {
    service::to_backend(&ctx, Family::Inet6Mapped)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn service_recvmsg6(ctx: SockAddrContext) -> i32 {
    service::to_frontend(&ctx, Family::Inet6Mapped)
}

#[cgroup_sock_addr(getpeername6)]
pub fn service_getpeername6(ctx: SockAddrContext) -> i32 {
    service::to_frontend(&ctx, Family::Inet6Mapped)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
