//! The CPU side of persistence: which cache-flush instruction this machine has,
//! flushing a range of cache lines with it, and the store fence.
//!
//! The choice follows PMDK's libpmem: `clwb` (write back, keep the line cached),
//! else `clflushopt` (write back and evict, weakly ordered), else `clflush`
//! (write back and evict, strongly ordered). `clwb` and `clflushopt` are ordered
//! only by a later `sfence`, which [`drain`] issues; `clflush` is ordered by
//! itself, but `drain` fences anyway so that non-temporal stores are covered.

use std::fmt;

/// Size of a CPU cache line: the unit of flushing and of crash tracking.
pub const CACHE_LINE: usize = 64;

/// A cache-flush instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushInstruction {
    /// `clwb`: write the line back and keep it cached.
    Clwb,
    /// `clflushopt`: write back and invalidate, ordered by `sfence`.
    ClflushOpt,
    /// `clflush`: write back and invalidate, strongly ordered.
    Clflush,
    /// No flush instruction (not x86-64): only `msync` makes data durable.
    None,
}

impl fmt::Display for FlushInstruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlushInstruction::Clwb => "clwb",
            FlushInstruction::ClflushOpt => "clflushopt",
            FlushInstruction::Clflush => "clflush",
            FlushInstruction::None => "none",
        })
    }
}

impl FlushInstruction {
    /// The best flush instruction this CPU has, found once through `cpuid`.
    pub fn detect() -> FlushInstruction {
        static CHOICE: std::sync::OnceLock<FlushInstruction> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(detect_uncached)
    }

    /// Whether this CPU can execute the instruction.
    pub fn is_available(self) -> bool {
        match self {
            FlushInstruction::None => true,
            other => available_instructions().contains(&other),
        }
    }

    /// Write back every cache line that overlaps `[ptr, ptr + len)`.
    ///
    /// # Safety
    /// The range must be mapped (a flush of an unmapped address faults), and the
    /// instruction must be available on this CPU ([`is_available`](Self::is_available)).
    #[inline]
    pub unsafe fn flush_range(self, ptr: *const u8, len: usize) {
        if len == 0 {
            return;
        }
        let start = ptr as usize & !(CACHE_LINE - 1);
        let end = ptr as usize + len;
        match self {
            // SAFETY: forwarded from this function's contract.
            FlushInstruction::Clwb => unsafe { arch::flush_clwb(start, end) },
            // SAFETY: as above.
            FlushInstruction::ClflushOpt => unsafe { arch::flush_clflushopt(start, end) },
            // SAFETY: as above.
            FlushInstruction::Clflush => unsafe { arch::flush_clflush(start, end) },
            FlushInstruction::None => {}
        }
    }
}

/// Order all earlier flushes and non-temporal stores before any later store:
/// after `drain`, every line flushed before it is durable.
#[inline]
pub fn drain() {
    arch::sfence();
}

/// The flush instructions this CPU has, best first.
pub fn available_instructions() -> Vec<FlushInstruction> {
    arch::available()
}

fn detect_uncached() -> FlushInstruction {
    available_instructions()
        .first()
        .copied()
        .unwrap_or(FlushInstruction::None)
}

#[cfg(target_arch = "x86_64")]
mod arch {
    use super::{FlushInstruction, CACHE_LINE};
    use std::arch::asm;
    use std::arch::x86_64::{__cpuid, __cpuid_count, _mm_sfence};

    pub(super) fn available() -> Vec<FlushInstruction> {
        // CPUID leaf 7 subleaf 0, EBX: bit 24 CLWB, bit 23 CLFLUSHOPT.
        // CPUID leaf 1, EDX: bit 19 CLFLUSH.
        #[allow(unused_unsafe)]
        // SAFETY: cpuid exists on every x86-64 CPU and only reads identification
        // registers; leaf 7 is reported as zeros when the CPU lacks it.
        let (max_leaf, leaf1_edx) = unsafe { (__cpuid(0).eax, __cpuid(1).edx) };
        #[allow(unused_unsafe)]
        // SAFETY: as above; leaf 7 is only asked for when it exists.
        let leaf7_ebx = if max_leaf >= 7 {
            unsafe { __cpuid_count(7, 0).ebx }
        } else {
            0
        };
        let mut found = Vec::new();
        if leaf7_ebx & (1 << 24) != 0 {
            found.push(FlushInstruction::Clwb);
        }
        if leaf7_ebx & (1 << 23) != 0 {
            found.push(FlushInstruction::ClflushOpt);
        }
        if leaf1_edx & (1 << 19) != 0 {
            found.push(FlushInstruction::Clflush);
        }
        found
    }

    /// # Safety
    /// `[start, end)` must be mapped and the CPU must have `clwb`.
    pub(super) unsafe fn flush_clwb(mut line: usize, end: usize) {
        while line < end {
            // SAFETY: the caller guarantees the line is mapped and clwb exists;
            // clwb changes no register or memory contents.
            unsafe { asm!("clwb [{0}]", in(reg) line, options(nostack, preserves_flags)) };
            line += CACHE_LINE;
        }
    }

    /// # Safety
    /// `[start, end)` must be mapped and the CPU must have `clflushopt`.
    pub(super) unsafe fn flush_clflushopt(mut line: usize, end: usize) {
        while line < end {
            // SAFETY: as for clwb.
            unsafe { asm!("clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags)) };
            line += CACHE_LINE;
        }
    }

    /// # Safety
    /// `[start, end)` must be mapped.
    pub(super) unsafe fn flush_clflush(mut line: usize, end: usize) {
        while line < end {
            // SAFETY: as for clwb; clflush exists on every x86-64 CPU.
            unsafe { asm!("clflush [{0}]", in(reg) line, options(nostack, preserves_flags)) };
            line += CACHE_LINE;
        }
    }

    #[inline]
    pub(super) fn sfence() {
        #[allow(unused_unsafe)]
        // SAFETY: sfence has no operands and SSE is part of x86-64.
        unsafe {
            _mm_sfence()
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod arch {
    use super::FlushInstruction;

    pub(super) fn available() -> Vec<FlushInstruction> {
        Vec::new()
    }
    pub(super) unsafe fn flush_clwb(_: usize, _: usize) {}
    pub(super) unsafe fn flush_clflushopt(_: usize, _: usize) {}
    pub(super) unsafe fn flush_clflush(_: usize, _: usize) {}
    pub(super) fn sfence() {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_instruction_is_the_best_available() {
        let all = available_instructions();
        let best = FlushInstruction::detect();
        assert_eq!(all.first().copied().unwrap_or(FlushInstruction::None), best);
        assert!(best.is_available());
    }

    #[test]
    fn every_available_instruction_flushes_without_fault() {
        let buf = vec![7u8; 4096 + 13];
        for insn in available_instructions() {
            // SAFETY: the buffer is mapped and the instruction was reported available.
            unsafe { insn.flush_range(buf.as_ptr().wrapping_add(5), 4096) };
            drain();
        }
        assert!(
            buf.iter().all(|&b| b == 7),
            "a flush must not change memory"
        );
    }
}
