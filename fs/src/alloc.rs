//! The block allocator: extent-based and 2 MiB aware (WineFS's policy).
//!
//! The data area is seen as 2 MiB regions of 512 blocks. A region is *free*
//! (all 512 blocks free), *broken* (some in use) or full. Large allocations
//! ([`Allocator::alloc_huge`]) take whole free regions, so the file can be
//! mapped with PMDs. Small allocations are served from broken regions first,
//! so free regions stay whole as the filesystem ages; only when no broken
//! region has room is a free region broken.
//!
//! The on-media bitmap (one bit per block) is the truth; the allocator keeps
//! a copy in memory, rebuilt at mount. Changes are staged: allocations are
//! visible at once (so one transaction never hands out a block twice), frees
//! only after the transaction that frees them commits (so a block freed and
//! reused in one transaction can never be overwritten before the free is
//! durable). [`Allocator::stage`] turns the changed bitmap words into journal
//! records; [`Allocator::committed`] or [`Allocator::abort`] ends the stage.
//!
//! Each 512-byte piece of the bitmap has a checksum (see
//! [`crate::format`]), written by the same transaction as its words. A
//! piece that fails its checksum at mount is *refused*: all the blocks it
//! covers are held in use in memory, so nothing is
//! allocated from it, until [`Allocator::rebuild`] sets it from what the
//! inodes own (the mount does that when it can read every inode; fsck's
//! repair otherwise).

use crate::error::Result;
use crate::format::{
    bitmap_crc, Superblock, BITMAP_PIECE, BLOCK, BLOCKS_PER_BITMAP_PIECE, HUGE_BLOCKS,
};
use crate::fs::HashSet;
use crate::journal::Tx;
use std::collections::BTreeSet;

#[derive(Debug)]
pub struct Allocator {
    bitmap: Vec<u64>,
    /// Free blocks per 2 MiB region.
    region_free: Vec<u32>,
    /// Regions with all 512 blocks free (data area only).
    free_regions: BTreeSet<u64>,
    /// Regions with some, but not all, blocks free.
    broken_regions: BTreeSet<u64>,
    first_region: u64,
    bitmap_offset: u64,
    free: u64,
    /// This stage's allocations (undone by `abort`) and frees (applied by
    /// `committed`), and the bitmap words they touch.
    staged_allocs: Vec<(u64, u64)>,
    staged_frees: Vec<(u64, u64)>,
    dirty_words: HashSet<usize>,
    /// Free blocks on poisoned media, kept out of allocation until the
    /// poison is cleared: marked used in memory, never on media.
    quarantined: BTreeSet<u64>,
    /// Bitmap words that read with metadata blocks marked free: corrected
    /// in memory, and on media by the next commit (fsck reports them).
    metadata_marked_free: BTreeSet<usize>,
    /// Device offset of the bitmap checksum table (none on an older image).
    csum_offset: Option<u64>,
    /// Bitmap pieces that failed their checksum and are not rebuilt yet:
    /// held in use in memory, their checksums not written.
    refused: BTreeSet<u64>,
    /// For a device whose storage may be sparse: what reserves a region's
    /// storage before any of its blocks is handed out, and the regions
    /// reserved so far (one bit each). See [`Allocator::set_reserver`].
    reserver: Option<(pmem::Reserver, Vec<u64>)>,
}

/// Blocks that only extent blocks may take (see [`Allocator::alloc`]).
pub const RESERVE: u64 = 64;

/// Words per checksummed piece of the bitmap.
const WORDS_PER_PIECE: usize = (BITMAP_PIECE / 8) as usize;

