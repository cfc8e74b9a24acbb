//! `mycni-sock-probe` driven from tests: its server in a namespace, and its clients run
//! inside a test cgroup (where the socket programs apply) or outside any, with what each
//! call saw. Shared by the Services and hostPort tests.
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::cgroup::TestCgroup;
use crate::{bin_dir, Netns};

pub fn probe_bin() -> PathBuf {
    bin_dir().join("mycni-sock-probe")
}

/// A `mycni-sock-probe serve` (TCP and UDP on one port, answering its name) in a
/// namespace, outside any test cgroup; killed on drop.
pub struct Server {
    child: Child,
}

impl Server {
    pub fn start(netns: &Netns, port: u16, name: &str) -> Result<Server> {
        Server::start_mode(netns, "serve", port, name)
    }

    /// A server that answers "NAME from CLIENT-ADDRESS".
    pub fn start_naming_clients(netns: &Netns, port: u16, name: &str) -> Result<Server> {
        Server::start_mode(netns, "serve-peer", port, name)
    }

    /// A TCP server on `[::]:port` (IPv6, and IPv4 as mapped addresses) answering `name`.
    pub fn start_ipv6(netns: &Netns, port: u16, name: &str) -> Result<Server> {
        Server::start_mode(netns, "serve6", port, name)
    }

    /// A TCP server that keeps each connection and answers every message on it.
    pub fn start_held(netns: &Netns, port: u16, name: &str) -> Result<Server> {
        Server::start_mode(netns, "serve-held", port, name)
    }

    fn start_mode(netns: &Netns, mode: &str, port: u16, name: &str) -> Result<Server> {
        let mut child = netns
            .command(probe_bin())
            .args([mode, &port.to_string(), name])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn the probe server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let server = Server { child };
        ensure!(
            line.trim() == "ready",
            "server {name} did not start: {line:?}"
        );
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one client call saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Reply { peer: SocketAddr, server: String },
    Errno(i32),
}

impl Seen {
    pub fn parse(line: &str) -> Result<Seen> {
        if let Some(errno) = line.strip_prefix("errno=") {
            return Ok(Seen::Errno(errno.trim().parse()?));
        }
        let rest = line.strip_prefix("peer=").context("a probe line")?;
        let (peer, server) = rest.split_once(" reply=").context("a probe reply")?;
        Ok(Seen::Reply {
            peer: peer.parse()?,
            server: server.trim().to_string(),
        })
    }
}

/// Runs the client `mode` (tcp, udp, udp-connected) `count` times to `target` from `netns`,
/// inside `cgroup` (its pid written to `cgroup.procs` before it execs) or outside any.
pub fn probe(
    cgroup: Option<&TestCgroup>,
    netns: &Netns,
    mode: &str,
    target: SocketAddr,
    count: usize,
) -> Result<Vec<Seen>> {
    let probe = probe_bin().display().to_string();
    let (target, count_arg) = (target.to_string(), count.to_string());
    let argv = [probe.as_str(), mode, &target, &count_arg];
    let output = crate::run(&mut TestCgroup::command_in(cgroup, netns, &argv))?;
    let lines: Vec<Seen> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(Seen::parse)
        .collect::<Result<_>>()?;
    ensure!(lines.len() == count, "{count} tries printed {lines:?}");
    Ok(lines)
}

/// The servers that answered, each call having seen `frontend` as its peer.
pub fn servers_behind(frontend: SocketAddr, seen: &[Seen]) -> Result<BTreeSet<String>> {
    seen.iter()
        .map(|s| match s {
            Seen::Reply { peer, server } if *peer == frontend => Ok(server.clone()),
            other => bail!("want a reply with {frontend} as the peer, got {other:?}"),
        })
        .collect()
}

/// A set of server names, to compare with [`servers_behind`].
pub fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}
