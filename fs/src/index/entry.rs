//! What an entry is: a device page number, an order and flags, packed into one
//! machine word so that a reader loads it whole or not at all.
//!
//! ## Encoding (one `u64` in a slot)
//!
//! ```text
//!  63                              12 11      6 5   4   3   2   1   0
//! +----------------------------------+---------+---+---+---+---+---+---+
//! | device page number (52 bits)     |    0    | P | E | Z | M | L | 1 |
//! +----------------------------------+---------+---+---+---+---+---+---+
//!   P poisoned   E empty (placeholder)   Z zero page   M PMD (order 9)
//!   L locked     1 marks a value, as opposed to a node pointer (bit 0 = 0)
//! ```
//!
//! A slot that holds `0` is empty. The tags (dirty, towrite) are not in the
//! word: they live in per-node bitmaps, summarised up the tree.

use std::fmt;

pub(crate) const VALUE: u64 = 1 << 0;
pub(crate) const LOCKED: u64 = 1 << 1;
const PMD: u64 = 1 << 2;
const ZERO: u64 = 1 << 3;
const EMPTY: u64 = 1 << 4;
const POISONED: u64 = 1 << 5;
const FLAG_BITS: u32 = 12;
/// The largest device page number an entry can hold.
pub const MAX_PFN: u64 = (1 << (64 - FLAG_BITS)) - 1;

/// 4 KiB pages in one PMD entry.
pub const PMD_PAGES: u64 = 512;

/// The size of a mapping an entry stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Order {
    /// One 4 KiB page (a PTE mapping).
    Pte,
    /// 512 aligned pages, 2 MiB (a PMD mapping).
    Pmd,
}

impl Order {
    /// Pages covered.
    pub fn pages(self) -> u64 {
        match self {
            Order::Pte => 1,
            Order::Pmd => PMD_PAGES,
        }
    }

    /// The first index of the aligned range of this order that holds `index`.
    pub fn align(self, index: u64) -> u64 {
        index & !(self.pages() - 1)
    }

    /// log2 of the number of pages: 0 or 9, as Linux counts orders.
    pub fn shift(self) -> u32 {
        self.pages().trailing_zeros()
    }
}

/// A tag: a bit kept per entry, found quickly by `find_next_tagged`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tag {
    /// The entry's page was written through a mapping and needs flushing.
    Dirty,
    /// Writeback has chosen the entry (Linux's `PAGECACHE_TAG_TOWRITE`).
    Towrite,
}

impl Tag {
    pub(crate) const ALL: [Tag; 2] = [Tag::Dirty, Tag::Towrite];

    pub(crate) fn bit(self) -> usize {
        self as usize
    }
}

/// An entry: a mapping of one 4 KiB page or one 2 MiB page of a file.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry(u64);

impl Entry {
    /// A mapping of device page `pfn` (4 KiB pages from the device start).
    /// For a PMD, `pfn` is the first of 512 contiguous pages.
    ///
    /// # Panics
    /// If `pfn` exceeds [`MAX_PFN`] (a device of 2^64 bytes): a caller bug.
    pub fn new(order: Order, pfn: u64) -> Entry {
        assert!(pfn <= MAX_PFN, "device page {pfn:#x} does not fit an entry");
        Entry::with_flags(order, pfn, 0)
    }

    /// A hole mapped to the shared zero page.
    pub fn zero(order: Order) -> Entry {
        Entry::with_flags(order, 0, ZERO)
    }

    /// A placeholder, inserted locked while a fault allocates.
    pub fn empty(order: Order) -> Entry {
        Entry::with_flags(order, 0, EMPTY)
    }

    fn with_flags(order: Order, pfn: u64, flags: u64) -> Entry {
        let pmd = if order == Order::Pmd { PMD } else { 0 };
        Entry((pfn << FLAG_BITS) | pmd | flags | VALUE)
    }

    /// The same entry, marked poisoned.
    pub fn poisoned(self) -> Entry {
        Entry(self.0 | POISONED)
    }

    /// The same entry without the poisoned mark.
    pub fn unpoisoned(self) -> Entry {
        Entry(self.0 & !POISONED)
    }

    /// The device page number (meaningless for zero and empty entries).
    pub fn pfn(self) -> u64 {
        self.0 >> FLAG_BITS
    }

    /// PTE or PMD.
    pub fn order(self) -> Order {
        if self.0 & PMD != 0 {
            Order::Pmd
        } else {
            Order::Pte
        }
    }

    /// Whether someone holds the entry's lock.
    pub fn is_locked(self) -> bool {
        self.0 & LOCKED != 0
    }

    /// Whether the entry maps the zero page (a hole).
    pub fn is_zero(self) -> bool {
        self.0 & ZERO != 0
    }

    /// Whether the entry is a placeholder.
    pub fn is_empty(self) -> bool {
        self.0 & EMPTY != 0
    }

    /// Whether the page is poisoned.
    pub fn is_poisoned(self) -> bool {
        self.0 & POISONED != 0
    }

    /// Whether the entry maps real device pages (neither zero nor empty).
    pub fn is_mapped(self) -> bool {
        self.0 & (ZERO | EMPTY) == 0
    }

    /// The entry as its lock holder sees it, without the lock bit: what
    /// [`load`](super::EntryIndex::load) compares equal to once unlocked.
    pub fn unlocked(self) -> Entry {
        Entry(self.0 & !LOCKED)
    }

    pub(crate) fn raw(self) -> u64 {
        self.0
    }

    pub(crate) fn from_raw(raw: u64) -> Option<Entry> {
        (raw & VALUE != 0).then_some(Entry(raw))
    }

    pub(crate) fn locked(self) -> Entry {
        Entry(self.0 | LOCKED)
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.order())?;
        if self.is_zero() {
            f.write_str("(zero")?;
        } else if self.is_empty() {
            f.write_str("(empty")?;
        } else {
            write!(f, "(pfn {:#x}", self.pfn())?;
        }
        if self.is_locked() {
            f.write_str(", locked")?;
        }
        if self.is_poisoned() {
            f.write_str(", poisoned")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_their_fields() {
        let e = Entry::new(Order::Pmd, MAX_PFN);
        assert_eq!((e.order(), e.pfn()), (Order::Pmd, MAX_PFN));
        assert!(e.is_mapped() && !e.is_locked() && !e.is_zero() && !e.is_empty());
        let z = Entry::zero(Order::Pte).locked().poisoned();
        assert!(z.is_zero() && z.is_locked() && z.is_poisoned() && !z.is_mapped());
        assert_eq!(z.unlocked().unpoisoned(), Entry::zero(Order::Pte));
        assert!(Entry::empty(Order::Pmd).is_empty());
        assert_eq!(Entry::from_raw(0), None);
        assert_eq!(Order::Pmd.align(1023), 512);
        assert_eq!(Order::Pmd.shift(), 9);
    }
}
