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
//! `MREMAP_MAYMOVE` (a new mapping of the range, anywhere or at the
//! `MREMAP_FIXED` address, the old range unmapped; to a shorter length, in
//! place; grown in place, or of a private mapping, `ENOMEM`); `munmap` of
//! part of a mapping withdraws those
//! pages (`SIGSEGV` on access; their addresses stay reserved until the
//! whole mapping goes).
//! `fsync` and `fdatasync` of a file mapped through us write back the
//! stores made through its mappings first, as Linux's do for a DAX file.
//! `ioctl(FS_IOC_FIEMAP)` of a daxfs file reports its extents (device
//! offsets), which the kernel does not ask FUSE for (`filefrag` works).
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
//! mappings. A child
//! after `fork` keeps the pages its parent had faulted in; a page it
//! touches first raises `SIGBUS` (the session with the daemon is the
//! parent's), and its own new mappings are made afresh. `exec` drops
//! everything, as it should. A program that installs its own `SIGSEGV`
//! handler after its first daxfs mapping keeps our faults from being
//! served.

//!
//! ## Where each piece lives
//!
//! * `mappings`: the interposed calls on memory (`mmap` ... `munlock`);
//! * `table`: our mappings by address, and the sessions by mount;
//! * `buffers`: system calls whose buffers may lie in our mappings;
//! * `files`: `fsync` and `fdatasync` of mapped files;
//! * `fiemap`: `ioctl(FS_IOC_FIEMAP)` of daxfs files;
//! * `fork`: the child's own leases after `fork`;
//! * `session`, `layout`, `device`: the session with a mount's daemon, the
//!   leased layout the fault routine runs against, the device it hands over;
//! * `real`: libc's own functions; `stats`: the fault counters.

mod buffers;
mod device;
mod fiemap;
mod files;
mod fork;
mod layout;
mod mappings;
mod real;
mod session;
mod stats;
mod table;

use libc::c_int;
use std::sync::OnceLock;

const PAGE: u64 = 4096;

/// Say `why` on stderr, if `DAXFS_PRELOAD_DEBUG` asks for it.
fn debug(why: impl std::fmt::Display) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("DAXFS_PRELOAD_DEBUG").is_some_and(|v| v != "0")) {
        eprintln!("daxfs-preload: {why}");
    }
}

/// Set this thread's `errno`.
fn set_errno(e: c_int) {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = e };
}
