//! The pieces of a mapping: an inaccessible reservation, placed so that
//! 2 MiB-aligned file offsets fall on 2 MiB-aligned addresses, filled with
//! `MAP_FIXED` mappings of device pages, the zero page, anonymous memory,
//! a page that raises `SIGBUS`, or nothing (the next access faults). Each
//! page's state says which.

use super::{live, DaxCounters, Inner, HUGE, PAGE};
use crate::error::{Error, Result};
use pmem::Reservation;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

/// Address space for a mapping of `pages` pages from file offset
/// `offset`, inaccessible until pieces fill it, placed so that 2 MiB-aligned
/// file offsets fall on 2 MiB-aligned addresses (a PMD piece can then be a
/// huge page). Released when dropped.
pub(super) fn reserve(pages: u64, offset: u64) -> Result<Reservation> {
    Reservation::new(
        (pages * PAGE) as usize,
        HUGE as usize,
        (offset % HUGE) as usize,
    )
    .map_err(|_| Error::NoSpace)
}

/// Address space for a mapping of `pages` pages at `addr` itself, replacing
/// what was there (`MAP_FIXED`); PMD pieces go only where a 2 MiB-aligned
/// file offset falls on a 2 MiB-aligned address.
///
/// # Safety
/// The caller gives up whatever `[addr, addr + pages * 4 KiB)` held.
pub(super) unsafe fn reserve_at(addr: usize, pages: u64) -> Result<Reservation> {
    if !addr.is_multiple_of(PAGE as usize) {
        return Err(Error::Invalid(
            "a fixed mapping address must be page aligned",
        ));
    }
    // SAFETY: forwarded from the caller.
    unsafe { Reservation::fixed(addr, (pages * PAGE) as usize) }.map_err(|_| Error::NoSpace)
}

/// What a page of a mapping shows now.
pub(super) const NONE: u8 = 0;
pub(super) const ZERO: u8 = 1;
pub(super) const READ: u8 = 2;
pub(super) const WRITE: u8 = 3;
pub(super) const BEYOND: u8 = 4;
pub(super) const POISON: u8 = 5;
/// Withdrawn by its owner ([`Mapping::withdraw`](super::Mapping::withdraw)):
/// inaccessible for good; an access is `SIGSEGV`, and nothing maps it again.
pub(super) const GONE: u8 = 6;

impl Inner {
    pub(super) fn addr(&self, page: u64) -> *mut libc::c_void {
        (self.base + (page * PAGE) as usize) as *mut libc::c_void
    }

