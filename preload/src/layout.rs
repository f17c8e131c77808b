//! The layout of a file mapped through the preload: the `Layout` the
//! library's fault routine runs against, answered from a lease granted by
//! the daemon (asked for on the first fault, and again after a recall), so
//! that a fault costs a round trip only when the layout changed.

use crate::session::{failed, Lease, Session};
use daxfs::dax::{Blocks, DaxCounters, DevicePages, FileDax, Layout};
use daxfs::{Error, Result};
use daxfs_client::lease::{Reply, Request};
use std::sync::Arc;

pub struct RemoteLayout {
    pub session: Arc<Session>,
    pub lease: Arc<Lease>,
}

impl Layout for RemoteLayout {
    fn ino(&self) -> u64 {
        self.lease.ino
    }

    /// The size when the lease was granted: a shrink recalls the lease,
    /// so a page inside it is inside the file.
    fn size(&self) -> Result<u64> {
        Ok(self
            .session
            .grant(&self.lease)?
            .as_ref()
            .map_or(0, |g| g.size))
    }

    /// A growth does not recall the lease: ask before saying "beyond".
    fn size_now(&self) -> Result<u64> {
        match self.session.ask(Request::Size {
            ino: self.lease.ino,
        }) {
            Reply::Size(size) => Ok(size),
            Reply::Failed { errno, message } => Err(failed(errno, message)),
            _ => Err(Error::Invalid("the daemon answered a size with nothing")),
        }
    }

    fn blocks(&self, page: u64, n: u64) -> Result<Blocks> {
        let grant = self.session.grant(&self.lease)?;
        let g = grant.as_ref().expect("granted above");
        let within = g
            .extents
            .iter()
            .find(|e| e.page <= page && page < e.page + e.pages);
        Ok(match within {
            Some(e) if e.page + e.pages >= page + n => Blocks::Run(e.pfn + (page - e.page)),
            Some(_) => Blocks::Mixed,
            None if g.extents.iter().any(|e| e.page > page && e.page < page + n) => Blocks::Mixed,
            None => Blocks::Hole,
        })
    }

    fn allocate(&self, page: u64, n: u64) -> Result<()> {
        let asked = Request::Allocate {
            ino: self.lease.ino,
            first: page,
            end: page + n,
        };
        match self.session.ask(asked) {
            Reply::Done => {}
            Reply::Failed { errno, message } => return Err(failed(errno, message)),
            _ => return Err(Error::Invalid("the daemon answered an allocation oddly")),
        }
        // No grant of the file says where the range is now: ask anew.
        self.session.give_back_file(self.lease.ino);
        Ok(())
    }

    fn is_poisoned(&self, pfn: u64, n: u64) -> bool {
        let grant = self.lease.grant.lock().unwrap_or_else(|e| e.into_inner());
        grant.as_ref().is_some_and(|g| {
            g.poisoned
                .iter()
                .any(|&(p, len)| p < pfn + n && pfn < p + len)
        })
    }

    fn device(&self) -> &dyn DevicePages {
        &self.session.device
    }

    fn counters(&self) -> &DaxCounters {
        &self.session.counters
    }

    fn release(&self, file: &Arc<FileDax>) {
        let mut grant = self.lease.grant.lock().unwrap_or_else(|e| e.into_inner());
        self.session.give_back(&mut grant);
        drop(grant);
        if !file.in_use() {
            let _ = file.writeback(&self.session.device);
        }
    }
}
