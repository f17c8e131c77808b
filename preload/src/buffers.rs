//! System calls whose buffers may lie in mappings of ours: the kernel does
//! not take our faults, so the buffers are faulted in first.

use crate::real::real;
use crate::table::{COUNT, OURS};
use daxfs::dax::Mapping;
use libc::{c_int, c_void, off_t, size_t};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Fault in what of `[addr, addr + len)` lies in mappings of ours, for a
/// system call that hands the buffer to the kernel (which does not take
/// our faults: an unfaulted page would be `EFAULT`); `store` when the
/// kernel writes into it.
fn fault_in(addr: *const c_void, len: size_t, store: bool) {
    if COUNT.load(Ordering::Acquire) == 0 || len == 0 {
        return;
    }
    let (a, b) = (addr as usize, (addr as usize).saturating_add(len));
    // Not waiting for the table: a signal handler's `write` may interrupt
    // a thread of its process that holds it (then the call goes on, and
    // an unfaulted page of ours is EFAULT, as it would have been).
    let Ok(ours) = OURS.try_read() else {
        return;
    };
    let touched: Vec<(Arc<Mapping>, usize, usize)> = ours
        .iter()
        .filter(|m| a < m.base + m.len && m.base < b)
        .map(|m| {
            let from = a.max(m.base) - m.base;
            let to = b.min(m.base + m.len) - m.base;
            (Arc::clone(&m.mapping), from, to - from)
        })
        .collect();
    for (mapping, offset, n) in touched {
        let _ = mapping.fault_in(offset, n, store);
    }
}

/// Run a system call on a buffer, faulting it in first; again if a recall
/// took a page away meanwhile (`EFAULT`, a few times at most).
fn with_buffer(
    addr: *const c_void,
    len: size_t,
    store: bool,
    call: impl Fn() -> libc::ssize_t,
) -> libc::ssize_t {
    for _ in 0..4 {
        fault_in(addr, len, store);
        let n = call();
        let efault = n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT);
        if !efault || COUNT.load(Ordering::Acquire) == 0 {
            return n;
        }
    }
    call()
}

/// # Safety
/// As libc's `read`.
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> libc::ssize_t {
    // SAFETY: forwarded as given.
    with_buffer(buf, n, true, || unsafe { (real().read)(fd, buf, n) })
}

/// # Safety
/// As libc's `write`.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> libc::ssize_t {
    // SAFETY: forwarded as given.
    with_buffer(buf, n, false, || unsafe { (real().write)(fd, buf, n) })
}

/// # Safety
/// As libc's `pread64`.
#[no_mangle]
pub unsafe extern "C" fn pread64(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    at: off_t,
) -> libc::ssize_t {
    // SAFETY: forwarded as given.
    with_buffer(buf, n, true, || unsafe { (real().pread64)(fd, buf, n, at) })
}

/// # Safety
/// As libc's `pread` (the same as `pread64` where `off_t` is 64 bits).
#[no_mangle]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, n: size_t, at: off_t) -> libc::ssize_t {
    // SAFETY: forwarded as given.
    unsafe { pread64(fd, buf, n, at) }
}

/// # Safety
/// As libc's `pwrite64`.
#[no_mangle]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    at: off_t,
) -> libc::ssize_t {
    // SAFETY: forwarded as given.
    with_buffer(buf, n, false, || unsafe {
        (real().pwrite64)(fd, buf, n, at)
    })
}

/// # Safety
/// As libc's `pwrite` (the same as `pwrite64` where `off_t` is 64 bits).
#[no_mangle]
pub unsafe extern "C" fn pwrite(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    at: off_t,
) -> libc::ssize_t {
    // SAFETY: forwarded as given.
    unsafe { pwrite64(fd, buf, n, at) }
}

/// The buffers of an I/O vector, faulted in.
///
/// # Safety
/// `iov` points to `count` valid `iovec`s.
unsafe fn vector(
    iov: *const libc::iovec,
    count: c_int,
    store: bool,
    call: impl Fn() -> libc::ssize_t,
) -> libc::ssize_t {
    if COUNT.load(Ordering::Acquire) > 0 && !iov.is_null() && count > 0 {
        // SAFETY: the caller's promise.
        let iovs = unsafe { std::slice::from_raw_parts(iov, count as usize) };
        for v in iovs {
            fault_in(v.iov_base, v.iov_len, store);
        }
    }
    call()
}

/// # Safety
/// As libc's `readv`.
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, count: c_int) -> libc::ssize_t {
    // SAFETY: forwarded as given.
    unsafe { vector(iov, count, true, || (real().readv)(fd, iov, count)) }
}

/// # Safety
/// As libc's `writev`.
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const libc::iovec, count: c_int) -> libc::ssize_t {
    // SAFETY: forwarded as given.
    unsafe { vector(iov, count, false, || (real().writev)(fd, iov, count)) }
}
