//! A process for the Services tests and benchmark to run inside a test cgroup (where the socket-level
//! programs apply, which a thread of the test process cannot be): a server that names
//! itself, and clients that print what each call saw, one line per try.
//!
//! ```text
//! mycni-sock-probe serve PORT NAME            TCP and UDP on 0.0.0.0:PORT, answering NAME; prints "ready"
//! mycni-sock-probe serve-peer PORT NAME       the same, answering "NAME from CLIENT-ADDRESS"
//! mycni-sock-probe serve6 PORT NAME           TCP on [::]:PORT, answering NAME; prints "ready"
//! mycni-sock-probe tcp ADDR:PORT [N]          N connections: "peer=ADDR reply=NAME" or "errno=E"
//! mycni-sock-probe udp ADDR:PORT [N]          N datagrams on one unconnected socket: "peer=SOURCE reply=NAME"
//! mycni-sock-probe udp-connected ADDR:PORT [N]  one connected socket: "peer=GETPEERNAME reply=NAME"
//! mycni-sock-probe serve-held PORT NAME       TCP on 0.0.0.0:PORT, answering NAME to each message on a kept connection
//! mycni-sock-probe tcp-held ADDR:PORT [N]     one connection, N messages ("peer=GETPEERNAME reply=NAME"), then a
//!                                             blocking read until it ends: "eof" or "errno=E" (EAGAIN after HELD_TIMEOUT)
//! mycni-sock-probe conn-rate ADDR:PORT MILLIS  the bench's connection-rate client: "per_s=R"
//! mycni-sock-probe tcp-rr ADDR:PORT N         the bench's round-trip client: "avg_us=A p50_us=M p99_us=P"
//! ```
//!
//! Clients open a socket of the target's family: an `[::ffff:a.b.c.d]:PORT` target is an
//! IPv4 address reached through an AF_INET6 socket (`IPV6_V6ONLY` off, Linux's default).
//!
//! With `MYCNI_PROBE_STEP` set, the UDP modes and `tcp-held` wait for a line on stdin before
//! each message after the first (a test does something between them, on the same socket).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context, Result};

const TIMEOUT: Duration = Duration::from_secs(3);
/// How long `tcp-held`'s last read waits for its connection to end: a bound on a test
/// that expects it ended, not a measure.
const HELD_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    match (arg(0), arg(1), arg(2)) {
        (Some("serve"), Some(port), Some(name)) => serve(port.parse()?, name, false),
        (Some("serve-peer"), Some(port), Some(name)) => serve(port.parse()?, name, true),
        (Some("serve-held"), Some(port), Some(name)) => serve_held(port.parse()?, name),
        (Some("serve6"), Some(port), Some(name)) => serve6(port.parse()?, name),
        (Some("tcp-held"), Some(target), count) => {
            let target: SocketAddr = target.parse().context("target ADDR:PORT")?;
            tcp_held(target, count.unwrap_or("1").parse().context("N")?)
        }
        (Some("conn-rate"), Some(target), Some(millis)) => {
            let target: SocketAddr = target.parse().context("target ADDR:PORT")?;
            let duration = Duration::from_millis(millis.parse().context("MILLIS")?);
            let rate = mycni_tests::bench::tcp_connection_rate_client(target, duration)?;
            println!("per_s={rate}");
            Ok(())
        }
        (Some("tcp-rr"), Some(target), Some(count)) => {
            let target: SocketAddr = target.parse().context("target ADDR:PORT")?;
            let trips = mycni_tests::bench::tcp_rr_client(target, count.parse().context("N")?)?;
            println!(
                "avg_us={} p50_us={} p99_us={}",
                trips.avg_us, trips.p50_us, trips.p99_us
            );
            Ok(())
        }
        (Some(mode), Some(target), count) => {
            let target: SocketAddr = target.parse().context("target ADDR:PORT")?;
            let count: usize = count.unwrap_or("1").parse()?;
            for _ in 0..count {
                let line = match mode {
                    "tcp" => tcp(target),
                    "udp" | "udp-connected" => continue,
                    _ => bail!("unknown mode {mode}"),
                };
                println!("{}", line.unwrap_or_else(describe));
            }
            match mode {
                "udp" => udp(target, count, false),
                "udp-connected" => udp(target, count, true),
                _ => Ok(()),
            }
        }
        _ => bail!(
            "usage: mycni-sock-probe serve|serve-peer|serve-held|serve6 PORT NAME \
             | tcp|udp|udp-connected|tcp-held ADDR:PORT [N] \
             | conn-rate ADDR:PORT MILLIS | tcp-rr ADDR:PORT N"
        ),
    }
}

