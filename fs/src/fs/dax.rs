//! DAX mappings: a file mapped through the library is made of the device's
//! own pages (`mmap` of the device file at the blocks' offsets), so a store
//! lands on the (emulated) pmem with no page cache and no copy.
//!
//! ## Pieces and entries
//!
//! [`Fs::mmap`] reserves a virtual range (`PROT_NONE`) placed so that every
//! 2 MiB-aligned file offset falls on a 2 MiB-aligned address, and fills it
//! piece by piece with `MAP_FIXED` mappings: a 2 MiB piece (a PMD) when the
//! file range is 2 MiB aligned, wholly inside the file and the mapping,
//! backed by one aligned 2 MiB device extent and free of PTE entries; else
//! 4 KiB pieces (PTEs). Holes read as the zero page (anonymous memory,
//! read-only), pages past the end of the file as a page of an empty memory
//! file, which raises `SIGBUS` as Linux does. Every piece is an entry in the
//! file's [`EntryIndex`](crate::index::EntryIndex), installed under its entry
//! lock, so two threads faulting one page install it once.
//!
//! ## Faults: lazily, in the faulting thread
//!
//! Pieces are made by one fault routine, either for every page at `mmap`
//! time (`populate`) or on first access: a `SIGSEGV` handler finds the
//! mapping that holds the address, runs the fault routine, and returns, and
//! the access is retried. (userfaultfd would run faults in a thread of our
//! own, but it registers anonymous and shmem memory only, and our pieces
//! are mappings of the device file; the handler keeps one code path for
//! every backing.) A fault runs inside the faulting thread, so that thread
//! must hold no lock of ours: caller memory, which may be an unfaulted
//! daxfs mapping, is copied before our locks are taken and filled after
//! they are released (see `user`, which also checks the rule). The routine
//! allocates memory and takes locks, which a signal handler may do only
//! because the interrupted code was a load or a store to a daxfs mapping,
//! never the allocator or our own lock holders (they never touch
//! mappings). Addresses that are not ours go to the
//! handler that was there before.
//!
//! An unfaulted page is an inaccessible reservation, which `mlock(2)`
//! refuses (`ENOMEM`); [`Mapping::lock`] faults every page in first and
//! locks the pieces mapped later as they are mapped.
//!
//! ## Writes, sync and writeback
//!
//! A write fault on a hole allocates (a whole aligned 2 MiB extent where the
//! range allows), zeroes it durably and commits the metadata before the page
//! is mapped, which is `MAP_SYNC`'s promise: once a write fault returns the
//! block mapping is durable, and the application needs only CPU flushes.
//! In a shared writable mapping a read fault maps data read-only and the
//! first store write-faults: the entry is tagged dirty and the piece made
//! writable. [`Mapping::sync`] flushes exactly the pages of dirty entries and
//! write-protects them again, so the next store faults and re-dirties (as
//! `dax_writeback_mapping_range` does).

use super::{Fs, Ino, Refs};
use crate::error::{Error, Result};
use crate::index::{Entry, EntryIndex, Order, Tag, PMD_PAGES};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, Weak};

const PAGE: u64 = 4096;
const HUGE: u64 = PAGE * PMD_PAGES;

/// How [`Fs::mmap`] maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// Stores allowed (`PROT_WRITE`).
    pub write: bool,
    /// Shared (`MAP_SHARED`): stores reach the file. Otherwise private:
    /// a store copies the page, and the file never changes.
    pub shared: bool,
    /// Map every page now instead of on first access.
    pub populate: bool,
}

impl Default for MapOptions {
    fn default() -> MapOptions {
        MapOptions {
            write: true,
            shared: true,
            populate: false,
        }
    }
}

/// Why a fault that could have been a PMD fault was not (the order is the
/// order of the counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The 2 MiB around the page is not wholly inside the mapping.
    Misaligned,
    /// The 2 MiB around the page reaches past the end of the file.
    PastEof,
    /// The blocks are not one 2 MiB extent aligned on the device.
    NotHugeExtent,
    /// A PTE entry is already in the range.
    PteInRange,
    /// A store into a private mapping (copied page by page).
    PrivateWrite,
    /// A page of the 2 MiB is poisoned (only it must become inaccessible).
    Poisoned,
}

/// Fault counters (see [`Fs::dax_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaxStats {
    pub pmd_faults: u64,
    pub pte_faults: u64,
    /// Holes mapped to the zero page (PMD- or PTE-sized).
    pub zero_maps: u64,
    pub fallback_misaligned: u64,
    pub fallback_past_eof: u64,
    pub fallback_not_huge_extent: u64,
    pub fallback_pte_in_range: u64,
    pub fallback_private_write: u64,
    pub fallback_poisoned: u64,
    /// Pages mapped inaccessible because they are poisoned (an access
    /// raises `SIGBUS` with `BUS_MCEERR_AR`).
    pub poisoned_maps: u64,
    /// Accesses past the end of the file (which raise `SIGBUS`).
    pub beyond_eof: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pmd: AtomicU64,
    pte: AtomicU64,
    zero: AtomicU64,
    fallback: [AtomicU64; 6],
    beyond: AtomicU64,
    poisoned: AtomicU64,
}

