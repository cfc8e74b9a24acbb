//! Pure: which sockets a backend change leaves talking to a backend that is gone. `connect4`
//! translates a socket once, so a TCP connection or a connected UDP socket keeps its
//! backend for life; when the agent takes that backend away from the frontend, the socket
//! must end so the application reconnects (and gets a live backend).
//!
//! A socket is ended only when `SOCK_REVERSE` shows it was translated from a frontend to
//! that backend (a socket that connected to the pod's address itself is not ours) and that
//! (frontend, backend) pair is among the ones the change removed.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use mycni_common::service::{Backend, ServiceKey, SockReverseEntry};

use super::plan::DesiredServices;
use super::sock_diag::DiagSocket;

/// A frontend as a socket remembers it: address, port (host order), protocol.
type Frontend = ([u8; 4], u16, u8);

/// The (frontend, backend) pairs one change removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemovedBackends {
    pairs: BTreeSet<(Frontend, Backend)>,
    /// The removed backends with their protocol, to pick candidate sockets by peer.
    backends: BTreeSet<(u8, Backend)>,
}

impl RemovedBackends {
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The protocols some removed pair has (the socket lists worth reading).
    pub fn protocols(&self) -> BTreeSet<u8> {
        self.backends
            .iter()
            .map(|(protocol, _)| *protocol)
            .collect()
    }

    /// The backend a socket's peer is, when that peer is a removed backend of a frontend
    /// of the socket's protocol: the socket is worth a `SOCK_REVERSE` lookup.
    pub fn candidate(&self, socket: &DiagSocket) -> Option<Backend> {
        let backend = Backend {
            address: socket.destination.octets(),
            port: socket.destination_port,
            pad: 0,
        };
        self.backends
            .contains(&(socket.protocol, backend))
            .then_some(backend)
    }

    /// Whether `socket`, which `SOCK_REVERSE` says was translated from `frontend` to its
    /// peer, lost that backend in this change.
    pub fn ends(&self, socket: &DiagSocket, frontend: &SockReverseEntry) -> bool {
        let Some(backend) = self.candidate(socket) else {
            return false;
        };
        self.pairs
            .contains(&((frontend.address, frontend.port, socket.protocol), backend))
    }

    /// Adds the pairs `later` removed (changes queued for one termination round).
    pub fn merge(&mut self, later: RemovedBackends) {
        self.pairs.extend(later.pairs);
        self.backends.extend(later.backends);
    }

    /// The pairs `current` (what the maps hold now) does not have again: a backend back in
    /// its frontend's list since its removal was queued serves its sockets once more, and
    /// a socket connected to it since must not end.
    pub fn still_removed(&self, current: &DesiredServices) -> RemovedBackends {
        let mut left = RemovedBackends::default();
        for ((address, port, protocol), backend) in &self.pairs {
            let key = ServiceKey {
                address: *address,
                port: *port,
                protocol: *protocol,
                scope: 0,
            };
            let back = current.get(&key).is_some_and(|(_, list)| {
                list.iter()
                    .any(|listed| Backend { pad: 0, ..*listed } == *backend)
            });
            if !back {
                left.pairs.insert(((*address, *port, *protocol), *backend));
                left.backends.insert((*protocol, *backend));
            }
        }
        left
    }

    /// The removed pairs, for logs: `frontend -> backend/protocol`.
    pub fn describe(&self) -> Vec<String> {
        self.pairs
            .iter()
            .map(|((address, port, protocol), backend)| {
                format!(
                    "{}:{port} -> {}:{}/{protocol}",
                    Ipv4Addr::from(*address),
                    Ipv4Addr::from(backend.address),
                    backend.port
                )
            })
            .collect()
    }
}

