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
//! [`Fs`] implements it in-process; a client in another process would
//! implement it over the control socket, with the device mapped itself.

use super::{Counters, FileDax, Inner};
use crate::error::Result;
use crate::fs::{Fs, Ino};
use pmem::Device;
use std::sync::Arc;

/// Where the blocks of `[page, page + n)` of a file are: one device page
/// frame run, a hole, or something else (partly allocated, not contiguous).
pub(in crate::fs) enum Blocks {
    Run(u64),
    Hole,
    Mixed,
}

/// What the fault machinery needs of a filesystem (see the module docs).
pub(in crate::fs) trait Layout: Send + Sync {
    /// The file's size in bytes.
    fn size(&self, ino: Ino) -> Result<u64>;
    /// Where file pages `[page, page + n)` live.
    fn blocks(&self, ino: Ino, page: u64, n: u64) -> Result<Blocks>;
    /// Give the holes in `[page, page + n)` zeroed blocks, durable with
    /// the metadata that maps them when this returns (`MAP_SYNC`'s promise).
    fn allocate(&self, ino: Ino, page: u64, n: u64) -> Result<()>;
    /// Whether device pages `[pfn, pfn + n)` hold poison.
    fn is_poisoned(&self, pfn: u64, n: u64) -> bool;
    /// The device whose pages are mapped (and flushed).
    fn device(&self) -> &Device;
    /// Where faults are counted.
    fn counters(&self) -> &Counters;
    /// A mapping of `ino` (`gone`) went: if nothing maps or pins the file
    /// any more, write back its dirty entries and forget its DAX state.
    fn release(&self, dax: &Arc<FileDax>, ino: Ino, gone: &Inner);
}

impl Layout for Fs {
    fn size(&self, ino: Ino) -> Result<u64> {
        Ok(self.getattr(ino)?.size)
    }

    /// Where file pages `[page, page + n)` of `ino` live (pages and blocks
    /// are both 4 KiB).
    fn blocks(&self, ino: Ino, page: u64, n: u64) -> Result<Blocks> {
        let mut st = self.lock()?;
        let extents = self.extents(&mut st, ino)?;
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

    fn allocate(&self, ino: Ino, page: u64, n: u64) -> Result<()> {
        self.fallocate_blocks(ino, page * super::PAGE, n * super::PAGE, true)
    }

    fn is_poisoned(&self, pfn: u64, n: u64) -> bool {
        self.core
            .dev
            .first_poison(pfn * super::PAGE, n * super::PAGE)
            .is_some()
    }

    fn device(&self) -> &Device {
        &self.core.dev
    }

    fn counters(&self) -> &Counters {
        &self.core.dax_counters
    }

    fn release(&self, dax: &Arc<FileDax>, ino: Ino, gone: &Inner) {
        self.dax_release(dax, ino, Some(gone));
    }
}
