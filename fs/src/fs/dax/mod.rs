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
//!
//! ## Where each piece lives
//!
//! * `layout`: the [`Layout`] interface through which faults reach the
//!   file (size, block map, allocation, poison, release), and its
//!   in-process implementation (a hold on the inode of an [`Fs`]);
//! * `fault`: the fault routine (PMD faults, PTE faults and fallbacks),
//!   written against [`Layout`] alone;
//! * `pieces`: the reservation and the `MAP_FIXED` pieces that fill it;
//! * `invalidate`: the invalidate protocol (breaking mappings before blocks
//!   change, writeback, memory failure of one page);
//! * `signal`: the `SIGSEGV` handler and its registry of live mappings, and
//!   the `SIGBUS` encoding of memory failures;
//! * `trace`: the fault trace, one event per fault in the kernel's shape.

mod fault;
mod invalidate;
mod layout;
mod pieces;
mod signal;
mod trace;

pub use invalidate::Breaking;
use layout::FileLayout;
pub use layout::{Blocks, DevicePages, Layout};
pub(super) use signal::overlaps_mapping;
pub use signal::{early_notice, BusSignal};
use signal::{install_handler, register, unregister};
pub use trace::{FaultEvent, FaultResult, FaultSize, TraceSink};

use super::user::Counted;
use super::{Fs, HashMap, Ino, InodeRef, State};
use crate::error::{Error, Result};
use crate::index::{EntryIndex, Tag, PMD_PAGES};
use pieces::NONE;
use pmem::Reservation;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, Weak};

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

/// Where a filesystem (or a client of one) counts its faults.
#[derive(Debug, Default)]
pub struct DaxCounters {
    pmd: AtomicU64,
    pte: AtomicU64,
    zero: AtomicU64,
    fallback: [AtomicU64; 6],
    beyond: AtomicU64,
    poisoned: AtomicU64,
    trace: trace::Tracer,
}

impl DaxCounters {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Send an event for every fault counted here from now on to `sink`
    /// (`None`: stop). See [`FaultEvent`].
    pub fn set_trace(&self, sink: Option<TraceSink>) {
        self.trace.set(sink);
    }

    /// The counts so far.
    pub fn stats(&self) -> DaxStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DaxStats {
            pmd_faults: get(&self.pmd),
            pte_faults: get(&self.pte),
            zero_maps: get(&self.zero),
            fallback_misaligned: get(&self.fallback[Fallback::Misaligned as usize]),
            fallback_past_eof: get(&self.fallback[Fallback::PastEof as usize]),
            fallback_not_huge_extent: get(&self.fallback[Fallback::NotHugeExtent as usize]),
            fallback_pte_in_range: get(&self.fallback[Fallback::PteInRange as usize]),
            fallback_private_write: get(&self.fallback[Fallback::PrivateWrite as usize]),
            fallback_poisoned: get(&self.fallback[Fallback::Poisoned as usize]),
            poisoned_maps: get(&self.poisoned),
            beyond_eof: get(&self.beyond),
        }
    }
}

/// The DAX state of one file in one process: its entry index and its live
/// mappings. A filesystem keeps one per mapped or pinned file; a client
/// that maps files of a filesystem in another process keeps its own.
pub struct FileDax {
    index: EntryIndex,
    mappings: Mutex<Vec<Weak<Inner>>>,
    /// File page ranges pinned for direct I/O or leased (see `layout`).
    pub(super) pins: Mutex<Vec<super::layout::PinSlot>>,
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

/// A DAX mapping of a file. Dereferences to its bytes; unmapped on drop.
pub struct Mapping {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    dax: Arc<FileDax>,
    /// File page of the mapping's first byte.
    first_page: u64,
    pages: u64,
    /// Address of the first byte.
    base: usize,
    /// The address space the pieces fill, released when the last user of
    /// the mapping goes (so no piece is ever mapped over a released range).
    _reservation: Reservation,
    opts: MapOptions,
    state: Box<[AtomicU8]>,
    /// Locked in memory ([`Mapping::lock`]): pieces mapped later are too.
    locked: AtomicBool,
    /// Stores allowed now (`opts.write`, until [`Mapping::set_writable`]).
    writable: AtomicBool,
    /// Whether some page was withdrawn ([`Mapping::withdraw`]).
    withdrawn: AtomicBool,
    /// The file, as the fault routine sees it. Declared last, so dropped
    /// after the address space: what it holds keeps the file's blocks
    /// alive, and none may be reused while a piece could still show them.
    layout: Box<dyn Layout>,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("offset", &(self.inner.first_page * PAGE))
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

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
        let dev = self.inner.layout.device();
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
        self.inner.dax.writeback(self.inner.layout.device())
    }