impl Counters {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The DAX state of one file: its entry index and its live mappings.
pub(super) struct FileDax {
    index: EntryIndex,
    mappings: Mutex<Vec<Weak<Inner>>>,
    /// File page ranges pinned for direct I/O (see `layout`), one per pin.
    pub(super) pins: Mutex<Vec<(u64, u64)>>,
    /// Signalled when a pin goes.
    pub(super) unpinned: Condvar,
    /// Faults hold it shared; a call that changes which blocks back the
    /// file (truncate, punch, allocating writes) holds it exclusive while
    /// it unmaps the range, drops its entries and changes the blocks, so no
    /// fault can map a block that is about to be freed (Linux's
    /// `invalidate_lock`). Lock order: this, then entry locks, then the
    /// filesystem's state lock.
    pub(super) invalidate: RwLock<()>,
    /// Whether the invalidate lock is held exclusive now (by a `Breaking`).
    breaking: AtomicBool,
    /// Whether some mapping shows a page past the end of the file (which
    /// raises `SIGBUS`); a call that may grow the file unmaps them.
    beyond: AtomicBool,
}

/// The invalidate lock held exclusive, while the blocks of a mapped file
/// change (see `FileDax`).
pub(super) struct Breaking<'a> {
    dax: &'a FileDax,
    _guard: std::sync::RwLockWriteGuard<'a, ()>,
}

impl Drop for Breaking<'_> {
    fn drop(&mut self) {
        self.dax.breaking.store(false, Ordering::Release);
    }
}

pub(super) type Invalidation<'a> = Option<Breaking<'a>>;

/// What a page of a mapping shows now.
const NONE: u8 = 0;
const ZERO: u8 = 1;
const READ: u8 = 2;
const WRITE: u8 = 3;
const BEYOND: u8 = 4;
const POISON: u8 = 5;

/// A DAX mapping of a file. Dereferences to its bytes; unmapped on drop.
pub struct Mapping {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    fs: Fs,
    ino: Ino,
    dax: Arc<FileDax>,
    /// File page of the mapping's first byte.
    first_page: u64,
    pages: u64,
    /// Address of the first byte.
    base: usize,
    /// The whole reservation, to unmap.
    reservation: (usize, usize),
    opts: MapOptions,
    state: Box<[AtomicU8]>,
    /// Locked in memory ([`Mapping::lock`]): pieces mapped later are too.
    locked: AtomicBool,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("ino", &self.inner.ino)
            .field("offset", &(self.inner.first_page * PAGE))
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

// SAFETY: the mapping is raw shared memory; the pointer is only an address,
// and every change to the mapping's state is atomic or under locks.
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

impl Mapping {
    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.base as *mut u8
    }

    pub fn len(&self) -> usize {
        (self.inner.pages * PAGE) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.inner.pages == 0
    }

    /// Make the stores to `[offset, offset + len)` of the mapping durable
    /// by CPU cache flushes alone (what a `MAP_SYNC` application does with
    /// `pmem_persist`): the block mapping is durable already, since the write
    /// fault committed it.
    pub fn persist(&self, offset: usize, len: usize) -> Result<()> {
        let end = (offset + len).min(self.len());
        let dev = &self.inner.fs.core.dev;
        let mut at = offset;
        while at < end {
            let page = (at as u64) / PAGE;
            let upto = (((page + 1) * PAGE) as usize).min(end);
            let fpage = self.inner.first_page + page;
            if let Some(e) = self.inner.dax.index.load(fpage).filter(|e| e.is_mapped()) {
                let pfn = e.pfn() + (fpage - e.order().align(fpage));
                dev.flush(pfn * PAGE + at as u64 % PAGE, (upto - at) as u64)?;
            }
            at = upto;
        }
        dev.drain();
        Ok(())
    }

    /// Make the stores so far durable: flush the pages of dirty entries,
    /// clear their tags and write-protect them again (`msync`).
    pub fn sync(&self) -> Result<()> {
        self.inner.fs.dax_writeback(&self.inner.dax)
    }

    /// Lock the mapping's pages in memory, as `mlock(2)` does for a DAX
    /// mapping in Linux: every page is faulted in, then locked; pages
    /// mapped again later (after a truncate, a punch or poison) are locked
    /// as they are mapped. Call this rather than `mlock(2)` itself, which
    /// refuses (`ENOMEM`) an unfaulted page: until its first access a page
    /// of a library mapping is an inaccessible reservation.
    pub fn lock(&self) -> Result<()> {
        self.inner.locked.store(true, Ordering::Release);
        self.inner.populate()?;
        // SAFETY: the mapping's own pages; mlock changes no contents.
        let rc = unsafe { libc::mlock(self.as_ptr().cast(), self.len()) };
        if rc != 0 {
            self.inner.locked.store(false, Ordering::Release);
            return Err(self.inner.os_error("lock in memory a DAX mapping of"));
        }
        Ok(())
    }