impl Allocator {
    /// The allocator of a filesystem whose bitmap reads `bitmap`.
    pub fn new(sb: &Superblock, mut bitmap: Vec<u64>) -> Allocator {
        // The metadata blocks are in use whatever the bitmap says (a sector
        // of it cleared of poison reads as zeros; fsck reports that): never
        // hand them out.
        let mut metadata_marked_free = BTreeSet::new();
        for block in (0..sb.data_start).chain([sb.backup_block]) {
            let at = (block / 64) as usize;
            if let Some(word) = bitmap.get_mut(at) {
                if *word & 1 << (block % 64) == 0 {
                    *word |= 1 << (block % 64);
                    metadata_marked_free.insert(at);
                }
            }
        }
        let regions = sb.total_blocks.div_ceil(HUGE_BLOCKS);
        let mut a = Allocator {
            bitmap,
            region_free: vec![0; regions as usize],
            free_regions: BTreeSet::new(),
            broken_regions: BTreeSet::new(),
            first_region: sb.data_start / HUGE_BLOCKS,
            bitmap_offset: sb.bitmap_start * BLOCK,
            free: 0,
            staged_allocs: Vec::new(),
            staged_frees: Vec::new(),
            dirty_words: HashSet::default(),
            quarantined: BTreeSet::new(),
            metadata_marked_free,
            csum_offset: None,
            refused: BTreeSet::new(),
            reserver: None,
        };
        for block in sb.data_start..sb.total_blocks {
            if !a.is_used(block) {
                a.region_free[(block / HUGE_BLOCKS) as usize] += 1;
                a.free += 1;
            }
        }
        for r in a.first_region..regions {
            a.classify(r);
        }
        a
    }

    /// Read the bitmap of the filesystem on `dev` and check each block
    /// against its checksum. Returns the allocator, with every block that
    /// failed (or could not be read) refused, and those blocks' indexes.
    pub fn load(dev: &pmem::Device, sb: &Superblock) -> Result<(Allocator, Vec<u64>)> {
        let mut raw = vec![0u8; (sb.bitmap_blocks * BLOCK) as usize];
        let mut unreadable = BTreeSet::new();
        for (index, piece) in raw.chunks_exact_mut(BITMAP_PIECE as usize).enumerate() {
            let at = sb.bitmap_start * BLOCK + index as u64 * BITMAP_PIECE;
            if dev.read_mcsafe(at, piece)?.poison.is_some() {
                unreadable.insert(index as u64);
            }
        }
        let mut damaged = Vec::new();
        if sb.bitmap_csum != 0 {
            let mut table = vec![0u8; (sb.bitmap_csum_blocks() * BLOCK) as usize];
            let got = dev.read_mcsafe(sb.bitmap_csum * BLOCK, &mut table)?;
            for (index, piece) in raw.chunks_exact(BITMAP_PIECE as usize).enumerate() {
                let at = index * 4;
                let stored = (at + 4 <= got.copied).then(|| crate::format::u32_at(&table, at));
                if unreadable.contains(&(index as u64))
                    || stored != Some(bitmap_crc(index as u64, piece))
                {
                    damaged.push(index as u64);
                }
            }
        } else {
            damaged.extend(unreadable);
        }
        let bitmap = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        let mut alloc = Allocator::new(sb, bitmap);
        alloc.csum_offset = (sb.bitmap_csum != 0).then_some(sb.bitmap_csum * BLOCK);
        for &index in &damaged {
            alloc.refuse(index);
        }
        Ok((alloc, damaged))
    }

    /// The checksum table's contents for the bitmap as it is in memory.
    pub fn checksum_table(&self, sb: &Superblock) -> Vec<u8> {
        let mut table = vec![0u8; (sb.bitmap_csum_blocks() * BLOCK) as usize];
        for (index, words) in self.bitmap.chunks(WORDS_PER_PIECE).enumerate() {
            let piece: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            crate::format::put_u32(&mut table, index * 4, bitmap_crc(index as u64, &piece));
        }
        table
    }

    /// From now on, keep the checksums in the table at device `offset`.
    pub fn keep_checksums_at(&mut self, offset: u64) {
        self.csum_offset = Some(offset);
    }

    /// Hold every block that bitmap piece `index` covers in use (in memory
    /// only), and write no checksum for it, until it is rebuilt.
    fn refuse(&mut self, index: u64) {
        let start = index * BLOCKS_PER_BITMAP_PIECE;
        self.flip(start, BLOCKS_PER_BITMAP_PIECE, true, false);
        self.refused.insert(index);
    }

    /// The bitmap pieces refused (failed their checksum, not rebuilt).
    pub fn refused(&self) -> &BTreeSet<u64> {
        &self.refused
    }

    /// The blocks bitmap piece `index` covers.
    pub fn covered(&self, index: u64) -> std::ops::Range<u64> {
        let end = (self.bitmap.len() as u64 * 64).min(self.region_free.len() as u64 * HUGE_BLOCKS);
        (index * BLOCKS_PER_BITMAP_PIECE).min(end)..((index + 1) * BLOCKS_PER_BITMAP_PIECE).min(end)
    }

