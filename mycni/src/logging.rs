//! The one logger of mycni's binaries: `env_logger` on stderr, a line per record with a
//! millisecond UTC timestamp, the level and the target (the module, or `bpf` for the
//! programs' own messages), e.g.
//!
//! ```text
//! [2026-12-02T09:48:28.123Z INFO  mycni::daemon] datapath pinned under /sys/fs/bpf/mycni; ...
//! [2026-12-02T09:48:30.456Z WARN  bpf] from_pod: dropped spoofed IPv4 ...
//! ```
//!
//! `RUST_LOG` adjusts it with env_logger's directives (`debug`, `mycni::agent=debug`,
//! `bpf=off`), over the binary's default level and, for the programs' messages, the level
//! they were loaded with.
use log::LevelFilter;

/// The target the programs' messages are logged under.
pub const BPF_TARGET: &str = "bpf";

/// Installs the logger: `default` for mycni's own messages, `bpf` for the programs', then
/// whatever `RUST_LOG` says. A second call (tests) leaves the first logger in place.
pub fn init(default: LevelFilter, bpf: LevelFilter) {
    let _ = builder(default, bpf)
        .parse_env(env_logger::Env::default())
        .try_init();
}

fn builder(default: LevelFilter, bpf: LevelFilter) -> env_logger::Builder {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(default)
        .filter_module(BPF_TARGET, bpf)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr);
    builder
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::{Level, Log, Record};

    fn enabled(logger: &env_logger::Logger, level: Level, target: &str) -> bool {
        logger.enabled(
            &Record::builder()
                .level(level)
                .target(target)
                .build()
                .metadata()
                .clone(),
        )
    }

    #[test]
    fn the_programs_messages_follow_their_own_level() {
        let logger = builder(LevelFilter::Info, LevelFilter::Debug).build();
        assert!(enabled(&logger, Level::Info, "mycni::agent"));
        assert!(!enabled(&logger, Level::Debug, "mycni::agent"));
        assert!(enabled(&logger, Level::Debug, BPF_TARGET));
        assert!(!enabled(&logger, Level::Trace, BPF_TARGET));
        let quiet = builder(LevelFilter::Warn, LevelFilter::Off).build();
        assert!(!enabled(&quiet, Level::Info, "mycni::plugin"));
        assert!(enabled(&quiet, Level::Warn, "mycni::plugin"));
        assert!(!enabled(&quiet, Level::Error, BPF_TARGET));
    }

    #[test]
    fn rust_log_directives_override_the_defaults() {
        let mut builder = builder(LevelFilter::Info, LevelFilter::Warn);
        builder.parse_filters("debug,bpf=off");
        let logger = builder.build();
        assert!(enabled(&logger, Level::Debug, "mycni::agent"));
        assert!(!enabled(&logger, Level::Error, BPF_TARGET));
    }
}