    /// Undo [`lock`](Self::lock) (`munlock(2)`).
    pub fn unlock(&self) -> Result<()> {
        self.inner.locked.store(false, Ordering::Release);
        // SAFETY: the mapping's own pages; munlock changes no contents.
        let rc = unsafe { libc::munlock(self.as_ptr().cast(), self.len()) };
        if rc != 0 {
            return Err(self.inner.os_error("unlock a DAX mapping of"));
        }
        Ok(())
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the reservation is ours for the mapping's life; the
        // caller of `Fs::mmap` promised no conflicting mutable access.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

impl std::ops::DerefMut for Mapping {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; stores to a read-only mapping fault.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        unregister(&self.inner);
        let (start, len) = self.inner.reservation;
        // SAFETY: the reservation was made by `Fs::mmap` and nothing else
        // refers to it now that it is out of the registry.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
        let ino = self.inner.ino;
        self.inner
            .fs
            .dax_release(&self.inner.dax, ino, Some(&self.inner));
        let _ = self.inner.fs.put_ref(ino, |r: &mut Refs| r.holds -= 1);
    }
}

impl Fs {
    /// The DAX state of `ino`, made on first use (call it under the state
    /// lock: see `check_broken`).
    pub(super) fn file_dax(&self, ino: Ino) -> Arc<FileDax> {
        self.core.dax_used.store(true, Ordering::Release);
        let mut files = self.core.dax.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(files.entry(ino).or_insert_with(|| {
            Arc::new(FileDax {
                index: EntryIndex::new(),
                mappings: Mutex::new(Vec::new()),
                pins: Mutex::new(Vec::new()),
                unpinned: Condvar::new(),
                invalidate: RwLock::new(()),
                breaking: AtomicBool::new(false),
                beyond: AtomicBool::new(false),
            })
        }))
    }

