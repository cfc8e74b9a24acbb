//! The programs' aya-log messages in the agent's log.
//!
//! The programs log drops an operator should hear about (a pod spoofing its source address,
//! SNAT out of ports) at `warn`, and packet-induced drops (malformed frames) and rare
//! decisions (a new SNAT flow, an expiring TTL) at `debug`; no per-packet success path logs.
//! The programs log at most one message per level every 100 ms, node-wide: a message says
//! that something happens and who does it, the `STATS` counters (`mycni-agent stats`,
//! `/metrics`) count every drop.
//!
//! The level is patched into the programs' read-only data when they are loaded
//! (aya-log's `AYA_LOG_LEVEL`), so the verifier removes the statements above it and they cost
//! nothing; changing the level takes an agent restart, which reloads the programs anyway.
//! The default, `warn`, keeps what needs attention and leaves out what any sender can
//! trigger at line rate.
//!
//! The records travel through a ring buffer (`AYA_LOGS`) that is deliberately not pinned:
//! every agent start loads fresh programs, swaps them onto every hook (uplink, tunnel and
//! each pod's veth), and reads the ring buffer of that load from a thread of its own, so
//! logs keep flowing after a restart. A pinned buffer would be reused by the next load as is
//! (size and record format of the old build; aya-log's reader panics on records it cannot
//! parse) and would replay stale messages; the old programs' records during the swap are
//! not worth that.
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};

use aya::Ebpf;
use aya_log::EbpfLogger;
use log::{LevelFilter, Log, Metadata, Record};

/// How much of the programs' log output the agent keeps.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BpfLogLevel {
    /// The values are aya-log's: a statement logs when its level is at most this.
    Off = 0,
    Error = 1,
    #[default]
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

#[derive(Debug, thiserror::Error)]
#[error("eBPF log level {0:?}: want off, error, warn, info, debug or trace")]
pub struct ParseLevelError(String);

impl std::str::FromStr for BpfLogLevel {
    type Err = ParseLevelError;
    fn from_str(text: &str) -> Result<BpfLogLevel, ParseLevelError> {
        Ok(match text.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => BpfLogLevel::Off,
            "error" => BpfLogLevel::Error,
            "warn" | "warning" => BpfLogLevel::Warn,
            "info" => BpfLogLevel::Info,
            "debug" => BpfLogLevel::Debug,
            "trace" => BpfLogLevel::Trace,
            _ => return Err(ParseLevelError(text.to_string())),
        })
    }
}

impl BpfLogLevel {
    fn from_u8(value: u8) -> BpfLogLevel {
        match value {
            0 => BpfLogLevel::Off,
            1 => BpfLogLevel::Error,
            2 => BpfLogLevel::Warn,
            3 => BpfLogLevel::Info,
            4 => BpfLogLevel::Debug,
            _ => BpfLogLevel::Trace,
        }
    }

    /// The log filter that keeps what programs loaded at this level write.
    pub fn filter(self) -> LevelFilter {
        match self {
            BpfLogLevel::Off => LevelFilter::Off,
            BpfLogLevel::Error => LevelFilter::Error,
            BpfLogLevel::Warn => LevelFilter::Warn,
            BpfLogLevel::Info => LevelFilter::Info,
            BpfLogLevel::Debug => LevelFilter::Debug,
            BpfLogLevel::Trace => LevelFilter::Trace,
        }
    }
}

/// The level of programs loaded from now on; off until [`init`].
static LEVEL: AtomicU8 = AtomicU8::new(BpfLogLevel::Off as u8);

/// Where the DaemonSet puts the ConfigMap's `bpf-log-level`; the `--bpf-log-level` flag
/// wins.
pub const LEVEL_ENV: &str = "MYCNI_BPF_LOG_LEVEL";

