//! The programs' aya-log messages reach the agent's log (its stderr, through its logger,
//! under the target `bpf`) at the level it was started with (`--bpf-log-level` or
//! `MYCNI_BPF_LOG_LEVEL`), also after a restart (which loads new programs and swaps them
//! onto existing pods). Needs root.
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mycni_common::verdict;
use mycni_tests::{prefix, LogLine, Node, Pod, NODE_IP};

/// The agent's stderr, line by line, read on a thread as it comes.
struct AgentLog {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl AgentLog {
    fn follow(node: &mut Node) -> Result<AgentLog> {
        let stderr = node.take_agent_stderr().context("the agent's stderr")?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(AgentLog {
            lines,
            seen: Vec::new(),
        })
    }

    /// Takes in what the agent wrote until `deadline`, or until a line holds every needle.
    fn read_until(&mut self, deadline: Instant, needles: &[&str]) -> Option<String> {
        let matches = |line: &str| needles.iter().all(|n| line.contains(n));
        if let Some(line) = self.seen.iter().find(|l| !needles.is_empty() && matches(l)) {
            return Some(line.clone());
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if !needles.is_empty() && matches(&line) {
                        return Some(line);
                    }
                }
                Err(_) => break,
            }
        }
        None
    }

    fn wait_for(&mut self, needles: &[&str]) -> Result<String> {
        match self.read_until(Instant::now() + Duration::from_secs(5), needles) {
            Some(line) => {
                eprintln!("agent log: {line}");
                Ok(line)
            }
            None => bail!(
                "no line with {needles:?} in the agent's log:\n{}",
                self.seen.join("\n")
            ),
        }
    }

    /// Everything the agent wrote in the next `settle`.
    fn settle(&mut self, settle: Duration) -> &[String] {
        self.read_until(Instant::now() + settle, &[]);
        &self.seen
    }
}

fn counter(node: &Node, which: u32) -> Result<u64> {
    Ok(mycni::datapath::read_stats(&node.pin_root())?[which as usize].packets)
}