    /// Map `len` bytes of regular file `ino` from `offset` (a multiple of
    /// 4 KiB). The mapping holds the inode (unmount is refused meanwhile).
    /// A shared writable mapping of an immutable or append-only file is
    /// refused (`EPERM`).
    ///
    /// # Safety
    ///
    /// Like any shared mapping of a file (memmap2's contract): while a slice
    /// borrowed from the mapping lives, nothing else (another mapping, a
    /// write, a truncate) may change the bytes it covers.
    pub unsafe fn mmap(
        &self,
        ino: Ino,
        offset: u64,
        len: u64,
        opts: MapOptions,
    ) -> Result<Mapping> {
        if !offset.is_multiple_of(PAGE) || len == 0 {
            return Err(Error::Invalid(
                "mmap offset must be 4 KiB aligned, length not 0",
            ));
        }
        let attr = self.getattr(ino)?;
        if attr.kind != super::FileKind::File {
            return Err(Error::Invalid("only regular files can be mapped"));
        }
        if opts.write && opts.shared {
            // (As a write open: stores could go anywhere in the file.)
            self.may_open_for_write(ino, false)?;
        }
        let pages = len.div_ceil(PAGE);
        let bytes = (pages * PAGE) as usize;
        // Reserve 2 MiB more, to place the start where file offset and
        // address agree modulo 2 MiB.
        let reserve = bytes + HUGE as usize;
        // SAFETY: a new anonymous, inaccessible reservation.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::NoSpace);
        }
        let raw = raw as usize;
        let want = (offset % HUGE) as usize;
        let huge = HUGE as usize;
        let base = (raw + huge - want).next_multiple_of(huge) - huge + want;
        let base = if base < raw { base + huge } else { base };
        // The DAX state is made under the state lock, so that a call that
        // frees blocks (and checks for it under that lock) cannot miss it.
        let dax = {
            let mut st = self.lock()?;
            st.refs.entry(ino).or_default().holds += 1;
            self.file_dax(ino)
        };
        install_handler();
        let inner = Arc::new(Inner {
            fs: self.view(),
            ino,
            dax: Arc::clone(&dax),
            first_page: offset / PAGE,
            pages,
            base,
            reservation: (raw, reserve),
            opts,
            state: (0..pages).map(|_| AtomicU8::new(NONE)).collect(),
            locked: AtomicBool::new(false),
        });
        dax.mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&inner));
        register(&inner);
        let mapping = Mapping { inner };
        if opts.populate {
            mapping.inner.populate()?;
        }
        Ok(mapping)
    }

    /// Before the blocks of file pages `[first, end)` of `ino` change: if
    /// the file has DAX state, take its invalidate lock, unmap the range
    /// from every mapping (the next access faults again) and drop its
    /// entries. Hold the returned guard until the change is done.
    pub(super) fn dax_invalidate<'a>(
        &self,
        dax: &'a Option<Arc<FileDax>>,
        first: u64,
        end: u64,
    ) -> Result<Invalidation<'a>> {
        self.dax_break(dax, first, end, false)
    }

    /// Before a write or fallocate fills holes in `[first, end)`: as
    /// [`dax_invalidate`](Self::dax_invalidate), but only the zero-page
    /// entries go (data entries stay mapped: their blocks do not change).
    pub(super) fn dax_fill_holes<'a>(
        &self,
        dax: &'a Option<Arc<FileDax>>,
        first: u64,
        end: u64,
    ) -> Result<Invalidation<'a>> {
        self.dax_break(dax, first, end, true)
    }

    fn dax_break<'a>(
        &self,
        dax: &'a Option<Arc<FileDax>>,
        first: u64,
        end: u64,
        holes_only: bool,
    ) -> Result<Invalidation<'a>> {
        let Some(dax) = dax.as_ref() else {
            return Ok(None);
        };
        let guard = dax.invalidate.write().unwrap_or_else(|e| e.into_inner());
        dax.breaking.store(true, Ordering::Release);
        let breaking = Breaking { dax, _guard: guard };
        let pinned = (first, end);
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
                guard.erase();
            }
        }
        if !holes_only {
            // The blocks may go: wait until no direct I/O uses them.
            self.wait_for_pins(dax, pinned.0, pinned.1)?;
        }
        Ok(Some(breaking))
    }

    /// Under the state lock, before freeing blocks of `ino`: refuse (with
    /// [`Error::MappedMeanwhile`], which the public calls catch to run
    /// again, breaking the mappings) if the file has DAX state whose mappings the
    /// caller did not break. (Mappings are made under the state lock, so
    /// none can appear between this check and the commit.)
    pub(super) fn check_broken(&self, ino: Ino) -> Result<()> {
        match self.dax_of(ino) {
            Some(dax) if !dax.breaking.load(Ordering::Acquire) => {
                Err(Error::MappedMeanwhile)
            }
            _ => Ok(()),
        }
    }

    /// The DAX state of `ino` if it was ever mapped.
    pub(super) fn dax_of(&self, ino: Ino) -> Option<Arc<FileDax>> {
        // The write path asks on every call: no lock until a file is mapped.
        if !self.core.dax_used.load(Ordering::Acquire) {
            return None;
        }
        let files = self.core.dax.lock().unwrap_or_else(|e| e.into_inner());
        files.get(&ino).cloned()
    }

    /// After a mapping (`gone`) or a pin of file `ino` went: if nothing
    /// else maps or pins the file, write back the dirty entries and forget
    /// its DAX state, so that what a file costs in memory lasts only while
    /// it is mapped or pinned. (A new mapping starts a new state; a call
    /// that was breaking the old one finds the new one when it checks under
    /// the state lock, and runs again.)
    pub(super) fn dax_release(&self, dax: &Arc<FileDax>, ino: Ino, gone: Option<&Inner>) {
        let in_use = |dax: &FileDax| {
            let mapped = live(dax)
                .iter()
                .any(|m| gone.is_none_or(|g| !std::ptr::eq(Arc::as_ptr(m), g)));
            mapped
                || !dax
                    .pins
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
        };
        if in_use(dax) {
            return;
        }
        let _ = self.dax_writeback(dax);
        // Mappings and pins are made under the state lock: none can appear
        // meanwhile.
        let Ok(_st) = self.lock() else { return };
        let mut files = self.core.dax.lock().unwrap_or_else(|e| e.into_inner());
        let current = files.get(&ino).is_some_and(|d| Arc::ptr_eq(d, dax));
        if current && !in_use(dax) && dax.index.find_next_tagged(0, Tag::Dirty).is_none() {
            files.remove(&ino);
        }
    }

    /// How many files have DAX state now (mapped, or being unmapped).
    pub fn dax_files(&self) -> usize {
        self.core
            .dax
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Forget the DAX state of a freed inode (no mapping can hold it: a
    /// mapping holds its inode).
    pub(super) fn dax_forget(&self, ino: Ino) {
        let mut files = self.core.dax.lock().unwrap_or_else(|e| e.into_inner());
        files.remove(&ino);
    }

    /// The fault counters of every mapping so far.
    pub fn dax_stats(&self) -> DaxStats {
        let c = &self.core.dax_counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DaxStats {
            pmd_faults: get(&c.pmd),
            pte_faults: get(&c.pte),
            zero_maps: get(&c.zero),
            fallback_misaligned: get(&c.fallback[Fallback::Misaligned as usize]),
            fallback_past_eof: get(&c.fallback[Fallback::PastEof as usize]),
            fallback_not_huge_extent: get(&c.fallback[Fallback::NotHugeExtent as usize]),
            fallback_pte_in_range: get(&c.fallback[Fallback::PteInRange as usize]),
            fallback_private_write: get(&c.fallback[Fallback::PrivateWrite as usize]),
            fallback_poisoned: get(&c.fallback[Fallback::Poisoned as usize]),
            poisoned_maps: get(&c.poisoned),
            beyond_eof: get(&c.beyond),
        }
    }

    /// Writeback of a file's dirty entries: flush their pages, clear the
    /// tags, and write-protect them in every mapping.
    pub(super) fn dax_writeback(&self, dax: &FileDax) -> Result<()> {
        let mut at = 0;
        while let Some((first, entry)) = dax.index.find_next_tagged(at, Tag::Dirty) {
            let pages = entry.order().pages();
            if let Ok(guard) = dax.index.lock_entry(first, entry.order()) {
                let e = guard.entry();
                if e.is_mapped() {
                    dax.index.set_tag(first, Tag::Towrite);
                    self.core.dev.flush(e.pfn() * PAGE, pages * PAGE)?;
                    dax.index.clear_tag(first, Tag::Dirty);
                    dax.index.clear_tag(first, Tag::Towrite);
                    for m in live(dax) {
                        m.protect(first, pages);
                    }
                }
            }
            at = first + pages;
        }
        self.core.dev.drain();
        Ok(())
    }
}

impl Fs {
    /// Whether device pages `[pfn, pfn + n)` hold poison.
    fn is_poisoned(&self, pfn: u64, n: u64) -> bool {
        self.core.dev.first_poison(pfn * PAGE, n * PAGE).is_some()
    }

    /// Memory failure of file page `fpage` (see `failure`): lock the entry
    /// that covers it (a PMD is split first, so that only this page goes),
    /// make the page inaccessible in every mapping, mark the entry poisoned,
    /// unlock. Returns the addresses where a mapping showed the page, and
    /// whether a PMD entry was split.
    pub(super) fn dax_poison(&self, dax: &FileDax, fpage: u64) -> (Vec<usize>, bool) {
        // Shared, as a fault: no break runs meanwhile.
        let _shared = dax.invalidate.read().unwrap_or_else(|e| e.into_inner());
        let Ok(mut guard) = dax.index.lock_entry(fpage, Order::Pte) else {
            return (Vec::new(), false);
        };
        let mut split = false;
        let entry = guard.entry();
        if entry.order() == Order::Pmd && entry.is_mapped() {
            // The split drops the PMD's tags: write its stores back first.
            if dax.index.get_tag(guard.base(), Tag::Dirty) {
                let _ = self.core.dev.flush(entry.pfn() * PAGE, HUGE);
                self.core.dev.drain();
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

/// Which `SIGBUS` a memory failure raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum McErr {
    /// `BUS_MCEERR_AR`: the thread consumed poison (at a load or store).
    ActionRequired,
    /// `BUS_MCEERR_AO`: early notice to a thread that has the page mapped.
    ActionOptional,
}

/// Where the SIGBUS fields of a `siginfo_t` lie (x86-64 and aarch64:
/// `si_addr` at byte 16, then the 16-bit `si_addr_lsb`), which the `libc`
/// crate does not expose.
const SI_ADDR: usize = 16;
const SI_ADDR_LSB: usize = 24;

/// What a `SIGBUS` says, read from the `siginfo_t` an `SA_SIGINFO` handler
/// gets: the memory-failure fields the `libc` crate has no accessor for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusSignal {
    /// `si_code`: `BUS_MCEERR_AR` (4) for poison consumed, `BUS_MCEERR_AO`
    /// (5) for early notice, `BUS_ADRERR` (2) for a failed page read.
    pub code: i32,
    /// `si_addr`: the address accessed.
    pub addr: usize,
    /// `si_addr_lsb`: log2 of the size lost (12 for a 4 KiB page).
    pub addr_lsb: i16,
}

impl BusSignal {
    /// Read the fields (async-signal-safe: loads only).
    ///
    /// # Safety
    /// `info` points to the `siginfo_t` of a `SIGBUS`, as the kernel passes
    /// it to an `SA_SIGINFO` handler.
    pub unsafe fn read(info: *const libc::siginfo_t) -> BusSignal {
        // SAFETY: the caller's promise; the fields lie inside the 128-byte
        // structure at the offsets above.
        unsafe {
            let raw = info as *const u8;
            BusSignal {
                code: (*info).si_code,
                addr: (raw.add(SI_ADDR) as *const usize).read_unaligned(),
                addr_lsb: (raw.add(SI_ADDR_LSB) as *const i16).read_unaligned(),
            }
        }
    }
}

/// Raise `SIGBUS` to the calling thread as Linux's memory-failure code
/// does: `si_code` `BUS_MCEERR_AR` (poison consumed) or `BUS_MCEERR_AO`
/// (early notice), with `si_addr` and `si_addr_lsb` 12 (a 4 KiB page). As
/// `force_sig` does, an action-required signal that is blocked or ignored
/// kills by default.
pub(super) fn raise_mce(addr: usize, kind: McErr) {
    const BUS_MCEERR_AR: i32 = 4;
    const BUS_MCEERR_AO: i32 = 5;
    // SAFETY: a zeroed siginfo is valid; the fields written are those of
    // the SIGBUS layout (`SI_ADDR`, `SI_ADDR_LSB`), inside the 128-byte
    // structure.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let raw = &mut info as *mut libc::siginfo_t as *mut u8;
        info.si_signo = libc::SIGBUS;
        info.si_code = match kind {
            McErr::ActionRequired => BUS_MCEERR_AR,
            McErr::ActionOptional => BUS_MCEERR_AO,
        };
        (raw.add(SI_ADDR) as *mut usize).write_unaligned(addr);
        (raw.add(SI_ADDR_LSB) as *mut i16).write_unaligned(12);
        if kind == McErr::ActionRequired {
            let mut blocked: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut blocked);
            let mut current: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current);
            if libc::sigismember(&blocked, libc::SIGBUS) == 1
                || current.sa_sigaction == libc::SIG_IGN
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
                let mut only: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut only);
                libc::sigaddset(&mut only, libc::SIGBUS);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
            }
        }
        // The kernel lets a process give a signal a kernel si_code only when
        // it sends it to the calling thread itself.
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            libc::getpid(),
            libc::gettid(),
            libc::SIGBUS,
            &info as *const libc::siginfo_t,
        );
    }
}

