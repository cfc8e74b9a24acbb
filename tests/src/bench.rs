//! Measurements for `cargo xtask bench`: request/response latency, connection rate,
//! throughput with CPU cost, between two namespaces; and statistics over samples.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::Netns;

/// The CPU every round-trip and connection-rate client and server runs on
/// (`MYCNI_BENCH_CPU`, else the machine's last CPU; `any` leaves them to the scheduler, to
/// compare). Measured on this 2-CPU VM: a one-byte
/// TCP round trip over a bare veth took 6–7 µs with client and server on one CPU and 38–42
/// µs on two (the wakeup crosses CPUs: an IPI and a CPU leaving its idle state), and left
/// alone the scheduler picks either from one sample to the next, so the medians were
/// bimodal. One CPU for both, for every configuration alike, removes that; the veth's
/// receive path (and the programs under test) run in the sender's softirq on that CPU too.
pub fn bench_cpu() -> Option<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    match std::env::var("MYCNI_BENCH_CPU") {
        Ok(any) if any == "any" => None,
        Ok(cpu) => Some(
            cpu.parse()
                .ok()
                .filter(|cpu| *cpu < cpus)
                .unwrap_or(cpus - 1),
        ),
        Err(_) => Some(cpus - 1),
    }
}

/// The calling thread runs on [`bench_cpu`] alone until the guard drops, when its CPU set
/// before is put back.
pub struct PinnedToBenchCpu {
    before: Option<libc::cpu_set_t>,
}

pub fn pin_to_bench_cpu() -> Result<PinnedToBenchCpu> {
    let Some(cpu) = bench_cpu() else {
        return Ok(PinnedToBenchCpu { before: None });
    };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; an all-zero one is the empty set.
    let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the set is as large as `size` says.
    if unsafe { libc::sched_getaffinity(0, size, &mut before) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    // SAFETY: as above.
    let mut only: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the number of CPUs, far below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut only) };
    // SAFETY: as above.
    if unsafe { libc::sched_setaffinity(0, size, &only) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sched_setaffinity to CPU {cpu}"));
    }
    Ok(PinnedToBenchCpu {
        before: Some(before),
    })
}

impl Drop for PinnedToBenchCpu {
    fn drop(&mut self) {
        if let Some(before) = self.before.take() {
            // SAFETY: the calling thread's own set, as read before.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &before) };
        }
    }
}

/// Median, minimum and maximum of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The `p`th percentile of sorted values, interpolating between neighbours (so the median
/// of an even count is the mean of the middle two).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

/// Latency samples as JSON, in milliseconds: p50, p99, max and every sample (sorted), as
/// the lab latency tests write them to target/bench/.
pub fn latency_summary(samples: &[Duration]) -> serde_json::Value {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    serde_json::json!({
        "p50_ms": percentile(&ms, 50.0),
        "p99_ms": percentile(&ms, 99.0),
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
        "samples_ms": ms,
    })
}

pub fn summarize(values: &[f64]) -> Summary {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Summary {
        median: percentile(&sorted, 50.0),
        min: sorted.first().copied().unwrap_or(f64::NAN),
        max: sorted.last().copied().unwrap_or(f64::NAN),
    }
}

/// Latency of request/response round trips, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct RoundTrips {
    pub avg_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

fn round_trips(samples: &mut [f64]) -> RoundTrips {
    samples.sort_by(|a, b| a.total_cmp(b));
    RoundTrips {
        avg_us: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
        p50_us: percentile(samples, 50.0),
        p99_us: percentile(samples, 99.0),
    }
}

/// One-byte TCP ping-pong on one connection, `count` times after a warm-up.
pub fn tcp_rr(
    server: &Netns,
    client: &Netns,
    addr: SocketAddr,
    count: usize,
) -> Result<RoundTrips> {
    let listener = server.run_inside(|| Ok(TcpListener::bind(addr)?))?;
    let serve = std::thread::spawn(move || -> Result<()> {
        let _pinned = pin_to_bench_cpu()?;
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut byte = [0u8; 1];
        while conn.read(&mut byte)? == 1 {
            conn.write_all(&byte)?;
        }
        Ok(())
    });
    let trips = client.run_inside(|| tcp_rr_client(addr, count))?;
    serve
        .join()
        .map_err(|_| anyhow::anyhow!("rr server panicked"))??;
    Ok(trips)
}

