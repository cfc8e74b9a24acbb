//! Thin adapter: ends the sockets [`super::stale_sockets`] picks, in every network
//! namespace on the node, with `NETLINK_SOCK_DIAG` ([`super::sock_diag`]): a dump of the
//! namespace's TCP and connected UDP sockets (AF_INET ones, and AF_INET6 ones with an
//! IPv4-mapped peer), then `SOCK_DESTROY` for each one to end. The
//! application sees `ECONNABORTED` at once (a blocked read or write wakes with it; a
//! connected UDP socket is disconnected, so its next send fails) and reconnects.
//!
//! A sock_diag socket sees the sockets of the namespace it was created in, so a helper
//! thread enters each namespace in turn (`setns`) and opens one there. The namespaces are
//! those of every thread in `/proc` (the agent's DaemonSet runs with `hostPID`, so pods'
//! processes are there) and those named under `/run/netns` (what CNI runtimes create),
//! each visited once.
use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mycni_common::service::{Backend, SockReverseEntry, PROTO_TCP, PROTO_UDP};

use super::sock_diag::{self, DiagSocket, SockDiagError, SocketFamily};
use super::stale_sockets::RemovedBackends;

/// Where named network namespaces live (iproute2, containerd, CRI-O).
const NAMED_NAMESPACE_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];
/// A dump part is at most 32 KiB unless the reader asks for more.
const RECEIVE_BUFFER: usize = 64 * 1024;
/// The kernel answers at once; this only bounds a wait on a namespace being torn down.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);
const ENOENT: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum SocketTerminationError {
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sock_diag socket: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("sock_diag: {0}")]
    Diag(#[from] SockDiagError),
    #[error("the socket termination thread panicked")]
    Thread,
}

/// What one [`end_stale_sockets`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TerminationReport {
    pub namespaces: usize,
    /// Each socket destroyed: its cookie and the backend it was connected to (their
    /// `SOCK_REVERSE` entry is stale now).
    pub destroyed: Vec<(u64, Backend)>,
    /// Namespaces or sockets that could not be handled (logged).
    pub failures: usize,
}

/// Destroys, in every namespace, the sockets `removed` ends; `frontend_of(cookie, backend)`
/// is the socket's `SOCK_REVERSE` entry. Failures are logged and counted, never fatal: the
/// map writes before this already took the backend out of new connections.
pub fn end_stale_sockets(
    removed: &RemovedBackends,
    frontend_of: &(dyn Fn(u64, Backend) -> Option<SockReverseEntry> + Sync),
) -> TerminationReport {
    let mut report = TerminationReport::default();
    if removed.is_empty() {
        return report;
    }
    let namespaces = network_namespaces();
    report.namespaces = namespaces.len();
    // setns changes the calling thread's namespace: a thread of its own, which ends after.
    let worker = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut destroyed = Vec::new();
                let mut failures = 0;
                for (path, identity) in &namespaces {
                    match end_in_namespace(path, *identity, removed, frontend_of) {
                        Ok(outcome) => {
                            destroyed.extend(outcome.destroyed);
                            failures += outcome.failures;
                        }
                        // A process that exited since the walk: nothing left to end.
                        Err(SocketTerminationError::Enter { source, .. })
                            if source.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            log::warn!("services: ending stale sockets: {e}");
                            failures += 1;
                        }
                    }
                }
                (destroyed, failures)
            })
            .join()
    });
    match worker {
        Ok((destroyed, failures)) => {
            report.destroyed = destroyed;
            report.failures = failures;
        }
        Err(_) => {
            log::warn!("services: {}", SocketTerminationError::Thread);
            report.failures += 1;
        }
    }
    report
}

/// Every distinct network namespace with a thread in it or a name under `/run/netns`: a
/// path to open it by and its identity (device, inode of the nsfs file).
fn network_namespaces() -> Vec<(PathBuf, (u64, u64))> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut note = |path: PathBuf| {
        if let Ok(meta) = std::fs::metadata(&path) {
            if seen.insert((meta.dev(), meta.ino())) {
                found.push((path, (meta.dev(), meta.ino())));
            }
        }
    };
    for pid in numeric_entries(Path::new("/proc")) {
        for tid in numeric_entries(&pid.join("task")) {
            note(tid.join("ns/net"));
        }
    }
    for dir in NAMED_NAMESPACE_DIRS {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                note(entry.path());
            }
        }
    }
    found
}

fn numeric_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path())
        .collect()
}

#[derive(Default)]
struct NamespaceOutcome {
    destroyed: Vec<(u64, Backend)>,
    failures: usize,
}

