//! Copy and fill kernels that leave their destination flushed: the bodies of
//! `memcpy_persist` and `memset_persist`.
//!
//! Below [`MOVNT_THRESHOLD`] bytes a plain copy followed by a flush of each line
//! is cheapest. From there on the destination is written with non-temporal
//! stores, which bypass the cache (so nothing needs flushing and nothing useful
//! is evicted); only the unaligned head and tail lines use ordinary stores and a
//! flush. This is PMDK libpmem's scheme, with the widest vector unit the CPU has.
//!
//! Every kernel that issues non-temporal stores ends with an `sfence`, as Rust's
//! memory model requires before the memory is touched again, so a caller can
//! read back what it wrote even before it drains.

use crate::cpu::{FlushInstruction, CACHE_LINE};
use std::ptr;

/// Copies and fills of at least this many bytes use non-temporal stores
/// (PMDK's default `PMEM_MOVNT_THRESHOLD`).
pub const MOVNT_THRESHOLD: usize = 256;

/// The vector unit used for non-temporal stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MovntKernel {
    /// 64-byte `vmovntdq` (AVX-512F).
    Avx512,
    /// 32-byte `vmovntdq` (AVX).
    Avx,
    /// 16-byte `movntdq` (SSE2).
    Sse2,
}

impl MovntKernel {
    /// The widest kernel this CPU supports, or `None` off x86-64.
    pub fn detect() -> Option<MovntKernel> {
        MovntKernel::all().into_iter().find(|k| k.is_available())
    }

