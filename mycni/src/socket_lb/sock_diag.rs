//! Pure: the `NETLINK_SOCK_DIAG` messages that list a network namespace's TCP or UDP
//! sockets talking IPv4 (`SOCK_DIAG_BY_FAMILY` dump) and destroy one of them
//! (`SOCK_DESTROY`, the kernel's `CONFIG_INET_DIAG_DESTROY`), encoded and decoded without
//! I/O ([`super::socket_termination`] sends them). Layouts from `linux/inet_diag.h` and
//! `linux/netlink.h`; numbers in the socket id are in network order, the rest in host order.
//!
//! IPv4 is talked by AF_INET sockets and by AF_INET6 ones with an IPv4-mapped peer
//! (`::ffff:a.b.c.d`, dual-stack applications, translated by `connect6`). The kernel lists
//! each family on its own, so each is dumped on its own; an AF_INET6 socket with a real
//! IPv6 peer is skipped (mycni translates no IPv6).
use std::net::Ipv4Addr;

/// `nlmsghdr::nlmsg_type` values.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `nlmsghdr::nlmsg_flags` bits.
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The first 12 bytes of an IPv4-mapped IPv6 address.
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
const NLMSG_HEADER_LEN: usize = 16;
/// `struct inet_diag_sockid`: ports, 4 × 4 bytes of each address, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, extensions, pad, states, socket id.
const REQUEST_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` up to the fields read here: family, state, timer, retransmits,
/// then the socket id.
const MESSAGE_MIN_LEN: usize = 4 + SOCKID_LEN;

/// TCP states (`include/net/tcp_states.h`) as bits of `inet_diag_req_v2::idiag_states`.
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

/// A client socket's states worth ending: a TCP one connecting or connected (not
/// listening, not in TIME_WAIT), a UDP one connected (UDP marks that ESTABLISHED).
pub fn client_states(protocol: u8) -> u32 {
    if protocol == mycni_common::service::PROTO_UDP {
        return 1 << TCP_ESTABLISHED;
    }
    [
        TCP_ESTABLISHED,
        TCP_SYN_SENT,
        TCP_FIN_WAIT1,
        TCP_FIN_WAIT2,
        TCP_CLOSE_WAIT,
        TCP_LAST_ACK,
        TCP_CLOSING,
    ]
    .iter()
    .fold(0, |bits, state| bits | (1 << state))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SockDiagError {
    #[error("a netlink message of {len} bytes claims {claimed}")]
    Truncated { len: usize, claimed: usize },
    #[error("a socket record of {0} bytes is shorter than inet_diag_msg")]
    ShortRecord(usize),
    #[error("the kernel answered errno {0}")]
    Kernel(i32),
    #[error("unexpected netlink message type {0}")]
    UnexpectedType(u16),
}

/// The socket families that talk IPv4, each listed by its own dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFamily {
    /// AF_INET sockets.
    Inet,
    /// AF_INET6 sockets whose addresses are IPv4-mapped (the others are left out).
    Inet6Mapped,
}

impl SocketFamily {
    pub const ALL: [SocketFamily; 2] = [SocketFamily::Inet, SocketFamily::Inet6Mapped];

    fn number(self) -> u8 {
        match self {
            SocketFamily::Inet => AF_INET,
            SocketFamily::Inet6Mapped => AF_INET6,
        }
    }
}

/// One socket talking IPv4 as the kernel listed it: enough to name it again in a
/// `SOCK_DESTROY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    pub family: SocketFamily,
    pub protocol: u8,
    pub state: u8,
    pub source: Ipv4Addr,
    pub source_port: u16,
    /// The peer: for a socket load-balanced at connect, the backend.
    pub destination: Ipv4Addr,
    pub destination_port: u16,
    pub interface: u32,
    /// The socket's cookie, as `bpf_get_socket_cookie` returns it.
    pub cookie: u64,
}

fn header(buf: &mut Vec<u8>, message_type: u16, flags: u16, sequence: u32, payload_len: usize) {
    buf.extend_from_slice(&((NLMSG_HEADER_LEN + payload_len) as u32).to_ne_bytes());
    buf.extend_from_slice(&message_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&sequence.to_ne_bytes());
    // Port id 0: the kernel.
    buf.extend_from_slice(&0u32.to_ne_bytes());
}

