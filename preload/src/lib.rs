//! `libdaxfs_preload.so`: `LD_PRELOAD` it into a program (or run the
//! program with `daxfs exec`) and its mappings of files on a daxfs mount
//! become mappings of the device's own pages, as on Linux fsdax: PMD
//! pieces where a 2 MiB of the file is an aligned 2 MiB extent, PTE pieces
//! elsewhere, faults taken lazily, stores straight to the device,
//! `MAP_SYNC` accepted, and a poisoned page raises `SIGBUS` with
//! `BUS_MCEERR_AR` at its exact address.
//!
//! The mapping code is the library's own ([`daxfs::dax::map`]): this crate
//! only brings the file's layout from the daemon (`layout`), over a session
//! of the layout-lease protocol (`session`, and `daxfs_client::lease`),
//! with the device the daemon hands over (`device`).
//!
//! ## What is interposed
//!
//! `mmap`/`mmap64` of a regular file on a daxfs mount, shared or private,
//! readable (not `PROT_EXEC`; at a fixed address too, as PMDK maps into a
//! reservation of its own, but not with `MAP_FIXED_NOREPLACE`), by the mount's owner
//! or root, on a mount that does not cache file data in the kernel (`-o
//! cache`): anything else goes to libc untouched, as does every call on
//! memory that is not ours. On our mappings: `munmap` of a whole mapping,
//! `msync` (writes back the pages stored to since the last one),
//! `madvise` (accepted, nothing to do for device pages), `mlock` and
//! `munlock` (faulting the pages in first), `mprotect` of a whole mapping
//! between `PROT_READ` and `PROT_READ | PROT_WRITE` (the latter `EACCES`
//! where the descriptor was read-only; anything else `EINVAL`), and `mremap` with
//! `MREMAP_MAYMOVE` (a new mapping of the grown range; else `ENOMEM`).
//! `fsync` and `fdatasync` of a file mapped through us write back the
//! stores made through its mappings first, as Linux's do for a DAX file.
//! And `read`, `write`, `pread`, `pwrite` (and their `64` forms), `readv`
//! and `writev` fault in the parts of their buffers that lie in mappings of
//! ours first, since the kernel does not take our faults (it would fault a
//! kernel DAX mapping's pages in itself); other system calls given such a
//! buffer (`send`, `recv`, `io_uring`...) see `EFAULT` where its pages were
//! never touched.
//! `DAXFS_PRELOAD_DEBUG=1` says on stderr why a mapping was not made ours;
//! `DAXFS_PRELOAD_MOUNTS=DIR[:DIR...]` limits the library to those mounts.
//!
//! ## Not covered
//!
//! Mappings made without libc's `mmap` (`syscall(SYS_mmap)`, statically
//! linked programs, the dynamic loader's own) are the kernel's FUSE
//! mappings. `munmap` of part of a mapping is refused (`EINVAL`). A child
//! after `fork` keeps the pages its parent had faulted in; a page it
//! touches first raises `SIGBUS` (the session with the daemon is the
//! parent's), and its own new mappings are made afresh. `exec` drops
//! everything, as it should. A program that installs its own `SIGSEGV`
//! handler after its first daxfs mapping keeps our faults from being
//! served.

mod device;
mod layout;
mod real;
mod session;

use daxfs::dax::{map_at, MapOptions, Mapping};
use layout::RemoteLayout;
use libc::{c_int, c_void, off_t, size_t};
use real::real;
use session::{Lease, Session};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, RwLock};

const FUSE_SUPER_MAGIC: libc::c_long = 0x6573_5546;
const MAP_SYNC: c_int = 0x80000;
const MAP_SHARED_VALIDATE: c_int = 0x03;
const PAGE: u64 = 4096;

fn debug(why: impl std::fmt::Display) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("DAXFS_PRELOAD_DEBUG").is_some_and(|v| v != "0")) {
        eprintln!("daxfs-preload: {why}");
    }
}

/// One mapping of ours. (Cloned out of the table before it is used, so
/// that no lock of ours is held while it faults: a fault's request to the
/// daemon writes to a socket through `write`, which looks in the table.)
#[derive(Clone)]
struct Ours {
    base: usize,
    len: usize,
    ino: u64,
    offset: u64,
    opts: MapOptions,
    /// Whether `mprotect` may allow stores (a private mapping, or the
    /// descriptor was open for writing), as the kernel checks.
    may_write: bool,
    session: Arc<Session>,
    lease: Arc<Lease>,
    mapping: Arc<Mapping>,
}