/// The pairs `current` (what the maps held) has and `desired` has not: a backend dropped
/// from a frontend's list, or every backend of a frontend that goes away.
pub fn removed_backends(current: &DesiredServices, desired: &DesiredServices) -> RemovedBackends {
    let mut removed = RemovedBackends::default();
    for (key, (_, backends)) in current {
        let kept = desired.get(key).map(|(_, list)| list.as_slice());
        for backend in backends {
            if kept.is_some_and(|list| list.contains(backend)) {
                continue;
            }
            let backend = Backend { pad: 0, ..*backend };
            removed
                .pairs
                .insert(((key.address, key.port, key.protocol), backend));
            removed.backends.insert((key.protocol, backend));
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket_lb::sock_diag::SocketFamily;
    use mycni_common::service::{ServiceEntry, PROTO_TCP, PROTO_UDP};

    fn key(port: u16, protocol: u8) -> ServiceKey {
        ServiceKey {
            address: [10, 96, 0, 10],
            port,
            protocol,
            scope: 0,
        }
    }

    fn backend(last: u8) -> Backend {
        Backend {
            address: [10, 244, 1, last],
            port: 8080,
            pad: 0,
        }
    }

    fn services(list: &[(ServiceKey, Vec<Backend>)]) -> DesiredServices {
        list.iter()
            .map(|(key, backends)| (*key, (ServiceEntry::default(), backends.clone())))
            .collect()
    }

    fn socket(protocol: u8, peer: Backend) -> DiagSocket {
        DiagSocket {
            family: SocketFamily::Inet,
            protocol,
            state: 1,
            source: Ipv4Addr::new(10, 244, 1, 50),
            source_port: 40_000,
            destination: Ipv4Addr::from(peer.address),
            destination_port: peer.port,
            interface: 0,
            cookie: 42,
        }
    }

    fn through(port: u16) -> SockReverseEntry {
        SockReverseEntry {
            address: [10, 96, 0, 10],
            port,
            pad: 0,
        }
    }

    #[test]
    fn a_backend_dropped_from_a_frontend_ends_only_its_sockets_through_that_frontend() {
        let tcp = key(80, PROTO_TCP);
        let before = services(&[(tcp, vec![backend(1), backend(2)])]);
        let after = services(&[(tcp, vec![backend(2)])]);
        let removed = removed_backends(&before, &after);
        assert_eq!(removed.describe(), ["10.96.0.10:80 -> 10.244.1.1:8080/6"]);
        assert!(removed.ends(&socket(PROTO_TCP, backend(1)), &through(80)));
        // The kept backend, another frontend port, another protocol: left alone.
        assert!(!removed.ends(&socket(PROTO_TCP, backend(2)), &through(80)));
        assert!(!removed.ends(&socket(PROTO_TCP, backend(1)), &through(81)));
        assert!(!removed.ends(&socket(PROTO_UDP, backend(1)), &through(80)));
        assert_eq!(removed.protocols(), BTreeSet::from([PROTO_TCP]));
    }

    #[test]
    fn a_frontend_that_goes_away_removes_all_its_backends() {
        let dns = key(53, PROTO_UDP);
        let removed = removed_backends(
            &services(&[(dns, vec![backend(1), backend(2)])]),
            &DesiredServices::new(),
        );
        assert!(removed.ends(&socket(PROTO_UDP, backend(1)), &through(53)));
        assert!(removed.ends(&socket(PROTO_UDP, backend(2)), &through(53)));
    }

    #[test]
    fn queued_removals_merge_and_a_backend_listed_again_is_no_longer_removed() {
        let (tcp, dns) = (key(80, PROTO_TCP), key(53, PROTO_UDP));
        let mut removed = removed_backends(
            &services(&[(tcp, vec![backend(1), backend(2)])]),
            &services(&[(tcp, vec![backend(2)])]),
        );
        removed.merge(removed_backends(
            &services(&[(dns, vec![backend(3)])]),
            &DesiredServices::new(),
        ));
        assert_eq!(
            removed.describe(),
            [
                "10.96.0.10:53 -> 10.244.1.3:8080/17",
                "10.96.0.10:80 -> 10.244.1.1:8080/6"
            ]
        );
        // backend 1 came back to port 80 before the round ran; backend 3 did not.
        let now = services(&[(tcp, vec![backend(2), backend(1)])]);
        let left = removed.still_removed(&now);
        assert_eq!(left.describe(), ["10.96.0.10:53 -> 10.244.1.3:8080/17"]);
        assert!(!left.ends(&socket(PROTO_TCP, backend(1)), &through(80)));
        assert_eq!(left.protocols(), BTreeSet::from([PROTO_UDP]));
        assert!(removed.still_removed(&removed_to_all(&now)).is_empty());
    }

    /// `current` with backend 3 listed at port 53 too.
    fn removed_to_all(current: &DesiredServices) -> DesiredServices {
        let mut all = current.clone();
        all.insert(
            key(53, PROTO_UDP),
            (ServiceEntry::default(), vec![backend(3)]),
        );
        all
    }

    #[test]
    fn an_unchanged_or_growing_list_removes_nothing() {
        let tcp = key(80, PROTO_TCP);
        let before = services(&[(tcp, vec![backend(1)])]);
        assert!(removed_backends(&before, &before).is_empty());
        let grown = services(&[(tcp, vec![backend(2), backend(1)])]);
        assert!(removed_backends(&before, &grown).is_empty());
        assert!(removed_backends(&DesiredServices::new(), &grown).is_empty());
    }

    #[test]
    fn a_peer_that_was_never_a_removed_backend_is_no_candidate() {
        let tcp = key(80, PROTO_TCP);
        let removed = removed_backends(
            &services(&[(tcp, vec![backend(1)])]),
            &services(&[(tcp, vec![])]),
        );
        assert_eq!(
            removed.candidate(&socket(PROTO_TCP, backend(1))),
            Some(backend(1))
        );
        assert_eq!(removed.candidate(&socket(PROTO_TCP, backend(3))), None);
        let other_port = Backend {
            port: 9090,
            ..backend(1)
        };
        assert_eq!(removed.candidate(&socket(PROTO_TCP, other_port)), None);
    }
}
