//! The interposed functions as libc defines them, found with
//! `dlsym(RTLD_NEXT)`: what every call that is not ours goes to.

use libc::{c_int, c_void, off_t, size_t};
use std::sync::OnceLock;

type Mmap = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
type Munmap = unsafe extern "C" fn(*mut c_void, size_t) -> c_int;
type Msync = unsafe extern "C" fn(*mut c_void, size_t, c_int) -> c_int;
type Mprotect = unsafe extern "C" fn(*mut c_void, size_t, c_int) -> c_int;
type Madvise = unsafe extern "C" fn(*mut c_void, size_t, c_int) -> c_int;
type Mlock = unsafe extern "C" fn(*const c_void, size_t) -> c_int;
type Read = unsafe extern "C" fn(c_int, *mut c_void, size_t) -> libc::ssize_t;
type Write = unsafe extern "C" fn(c_int, *const c_void, size_t) -> libc::ssize_t;
type Pread = unsafe extern "C" fn(c_int, *mut c_void, size_t, off_t) -> libc::ssize_t;
type Pwrite = unsafe extern "C" fn(c_int, *const c_void, size_t, off_t) -> libc::ssize_t;
type Readv = unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> libc::ssize_t;
type Fsync = unsafe extern "C" fn(c_int) -> c_int;
type Ioctl = unsafe extern "C" fn(c_int, libc::c_ulong, *mut c_void) -> c_int;
type Mremap = unsafe extern "C" fn(*mut c_void, size_t, size_t, c_int, *mut c_void) -> *mut c_void;

pub struct Real {
    pub mmap: Mmap,
    pub munmap: Munmap,
    pub msync: Msync,
    pub mprotect: Mprotect,
    pub madvise: Madvise,
    pub mremap: Mremap,
    pub mlock: Mlock,
    pub munlock: Mlock,
    pub read: Read,
    pub write: Write,
    pub pread64: Pread,
    pub pwrite64: Pwrite,
    pub readv: Readv,
    pub writev: Readv,
    pub fsync: Fsync,
    pub fdatasync: Fsync,
    /// (Variadic in C: called with the one argument every request we pass
    /// on takes, as `ioctl` in `fiemap` explains.)
    pub ioctl: Ioctl,
}

/// The next definition of `name` after ours.
fn next(name: &std::ffi::CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no
    // preconditions; a null answer is checked by the caller.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if f.is_null() {
        // Without the real function nothing can work: say so and stop.
        let msg = b"daxfs-preload: libc's memory-mapping functions not found\n";
        // SAFETY: writes a static buffer to stderr.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        std::process::abort();
    }
    f
}

/// libc's own functions.
pub fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    // SAFETY (each transmute): the symbol is libc's function of that name,
    // whose C signature the type spells.
    REAL.get_or_init(|| unsafe {
        Real {
            mmap: std::mem::transmute::<*mut c_void, Mmap>(next(c"mmap")),
            munmap: std::mem::transmute::<*mut c_void, Munmap>(next(c"munmap")),
            msync: std::mem::transmute::<*mut c_void, Msync>(next(c"msync")),
            mprotect: std::mem::transmute::<*mut c_void, Mprotect>(next(c"mprotect")),
            madvise: std::mem::transmute::<*mut c_void, Madvise>(next(c"madvise")),
            mremap: std::mem::transmute::<*mut c_void, Mremap>(next(c"mremap")),
            mlock: std::mem::transmute::<*mut c_void, Mlock>(next(c"mlock")),
            munlock: std::mem::transmute::<*mut c_void, Mlock>(next(c"munlock")),
            read: std::mem::transmute::<*mut c_void, Read>(next(c"read")),
            write: std::mem::transmute::<*mut c_void, Write>(next(c"write")),
            pread64: std::mem::transmute::<*mut c_void, Pread>(next(c"pread64")),
            pwrite64: std::mem::transmute::<*mut c_void, Pwrite>(next(c"pwrite64")),
            readv: std::mem::transmute::<*mut c_void, Readv>(next(c"readv")),
            writev: std::mem::transmute::<*mut c_void, Readv>(next(c"writev")),
            fsync: std::mem::transmute::<*mut c_void, Fsync>(next(c"fsync")),
            fdatasync: std::mem::transmute::<*mut c_void, Fsync>(next(c"fdatasync")),
            ioctl: std::mem::transmute::<*mut c_void, Ioctl>(next(c"ioctl")),
        }
    })
}