static OURS: RwLock<Vec<Ours>> = RwLock::new(Vec::new());
/// How many mappings are ours (no lock taken for others' calls while 0).
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Sessions by (process, mount device number); `None`: that mount is not
/// ours to map (the reason was said once).
type Sessions = HashMap<(u32, u64), Option<Arc<Session>>>;

static SESSIONS_LOCK: LazyLock<Mutex<Sessions>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn sessions() -> std::sync::MutexGuard<'static, Sessions> {
    SESSIONS_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn session_for(dev: u64) -> Option<Arc<Session>> {
    let mut sessions = sessions();
    sessions
        .entry((std::process::id(), dev))
        .or_insert_with(|| {
            let Some(mount) = daxfs_client::mounts::with_dev(dev) else {
                debug(format_args!(
                    "device {dev:#x} is a FUSE mount but not daxfs"
                ));
                return None;
            };
            if let Some(allowed) = std::env::var_os("DAXFS_PRELOAD_MOUNTS") {
                let allowed: Vec<PathBuf> = std::env::split_paths(&allowed)
                    .filter_map(|p| std::fs::canonicalize(p).ok())
                    .collect();
                if !allowed.contains(&mount.at) {
                    debug(format_args!(
                        "{}: not in DAXFS_PRELOAD_MOUNTS",
                        mount.at.display()
                    ));
                    return None;
                }
            }
            match Session::open(&mount.at) {
                Ok(session) => {
                    static AT_FORK: std::sync::Once = std::sync::Once::new();
                    // SAFETY: registers a handler of ours, which lives as
                    // long as the process.
                    AT_FORK.call_once(|| unsafe {
                        libc::pthread_atfork(None, None, Some(after_fork_in_child));
                    });
                    Some(session)
                }
                Err(why) => {
                    debug(format_args!(
                        "{}: the kernel's mapping: {why}",
                        mount.at.display()
                    ));
                    None
                }
            }
        })
        .clone()
}

/// In a child after `fork` (one thread, the one that forked): the
/// mappings inherited show device pages the daemon knows only the
/// parent's leases of. Connect anew, lease every mapping's range for this
/// process, and unmap whatever it shows that the fresh layout does not
/// say (blocks freed or moved since the parent's grant), before the
/// program goes on. Locks another thread of the parent held at the fork
/// are held for ever here: then nothing is done, and the child's faults
/// fail (`SIGBUS`) rather than map without leases.
extern "C" fn after_fork_in_child() {
    let Ok(ours) = OURS.try_read() else {
        debug("fork: our mapping table was busy; the child's faults will fail");
        return;
    };
    let mut reconnected: Vec<*const Session> = Vec::new();
    for m in ours.iter() {
        let key = Arc::as_ptr(&m.session);
        if !reconnected.contains(&key) {
            if let Err(why) = m.session.reconnect() {
                debug(format_args!("fork: cannot reconnect: {why}"));
                continue;
            }
            reconnected.push(key);
        }
        *m.lease.grant.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let lease = &m.lease;
        let fresh = loop {
            match m.session.grant(lease) {
                Err(daxfs::Error::Recalled) => std::thread::yield_now(),
                other => break other.map(|g| g.clone()),
            }
        };
        let grant = match fresh {
            Ok(Some(g)) => g,
            _ => {
                // No layout: nothing inherited may be trusted.
                drop(lease.file.recall(lease.first, lease.end));
                continue;
            }
        };
        let from = lease.first / 512 * 512;
        for (page, pfn, pages) in lease.file.mapped(from, lease.end) {
            let same = grant.extents.iter().any(|e| {
                e.page <= page && page + pages <= e.page + e.pages && e.pfn + (page - e.page) == pfn
            });
            if !same {
                drop(lease.file.recall(page, page + pages));
            }
        }
    }
    if let Ok(mut sessions) = SESSIONS_LOCK.try_lock() {
        let me = std::process::id();
        let inherited: Vec<(u64, Arc<Session>)> = sessions
            .iter()
            .filter_map(|(&(_, dev), s)| Some((dev, Arc::clone(s.as_ref()?))))
            .filter(|(_, s)| reconnected.contains(&Arc::as_ptr(s)))
            .collect();
        for (dev, session) in inherited {
            sessions.insert((me, dev), Some(session));
        }
    }
}

fn set_errno(e: c_int) {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = e };
}