/// [`tcp_rr`]'s client, run where the caller is (a process inside a test cgroup, say):
/// one connection to `addr`, `count` one-byte round trips after a tenth as many to warm up.
pub fn tcp_rr_client(addr: SocketAddr, count: usize) -> Result<RoundTrips> {
    let _pinned = pin_to_bench_cpu()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut byte = [7u8; 1];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let start = Instant::now();
        stream.write_all(&byte)?;
        stream.read_exact(&mut byte)?;
        if i >= count / 10 {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(round_trips(&mut samples))
}

/// One-byte UDP ping-pong, `count` times after a warm-up.
pub fn udp_rr(
    server: &Netns,
    client: &Netns,
    addr: SocketAddr,
    count: usize,
) -> Result<RoundTrips> {
    let socket = server.run_inside(|| Ok(UdpSocket::bind(addr)?))?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let total = count + count / 10;
    let serve = std::thread::spawn(move || {
        let _pinned = pin_to_bench_cpu();
        let mut buf = [0u8; 16];
        let mut served = 0;
        while served < total {
            match socket.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    let _ = socket.send_to(&buf[..n], peer);
                    served += 1;
                }
                Err(_) => break,
            }
        }
    });
    let mut samples = client.run_inside(|| {
        let _pinned = pin_to_bench_cpu()?;
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 16];
        let mut samples = Vec::with_capacity(count);
        for i in 0..total {
            let start = Instant::now();
            socket.send(&[7])?;
            socket.recv(&mut buf).context("udp reply lost")?;
            if i >= count / 10 {
                samples.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })?;
    let _ = serve.join();
    Ok(round_trips(&mut samples))
}

/// Closes with a reset, so a connection-rate run leaves no TIME_WAIT behind to run out of ports.
fn close_with_reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid fd and a correctly sized struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// TCP connections per second: connect, one byte each way, close; for `duration`.
pub fn tcp_connection_rate(
    server: &Netns,
    client: &Netns,
    addr: SocketAddr,
    duration: Duration,
) -> Result<f64> {
    let serve = Server::one_byte(server, addr)?;
    let rate = client.run_inside(|| tcp_connection_rate_client(addr, duration));
    serve.stop(server);
    rate
}

/// [`tcp_connection_rate`]'s client, run where the caller is (a process inside a test
/// cgroup, say): connections per second to `addr` for `duration`.
pub fn tcp_connection_rate_client(addr: SocketAddr, duration: Duration) -> Result<f64> {
    let _pinned = pin_to_bench_cpu()?;
    let start = Instant::now();
    let mut done = 0u64;
    let mut byte = [1u8; 1];
    while start.elapsed() < duration {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_nodelay(true)?;
        stream.write_all(&byte)?;
        stream.read_exact(&mut byte)?;
        close_with_reset(&stream);
        done += 1;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// A TCP server thread listening in a namespace until [`Server::stop`].
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    /// [`tcp_connection_rate`]'s server: one byte back per connection, then closed.
    pub fn one_byte(netns: &Netns, addr: SocketAddr) -> Result<Server> {
        Server::start(netns, addr, |conn| {
            let mut byte = [0u8; 1];
            if conn.read(&mut byte).is_ok_and(|n| n == 1) {
                let _ = conn.write_all(&byte);
            }
        })
    }

    /// Echoes every byte of each connection (one at a time) until the client closes it.
    pub fn echo(netns: &Netns, addr: SocketAddr) -> Result<Server> {
        Server::start(netns, addr, |conn| {
            let mut byte = [0u8; 1];
            while conn.read(&mut byte).is_ok_and(|n| n == 1) {
                if conn.write_all(&byte).is_err() {
                    break;
                }
            }
        })
    }

    fn start(netns: &Netns, addr: SocketAddr, serve: fn(&mut TcpStream)) -> Result<Server> {
        let listener = netns.run_inside(|| Ok(TcpListener::bind(addr)?))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_server = stop.clone();
        let thread = std::thread::spawn(move || {
            // On the clients' CPU, as every server of a round trip or a rate is.
            let _pinned = pin_to_bench_cpu();
            // Blocking accept: polling would put its sleep into every connection's time.
            while let Ok((mut conn, _)) = listener.accept() {
                if stop_server.load(Ordering::Relaxed) {
                    break;
                }
                let _ = conn.set_nodelay(true);
                serve(&mut conn);
            }
        });
        Ok(Server { addr, stop, thread })
    }

    /// Ends the server: sets the flag and wakes its accept with a connection from inside
    /// `netns` (the namespace it listens in).
    pub fn stop(self, netns: &Netns) {
        self.stop.store(true, Ordering::Relaxed);
        let addr = self.addr;
        let _ = netns.run_inside(|| Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1))));
        let _ = self.thread.join();
    }
}

/// Busy CPU time of the whole machine (all CPUs), from /proc/stat, in ticks.
fn cpu_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if fields.len() < 5 {
        bail!("unexpected /proc/stat: {line}");
    }
    let total: u64 = fields.iter().sum();
    Ok(total - fields[3] - fields[4])
}