/// Called by the agent before it loads the programs: they will log at `level` (the
/// `--bpf-log-level` flag, else `$MYCNI_BPF_LOG_LEVEL`, else `warn`), and
/// [`crate::datapath::load_and_pin`] forwards their messages to the log. Without it
/// (`mycni-agent load`, tests) programs load silent.
pub fn init(level: BpfLogLevel) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// The level programs are loaded with.
pub fn level() -> BpfLogLevel {
    BpfLogLevel::from_u8(LEVEL.load(Ordering::Relaxed))
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfLogError {
    #[error("cannot open the programs' log buffer: {0}")]
    Open(#[from] aya_log::Error),
    #[error("cannot start the log reader thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Starts a thread that passes the messages of the programs just loaded from `ebpf` to the
/// process's logger, for the life of the process. Nothing when the level is off.
///
/// A thread rather than a task: the agent's runtime is single-threaded and busy with
/// netlink and the API server at times; log output must neither wait for it nor stall it.
pub fn forward(ebpf: &mut Ebpf) -> Result<(), EbpfLogError> {
    let level = level();
    if level == BpfLogLevel::Off {
        return Ok(());
    }
    let mut reader = EbpfLogger::init_with_logger(ebpf, ToProcessLogger::new(level))?;
    std::thread::Builder::new()
        .name("bpf-log".into())
        .spawn(move || loop {
            let mut poll = libc::pollfd {
                fd: reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the fd is the ring buffer the reader owns.
            if unsafe { libc::poll(&mut poll, 1, -1) } < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::warn!("stopped reading the programs' log: {error}");
                return;
            }
            reader.flush();
        })
        .map_err(EbpfLogError::Thread)?;
    Ok(())
}

/// Hands each record on to the process's logger under the target
/// [`crate::logging::BPF_TARGET`], so the programs' messages are lines of the agent's log
/// like its own (same timestamps, same `RUST_LOG` filtering).
struct ToProcessLogger {
    max: LevelFilter,
}

impl ToProcessLogger {
    fn new(level: BpfLogLevel) -> ToProcessLogger {
        ToProcessLogger {
            max: level.filter(),
        }
    }
}

impl Log for ToProcessLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.max
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            log::logger().log(
                &Record::builder()
                    .level(record.level())
                    .target(crate::logging::BPF_TARGET)
                    .args(*record.args())
                    .build(),
            );
        }
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_levels() {
        assert_eq!("off".parse::<BpfLogLevel>().unwrap(), BpfLogLevel::Off);
        assert_eq!("Warning".parse::<BpfLogLevel>().unwrap(), BpfLogLevel::Warn);
        assert_eq!("debug".parse::<BpfLogLevel>().unwrap(), BpfLogLevel::Debug);
        assert_eq!(
            " trace\n".parse::<BpfLogLevel>().unwrap(),
            BpfLogLevel::Trace
        );
        assert!("verbose".parse::<BpfLogLevel>().is_err());
        assert_eq!(BpfLogLevel::default(), BpfLogLevel::Warn);
    }

    #[test]
    fn levels_match_aya_log() {
        // The programs compare against aya-log's numbering.
        for level in [
            aya_log::Level::Error,
            aya_log::Level::Warn,
            aya_log::Level::Info,
            aya_log::Level::Debug,
            aya_log::Level::Trace,
        ] {
            let ours = BpfLogLevel::from_u8(level as u8);
            assert_eq!(ours as u8, level as u8);
            assert_eq!(
                format!("{level:?}").to_ascii_lowercase(),
                format!("{ours:?}").to_ascii_lowercase()
            );
        }
    }

    #[test]
    fn forwards_only_up_to_the_loaded_level() {
        let log = ToProcessLogger::new(BpfLogLevel::Warn);
        let at = |level| Metadata::builder().level(level).build();
        assert!(log.enabled(&at(log::Level::Error)));
        assert!(log.enabled(&at(log::Level::Warn)));
        assert!(!log.enabled(&at(log::Level::Info)));
        assert!(!ToProcessLogger::new(BpfLogLevel::Off).enabled(&at(log::Level::Error)));
    }

    #[test]
    fn levels_map_to_log_filters() {
        assert_eq!(BpfLogLevel::Off.filter(), LevelFilter::Off);
        assert_eq!(BpfLogLevel::Warn.filter(), LevelFilter::Warn);
        assert_eq!(BpfLogLevel::Trace.filter(), LevelFilter::Trace);
    }
}
