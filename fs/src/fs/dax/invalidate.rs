//! The invalidate protocol: before the blocks behind a mapped range change
//! (truncate, punch, an allocating write, `O_TRUNC`), the range is unmapped
//! from every mapping and its entries dropped under the file's invalidate
//! lock, held until the change commits, so no fault maps a block about to
//! be freed; pins are waited for (see `layout`). Also writeback (flush the
//! pages of dirty entries, write-protect them again) and memory failure of
//! one page.

use super::layout::DevicePages;
use super::{live, FileDax, Fs, Inner, Ino, State, HUGE, PAGE};
use crate::error::{Error, Result};
use crate::fs::layout::RecallKind;
use crate::fs::user::{Counted, Held};
use crate::index::{Order, Tag, PMD_PAGES};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLockWriteGuard};

/// The invalidate lock held exclusive, while the blocks of a mapped file
/// change (see `FileDax`).
pub struct Breaking<'a> {
    dax: &'a FileDax,
    /// Counted: a fault of this thread would wait for the lock (see `user`).
    _guard: Counted<RwLockWriteGuard<'a, ()>>,
}

impl Drop for Breaking<'_> {
    fn drop(&mut self) {
        self.dax.breaking.store(false, Ordering::Release);
    }
}

pub(in crate::fs) type Invalidation<'a> = Option<Breaking<'a>>;

impl Fs {
    /// Before the blocks of file pages `[first, end)` of `ino` change: if
    /// the file has DAX state, take its invalidate lock, unmap the range
    /// from every mapping (the next access faults again) and drop its
    /// entries. Hold the returned guard until the change is done.
    pub(in crate::fs) fn dax_invalidate<'a>(
        &self,
        dax: &'a Option<Arc<FileDax>>,
        first: u64,
        end: u64,
    ) -> Result<Invalidation<'a>> {
        self.dax_break(dax, first, end, false, true)
    }

    /// Before a write or fallocate fills holes in `[first, end)`: as
    /// [`dax_invalidate`](Self::dax_invalidate), but only the zero-page
    /// entries go (data entries stay mapped: their blocks do not change).
    pub(in crate::fs) fn dax_fill_holes<'a>(
        &self,
        dax: &'a Option<Arc<FileDax>>,
        first: u64,
        end: u64,
    ) -> Result<Invalidation<'a>> {
        self.dax_break(dax, first, end, true, true)
    }

    /// [`dax_fill_holes`](Self::dax_fill_holes) for a lease holder's store
    /// fault: a break running on the file makes it fail at once with
    /// [`Error::Recalled`] instead of waiting, since the holder may be
    /// what that break waits for.
    pub(in crate::fs) fn dax_fill_holes_nowait<'a>(
        &self,
        dax: &'a Option<Arc<FileDax>>,
        first: u64,
        end: u64,
    ) -> Result<Invalidation<'a>> {
        self.dax_break(dax, first, end, true, false)
    }

    fn dax_break<'a>(
        &self,
        dax: &'a Option<Arc<FileDax>>,
        first: u64,
        end: u64,
        holes_only: bool,
        wait: bool,
    ) -> Result<Invalidation<'a>> {
        let Some(dax) = dax.as_ref() else {
            return Ok(None);
        };
        let breaking = dax
            .break_range(first, end, holes_only, wait)
            .ok_or(Error::Recalled)?;
        if holes_only {
            // Every process's zero pages gone before the blocks come (a
            // holder that does not answer in time keeps its stale view).
            let told = Fs::recall_leases(dax, first, end, RecallKind::FillingHoles);
            self.wait_for_leases(dax, &told);
        } else {
            // The blocks may go: wait until no direct I/O or client uses
            // them.
            Fs::recall_leases(dax, first, end, RecallKind::Freeing);
            self.wait_for_pins(dax, first, end)?;
        }
        Ok(Some(breaking))
    }

    /// Under the state lock (`_locked`), before freeing blocks of `ino`:
    /// refuse (with [`Error::MappedMeanwhile`], which the public calls catch
    /// to run again, breaking the mappings) if the file has DAX state whose
    /// mappings the caller did not break. (Mappings are made under the
    /// state lock, so none can appear between this check and the commit.)
    pub(in crate::fs) fn check_broken(&self, _locked: &State, ino: Ino) -> Result<()> {
        match self.dax_of(ino) {
            Some(dax) if !dax.breaking.load(Ordering::Acquire) => Err(Error::MappedMeanwhile),
            _ => Ok(()),
        }
    }
}