/// Throughput of `streams` parallel TCP streams for `duration`, and the CPU time the whole
/// machine spent per GB moved.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub gbit_per_s: f64,
    pub cpu_seconds_per_gb: f64,
}

pub fn tcp_throughput(
    server: &Netns,
    client: &Netns,
    addr: SocketAddr,
    streams: usize,
    duration: Duration,
) -> Result<Throughput> {
    let listener = server.run_inside(|| Ok(TcpListener::bind(addr)?))?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let serve = std::thread::spawn(move || -> Result<()> {
        let mut readers = Vec::new();
        for _ in 0..streams {
            let (mut conn, _) = listener.accept()?;
            let counter = counter.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            }));
        }
        for reader in readers {
            let _ = reader.join();
        }
        Ok(())
    });
    let busy_before = cpu_busy_ticks()?;
    let start = Instant::now();
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            client.run_inside(|| {
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                Ok(stream)
            })
        })
        .collect::<Result<_>>()?;
    let handles: Vec<_> = writers
        .into_iter()
        .map(|mut stream| {
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; 128 * 1024];
                let start = Instant::now();
                while start.elapsed() < duration {
                    if stream.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    serve
        .join()
        .map_err(|_| anyhow::anyhow!("throughput server panicked"))??;
    let busy_after = cpu_busy_ticks()?;
    let bytes = received.load(Ordering::Relaxed) as f64;
    let ticks_per_second = 100.0; // USER_HZ
    let busy_seconds = (busy_after - busy_before) as f64 / ticks_per_second;
    Ok(Throughput {
        gbit_per_s: bytes * 8.0 / elapsed / 1e9,
        cpu_seconds_per_gb: busy_seconds / (bytes / 1e9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_percentiles() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert_eq!(summarize(&[2.0, 4.0]).median, 3.0);
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&sorted, 99.0) - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&sorted, 0.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
        let rt = round_trips(&mut [10.0, 30.0, 20.0]);
        assert_eq!((rt.avg_us, rt.p50_us), (20.0, 20.0));
    }
}

/// What a connection-churn run achieved.
#[derive(Debug, Clone, Copy)]
pub struct Churn {
    /// Connections tried, and those that connected, exchanged a byte and closed cleanly.
    pub attempted: u64,
    pub completed: u64,
    pub elapsed: Duration,
}

impl Churn {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Opens `rate` new TCP connections per second to `addr` for `duration`, from `threads`
/// client threads in `client`, each connection cleanly closed (the client closes first,
/// as HTTP clients do, so the server's side does not linger in TIME_WAIT). The client's
/// ephemeral port range is widened so its own TIME_WAIT sockets (60 s) cannot run out.
pub fn connection_churn(
    server: &Netns,
    client: &Netns,
    addr: SocketAddr,
    rate: u32,
    duration: Duration,
) -> Result<Churn> {
    const THREADS: u32 = 4;
    client.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
    let listener = server.run_inside(|| Ok(TcpListener::bind(addr)?))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = (0..THREADS)
        .map(|_| -> Result<_> {
            let listener = listener.try_clone()?;
            let stop = stop.clone();
            Ok(std::thread::spawn(move || -> Result<()> {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            conn.set_nonblocking(false)?;
                            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                            // Read to the client's FIN, then close.
                            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_micros(200))
                        }
                        Err(e) => bail!("accept: {e}"),
                    }
                }
                Ok(())
            }))
        })
        .collect::<Result<_>>()?;
    let completed = Arc::new(AtomicU64::new(0));
    let attempted = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(THREADS as f64 / rate as f64);
    let start = Instant::now();
    let result = std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..THREADS)
            .map(|index| {
                let (completed, attempted) = (completed.clone(), attempted.clone());
                scope.spawn(move || {
                    client.run_inside(|| {
                        let offset = interval.mul_f64(index as f64 / THREADS as f64);
                        let mut next = start + offset;
                        while next < start + duration {
                            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                            next += interval;
                            attempted.fetch_add(1, Ordering::Relaxed);
                            let mut stream =
                                TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                                    .context("connect")?;
                            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                            stream.write_all(b"x")?;
                            stream.shutdown(std::net::Shutdown::Write)?;
                            let mut byte = [0u8; 1];
                            // The server's FIN: the connection is closed both ways.
                            if stream.read(&mut byte)? != 0 {
                                bail!("the server sent data");
                            }
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    })
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    });
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for server in servers {
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    }
    let churn = Churn {
        attempted: attempted.load(Ordering::Relaxed),
        completed: completed.load(Ordering::Relaxed),
        elapsed,
    };
    result.with_context(|| format!("after {churn:?}"))?;
    Ok(churn)
}
