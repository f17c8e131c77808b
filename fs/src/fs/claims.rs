//! The mount's cross-check of what the inodes claim against the bitmap.
//!
//! Checksums catch damage, not a structure that is wrong and consistently
//! checksummed (a bad repair, a bug, an edit): a bitmap that marks a file's
//! blocks free would hand them to the next write, and an extent that
//! points into another file's blocks would make writes to one change the
//! other. So every mount reads what each allocated inode claims (its
//! inline extents come with the inode table, which the mount reads anyway;
//! overflow extent blocks and the xattr block) into a bitmap of its own,
//! and:
//!
//! - a claimed block the bitmap marks free is held in use (and the bitmap
//!   word written at the next change);
//! - a block claimed twice makes every inode that claims it refuse with
//!   `EIO` until fsck gives the later one a copy (fsck itself sees them).
//!
//! An inode that does not read (checksum, fields) is left to the place it
//! is used, which refuses it the same way. The cost is a pass over the
//! inode table already in memory, plus a read per overflow extent block.

use super::{Fs, Ino, Purpose, State};
use crate::error::Result;
use crate::format::{ExtentBlock, Inode, BLOCK, FLAG_INLINE_LINK, INODE_SIZE};
use std::collections::{BTreeMap, BTreeSet};

impl Fs {
    /// Check the claims of every allocated inode of `table` (the inode
    /// table as read at mount) against the bitmap. Returns what was found
    /// and contained.
    pub(super) fn check_claims(&self, table: &[u8], purpose: Purpose) -> Result<Vec<String>> {
        let sb = &self.core.sb;
        let mut st = self.lock()?;
        let mut claimed = vec![0u64; sb.total_blocks.div_ceil(64) as usize];
        let mut shared: BTreeSet<u64> = BTreeSet::new();
        let mut unmarked = 0u64;
        // The claims of every allocated inode that reads (one that does
        // not is refused where it is used).
        let all = |st: &State| {
            table
                .chunks_exact(INODE_SIZE as usize)
                .zip(1..=sb.inode_count)
                .filter(|(raw, ino)| raw[..4] != [0; 4] && !st.damaged.contains(ino))
                .filter_map(|(raw, ino)| {
                    let inode = Inode::decode(raw, ino, sb.inode_offset(ino)).ok()?;
                    Some((ino, self.claims(&inode)?))
                })
                .collect::<Vec<_>>()
        };
        for (_, runs) in all(&st) {
            for &(start, len) in &runs {
                for block in start..start + len {
                    let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
                    if claimed[word] & bit != 0 {
                        shared.insert(block);
                    }
                    claimed[word] |= bit;
                    if !st.alloc.is_used(block) {
                        st.alloc.set(block, true);
                        unmarked += 1;
                    }
                }
            }
        }
        let mut found = Vec::new();
        if unmarked > 0 {
            found.push(format!(
                "{unmarked} blocks that files own were marked free in the allocation bitmap: \
                 held in use (the bitmap is written at the next change)"
            ));
        }
        if !shared.is_empty() && purpose == Purpose::Use {
            // Everyone who claims a shared block: refused until fsck.
            let mut owners: BTreeMap<Ino, u64> = BTreeMap::new();
            for (ino, runs) in all(&st) {
                if let Some(&block) = runs
                    .iter()
                    .find_map(|&(start, len)| shared.range(start..start + len).next())
                {
                    owners.insert(ino, block);
                }
            }
            for (&ino, &block) in &owners {
                refuse(self, &mut st, ino);
                found.push(format!(
                    "inode {ino} shares block {block} with another file: refused until \
                     `daxfs fsck --repair` gives each its own copy"
                ));
            }
        }
        Ok(found)
    }

    /// The block runs `inode` claims (its extents, overflow extent blocks
    /// and xattr block), or `None` when its extents do not read or lie
    /// outside the data area.
    fn claims(&self, inode: &Inode) -> Option<Vec<(u64, u64)>> {
        let sb = &self.core.sb;
        let inside = |start: u64, len: u64| {
            start >= sb.data_start && start.checked_add(len).is_some_and(|e| e <= sb.backup_block)
        };
        let mut runs = Vec::new();
        if inode.xattr_block != 0 {
            runs.push((inode.xattr_block, 1));
        }
        if inode.kind() == libc::S_IFLNK && inode.flags & FLAG_INLINE_LINK != 0 {
            return runs.iter().all(|&(s, l)| inside(s, l)).then_some(runs);
        }
        let mut extents = inode.inline_extents();
        extents.truncate(inode.extent_count as usize);
        let mut next = inode.extent_block;
        let mut raw = vec![0u8; BLOCK as usize];
        while next != 0 && extents.len() < inode.extent_count as usize {
            if !inside(next, 1) || runs.len() > inode.extent_count as usize {
                return None;
            }
            self.core.dev.read(next * BLOCK, &mut raw).ok()?;
            let block = ExtentBlock::decode(&raw, next * BLOCK).ok()?;
            runs.push((next, 1));
            extents.extend(block.extents);
            next = block.next;
        }
        runs.extend(extents.iter().map(|e| (e.physical, e.len as u64)));
        runs.iter().all(|&(s, l)| inside(s, l)).then_some(runs)
    }
}

/// Make inode `ino` refuse every call (`EIO` naming it) for this mount.
fn refuse(fs: &Fs, st: &mut State, ino: Ino) {
    st.damaged.insert(ino);
    fs.forget_cached(st, ino);
}