/// A daxfs file mapping, or `None` for libc's own.
fn map_ours(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> Option<*mut c_void> {
    let kind = flags & 0x0f;
    let fixed = flags & libc::MAP_FIXED != 0;
    if fd < 0
        || len == 0
        || flags & (libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) != 0
        || (fixed && !(addr as usize).is_multiple_of(PAGE as usize))
        || prot & libc::PROT_READ == 0
        || prot & libc::PROT_EXEC != 0
        || !matches!(
            kind,
            libc::MAP_SHARED | libc::MAP_PRIVATE | MAP_SHARED_VALIDATE
        )
        || offset < 0
        || !(offset as u64).is_multiple_of(PAGE)
    {
        return None;
    }
    // SAFETY: fstatfs and fstat write one struct each, which we own.
    let (fs, st) = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatfs(fd, &mut fs) != 0 || fs.f_type != FUSE_SUPER_MAGIC {
            return None;
        }
        if libc::fstat(fd, &mut st) != 0 {
            return None;
        }
        (fs, st)
    };
    let _ = fs;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    let session = session_for(st.st_dev)?;
    // The kernel's checks of the descriptor's access mode.
    // SAFETY: F_GETFL reads the descriptor's flags.
    let mode = unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_ACCMODE;
    let shared = kind != libc::MAP_PRIVATE;
    let write = prot & libc::PROT_WRITE != 0;
    if mode == libc::O_WRONLY || (shared && write && mode != libc::O_RDWR) {
        set_errno(libc::EACCES);
        return Some(libc::MAP_FAILED);
    }
    if flags & MAP_SYNC != 0 && kind != MAP_SHARED_VALIDATE {
        // As Linux: MAP_SYNC is ignored without MAP_SHARED_VALIDATE.
        debug("MAP_SYNC without MAP_SHARED_VALIDATE: ignored, as Linux does");
    }
    let opts = MapOptions {
        write,
        shared,
        populate: flags & libc::MAP_POPULATE != 0,
    };
    let (ino, offset) = (st.st_ino, offset as u64);
    let at = fixed.then_some(addr as usize);
    if let Some(at) = at {
        // Over a mapping of ours: not supported (it would replace part of
        // a reservation its faults map into).
        let ours = OURS.read().unwrap_or_else(|e| e.into_inner());
        if find(&ours, at, len) != Ok(None) {
            debug("MAP_FIXED over a daxfs mapping of ours: refused");
            set_errno(libc::EINVAL);
            return Some(libc::MAP_FAILED);
        }
    }
    match map_file(&session, ino, offset, len as u64, opts, at) {
        Ok((mapping, lease)) => {
            let base = mapping.as_ptr() as *mut c_void;
            let ours = Ours {
                base: base as usize,
                len: mapping.len(),
                ino,
                offset,
                opts,
                may_write: !shared || mode == libc::O_RDWR,
                session,
                lease,
                mapping: Arc::new(mapping),
            };
            OURS.write().unwrap_or_else(|e| e.into_inner()).push(ours);
            COUNT.fetch_add(1, Ordering::Release);
            Some(base)
        }
        Err(e) => {
            debug(format_args!("mapping inode {ino}: {e}"));
            set_errno(e.errno());
            Some(libc::MAP_FAILED)
        }
    }
}

fn map_file(
    session: &Arc<Session>,
    ino: u64,
    offset: u64,
    len: u64,
    opts: MapOptions,
    at: Option<usize>,
) -> daxfs::Result<(Mapping, Arc<Lease>)> {
    let file = session.file(ino);
    let lease = Arc::new(Lease {
        ino,
        first: offset / PAGE,
        end: (offset + len).div_ceil(PAGE),
        file: Arc::clone(&file),
        grant: Mutex::new(None),
    });
    let layout = RemoteLayout {
        session: Arc::clone(session),
        lease: Arc::clone(&lease),
    };
    // SAFETY: the program asked for a mapping of the file (at `at`, giving
    // up what was there, if it asked for MAP_FIXED) and takes on what that
    // means (memmap2's contract), as with the kernel's.
    let mapping = unsafe { map_at(at, Box::new(layout), file, offset, len, opts) }?;
    Ok((mapping, lease))
}

/// Which of ours holds `[addr, addr + len)`: `Ok(Some(i))` one wholly,
/// `Ok(None)` none at all, `Err(())` part of one.
fn find(ours: &[Ours], addr: usize, len: usize) -> Result<Option<usize>, ()> {
    let end = addr.saturating_add(len.max(1));
    for (i, m) in ours.iter().enumerate() {
        if addr < m.base + m.len && m.base < end {
            return match addr >= m.base && end <= m.base + m.len {
                true => Ok(Some(i)),
                false => Err(()),
            };
        }
    }
    Ok(None)
}