    /// Set bitmap piece `index` anew: a block is in use when it is
    /// filesystem metadata or `owned` says so. All its words (and its
    /// checksum) are written by the next stage.
    pub fn rebuild(&mut self, sb: &Superblock, index: u64, owned: impl Fn(u64) -> bool) {
        self.refused.remove(&index);
        for block in self.covered(index) {
            let used = block < sb.data_start || block == sb.backup_block || owned(block);
            self.flip(block, 1, used, false);
        }
        let first = index as usize * WORDS_PER_PIECE;
        self.dirty_words
            .extend(first..(first + WORDS_PER_PIECE).min(self.bitmap.len()));
    }

    /// Hold the blocks of bitmap word `word` that `bits` marks in use (the
    /// mount's cross-check: files claim them), written at the next stage.
    /// Returns how many were marked free.
    pub fn hold(&mut self, word: usize, bits: u64) -> u64 {
        let missing = bits & !self.bitmap[word];
        let mut rest = missing;
        while rest != 0 {
            let bit = rest.trailing_zeros() as u64;
            self.set(word as u64 * 64 + bit, true);
            rest &= rest - 1;
        }
        missing.count_ones() as u64
    }

    /// Make block `block` used or free (fsck's repair of a bitmap that
    /// disagrees with what the inodes own), written by the next stage.
    pub fn set(&mut self, block: u64, used: bool) {
        self.flip(block, 1, used, false);
        self.dirty_words.insert((block / 64) as usize);
    }

    /// The bitmap of a new filesystem: everything before the data area and
    /// the backup superblock in use.
    pub fn initial_bitmap(sb: &Superblock) -> Vec<u64> {
        let words = (sb.bitmap_blocks * BLOCK / 8) as usize;
        let mut bitmap = vec![0u64; words];
        let mut set = |b: u64| bitmap[(b / 64) as usize] |= 1 << (b % 64);
        (0..sb.data_start).for_each(&mut set);
        set(sb.backup_block);
        bitmap
    }

    /// Bitmap words that marked metadata blocks free when read.
    pub fn metadata_marked_free(&self) -> &BTreeSet<usize> {
        &self.metadata_marked_free
    }

    /// Bitmap word `word` as it is in memory (blocks `64 * word ..`); past
    /// the device, bits of blocks that do not exist are 0.
    pub fn word(&self, word: usize) -> u64 {
        self.bitmap.get(word).copied().unwrap_or(0)
    }

    pub fn is_used(&self, block: u64) -> bool {
        self.bitmap[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Whether `block` is free (as committed).
    pub fn is_free(&self, block: u64) -> bool {
        self.bitmap
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) == 0)
    }

    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    pub fn free_regions(&self) -> u64 {
        self.free_regions.len() as u64
    }

    fn classify(&mut self, region: u64) {
        self.free_regions.remove(&region);
        self.broken_regions.remove(&region);
        // The last region may be short; count its real size.
        let full = HUGE_BLOCKS as u32;
        match self.region_free[region as usize] {
            0 => {}
            n if n == full => {
                self.free_regions.insert(region);
            }
            _ => {
                self.broken_regions.insert(region);
            }
        }
    }

    /// Mark blocks used or free, in memory and (their words dirtied) on
    /// media at the next stage. A block already in that state (possible
    /// only on a damaged bitmap, which fsck reports) is left alone.
    fn mark(&mut self, start: u64, len: u64, used: bool) {
        self.flip(start, len, used, true);
    }

    /// `mark`, in memory only when `journal` is false.
    fn flip(&mut self, start: u64, len: u64, used: bool, journal: bool) {
        let limit =
            (self.bitmap.len() as u64 * 64).min(self.region_free.len() as u64 * HUGE_BLOCKS);
        let end = (start + len).min(limit);
        if start >= end {
            return;
        }
        for block in start..end {
            let word = (block / 64) as usize;
            let bit = 1u64 << (block % 64);
            if (self.bitmap[word] & bit != 0) == used {
                continue;
            }
            if used {
                self.bitmap[word] |= bit;
                self.region_free[(block / HUGE_BLOCKS) as usize] -= 1;
                self.free -= 1;
            } else {
                self.bitmap[word] &= !bit;
                self.region_free[(block / HUGE_BLOCKS) as usize] += 1;
                self.free += 1;
            }
            if journal {
                self.dirty_words.insert(word);
            }
        }
        for region in start / HUGE_BLOCKS..=(end - 1) / HUGE_BLOCKS {
            self.classify(region);
        }
    }

