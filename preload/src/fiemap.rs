//! `ioctl(FS_IOC_FIEMAP)` on a daxfs file, answered here from the file's
//! extents as the daemon knows them: the kernel never passes FIEMAP to a
//! FUSE filesystem (see `daxfs_client::fiemap`), and tools such as
//! `filefrag` and ndctl's dax-pmd ask it to find a file's aligned extents.
//! Every other `ioctl` goes to libc untouched.

use crate::real::real;
use crate::set_errno;
use crate::table::session_for;
use daxfs_client::fiemap::{self, FS_IOC_FIEMAP, HEADER, MAX_EXTENTS};
use daxfs_client::lease::{Reply, Request};
use libc::{c_int, c_ulong, c_void};

const FUSE_SUPER_MAGIC: libc::c_long = 0x6573_5546;

/// # Safety
/// As libc's `ioctl`. Its third argument, variadic in C, is taken as a
/// pointer, which x86-64 and AArch64 Linux pass in the same register
/// either way; a call without one hands on whatever that register holds,
/// as libc would.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    if request == FS_IOC_FIEMAP {
        // SAFETY: the caller's `struct fiemap`, as the ioctl requires.
        match unsafe { answer_fiemap(fd, arg.cast()) } {
            Some(Ok(())) => return 0,
            Some(Err(errno)) => {
                set_errno(errno);
                return -1;
            }
            None => {}
        }
    }
    // SAFETY: forwarded as given.
    unsafe { (real().ioctl)(fd, request, arg) }
}

/// FIEMAP of `fd`, when it is a regular file on a daxfs mount we have a
/// session with (else `None`: the kernel's answer, `EOPNOTSUPP`).
///
/// # Safety
/// `arg` points to a `struct fiemap` followed by room for the
/// `fm_extent_count` extents it asks for, as the ioctl requires.
unsafe fn answer_fiemap(fd: c_int, arg: *mut u8) -> Option<Result<(), c_int>> {
    // SAFETY: fstatfs and fstat write one struct each, which we own.
    let st = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatfs(fd, &mut fs) != 0 || fs.f_type != FUSE_SUPER_MAGIC {
            return None;
        }
        if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        st
    };
    let session = session_for(st.st_dev)?;
    if arg.is_null() {
        return Some(Err(libc::EFAULT));
    }
    // SAFETY: the header is the caller's, 32 bytes (see above).
    let header = unsafe { std::ptr::read_unaligned(arg.cast::<[u8; HEADER]>()) };
    let u64_at = |at: usize| u64::from_ne_bytes(header[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().unwrap());
    let (start, len, flags, count) = (u64_at(0), u64_at(8), u32_at(16), u32_at(24));
    if let Some(unsupported) = fiemap::unsupported(flags) {
        // SAFETY: fm_flags, in the caller's header.
        unsafe { arg.add(16).cast::<u32>().write_unaligned(unsupported) };
        return Some(Err(libc::EBADR));
    }
    if len == 0 || count > MAX_EXTENTS {
        return Some(Err(libc::EINVAL));
    }
    let extents = match session.ask(Request::Extents { ino: st.st_ino }) {
        Reply::Extents(list) => list,
        Reply::Failed { errno, .. } => return Some(Err(errno)),
        _ => return Some(Err(libc::EIO)),
    };
    let page = crate::PAGE;
    let found = fiemap::answer(
        extents
            .iter()
            .map(|e| (e.page * page, e.pfn * page, e.pages * page)),
        start,
        len,
    );
    let shown = match count {
        0 => found.len(),
        n => found.len().min(n as usize),
    };
    if count > 0 {
        let bytes = fiemap::encode(&found[..shown]);
        // SAFETY: the caller made room for `count` extents after the
        // header, and `shown` is at most that.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), arg.add(HEADER), bytes.len()) };
    }
    // SAFETY: fm_mapped_extents, in the caller's header.
    unsafe { arg.add(20).cast::<u32>().write_unaligned(shown as u32) };
    Some(Ok(()))
}
