//! The fault counters of this process's mappings, for whoever looks.

use crate::table::sessions;
use libc::size_t;

/// The fault counters of this process's mappings through the library, for
/// tests and tools that look (`dlsym(RTLD_DEFAULT,
/// "daxfs_preload_stats")`): fills up to `n` of, in order, PMD faults, PTE
/// faults, zero-page maps, the fallbacks (misaligned, past EOF, not a huge
/// extent, PTE in range, private write, poisoned), poisoned pages mapped,
/// accesses past EOF; returns how many it filled.
///
/// # Safety
/// `out` must have room for `n` values.
#[no_mangle]
pub unsafe extern "C" fn daxfs_preload_stats(out: *mut u64, n: size_t) -> size_t {
    let mut sum = [0u64; 11];
    for session in sessions().values().flatten() {
        let s = session.counters.stats();
        let counts = [
            s.pmd_faults,
            s.pte_faults,
            s.zero_maps,
            s.fallback_misaligned,
            s.fallback_past_eof,
            s.fallback_not_huge_extent,
            s.fallback_pte_in_range,
            s.fallback_private_write,
            s.fallback_poisoned,
            s.poisoned_maps,
            s.beyond_eof,
        ];
        for (total, c) in sum.iter_mut().zip(counts) {
            *total += c;
        }
    }
    let n = n.min(sum.len());
    // SAFETY: the caller gave room for `n` values.
    unsafe { std::ptr::copy_nonoverlapping(sum.as_ptr(), out, n) };
    n
}
