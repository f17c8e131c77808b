//! The data path: read, write, truncate, fallocate, punch hole.
//!
//! Allocation follows the 2 MiB policy of [`crate::alloc`]: a hole that is a
//! whole aligned 2 MiB chunk of the file gets a whole aligned 2 MiB region
//! when the write (or fallocate) covers the chunk, or when the file is, or
//! becomes, at least 2 MiB long; other holes get small runs. Parts of new
//! blocks that the call does not write are zeroed before the metadata that
//! points at them commits.

use super::extents::{insert_extent, map, next_mapped, remove_range};
use super::{Fs, Ino, Stage, State};
use crate::error::{Error, Result};
use crate::format::{Extent, Time, BLOCK, HUGE_BLOCKS};

pub use crate::format::MAX_FILE_SIZE;

/// What [`Fs::seek`] looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    /// `SEEK_DATA`.
    Data,
    /// `SEEK_HOLE`.
    Hole,
}

/// File data calls take regular files only: `EISDIR` for a directory,
/// `EINVAL` for a symbolic link (a path call never gets here with one).
fn check_regular(inode: &crate::format::Inode) -> Result<()> {
    match inode.kind() {
        libc::S_IFREG => Ok(()),
        libc::S_IFDIR => Err(Error::IsDir),
        _ => Err(Error::Invalid("not a regular file")),
    }
}

fn media(e: pmem::Error) -> Error {
    match e {
        pmem::Error::PartialPoisonWrite { sector_offset } => Error::MediaError {
            offset: sector_offset,
        },
        pmem::Error::Poisoned { offset } => Error::MediaError { offset },
        other => Error::Device(other),
    }
}