impl FileDax {
    /// Recall file pages `[first, end)` from this process's mappings (a
    /// client's answer to a lease recall): take the invalidate lock
    /// exclusive (waiting for faults in flight), unmap the range from every
    /// mapping (the next access faults again) and drop its entries. Faults
    /// of the file wait until the returned guard is dropped.
    pub fn recall(&self, first: u64, end: u64) -> Breaking<'_> {
        self.break_range(first, end, false, true)
            .expect("a break that waits always takes the lock")
    }

    /// [`recall`](Self::recall) of the holes of file pages `[first, end)`
    /// only (another process gave them blocks): their zero pages go from
    /// every mapping; pages mapped from the device stay.
    pub fn recall_holes(&self, first: u64, end: u64) -> Breaking<'_> {
        self.break_range(first, end, true, true)
            .expect("a break that waits always takes the lock")
    }

    /// Take the invalidate lock exclusive and unmap `[first, end)` from
    /// every mapping, dropping its entries (or, `holes_only`, only the
    /// entries of holes, whose pages are about to get blocks). Unless
    /// `wait`, nothing if the lock is held now.
    fn break_range(
        &self,
        first: u64,
        end: u64,
        holes_only: bool,
        wait: bool,
    ) -> Option<Breaking<'_>> {
        let dax = self;
        let guard = match wait {
            true => dax.invalidate.write().unwrap_or_else(|e| e.into_inner()),
            false => match dax.invalidate.try_write() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return None,
            },
        };
        dax.breaking.store(true, Ordering::Release);
        let breaking = Breaking {
            dax,
            _guard: Counted::new(guard),
        };
        // Whole PMDs: an entry that overlaps the range goes entirely.
        let first = first / PMD_PAGES * PMD_PAGES;
        let end = end.saturating_add(PMD_PAGES - 1) / PMD_PAGES * PMD_PAGES;
        let doomed: Vec<(u64, Order)> = dax
            .index
            .range(first..end)
            .filter(|(_, e)| !holes_only || !e.is_mapped() || e.is_poisoned())
            .map(|(at, e)| (at, e.order()))
            .collect();
        let mappings = live(dax);
        if !holes_only {
            for m in &mappings {
                m.unmap(first, end - first);
            }
        }
        // The file may grow: pages shown past its end must fault again.
        if dax.beyond.swap(false, Ordering::AcqRel) {
            for m in &mappings {
                m.unmap_beyond();
            }
        }
        for (at, order) in doomed {
            if holes_only {
                for m in &mappings {
                    m.unmap(at, order.pages());
                }
            }
            // Faults are shut out, so nobody holds these for long.
            if let Ok(guard) = dax.index.lock_entry(at, order) {
                let _held = Held::new();
                guard.erase();
            }
        }
        Some(breaking)
    }

    /// Writeback of a file's dirty entries: flush their pages, clear the
    /// tags, and write-protect them in every mapping.
    pub fn writeback(&self, dev: &dyn DevicePages) -> Result<()> {
        self.writeback_through(dev, None)
    }

    /// [`writeback`](Self::writeback), flushing through the addresses
    /// where a live mapping, or `going` (a mapping being dropped, out of
    /// the list already), shows the pages.
    pub(super) fn writeback_through(
        &self,
        dev: &dyn DevicePages,
        going: Option<&Inner>,
    ) -> Result<()> {
        let mut at = 0;
        while let Some((first, entry)) = self.index.find_next_tagged(at, Tag::Dirty) {
            let pages = entry.order().pages();
            if let Ok(guard) = self.index.lock_entry(first, entry.order()) {
                let _held = Held::new();
                let e = guard.entry();
                if e.is_mapped() {
                    self.index.set_tag(first, Tag::Towrite);
                    // (Taken under the entry lock: a mapping that comes
                    // later maps the page writable only through that lock.)
                    let mappings = live(self);
                    let shown = going
                        .and_then(|m| m.shows_all(first, pages))
                        .or_else(|| mappings.iter().find_map(|m| m.shows_all(first, pages)));
                    match shown {
                        Some(addr) => {
                            dev.flush_shown(addr as *const u8, e.pfn() * PAGE, pages * PAGE)?
                        }
                        None => dev.flush(e.pfn() * PAGE, pages * PAGE)?,
                    }
                    self.index.clear_tag(first, Tag::Dirty);
                    self.index.clear_tag(first, Tag::Towrite);
                    for m in &mappings {
                        m.protect(first, pages);
                    }
                }
            }
            at = first + pages;
        }
        dev.drain();
        Ok(())
    }
}