fn live(dax: &FileDax) -> Vec<Arc<Inner>> {
    let mut list = dax.mappings.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|m| m.strong_count() > 0);
    list.iter().filter_map(Weak::upgrade).collect()
}

/// Where the blocks of `[page, page + n)` of a file are: one device page
/// frame run, a hole, or something else (partly allocated, not contiguous).
enum Blocks {
    Run(u64),
    Hole,
    Mixed,
}

impl Inner {
    /// Fault in every page not mapped yet (`MAP_POPULATE`).
    fn populate(&self) -> Result<()> {
        for page in 0..self.pages {
            if self.state[page as usize].load(Ordering::Acquire) == NONE {
                self.fault(page, false)?;
            }
        }
        Ok(())
    }

    fn os_error(&self, op: &'static str) -> Error {
        Error::Device(pmem::Error::Io {
            path: self.fs.core.dev.path().to_path_buf(),
            op,
            source: std::io::Error::last_os_error(),
        })
    }

    /// The fault routine: make page `page` of the mapping accessible for a
    /// load, or a store if `write`.
    fn fault(&self, page: u64, write: bool) -> Result<()> {
        let _shared = self
            .dax
            .invalidate
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let fs = &self.fs;
        let counters = &fs.core.dax_counters;
        let fpage = self.first_page + page;
        let size = fs.getattr(self.ino)?.size;
        if fpage * PAGE >= size {
            Counters::count(&counters.beyond);
            return self.map_beyond(page);
        }
        if write && !self.opts.write {
            return Err(Error::Invalid("store to a read-only mapping"));
        }
        let chunk = fpage / PMD_PAGES * PMD_PAGES;
        let fallback =
            if chunk < self.first_page || chunk + PMD_PAGES > self.first_page + self.pages {
                Some(Fallback::Misaligned)
            } else if (chunk + PMD_PAGES) * PAGE > size {
                Some(Fallback::PastEof)
            } else if write && !self.opts.shared {
                Some(Fallback::PrivateWrite)
            } else {
                self.pmd_fault(chunk, write)?
            };
        match fallback {
            None => {
                Counters::count(&counters.pmd);
                Ok(())
            }
            Some(reason) => {
                Counters::count(&counters.fallback[reason as usize]);
                Counters::count(&counters.pte);
                self.pte_fault(fpage, write)
            }
        }
    }