    /// Every kernel, widest first.
    pub fn all() -> [MovntKernel; 3] {
        [MovntKernel::Avx512, MovntKernel::Avx, MovntKernel::Sse2]
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                MovntKernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                MovntKernel::Avx => std::arch::is_x86_feature_detected!("avx"),
                MovntKernel::Sse2 => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// # Safety
    /// `dst` is 64-byte aligned, `len` a multiple of 64, both ranges valid and
    /// disjoint, and the CPU has this kernel's vector unit.
    unsafe fn copy_lines(self, dst: *mut u8, src: *const u8, len: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from this function's contract.
        unsafe {
            match self {
                MovntKernel::Avx512 => nt::avx512::copy_lines(dst, src, len),
                MovntKernel::Avx => nt::avx::copy_lines(dst, src, len),
                MovntKernel::Sse2 => nt::sse2::copy_lines(dst, src, len),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no non-temporal kernel off x86-64: {dst:?} {src:?} {len}")
    }

    /// # Safety
    /// As for `copy_lines`, without a source.
    unsafe fn fill_lines(self, dst: *mut u8, byte: u8, len: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from this function's contract.
        unsafe {
            match self {
                MovntKernel::Avx512 => nt::avx512::fill_lines(dst, byte, len),
                MovntKernel::Avx => nt::avx::fill_lines(dst, byte, len),
                MovntKernel::Sse2 => nt::sse2::fill_lines(dst, byte, len),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no non-temporal kernel off x86-64: {dst:?} {byte} {len}")
    }
}

/// How a device writes: the non-temporal kernel (if any) and the flush
/// instruction. Chosen once per device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer {
    /// Kernel for copies of [`MOVNT_THRESHOLD`] bytes and more; `None` means
    /// every copy is a plain copy followed by flushes.
    pub movnt: Option<MovntKernel>,
    /// The flush instruction.
    pub flush: FlushInstruction,
}

impl Writer {
    /// The best this CPU offers.
    pub fn detect() -> Writer {
        Writer {
            movnt: MovntKernel::detect(),
            flush: FlushInstruction::detect(),
        }
    }

    /// Copy `len` bytes from `src` to `dst` and flush (or stream) every line of
    /// the destination: after the next fence the copy is durable. Returns true
    /// when the copy ended with that fence already (the non-temporal path: the
    /// head and tail lines are flushed first, the body streamed, then fenced).
    ///
    /// # Safety
    /// Both ranges are valid for `len` bytes and do not overlap; the chosen
    /// kernel and flush instruction are available on this CPU.
    #[inline]
    pub unsafe fn copy_flushed(self, dst: *mut u8, src: *const u8, len: usize) -> bool {
        // SAFETY: all pointer arithmetic stays inside the caller's ranges; the
        // body range starts 64-byte aligned and is a multiple of 64 long.
        unsafe {
            match self.movnt {
                Some(kernel) if len >= MOVNT_THRESHOLD => {
                    let (head, body) = split_lines(dst, len);
                    let tail = head + body;
                    ptr::copy_nonoverlapping(src, dst, head);
                    self.flush.flush_range(dst, head);
                    ptr::copy_nonoverlapping(src.add(tail), dst.add(tail), len - tail);
                    self.flush.flush_range(dst.add(tail), len - tail);
                    kernel.copy_lines(dst.add(head), src.add(head), body);
                    true
                }
                _ => {
                    ptr::copy_nonoverlapping(src, dst, len);
                    self.flush.flush_range(dst, len);
                    false
                }
            }
        }
    }

    /// Fill `len` bytes at `dst` with `byte`, flushed as in
    /// [`copy_flushed`](Self::copy_flushed), with the same result.
    ///
    /// # Safety
    /// The range is valid for `len` bytes; the kernel and flush instruction are
    /// available on this CPU.
    #[inline]
    pub unsafe fn fill_flushed(self, dst: *mut u8, byte: u8, len: usize) -> bool {
        // SAFETY: as in copy_flushed.
        unsafe {
            match self.movnt {
                Some(kernel) if len >= MOVNT_THRESHOLD => {
                    let (head, body) = split_lines(dst, len);
                    let tail = head + body;
                    ptr::write_bytes(dst, byte, head);
                    self.flush.flush_range(dst, head);
                    ptr::write_bytes(dst.add(tail), byte, len - tail);
                    self.flush.flush_range(dst.add(tail), len - tail);
                    kernel.fill_lines(dst.add(head), byte, body);
                    true
                }
                _ => {
                    ptr::write_bytes(dst, byte, len);
                    self.flush.flush_range(dst, len);
                    false
                }
            }
        }
    }
}

/// Split `len` bytes at `dst` into an unaligned head and a body of whole,
/// 64-byte-aligned lines; what remains is the tail.
fn split_lines(dst: *mut u8, len: usize) -> (usize, usize) {
    let head = dst.align_offset(CACHE_LINE).min(len);
    (head, (len - head) & !(CACHE_LINE - 1))
}

/// One module of line kernels per vector width. Each loads as many lines as its
/// vector registers hold, then streams them out (PMDK moves 32 lines a turn
/// with AVX-512 and 8 with AVX), then finishes with single lines.
#[cfg(target_arch = "x86_64")]
mod nt {
    macro_rules! line_kernels {
        ($name:ident, $feature:literal, $vec:ty, $width:literal, $unroll:literal, $load:ident, $stream:ident, $splat:ident) => {
            pub(super) mod $name {
                use std::arch::x86_64::*;
                /// Vectors per cache line.
                const LANES: usize = 64 / $width;
                /// Bytes moved per turn of the main loop: as many lines as
                /// the vector registers hold.
                const STEP: usize = 64 * $unroll;

                /// # Safety
                /// See `MovntKernel::copy_lines`.
                #[target_feature(enable = $feature)]
                pub(crate) unsafe fn copy_lines(dst: *mut u8, src: *const u8, len: usize) {
                    let mut off = 0;
                    // SAFETY: every access stays inside [0, len) of both ranges;
                    // dst + off is 64-byte aligned, so every store is aligned.
                    unsafe {
                        while off + STEP <= len {
                            let mut v = [$splat(0); $unroll * LANES];
                            for (i, lane) in v.iter_mut().enumerate() {
                                *lane = $load(src.add(off + i * $width).cast::<$vec>());
                            }
                            for (i, lane) in v.iter().enumerate() {
                                $stream(dst.add(off + i * $width).cast::<$vec>(), *lane);
                            }
                            off += STEP;
                        }
                        while off < len {
                            for i in 0..LANES {
                                let lane = $load(src.add(off + i * $width).cast::<$vec>());
                                $stream(dst.add(off + i * $width).cast::<$vec>(), lane);
                            }
                            off += 64;
                        }
                        _mm_sfence();
                    }
                }

                /// # Safety
                /// See `MovntKernel::fill_lines`.
                #[target_feature(enable = $feature)]
                pub(crate) unsafe fn fill_lines(dst: *mut u8, byte: u8, len: usize) {
                    let value = $splat(byte as i8);
                    let mut off = 0;
                    // SAFETY: as in copy_lines.
                    unsafe {
                        while off < len {
                            for i in 0..LANES {
                                $stream(dst.add(off + i * $width).cast::<$vec>(), value);
                            }
                            off += 64;
                        }
                        _mm_sfence();
                    }
                }
            }
        };
    }

    line_kernels!(
        avx512,
        "avx512f",
        __m512i,
        64,
        32,
        _mm512_loadu_si512,
        _mm512_stream_si512,
        _mm512_set1_epi8
    );
    line_kernels!(
        avx,
        "avx",
        __m256i,
        32,
        8,
        _mm256_loadu_si256,
        _mm256_stream_si256,
        _mm256_set1_epi8
    );
    line_kernels!(
        sse2,
        "sse2",
        __m128i,
        16,
        4,
        _mm_loadu_si128,
        _mm_stream_si128,
        _mm_set1_epi8
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::available_instructions;
    use proptest::prelude::*;

    /// Every writer this CPU can run: each kernel (and none) with each flush.
    fn writers() -> Vec<Writer> {
        let mut kernels: Vec<Option<MovntKernel>> = MovntKernel::all()
            .into_iter()
            .filter(|k| k.is_available())
            .map(Some)
            .collect();
        kernels.push(None);
        let mut flushes = available_instructions();
        flushes.push(FlushInstruction::None);
        kernels
            .iter()
            .flat_map(|&movnt| flushes.iter().map(move |&flush| Writer { movnt, flush }))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn copies_are_exact_at_every_size_and_alignment(
            len in 0usize..9000, dst_off in 0usize..128, src_off in 0usize..128, seed: u64,
        ) {
            let src: Vec<u8> = (0..len + src_off)
                .map(|i| (seed.wrapping_mul(i as u64 + 1) >> 7) as u8)
                .collect();
            for writer in writers() {
                let mut dst = vec![0xA5u8; len + dst_off + 64];
                // SAFETY: both ranges lie inside their vectors and do not overlap;
                // writers() yields only what the CPU has.
                unsafe { writer.copy_flushed(dst.as_mut_ptr().add(dst_off), src.as_ptr().add(src_off), len) };
                prop_assert!(dst[..dst_off].iter().all(|&b| b == 0xA5), "{writer:?} wrote before the range");
                prop_assert_eq!(&dst[dst_off..dst_off + len], &src[src_off..src_off + len], "{:?}", writer);
                prop_assert!(dst[dst_off + len..].iter().all(|&b| b == 0xA5), "{writer:?} wrote past the range");
            }
        }

        #[test]
        fn fills_are_exact_at_every_size_and_alignment(
            len in 0usize..9000, dst_off in 0usize..128, byte: u8,
        ) {
            for writer in writers() {
                let mut dst = vec![!byte; len + dst_off + 64];
                // SAFETY: the range lies inside the vector.
                unsafe { writer.fill_flushed(dst.as_mut_ptr().add(dst_off), byte, len) };
                prop_assert!(dst[..dst_off].iter().all(|&b| b == !byte));
                prop_assert!(dst[dst_off..dst_off + len].iter().all(|&b| b == byte), "{:?}", writer);
                prop_assert!(dst[dst_off + len..].iter().all(|&b| b == !byte));
            }
        }
    }
}
