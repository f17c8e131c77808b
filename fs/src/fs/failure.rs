//! Memory failure: what the filesystem does when a page of the device is
//! found poisoned (Linux's `memory_failure` with fsdax's
//! `dax_notify_failure` and `mf_dax_kill_procs`).
//!
//! [`Fs::memory_failure`] runs on injection ([`Fs::inject_poison`], `daxfs
//! inject-error` on a live mount), and on poison a read or a scrub finds:
//!
//! * it finds the owner of the page ([`Owner`]): files that are mapped or
//!   pinned are searched first (they are the ones whose users must hear at
//!   once), then every inode's extents;
//! * for a file page: the entry that covers it is locked (a PMD entry is
//!   split into PTE entries first, so only the poisoned 4 KiB becomes
//!   inaccessible and the lock released is the one of the entry now
//!   covering the page), the page is made inaccessible in every mapping,
//!   the entry is marked poisoned and unlocked. A later access raises
//!   `SIGBUS` with `BUS_MCEERR_AR`, `si_addr` and `si_addr_lsb` 12 in the
//!   accessing thread; `read` gives `EIO`. A thread that asked for early
//!   notice (`prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY)`) and
//!   runs the memory failure (an injection, a read, a scrub) gets
//!   `BUS_MCEERR_AO` at once for each mapping that showed the page. (Linux
//!   sends it to whichever thread asked; a process may give a signal a
//!   kernel `si_code` only for itself, so here it is the thread that finds
//!   the failure.)
//! * free space: the block is kept out of allocation until the poison is
//!   cleared ([`Fs::clear_poison`]; also at mount for poison found then);
//! * metadata: an inode whose inode-table slot, extent list or xattr block
//!   is hit is never changed again (calls get `EIO` naming it); a change
//!   that would write a poisoned page of a filesystem-wide structure (the
//!   bitmap, the superblocks, the state block) is refused with `EIO` naming
//!   it, and a poisoned journal refuses every change (XFS shuts down
//!   instead), until the poison is cleared; reads go on; fsck reports them.
//!   (A cleared sector reads as zeros: a bitmap sector that marks metadata
//!   blocks free is corrected in memory, written back by the next change,
//!   and reported by fsck.)
//!
//! Handlers registered with [`Fs::on_memory_failure`] learn of every
//! failure (which file and offset were lost): the FUSE daemon drops the
//! kernel's cached pages of the range there.
//!
//! A write that covers the whole poisoned range clears the poison, drops
//! the poisoned entries and lets the page be mapped again. Punching a hole
//! does not clear it; a later allocation of the block writes it whole
//! first (it zeroes every block it hands out).

use super::{Fs, Ino, Owner, State};
use crate::error::{Error, Result};
use crate::format::{BLOCK, INODE_SIZE};
use std::sync::Arc;

const PAGE: u64 = 4096;

/// What memory failure found and did for one poisoned page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryFailure {
    /// Device offset of the poisoned page (4 KiB aligned).
    pub offset: u64,
    /// What the page held.
    pub owner: Owner,
    /// Addresses in this process where a DAX mapping showed the page (each
    /// now raises `SIGBUS` on access).
    pub mapped_at: Vec<usize>,
    /// Whether a PMD (2 MiB) entry was split to isolate the page.
    pub split: bool,
}

/// A function told of every memory failure.
pub type FailureHandler = Arc<dyn Fn(&MemoryFailure) + Send + Sync>;

impl Fs {
    /// Handle poison in the page holding device offset `offset` (see the
    /// module docs). Safe to call more than once for a page.
    pub fn memory_failure(&self, offset: u64) -> Result<MemoryFailure> {
        if offset >= self.core.dev.size() {
            return Err(Error::Invalid("offset is outside the device"));
        }
        let page = offset / PAGE * PAGE;
        let owner = self.owner_for_failure(page)?;
        let mut failure = MemoryFailure {
            offset: page,
            owner: owner.clone(),
            mapped_at: Vec::new(),
            split: false,
        };
        match owner {
            Owner::File { ino, offset: at } => {
                if let Some(dax) = self.dax_of(ino) {
                    let (shown, split) = self.dax_poison(&dax, at / PAGE);
                    failure.mapped_at = shown;
                    failure.split = split;
                }
            }
            Owner::Free => {
                let mut st = self.lock()?;
                st.alloc.quarantine(page / BLOCK);
            }
            Owner::FileMetadata { ino, .. } => {
                self.lock()?.damaged.insert(ino);
            }
            Owner::Metadata(_) => {
                self.damage_area(&mut *self.lock()?, page);
                let sb = &self.core.sb;
                let table = sb.inode_table_start * BLOCK;
                let table_end = table + sb.inode_table_blocks * BLOCK;
                if (table..table_end).contains(&page) {
                    // Every inode whose slot lies in a poisoned sector.
                    let sector = pmem::SECTOR;
                    let mut st = self.lock()?;
                    for at in (page..page + PAGE).step_by(sector as usize) {
                        if self.core.dev.first_poison(at, sector).is_some() {
                            let first = (at - table) / INODE_SIZE + 1;
                            let last = (at + sector - table) / INODE_SIZE;
                            st.damaged.extend(first..=last);
                        }
                    }
                }
            }
        }
        super::dax::early_notice(&failure.mapped_at);
        self.core
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(failure.clone());
        let handlers: Vec<FailureHandler> = self
            .core
            .failure_handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for handler in handlers {
            handler(&failure);
        }
        Ok(failure)
    }