fn request(
    buf: &mut Vec<u8>,
    family: SocketFamily,
    protocol: u8,
    states: u32,
    socket: Option<&DiagSocket>,
) {
    buf.extend_from_slice(&[family.number(), protocol, 0, 0]);
    buf.extend_from_slice(&states.to_ne_bytes());
    let Some(socket) = socket else {
        buf.extend_from_slice(&[0; SOCKID_LEN]);
        return;
    };
    buf.extend_from_slice(&socket.source_port.to_be_bytes());
    buf.extend_from_slice(&socket.destination_port.to_be_bytes());
    // Each address field holds 16 bytes: an IPv4 address in the first 4, a mapped one
    // whole (the kernel looks a mapped pair up as IPv4).
    for address in [socket.source, socket.destination] {
        match family {
            SocketFamily::Inet => {
                buf.extend_from_slice(&address.octets());
                buf.extend_from_slice(&[0; 12]);
            }
            SocketFamily::Inet6Mapped => {
                buf.extend_from_slice(&address.to_ipv6_mapped().octets());
            }
        }
    }
    buf.extend_from_slice(&socket.interface.to_ne_bytes());
    // The kernel compares both halves with the socket's cookie before destroying it.
    buf.extend_from_slice(&(socket.cookie as u32).to_ne_bytes());
    buf.extend_from_slice(&((socket.cookie >> 32) as u32).to_ne_bytes());
}

/// The request that lists every `family` socket of `protocol` in one of `states` (bits).
pub fn dump_request(family: SocketFamily, protocol: u8, states: u32, sequence: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(NLMSG_HEADER_LEN + REQUEST_LEN);
    header(
        &mut buf,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        sequence,
        REQUEST_LEN,
    );
    request(&mut buf, family, protocol, states, None);
    buf
}

/// The request that destroys `socket` (the application sees `ECONNABORTED`), acknowledged.
pub fn destroy_request(socket: &DiagSocket, sequence: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(NLMSG_HEADER_LEN + REQUEST_LEN);
    header(
        &mut buf,
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        sequence,
        REQUEST_LEN,
    );
    request(
        &mut buf,
        socket.family,
        socket.protocol,
        u32::MAX,
        Some(socket),
    );
    buf
}

/// What one received buffer of a dump held.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DumpPart {
    pub sockets: Vec<DiagSocket>,
    /// `NLMSG_DONE` came: the dump is complete.
    pub done: bool,
}

/// Splits a received buffer into its netlink messages: (type, payload).
fn messages(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, SockDiagError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HEADER_LEN {
        let claimed = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if claimed < NLMSG_HEADER_LEN || claimed > rest.len() {
            return Err(SockDiagError::Truncated {
                len: rest.len(),
                claimed,
            });
        }
        let message_type = u16::from_ne_bytes([rest[4], rest[5]]);
        out.push((message_type, &rest[NLMSG_HEADER_LEN..claimed]));
        // Messages are padded to 4 bytes.
        let next = (claimed + 3) & !3;
        rest = rest.get(next..).unwrap_or_default();
    }
    Ok(out)
}

/// The errno of an `NLMSG_ERROR` payload (0 is an acknowledgement).
fn error_code(payload: &[u8]) -> Result<i32, SockDiagError> {
    let bytes: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(SockDiagError::ShortRecord(payload.len()))?;
    Ok(-i32::from_ne_bytes(bytes))
}

/// One record of a `family` dump; `None` for an AF_INET6 socket that talks real IPv6.
fn parse_socket(
    family: SocketFamily,
    protocol: u8,
    record: &[u8],
) -> Result<Option<DiagSocket>, SockDiagError> {
    if record.len() < MESSAGE_MIN_LEN {
        return Err(SockDiagError::ShortRecord(record.len()));
    }
    let id = &record[4..4 + SOCKID_LEN];
    let u32_at = |at: usize| u32::from_ne_bytes([id[at], id[at + 1], id[at + 2], id[at + 3]]);
    let address_at = |at: usize| -> Option<Ipv4Addr> {
        let field = &id[at..at + 16];
        let ipv4 = match family {
            SocketFamily::Inet => &field[..4],
            SocketFamily::Inet6Mapped if field[..12] == V4_MAPPED_PREFIX => &field[12..],
            SocketFamily::Inet6Mapped => return None,
        };
        Some(Ipv4Addr::new(ipv4[0], ipv4[1], ipv4[2], ipv4[3]))
    };
    let (Some(source), Some(destination)) = (address_at(4), address_at(20)) else {
        return Ok(None);
    };
    Ok(Some(DiagSocket {
        family,
        protocol,
        state: record[1],
        source_port: u16::from_be_bytes([id[0], id[1]]),
        destination_port: u16::from_be_bytes([id[2], id[3]]),
        source,
        destination,
        interface: u32_at(36),
        cookie: u64::from(u32_at(40)) | (u64::from(u32_at(44)) << 32),
    }))
}