impl Fs {
    /// Read from `offset` into `buf`; returns the bytes read (0 at or past
    /// the end). Holes read as zeros.
    ///
    /// Media errors are page-granular, as on Linux fsdax (whose
    /// `dax_direct_access` refuses a page holding any bad sector): a read
    /// whose first 4 KiB page holds poison fails with `EIO`, even of that
    /// page's good sectors; one that reaches a poisoned page after good
    /// ones returns the bytes up to that page's start. [`Fs::read_mcsafe`]
    /// reads up to the poisoned sector itself.
    /// The access time is updated as [`Fs::set_atime`] says.
    pub fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_up_to_poison(ino, offset, buf, BLOCK)
    }

    /// `read` with byte precision at poison, as `copy_mc_to_user` gives
    /// it (and the device's `read_mcsafe`): a read that reaches a poisoned
    /// sector returns every byte before that sector, or `EIO` if there are
    /// none. For callers that salvage what they can around bad media.
    pub fn read_mcsafe(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_up_to_poison(ino, offset, buf, pmem::SECTOR)
    }

    /// A read that stops at poison, at the start of the `granule` (page or
    /// sector) holding it.
    fn read_up_to_poison(
        &self,
        ino: Ino,
        offset: u64,
        buf: &mut [u8],
        granule: u64,
    ) -> Result<usize> {
        if super::dax::overlaps_mapping(buf) {
            return self.read_into_mapping(ino, offset, buf, granule);
        }
        self.read_direct(ino, offset, buf, granule)
    }

    /// `read` into a buffer that lies in a DAX mapping, whose faults take
    /// our lock: through memory of our own, a piece at a time, each copied
    /// out with no lock held (see `user`).
    fn read_into_mapping(
        &self,
        ino: Ino,
        offset: u64,
        buf: &mut [u8],
        granule: u64,
    ) -> Result<usize> {
        let mut bounce = vec![0u8; buf.len().min(super::user::BOUNCE)];
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(bounce.len());
            match self.read_direct(ino, offset + done as u64, &mut bounce[..want], granule) {
                Ok(n) => {
                    buf[done..done + n].copy_from_slice(&bounce[..n]);
                    done += n;
                    if n < want {
                        break;
                    }
                }
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    fn read_direct(&self, ino: Ino, offset: u64, buf: &mut [u8], granule: u64) -> Result<usize> {
        let mut poison = None;
        let mut atime_due = false;
        let got = self.read_data(ino, offset, buf, granule, &mut poison, &mut atime_due);
        // Poison found on the way: memory failure, once the lock is free.
        if let Some(at) = poison {
            self.poison_found(at);
        }
        if atime_due && got.is_ok() {
            self.touch_atime(ino);
        }
        got
    }

    fn read_data(
        &self,
        ino: Ino,
        offset: u64,
        buf: &mut [u8],
        granule: u64,
        found: &mut Option<u64>,
        atime_due: &mut bool,
    ) -> Result<usize> {
        let mut st = self.lock()?;
        let inode = self.inode(&mut st, ino)?;
        check_regular(&inode)?;
        *atime_due = !buf.is_empty() && self.atime_due(&inode);
        if offset >= inode.size || buf.is_empty() {
            return Ok(0);
        }
        let end = inode.size.min(offset + buf.len() as u64);
        let extents = self.extents(&mut st, ino)?;
        let mut pos = offset;
        while pos < end {
            let lblock = pos / BLOCK;
            let within = pos % BLOCK;
            let at = (pos - offset) as usize;
            match map(extents, lblock) {
                Some((physical, run)) => {
                    let n = (end - pos).min(run * BLOCK - within) as usize;
                    let from = physical * BLOCK + within;
                    let got = self.core.dev.read_mcsafe(from, &mut buf[at..at + n])?;
                    // Poison anywhere in the granules read counts: a
                    // poisoned page's good sectors are refused too.
                    let (lo, hi) = (
                        from - from % granule,
                        (from + n as u64).next_multiple_of(granule),
                    );
                    let poison = [got.poison, self.core.dev.first_poison(lo, hi - lo)]
                        .into_iter()
                        .flatten()
                        .min();
                    if let Some(poison) = poison {
                        *found = Some(poison);
                        // Up to the start of the granule holding it (file
                        // and device offsets agree within a block).
                        let bad = (poison - poison % granule).max(lo);
                        let total = (pos + bad - from).saturating_sub(offset) as usize;
                        return if total == 0 {
                            Err(Error::MediaError { offset: poison })
                        } else {
                            Ok(total)
                        };
                    }
                    pos += n as u64;
                }
                None => {
                    let next = next_mapped(extents, lblock).map_or(end, |b| (b * BLOCK).min(end));
                    let n = (next - pos) as usize;
                    buf[at..at + n].fill(0);
                    pos += n as u64;
                }
            }
        }
        Ok((end - offset) as usize)
    }

    /// Write `data` at `offset`, extending the file as needed. Durable when
    /// it returns. A write over part of a poisoned sector fails with `EIO`;
    /// one that covers whole poisoned sectors clears them.
    ///
    /// As write(2): a write that crosses the largest file size writes what
    /// fits before it and returns the short count (`EFBIG` when nothing
    /// fits); one that runs out of space writes what fits and returns the
    /// short count (`ENOSPC` when nothing fits).
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let data = &data[..data.len().min((MAX_FILE_SIZE - offset) as usize)];
        match self.write_once(ino, offset, data) {
            Err(Error::NoSpace) => self.write_what_fits(ino, offset, data),
            done => done,
        }
    }

    /// The space ran out: write `data` in ever smaller pieces, a block at
    /// the least, until the next does not fit. What was written.
    fn write_what_fits(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        let mut done = 0usize;
        let mut piece = data.len() / 2;
        while done < data.len() {
            // Pieces end on block boundaries of the file, so that each one
            // needs whole blocks.
            let at = offset + done as u64;
            let to_boundary = (BLOCK - at % BLOCK) as usize;
            let len = piece.max(to_boundary).min(data.len() - done);
            match self.write_once(ino, at, &data[done..done + len]) {
                Ok(n) => done += n,
                Err(Error::NoSpace) if len > to_boundary => piece = len / 2,
                Err(Error::NoSpace) if done > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_once(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        let end = offset + data.len() as u64;
        // The source may lie in a DAX mapping, whose faults take the locks
        // taken below: copied first if so (see `user`).
        let data = super::user::unmapped(data);
        let data = &*data;
        let dax = self.dax_of(ino);
        let _filling = self.dax_fill_holes(&dax, offset / BLOCK, end.div_ceil(BLOCK))?;
        self.change(|fs, st, stage| {
            stage.touched.insert(ino);
            let mut inode = fs.inode(st, ino)?;
            check_regular(&inode)?;
            super::flags::may_write(&inode, offset)?;
            let old_size = inode.size;
            let new_size = old_size.max(end);
            if offset > old_size {
                fs.zero_tail(st, ino, old_size, offset)?;
            }
            let added = fs.allocate(st, stage, ino, offset, end, new_size, Some((offset, end)))?;
            let extents = fs.extents(st, ino)?;
            let mut pos = offset;
            while pos < end {
                let (physical, run) = map(extents, pos / BLOCK).expect("allocated above");
                let within = pos % BLOCK;
                let n = (end - pos).min(run * BLOCK - within);
                let from = (pos - offset) as usize;
                fs.core
                    .dev
                    .memcpy_nodrain(physical * BLOCK + within, &data[from..from + n as usize])
                    .map_err(media)?;
                pos += n;
            }
            let moved = fs.align_filled_chunks(st, ino, offset, end)?;
            if added > 0 || moved {
                inode = fs.store_extents(st, stage, ino)?;
                inode.blocks += added;
            }
            let now = Time::now();
            if new_size != old_size || added > 0 || moved || inode.mtime.secs != now.secs {
                inode.size = new_size;
                inode.mtime = now;
                inode.ctime = now;
                fs.put_inode(st, stage, ino, inode);
            }
            Ok(data.len())
        })
        .inspect(|_| self.core.dev.drain())
    }

    /// Drop set-user-ID, and set-group-ID unless group-execute is clear
    /// and the caller is in the file's group (`in_group`), as a write by
    /// an unprivileged caller does on Linux (`setattr_should_drop_sgid`).
    /// Changes nothing (and writes nothing) when neither is set.
    pub fn drop_setid(&self, ino: Ino, in_group: impl FnOnce(u32) -> bool) -> Result<()> {
        let attr = self.getattr(ino)?;
        let mode = attr.mode;
        if mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
            return Ok(());
        }
        let sgid = mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !in_group(attr.gid));
        let kill = libc::S_ISUID | if sgid { libc::S_ISGID } else { 0 };
        if mode & kill == 0 {
            return Ok(());
        }
        self.change(|fs, st, stage| {
            let mut inode = fs.inode(st, ino)?;
            inode.mode &= !kill;
            inode.ctime = Time::now();
            fs.put_inode(st, stage, ino, inode);
            Ok(())
        })
    }

    /// Make the file's data and metadata durable. Every call is durable when
    /// it returns already, so for them this is a fence; stores through DAX
    /// mappings are flushed here (their dirty entries written back).
    pub fn fsync(&self, ino: Ino) -> Result<()> {
        self.getattr(ino)?;
        // Stores through DAX mappings are not: write back their dirty
        // entries (as `Mapping::sync` does).
        match self.dax_of(ino) {
            Some(dax) => dax.writeback(&self.core.dev),
            None => {
                self.core.dev.drain();
                Ok(())
            }
        }
    }

    /// Set the size: shrinking frees the blocks past the end, growing leaves
    /// a hole.
    pub fn truncate(&self, ino: Ino, size: u64) -> Result<()> {
        self.breaking_mappings(ino, size / BLOCK, u64::MAX, || {
            self.change(|fs, st, stage| fs.truncate_staged(st, stage, ino, size))
        })
    }

    /// Run `f`, which frees blocks of `ino` in file pages `[first, end)`,
    /// with the file's DAX mappings of them broken first; again if the
    /// file was mapped meanwhile.
    pub(super) fn breaking_mappings<T>(
        &self,
        ino: Ino,
        first: u64,
        end: u64,
        f: impl Fn() -> Result<T>,
    ) -> Result<T> {
        loop {
            let dax = self.dax_of(ino);
            let _broken = self.dax_invalidate(&dax, first, end)?;
            match f() {
                Err(Error::MappedMeanwhile) => continue,
                result => return result,
            }
        }
    }

    pub(super) fn truncate_staged(
        &self,
        st: &mut State,
        stage: &mut Stage,
        ino: Ino,
        size: u64,
    ) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        stage.touched.insert(ino);
        let mut inode = self.inode(st, ino)?;
        check_regular(&inode)?;
        super::flags::unchangeable(&inode)?;
        if size < inode.size {
            if let Some(changed) =
                self.unmap_blocks(st, stage, ino, size.div_ceil(BLOCK), u64::MAX)?
            {
                inode = changed;
            }
        } else if size > inode.size {
            self.zero_tail(st, ino, inode.size, size)?;
        }
        let now = Time::now();
        inode.size = size;
        inode.mtime = now;
        inode.ctime = now;
        self.put_inode(st, stage, ino, inode);
        Ok(())
    }

    /// Allocate (zeroed) blocks for `[offset, offset + len)`; unless
    /// `keep_size`, extend the size to cover it.
    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, keep_size: bool) -> Result<()> {
        let dax = self.dax_of(ino);
        let end = offset.saturating_add(len).div_ceil(BLOCK);
        let _filling = self.dax_fill_holes(&dax, offset / BLOCK, end)?;
        self.fallocate_blocks(ino, offset, len, keep_size)
    }

    /// Give the holes of `[offset, offset + len)` zeroed blocks, the size
    /// unchanged, for the holder of a lease of the range (see
    /// [`Fs::lease`]) whose store faulted there: durable with the metadata
    /// when this returns (`MAP_SYNC`). Fails at once with
    /// [`Error::Recalled`] while a break of the file runs (ask again once
    /// the recall is answered).
    pub fn allocate_leased(&self, ino: Ino, offset: u64, len: u64) -> Result<()> {
        let dax = self.dax_of(ino);
        let end = offset.saturating_add(len).div_ceil(BLOCK);
        let _filling = self.dax_fill_holes_nowait(&dax, offset / BLOCK, end)?;
        self.fallocate_blocks(ino, offset, len, true)
    }

    /// `fallocate` for a caller that holds the file's invalidate lock (a
    /// DAX write fault).
    pub(super) fn fallocate_blocks(
        &self,
        ino: Ino,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<()> {
        if len == 0 {
            return Err(Error::Invalid("bad fallocate range"));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(Error::FileTooBig)?;
        self.change(|fs, st, stage| {
            stage.touched.insert(ino);
            let mut inode = fs.inode(st, ino)?;
            check_regular(&inode)?;
            match keep_size {
                true => super::flags::immutable(&inode)?,
                false => super::flags::unchangeable(&inode)?,
            }
            let new_size = if keep_size {
                inode.size
            } else {
                inode.size.max(end)
            };
            if end > inode.size && !keep_size {
                fs.zero_tail(st, ino, inode.size, end)?;
            }
            let added = fs.allocate(st, stage, ino, offset, end, new_size.max(end), None)?;
            if added > 0 {
                inode = fs.store_extents(st, stage, ino)?;
                inode.blocks += added;
            }
            inode.size = new_size;
            inode.ctime = Time::now();
            fs.put_inode(st, stage, ino, inode);
            Ok(())
        })
    }

    /// `lseek`'s `SEEK_DATA` or `SEEK_HOLE` from `offset`: where the next
    /// data, or the next hole, at or after it begins, or `None` (`ENXIO`)
    /// at or past the end of the file, and for data when only a hole is
    /// left. The end of the file counts as a hole; allocated blocks count
    /// as data (zeroed ones too, as the VFS allows).
    pub fn seek(&self, ino: Ino, offset: u64, what: Seek) -> Result<Option<u64>> {
        let mut st = self.lock()?;
        let inode = self.inode(&mut st, ino)?;
        if offset >= inode.size {
            return Ok(None);
        }
        let extents: &[Extent] = match inode.has_extents() {
            true => self.extents(&mut st, ino)?,
            false => &[],
        };
        let block = offset / BLOCK;
        Ok(match what {
            Seek::Data => match map(extents, block) {
                Some(_) => Some(offset),
                None => next_mapped(extents, block)
                    .map(|b| b * BLOCK)
                    .filter(|&at| at < inode.size),
            },
            Seek::Hole => {
                // Past the mapped blocks that run on from `offset`.
                let mut at = block;
                while let Some((_, run)) = map(extents, at) {
                    at += run;
                }
                Some(if at == block {
                    offset
                } else {
                    (at * BLOCK).min(inode.size)
                })
            }
        })
    }

    /// Deallocate `[offset, offset + len)`: whole blocks are freed, partial
    /// ones zeroed. The size does not change.
    pub fn punch_hole(&self, ino: Ino, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or(Error::Invalid("bad punch range"))?;
        self.breaking_mappings(ino, offset / BLOCK, end.div_ceil(BLOCK), || {
            self.punch_hole_once(ino, offset, end)
        })
    }

    fn punch_hole_once(&self, ino: Ino, offset: u64, end: u64) -> Result<()> {
        self.change(|fs, st, stage| {
            stage.touched.insert(ino);
            let mut inode = fs.inode(st, ino)?;
            check_regular(&inode)?;
            super::flags::unchangeable(&inode)?;
            let end = end.min(inode.size);
            if offset >= end {
                return Ok(());
            }
            let (first_whole, end_whole) = (offset.div_ceil(BLOCK), end / BLOCK);
            // Zero the partial blocks at either edge, through the journal, so
            // that the punch is wholly done or not at all after a crash.
            let mut edges = vec![(offset, (first_whole * BLOCK).min(end))];
            if end_whole >= first_whole {
                edges.push(((end_whole * BLOCK).max(offset), end));
            }
            // File data is then written in place without the journal, so
            // this transaction must never be replayed over it: it is
            // checkpointed as soon as it is applied.
            for (a, b) in edges {
                if a < b {
                    if let Some((physical, _)) = map(fs.extents(st, ino)?, a / BLOCK) {
                        stage
                            .tx
                            .write(physical * BLOCK + a % BLOCK, &vec![0u8; (b - a) as usize]);
                        stage.tx.checkpoint_at_once();
                    }
                }
            }
            if first_whole < end_whole {
                if let Some(changed) = fs.unmap_blocks(st, stage, ino, first_whole, end_whole)? {
                    inode = changed;
                }
            }
            inode.ctime = Time::now();
            inode.mtime = inode.ctime;
            fs.put_inode(st, stage, ino, inode);
            Ok(())
        })
    }

    /// After a write of `[offset, end)`: each 2 MiB chunk of the file that
    /// this write completed (its last byte written now, all of it data) but
    /// that lies in small extents, because the file was small when its
    /// first blocks came, moves to a whole aligned region, so that files
    /// written by appends map with PMDs from their first byte (WineFS keeps
    /// growing files aligned the same way). A file that stays under 2 MiB
    /// never moves, so small files cost what they did. Only files that
    /// nothing maps or pins (whose layout no one holds), and only when a
    /// free region is left; the old blocks are freed by the same
    /// transaction, after the copy in the new ones is durable with it.
    /// Whether any chunk moved.
    fn align_filled_chunks(&self, st: &mut State, ino: Ino, offset: u64, end: u64) -> Result<bool> {
        const CHUNK: u64 = HUGE_BLOCKS * BLOCK;
        if self.dax_of(ino).is_some() {
            return Ok(false);
        }
        let mut moved = false;
        let first = offset / CHUNK;
        for chunk in first..end / CHUNK {
            let to = (chunk + 1) * CHUNK;
            if !(offset < to && to <= end) {
                continue;
            }
            let lblock = chunk * HUGE_BLOCKS;
            let extents = self.extents(st, ino)?;
            match map(extents, lblock) {
                // Already one aligned region.
                Some((physical, run)) if run >= HUGE_BLOCKS && physical % HUGE_BLOCKS == 0 => {
                    continue
                }
                Some(_) => {}
                None => continue,
            }
            // All data (no hole in the chunk)?
            let mut at = lblock;
            while at < lblock + HUGE_BLOCKS {
                match map(extents, at) {
                    Some((_, run)) => at += run,
                    None => break,
                }
            }
            if at < lblock + HUGE_BLOCKS {
                continue;
            }
            let mut data = vec![0u8; CHUNK as usize];
            let mut at = lblock;
            while at < lblock + HUGE_BLOCKS {
                let (physical, run) = map(extents, at).expect("no hole, above");
                let n = run.min(lblock + HUGE_BLOCKS - at);
                let buf = &mut data
                    [((at - lblock) * BLOCK) as usize..((at - lblock + n) * BLOCK) as usize];
                if self.core.dev.read(physical * BLOCK, buf).is_err() {
                    return Ok(moved); // poison: leave the chunk where it is
                }
                at += n;
            }
            let Some(region) = st.alloc.alloc_huge() else {
                return Ok(moved);
            };
            self.core
                .dev
                .memcpy_nodrain(region * BLOCK, &data)
                .map_err(media)?;
            let extents = self.extents(st, ino)?;
            for (start, len) in remove_range(extents, lblock, lblock + HUGE_BLOCKS) {
                st.alloc.free(start, len);
            }
            insert_extent(
                self.extents(st, ino)?,
                Extent {
                    logical: lblock,
                    len: HUGE_BLOCKS as u32,
                    physical: region,
                },
            );
            moved = true;
        }
        Ok(moved)
    }

    /// Unmap logical blocks `[first, end)` and free them (after commit).
    /// Returns the inode with its new extents and block count, if anything
    /// was mapped there.
    fn unmap_blocks(
        &self,
        st: &mut State,
        stage: &mut Stage,
        ino: Ino,
        first: u64,
        end: u64,
    ) -> Result<Option<crate::format::Inode>> {
        self.check_broken(st, ino)?;
        let freed = remove_range(self.extents(st, ino)?, first, end);
        if freed.is_empty() {
            return Ok(None);
        }
        let mut count = 0;
        for (start, len) in freed {
            st.alloc.free(start, len);
            count += len;
        }
        let mut inode = self.store_extents(st, stage, ino)?;
        inode.blocks = inode.blocks.saturating_sub(count);
        Ok(Some(inode))
    }

    /// Map every hole in `[offset, end)`; zero what `written` (the byte range
    /// the caller will write) does not cover. Returns the blocks added.
    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &self,
        st: &mut State,
        _stage: &mut Stage,
        ino: Ino,
        offset: u64,
        end: u64,
        size_after: u64,
        written: Option<(u64, u64)>,
    ) -> Result<u64> {
        let (first, last) = (offset / BLOCK, end.div_ceil(BLOCK));
        let mut added = 0;
        let mut lblock = first;
        while lblock < last {
            let extents = self.extents(st, ino)?;
            if let Some((_, run)) = map(extents, lblock) {
                lblock += run;
                continue;
            }
            let hole_end = next_mapped(extents, lblock).unwrap_or(u64::MAX).min(last);
            // A whole aligned 2 MiB chunk of hole, wanted whole: a huge region.
            let chunk = lblock / HUGE_BLOCKS * HUGE_BLOCKS;
            let chunk_is_hole = lblock == chunk
                && next_mapped(extents, chunk).is_none_or(|b| b >= chunk + HUGE_BLOCKS);
            let wanted_whole = hole_end >= chunk + HUGE_BLOCKS || size_after >= HUGE_BLOCKS * BLOCK;
            let (physical, len, logical) = match chunk_is_hole && wanted_whole {
                true => match st.alloc.alloc_huge() {
                    Some(start) => (start, HUGE_BLOCKS, chunk),
                    None => self.alloc_small(st, lblock, hole_end)?,
                },
                false => self.alloc_small(st, lblock, hole_end)?,
            };
            insert_extent(
                self.extents(st, ino)?,
                Extent {
                    logical,
                    len: len as u32,
                    physical,
                },
            );
            // Zero the new blocks except where the caller writes.
            let (a, b) = (logical * BLOCK, (logical + len) * BLOCK);
            let dev_at = |x: u64| physical * BLOCK + (x - a);
            let covered = written
                .map(|(w0, w1)| (w0.clamp(a, b), w1.clamp(a, b)))
                .filter(|(w0, w1)| w0 < w1);
            let gaps = match covered {
                None => [(a, b), (b, b)],
                Some((w0, w1)) => [(a, w0), (w1, b)],
            };
            for (from, to) in gaps {
                if from < to {
                    self.core
                        .dev
                        .memset_nodrain(dev_at(from), 0, to - from)
                        .map_err(media)?;
                }
            }
            added += len;
            lblock = logical + len;
        }
        Ok(added)
    }

    fn alloc_small(&self, st: &mut State, lblock: u64, hole_end: u64) -> Result<(u64, u64, u64)> {
        let want = (hole_end - lblock).min(HUGE_BLOCKS);
        let (start, len) = st.alloc.alloc(want).ok_or(Error::NoSpace)?;
        Ok((start, len, lblock))
    }

    /// Zero the mapped bytes of `[from, to)` in place.
    fn zero_mapped(&self, st: &mut State, ino: Ino, from: u64, to: u64) -> Result<()> {
        let extents = self.extents(st, ino)?;
        let mut pos = from;
        while pos < to {
            let within = pos % BLOCK;
            let n = (to - pos).min(BLOCK - within);
            if let Some((physical, _)) = map(extents, pos / BLOCK) {
                self.core
                    .dev
                    .memset_nodrain(physical * BLOCK + within, 0, n)
                    .map_err(media)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Before the size grows from `old_size` towards `new_size`, zero what
    /// the last block holds past the old end, so the file never shows bytes
    /// from before a truncate.
    fn zero_tail(&self, st: &mut State, ino: Ino, old_size: u64, new_size: u64) -> Result<()> {
        let block_end = old_size.next_multiple_of(BLOCK);
        if !old_size.is_multiple_of(BLOCK) {
            self.zero_mapped(st, ino, old_size, new_size.min(block_end))?;
        }
        Ok(())
    }

    /// The fraction of file data (in blocks) that lies in aligned 2 MiB
    /// extents, over every file.
    pub fn huge_fraction(&self) -> Result<f64> {
        let (mut huge, mut all) = (0u64, 0u64);
        let inos: Vec<Ino> = (1..=self.core.sb.inode_count).collect();
        let mut st = self.lock()?;
        for ino in inos {
            if st.free_inodes.contains(&ino) {
                continue;
            }
            let inode = match self.inode(&mut st, ino) {
                Ok(inode) => inode,
                Err(_) => continue,
            };
            if inode.kind() != libc::S_IFREG {
                continue;
            }
            for e in self.extents(&mut st, ino)?.iter() {
                all += e.len as u64;
                // Whole aligned 2 MiB pieces, aligned in the file and on the device.
                let mut l = e.logical;
                while l + HUGE_BLOCKS <= e.end() {
                    let p = e.physical + (l - e.logical);
                    if l.is_multiple_of(HUGE_BLOCKS) && p.is_multiple_of(HUGE_BLOCKS) {
                        huge += HUGE_BLOCKS;
                        l += HUGE_BLOCKS;
                    } else {
                        l += 1;
                    }
                }
            }
        }
        Ok(if all == 0 {
            0.0
        } else {
            huge as f64 / all as f64
        })
    }
}