/// Run `f` on our mapping holding the range, or `None` if it is not ours.
fn with_ours<T>(
    addr: *mut c_void,
    len: size_t,
    f: impl FnOnce(&Ours) -> T,
) -> Option<Result<T, ()>> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    let found = {
        let ours = OURS.read().unwrap_or_else(|e| e.into_inner());
        match find(&ours, addr as usize, len) {
            Ok(Some(i)) => Ok(ours[i].clone()),
            Ok(None) => return None,
            Err(()) => Err(()),
        }
    };
    Some(found.map(|m| f(&m)))
}

/// # Safety
/// As libc's `mmap`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    match map_ours(addr, len, prot, flags, fd, offset) {
        Some(got) => got,
        // SAFETY: forwarded as given.
        None => unsafe { (real().mmap)(addr, len, prot, flags, fd, offset) },
    }
}

/// # Safety
/// As libc's `mmap64` (the same as `mmap` where `off_t` is 64 bits).
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: forwarded as given.
    unsafe { mmap(addr, len, prot, flags, fd, offset) }
}

/// # Safety
/// As libc's `munmap`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    let maybe_ours = COUNT.load(Ordering::Acquire) > 0
        && find(
            &OURS.read().unwrap_or_else(|e| e.into_inner()),
            addr as usize,
            len,
        ) != Ok(None);
    if maybe_ours {
        let mut ours = OURS.write().unwrap_or_else(|e| e.into_inner());
        match find(&ours, addr as usize, len) {
            Ok(Some(i)) if ours[i].base == addr as usize => {
                let gone = ours.swap_remove(i);
                COUNT.fetch_sub(1, Ordering::Release);
                drop(ours);
                // (Its address space goes with it, through this function.)
                drop(gone);
                return 0;
            }
            Ok(None) => {}
            _ => {
                debug("munmap of part of a daxfs mapping: refused");
                set_errno(libc::EINVAL);
                return -1;
            }
        }
    }
    // SAFETY: forwarded as given.
    unsafe { (real().munmap)(addr, len) }
}

/// # Safety
/// As libc's `msync`.
#[no_mangle]
pub unsafe extern "C" fn msync(addr: *mut c_void, len: size_t, flags: c_int) -> c_int {
    let done = with_ours(addr, len, |m| m.mapping.sync());
    // SAFETY: forwarded as given.
    answer(done, libc::ENOMEM, || unsafe {
        (real().msync)(addr, len, flags)
    })
}

/// The answer of a call on memory: ours (`Some`: done, failed, or on part
/// of a mapping of ours, `part`), or libc's (`theirs`).
fn answer(
    done: Option<Result<daxfs::Result<()>, ()>>,
    part: c_int,
    theirs: impl FnOnce() -> c_int,
) -> c_int {
    let errno = match done {
        None => return theirs(),
        Some(Ok(Ok(()))) => return 0,
        Some(Ok(Err(e))) => e.errno(),
        Some(Err(())) => part,
    };
    set_errno(errno);
    -1
}

/// # Safety
/// As libc's `mprotect`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: size_t, prot: c_int) -> c_int {
    const RW: c_int = libc::PROT_READ | libc::PROT_WRITE;
    let change = |m: &Ours| -> Result<(), c_int> {
        let whole = m.base == addr as usize && len.div_ceil(4096) * 4096 >= m.len;
        let now = match m.mapping.writable() {
            true => RW,
            false => libc::PROT_READ,
        };
        match prot {
            p if p == now => Ok(()),
            libc::PROT_READ if whole => {
                m.mapping.set_writable(false);
                Ok(())
            }
            RW if whole && m.may_write => {
                m.mapping.set_writable(true);
                Ok(())
            }
            RW if whole => Err(libc::EACCES),
            _ => {
                debug(format_args!(
                    "mprotect of (part of) a daxfs mapping to {prot:#x}: refused \
                     (only the whole mapping, between PROT_READ and PROT_READ|PROT_WRITE)"
                ));
                Err(libc::EINVAL)
            }
        }
    };
    match with_ours(addr, len, change) {
        Some(Ok(Ok(()))) => 0,
        Some(Ok(Err(errno))) => {
            set_errno(errno);
            -1
        }
        Some(Err(())) => {
            set_errno(libc::EINVAL);
            -1
        }
        // SAFETY: forwarded as given.
        None => unsafe { (real().mprotect)(addr, len, prot) },
    }
}

