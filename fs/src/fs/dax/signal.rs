//! Signals: the `SIGSEGV` handler that runs the fault routine for the
//! mapping an address falls in (with the registry of live mappings it
//! searches), and the `SIGBUS` of memory failures, encoded as Linux's
//! memory-failure code sends it.
//!
//! The handler's safety argument: it allocates and takes locks, which a
//! signal handler may do only because the code it interrupted was a load
//! or a store to one of our mappings, never the allocator or a holder of
//! our locks, who never touch mappings: caller memory is copied outside
//! our locks (see `user`, which counts the locks a thread holds, and the
//! debug assertion below). Addresses that are not ours go to the handler
//! that was there before.

use super::pieces::{GONE, POISON, READ, ZERO};
use super::{Inner, PAGE};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};

/// Which `SIGBUS` a memory failure raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum McErr {
    /// `BUS_MCEERR_AR`: the thread consumed poison (at a load or store).
    ActionRequired,
    /// `BUS_MCEERR_AO`: early notice to a thread that has the page mapped.
    ActionOptional,
}

/// Early notice of memory failure: if this thread asked for it
/// (`PR_MCE_KILL_EARLY`, or the system's default when it did not say), a
/// `SIGBUS` with `BUS_MCEERR_AO` for each address where one of its
/// mappings showed a page that was just poisoned, raised at this thread
/// (the one the kernel would pick: it has the flag), before any access.
pub fn early_notice(shown: &[usize]) {
    // SAFETY: PR_MCE_KILL_GET takes no pointers.
    let policy = unsafe { libc::prctl(libc::PR_MCE_KILL_GET, 0, 0, 0, 0) };
    let early = match policy {
        p if p == libc::PR_MCE_KILL_EARLY => true,
        p if p == libc::PR_MCE_KILL_LATE => false,
        _ => std::fs::read_to_string("/proc/sys/vm/memory_failure_early_kill")
            .is_ok_and(|v| v.trim() == "1"),
    };
    if early {
        for &addr in shown {
            raise_mce(addr, McErr::ActionOptional);
        }
    }
}

/// Where the SIGBUS fields of a `siginfo_t` lie (x86-64 and aarch64:
/// `si_addr` at byte 16, then the 16-bit `si_addr_lsb`), which the `libc`
/// crate does not expose.
const SI_ADDR: usize = 16;
const SI_ADDR_LSB: usize = 24;

/// What a `SIGBUS` says, read from the `siginfo_t` an `SA_SIGINFO` handler
/// gets: the memory-failure fields the `libc` crate has no accessor for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusSignal {
    /// `si_code`: `BUS_MCEERR_AR` (4) for poison consumed, `BUS_MCEERR_AO`
    /// (5) for early notice, `BUS_ADRERR` (2) for a failed page read.
    pub code: i32,
    /// `si_addr`: the address accessed.
    pub addr: usize,
    /// `si_addr_lsb`: log2 of the size lost (12 for a 4 KiB page).
    pub addr_lsb: i16,
}

impl BusSignal {
    /// Read the fields (async-signal-safe: loads only).
    ///
    /// # Safety
    /// `info` points to the `siginfo_t` of a `SIGBUS`, as the kernel passes
    /// it to an `SA_SIGINFO` handler.
    pub unsafe fn read(info: *const libc::siginfo_t) -> BusSignal {
        // SAFETY: the caller's promise; the fields lie inside the 128-byte
        // structure at the offsets above.
        unsafe {
            let raw = info as *const u8;
            BusSignal {
                code: (*info).si_code,
                addr: (raw.add(SI_ADDR) as *const usize).read_unaligned(),
                addr_lsb: (raw.add(SI_ADDR_LSB) as *const i16).read_unaligned(),
            }
        }
    }
}

/// Raise `SIGBUS` to the calling thread as Linux's memory-failure code
/// does: `si_code` `BUS_MCEERR_AR` (poison consumed) or `BUS_MCEERR_AO`
/// (early notice), with `si_addr` and `si_addr_lsb` 12 (a 4 KiB page). As
/// `force_sig` does, an action-required signal that is blocked or ignored
/// kills by default.
pub(crate) fn raise_mce(addr: usize, kind: McErr) {
    const BUS_MCEERR_AR: i32 = 4;
    const BUS_MCEERR_AO: i32 = 5;
    // SAFETY: a zeroed siginfo is valid; the fields written are those of
    // the SIGBUS layout (`SI_ADDR`, `SI_ADDR_LSB`), inside the 128-byte
    // structure.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let raw = &mut info as *mut libc::siginfo_t as *mut u8;
        info.si_signo = libc::SIGBUS;
        info.si_code = match kind {
            McErr::ActionRequired => BUS_MCEERR_AR,
            McErr::ActionOptional => BUS_MCEERR_AO,
        };
        (raw.add(SI_ADDR) as *mut usize).write_unaligned(addr);
        (raw.add(SI_ADDR_LSB) as *mut i16).write_unaligned(12);
        if kind == McErr::ActionRequired {
            let mut blocked: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut blocked);
            let mut current: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current);
            if libc::sigismember(&blocked, libc::SIGBUS) == 1
                || current.sa_sigaction == libc::SIG_IGN
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
                let mut only: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut only);
                libc::sigaddset(&mut only, libc::SIGBUS);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
            }
        }
        // The kernel lets a process give a signal a kernel si_code only when
        // it sends it to the calling thread itself.
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            libc::getpid(),
            libc::gettid(),
            libc::SIGBUS,
            &info as *const libc::siginfo_t,
        );
    }
}