    pub(super) fn set_state(&self, page: u64, pages: u64, state: u8) {
        for p in page..(page + pages).min(self.pages) {
            // (A withdrawn page stays withdrawn.)
            let _ = self.state[p as usize].fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != GONE).then_some(state)
            });
        }
    }

    /// Whether any page of mapping pages `[page, page + n)` is withdrawn
    /// (a look at one flag on the fault path, unless some page ever was).
    pub(super) fn any_gone(&self, page: u64, n: u64) -> bool {
        self.withdrawn.load(Ordering::Acquire)
            && (page..(page + n).min(self.pages))
                .any(|p| self.state[p as usize].load(Ordering::Acquire) == GONE)
    }

    /// Map device pages `pfn..` at mapping page `page`. Shared writable
    /// mappings get data read-only until a store faults (dirty tracking).
    pub(super) fn map_data(&self, page: u64, pages: u64, pfn: u64, write: bool) -> Result<()> {
        let prot = if self.writable() && (write || !self.opts.shared) {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let share = if self.opts.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let fd = self.layout.device().fd().as_raw_fd();
        // The kernel maps the piece's 4 KiB pages one fault at a time (a
        // PMD piece is 512 of them over an emulated device): populate them
        // now, in one call, as one PMD entry would be. Not a writable
        // private piece, whose population would copy every page.
        let populate = match self.opts.shared || prot & libc::PROT_WRITE == 0 {
            true => libc::MAP_POPULATE,
            false => 0,
        };
        self.map(page, pages, prot, share | populate, fd, pfn * PAGE)?;
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

    pub(super) fn map_zero(&self, page: u64, pages: u64) -> Result<()> {
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

    pub(super) fn map_anon(&self, page: u64) -> Result<()> {
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

    pub(super) fn map_beyond(&self, page: u64) -> Result<()> {
        let fd = sigbus_fd().ok_or(Error::NoSpace)?;
        self.map(page, 1, libc::PROT_READ, libc::MAP_SHARED, fd, 0)?;
        self.set_state(page, 1, BEYOND);
        self.dax.beyond.store(true, Ordering::Release);
        Ok(())
    }

    /// Make page `page` inaccessible because it is poisoned: an access
    /// faults, and the handler raises `SIGBUS` with `BUS_MCEERR_AR`.
    pub(super) fn map_poison(&self, page: u64) -> Result<()> {
        self.map(
            page,
            1,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )?;
        self.set_state(page, 1, POISON);
        DaxCounters::count(&self.layout.counters().poisoned);
        Ok(())
    }

    /// Whether this mapping shows file page `fpage` (mapped from the
    /// device: data read or written), and at which address.
    pub(super) fn shows(&self, fpage: u64) -> Option<usize> {
        let page = fpage
            .checked_sub(self.first_page)
            .filter(|&p| p < self.pages)?;
        matches!(
            self.state[page as usize].load(Ordering::Acquire),
            READ | WRITE
        )
        .then(|| self.base + (page * PAGE) as usize)
    }

    /// Whether this mapping shows all of file pages `[fpage, fpage + n)`
    /// from the device, and at which address.
    pub(super) fn shows_all(&self, fpage: u64, n: u64) -> Option<usize> {
        let page = fpage.checked_sub(self.first_page)?;
        if page + n > self.pages {
            return None;
        }
        let shown = |p: u64| matches!(self.state[p as usize].load(Ordering::Acquire), READ | WRITE);
        (shown(page) && shown(page + n - 1)).then(|| self.base + (page * PAGE) as usize)
    }

    /// Make the pages shown past the end of the file fault again.
    pub(super) fn unmap_beyond(&self) {
        for page in 0..self.pages {
            if self.state[page as usize].load(Ordering::Acquire) == BEYOND {
                self.unmap(self.first_page + page, 1);
            }
        }
    }

    pub(super) fn map(
        &self,
        page: u64,
        pages: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: u64,
    ) -> Result<()> {
        let pages = pages.min(self.pages - page);
        // The system call itself, not libc's `mmap`: a library that
        // interposes that (the preload) must never take our pieces for a
        // program's mappings.
        // SAFETY: the range lies inside our reservation (`page + pages` is at
        // most the mapping's page count), which MAP_FIXED replaces.
        let got = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                self.addr(page),
                (pages * PAGE) as usize,
                prot,
                flags | libc::MAP_FIXED,
                fd,
                offset as libc::off_t,
            ) as *mut libc::c_void
        };
        if got == libc::MAP_FAILED {
            return Err(self.os_error("map a DAX piece of"));
        }
        if prot != libc::PROT_NONE && self.locked.load(Ordering::Acquire) {
            // Best effort, as for mlock's own population: a page past the
            // end of the file cannot be locked (it raises SIGBUS).
            // SAFETY: the piece just mapped; mlock changes no contents.
            unsafe { libc::syscall(libc::SYS_mlock, got, (pages * PAGE) as usize) };
        }
        Ok(())
    }

    /// Make file pages `[fpage, fpage + n)` of this mapping inaccessible, so
    /// the next access faults again.
    pub(super) fn unmap(&self, fpage: u64, n: u64) {
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
    pub(super) fn unmap_everywhere(&self, fpage: u64, n: u64) {
        for m in live(&self.dax) {
            if !std::ptr::eq(Arc::as_ptr(&m), self) {
                m.unmap(fpage, n);
            }
        }
    }

    /// Whether stores are allowed now.
    pub(super) fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Make the pages of `[first, end)` of the mapping that are mapped
    /// writable read-only (the next store faults): one call per run of
    /// them, so a 2 MiB piece stays one mapping (as Linux write-protects a
    /// PMD entry whole).
    pub(super) fn write_protect(&self, first: u64, end: u64) {
        let end = end.min(self.pages);
        let writable = |p: u64| self.state[p as usize].load(Ordering::Acquire) == WRITE;
        let mut page = first;
        while page < end {
            if !writable(page) {
                page += 1;
                continue;
            }
            let run = (page..end).take_while(|&p| writable(p)).count() as u64;
            // SAFETY: pages of our reservation, mapped by us. (The system
            // call itself, as in `map`.)
            unsafe {
                libc::syscall(
                    libc::SYS_mprotect,
                    self.addr(page),
                    (run * PAGE) as usize,
                    libc::PROT_READ,
                )
            };
            self.set_state(page, run, READ);
            page += run;
        }
    }

    /// Write-protect file pages that writeback cleaned.
    pub(super) fn protect(&self, fpage: u64, n: u64) {
        if !self.opts.shared || !self.writable() {
            return;
        }
        let start = fpage.max(self.first_page);
        let end = (fpage + n).min(self.first_page + self.pages);
        if start < end {
            self.write_protect(start - self.first_page, end - self.first_page);
        }
    }
}

/// The empty memory file whose pages raise SIGBUS.
pub(super) fn sigbus_fd() -> Option<i32> {
    static FD: OnceLock<Option<OwnedFd>> = OnceLock::new();
    FD.get_or_init(|| pmem::sigbus_file(c"daxfs-beyond-eof").ok())
        .as_ref()
        .map(|fd| fd.as_raw_fd())
}