    /// Whether stores are allowed now.
    pub fn writable(&self) -> bool {
        self.inner.writable()
    }

    /// Allow or refuse stores from now on (`mprotect(2)` of the whole
    /// mapping between `PROT_READ` and `PROT_READ | PROT_WRITE`): refused,
    /// pages mapped writable become read-only, and a store raises
    /// `SIGSEGV`; allowed again, a store faults and maps the page writable
    /// (and, shared, tags it dirty). Whether the file may be written is the
    /// caller's to check (a program's descriptor, for the kernel).
    pub fn set_writable(&self, writable: bool) {
        let inner = &self.inner;
        inner.writable.store(writable, Ordering::Release);
        if !writable {
            inner.write_protect(0, inner.pages);
        }
    }

    /// Show now, without faulting, what `from` (a mapping of the same file
    /// in this process) shows of the same file pages: `mremap(2)` moves
    /// page table entries, so the pages it moves do not fault again.
    pub fn inherit(&self, from: &Mapping) {
        let (me, src) = (&self.inner, &from.inner);
        if !Arc::ptr_eq(&me.dax, &src.dax) {
            return;
        }
        // No break meanwhile; the entry lock against memory failure.
        let _shared = me.dax.shared();
        for page in 0..me.pages {
            let fpage = me.first_page + page;
            let Some(shown) = fpage
                .checked_sub(src.first_page)
                .filter(|&p| p < src.pages)
                .map(|p| src.state[p as usize].load(Ordering::Acquire))
                .filter(|&s| matches!(s, pieces::READ | pieces::WRITE))
            else {
                continue;
            };
            let Ok(guard) = me.dax.index.lock_entry(fpage, crate::index::Order::Pte) else {
                continue;
            };
            let _held = super::user::Held::new();
            let e = guard.entry();
            if e.is_mapped() && !e.is_poisoned() {
                let pfn = e.pfn() + (fpage - e.order().align(fpage));
                let _ = me.map_data(page, 1, pfn, shown == pieces::WRITE);
            }
        }
    }

    /// Withdraw `[offset, offset + len)` of the mapping (page aligned), as
    /// `munmap(2)` of part of a mapping does: its pages become inaccessible
    /// for good (an access raises `SIGSEGV`) and are never mapped again.
    /// The address space stays reserved until the whole mapping goes (so
    /// that no piece of ours can ever land on someone else's mapping
    /// there). Whether every page of the mapping is withdrawn now.
    pub fn withdraw(&self, offset: usize, len: usize) -> bool {
        let inner = &self.inner;
        let first = (offset as u64) / PAGE;
        let end = ((offset + len) as u64).div_ceil(PAGE).min(inner.pages);
        if first < end {
            // No fault of the file in flight meanwhile (one that looked
            // before the pages were withdrawn could map them again).
            let _exclusive = Counted::new(
                inner
                    .dax
                    .invalidate
                    .write()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            inner.withdrawn.store(true, Ordering::Release);
            for page in first..end {
                inner.state[page as usize].store(pieces::GONE, Ordering::Release);
            }
            let _ = inner.map(
                first,
                end - first,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
        }
        inner
            .state
            .iter()
            .all(|s| s.load(Ordering::Acquire) == pieces::GONE)
    }

    /// Fault in the pages of `[offset, offset + len)` of the mapping as
    /// accesses would (stores if `write`), for a caller that hands them to
    /// the kernel: a system call's buffer in a mapping of ours is refused
    /// (`EFAULT`) where its pages are not mapped yet, since the kernel
    /// does not take our faults (it would fault them in itself for a
    /// kernel DAX mapping). Pages that raise `SIGBUS` stay as they are.
    pub fn fault_in(&self, offset: usize, len: usize, write: bool) -> Result<()> {
        let first = (offset as u64) / PAGE;
        let end = ((offset + len) as u64).div_ceil(PAGE);
        self.inner.fault_in(first, end, write)
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
        // SAFETY: the mapping's own pages; mlock changes no contents. (The
        // system call itself: see `pieces::map`.)
        let rc = unsafe { libc::syscall(libc::SYS_mlock, self.as_ptr(), self.len()) };
        if rc != 0 {
            self.inner.locked.store(false, Ordering::Release);
            return Err(self.inner.os_error("lock in memory a DAX mapping of"));
        }
        Ok(())
    }

    /// Undo [`lock`](Self::lock) (`munlock(2)`).
    pub fn unlock(&self) -> Result<()> {
        self.inner.locked.store(false, Ordering::Release);
        // SAFETY: the mapping's own pages; munlock changes no contents. (The
        // system call itself: see `pieces::map`.)
        let rc = unsafe { libc::syscall(libc::SYS_munlock, self.as_ptr(), self.len()) };
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
        // Out of the handler's sight first; the address space goes with the
        // last reference to `Inner`.
        unregister(&self.inner);
        let inner = &self.inner;
        inner
            .dax
            .mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|m| !std::ptr::eq(m.as_ptr(), Arc::as_ptr(inner)));
        // The last user of the file writes its stores back through its own
        // pages, still shown here (see `DevicePages::flush_shown`).
        if !inner.dax.in_use() && inner.dax.is_dirty() {
            let _ = inner
                .dax
                .writeback_through(inner.layout.device(), Some(inner));
        }
        inner.layout.release(&inner.dax);
    }
}

impl FileDax {
    /// The DAX state of a file not mapped yet in this process.
    pub fn new() -> Arc<FileDax> {
        Arc::new(FileDax {
            index: EntryIndex::new(),
            mappings: Mutex::new(Vec::new()),
            pins: Mutex::new(Vec::new()),
            unpinned: Condvar::new(),
            invalidate: RwLock::new(()),
            breaking: AtomicBool::new(false),
            beyond: AtomicBool::new(false),
        })
    }