    /// Keep free block `block` out of allocation (its media is poisoned).
    /// Returns whether it was free (and is now quarantined).
    pub fn quarantine(&mut self, block: u64) -> bool {
        let in_stage = self
            .staged_frees
            .iter()
            .any(|&(start, len)| (start..start + len).contains(&block));
        if !self.is_free(block) || in_stage || self.quarantined.contains(&block) {
            return false;
        }
        // In memory only; `stage` masks it out of any word it writes.
        self.flip(block, 1, true, false);
        self.quarantined.insert(block)
    }

    /// Give quarantined blocks in `[start, start + len)` back (their poison
    /// was cleared). Returns how many.
    pub fn release(&mut self, start: u64, len: u64) -> u64 {
        let blocks: Vec<u64> = self
            .quarantined
            .range(start..start + len)
            .copied()
            .collect();
        for &block in &blocks {
            self.quarantined.remove(&block);
            self.flip(block, 1, false, false);
        }
        blocks.len() as u64
    }

    /// Reserve the device's storage for a region before any of its
    /// blocks is handed out: an emulated device's file may be sparse on a
    /// filesystem that fills up, and a store into storage it cannot back
    /// kills the process (`SIGBUS`); a region that cannot be backed is not
    /// handed out (the allocation fails: `ENOSPC`). Once per region.
    pub fn set_reserver(&mut self, reserver: Option<pmem::Reserver>) {
        let words = self.region_free.len().div_ceil(64);
        self.reserver = reserver.map(|r| (r, vec![0; words]));
    }

    /// Whether region `region`'s storage is there (reserved now if it was
    /// not yet).
    fn backed(&mut self, region: u64) -> bool {
        let Some((reserver, done)) = &mut self.reserver else {
            return true;
        };
        let (word, bit) = ((region / 64) as usize, 1u64 << (region % 64));
        if done[word] & bit != 0 {
            return true;
        }
        let ok = reserver
            .reserve(region * HUGE_BLOCKS * BLOCK, HUGE_BLOCKS * BLOCK)
            .is_ok();
        if ok {
            done[word] |= bit;
        }
        ok
    }

    /// A whole free, aligned 2 MiB region: its first block.
    pub fn alloc_huge(&mut self) -> Option<u64> {
        let region = *self.free_regions.iter().next()?;
        if !self.backed(region) {
            return None;
        }
        let start = region * HUGE_BLOCKS;
        self.mark(start, HUGE_BLOCKS, true);
        self.staged_allocs.push((start, HUGE_BLOCKS));
        Some(start)
    }

    /// Up to `want` contiguous blocks (at least one), preferring broken
    /// regions: `(first block, count)`.
    pub fn alloc(&mut self, want: u64) -> Option<(u64, u64)> {
        // The reserve is for the extent blocks that describe data already
        // allocated (`alloc_extent_block`): the last blocks never go to
        // anything else.
        if self.free <= RESERVE {
            return None;
        }
        let want = want.clamp(1, HUGE_BLOCKS).min(self.free - RESERVE);
        self.alloc_any(want)
    }

    /// One block for an overflow extent block, from the reserve when
    /// nothing else is left: a hole punched in the middle of an extent
    /// splits it in two, and that must not fail for want of the space it
    /// is about to free (as ext4 keeps a reserve for the same).
    pub fn alloc_extent_block(&mut self) -> Option<u64> {
        self.alloc_any(1).map(|(block, _)| block)
    }

    fn alloc_any(&mut self, want: u64) -> Option<(u64, u64)> {
        // Best: a broken region with a run of `want`; else the longest run
        // found in a broken region; else break a free region.
        let mut best: Option<(u64, u64)> = None;
        for &region in self.broken_regions.iter().take(64) {
            if let Some((start, len)) = self.longest_run(region, want) {
                if len == want {
                    best = Some((start, len));
                    break;
                }
                if best.is_none_or(|b| len > b.1) {
                    best = Some((start, len));
                }
            }
        }
        let (start, len) = match best {
            Some(b) if b.1 == want => b,
            // (A free region whose storage cannot be reserved is passed
            // over for what broken regions have.)
            _ => match self.free_regions.iter().next().copied() {
                Some(region) if self.backed(region) => (region * HUGE_BLOCKS, want),
                _ => best.or_else(|| self.any_run(want))?,
            },
        };
        if !self.backed(start / HUGE_BLOCKS) {
            return None;
        }
        self.mark(start, len, true);
        self.staged_allocs.push((start, len));
        Some((start, len))
    }

