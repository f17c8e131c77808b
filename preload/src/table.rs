//! Our mappings by address, and the sessions with the daemons of the
//! mounts this process maps files of.

use crate::debug;
use crate::fork::after_fork_in_child;
use crate::session::{Lease, Session};
use daxfs::dax::{MapOptions, Mapping};
use libc::{c_void, size_t};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

/// One mapping of ours. (Cloned out of the table before it is used, so
/// that no lock of ours is held while it faults: a fault's request to the
/// daemon writes to a socket through `write`, which looks in the table.)
#[derive(Clone)]
pub(crate) struct Ours {
    pub(crate) base: usize,
    pub(crate) len: usize,
    pub(crate) ino: u64,
    pub(crate) offset: u64,
    pub(crate) opts: MapOptions,
    /// Whether `mprotect` may allow stores (a private mapping, or the
    /// descriptor was open for writing), as the kernel checks.
    pub(crate) may_write: bool,
    pub(crate) session: Arc<Session>,
    pub(crate) lease: Arc<Lease>,
    pub(crate) mapping: Arc<Mapping>,
}

pub(crate) static OURS: RwLock<Vec<Ours>> = RwLock::new(Vec::new());
/// How many mappings are ours (no lock taken for others' calls while 0).
pub(crate) static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Sessions by (process, mount device number); `None`: that mount is not
/// ours to map (the reason was said once).
pub(crate) type Sessions = HashMap<(u32, u64), Option<Arc<Session>>>;

pub(crate) static SESSIONS_LOCK: LazyLock<Mutex<Sessions>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

pub(crate) fn sessions() -> std::sync::MutexGuard<'static, Sessions> {
    SESSIONS_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn session_for(dev: u64) -> Option<Arc<Session>> {
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

/// Which of ours holds `[addr, addr + len)`: `Ok(Some(i))` one wholly,
/// `Ok(None)` none at all, `Err(())` part of one.
pub(crate) fn find(ours: &[Ours], addr: usize, len: usize) -> Result<Option<usize>, ()> {
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
pub(crate) fn with_ours<T>(
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
