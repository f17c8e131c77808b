//! The fault routine: what a load or store to a page of a mapping that
//! shows nothing yet maps there, PMD first, else PTE (see the module docs
//! of `dax` for the pieces and entries). It reaches the filesystem only
//! through the mapping's [`Layout`](super::Layout).

use super::layout::Blocks;
use super::pieces::{NONE, READ, ZERO};
use super::trace::{FaultEvent, FaultResult, FaultSize};
use super::{DaxCounters, Fallback, Inner, PAGE};
use crate::error::{Error, Result};
use crate::index::{Entry, Order, PMD_PAGES};
use std::sync::atomic::Ordering;

impl Inner {
    /// Fault in every page not mapped yet (`MAP_POPULATE`).
    pub(super) fn populate(&self) -> Result<()> {
        for page in 0..self.pages {
            if self.state[page as usize].load(Ordering::Acquire) == NONE {
                self.fault(page, false)?;
            }
        }
        Ok(())
    }

    /// Fault in mapping pages `[first, end)` not mapped yet (for a store,
    /// also those mapped read-only), as accesses would; pages that raise
    /// `SIGBUS` (past the end of the file, poisoned) are left as they are.
    pub(super) fn fault_in(&self, first: u64, end: u64, write: bool) -> Result<()> {
        for page in first..end.min(self.pages) {
            let state = self.state[page as usize].load(Ordering::Acquire);
            let store = write && self.writable() && matches!(state, READ | ZERO);
            if state == NONE || store {
                self.fault(page, write && self.writable())?;
            }
        }
        Ok(())
    }

    pub(super) fn os_error(&self, op: &'static str) -> Error {
        Error::Device(pmem::Error::Io {
            path: self.layout.device().path().to_path_buf(),
            op,
            source: std::io::Error::last_os_error(),
        })
    }

    /// The fault routine: make page `page` of the mapping accessible for a
    /// load, or a store if `write`. A layout being recalled (by a break in
    /// the filesystem's process, which waits for this process to answer)
    /// is asked again once this fault has let go of its locks.
    pub(super) fn fault(&self, page: u64, write: bool) -> Result<()> {
        loop {
            match self.fault_once(page, write) {
                Err(Error::Recalled) => std::thread::sleep(std::time::Duration::from_micros(100)),
                done => return done,
            }
        }
    }

    fn fault_once(&self, page: u64, write: bool) -> Result<()> {
        if self.any_gone(page, 1) {
            return Err(Error::Invalid("the page was withdrawn from the mapping"));
        }
        let _shared = self.dax.shared();
        let fs = &*self.layout;
        let counters = fs.counters();
        let fpage = self.first_page + page;
        let mut size = fs.size()?;
        if fpage * PAGE >= size {
            size = fs.size_now()?;
        }
        let event = |size_: FaultSize, at: u64, result: FaultResult| FaultEvent {
            size: size_,
            ino: fs.ino(),
            shared: self.opts.shared,
            write,
            address: at,
            vm_start: self.base as u64,
            vm_end: self.base as u64 + self.pages * PAGE,
            pgoff: fpage,
            max_pgoff: size.div_ceil(PAGE).saturating_sub(1),
            result,
        };
        let address = self.base as u64 + page * PAGE;
        if fpage * PAGE >= size {
            DaxCounters::count(&counters.beyond);
            counters
                .trace
                .emit(|| event(FaultSize::Pte, address, FaultResult::Sigbus));
            return self.map_beyond(page);
        }
        if write && !self.writable() {
            return Err(Error::Invalid("store to a read-only mapping"));
        }
        let chunk = fpage / PMD_PAGES * PMD_PAGES;
        let at = |page: u64| self.base as u64 + (page - self.first_page) * PAGE;
        let fallback =
            if chunk < self.first_page || chunk + PMD_PAGES > self.first_page + self.pages {
                Some(Fallback::Misaligned)
            } else if !at(chunk).is_multiple_of(PMD_PAGES * PAGE)
                || self.any_gone(chunk - self.first_page, PMD_PAGES)
            {
                // A mapping placed by its caller (MAP_FIXED) off the 2 MiB
                // phase of the file, or with pages withdrawn from it: no
                // huge piece fits.
                Some(Fallback::Misaligned)
            } else if (chunk + PMD_PAGES) * PAGE > size {
                Some(Fallback::PastEof)
            } else if write && !self.opts.shared {
                Some(Fallback::PrivateWrite)
            } else {
                self.pmd_fault(chunk, write)?
            };
        let huge = address & !(PMD_PAGES * PAGE - 1);
        match fallback {
            None => {
                DaxCounters::count(&counters.pmd);
                counters
                    .trace
                    .emit(|| event(FaultSize::Pmd, huge, FaultResult::NoPage));
                Ok(())
            }
            Some(reason) => {
                DaxCounters::count(&counters.fallback[reason as usize]);
                DaxCounters::count(&counters.pte);
                counters
                    .trace
                    .emit(|| event(FaultSize::Pmd, huge, FaultResult::Fallback(reason)));
                let done = self.pte_fault(fpage, write);
                if done.is_ok() {
                    counters
                        .trace
                        .emit(|| event(FaultSize::Pte, address, FaultResult::NoPage));
                }
                done
            }
        }
    }