    /// The longest run of free blocks in `region`, capped at `want` (the
    /// first run of `want` is taken as soon as it is seen). Scans the bitmap a
    /// word at a time.
    fn longest_run(&self, region: u64, want: u64) -> Option<(u64, u64)> {
        let first = (region * HUGE_BLOCKS).max(self.first_region * HUGE_BLOCKS);
        let end = ((region + 1) * HUGE_BLOCKS).min(self.bitmap.len() as u64 * 64);
        let mut best: Option<(u64, u64)> = None;
        let (mut run_start, mut run) = (first, 0u64);
        let mut block = first;
        while block < end {
            let shift = block % 64;
            let avail = (64 - shift).min(end - block);
            let word = self.bitmap[(block / 64) as usize] >> shift;
            // Free blocks from here (bits are 0), within this word.
            let free = (word.trailing_zeros() as u64).min(avail);
            if free > 0 {
                if run == 0 {
                    run_start = block;
                }
                run += free;
                block += free;
                if best.is_none_or(|b| run > b.1) {
                    best = Some((run_start, run.min(want)));
                }
                if run >= want {
                    return Some((run_start, want));
                }
            }
            if free < avail {
                // Skip the used blocks that follow.
                let used = ((word >> free).trailing_ones() as u64).min(avail - free);
                run = 0;
                block += used;
            }
        }
        best
    }

    fn any_run(&self, want: u64) -> Option<(u64, u64)> {
        let regions = self.region_free.len() as u64;
        (self.first_region..regions)
            .filter(|&r| self.region_free[r as usize] > 0)
            .find_map(|r| self.longest_run(r, want))
    }

    /// Free blocks once the current transaction commits.
    pub fn free(&mut self, start: u64, len: u64) {
        if len > 0 {
            self.staged_frees.push((start, len));
            for block in start..start + len {
                self.dirty_words.insert((block / 64) as usize);
            }
        }
    }

