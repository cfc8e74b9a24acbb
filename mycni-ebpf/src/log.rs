//! Logging: aya-log messages behind the level the agent sets at load time, rate-limited
//! node-wide. Declared first in `main.rs` so every module can use [`event!`].
use crate::maps::LOG_LAST_NS;
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_log_ebpf::macro_support::Level;

/// At most one message per level and interval for the whole node: a pod spoofing at line
/// rate must not flood the agent's log. Messages say that something happens and who does
/// it; `STATS` counts every drop.
pub(crate) const LOG_INTERVAL_NS: u64 = 100_000_000;

/// Whether the programs may log at `level` now (and if so, takes the slot). CPUs race for
/// the slot without atomics: at worst a few more messages get through. Only reached on
/// paths that log, never on a per-packet success path.
#[inline(always)]
pub(crate) fn log_slot(level: Level) -> bool {
    let Some(last) = LOG_LAST_NS.get_ptr_mut(level as u32) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        if now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// An aya-log message, rate-limited. The agent patches the level (`AYA_LOG_LEVEL`, in
/// `.rodata`, frozen) at load time, so the verifier sees `level_enabled` as a constant and
/// removes disabled statements: they cost nothing, not even the rate limit. Only drops
/// and rare decisions log; no per-packet success path does. `cold_path` has LLVM put the
/// message code after the function's hot blocks, so enabled levels do not spread the
/// forwarding path over more cache lines either.
macro_rules! event {
    ($ctx:expr, $level:ident, $($arg:tt)+) => {
        if aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::$level) {
            core::hint::cold_path();
            if $crate::log::log_slot(aya_log_ebpf::macro_support::Level::$level) {
                aya_log_ebpf::log!($ctx, aya_log_ebpf::macro_support::Level::$level, $($arg)+);
            }
        }
    };
}
