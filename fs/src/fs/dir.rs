//! A directory's index in memory: name to slot, and slots in order.
//!
//! On media a directory is an array of blocks of 32-byte slots (see
//! [`crate::format`]); lookups must not scan it, so the first access to a
//! directory reads it once into a hash map (as NOVA keeps its directory
//! indexes in DRAM), and every later lookup, insert and remove is O(1).
//! Slot positions never change, so they serve as `readdir` offsets that stay
//! valid while the directory changes.

use crate::format::{Dirent, SLOTS_PER_BLOCK};
use std::collections::{BTreeMap, HashMap};

/// Where an entry lives and what it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// `block index in the directory * 128 + slot in the block`.
    pub pos: u64,
    pub ino: u64,
    pub kind: u8,
    pub slots: usize,
}

#[derive(Debug, Default)]
pub struct DirIndex {
    by_name: HashMap<Vec<u8>, Slot>,
    by_pos: BTreeMap<u64, Vec<u8>>,
    /// Per directory block, a bitmap of its used slots.
    used: Vec<u128>,
    /// Bytes of the names held (for the cost estimate).
    name_bytes: usize,
}

impl DirIndex {
    pub fn with_blocks(blocks: usize) -> DirIndex {
        DirIndex {
            used: vec![0; blocks],
            ..DirIndex::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// What the index costs in memory, roughly: per entry the name twice
    /// (both maps own it), its slot, and the maps' overhead.
    pub fn cost(&self) -> usize {
        std::mem::size_of::<DirIndex>()
            + self.by_name.len() * 150
            + self.name_bytes * 2
            + self.used.len() * 16
    }

    pub fn blocks(&self) -> usize {
        self.used.len()
    }

    pub fn get(&self, name: &[u8]) -> Option<&Slot> {
        self.by_name.get(name)
    }

    /// Record an entry found (or written) at `pos`.
    pub fn insert(&mut self, dirent: &Dirent, pos: u64, slots: usize) {
        let block = (pos / SLOTS_PER_BLOCK as u64) as usize;
        let first = (pos % SLOTS_PER_BLOCK as u64) as usize;
        if block >= self.used.len() {
            self.used.resize(block + 1, 0);
        }
        self.used[block] |= run_mask(first, slots);
        self.by_pos.insert(pos, dirent.name.clone());
        self.name_bytes += dirent.name.len();
        self.by_name.insert(
            dirent.name.clone(),
            Slot {
                pos,
                ino: dirent.ino,
                kind: dirent.kind,
                slots,
            },
        );
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Slot> {
        let slot = self.by_name.remove(name)?;
        self.by_pos.remove(&slot.pos);
        self.name_bytes = self.name_bytes.saturating_sub(name.len());
        let block = (slot.pos / SLOTS_PER_BLOCK as u64) as usize;
        let first = (slot.pos % SLOTS_PER_BLOCK as u64) as usize;
        self.used[block] &= !run_mask(first, slot.slots);
        Some(slot)
    }

    /// Point an existing name at another inode (rename over, exchange).
    pub fn retarget(&mut self, name: &[u8], ino: u64, kind: u8) {
        if let Some(slot) = self.by_name.get_mut(name) {
            slot.ino = ino;
            slot.kind = kind;
        }
    }

    /// The first position with `slots` free consecutive slots in one block,
    /// or `None` when every block is too full (a new block is needed).
    pub fn find_room(&self, slots: usize) -> Option<u64> {
        self.used.iter().enumerate().find_map(|(block, &used)| {
            // Bit p of `starts` is set when slots p..p + slots are all free
            // (shifting brings in used bits past the block's end).
            let free = !used;
            let starts = (1..slots).fold(free, |m, i| m & (free >> i));
            (starts != 0)
                .then(|| (block * SLOTS_PER_BLOCK + starts.trailing_zeros() as usize) as u64)
        })
    }

    pub fn add_block(&mut self) {
        self.used.push(0);
    }

    /// Entries at positions `>= from`, in position order.
    pub fn entries_from(&self, from: u64) -> impl Iterator<Item = (u64, &[u8], &Slot)> + '_ {
        self.by_pos
            .range(from..)
            .map(|(&pos, name)| (pos, name.as_slice(), &self.by_name[name]))
    }
}

fn run_mask(first: usize, slots: usize) -> u128 {
    let run = if slots >= 128 {
        u128::MAX
    } else {
        (1u128 << slots) - 1
    };
    run << first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_found_around_used_slots() {
        let mut d = DirIndex::with_blocks(1);
        let e = |name: &[u8]| Dirent {
            ino: 5,
            kind: 8,
            name: name.to_vec(),
        };
        d.insert(&e(b"a"), 0, 1);
        d.insert(&e(b"b"), 3, 2);
        assert_eq!(d.find_room(2), Some(1));
        assert_eq!(d.find_room(3), Some(5));
        d.remove(b"a");
        assert_eq!(d.find_room(3), Some(0));
        let names: Vec<&[u8]> = d.entries_from(0).map(|(_, n, _)| n).collect();
        assert_eq!(names, vec![b"b".as_slice()]);
        // A run never spills past a block's end into the next block.
        let mut d = DirIndex::with_blocks(2);
        d.insert(&e(b"a"), 0, 125);
        assert_eq!(d.find_room(3), Some(125));
        assert_eq!(d.find_room(4), Some(128));
        d.insert(&e(b"b"), 125, 3);
        assert_eq!(d.find_room(1), Some(128));
    }
}
