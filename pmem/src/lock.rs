//! Exclusive ownership of a device: an open-file-description (OFD) write lock
//! on the whole file (a read lock for a read-only open: readers share it).
//!
//! OFD locks belong to the open file, not to the process, so they also refuse a
//! second open from the same process (POSIX record locks would not, and would
//! be dropped by closing any descriptor of the file). The kernel does not report
//! the pid of an OFD lock's holder, so on conflict we look for it in
//! `/proc/*/fdinfo`, which lists the locks held through each descriptor.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a conflicting lock may take to go away before the device is
/// reported busy. A process that forks while it has the device open or mapped
/// shares the lock with its child until the child execs or exits, so a device
/// closed a moment ago can still look held.
const SETTLE: Duration = Duration::from_millis(250);

/// Take the write lock on all of `file` (the read lock when `shared`: any
/// number of readers, but no writer), or fail with [`Error::Busy`].
pub(crate) fn lock(file: &File, path: &Path, shared: bool) -> Result<()> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = if shared { libc::F_RDLCK } else { libc::F_WRLCK } as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    let deadline = Instant::now() + SETTLE;
    loop {
        // SAFETY: F_OFD_SETLK reads the flock struct we pass, which lives for the call.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Some(libc::EAGAIN) | Some(libc::EACCES) => {
                let holder = file
                    .metadata()
                    .ok()
                    .and_then(|m| find_holder(m.dev(), m.ino()));
                return Err(Error::Busy {
                    path: path.to_path_buf(),
                    holder,
                });
            }
            _ => return Err(Error::io(path, "lock the device", err)),
        }
    }
}

/// Whether any open of the device at `path` (read-write or read-only)
/// holds it. Needs only read access to the file.
pub fn device_in_use(path: &Path) -> Result<bool> {
    let file = File::open(path).map_err(|e| Error::io(path, "open the device", e))?;
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_GETLK reads and fills the flock struct we pass, which
    // lives for the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if rc != 0 {
        return Err(Error::io(
            path,
            "test the device's lock",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// The pid of a process that holds the device at `path`, if one does and
/// it can be found (in `/proc/*/fdinfo`, which a process may only read of
/// its own user's processes unless it is root).
pub fn device_holder(path: &Path) -> Result<Option<u32>> {
    if !device_in_use(path)? {
        return Ok(None);
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "stat the device", e))?;
    Ok(find_holder(meta.dev(), meta.ino()))
}

/// The pid of a process that holds an OFD lock on the inode `(dev, ino)`.
fn find_holder(dev: u64, ino: u64) -> Option<u32> {
    // fdinfo names the inode as "MAJOR:MINOR:INODE", major and minor in hex.
    let id = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    let holds = |text: &str| {
        text.lines().any(|line| {
            line.starts_with("lock:")
                && line.contains("OFDLCK")
                && line.split_whitespace().any(|w| w == id)
        })
    };
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_to_string(fd.path()).is_ok_and(|text| holds(&text)) {
                return Some(pid);
            }
        }
    }
    None
}
