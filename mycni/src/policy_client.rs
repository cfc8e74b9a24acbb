//! `mycni-agent policy`: asks the running agent for its NetworkPolicy report (`GET /policy`
//! on its metrics address) and prints it. The agent keeps the resolved state in memory (the
//! pinned maps hold numbers only, not the policies and label sets behind them); its metrics
//! port already serves a node's operators, so the command reuses it instead of another
//! socket or a state file that could go stale. The parsing of the answer is pure.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use std::path::Path;

use crate::policy::report::{DroppedPackets, PolicyReport};
use crate::policy_maps::PolicyTables;

#[derive(Debug, thiserror::Error)]
pub enum PolicyClientError {
    #[error("cannot reach the agent at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {address} answered {status}: {body}")]
    Status {
        address: String,
        status: String,
        body: String,
    },
    #[error("the agent's answer is not HTTP")]
    NotHttp,
    #[error("the agent's report does not parse: {0}")]
    Report(#[source] serde_json::Error),
    #[error("cannot write stdout: {0}")]
    Stdout(#[source] std::io::Error),
}

/// Fetches and prints the report, as a table or JSON, with each pod's drop counters from
/// the pinned `POLICY_DROPS` under `root` (left out, with a warning, when they cannot be
/// read: the report is the agent's, the counters the node's).
pub fn print_policy(root: &Path, address: &str, json: bool) -> Result<(), PolicyClientError> {
    let mut report = fetch_report(address)?;
    match PolicyTables::open(root).and_then(|tables| tables.drops()) {
        Ok(drops) => {
            for endpoint in &mut report.endpoints {
                let counted = drops.get(&endpoint.ip).copied().unwrap_or_default();
                endpoint.dropped = Some(DroppedPackets {
                    ingress: counted.ingress_packets,
                    egress: counted.egress_packets,
                });
            }
        }
        Err(e) => log::warn!("drop counters left out: {e}"),
    }
    let text = if json {
        report.render_json()
    } else {
        report.render_text()
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(PolicyClientError::Stdout)
}

fn fetch_report(address: &str) -> Result<PolicyReport, PolicyClientError> {
    let connect = |source| PolicyClientError::Connect {
        address: address.to_string(),
        source,
    };
    let mut stream = TcpStream::connect(address).map_err(connect)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(connect)?;
    // The server answers with Connection: close: the response ends with the stream.
    stream
        .write_all(b"GET /policy HTTP/1.1\r\nHost: mycni-agent\r\nConnection: close\r\n\r\n")
        .map_err(connect)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(connect)?;
    parse_response(address, &String::from_utf8_lossy(&response))
}

fn parse_response(address: &str, response: &str) -> Result<PolicyReport, PolicyClientError> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or(PolicyClientError::NotHttp)?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_once(' '))
        .map(|(_, status)| status)
        .ok_or(PolicyClientError::NotHttp)?;
    if !status.starts_with("200") {
        return Err(PolicyClientError::Status {
            address: address.to_string(),
            status: status.to_string(),
            body: body.trim().to_string(),
        });
    }
    serde_json::from_str(body).map_err(PolicyClientError::Report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_or_the_agents_reason_for_none() {
        let report = PolicyReport {
            revision: 3,
            endpoints: vec![],
        };
        let ok = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
            report.render_json()
        );
        assert_eq!(parse_response("a:1", &ok).expect("parses"), report);
        let waiting = "HTTP/1.1 503 Service Unavailable\r\n\r\nno policy computed yet\n";
        let error = parse_response("a:1", waiting).expect_err("503");
        assert_eq!(
            error.to_string(),
            "the agent at a:1 answered 503 Service Unavailable: no policy computed yet"
        );
        assert!(matches!(
            parse_response("a:1", "garbage"),
            Err(PolicyClientError::NotHttp)
        ));
        assert!(matches!(
            parse_response("a:1", "HTTP/1.1 200 OK\r\n\r\n{"),
            Err(PolicyClientError::Report(_))
        ));
    }
}