impl Fs {
    /// Memory failure of file page `fpage` (see `failure`): lock the entry
    /// that covers it (a PMD is split first, so that only this page goes),
    /// make the page inaccessible in every mapping, mark the entry poisoned,
    /// unlock. Returns the addresses where a mapping showed the page, and
    /// whether a PMD entry was split.
    pub(in crate::fs) fn dax_poison(&self, dax: &FileDax, fpage: u64) -> (Vec<usize>, bool) {
        let poisoned = dax.poison_page(fpage, &self.core.dev);
        // Clients in other processes map the page too: theirs must go.
        Fs::recall_leases(dax, fpage, fpage + 1, RecallKind::Poisoned { page: fpage });
        poisoned
    }
}

impl FileDax {
    /// Memory failure of file page `fpage` in this process's mappings (a
    /// client's answer to a recall for poison): lock the entry that covers
    /// it (a PMD is split first, so that only this page goes, its stores
    /// written back to `dev` first), make the page inaccessible in every
    /// mapping, mark the entry poisoned, unlock. Returns the addresses where
    /// a mapping showed the page, and whether a PMD entry was split.
    pub fn poison_page(&self, fpage: u64, dev: &dyn DevicePages) -> (Vec<usize>, bool) {
        let dax = self;
        // Shared, as a fault: no break runs meanwhile.
        let _shared = dax.shared();
        let Ok(mut guard) = dax.index.lock_entry(fpage, Order::Pte) else {
            return (Vec::new(), false);
        };
        let _held = Held::new();
        let mut split = false;
        let entry = guard.entry();
        if entry.order() == Order::Pmd && entry.is_mapped() {
            // The split drops the PMD's tags: write its stores back first.
            if dax.index.get_tag(guard.base(), Tag::Dirty) {
                let _ = dev.flush(entry.pfn() * PAGE, HUGE);
                dev.drain();
            }
            guard = match guard.split(fpage) {
                Ok(pte) => {
                    split = true;
                    pte
                }
                Err((pmd, _)) => pmd,
            };
        }
        let mappings = live(dax);
        let mut shown = Vec::new();
        let entry = guard.entry();
        if entry.order() == Order::Pte && entry.is_mapped() {
            guard.set(entry.poisoned()).ok();
            for m in &mappings {
                if let Some(addr) = m.shows(fpage) {
                    shown.push(addr);
                    // MAP_FIXED over one page of a huge mapping: the kernel
                    // splits its PMD and the other 511 pages stay mapped.
                    let _ = m.map_poison(fpage - m.first_page);
                }
            }
        } else {
            // Not mapped as data anywhere (or a stale hole entry): the next
            // fault finds the poison on the device.
            for m in &mappings {
                shown.extend(m.shows(fpage));
                m.unmap(fpage, 1);
            }
            if entry.is_empty() {
                guard.erase();
            }
        }
        (shown, split)
    }
}