// ---- the fault handler -------------------------------------------------

/// Live mappings, for the handler.
static MAPPINGS: RwLock<Vec<Arc<Inner>>> = RwLock::new(Vec::new());
/// How many there are, read without the lock.
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub(super) fn register(inner: &Arc<Inner>) {
    let mut list = MAPPINGS.write().unwrap_or_else(|e| e.into_inner());
    list.push(Arc::clone(inner));
    LIVE.store(list.len(), Ordering::Release);
}

pub(super) fn unregister(inner: &Arc<Inner>) {
    let mut list = MAPPINGS.write().unwrap_or_else(|e| e.into_inner());
    list.retain(|m| !Arc::ptr_eq(m, inner));
    LIVE.store(list.len(), Ordering::Release);
}

/// Whether any of `bytes` lie in a DAX mapping of this process (of any
/// filesystem), whose faults take filesystem locks (see `user`).
pub(crate) fn overlaps_mapping(bytes: &[u8]) -> bool {
    if LIVE.load(Ordering::Acquire) == 0 || bytes.is_empty() {
        return false;
    }
    let (start, end) = (
        bytes.as_ptr() as usize,
        bytes.as_ptr() as usize + bytes.len(),
    );
    let list = MAPPINGS.read().unwrap_or_else(|e| e.into_inner());
    list.iter()
        .any(|m| start < m.base + (m.pages * PAGE) as usize && m.base < end)
}

static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

pub(super) fn install_handler() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "default" value; sigaction
        // fills `old` and installs ours, whose handler is async-signal
        // careful as the module docs explain.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as usize;
            // Not SA_ONSTACK: a fault runs the filesystem, far too deep for
            // the small alternate stacks threads keep for stack overflows
            // (a stack overflow then ends in a plain SIGSEGV, without Rust's
            // "stack overflow" message).
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGSEGV, &action, &mut old);
            old
        }
    });
}

extern "C" fn on_fault(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let write = is_write(context);
    let found = {
        let list = MAPPINGS.read().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .find(|m| addr >= m.base && addr < m.base + (m.pages * PAGE) as usize)
            .cloned()
    };
    if let Some(m) = found {
        let page = ((addr - m.base) as u64) / PAGE;
        if m.state[page as usize].load(Ordering::Acquire) == POISON {
            // A load or store of a poisoned page: what the machine check
            // handler sends the thread that consumed poison.
            raise_mce(addr, McErr::ActionRequired);
            return;
        }
        // Where the error code does not tell, a fault on a page shown
        // readable was a store.
        let write = write
            || (!cfg!(target_arch = "x86_64")
                && matches!(m.state[page as usize].load(Ordering::Acquire), READ | ZERO));
        if (write && !m.writable()) || m.state[page as usize].load(Ordering::Acquire) == GONE {
            // A store to a read-only mapping, or an access to a page its
            // owner withdrew: SIGSEGV, below.
            return deliver(signal, info, context);
        }
        // What `user` keeps: caller memory is never touched under our locks,
        // where this fault would wait for its own thread.
        debug_assert_eq!(
            crate::fs::user::locks_held(),
            0,
            "a fault at {addr:#x} under a filesystem lock"
        );
        match m.fault(page, write) {
            Ok(()) => return,
            // A fault that cannot be served (no space, a media error): the
            // access raises SIGBUS, as Linux's VM_FAULT_SIGBUS does.
            Err(_) => {
                if m.map_beyond(page).is_ok() {
                    return;
                }
            }
        }
    }
    deliver(signal, info, context);
}

/// Not ours: whoever was there before, or the default (the access is
/// retried and kills the process).
fn deliver(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if let Some(previous) = PREVIOUS.get() {
        let handler = previous.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // SAFETY: restoring the default disposition; the retried access
            // then takes it.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut());
            }
        } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the previous handler was installed for these arguments.
            let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            f(signal, info, context);
        } else {
            // SAFETY: as above, a plain handler.
            let f: extern "C" fn(i32) = unsafe { std::mem::transmute(handler) };
            f(signal);
        }
    }
}

/// Whether the faulting access was a store (x86-64: bit 1 of the page-fault
/// error code). Elsewhere, unknown: treated as a load, and a store then
/// faults again on the read-only piece.
fn is_write(context: *mut libc::c_void) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the kernel passes a valid ucontext for SA_SIGINFO handlers.
        let ctx = unsafe { &*(context as *const libc::ucontext_t) };
        ctx.uc_mcontext.gregs[libc::REG_ERR as usize] & 2 != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = context;
        false
    }
}