// ---- fsync ----------------------------------------------------------------

/// Before `fsync` of a file this process maps through us: write back the
/// stores made through its mappings (flushes here, no round trip), as
/// Linux's fsync writes back a DAX file's dirty entries.
fn write_back_mapped(fd: c_int) -> Result<(), c_int> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    // SAFETY: fstat writes one struct, which we own.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Ok(()); // (the real call says why)
        }
        st
    };
    let key = (std::process::id(), st.st_dev);
    let session = sessions().get(&key).cloned().flatten();
    match session.map(|s| s.write_back(st.st_ino)) {
        Some(Err(e)) => Err(e.errno()),
        _ => Ok(()),
    }
}

/// # Safety
/// As libc's `fsync`.
#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    if let Err(errno) = write_back_mapped(fd) {
        set_errno(errno);
        return -1;
    }
    // SAFETY: forwarded as given.
    unsafe { (real().fsync)(fd) }
}

/// # Safety
/// As libc's `fdatasync`.
#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    if let Err(errno) = write_back_mapped(fd) {
        set_errno(errno);
        return -1;
    }
    // SAFETY: forwarded as given.
    unsafe { (real().fdatasync)(fd) }
}

// ---- system calls with buffers in our mappings --------------------------

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

/// # Safety
/// As libc's `mlock`.
#[no_mangle]
pub unsafe extern "C" fn mlock(addr: *const c_void, len: size_t) -> c_int {
    // (Unfaulted pages of ours are inaccessible reservations, which the
    // kernel's mlock refuses: the mapping faults them in first.)
    let done = with_ours(addr.cast_mut(), len, |m| m.mapping.lock());
    // SAFETY: forwarded as given.
    answer(done, libc::EINVAL, || unsafe { (real().mlock)(addr, len) })
}

/// # Safety
/// As libc's `munlock`.
#[no_mangle]
pub unsafe extern "C" fn munlock(addr: *const c_void, len: size_t) -> c_int {
    let done = with_ours(addr.cast_mut(), len, |m| m.mapping.unlock());
    // SAFETY: forwarded as given.
    answer(done, libc::EINVAL, || unsafe {
        (real().munlock)(addr, len)
    })
}

/// # Safety
/// As libc's `madvise`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    match with_ours(addr, len, |_| ()) {
        Some(_) => 0,
        // SAFETY: forwarded as given.
        None => unsafe { (real().madvise)(addr, len, advice) },
    }
}

/// # Safety
/// As libc's `mremap` (the optional fifth argument is read only with
/// `MREMAP_FIXED`, as libc does).
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let what = with_ours(old, old_len, |m| {
        (flags == libc::MREMAP_MAYMOVE && m.opts.shared)
            .then(|| (Arc::clone(&m.session), m.ino, m.offset, m.opts))
            .ok_or(libc::ENOMEM)
    });
    // Mapped with no lock of ours held: a failure unmaps its reservation
    // through `munmap`, which takes it.
    let grown = what.map(|what| {
        what.map(|what| {
            what.and_then(|(session, ino, offset, opts)| {
                map_file(&session, ino, offset, new_len as u64, opts, None).map_err(|e| e.errno())
            })
        })
    });
    match grown {
        Some(Ok(Ok((mapping, lease)))) => {
            let base = mapping.as_ptr() as *mut c_void;
            let mut ours = OURS.write().unwrap_or_else(|e| e.into_inner());
            let Ok(Some(i)) = find(&ours, old as usize, old_len) else {
                // Unmapped meanwhile by another thread.
                drop(ours);
                drop(mapping);
                set_errno(libc::EINVAL);
                return libc::MAP_FAILED;
            };
            let len = mapping.len();
            let old_mapping = std::mem::replace(&mut ours[i].mapping, Arc::new(mapping));
            ours[i].lease = lease;
            ours[i].base = base as usize;
            ours[i].len = len;
            drop(ours);
            // Unmapped with the lock let go: its address space goes through
            // `munmap`, which takes it.
            drop(old_mapping);
            base
        }
        Some(Ok(Err(errno))) => {
            set_errno(errno);
            libc::MAP_FAILED
        }
        Some(Err(())) => {
            set_errno(libc::EINVAL);
            libc::MAP_FAILED
        }
        // SAFETY: forwarded as given.
        None => unsafe { (real().mremap)(old, old_len, new_len, flags, new_addr) },
    }
}

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
