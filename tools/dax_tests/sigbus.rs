//! A SIGBUS catcher for the tests: counts the signals, keeps what the last
//! one said, and lets the access go on.
//!
//! ndctl's tests `siglongjmp` out of the handler. Here the handler maps a
//! private page of zeros over the faulting page instead, and the access is
//! retried and completes: a program that copies a poisoned page gets
//! exactly one signal, and the test sees how many it got.

use daxfs::BusSignal;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

pub const BUS_ADRERR: i32 = 2;
pub const BUS_MCEERR_AR: i32 = 4;

static COUNT: AtomicU64 = AtomicU64::new(0);
static CODE: AtomicI32 = AtomicI32::new(0);
static ADDR: AtomicUsize = AtomicUsize::new(0);
static LSB: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGBUS's siginfo to this SA_SIGINFO handler.
    let BusSignal {
        code,
        addr,
        addr_lsb,
    } = unsafe { BusSignal::read(info) };
    CODE.store(code, Ordering::SeqCst);
    ADDR.store(addr, Ordering::SeqCst);
    LSB.store(addr_lsb as i32, Ordering::SeqCst);
    COUNT.fetch_add(1, Ordering::SeqCst);
    if addr != 0 {
        // SAFETY: replaces the one page the test's access faulted on (a
        // page of a mapping the test made) by zeros, so the access retries
        // and completes; nothing else refers to that page's old contents.
        unsafe {
            libc::mmap(
                (addr & !4095) as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
    }
}

/// Install the catcher (once, for the life of the test process).
pub fn install() {
    // SAFETY: an SA_SIGINFO handler that touches only atomics and mmap.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

/// How many SIGBUS signals so far.
pub fn count() -> u64 {
    COUNT.load(Ordering::SeqCst)
}

/// What the last SIGBUS said.
pub fn last() -> BusSignal {
    BusSignal {
        code: CODE.load(Ordering::SeqCst),
        addr: ADDR.load(Ordering::SeqCst),
        addr_lsb: LSB.load(Ordering::SeqCst) as i16,
    }
}
