//! Verdict counters: one per-CPU packet and byte count per verdict in `STATS`.
use crate::maps::STATS;

/// Counts a packet of `bytes` under `verdict`.
#[inline(always)]
pub(crate) fn count(verdict: u32, bytes: u32) {
    if let Some(counter) = STATS.get_ptr_mut(verdict) {
        // Per-CPU slot: no other CPU writes it.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}
