//! The interposed calls on memory: `mmap` of a daxfs file becomes a
//! mapping of the device's pages (`map_ours`), and the calls on such a
//! mapping are served here; everything else goes to libc.

use crate::layout::RemoteLayout;
use crate::real::real;
use crate::session::{Lease, Session};
use crate::table::{find, session_for, with_ours, Ours, COUNT, OURS};
use crate::{debug, set_errno, PAGE};
use daxfs::dax::{map_at, MapOptions, Mapping};
use libc::{c_int, c_void, off_t, size_t};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

const FUSE_SUPER_MAGIC: libc::c_long = 0x6573_5546;
const MAP_SYNC: c_int = 0x80000;
const MAP_SHARED_VALIDATE: c_int = 0x03;

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
    let st = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatfs(fd, &mut fs) != 0 || fs.f_type != FUSE_SUPER_MAGIC {
            return None;
        }
        if libc::fstat(fd, &mut st) != 0 {
            return None;
        }
        st
    };
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
        match unmap_ours(addr as usize, len) {
            Ok(()) => return 0,
            Err(errno) => {
                set_errno(errno);
                return -1;
            }
        }
    }
    // SAFETY: forwarded as given.
    unsafe { (real().munmap)(addr, len) }
}

/// `munmap` of `[addr, addr + len)`, which lies in one mapping of ours: of
/// all of it, the mapping goes; of part, that part is withdrawn (see
/// `Mapping::withdraw`), and the mapping goes with its last page.
fn unmap_ours(addr: usize, len: size_t) -> Result<(), c_int> {
    if !addr.is_multiple_of(PAGE as usize) || len == 0 {
        return Err(libc::EINVAL);
    }
    let mut ours = OURS.write().unwrap_or_else(|e| e.into_inner());
    let i = match find(&ours, addr, len) {
        Ok(Some(i)) => i,
        Ok(None) => return Ok(()),
        Err(()) => {
            debug("munmap across a daxfs mapping's end: refused");
            return Err(libc::EINVAL);
        }
    };
    let whole = ours[i].base == addr && len.div_ceil(PAGE as usize) * PAGE as usize >= ours[i].len;
    let gone = match whole || ours[i].mapping.withdraw(addr - ours[i].base, len) {
        true => {
            COUNT.fetch_sub(1, Ordering::Release);
            Some(ours.swap_remove(i))
        }
        false => None,
    };
    drop(ours);
    // (Its address space goes with it, through `munmap`, which takes the
    // table: not held here.)
    drop(gone);
    Ok(())
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
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let pages = |len: size_t| len.div_ceil(PAGE as usize);
    // Shrunk in place (as Linux does, moving allowed or not): the tail is
    // unmapped, which for a mapping of ours withdraws it.
    let shrinks = !fixed
        && new_len > 0
        && pages(new_len) <= pages(old_len)
        && flags & !libc::MREMAP_MAYMOVE == 0
        && (old as usize).is_multiple_of(PAGE as usize);
    if shrinks && with_ours(old, old_len, |_| ()).is_some() {
        let kept = pages(new_len) * PAGE as usize;
        let gone = pages(old_len) * PAGE as usize - kept;
        if gone > 0 {
            if let Err(errno) = unmap_ours(old as usize + kept, gone) {
                set_errno(errno);
                return libc::MAP_FAILED;
            }
        }
        return old;
    }
    let what = with_ours(old, old_len, |m| {
        // Moved (anywhere, or to `new_addr`): a new mapping of the same
        // file pages, showing what the old range showed, which is then
        // withdrawn. Not grown in place, not private (whose copied pages a
        // new mapping would not have): ENOMEM, as when Linux cannot.
        let movable = flags & libc::MREMAP_MAYMOVE != 0
            && flags & !(libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) == 0
            && m.opts.shared
            && (old as usize).is_multiple_of(PAGE as usize);
        movable
            .then(|| {
                let offset = m.offset + (old as usize - m.base) as u64;
                let from = Arc::clone(&m.mapping);
                (
                    Arc::clone(&m.session),
                    m.ino,
                    offset,
                    m.opts,
                    m.may_write,
                    from,
                )
            })
            .ok_or(libc::ENOMEM)
    });
    let Some(what) = what else {
        // SAFETY: forwarded as given.
        return unsafe { (real().mremap)(old, old_len, new_len, flags, new_addr) };
    };
    let moved = what.map_err(|()| libc::EINVAL).and_then(|w| w).and_then(
        |(session, ino, offset, opts, may_write, from)| {
            let at = fixed.then_some(new_addr as usize);
            if let Some(at) = at {
                let ours = OURS.read().unwrap_or_else(|e| e.into_inner());
                if find(&ours, at, new_len) != Ok(None) {
                    return Err(libc::EINVAL);
                }
            }
            // Mapped with no lock of ours held: a failure unmaps its
            // reservation through `munmap`, which takes it.
            let (mapping, lease) =
                map_file(&session, ino, offset, new_len as u64, opts, at).map_err(|e| e.errno())?;
            mapping.inherit(&from);
            drop(from);
            let base = mapping.as_ptr() as usize;
            let new = Ours {
                base,
                len: mapping.len(),
                ino,
                offset,
                opts,
                may_write,
                session,
                lease,
                mapping: Arc::new(mapping),
            };
            OURS.write().unwrap_or_else(|e| e.into_inner()).push(new);
            COUNT.fetch_add(1, Ordering::Release);
            unmap_ours(old as usize, old_len)?;
            Ok(base as *mut c_void)
        },
    );
    moved.unwrap_or_else(|errno| {
        set_errno(errno);
        libc::MAP_FAILED
    })
}