/// Enters the namespace at `path` (if it is still `identity`) on this thread, and ends its
/// stale sockets.
fn end_in_namespace(
    path: &Path,
    identity: (u64, u64),
    removed: &RemovedBackends,
    frontend_of: &(dyn Fn(u64, Backend) -> Option<SockReverseEntry> + Sync),
) -> Result<NamespaceOutcome, SocketTerminationError> {
    let enter_error = |source| SocketTerminationError::Enter {
        path: path.to_path_buf(),
        source,
    };
    let namespace = File::open(path).map_err(enter_error)?;
    let meta = namespace.metadata().map_err(enter_error)?;
    if (meta.dev(), meta.ino()) != identity {
        // The pid was reused by a process elsewhere; its namespace is listed on its own.
        return Ok(NamespaceOutcome::default());
    }
    // SAFETY: setns on a namespace fd we own; it changes only this thread's namespace.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(enter_error(std::io::Error::last_os_error()));
    }
    let mut diag = DiagSocketChannel::open()?;
    let mut outcome = NamespaceOutcome::default();
    for protocol in removed.protocols() {
        // sock_diag destroys TCP and UDP sockets only (SCTP has no SOCK_DESTROY).
        if protocol != PROTO_TCP && protocol != PROTO_UDP {
            continue;
        }
        // AF_INET sockets, and AF_INET6 ones of dual-stack clients (IPv4-mapped peers).
        let sockets = SocketFamily::ALL
            .into_iter()
            .map(|family| diag.dump(family, protocol))
            .collect::<Result<Vec<_>, _>>()?;
        for socket in sockets.into_iter().flatten() {
            let Some(backend) = removed.candidate(&socket) else {
                continue;
            };
            let Some(frontend) = frontend_of(socket.cookie, backend) else {
                continue;
            };
            if !removed.ends(&socket, &frontend) {
                continue;
            }
            match diag.destroy(&socket) {
                Ok(()) => outcome.destroyed.push((socket.cookie, backend)),
                // Closed since the dump.
                Err(SocketTerminationError::Diag(SockDiagError::Kernel(ENOENT))) => {}
                Err(e) => {
                    log::warn!(
                        "services: cannot end the socket {}:{} -> {}:{} in {}: {e}",
                        socket.source,
                        socket.source_port,
                        socket.destination,
                        socket.destination_port,
                        path.display()
                    );
                    outcome.failures += 1;
                }
            }
        }
    }
    Ok(outcome)
}

/// A `NETLINK_SOCK_DIAG` socket in the namespace of the thread that opened it.
struct DiagSocketChannel {
    fd: OwnedFd,
    sequence: u32,
    buffer: Vec<u8>,
}

impl DiagSocketChannel {
    fn open() -> Result<DiagSocketChannel, SocketTerminationError> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(SocketTerminationError::Netlink(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: RECEIVE_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: the option value is a timeval of the size given.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(SocketTerminationError::Netlink(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(DiagSocketChannel {
            fd,
            sequence: 0,
            buffer: vec![0; RECEIVE_BUFFER],
        })
    }

    fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    fn send(&self, message: &[u8]) -> Result<(), SocketTerminationError> {
        // SAFETY: the buffer is valid for its length; an unconnected netlink socket sends
        // to the kernel.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(SocketTerminationError::Netlink(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// One datagram from the kernel.
    fn receive(&mut self) -> Result<&[u8], SocketTerminationError> {
        // SAFETY: the buffer is ours and valid for its length.
        let received = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buffer.as_mut_ptr().cast(),
                self.buffer.len(),
                0,
            )
        };
        if received < 0 {
            return Err(SocketTerminationError::Netlink(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(&self.buffer[..received as usize])
    }

    /// The namespace's `family` sockets of `protocol` in a client state, talking IPv4.
    fn dump(
        &mut self,
        family: SocketFamily,
        protocol: u8,
    ) -> Result<Vec<DiagSocket>, SocketTerminationError> {
        let sequence = self.next_sequence();
        self.send(&sock_diag::dump_request(
            family,
            protocol,
            sock_diag::client_states(protocol),
            sequence,
        ))?;
        let mut sockets = Vec::new();
        loop {
            let part = sock_diag::parse_dump(family, protocol, self.receive()?)?;
            sockets.extend(part.sockets);
            if part.done {
                return Ok(sockets);
            }
        }
    }

    fn destroy(&mut self, socket: &DiagSocket) -> Result<(), SocketTerminationError> {
        let sequence = self.next_sequence();
        self.send(&sock_diag::destroy_request(socket, sequence))?;
        Ok(sock_diag::parse_ack(self.receive()?)?)
    }
}