/// Waits until `which` counted more than `before`.
fn wait_counted(node: &Node, which: u32, before: u64) -> Result<()> {
    for _ in 0..50 {
        if counter(node, which)? > before {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("verdict {which} stayed at {before}")
}

/// How the agent is told the programs' level.
enum Level<'a> {
    Flag(&'a str),
    /// The DaemonSet's way: `MYCNI_BPF_LOG_LEVEL`.
    Variable(&'a str),
}

/// (Re)starts the agent at `level`, follows its log, and waits until it swapped its new
/// programs onto the pods that exist.
fn start_agent(node: &mut Node, level: Level, pods: usize) -> Result<AgentLog> {
    node.stop_agent();
    match level {
        Level::Flag(level) => node.start_agent_with_env(&["--bpf-log-level", level], &[])?,
        Level::Variable(level) => {
            node.start_agent_with_env(&[], &[(mycni::ebpf_log::LEVEL_ENV, level)])?
        }
    }
    let mut log = AgentLog::follow(node)?;
    log.wait_for(&[&format!("programs of {pods} existing pods replaced")])?;
    Ok(log)
}

/// Pod `from` sends an echo request to the node with `spoofed` as its source; `from_pod`
/// drops it. Returns the message the programs log for it.
fn spoof(node: &Node, from: &Pod, spoofed: Ipv4Addr) -> Result<String> {
    let before = counter(node, verdict::DROP_SPOOFED)?;
    // The reply is dropped with the request; only the exit status says so.
    let _ = from
        .netns
        .command("ping")
        .args(["-c", "1", "-W", "1", "-I", &spoofed.to_string()])
        .arg(NODE_IP.to_string())
        .output()?;
    wait_counted(node, verdict::DROP_SPOOFED, before)?;
    Ok(format!(
        "from_pod: dropped spoofed IPv4 from {spoofed} to {NODE_IP}"
    ))
}

/// Pod `from` sends `to` an echo request that expires at this hop: `from_pod` hands it to
/// the stack (a debug-level decision). Returns what the programs log for it.
fn expire(node: &Node, from: &Pod, to: &Pod) -> Result<String> {
    let before = counter(node, verdict::TO_STACK)?;
    let _ = from
        .netns
        .command("ping")
        .args(["-c", "1", "-W", "1", "-t", "1"])
        .arg(to.ip.to_string())
        .output()?;
    wait_counted(node, verdict::TO_STACK, before)?;
    Ok(format!(
        "from_pod: TTL of a packet from {} to {} expires here",
        from.ip, to.ip
    ))
}

#[test]
fn program_messages_reach_the_agent_log_at_its_level() -> Result<()> {
    mycni_tests::require_root!();
    let mut node = Node::bare(&prefix("bpflog"), "node", "10.244.1.0/24")?;
    node.netns
        .exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
    node.start_agent(&["--bpf-log-level", "debug"])?;
    let mut log = AgentLog::follow(&mut node)?;
    let (a, b, c) = (node.add_pod("a")?, node.add_pod("b")?, node.add_pod("c")?);
    // Pod a also holds b's address, so it can send from it. Its gateway's MAC is fixed, so
    // what goes out is the IPv4 packet (not an ARP request from that address).
    let host_mac = mycni::datapath::Maps::open(&node.pin_root())?
        .endpoint(a.ip)?
        .context("pod a's endpoint")?
        .host_mac;
    a.netns
        .exec(&["ip", "addr", "add", &format!("{}/32", b.ip), "dev", "eth0"])?;
    a.netns.exec(&[
        "ip",
        "neigh",
        "replace",
        "169.254.1.1",
        "lladdr",
        &mycni::netlink::format_mac(&host_mac),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;

    // debug: the drop (warn) and the decision (debug).
    let dropped = spoof(&node, &a, b.ip)?;
    let line = log.wait_for(&[&dropped])?;
    let record = LogLine::parse(&line).with_context(|| format!("not a log line: {line}"))?;
    ensure!(
        record.level == "WARN"
            && record.target == "bpf"
            && record.message.starts_with("from_pod: dropped spoofed IPv4"),
        "unexpected format: {line}"
    );
    ensure!(
        line.contains("(proto 1) on ifindex") && line.contains("that source is the pod on ifindex"),
        "the message names neither the protocol nor both interfaces: {line}"
    );
    let expired = expire(&node, &a, &c)?;
    let line = log.wait_for(&[&expired])?;
    let record = LogLine::parse(&line).with_context(|| format!("not a log line: {line}"))?;
    ensure!(
        record.level == "DEBUG" && record.target == "bpf" && record.message.starts_with(&expired),
        "unexpected format: {line}"
    );

    // error, after a restart, from the variable: the programs the pods now run log neither.
    let mut log = start_agent(&mut node, Level::Variable("error"), 3)?;
    let dropped = spoof(&node, &a, b.ip)?;
    let expired = expire(&node, &a, &c)?;
    let seen = log.settle(Duration::from_secs(1));
    ensure!(
        !seen.iter().any(|l| l.contains(&dropped)
            || l.contains(&expired)
            || LogLine::parse(l).is_some_and(|r| r.target == "bpf")),
        "messages above the level error were logged:\n{}",
        seen.join("\n")
    );

    // warn, after another restart: the drop, not the decision.
    let mut log = start_agent(&mut node, Level::Flag("warn"), 3)?;
    let dropped = spoof(&node, &a, b.ip)?;
    log.wait_for(&[&dropped])?;
    let expired = expire(&node, &a, &c)?;
    let seen = log.settle(Duration::from_secs(1));
    ensure!(
        !seen.iter().any(|l| l.contains(&expired)),
        "a debug message was logged at warn:\n{}",
        seen.join("\n")
    );
    Ok(())
}