    /// Poison `[offset, offset + len)` of the device (whole 512-byte
    /// sectors) and run memory failure for every page it touches.
    pub fn inject_poison(&self, offset: u64, len: u64) -> Result<Vec<MemoryFailure>> {
        self.core.dev.inject(offset, len)?;
        let first = offset / PAGE;
        let end = (offset + len.max(1)).div_ceil(PAGE);
        (first..end)
            .map(|page| self.memory_failure(page * PAGE))
            .collect()
    }

    /// Clear the poison of `[offset, offset + len)` (whole sectors, which
    /// then read as zeros): quarantined free blocks go back to the
    /// allocator, and mappings of the pages fault again.
    pub fn clear_poison(&self, offset: u64, len: u64) -> Result<()> {
        self.core.dev.clear(offset, len)?;
        let first = offset / PAGE;
        let end = (offset + len).div_ceil(PAGE);
        {
            let mut st = self.lock()?;
            st.alloc
                .release(first * PAGE / BLOCK, (end - first) * PAGE / BLOCK);
            let dev = &self.core.dev;
            st.damaged_areas
                .retain(|a| dev.first_poison(a.start, a.end - a.start).is_some());
        }
        for page in first..end {
            if self.core.dev.first_poison(page * PAGE, PAGE).is_some() {
                continue; // another sector of the page is still poisoned
            }
            if let Ok(Owner::File { ino, offset: at }) = self.owner_for_failure(page * PAGE) {
                let dax = self.dax_of(ino);
                // Drops the poisoned entry; the next access maps the page.
                drop(self.dax_fill_holes(&dax, at / PAGE, at / PAGE + 1)?);
            }
        }
        self.core
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|f| f.offset / PAGE < first || f.offset / PAGE >= end);
        Ok(())
    }

    /// If the page at device offset `page` belongs to a filesystem-wide
    /// structure, refuse changes that write it (see `State::damaged_areas`).
    pub(super) fn damage_area(&self, st: &mut State, page: u64) {
        let page = page / PAGE * PAGE;
        if let Some(area) = super::owner::metadata_area(&self.core.sb, page) {
            let damaged = super::owner::Area {
                start: area.start.max(page),
                end: area.end.min(page + PAGE),
                ..area
            };
            if !st.damaged_areas.contains(&damaged) {
                st.damaged_areas.push(damaged);
            }
        }
    }

    /// Tell `handler` of every memory failure from now on.
    pub fn on_memory_failure(&self, handler: FailureHandler) {
        self.core
            .failure_handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handler);
    }

    /// The memory failures handled so far whose poison is still there (a
    /// covering write or [`Fs::clear_poison`] ends one).
    pub fn memory_failures(&self) -> Vec<MemoryFailure> {
        let mut failures = self.core.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.retain(|f| self.core.dev.first_poison(f.offset, PAGE).is_some());
        failures.clone()
    }

    /// Read the whole device as an address-range scrub does and run memory
    /// failure for every poisoned page not handled yet. Returns the pages.
    pub fn scrub(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<Vec<MemoryFailure>> {
        let report = self.core.dev.scrub(progress)?;
        Ok(self.poison_found_in(&report.poisoned))
    }

    /// Run memory failure for every page of `ranges` not handled yet (for
    /// a caller that read the device's poison list itself).
    pub fn poison_found_in(&self, ranges: &[pmem::BadRange]) -> Vec<MemoryFailure> {
        ranges
            .iter()
            .flat_map(|r| r.offset() / PAGE..(r.offset() + r.len()).div_ceil(PAGE))
            .filter_map(|page| self.poison_found(page * PAGE))
            .collect()
    }

    /// Poison found at `offset` (by a read, a scrub, or outside the
    /// library): run memory failure unless the page was handled already.
    pub fn poison_found(&self, offset: u64) -> Option<MemoryFailure> {
        let page = offset / PAGE * PAGE;
        let known = self.memory_failures().iter().any(|f| f.offset == page);
        if known {
            return None;
        }
        self.memory_failure(page).ok()
    }

    /// The owner of a page, files with DAX state (mapped or pinned) first.
    fn owner_for_failure(&self, offset: u64) -> Result<Owner> {
        let candidates: Vec<Ino> = {
            let files = self.dax_table();
            files.keys().copied().collect()
        };
        for ino in candidates {
            let Ok(extents) = self.file_extents(ino) else {
                continue;
            };
            if let Some(e) = extents
                .iter()
                .find(|e| (e.device_offset..e.device_offset + e.len).contains(&offset))
            {
                return Ok(Owner::File {
                    ino,
                    offset: e.file_offset + (offset - e.device_offset),
                });
            }
        }
        self.owner_of(offset)
    }
}
