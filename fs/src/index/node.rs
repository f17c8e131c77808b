//! The nodes of the index: a 64-way radix tree over PMD numbers (the page
//! index divided by 512) whose bottom slots hold either a PMD entry or a leaf
//! of 512 PTE slots.
//!
//! ```text
//!   Upper (shift 12)     slot = (pmd >> 12) & 63 ──► Upper (shift 6) ──► Upper (shift 0)
//!   Upper (shift 0)      slot = pmd & 63: 0 | PMD entry | pointer to a Leaf
//!   Leaf                 slot = index & 511: 0 | PTE entry
//! ```
//!
//! A slot is one `AtomicU64`: 0 is empty, an odd word is an entry (see
//! [`super::entry`]), an even non-zero word is a pointer to the child node
//! (an `Upper` above shift 0, a `Leaf` at shift 0). Each node also keeps, per
//! tag, a bitmap of its slots whose entry, or whose subtree, carries the tag,
//! and a count of its non-empty slots, so that an empty node can be unlinked.
//!
//! Readers walk the tree with no lock under a crossbeam-epoch guard; writers
//! change it under the index's writer lock, publish a node only once it is
//! initialised (release stores), and free an unlinked node through the epoch
//! collector, after every reader that could still see it has left.

use super::entry::{Entry, Tag};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Slots of an upper node, and the bits of the PMD number each level takes.
pub(crate) const UPPER_SLOTS: usize = 64;
pub(crate) const UPPER_BITS: u32 = 6;
/// Slots of a leaf: the 512 PTEs of one PMD range.
pub(crate) const LEAF_SLOTS: usize = 512;
const LEAF_WORDS: usize = LEAF_SLOTS / 64;

pub(crate) struct Upper {
    /// Which bits of the PMD number choose the slot: `(pmd >> shift) & 63`.
    pub(crate) shift: u32,
    pub(crate) slots: [AtomicU64; UPPER_SLOTS],
    pub(crate) tags: [AtomicU64; 2],
    pub(crate) used: AtomicU32,
}

pub(crate) struct Leaf {
    pub(crate) slots: [AtomicU64; LEAF_SLOTS],
    pub(crate) tags: [[AtomicU64; LEAF_WORDS]; 2],
    pub(crate) used: AtomicU32,
}

/// What a slot holds, decoded.
pub(crate) enum Slot {
    Empty,
    Entry(Entry),
    Node(u64),
}

pub(crate) fn decode(raw: u64) -> Slot {
    match raw {
        0 => Slot::Empty,
        raw => match Entry::from_raw(raw) {
            Some(entry) => Slot::Entry(entry),
            None => Slot::Node(raw),
        },
    }
}

impl Upper {
    pub(crate) fn new(shift: u32) -> Box<Upper> {
        Box::new(Upper {
            shift,
            slots: [const { AtomicU64::new(0) }; UPPER_SLOTS],
            tags: [const { AtomicU64::new(0) }; 2],
            used: AtomicU32::new(0),
        })
    }

    /// The slot that leads to PMD number `pmd`.
    pub(crate) fn slot_of(&self, pmd: u64) -> usize {
        ((pmd >> self.shift) & (UPPER_SLOTS as u64 - 1)) as usize
    }

    /// Whether `pmd` lies within the range this node covers, taken as a root.
    pub(crate) fn reaches(&self, pmd: u64) -> bool {
        let bits = self.shift + UPPER_BITS;
        bits >= 64 || pmd >> bits == 0
    }

    pub(crate) fn has_tag(&self, tag: Tag) -> bool {
        self.tags[tag.bit()].load(Relaxed) != 0
    }

    pub(crate) fn tag_bit(&self, tag: Tag, slot: usize) -> bool {
        self.tags[tag.bit()].load(Relaxed) & (1 << slot) != 0
    }

    /// Set or clear one tag bit; returns whether the node's summary (any bit
    /// set) changed.
    pub(crate) fn set_tag_bit(&self, tag: Tag, slot: usize, on: bool) -> bool {
        let word = &self.tags[tag.bit()];
        let before = word.load(Relaxed);
        let after = if on {
            before | (1 << slot)
        } else {
            before & !(1 << slot)
        };
        word.store(after, Relaxed);
        (before != 0) != (after != 0)
    }
}

impl Leaf {
    pub(crate) fn new() -> Box<Leaf> {
        Box::new(Leaf {
            slots: [const { AtomicU64::new(0) }; LEAF_SLOTS],
            tags: [const { [const { AtomicU64::new(0) }; LEAF_WORDS] }; 2],
            used: AtomicU32::new(0),
        })
    }

    pub(crate) fn has_tag(&self, tag: Tag) -> bool {
        self.tags[tag.bit()].iter().any(|w| w.load(Relaxed) != 0)
    }

    pub(crate) fn tag_bit(&self, tag: Tag, slot: usize) -> bool {
        self.tags[tag.bit()][slot / 64].load(Relaxed) & (1 << (slot % 64)) != 0
    }

    /// Set or clear one tag bit; returns whether the leaf's summary changed.
    pub(crate) fn set_tag_bit(&self, tag: Tag, slot: usize, on: bool) -> bool {
        let had = self.has_tag(tag);
        let word = &self.tags[tag.bit()][slot / 64];
        let bit = 1 << (slot % 64);
        let before = word.load(Relaxed);
        word.store(if on { before | bit } else { before & !bit }, Relaxed);
        had != self.has_tag(tag)
    }

    /// The first tagged slot at or after `from`.
    pub(crate) fn next_tagged(&self, tag: Tag, from: usize) -> Option<usize> {
        let words = &self.tags[tag.bit()];
        let mut word = from / 64;
        let mut mask = !0u64 << (from % 64);
        while word < LEAF_WORDS {
            let bits = words[word].load(Relaxed) & mask;
            if bits != 0 {
                return Some(word * 64 + bits.trailing_zeros() as usize);
            }
            word += 1;
            mask = !0;
        }
        None
    }

    /// The first non-empty slot at or after `from`, with its entry.
    pub(crate) fn next_entry(&self, from: usize) -> Option<(usize, Entry)> {
        (from..LEAF_SLOTS).find_map(|slot| {
            Entry::from_raw(self.slots[slot].load(std::sync::atomic::Ordering::Acquire))
                .map(|entry| (slot, entry))
        })
    }
}

/// Free a whole subtree. Only for a tree nobody else can see any more.
///
/// # Safety
/// `node` must be an upper node of an index, owned exclusively by the caller
/// (no reader, guard or collector can reach it or anything below it).
pub(crate) unsafe fn free_upper(node: *mut Upper) {
    // SAFETY: the caller owns the subtree exclusively.
    let node = unsafe { Box::from_raw(node) };
    for slot in &node.slots {
        if let Slot::Node(child) = decode(slot.load(Relaxed)) {
            if node.shift == 0 {
                // SAFETY: at shift 0, child pointers are leaves of this subtree.
                drop(unsafe { Box::from_raw(child as *mut Leaf) });
            } else {
                // SAFETY: above shift 0, child pointers are upper nodes.
                unsafe { free_upper(child as *mut Upper) };
            }
        }
    }
}
