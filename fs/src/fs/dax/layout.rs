//! The layout interface: what the fault machinery needs of the filesystem
//! whose file a mapping shows, as Linux's `fs/dax.c` reaches ext4 and XFS
//! only through `iomap_ops`.
//!
//! ## The contract
//!
//! The fault routine calls these with the file's invalidate lock held
//! shared and, for the block calls, the entry lock of the range held; it
//! holds no lock of the filesystem's. An implementation may take the
//! filesystem's own locks (the state lock, the journal) but not the
//! invalidate lock or entry locks of any file (they come first in the lock
//! order: invalidate, entry, state), and must not touch a mapping while it
//! holds a lock of its own. While the invalidate lock is held shared, the
//! blocks a call reports stay the file's: every call that frees or moves
//! blocks of a mapped file breaks its mappings under that lock held
//! exclusive first (see `invalidate`).
//!
//! [`FileLayout`] implements it in-process; a client in another process
//! would implement it over the control socket, with the device mapped
//! itself.

use super::{DaxCounters, FileDax};
use crate::error::Result;
use crate::fs::{Fs, Ino, InodeRef};
use pmem::Device;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

/// Where the blocks of `[page, page + n)` of a file are: one device page
/// frame run, a hole, or something else (partly allocated, not contiguous).
pub enum Blocks {
    /// One run of device pages, from this page frame number.
    Run(u64),
    /// No blocks: a hole.
    Hole,
    /// Partly allocated, or not contiguous.
    Mixed,
}

/// What the fault machinery needs of the filesystem, for one file (see the
/// module docs). The mapping owns it and drops it last, after its address
/// space: whatever keeps the file (and its blocks) alive goes in here.
pub trait Layout: Send + Sync {
    /// The file's inode number (for the fault trace).
    fn ino(&self) -> u64;
    /// The file's size in bytes, possibly from a cache that may lag a
    /// growth of the file but never a shrink (which breaks the layout).
    fn size(&self) -> Result<u64>;
    /// The file's size now, asked when [`size`](Self::size) puts a page
    /// past the end (which raises `SIGBUS`).
    fn size_now(&self) -> Result<u64> {
        self.size()
    }
    /// Where file pages `[page, page + n)` live.
    fn blocks(&self, page: u64, n: u64) -> Result<Blocks>;
    /// Give the holes in `[page, page + n)` zeroed blocks, durable with
    /// the metadata that maps them when this returns (`MAP_SYNC`'s promise).
    fn allocate(&self, page: u64, n: u64) -> Result<()>;
    /// Whether device pages `[pfn, pfn + n)` hold poison.
    fn is_poisoned(&self, pfn: u64, n: u64) -> bool;
    /// The device whose pages are mapped (and flushed).
    fn device(&self) -> &dyn DevicePages;
    /// Where faults are counted.
    fn counters(&self) -> &DaxCounters;
    /// A mapping of the file went (it is no longer among `file`'s): if
    /// nothing maps or pins the file any more, write back its dirty entries
    /// and forget its DAX state.
    fn release(&self, file: &Arc<FileDax>);
}

/// The device as a mapping needs it: the file whose pages pieces map, and
/// the flushes that make stores to them durable.
pub trait DevicePages: Send + Sync {
    /// The device file (pieces map it at `pfn * 4096`).
    fn fd(&self) -> BorrowedFd<'_>;
    /// Write back the cache lines of `[offset, offset + len)` of the device
    /// (durable at the next [`drain`](Self::drain)).
    fn flush(&self, offset: u64, len: u64) -> Result<()>;
    /// [`flush`](Self::flush), for device bytes that a mapping of ours
    /// shows at `addr` (a client whose own view of the device is not
    /// faulted in flushes through the mapping instead: the cache lines are
    /// the same).
    fn flush_shown(&self, _addr: *const u8, offset: u64, len: u64) -> Result<()> {
        self.flush(offset, len)
    }
    /// Wait until every earlier flush is durable.
    fn drain(&self);
    /// The device's path, for messages.
    fn path(&self) -> &Path;
}

impl DevicePages for Device {
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }

    fn flush(&self, offset: u64, len: u64) -> Result<()> {
        Ok(Device::flush(self, offset, len)?)
    }

    fn drain(&self) {
        Device::drain(self)
    }

    fn path(&self) -> &Path {
        Device::path(self)
    }
}

/// The layout of one file of an in-process [`Fs`]: a hold on its inode,
/// which keeps it in memory (and unmount waiting) while it is mapped.
pub(in crate::fs) struct FileLayout(pub(in crate::fs) InodeRef);

impl FileLayout {
    fn fs(&self) -> &Fs {
        &self.0.fs
    }
}

impl Layout for FileLayout {
    fn ino(&self) -> Ino {
        self.0.ino
    }

    fn size(&self) -> Result<u64> {
        Ok(self.fs().getattr(self.ino())?.size)
    }

    /// Where file pages `[page, page + n)` live (pages and blocks are both
    /// 4 KiB).
    fn blocks(&self, page: u64, n: u64) -> Result<Blocks> {
        let fs = self.fs();
        let mut st = fs.lock()?;
        let extents = fs.extents(&mut st, self.ino())?;
        Ok(match crate::fs::extents::map(extents, page) {
            Some((physical, run)) if run >= n => Blocks::Run(physical),
            Some(_) => Blocks::Mixed,
            None if crate::fs::extents::next_mapped(extents, page)
                .is_some_and(|b| b < page + n) =>
            {
                Blocks::Mixed
            }
            None => Blocks::Hole,
        })
    }

    fn allocate(&self, page: u64, n: u64) -> Result<()> {
        self.fs()
            .fallocate_blocks(self.ino(), page * super::PAGE, n * super::PAGE, true)
    }

    fn is_poisoned(&self, pfn: u64, n: u64) -> bool {
        self.fs()
            .core
            .dev
            .first_poison(pfn * super::PAGE, n * super::PAGE)
            .is_some()
    }

    fn device(&self) -> &dyn DevicePages {
        &self.fs().core.dev
    }

    fn counters(&self) -> &DaxCounters {
        &self.fs().core.dax_counters
    }

    fn release(&self, file: &Arc<FileDax>) {
        self.fs().dax_release(file, self.ino());
    }
}
