//! `fork`: the child has none of the parent's threads and shares its
//! sockets, and the daemon knows only the parent's leases; the child
//! connects anew and leases what it inherited for itself.

use crate::debug;
use crate::session::Session;
use crate::table::{OURS, SESSIONS_LOCK};
use std::sync::Arc;

/// In a child after `fork` (one thread, the one that forked): the
/// mappings inherited show device pages the daemon knows only the
/// parent's leases of. Connect anew, lease every mapping's range for this
/// process, and unmap whatever it shows that the fresh layout does not
/// say (blocks freed or moved since the parent's grant), before the
/// program goes on. Locks another thread of the parent held at the fork
/// are held for ever here: then nothing is done, and the child's faults
/// fail (`SIGBUS`) rather than map without leases.
pub(crate) extern "C" fn after_fork_in_child() {
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