/// Parses one received buffer of a `family` `protocol` dump.
pub fn parse_dump(
    family: SocketFamily,
    protocol: u8,
    buf: &[u8],
) -> Result<DumpPart, SockDiagError> {
    let mut part = DumpPart::default();
    for (message_type, payload) in messages(buf)? {
        match message_type {
            SOCK_DIAG_BY_FAMILY => part
                .sockets
                .extend(parse_socket(family, protocol, payload)?),
            NLMSG_DONE => part.done = true,
            NLMSG_ERROR => return Err(SockDiagError::Kernel(error_code(payload)?)),
            other => return Err(SockDiagError::UnexpectedType(other)),
        }
    }
    Ok(part)
}

/// Parses the answer to a [`destroy_request`]: `Ok(())` for the acknowledgement.
pub fn parse_ack(buf: &[u8]) -> Result<(), SockDiagError> {
    let Some((message_type, payload)) = messages(buf)?.into_iter().next() else {
        return Err(SockDiagError::Truncated {
            len: buf.len(),
            claimed: NLMSG_HEADER_LEN,
        });
    };
    if message_type != NLMSG_ERROR {
        return Err(SockDiagError::UnexpectedType(message_type));
    }
    match error_code(payload)? {
        0 => Ok(()),
        errno => Err(SockDiagError::Kernel(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycni_common::service::{PROTO_TCP, PROTO_UDP};

    fn socket() -> DiagSocket {
        DiagSocket {
            family: SocketFamily::Inet,
            protocol: PROTO_TCP,
            state: TCP_ESTABLISHED as u8,
            source: Ipv4Addr::new(10, 244, 1, 7),
            source_port: 40_000,
            destination: Ipv4Addr::new(10, 244, 2, 9),
            destination_port: 8080,
            interface: 0,
            cookie: 0x0000_0001_0000_0abc,
        }
    }

    /// An `inet_diag_msg` as the kernel writes it for `socket`, in a netlink message.
    fn kernel_record(socket: &DiagSocket) -> Vec<u8> {
        let mut payload = vec![socket.family.number(), socket.state, 0, 0];
        // The request's socket id has the same layout as the record's.
        let mut request_bytes = Vec::new();
        request(
            &mut request_bytes,
            socket.family,
            socket.protocol,
            0,
            Some(socket),
        );
        payload.extend_from_slice(&request_bytes[8..]);
        // expires, rqueue, wqueue, uid, inode
        payload.extend_from_slice(&[0; 20]);
        let mut buf = Vec::new();
        header(&mut buf, SOCK_DIAG_BY_FAMILY, 2, 1, payload.len());
        buf.extend_from_slice(&payload);
        buf
    }

    fn error_message(errno: i32) -> Vec<u8> {
        let mut buf = Vec::new();
        header(&mut buf, NLMSG_ERROR, 0, 1, 4 + NLMSG_HEADER_LEN);
        buf.extend_from_slice(&(-errno).to_ne_bytes());
        buf.extend_from_slice(&[0; NLMSG_HEADER_LEN]);
        buf
    }

    #[test]
    fn a_destroy_request_names_the_socket_by_ports_addresses_and_cookie() {
        let buf = destroy_request(&socket(), 7);
        assert_eq!(buf.len(), NLMSG_HEADER_LEN + REQUEST_LEN);
        assert_eq!(&buf[0..4], &(72u32).to_ne_bytes());
        assert_eq!(&buf[4..6], &SOCK_DESTROY.to_ne_bytes());
        assert_eq!(&buf[6..8], &(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        assert_eq!(&buf[8..12], &7u32.to_ne_bytes());
        let body = &buf[NLMSG_HEADER_LEN..];
        assert_eq!(&body[..2], &[AF_INET, PROTO_TCP]);
        // Ports in network order, then the addresses' first words.
        assert_eq!(&body[8..12], &[0x9c, 0x40, 0x1f, 0x90]);
        assert_eq!(&body[12..16], &[10, 244, 1, 7]);
        assert_eq!(&body[28..32], &[10, 244, 2, 9]);
        assert_eq!(&body[48..52], &0xabcu32.to_ne_bytes());
        assert_eq!(&body[52..56], &1u32.to_ne_bytes());
    }

    #[test]
    fn a_dump_request_asks_for_every_socket_of_the_states() {
        let buf = dump_request(SocketFamily::Inet, PROTO_UDP, client_states(PROTO_UDP), 3);
        assert_eq!(&buf[4..6], &SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert_eq!(&buf[6..8], &(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        assert_eq!(&buf[16..18], &[AF_INET, PROTO_UDP]);
        assert_eq!(&buf[20..24], &2u32.to_ne_bytes(), "connected UDP only");
        assert!(buf[24..].iter().all(|b| *b == 0), "no socket named");
    }

    #[test]
    fn tcp_client_states_leave_out_listeners_and_time_wait() {
        let states = client_states(PROTO_TCP);
        assert_ne!(states & 1 << TCP_ESTABLISHED, 0);
        assert_ne!(states & 1 << TCP_SYN_SENT, 0);
        // LISTEN (10) and TIME_WAIT (6) are not ours to end.
        assert_eq!(states & (1 << 10 | 1 << 6), 0);
    }

    #[test]
    fn a_dump_parses_back_what_a_destroy_names() {
        let mut second = socket();
        second.cookie = u64::MAX;
        second.destination_port = 53;
        let mut buf = kernel_record(&socket());
        buf.extend_from_slice(&kernel_record(&second));
        let mut done = Vec::new();
        header(&mut done, NLMSG_DONE, 2, 1, 4);
        done.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&done);
        let part = parse_dump(SocketFamily::Inet, PROTO_TCP, &buf).expect("a valid dump");
        assert_eq!(part.sockets, vec![socket(), second]);
        assert!(part.done);
        let first_only =
            parse_dump(SocketFamily::Inet, PROTO_TCP, &kernel_record(&socket())).expect("valid");
        assert!(!first_only.done, "more parts to come");
    }

    #[test]
    fn errors_and_truncation_are_reported() {
        assert_eq!(
            parse_dump(SocketFamily::Inet, PROTO_TCP, &error_message(1)),
            Err(SockDiagError::Kernel(1))
        );
        let record = kernel_record(&socket());
        assert!(matches!(
            parse_dump(SocketFamily::Inet, PROTO_TCP, &record[..record.len() - 8]),
            Err(SockDiagError::Truncated { .. })
        ));
        let mut short = Vec::new();
        header(&mut short, SOCK_DIAG_BY_FAMILY, 2, 1, 8);
        short.extend_from_slice(&[0; 8]);
        assert_eq!(
            parse_dump(SocketFamily::Inet, PROTO_TCP, &short),
            Err(SockDiagError::ShortRecord(8))
        );
    }

    #[test]
    fn a_dual_stack_socket_is_named_by_its_ipv4_mapped_addresses() {
        let mapped = DiagSocket {
            family: SocketFamily::Inet6Mapped,
            ..socket()
        };
        let buf = destroy_request(&mapped, 7);
        let body = &buf[NLMSG_HEADER_LEN..];
        assert_eq!(&body[..2], &[AF_INET6, PROTO_TCP]);
        let v4_mapped = |ipv4: [u8; 4]| [&V4_MAPPED_PREFIX[..], &ipv4[..]].concat();
        assert_eq!(&body[12..28], &v4_mapped([10, 244, 1, 7])[..]);
        assert_eq!(&body[28..44], &v4_mapped([10, 244, 2, 9])[..]);
        assert_eq!(&body[48..52], &0xabcu32.to_ne_bytes());
        let dump = dump_request(SocketFamily::Inet6Mapped, PROTO_UDP, 2, 1);
        assert_eq!(&dump[16..18], &[AF_INET6, PROTO_UDP]);
        // The kernel's record parses back to the same socket.
        let part = parse_dump(
            SocketFamily::Inet6Mapped,
            PROTO_TCP,
            &kernel_record(&mapped),
        )
        .expect("a valid dump");
        assert_eq!(part.sockets, vec![mapped]);
    }

    #[test]
    fn a_dual_stack_socket_talking_real_ipv6_is_left_out() {
        let mapped = DiagSocket {
            family: SocketFamily::Inet6Mapped,
            ..socket()
        };
        let mut record = kernel_record(&mapped);
        // The destination turned 2001:db8::a00:209 (same last 32 bits, not mapped).
        let destination = NLMSG_HEADER_LEN + 4 + 20;
        record[destination..destination + 12]
            .copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0]);
        let part = parse_dump(SocketFamily::Inet6Mapped, PROTO_TCP, &record).expect("valid");
        assert_eq!(part.sockets, vec![]);
    }

    #[test]
    fn an_ack_is_an_error_message_with_errno_zero() {
        assert_eq!(parse_ack(&error_message(0)), Ok(()));
        // ENOENT: the socket closed meanwhile.
        assert_eq!(parse_ack(&error_message(2)), Err(SockDiagError::Kernel(2)));
        assert!(parse_ack(&[]).is_err());
    }
}