    /// Try a PMD fault for the 2 MiB at file page `chunk`; `Some(reason)`
    /// when it must fall back.
    pub(super) fn pmd_fault(&self, chunk: u64, write: bool) -> Result<Option<Fallback>> {
        let fs = &*self.layout;
        let mut guard = match self.dax.index.lock_entry(chunk, Order::Pmd) {
            Ok(guard) => guard,
            Err(_) => return Ok(Some(Fallback::PteInRange)),
        };
        let entry = guard.entry();
        if entry.order() != Order::Pmd {
            return Ok(Some(Fallback::PteInRange));
        }
        let page = chunk - self.first_page;
        if entry.is_mapped() && fs.is_poisoned(entry.pfn(), PMD_PAGES) {
            return Ok(Some(Fallback::Poisoned));
        }
        if entry.is_mapped() {
            self.map_data(page, PMD_PAGES, entry.pfn(), write)?;
            if write {
                let _ = self.dax.index.mark_dirty(chunk);
            }
            return Ok(None);
        }
        let mut blocks = fs.blocks(chunk, PMD_PAGES)?;
        if matches!(blocks, Blocks::Hole) && !write {
            if entry.is_empty() {
                guard.set(Entry::zero(Order::Pmd)).ok();
            }
            DaxCounters::count(&fs.counters().zero);
            self.map_zero(page, PMD_PAGES)?;
            return Ok(None);
        }
        if matches!(blocks, Blocks::Hole) {
            fs.allocate(chunk, PMD_PAGES)?;
            blocks = fs.blocks(chunk, PMD_PAGES)?;
        }
        match blocks {
            Blocks::Run(pfn) if pfn.is_multiple_of(PMD_PAGES) && fs.is_poisoned(pfn, PMD_PAGES) => {
                if entry.is_empty() {
                    guard.erase();
                }
                Ok(Some(Fallback::Poisoned))
            }
            Blocks::Run(pfn) if pfn.is_multiple_of(PMD_PAGES) => {
                guard
                    .set(Entry::new(Order::Pmd, pfn))
                    .map_err(|_| Error::Invalid("entry changed order"))?;
                // Other mappings may show the zero page here: no more.
                self.unmap_everywhere(chunk, PMD_PAGES);
                self.map_data(page, PMD_PAGES, pfn, write)?;
                if write {
                    drop(guard);
                    let _ = self.dax.index.mark_dirty(chunk);
                }
                Ok(None)
            }
            _ => {
                if entry.is_empty() {
                    guard.erase();
                }
                Ok(Some(Fallback::NotHugeExtent))
            }
        }
    }

    pub(super) fn pte_fault(&self, fpage: u64, write: bool) -> Result<()> {
        let fs = &*self.layout;
        let page = fpage - self.first_page;
        let private_write = write && !self.opts.shared;
        let mut guard = match self.dax.index.lock_entry(fpage, Order::Pte) {
            Ok(guard) => guard,
            Err(_) => return Err(Error::Invalid("entry index conflict on a PTE fault")),
        };
        let mut entry = guard.entry();
        if entry.order() == Order::Pmd
            && entry.is_mapped()
            && fs.is_poisoned(entry.pfn() + (fpage - guard.base()), 1)
        {
            // Only the poisoned page may become inaccessible: split.
            guard = guard
                .split(fpage)
                .map_err(|_| Error::Invalid("cannot split a PMD entry"))?;
            entry = guard.entry();
        }
        if entry.order() == Order::Pmd {
            if entry.is_mapped() {
                // A real PMD that this mapping cannot map whole.
                let pfn = entry.pfn() + (fpage - guard.base());
                self.map_data(page, 1, pfn, write)?;
                drop(guard);
                if write && self.opts.shared {
                    let _ = self.dax.index.mark_dirty(fpage);
                }
                return Ok(());
            }
            if !write {
                DaxCounters::count(&fs.counters().zero);
                return self.map_zero(page, 1);
            }
            // A store into a zero (or empty) PMD: downgrade to a PTE.
            guard = guard
                .downgrade(fpage)
                .map_err(|_| Error::Invalid("cannot downgrade a PMD entry"))?;
            entry = guard.entry();
        }
        if entry.is_mapped() && (entry.is_poisoned() || fs.is_poisoned(entry.pfn(), 1)) {
            guard.set(entry.poisoned()).ok();
            return self.map_poison(page);
        }
        if entry.is_mapped() {
            self.map_data(page, 1, entry.pfn(), write)?;
            drop(guard);
            if write && self.opts.shared {
                let _ = self.dax.index.mark_dirty(fpage);
            }
            return Ok(());
        }
        if private_write {
            // A private store to a hole copies nothing: anonymous memory.
            drop(guard);
            return self.map_anon(page);
        }
        let mut blocks = fs.blocks(fpage, 1)?;
        if matches!(blocks, Blocks::Hole) {
            if !write {
                if entry.is_empty() {
                    guard.set(Entry::zero(Order::Pte)).ok();
                }
                DaxCounters::count(&fs.counters().zero);
                return self.map_zero(page, 1);
            }
            fs.allocate(fpage, 1)?;
            blocks = fs.blocks(fpage, 1)?;
        }
        let Blocks::Run(pfn) = blocks else {
            return Err(Error::Invalid("a block vanished under a fault"));
        };
        if fs.is_poisoned(pfn, 1) {
            guard
                .set(Entry::new(Order::Pte, pfn).poisoned())
                .map_err(|_| Error::Invalid("entry changed order"))?;
            self.unmap_everywhere(fpage, 1);
            return self.map_poison(page);
        }
        guard
            .set(Entry::new(Order::Pte, pfn))
            .map_err(|_| Error::Invalid("entry changed order"))?;
        self.unmap_everywhere(fpage, 1);
        self.map_data(page, 1, pfn, write)?;
        drop(guard);
        if write && self.opts.shared {
            let _ = self.dax.index.mark_dirty(fpage);
        }
        Ok(())
    }
}
