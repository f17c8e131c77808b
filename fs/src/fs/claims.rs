//! The mount's pass over the inode table: which inodes are free, which
//! sit on poisoned media, and a cross-check of what the others claim
//! against the bitmap.
//!
//! Checksums catch damage, not a structure that is wrong and consistently
//! checksummed (a bad repair, a bug, an edit): a bitmap that marks a file's
//! blocks free would hand them to the next write, and an extent that
//! points into another file's blocks would make writes to one change the
//! other. So the mount, while it reads the inode table anyway, collects
//! what each allocated inode claims (its inline extents are in the inode;
//! overflow extent blocks and the xattr block) into a bitmap of its own,
//! and:
//!
//! - a claimed block the bitmap marks free is held in use (and the bitmap
//!   word written at the next change);
//! - a block claimed twice makes every inode that claims it refuse with
//!   `EIO` until fsck gives the later one a copy (fsck sees them itself).
//!
//! An inode that does not read (checksum, fields) is left to the place it
//! is used, which refuses it the same way. The table is read a piece at a
//! time, so the pass needs no memory the size of the table.

use super::Ino;
use crate::alloc::Allocator;
use crate::error::Result;
use crate::format::{ExtentBlock, Inode, Superblock, BLOCK, INODE_SIZE};
use pmem::Device;
use std::collections::BTreeSet;

/// Inodes read at a time.
const CHUNK_INODES: u64 = 8192;

/// Call `each(ino, raw)` for every inode slot of the table, in order;
/// `raw` is `None` for a slot on poisoned media.
pub(super) fn scan_table(
    dev: &Device,
    sb: &Superblock,
    mut each: impl FnMut(Ino, Option<&[u8]>),
) -> Result<()> {
    let table_at = sb.inode_table_start * BLOCK;
    let mut chunk = vec![0u8; (CHUNK_INODES * INODE_SIZE) as usize];
    let mut first = 1;
    while first <= sb.inode_count {
        let count = CHUNK_INODES.min(sb.inode_count - first + 1);
        let buf = &mut chunk[..(count * INODE_SIZE) as usize];
        let at = table_at + (first - 1) * INODE_SIZE;
        // Slots on poisoned sectors, as (first, last) inode numbers.
        let mut poisoned: Vec<(Ino, Ino)> = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let got = dev.read_mcsafe(at + pos as u64, &mut buf[pos..])?;
            pos += got.copied;
            if let Some(poison) = got.poison {
                let sector_end = ((poison / pmem::SECTOR + 1) * pmem::SECTOR - at) as usize;
                poisoned.push((
                    first + (poison - at) / INODE_SIZE,
                    first + (sector_end as u64).div_ceil(INODE_SIZE) - 1,
                ));
                pos = sector_end;
            }
        }
        for (i, raw) in buf.chunks_exact(INODE_SIZE as usize).enumerate() {
            let ino = first + i as u64;
            let bad = poisoned.iter().any(|&(a, b)| (a..=b).contains(&ino));
            each(ino, (!bad).then_some(raw));
        }
        first += count;
    }
    Ok(())
}

/// What the allocated inodes claim, gathered during the table pass.
pub(super) struct Claims<'a> {
    dev: &'a Device,
    sb: &'a Superblock,
    claimed: Vec<u64>,
    shared: BTreeSet<u64>,
}

impl<'a> Claims<'a> {
    pub(super) fn new(dev: &'a Device, sb: &'a Superblock) -> Claims<'a> {
        Claims {
            dev,
            sb,
            claimed: vec![0; sb.total_blocks.div_ceil(64) as usize],
            shared: BTreeSet::new(),
        }
    }

    /// Add what allocated inode `ino` (read as `raw`) claims.
    pub(super) fn add(&mut self, ino: Ino, raw: &[u8]) {
        let Some(runs) = self.runs(ino, raw) else {
            return;
        };
        for (start, len) in runs {
            for block in start..start + len {
                let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
                if self.claimed[word] & bit != 0 {
                    self.shared.insert(block);
                }
                self.claimed[word] |= bit;
            }
        }
    }

    /// The block runs inode `ino` claims (its extents, overflow extent
    /// blocks and xattr block), or `None` when it does not read or its
    /// extents do not (refused where it is used).
    fn runs(&self, ino: Ino, raw: &[u8]) -> Option<Vec<(u64, u64)>> {
        let sb = self.sb;
        let inode = Inode::decode(raw, ino, sb.inode_offset(ino)).ok()?;
        let inside = |start: u64, len: u64| {
            start >= sb.data_start && start.checked_add(len).is_some_and(|e| e <= sb.backup_block)
        };
        let mut runs = Vec::new();
        if inode.xattr_block != 0 {
            let chain = super::xattr::chain_blocks(self.dev, sb, inode.xattr_block);
            runs.extend(chain.into_iter().map(|b| (b, 1)));
        }
        if !inode.has_extents() {
            return runs.iter().all(|&(s, l)| inside(s, l)).then_some(runs);
        }
        let mut extents = inode.inline_extents();
        extents.truncate(inode.extent_count as usize);
        let mut next = inode.extent_block;
        // (Most inodes have no overflow chain: no buffer for them.)
        let mut raw = Vec::new();
        while next != 0 && extents.len() < inode.extent_count as usize {
            if !inside(next, 1) || runs.len() > inode.extent_count as usize {
                return None;
            }
            raw.resize(BLOCK as usize, 0);
            self.dev.read(next * BLOCK, &mut raw).ok()?;
            let block = ExtentBlock::decode(&raw, next * BLOCK).ok()?;
            runs.push((next, 1));
            extents.extend(block.extents);
            next = block.next;
        }
        runs.extend(extents.iter().map(|e| (e.physical, e.len as u64)));
        runs.iter().all(|&(s, l)| inside(s, l)).then_some(runs)
    }

    /// Hold every claimed block in use in `alloc`. Returns how many were
    /// marked free, and the blocks claimed more than once.
    pub(super) fn apply(self, alloc: &mut Allocator) -> (u64, BTreeSet<u64>) {
        let mut unmarked = 0;
        for (word, &bits) in self.claimed.iter().enumerate() {
            if bits != 0 {
                unmarked += alloc.hold(word, bits);
            }
        }
        (unmarked, self.shared)
    }

    /// Every inode that claims one of `shared`, with one such block: a
    /// second pass over the table, made only when some block is shared.
    pub(super) fn claimants(
        dev: &Device,
        sb: &Superblock,
        shared: &BTreeSet<u64>,
    ) -> Result<Vec<(Ino, u64)>> {
        let claims = Claims::new(dev, sb);
        let mut found = Vec::new();
        scan_table(dev, sb, |ino, raw| {
            let Some(raw) = raw.filter(|r| r[..4] != [0; 4]) else {
                return;
            };
            if let Some(block) = claims.runs(ino, raw).and_then(|runs| {
                runs.iter()
                    .find_map(|&(start, len)| shared.range(start..start + len).next().copied())
            }) {
                found.push((ino, block));
            }
        })?;
        Ok(found)
    }
}
