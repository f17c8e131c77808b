//! `fsync` and `fdatasync` of a file this process maps through us.

use crate::real::real;
use crate::set_errno;
use crate::table::{sessions, COUNT};
use libc::c_int;
use std::sync::atomic::Ordering;

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