    /// Whether a mapping or a pin uses the file.
    pub fn in_use(&self) -> bool {
        !live(self).is_empty()
            || !self
                .pins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }

    /// The device pages file pages `[first, end)` show in this process's
    /// mappings now, as `(first file page, pfn, pages)` runs (one per
    /// entry). A client checks them against a fresh layout after `fork`.
    pub fn mapped(&self, first: u64, end: u64) -> Vec<(u64, u64, u64)> {
        self.index
            .range(first..end)
            .filter(|(_, e)| e.is_mapped())
            .map(|(at, e)| (at, e.pfn(), e.order().pages()))
            .collect()
    }

    /// Whether some entry is tagged dirty (stores not written back).
    pub fn is_dirty(&self) -> bool {
        self.index.find_next_tagged(0, Tag::Dirty).is_some()
    }
}

fn check_range(offset: u64, len: u64) -> Result<()> {
    match offset.is_multiple_of(PAGE) && len > 0 {
        true => Ok(()),
        false => Err(Error::Invalid(
            "mmap offset must be 4 KiB aligned, length not 0",
        )),
    }
}

/// Map `len` bytes of the file whose layout is `layout` and whose DAX
/// state in this process is `file`, from `offset` (a multiple of 4 KiB),
/// faulting through `layout` (see the module docs). [`Fs::mmap`] is this
/// with an in-process layout; a client of a filesystem in another process
/// brings its own.
///
/// # Safety
///
/// As [`Fs::mmap`].
pub unsafe fn map(
    layout: Box<dyn Layout>,
    file: Arc<FileDax>,
    offset: u64,
    len: u64,
    opts: MapOptions,
) -> Result<Mapping> {
    // SAFETY: no fixed place: nothing is replaced.
    unsafe { map_at(None, layout, file, offset, len, opts) }
}

/// [`map`], at `addr` if given (page aligned), replacing what was mapped
/// there, as `MAP_FIXED` does.
///
/// # Safety
///
/// As [`Fs::mmap`]; and whatever `[addr, addr + len)` held is gone, which
/// the caller gives up (a program that asks for `MAP_FIXED` does).
pub unsafe fn map_at(
    addr: Option<usize>,
    layout: Box<dyn Layout>,
    file: Arc<FileDax>,
    offset: u64,
    len: u64,
    opts: MapOptions,
) -> Result<Mapping> {
    check_range(offset, len)?;
    let pages = len.div_ceil(PAGE);
    let reservation = match addr {
        None => pieces::reserve(pages, offset)?,
        // SAFETY: forwarded from the caller.
        Some(addr) => unsafe { pieces::reserve_at(addr, pages) }?,
    };
    install_handler();
    let inner = Arc::new(Inner {
        dax: Arc::clone(&file),
        first_page: offset / PAGE,
        pages,
        base: reservation.spot(),
        _reservation: reservation,
        opts,
        state: (0..pages).map(|_| AtomicU8::new(NONE)).collect(),
        locked: AtomicBool::new(false),
        writable: AtomicBool::new(opts.write),
        withdrawn: AtomicBool::new(false),
        layout,
    });
    file.mappings
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

impl Fs {
    /// The DAX state of `ino`, made on first use, under the state lock
    /// (`_locked` says the caller holds it: see `check_broken`).
    pub(super) fn file_dax(&self, _locked: &mut State, ino: Ino) -> Arc<FileDax> {
        self.core.dax_used.store(true, Ordering::Release);
        let mut files = self.dax_table();
        Arc::clone(files.entry(ino).or_insert_with(FileDax::new))
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
        check_range(offset, len)?;
        let attr = self.getattr(ino)?;
        if attr.kind != super::FileKind::File {
            return Err(Error::Invalid("only regular files can be mapped"));
        }
        if opts.write && opts.shared {
            // (As a write open: stores could go anywhere in the file.)
            self.may_open_for_write(ino, false)?;
        }
        // The DAX state is made under the state lock, so that a call that
        // frees blocks (and checks for it under that lock) cannot miss it.
        let (dax, hold) = {
            let mut st = self.lock()?;
            (
                self.file_dax(&mut st, ino),
                InodeRef::take(self, &mut st, ino),
            )
        };
        map(Box::new(FileLayout(hold)), dax, offset, len, opts)
    }

    /// The table of files with DAX state.
    pub(super) fn dax_table(&self) -> Counted<MutexGuard<'_, HashMap<Ino, Arc<FileDax>>>> {
        Counted::new(self.core.dax.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The DAX state of `ino` if it was ever mapped.
    pub(super) fn dax_of(&self, ino: Ino) -> Option<Arc<FileDax>> {
        // The write path asks on every call: no lock until a file is mapped.
        if !self.core.dax_used.load(Ordering::Acquire) {
            return None;
        }
        let files = self.dax_table();
        files.get(&ino).cloned()
    }

    /// After a mapping or a pin of file `ino` went: if nothing else maps
    /// or pins the file, write back the dirty entries and forget its DAX
    /// state, so that what a file costs in memory lasts only while it is
    /// mapped or pinned. (A new mapping starts a new state; a call that was
    /// breaking the old one finds the new one when it checks under the
    /// state lock, and runs again.)
    pub(super) fn dax_release(&self, dax: &Arc<FileDax>, ino: Ino) {
        if dax.in_use() {
            return;
        }
        let _ = dax.writeback(&self.core.dev);
        // Mappings and pins are made under the state lock: none can appear
        // meanwhile.
        let Ok(_st) = self.lock() else { return };
        let mut files = self.dax_table();
        let current = files.get(&ino).is_some_and(|d| Arc::ptr_eq(d, dax));
        if current && !dax.in_use() && !dax.is_dirty() {
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
        let mut files = self.dax_table();
        files.remove(&ino);
    }

    /// The fault counters of every mapping so far.
    pub fn dax_stats(&self) -> DaxStats {
        self.core.dax_counters.stats()
    }

    /// Send an event for every DAX fault of this filesystem's mappings from
    /// now on to `sink` (`None`: stop), as the kernel's `fs_dax` trace
    /// events do.
    pub fn trace_faults(&self, sink: Option<TraceSink>) {
        self.core.dax_counters.set_trace(sink);
    }
}

impl FileDax {
    /// The invalidate lock held shared, unless a break holds it.
    pub(super) fn try_shared(&self) -> Option<Counted<RwLockReadGuard<'_, ()>>> {
        if self.breaking.load(Ordering::Acquire) {
            return None;
        }
        match self.invalidate.try_read() {
            Ok(guard) => Some(Counted::new(guard)),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(Counted::new(e.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The invalidate lock held shared, as a fault holds it.
    pub(super) fn shared(&self) -> Counted<RwLockReadGuard<'_, ()>> {
        Counted::new(self.invalidate.read().unwrap_or_else(|e| e.into_inner()))
    }
}

fn live(dax: &FileDax) -> Vec<Arc<Inner>> {
    let mut list = dax.mappings.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|m| m.strong_count() > 0);
    list.iter().filter_map(Weak::upgrade).collect()
}

impl Fs {
    /// A second handle on the same mounted filesystem (no worker of its own).
    pub(super) fn view(&self) -> Fs {
        Fs {
            core: Arc::clone(&self.core),
            worker: Mutex::new(None),
        }
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const CHILD: &str = "DAXFS_TEST_FAULT_UNDER";

    /// A fault taken while this thread holds one of our locks would wait
    /// for its own thread. In debug builds the handler says so and the
    /// process dies at once, for every kind of lock; the fault runs in a
    /// child process, which the failed assertion ends.
    #[test]
    fn a_fault_under_any_filesystem_lock_fails_loudly() {
        if let Ok(lock) = std::env::var(CHILD) {
            return fault_under(&lock);
        }
        let me = std::env::current_exe().unwrap();
        for lock in [
            "state",
            "dax table",
            "invalidate shared",
            "invalidate exclusive",
        ] {
            let mut child = Command::new(&me)
                .args([
                    "--exact",
                    "fs::dax::tests::a_fault_under_any_filesystem_lock_fails_loudly",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, lock)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // A watchdog, not synchronisation: a missing check hangs.
            let deadline = Instant::now() + Duration::from_secs(120);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if Instant::now() > deadline {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    panic!("a fault under the {lock} lock hung");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            assert!(!status.success(), "{lock}: {stderr}");
            assert!(
                stderr.contains("under a filesystem lock"),
                "{lock}: {stderr}"
            );
        }
    }

    /// A filesystem on a device in a new directory, with file `/f` of
    /// `len` bytes of 7.
    fn file_of_sevens(len: usize) -> (tempfile::TempDir, Fs, Ino) {
        let dir = tempfile::tempdir().unwrap();
        let dev = pmem::Device::create(
            dir.path().join("img"),
            16 << 20,
            &pmem::DeviceOptions::new(),
        )
        .unwrap();
        let fs = Fs::format(dev).unwrap();
        let ino = fs.create_path("/f", 0o644, true).unwrap().ino;
        fs.write(ino, 0, &vec![7; len]).unwrap();
        (dir, fs, ino)
    }

    /// Whether any mapping of this process covers `[base, base + len)`.
    fn reserved(base: usize, len: usize) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().any(|line| {
            let range = line.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let a = usize::from_str_radix(a, 16).unwrap();
            let b = usize::from_str_radix(b, 16).unwrap();
            a < base + len && base < b
        })
    }

    /// A break (or fault) that found a mapping just before it was dropped
    /// still maps pieces into its address space with `MAP_FIXED`: that
    /// space stays reserved until the last such user is done, never handed
    /// back while a piece could land in it (where it would clobber whatever
    /// the process mapped there meanwhile).
    #[test]
    fn the_address_space_outlives_every_user_of_a_dropped_mapping() {
        let (_dir, fs, ino) = file_of_sevens(16384);
        let opts = MapOptions {
            populate: true,
            ..MapOptions::default()
        };
        // SAFETY: nothing else changes the file while the slice lives.
        let map = unsafe { fs.mmap(ino, 0, 16384, opts) }.unwrap();
        assert_eq!(map[4096], 7);
        let (base, len) = (map.as_ptr() as usize, map.len());
        let dax = fs.dax_of(ino);
        // What a break running beside the drop holds (see `live`).
        let racing = live(dax.as_ref().unwrap());
        assert_eq!(racing.len(), 1);
        drop(map);
        assert!(reserved(base, len), "released under a racing break");
        // The break goes on: its pieces land in the reservation.
        fs.truncate(ino, 4096).unwrap();
        racing[0].unmap(0, 4);
        assert!(reserved(base, len));
        drop(racing);
        assert!(!reserved(base, len), "never released");
    }

    /// In the child: map a file, take `lock`, touch the mapping.
    fn fault_under(lock: &str) {
        let (_dir, fs, ino) = file_of_sevens(8192);
        // SAFETY: loads only, and nothing else changes the file.
        let map = unsafe { fs.mmap(ino, 0, 8192, MapOptions::default()) }.unwrap();
        let dax = fs.dax_of(ino);
        let touch = || {
            // SAFETY: the mapping's first byte, mapped and unfaulted.
            unsafe { std::ptr::read_volatile(map.as_ptr()) }
        };
        match lock {
            "state" => {
                let _st = fs.lock().unwrap();
                touch();
            }
            "dax table" => {
                let _table = fs.dax_table();
                touch();
            }
            "invalidate shared" => {
                let _shared = dax.as_ref().unwrap().shared();
                touch();
            }
            _ => {
                let _breaking = fs.dax_invalidate(&dax, 0, 1).unwrap();
                touch();
            }
        };
        eprintln!("the fault under the {lock} lock went unnoticed");
    }
}