    /// Try a PMD fault for the 2 MiB at file page `chunk`; `Some(reason)`
    /// when it must fall back.
    fn pmd_fault(&self, chunk: u64, write: bool) -> Result<Option<Fallback>> {
        let fs = &self.fs;
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
        let mut blocks = fs.blocks(self.ino, chunk, PMD_PAGES)?;
        if matches!(blocks, Blocks::Hole) && !write {
            if entry.is_empty() {
                guard.set(Entry::zero(Order::Pmd)).ok();
            }
            Counters::count(&fs.core.dax_counters.zero);
            self.map_zero(page, PMD_PAGES)?;
            return Ok(None);
        }
        if matches!(blocks, Blocks::Hole) {
            fs.fallocate_blocks(self.ino, chunk * PAGE, HUGE, true)?;
            blocks = fs.blocks(self.ino, chunk, PMD_PAGES)?;
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

    fn pte_fault(&self, fpage: u64, write: bool) -> Result<()> {
        let fs = &self.fs;
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
                Counters::count(&fs.core.dax_counters.zero);
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
        let mut blocks = fs.blocks(self.ino, fpage, 1)?;
        if matches!(blocks, Blocks::Hole) {
            if !write {
                if entry.is_empty() {
                    guard.set(Entry::zero(Order::Pte)).ok();
                }
                Counters::count(&fs.core.dax_counters.zero);
                return self.map_zero(page, 1);
            }
            fs.fallocate_blocks(self.ino, fpage * PAGE, PAGE, true)?;
            blocks = fs.blocks(self.ino, fpage, 1)?;
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

    fn addr(&self, page: u64) -> *mut libc::c_void {
        (self.base + (page * PAGE) as usize) as *mut libc::c_void
    }

    fn set_state(&self, page: u64, pages: u64, state: u8) {
        for p in page..(page + pages).min(self.pages) {
            self.state[p as usize].store(state, Ordering::Release);
        }
    }

    /// Map device pages `pfn..` at mapping page `page`. Shared writable
    /// mappings get data read-only until a store faults (dirty tracking).
    fn map_data(&self, page: u64, pages: u64, pfn: u64, write: bool) -> Result<()> {
        let prot = if self.opts.write && (write || !self.opts.shared) {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let share = if self.opts.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let fd = self.fs.core.dev.as_fd().as_raw_fd();
        self.map(page, pages, prot, share, fd, pfn * PAGE)?;
        self.set_state(
            page,
            pages,
            if prot & libc::PROT_WRITE != 0 {
                WRITE
            } else {
                READ
            },
        );
        Ok(())
    }

    fn map_zero(&self, page: u64, pages: u64) -> Result<()> {
        self.map(
            page,
            pages,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )?;
        self.set_state(page, pages, ZERO);
        Ok(())
    }

    fn map_anon(&self, page: u64) -> Result<()> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        self.map(
            page,
            1,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )?;
        self.set_state(page, 1, WRITE);
        Ok(())
    }

    fn map_beyond(&self, page: u64) -> Result<()> {
        let fd = sigbus_fd().ok_or(Error::NoSpace)?;
        self.map(page, 1, libc::PROT_READ, libc::MAP_SHARED, fd, 0)?;
        self.set_state(page, 1, BEYOND);
        self.dax.beyond.store(true, Ordering::Release);
        Ok(())
    }

    /// Make page `page` inaccessible because it is poisoned: an access
    /// faults, and the handler raises `SIGBUS` with `BUS_MCEERR_AR`.
    fn map_poison(&self, page: u64) -> Result<()> {
        self.map(
            page,
            1,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )?;
        self.set_state(page, 1, POISON);
        Counters::count(&self.fs.core.dax_counters.poisoned);
        Ok(())
    }

    /// Whether this mapping shows file page `fpage` (mapped from the
    /// device: data read or written), and at which address.
    fn shows(&self, fpage: u64) -> Option<usize> {
        let page = fpage
            .checked_sub(self.first_page)
            .filter(|&p| p < self.pages)?;
        matches!(
            self.state[page as usize].load(Ordering::Acquire),
            READ | WRITE
        )
        .then(|| self.base + (page * PAGE) as usize)
    }

    /// Make the pages shown past the end of the file fault again.
    fn unmap_beyond(&self) {
        for page in 0..self.pages {
            if self.state[page as usize].load(Ordering::Acquire) == BEYOND {
                self.unmap(self.first_page + page, 1);
            }
        }
    }

    fn map(
        &self,
        page: u64,
        pages: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: u64,
    ) -> Result<()> {
        let pages = pages.min(self.pages - page);
        // SAFETY: the range lies inside our reservation (`page + pages` is at
        // most the mapping's page count), which MAP_FIXED replaces.
        let got = unsafe {
            libc::mmap(
                self.addr(page),
                (pages * PAGE) as usize,
                prot,
                flags | libc::MAP_FIXED,
                fd,
                offset as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(self.os_error("map a DAX piece of"));
        }
        if prot != libc::PROT_NONE && self.locked.load(Ordering::Acquire) {
            // Best effort, as for mlock's own population: a page past the
            // end of the file cannot be locked (it raises SIGBUS).
            // SAFETY: the piece just mapped; mlock changes no contents.
            unsafe { libc::mlock(got, (pages * PAGE) as usize) };
        }
        Ok(())
    }

    /// Make file pages `[fpage, fpage + n)` of this mapping inaccessible, so
    /// the next access faults again.
    fn unmap(&self, fpage: u64, n: u64) {
        let start = fpage.max(self.first_page);
        let end = (fpage + n).min(self.first_page + self.pages);
        if start >= end {
            return;
        }
        let page = start - self.first_page;
        let _ = self.map(
            page,
            end - start,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        self.set_state(page, end - start, NONE);
    }

    /// Unmap file pages from every other mapping of the file that shows
    /// them (it would show a stale zero page).
    fn unmap_everywhere(&self, fpage: u64, n: u64) {
        for m in live(&self.dax) {
            if !std::ptr::eq(Arc::as_ptr(&m), self) {
                m.unmap(fpage, n);
            }
        }
    }

    /// Write-protect file pages that writeback cleaned.
    fn protect(&self, fpage: u64, n: u64) {
        if !self.opts.shared || !self.opts.write {
            return;
        }
        let start = fpage.max(self.first_page);
        let end = (fpage + n).min(self.first_page + self.pages);
        for f in start..end {
            let page = f - self.first_page;
            if self.state[page as usize].load(Ordering::Acquire) == WRITE {
                // SAFETY: a page of our reservation, mapped by us.
                unsafe { libc::mprotect(self.addr(page), PAGE as usize, libc::PROT_READ) };
                self.state[page as usize].store(READ, Ordering::Release);
            }
        }
    }
}

impl Fs {
    /// A second handle on the same mounted filesystem (no worker of its own).
    pub(super) fn view(&self) -> Fs {
        Fs {
            core: Arc::clone(&self.core),
            worker: Mutex::new(None),
        }
    }

    /// Where file pages `[page, page + n)` of `ino` live (pages and blocks
    /// are both 4 KiB).
    fn blocks(&self, ino: Ino, page: u64, n: u64) -> Result<Blocks> {
        let mut st = self.lock()?;
        let extents = self.extents(&mut st, ino)?;
        Ok(match super::file::map(extents, page) {
            Some((physical, run)) if run >= n => Blocks::Run(physical),
            Some(_) => Blocks::Mixed,
            None if super::file::next_mapped(extents, page).is_some_and(|b| b < page + n) => {
                Blocks::Mixed
            }
            None => Blocks::Hole,
        })
    }
}

// ---- the fault handler -------------------------------------------------

/// Live mappings, for the handler.
static MAPPINGS: RwLock<Vec<Arc<Inner>>> = RwLock::new(Vec::new());
/// How many there are, read without the lock.
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn register(inner: &Arc<Inner>) {
    let mut list = MAPPINGS.write().unwrap_or_else(|e| e.into_inner());
    list.push(Arc::clone(inner));
    LIVE.store(list.len(), Ordering::Release);
}

fn unregister(inner: &Arc<Inner>) {
    let mut list = MAPPINGS.write().unwrap_or_else(|e| e.into_inner());
    list.retain(|m| !Arc::ptr_eq(m, inner));
    LIVE.store(list.len(), Ordering::Release);
}

/// Whether any of `bytes` lie in a DAX mapping of this process (of any
/// filesystem), whose faults take filesystem locks (see `user`).
pub(super) fn overlaps_mapping(bytes: &[u8]) -> bool {
    if LIVE.load(Ordering::Acquire) == 0 || bytes.is_empty() {
        return false;
    }
    let (start, end) = (
        bytes.as_ptr() as usize,
        bytes.as_ptr() as usize + bytes.len(),
    );
    let list = MAPPINGS.read().unwrap_or_else(|e| e.into_inner());
    list.iter()
        .any(|m| start < m.base + (m.pages * PAGE) as usize && m.base < end)
}

/// The empty memory file whose pages raise SIGBUS.
fn sigbus_fd() -> Option<i32> {
    static FD: OnceLock<Option<OwnedFd>> = OnceLock::new();
    FD.get_or_init(|| {
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"daxfs-beyond-eof".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: a new descriptor that nothing else owns.
        (fd >= 0).then(|| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
    })
    .as_ref()
    .map(|fd| fd.as_raw_fd())
}

static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

fn install_handler() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "default" value; sigaction
        // fills `old` and installs ours, whose handler is async-signal
        // careful as the module docs explain.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as usize;
            // Not SA_ONSTACK: a fault runs the filesystem, far too deep for
            // the small alternate stacks threads keep for stack overflows
            // (a stack overflow then ends in a plain SIGSEGV, without Rust's
            // "stack overflow" message).
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGSEGV, &action, &mut old);
            old
        }
    });
}

extern "C" fn on_fault(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let write = is_write(context);
    let found = {
        let list = MAPPINGS.read().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .find(|m| addr >= m.base && addr < m.base + (m.pages * PAGE) as usize)
            .cloned()
    };
    if let Some(m) = found {
        let page = ((addr - m.base) as u64) / PAGE;
        if m.state[page as usize].load(Ordering::Acquire) == POISON {
            // A load or store of a poisoned page: what the machine check
            // handler sends the thread that consumed poison.
            raise_mce(addr, McErr::ActionRequired);
            return;
        }
        // Where the error code does not tell, a fault on a page shown
        // readable was a store.
        let write = write
            || (!cfg!(target_arch = "x86_64")
                && matches!(m.state[page as usize].load(Ordering::Acquire), READ | ZERO));
        if write && !m.opts.write {
            // A store to a read-only mapping: SIGSEGV, below.
            return deliver(signal, info, context);
        }
        // What `user` keeps: caller memory is never touched under our locks,
        // where this fault would wait for its own thread.
        debug_assert_eq!(
            super::user::locks_held(),
            0,
            "a fault at {addr:#x} under a filesystem lock"
        );
        match m.fault(page, write) {
            Ok(()) => return,
            // A fault that cannot be served (no space, a media error): the
            // access raises SIGBUS, as Linux's VM_FAULT_SIGBUS does.
            Err(_) => {
                if m.map_beyond(page).is_ok() {
                    return;
                }
            }
        }
    }
    deliver(signal, info, context);
}

/// Not ours: whoever was there before, or the default (the access is
/// retried and kills the process).
fn deliver(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if let Some(previous) = PREVIOUS.get() {
        let handler = previous.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // SAFETY: restoring the default disposition; the retried access
            // then takes it.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut());
            }
        } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the previous handler was installed for these arguments.
            let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            f(signal, info, context);
        } else {
            // SAFETY: as above, a plain handler.
            let f: extern "C" fn(i32) = unsafe { std::mem::transmute(handler) };
            f(signal);
        }
    }
}

/// Whether the faulting access was a store (x86-64: bit 1 of the page-fault
/// error code). Elsewhere, unknown: treated as a load, and a store then
/// faults again on the read-only piece.
fn is_write(context: *mut libc::c_void) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the kernel passes a valid ucontext for SA_SIGINFO handlers.
        let ctx = unsafe { &*(context as *const libc::ucontext_t) };
        ctx.uc_mcontext.gregs[libc::REG_ERR as usize] & 2 != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = context;
        false
    }
}