fn describe(error: std::io::Error) -> String {
    format!("errno={}", error.raw_os_error().unwrap_or(0))
}

/// Answers every client with `name`, followed by " from " and the client's address when
/// `with_peer` (what a Service kept or replaced of the client's source).
fn serve(port: u16, name: &str, with_peer: bool) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    println!("ready");
    std::io::stdout().flush()?;
    let name = name.to_string();
    let reply_to = move |peer: SocketAddr| {
        if with_peer {
            format!("{name} from {}", peer.ip())
        } else {
            name.clone()
        }
    };
    let udp_reply_to = reply_to.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(udp_reply_to(peer).as_bytes(), peer);
        }
    });
    // A client that went away is its own problem.
    for mut conn in listener.incoming().flatten() {
        let Ok(peer) = conn.peer_addr() else {
            continue;
        };
        let _ = conn.write_all(reply_to(peer).as_bytes());
    }
    Ok(())
}

fn serve6(port: u16, name: &str) -> Result<()> {
    let listener = TcpListener::bind(("::", port))?;
    println!("ready");
    std::io::stdout().flush()?;
    for mut conn in listener.incoming().flatten() {
        let _ = conn.write_all(name.as_bytes());
    }
    Ok(())
}

fn serve_held(port: u16, name: &str) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("ready");
    std::io::stdout().flush()?;
    for mut conn in listener.incoming().flatten() {
        let reply = name.as_bytes().to_vec();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            // Until the client closes or resets the connection.
            while let Ok(1..) = conn.read(&mut buf) {
                if conn.write_all(&reply).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn tcp_held(target: SocketAddr, count: usize) -> Result<()> {
    let mut stream = match TcpStream::connect_timeout(&target, TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => {
            println!("{}", describe(e));
            return Ok(());
        }
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    let stepped = std::env::var_os("MYCNI_PROBE_STEP").is_some();
    let mut buf = [0u8; 512];
    for index in 0..count {
        if stepped && index > 0 {
            let mut go = String::new();
            std::io::stdin().read_line(&mut go)?;
        }
        let line = stream
            .write_all(b"probe")
            .and_then(|_| stream.read(&mut buf))
            .and_then(|n| {
                let peer = stream.peer_addr()?;
                Ok(format!(
                    "peer={peer} reply={}",
                    String::from_utf8_lossy(&buf[..n])
                ))
            });
        println!("{}", line.unwrap_or_else(describe));
        std::io::stdout().flush()?;
    }
    // The server sends nothing unasked: this read returns when the connection ends.
    stream.set_read_timeout(Some(HELD_TIMEOUT))?;
    let end = match stream.read(&mut buf) {
        Ok(0) => "eof".to_string(),
        Ok(n) => format!("unasked reply={}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => describe(e),
    };
    println!("{end}");
    Ok(())
}

fn tcp(target: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(format!("peer={peer} reply={reply}"))
}

fn udp(target: SocketAddr, count: usize, connected: bool) -> Result<()> {
    // The target's family: an IPv6 target (`[::ffff:a.b.c.d]:port` included) gets an
    // AF_INET6 socket, as a dual-stack application's.
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    if connected {
        if let Err(e) = socket.connect(target) {
            let line = describe(e);
            for _ in 0..count {
                println!("{line}");
            }
            return Ok(());
        }
    }
    let mut buf = [0u8; 512];
    let stepped = std::env::var_os("MYCNI_PROBE_STEP").is_some();
    for index in 0..count {
        if stepped && index > 0 {
            let mut go = String::new();
            std::io::stdin().read_line(&mut go)?;
        }
        let line = if connected {
            socket
                .send(b"probe")
                .and_then(|_| socket.recv(&mut buf))
                .and_then(|n| {
                    let peer = socket.peer_addr()?;
                    Ok(format!(
                        "peer={peer} reply={}",
                        String::from_utf8_lossy(&buf[..n])
                    ))
                })
        } else {
            socket
                .send_to(b"probe", target)
                .and_then(|_| socket.recv_from(&mut buf))
                .map(|(n, from)| {
                    format!("peer={from} reply={}", String::from_utf8_lossy(&buf[..n]))
                })
        };
        println!("{}", line.unwrap_or_else(describe));
        std::io::stdout().flush()?;
    }
    Ok(())
}
