//! Anonymous memory for the benchmarks' baselines, included by `#[path]`.

/// `len` bytes of private anonymous memory, prefaulted (never unmapped: a
/// benchmark's baseline lives as long as the benchmark).
pub fn anonymous(len: usize) -> *mut u8 {
    // SAFETY: a new private anonymous mapping, prefaulted.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as *mut u8
}
