//! A SIGBUS catcher for the tests: counts the signals, keeps what the last
//! one said, and lets the access go on.
//!
//! ndctl's tests `siglongjmp` out of the handler. Here the handler maps a
//! private page of zeros over the faulting page instead, and the access is
//! retried and completes: a program that copies a poisoned page gets
//! exactly one signal, and the test sees how many it got.

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

pub const BUS_ADRERR: i32 = 2;
pub const BUS_MCEERR_AR: i32 = 4;

static COUNT: AtomicU64 = AtomicU64::new(0);
static CODE: AtomicI32 = AtomicI32::new(0);
static ADDR: AtomicUsize = AtomicUsize::new(0);
static LSB: AtomicI32 = AtomicI32::new(0);

/// What the last SIGBUS said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    pub code: i32,
    pub addr: usize,
    pub addr_lsb: i32,
}

extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler;
    // for SIGBUS, si_addr is at byte 16 and si_addr_lsb at byte 24.
    let (code, addr, lsb) = unsafe {
        let raw = info as *const u8;
        (
            (*info).si_code,
            (raw.add(16) as *const usize).read_unaligned(),
            (raw.add(24) as *const i16).read_unaligned(),
        )
    };
    CODE.store(code, Ordering::SeqCst);
    ADDR.store(addr, Ordering::SeqCst);
    LSB.store(lsb as i32, Ordering::SeqCst);
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

pub fn last() -> Signal {
    Signal {
        code: CODE.load(Ordering::SeqCst),
        addr: ADDR.load(Ordering::SeqCst),
        addr_lsb: LSB.load(Ordering::SeqCst),
    }
}