    /// Add the changed bitmap words to `tx` (with this stage's frees
    /// applied), and a revoke record for each freed extent, so that no
    /// journal record written to those blocks before is ever replayed over
    /// what they hold next.
    pub fn stage(&mut self, tx: &mut Tx) {
        for &(start, len) in &self.staged_frees {
            tx.revoke(start, len);
        }
        // The bits this stage frees, per word (frees stay marked in use in
        // memory until the commit).
        let mut freed: crate::fs::HashMap<usize, u64> = Default::default();
        for &(start, len) in &self.staged_frees {
            for block in start..start + len {
                *freed.entry((block / 64) as usize).or_default() |= 1 << (block % 64);
            }
        }
        let mut words: Vec<usize> = self.dirty_words.iter().copied().collect();
        words.extend(&self.metadata_marked_free);
        words.sort_unstable();
        words.dedup();
        // A word as it will be on media (the common case, nothing freed or
        // quarantined, is the word in memory).
        let plain = freed.is_empty() && self.quarantined.is_empty();
        let media = |word: usize| {
            if plain {
                return self.bitmap[word];
            }
            let quarantined = self
                .quarantined
                .range(word as u64 * 64..(word as u64 + 1) * 64)
                .fold(0u64, |bits, b| bits | 1 << (b % 64));
            self.bitmap[word] & !freed.get(&word).copied().unwrap_or(0) & !quarantined
        };
        let mut pieces = Vec::new();
        for &word in &words {
            tx.write(
                self.bitmap_offset + word as u64 * 8,
                &media(word).to_le_bytes(),
            );
            let index = (word / WORDS_PER_PIECE) as u64;
            if pieces.last() != Some(&index) {
                pieces.push(index);
            }
        }
        // The checksum of every piece those words are in, over the piece
        // as it will be on media.
        let Some(table) = self.csum_offset else {
            return;
        };
        let mut image = [0u8; BITMAP_PIECE as usize];
        for index in pieces {
            if self.refused.contains(&index) {
                continue;
            }
            let first = index as usize * WORDS_PER_PIECE;
            for (i, chunk) in image.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&media(first + i).to_le_bytes());
            }
            tx.write(table + index * 4, &bitmap_crc(index, &image).to_le_bytes());
        }
    }

    /// The transaction committed: apply its frees.
    pub fn committed(&mut self) {
        for (start, len) in std::mem::take(&mut self.staged_frees) {
            self.mark(start, len, false);
        }
        self.staged_allocs.clear();
        self.dirty_words.clear();
        self.metadata_marked_free.clear();
    }

    /// The operation failed before committing: undo its allocations.
    pub fn abort(&mut self) {
        for (start, len) in std::mem::take(&mut self.staged_allocs) {
            self.mark(start, len, false);
        }
        self.staged_frees.clear();
        self.dirty_words.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocator(total_blocks: u64) -> Allocator {
        let sb = Superblock::for_device(total_blocks * BLOCK, [0; 16], 0).unwrap();
        Allocator::new(&sb, Allocator::initial_bitmap(&sb))
    }

    #[test]
    fn small_allocations_fill_broken_regions_before_breaking_free_ones() {
        let mut a = allocator(64 * 256); // 64 MiB
        let free_regions = a.free_regions();
        // The last region is broken from the start (it holds the backup
        // superblock): small allocations go there, and no free region breaks.
        let (first, _) = a.alloc(3).unwrap();
        assert_eq!(first / HUGE_BLOCKS, 64 * 256 / HUGE_BLOCKS - 1);
        for _ in 0..100 {
            let (start, len) = a.alloc(2).unwrap();
            assert_eq!(len, 2);
            assert_eq!(
                start / HUGE_BLOCKS,
                first / HUGE_BLOCKS,
                "later ones stay in the broken region"
            );
        }
        assert_eq!(a.free_regions(), free_regions, "no free region was broken");
        let huge = a.alloc_huge().unwrap();
        assert_eq!(huge % HUGE_BLOCKS, 0);
        a.committed();
    }

    #[test]
    fn runs_are_found_across_word_boundaries_and_frees_wait_for_commit() {
        let mut a = allocator(64 * 256);
        let (start, _) = a.alloc(60).unwrap();
        a.committed();
        // Free blocks 10..20 and 50..60 of the run: a run of 10 straddles a word.
        a.free(start + 10, 10);
        a.free(start + 50, 10);
        assert!(a.is_used(start + 15), "a free is staged until commit");
        a.committed();
        let before = a.free_blocks();
        let got = a.longest_run(start / HUGE_BLOCKS, 10).unwrap();
        assert_eq!(got, (start + 10, 10));
        let (s2, l2) = a.alloc(10).unwrap();
        assert_eq!((s2, l2), (start + 10, 10));
        a.abort();
        assert_eq!(
            a.free_blocks(),
            before,
            "abort gives back the stage's allocations"
        );
    }

    #[test]
    fn quarantined_blocks_are_never_handed_out_nor_written_used() {
        let mut a = allocator(64 * 256);
        let (start, _) = a.alloc(8).unwrap();
        a.committed();
        let bad = start + 8; // the next free block of that broken region
        assert!(a.quarantine(bad));
        assert!(!a.quarantine(bad), "once");
        assert!(!a.quarantine(start), "a used block is not free space");
        let free = a.free_blocks();
        for _ in 0..100 {
            let (s, l) = a.alloc(1).unwrap();
            assert!(!(s..s + l).contains(&bad), "handed out a quarantined block");
        }
        a.committed();
        assert_eq!(a.free_blocks(), free - 100);
        assert!(a.is_used(bad), "in memory, in use");
        assert_eq!(a.release(bad, 1), 1);
        assert!(a.is_free(bad));
        assert_eq!(a.free_blocks(), free - 100 + 1);
    }

    #[test]
    fn a_staged_bitmap_word_never_carries_a_quarantined_bit() {
        let mut a = allocator(64 * 256);
        let (start, _) = a.alloc(4).unwrap();
        a.committed();
        let word = (start / 64) as usize;
        let bad = start + 5;
        assert_eq!(bad / 64, start / 64, "same bitmap word");
        a.quarantine(bad);
        a.alloc(1).unwrap(); // dirties the word
        let mut tx = crate::journal::Tx::new();
        a.stage(&mut tx);
        let written = tx
            .value_at(a.bitmap_offset + word as u64 * 8)
            .expect("the word is staged");
        let value = u64::from_le_bytes(written.try_into().unwrap());
        assert_eq!(
            value & 1 << (bad % 64),
            0,
            "the quarantined bit went to media"
        );
        assert_ne!(value & 1 << (start % 64), 0);
        a.committed();
    }
}
