//! The entry index: per file, which mappings exist, at which order, locked by
//! whom. The analog of the XArray that Linux's `fs/dax.c` keeps per
//! `address_space`.
//!
//! # Semantics
//!
//! The index is keyed by 4 KiB page index (`u64`). An [`Entry`] has order
//! [`Order::Pte`] (one page) or [`Order::Pmd`] (512 pages, aligned: a PMD entry
//! stored at any index of its range sits at the range's first index and
//! answers for all 512).
//!
//! * [`load(i)`](EntryIndex::load) returns the entry that covers `i`. It never
//!   blocks and never sees a torn entry (an entry is one atomic word).
//! * [`store(i, entry)`](EntryIndex::store) puts `entry` at `i` (aligned down
//!   for a PMD). It replaces an unlocked entry of exactly the same extent
//!   (keeping its tags), and refuses, naming the entry in the way, when the new
//!   entry would overlap an entry of another extent ([`IndexError::Conflict`])
//!   or when the entry there is locked ([`IndexError::Locked`]). It never
//!   erases an entry it did not replace: a PMD store over a range that holds a
//!   PTE entry fails, whatever `load` of the first index says (the bug of Linux
//!   commit "dax: Fix huge page faults").
//! * [`erase(i)`](EntryIndex::erase) removes the unlocked entry covering `i`,
//!   and its tags.
//! * [`find_conflict(i, order)`](EntryIndex::find_conflict) returns an entry
//!   that overlaps the aligned range of `order` holding `i`, if any: for a PMD
//!   range, a PMD entry or any PTE entry inside it (`xas_find_conflict`).
//! * [`range`](EntryIndex::range) iterates, in index order, over the entries
//!   that overlap a range, each once, with its first index.
//! * Tags ([`Tag::Dirty`], [`Tag::Towrite`]) belong to an entry: set, clear
//!   and test them through any index the entry covers. Each node keeps a
//!   bitmap per tag summarising its subtree, so
//!   [`find_next_tagged`](EntryIndex::find_next_tagged) skips untagged
//!   subtrees. [`mark_dirty`](EntryIndex::mark_dirty) tags the entry covering
//!   an index dirty, refusing holes and placeholders: a PTE-sized write into a
//!   real PMD entry dirties the whole PMD.
//!
//! # Entry locks
//!
//! [`lock_entry(i, order)`](EntryIndex::lock_entry) returns an [`EntryGuard`]
//! on the entry covering `i` (for a PMD entry, the whole PMD, whichever of its
//! pages was asked for), waiting while someone else holds it. When nothing
//! covers `i` it inserts a locked empty placeholder of the requested order,
//! unless that would overlap an entry, in which case it returns the entry in
//! the way at once, without waiting, even if that entry is locked (so a PMD
//! fault falls back to PTE instead of sleeping on a PTE entry: Linux commit
//! "dax: Fix missed wakeup with PMD faults"). A PMD request that finds a PTE
//! entry at `i` gets it back the same way.
//! [`try_lock_entry`](EntryIndex::try_lock_entry) never waits.
//!
//! The lock is a bit in the entry word. Waiters sleep in a process-wide table
//! of buckets hashed by (index, first index of the entry) — see `wait.rs` for
//! the protocol and why no wake-up is lost — and are woken when the holder
//! drops its guard. A woken waiter looks again from the start, so one whose
//! entry changed size while it slept (a PMD downgraded to PTEs) sees the new
//! shape. While holding a guard, its owner may [`set`](EntryGuard::set) the
//! entry (fill a PMD placeholder with a real PMD), [`erase`](EntryGuard::erase)
//! it, or [`downgrade`](EntryGuard::downgrade) a zero or empty PMD into a
//! locked PTE placeholder (Linux's `grab_mapping_entry` rule), each atomic.
//!
//! # Concurrency
//!
//! Readers (`load`, `find_conflict`, iteration, tag tests) take no lock: they
//! walk the tree under a crossbeam-epoch guard. Writers (`store`, `erase`, tag
//! changes, inserting placeholders, guard transitions) serialise on the
//! index's writer lock. Taking an existing unlocked entry's lock is a single
//! compare-and-swap on its word, with no lock at all; unlocking is a store and
//! a look at the wait bucket. Lock order: the writer lock is never held while
//! waiting for an entry.

mod entry;
mod node;
mod sync;
mod wait;

pub use entry::{Entry, Order, Tag, MAX_PFN, PMD_PAGES};

use crossbeam_epoch::{self as epoch, Guard};
use node::{decode, Leaf, Slot, Upper, LEAF_SLOTS, UPPER_BITS, UPPER_SLOTS};
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicPtr, AtomicU64};
use std::sync::Mutex;
use wait::WaitKey;

/// Why an index operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// An entry of another extent overlaps the range.
    #[error("an entry is in the way: {0:?}")]
    Conflict(Entry),
    /// The entry is locked by someone else.
    #[error("the entry is locked: {0:?}")]
    Locked(Entry),
    /// No entry covers the index.
    #[error("no entry there")]
    Missing,
    /// The entry is not in a state the operation accepts.
    #[error("the entry cannot take this change: {0:?}")]
    WrongState(Entry),
}

/// A per-file index of DAX entries. See the [module documentation](self).
pub struct EntryIndex {
    /// Identifies this index in the shared wait table.
    id: u64,
    /// The top node (null while the index has never held anything).
    root: AtomicPtr<Upper>,
    /// Serialises every change of the tree's shape, slots and tags (except
    /// the lock bit of an existing entry, which is changed by CAS).
    writer: Mutex<()>,
}

// SAFETY: the raw node pointers are owned by the index; nodes are only freed
// by the writer (under the writer lock, through the epoch collector) or by
// `Drop`, which has exclusive access. Every shared access is atomic.
unsafe impl Send for EntryIndex {}
// SAFETY: as above.
unsafe impl Sync for EntryIndex {}

impl Default for EntryIndex {
    fn default() -> Self {
        EntryIndex::new()
    }
}

impl std::fmt::Debug for EntryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.range(..)).finish()
    }
}

/// Where the entry covering an index was found.
enum Found<'g> {
    /// An entry, in this slot, whose range starts at `base`.
    Entry {
        slot: &'g AtomicU64,
        entry: Entry,
        base: u64,
    },
    /// Nothing covers the index, but the PMD range has a leaf of PTE entries.
    PtesAround(&'g Leaf),
    /// Nothing in the whole PMD range.
    Nothing,
}

/// A path from the root to a bottom slot, for writers: the upper nodes and
/// the slot taken in each, root first.
struct Path {
    steps: [(*const Upper, usize); 11],
    len: usize,
}

impl Path {
    fn push(&mut self, node: *const Upper, slot: usize) {
        self.steps[self.len] = (node, slot);
        self.len += 1;
    }

    /// The bottom step: the shift-0 node and the slot of the PMD number.
    fn bottom(&self) -> (&Upper, usize) {
        let (node, slot) = self.steps[self.len - 1];
        // SAFETY: paths are built and used under the writer lock, which keeps
        // every node on them linked (and so alive).
        (unsafe { &*node }, slot)
    }
}

impl EntryIndex {
    /// An empty index.
    pub fn new() -> EntryIndex {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        EntryIndex {
            id: NEXT_ID.fetch_add(1, Relaxed),
            root: AtomicPtr::new(std::ptr::null_mut()),
            writer: Mutex::new(()),
        }
    }

    // ---- readers ----------------------------------------------------------

    /// The entry covering page `index`, if any (with its lock bit as it is).
    pub fn load(&self, index: u64) -> Option<Entry> {
        let guard = epoch::pin();
        match self.find(index, &guard) {
            Found::Entry { entry, .. } => Some(entry),
            _ => None,
        }
    }

    /// An entry overlapping the `order`-aligned range that holds `index`.
    pub fn find_conflict(&self, index: u64, order: Order) -> Option<Entry> {
        let guard = epoch::pin();
        match (self.find(index, &guard), order) {
            (Found::Entry { entry, .. }, _) => Some(entry),
            (Found::PtesAround(leaf), Order::Pmd) => first_pte(leaf),
            _ => None,
        }
    }

    /// The entries overlapping `range`, in index order, each with the first
    /// index of its own range (`..` covers every page, `u64::MAX` included).
    pub fn range(&self, range: impl RangeBounds<u64>) -> impl Iterator<Item = (u64, Entry)> + '_ {
        let start = match range.start_bound() {
            Bound::Included(&s) => Some(s),
            Bound::Excluded(&s) => s.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        // The last page of the range, inclusive (None: the range is empty).
        let last = match range.end_bound() {
            Bound::Included(&e) => Some(e),
            Bound::Excluded(&e) => e.checked_sub(1),
            Bound::Unbounded => Some(u64::MAX),
        };
        let mut next = match (start, last) {
            (Some(s), Some(l)) if s <= l => Some(s),
            _ => None,
        };
        let last = last.unwrap_or(0);
        std::iter::from_fn(move || {
            let from = next?;
            let guard = epoch::pin();
            let found = self
                .next_entry(from, None, &guard)
                .filter(|&(base, _)| base <= last);
            next = found.and_then(|(base, entry)| base.checked_add(entry.order().pages()));
            next = next.filter(|&n| n <= last);
            found
        })
    }

    /// Whether the entry covering `index` carries `tag`.
    pub fn get_tag(&self, index: u64, tag: Tag) -> bool {
        let guard = epoch::pin();
        let pmd = index >> 9;
        let Some((bottom, slot)) = self.bottom_slot(pmd, &guard) else {
            return false;
        };
        match decode(bottom.slots[slot].load(Acquire)) {
            Slot::Entry(_) => bottom.tag_bit(tag, slot),
            // SAFETY: a node pointer at shift 0 is a leaf, alive while pinned.
            Slot::Node(leaf) => unsafe { &*(leaf as *const Leaf) }.tag_bit(tag, leaf_slot(index)),
            Slot::Empty => false,
        }
    }

    /// The first entry at or after `start` (one that covers `start` counts)
    /// carrying `tag`, with the first index of its range. Untagged subtrees
    /// are skipped through the tag summaries.
    pub fn find_next_tagged(&self, start: u64, tag: Tag) -> Option<(u64, Entry)> {
        let guard = epoch::pin();
        self.next_entry(start, Some(tag), &guard)
    }

    // ---- writers ----------------------------------------------------------

    /// Store `entry` at `index` (its first index, for a PMD). Returns the entry
    /// it replaced. See the module documentation for what is refused.
    pub fn store(&self, index: u64, entry: Entry) -> Result<Option<Entry>, IndexError> {
        let entry = entry.unlocked();
        let _writer = self.lock_writer();
        let guard = epoch::pin();
        match (self.find(index, &guard), entry.order()) {
            (Found::Entry { entry: old, .. }, _) if old.order() != entry.order() => {
                Err(IndexError::Conflict(old))
            }
            (Found::Entry { entry: old, .. }, _) if old.is_locked() => Err(IndexError::Locked(old)),
            (
                Found::Entry {
                    slot, entry: old, ..
                },
                _,
            ) => {
                // A CAS, not a store: the entry's lock may be taken meanwhile.
                match slot.compare_exchange(old.raw(), entry.raw(), SeqCst, Acquire) {
                    Ok(_) => Ok(Some(old)),
                    Err(now) => Err(locked_now(now)),
                }
            }
            (Found::PtesAround(leaf), Order::Pmd) => match first_pte(leaf) {
                Some(pte) => Err(IndexError::Conflict(pte)),
                None => unreachable!("a linked leaf holds an entry while the writer lock is held"),
            },
            (_, order) => {
                self.insert(index, order, entry);
                Ok(None)
            }
        }
    }

    /// Remove the unlocked entry covering `index`, with its tags; returns it.
    pub fn erase(&self, index: u64) -> Result<Option<Entry>, IndexError> {
        let _writer = self.lock_writer();
        let guard = epoch::pin();
        match self.find(index, &guard) {
            Found::Entry { entry, .. } if entry.is_locked() => Err(IndexError::Locked(entry)),
            Found::Entry { entry, base, .. } => {
                self.remove(base, entry.order(), entry.raw())
                    .map_err(locked_now)?;
                Ok(Some(entry))
            }
            _ => Ok(None),
        }
    }

    /// Set `tag` on the entry covering `index`; false when there is none.
    pub fn set_tag(&self, index: u64, tag: Tag) -> bool {
        self.change_tag(index, tag, true).is_some()
    }

    /// Clear `tag` from the entry covering `index`; false when there is none.
    pub fn clear_tag(&self, index: u64, tag: Tag) -> bool {
        self.change_tag(index, tag, false).is_some()
    }

    /// Tag the entry covering `index` dirty, as a write through a mapping of
    /// page `index` does; for a PMD entry, the whole PMD becomes dirty. Holes
    /// (zero entries) and placeholders are refused: they map nothing to write.
    pub fn mark_dirty(&self, index: u64) -> Result<Entry, IndexError> {
        let _writer = self.lock_writer();
        let guard = epoch::pin();
        match self.find(index, &guard) {
            Found::Entry { entry, .. } if !entry.is_mapped() => Err(IndexError::WrongState(entry)),
            Found::Entry { entry, base, .. } => {
                self.tag_locked(base, entry.order(), Tag::Dirty, true);
                Ok(entry)
            }
            _ => Err(IndexError::Missing),
        }
    }

    // ---- entry locks ------------------------------------------------------

    /// Lock the entry covering `index`, waiting while another holds it; or,
    /// when nothing covers it, insert and lock an empty placeholder of
    /// `order`. Returns the entry in the way, without waiting, when the
    /// placeholder would overlap one, or when a PMD is asked for where a PTE
    /// entry is.
    pub fn lock_entry(&self, index: u64, order: Order) -> Result<EntryGuard<'_>, Entry> {
        loop {
            match self.try_lock_entry(index, order) {
                Ok(guard) => return Ok(guard),
                Err(IndexError::Locked(seen)) => {
                    let key = self.key(seen.order().align(index), seen.order());
                    wait::table().wait(key, || {
                        self.load(index)
                            .is_some_and(|now| now.is_locked() && now.order() == seen.order())
                    });
                }
                Err(IndexError::Conflict(entry)) => return Err(entry),
                Err(IndexError::Missing | IndexError::WrongState(_)) => {
                    unreachable!("try_lock_entry reports only Locked or Conflict")
                }
            }
        }
    }

    /// [`lock_entry`](Self::lock_entry) without waiting: a locked entry is
    /// reported as [`IndexError::Locked`], an entry in the way as
    /// [`IndexError::Conflict`].
    pub fn try_lock_entry(&self, index: u64, order: Order) -> Result<EntryGuard<'_>, IndexError> {
        loop {
            let guard = epoch::pin();
            match self.find(index, &guard) {
                Found::Entry { entry, .. }
                    if order == Order::Pmd && entry.order() == Order::Pte =>
                {
                    return Err(IndexError::Conflict(entry))
                }
                Found::PtesAround(leaf) if order == Order::Pmd => {
                    if let Some(pte) = first_pte(leaf) {
                        return Err(IndexError::Conflict(pte));
                    }
                    // An emptied leaf about to be unlinked: look again.
                    continue;
                }
                Found::Entry { entry, .. } if entry.is_locked() => {
                    return Err(IndexError::Locked(entry))
                }
                Found::Entry { slot, entry, base } => {
                    // Taking the lock of an existing entry is one CAS: a
                    // writer that changed the slot meanwhile makes it fail.
                    if slot
                        .compare_exchange(entry.raw(), entry.locked().raw(), Acquire, Relaxed)
                        .is_ok()
                    {
                        // SAFETY: the entry is now locked, so its slot is
                        // non-empty and its node stays linked (and alive)
                        // until the guard unlocks it, beyond this pin.
                        let slot = unsafe { &*(slot as *const AtomicU64) };
                        return Ok(self.guard(slot, entry, base));
                    }
                }
                Found::PtesAround(_) | Found::Nothing => {
                    let _writer = self.lock_writer();
                    // Look again under the writer lock: only writers insert.
                    if matches!(self.find(index, &guard), Found::Entry { .. })
                        || (order == Order::Pmd
                            && matches!(self.find(index, &guard), Found::PtesAround(_)))
                    {
                        continue;
                    }
                    let placeholder = Entry::empty(order).locked();
                    let slot = self.insert(index, order, placeholder);
                    // SAFETY: `insert` returns a slot of a linked node; it stays
                    // linked while its entry (locked, so non-empty) is there.
                    let slot = unsafe { &*slot };
                    return Ok(self.guard(slot, Entry::empty(order), order.align(index)));
                }
            }
        }
    }

    /// Check the tree's invariants: every non-root node non-empty, `used`
    /// counts right, tag summaries exact, leaves only at shift 0, entries of
    /// the right order in the right place. For tests; takes the writer lock.
    #[doc(hidden)]
    pub fn check_consistency(&self) -> Result<(), String> {
        let _writer = self.lock_writer();
        let root = self.root.load(Acquire);
        if root.is_null() {
            return Ok(());
        }
        // SAFETY: writer lock held: linked nodes stay alive.
        check_upper(unsafe { &*root }, true)
    }

    // ---- internals --------------------------------------------------------

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, base: u64, order: Order) -> WaitKey {
        WaitKey {
            tree: self.id,
            index: base.wrapping_mul(2) | (order == Order::Pmd) as u64,
        }
    }

    fn guard<'a>(&'a self, slot: &'a AtomicU64, entry: Entry, base: u64) -> EntryGuard<'a> {
        EntryGuard {
            index: self,
            slot,
            entry: entry.unlocked(),
            base,
        }
    }

    /// The shift-0 node and slot for PMD number `pmd`, if the path exists.
    fn bottom_slot<'g>(&self, pmd: u64, _guard: &'g Guard) -> Option<(&'g Upper, usize)> {
        let mut node = self.root.load(Acquire);
        if node.is_null() {
            return None;
        }
        // SAFETY: the root is alive while we are pinned (nodes are freed only
        // through the epoch collector, or by Drop with exclusive access).
        if !unsafe { &*node }.reaches(pmd) {
            return None;
        }
        loop {
            // SAFETY: as above, for every node reached from the root.
            let upper = unsafe { &*node };
            let slot = upper.slot_of(pmd);
            if upper.shift == 0 {
                return Some((upper, slot));
            }
            match decode(upper.slots[slot].load(Acquire)) {
                Slot::Node(child) => node = child as *mut Upper,
                _ => return None,
            }
        }
    }

    /// The entry covering `index`, and where it lives.
    fn find<'g>(&self, index: u64, guard: &'g Guard) -> Found<'g> {
        let Some((bottom, slot)) = self.bottom_slot(index >> 9, guard) else {
            return Found::Nothing;
        };
        let slot = &bottom.slots[slot];
        match decode(slot.load(Acquire)) {
            Slot::Empty => Found::Nothing,
            Slot::Entry(entry) => Found::Entry {
                slot,
                entry,
                base: Order::Pmd.align(index),
            },
            Slot::Node(leaf) => {
                // SAFETY: a node pointer at shift 0 is a leaf, alive while pinned.
                let leaf = unsafe { &*(leaf as *const Leaf) };
                let pte = &leaf.slots[leaf_slot(index)];
                match Entry::from_raw(pte.load(Acquire)) {
                    Some(entry) => Found::Entry {
                        slot: pte,
                        entry,
                        base: index,
                    },
                    None => Found::PtesAround(leaf),
                }
            }
        }
    }

    /// The first entry overlapping `[from, ...)` (tagged with `tag`, if given).
    fn next_entry(&self, from: u64, tag: Option<Tag>, _guard: &Guard) -> Option<(u64, Entry)> {
        let root = self.root.load(Acquire);
        if root.is_null() {
            return None;
        }
        // SAFETY: pinned; see bottom_slot.
        let root = unsafe { &*root };
        if !root.reaches(from >> 9) {
            return None;
        }
        scan_upper(root, from, tag)
    }

    /// The path to the shift-0 slot of `pmd`, creating nodes (and growing the
    /// root) as needed. Writer lock held.
    fn path_creating(&self, pmd: u64) -> Path {
        let mut root = self.root.load(Acquire);
        // SAFETY: writer lock held: linked nodes stay alive.
        if root.is_null()
            || (unsafe { &*root }.used.load(Relaxed) == 0 && !unsafe { &*root }.reaches(pmd))
        {
            // No root, or an empty one too low: start at the height `pmd` needs.
            let mut shift = 0;
            while shift + UPPER_BITS < 64 && pmd >> (shift + UPPER_BITS) != 0 {
                shift += UPPER_BITS;
            }
            let old = root;
            root = Box::into_raw(Upper::new(shift));
            self.root.store(root, Release);
            if !old.is_null() {
                retire(old);
            }
        }
        // SAFETY: writer lock held: linked nodes stay alive.
        while !unsafe { &*root }.reaches(pmd) {
            let old = unsafe { &*root };
            let top = Upper::new(old.shift + UPPER_BITS);
            top.slots[0].store(root as u64, Relaxed);
            top.used.store(1, Relaxed);
            for tag in Tag::ALL {
                let tagged = old.has_tag(tag);
                top.set_tag_bit(tag, 0, tagged);
            }
            root = Box::into_raw(top);
            self.root.store(root, Release);
        }
        let mut path = Path {
            steps: [(std::ptr::null(), 0); 11],
            len: 0,
        };
        let mut node = root as *const Upper;
        loop {
            // SAFETY: writer lock held.
            let upper = unsafe { &*node };
            let slot = upper.slot_of(pmd);
            path.push(node, slot);
            if upper.shift == 0 {
                return path;
            }
            node = match decode(upper.slots[slot].load(Acquire)) {
                Slot::Node(child) => child as *const Upper,
                _ => {
                    let child = Box::into_raw(Upper::new(upper.shift - UPPER_BITS));
                    upper.slots[slot].store(child as u64, Release);
                    upper.used.fetch_add(1, Relaxed);
                    child
                }
            };
        }
    }

    /// The path to `pmd`'s shift-0 slot, which must exist. Writer lock held.
    fn path_existing(&self, pmd: u64) -> Path {
        // Every node on the way exists, so this creates nothing.
        self.path_creating(pmd)
    }

    /// Put `entry` in the empty place for `index` at `order` (creating a leaf
    /// for a PTE). Writer lock held; the caller checked that nothing overlaps.
    /// Returns the slot.
    fn insert(&self, index: u64, order: Order, entry: Entry) -> *const AtomicU64 {
        let path = self.path_creating(index >> 9);
        let (bottom, slot) = path.bottom();
        let place = &bottom.slots[slot];
        match order {
            Order::Pmd => {
                place.store(entry.raw(), Release);
                bottom.used.fetch_add(1, Relaxed);
                place
            }
            Order::Pte => {
                let leaf = match decode(place.load(Acquire)) {
                    // SAFETY: a node pointer at shift 0 is a leaf; writer lock held.
                    Slot::Node(leaf) => unsafe { &*(leaf as *const Leaf) },
                    _ => {
                        let leaf = Box::into_raw(Leaf::new());
                        place.store(leaf as u64, Release);
                        bottom.used.fetch_add(1, Relaxed);
                        // SAFETY: just allocated and linked; writer lock held.
                        unsafe { &*leaf }
                    }
                };
                let pte = &leaf.slots[leaf_slot(index)];
                pte.store(entry.raw(), Release);
                leaf.used.fetch_add(1, Relaxed);
                pte
            }
        }
    }

    /// Remove the entry at `base` of `order`, whose slot must still hold
    /// `expected` (else the slot's word is returned: its lock was taken
    /// meanwhile); clear its tags, and unlink any node left empty. Writer lock
    /// held; the entry exists.
    fn remove(&self, base: u64, order: Order, expected: u64) -> Result<(), u64> {
        let path = self.path_existing(base >> 9);
        let (bottom, slot) = path.bottom();
        let place = &bottom.slots[slot];
        match order {
            Order::Pmd => {
                place.compare_exchange(expected, 0, SeqCst, Acquire)?;
                for tag in Tag::ALL {
                    self.tag_locked(base, order, tag, false);
                }
            }
            Order::Pte => {
                let Slot::Node(leaf_ptr) = decode(place.load(Acquire)) else {
                    unreachable!("a PTE entry lives in a leaf");
                };
                // SAFETY: writer lock held; the leaf is linked.
                let leaf = unsafe { &*(leaf_ptr as *const Leaf) };
                leaf.slots[leaf_slot(base)].compare_exchange(expected, 0, SeqCst, Acquire)?;
                for tag in Tag::ALL {
                    self.tag_locked(base, order, tag, false);
                }
                if leaf.used.fetch_sub(1, Relaxed) > 1 {
                    return Ok(());
                }
                // The leaf is empty: unlink it, and let the collector free it
                // once no reader can be looking at it.
                place.store(0, Release);
                retire(leaf_ptr as *mut Leaf);
            }
        }
        self.unlink_empty(&path, path.len - 1);
        Ok(())
    }

    /// The slot at `path.steps[level]` was just emptied: count it, and
    /// unlink upper nodes left empty (never the root).
    fn unlink_empty(&self, path: &Path, mut level: usize) {
        loop {
            let (node, _) = path.steps[level];
            // SAFETY: writer lock held; nodes on the path are linked.
            let upper = unsafe { &*node };
            if upper.used.fetch_sub(1, Relaxed) > 1 || level == 0 {
                return;
            }
            let (parent, slot) = path.steps[level - 1];
            // SAFETY: as above.
            unsafe { &*parent }.slots[slot].store(0, Release);
            retire(node as *mut Upper);
            level -= 1;
        }
    }

    /// Set or clear `tag` on the entry at `base` of `order` and fix the
    /// summaries above it. Writer lock held; the entry exists.
    fn tag_locked(&self, base: u64, order: Order, tag: Tag, on: bool) {
        let path = self.path_existing(base >> 9);
        let (bottom, slot) = path.bottom();
        let mut changed = match order {
            Order::Pmd => bottom.set_tag_bit(tag, slot, on),
            Order::Pte => {
                let Slot::Node(leaf) = decode(bottom.slots[slot].load(Acquire)) else {
                    unreachable!("a PTE entry lives in a leaf");
                };
                // SAFETY: writer lock held; the leaf is linked.
                let leaf = unsafe { &*(leaf as *const Leaf) };
                let summary = leaf.set_tag_bit(tag, leaf_slot(base), on);
                summary && bottom.set_tag_bit(tag, slot, leaf.has_tag(tag))
            }
        };
        let mut level = path.len - 1;
        while changed && level > 0 {
            let (child, _) = path.steps[level];
            let (parent, slot) = path.steps[level - 1];
            // SAFETY: writer lock held; nodes on the path are linked.
            let tagged = unsafe { &*child }.has_tag(tag);
            changed = unsafe { &*parent }.set_tag_bit(tag, slot, tagged);
            level -= 1;
        }
    }

    fn change_tag(&self, index: u64, tag: Tag, on: bool) -> Option<Entry> {
        let _writer = self.lock_writer();
        let guard = epoch::pin();
        match self.find(index, &guard) {
            Found::Entry { entry, base, .. } => {
                self.tag_locked(base, entry.order(), tag, on);
                Some(entry)
            }
            _ => None,
        }
    }
}

impl Drop for EntryIndex {
    fn drop(&mut self) {
        let root = *self.root.get_mut();
        if !root.is_null() {
            // SAFETY: `&mut self`: no reader or guard can reach the tree.
            unsafe { node::free_upper(root) };
        }
    }
}

/// The error for a CAS that lost to someone taking the entry's lock.
fn locked_now(raw: u64) -> IndexError {
    match Entry::from_raw(raw) {
        Some(entry) => IndexError::Locked(entry),
        None => unreachable!("under the writer lock, only a lock bit changes a slot"),
    }
}

/// The first PTE entry of a leaf, if it still has one.
fn first_pte(leaf: &Leaf) -> Option<Entry> {
    leaf.next_entry(0).map(|(_, entry)| entry)
}

fn leaf_slot(index: u64) -> usize {
    (index % LEAF_SLOTS as u64) as usize
}

/// Free an unlinked node once every reader pinned now has left.
fn retire<T>(node: *mut T) {
    struct Owned<T>(*mut T);
    // SAFETY: the node is unlinked; whichever thread runs the destructor owns it.
    unsafe impl<T> Send for Owned<T> {}
    let owned = Owned(node);
    let guard = epoch::pin();
    // SAFETY: the node was unlinked under the writer lock, so only readers
    // pinned before now can reach it; the collector runs this after them.
    unsafe {
        guard.defer_unchecked(move || {
            let owned = owned;
            drop(Box::from_raw(owned.0));
        })
    };
}

/// The first entry overlapping `[from, ...)` below `node`, tagged with `tag`
/// if given.
fn scan_upper(node: &Upper, from: u64, tag: Option<Tag>) -> Option<(u64, Entry)> {
    let from_pmd = from >> 9;
    let first_slot = node.slot_of(from_pmd);
    // The PMD numbers under this node share the bits above its slot bits.
    let prefix = from_pmd >> (node.shift + UPPER_BITS) << (node.shift + UPPER_BITS);
    for slot in first_slot..UPPER_SLOTS {
        if tag.is_some_and(|t| !node.tag_bit(t, slot)) {
            continue;
        }
        let raw = node.slots[slot].load(Acquire);
        if raw == 0 {
            continue;
        }
        // The first PMD number under this slot, and where to start inside it.
        let slot_pmd = prefix | (slot as u64) << node.shift;
        let start = if slot == first_slot {
            from
        } else {
            slot_pmd << 9
        };
        let found = match decode(raw) {
            Slot::Empty => None,
            Slot::Entry(entry) => Some((slot_pmd << 9, entry)),
            Slot::Node(child) if node.shift == 0 => {
                // SAFETY: a node pointer at shift 0 is a leaf, alive while pinned.
                let leaf = unsafe { &*(child as *const Leaf) };
                scan_leaf(leaf, leaf_slot(start), tag).map(|(s, e)| ((slot_pmd << 9) + s as u64, e))
            }
            // SAFETY: above shift 0, node pointers are upper nodes, alive while pinned.
            Slot::Node(child) => scan_upper(unsafe { &*(child as *const Upper) }, start, tag),
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// The first entry of `leaf` at or after slot `from`, tagged with `tag` if given.
fn scan_leaf(leaf: &Leaf, mut from: usize, tag: Option<Tag>) -> Option<(usize, Entry)> {
    let Some(tag) = tag else {
        return leaf.next_entry(from);
    };
    while let Some(slot) = leaf.next_tagged(tag, from) {
        // A tag bit may briefly outlive its entry while a writer removes it.
        if let Some(entry) = Entry::from_raw(leaf.slots[slot].load(Acquire)) {
            return Some((slot, entry));
        }
        from = slot + 1;
    }
    None
}

fn check_upper(node: &Upper, is_root: bool) -> Result<(), String> {
    let mut used = 0;
    let mut tags = [0u64; 2];
    for (slot, word) in node.slots.iter().enumerate() {
        let tagged = |has: &dyn Fn(Tag) -> bool, tags: &mut [u64; 2]| {
            for tag in Tag::ALL {
                if has(tag) {
                    tags[tag.bit()] |= 1 << slot;
                }
            }
        };
        match decode(word.load(Acquire)) {
            Slot::Empty => continue,
            Slot::Entry(entry) => {
                if node.shift != 0 || entry.order() != Order::Pmd {
                    return Err(format!(
                        "{entry:?} in an upper node at shift {}",
                        node.shift
                    ));
                }
                tagged(&|t| node.tag_bit(t, slot), &mut tags);
            }
            Slot::Node(child) if node.shift == 0 => {
                // SAFETY: writer lock held; a node pointer at shift 0 is a leaf.
                let leaf = unsafe { &*(child as *const Leaf) };
                let mut leaf_used = 0;
                for (i, pte) in leaf.slots.iter().enumerate() {
                    match decode(pte.load(Acquire)) {
                        Slot::Entry(e) if e.order() == Order::Pte => leaf_used += 1,
                        Slot::Empty => {
                            for tag in Tag::ALL {
                                if leaf.tag_bit(tag, i) {
                                    return Err(format!("tag {tag:?} on empty leaf slot {i}"));
                                }
                            }
                        }
                        _ => return Err(format!("leaf slot {i} holds a non-PTE word")),
                    }
                }
                if leaf_used == 0 || leaf_used != leaf.used.load(Relaxed) {
                    return Err(format!(
                        "leaf counts {} entries, holds {leaf_used}",
                        leaf.used.load(Relaxed)
                    ));
                }
                tagged(&|t| leaf.has_tag(t), &mut tags);
            }
            Slot::Node(child) => {
                // SAFETY: writer lock held; above shift 0, pointers are upper nodes.
                let child = unsafe { &*(child as *const Upper) };
                if child.shift + UPPER_BITS != node.shift {
                    return Err(format!("shift {} under shift {}", child.shift, node.shift));
                }
                check_upper(child, false)?;
                tagged(&|t| child.has_tag(t), &mut tags);
            }
        }
        used += 1;
    }
    if used != node.used.load(Relaxed) || (used == 0 && !is_root) {
        return Err(format!(
            "node at shift {} counts {} slots, holds {used}",
            node.shift,
            node.used.load(Relaxed)
        ));
    }
    for tag in Tag::ALL {
        let summary = node.tags[tag.bit()].load(Relaxed);
        if summary != tags[tag.bit()] {
            return Err(format!(
                "tag {tag:?} summary {summary:#x} at shift {}, subtree says {:#x}",
                node.shift,
                tags[tag.bit()]
            ));
        }
    }
    Ok(())
}

/// The lock on one entry. Dropping it unlocks the entry and wakes waiters.
pub struct EntryGuard<'a> {
    index: &'a EntryIndex,
    slot: &'a AtomicU64,
    /// The entry as it will be when unlocked.
    entry: Entry,
    /// First index of the entry's range.
    base: u64,
}

impl std::fmt::Debug for EntryGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EntryGuard({} {:?})", self.base, self.entry)
    }
}

impl<'a> EntryGuard<'a> {
    /// The locked entry (as it will be once unlocked).
    pub fn entry(&self) -> Entry {
        self.entry
    }

    /// The first page index of the entry's range.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Replace the locked entry by `entry` of the same order (for example a
    /// real PMD in place of an empty PMD placeholder). Tags are kept.
    pub fn set(&mut self, entry: Entry) -> Result<(), IndexError> {
        if entry.order() != self.entry.order() {
            return Err(IndexError::WrongState(self.entry));
        }
        self.entry = entry.unlocked();
        self.slot.store(self.entry.locked().raw(), Release);
        Ok(())
    }

    /// Remove the entry (and its tags), and wake its waiters.
    pub fn erase(self) {
        let this = std::mem::ManuallyDrop::new(self);
        {
            let _writer = this.index.lock_writer();
            let held = this.entry.locked().raw();
            let removed = this.index.remove(this.base, this.entry.order(), held);
            debug_assert!(removed.is_ok(), "only the holder changes a locked slot");
        }
        wait::table().wake(this.index.key(this.base, this.entry.order()));
    }

    /// Turn a zero or empty PMD entry into nothing but a locked empty PTE
    /// placeholder at `index` (which must lie in the PMD), atomically, and
    /// wake the PMD's waiters so that they look again. This is how a PTE
    /// fault takes the place of a PMD hole (`grab_mapping_entry`).
    pub fn downgrade(self, index: u64) -> Result<EntryGuard<'a>, (EntryGuard<'a>, IndexError)> {
        if self.entry.is_mapped() {
            let entry = self.entry;
            return Err((self, IndexError::WrongState(entry)));
        }
        self.into_ptes(index, |i| (i == index).then(|| Entry::empty(Order::Pte)))
    }

    /// Split a mapped PMD entry into 512 PTE entries of the same pages
    /// (flags such as poisoned carried over; tags dropped: write back first),
    /// atomically, keeping only the PTE entry at `index` locked (returned),
    /// and wake the PMD's waiters. Memory failure does this so that only the
    /// poisoned 4 KiB page of a huge mapping becomes inaccessible (and, as
    /// Linux's "dax: Fix unlock mismatch with updated API" requires, the lock
    /// handed back is the one of the entry now covering `index`).
    pub fn split(self, index: u64) -> Result<EntryGuard<'a>, (EntryGuard<'a>, IndexError)> {
        let pmd = self.entry;
        if !pmd.is_mapped() {
            return Err((self, IndexError::WrongState(pmd)));
        }
        let base = self.base;
        self.into_ptes(index, |i| {
            let pte = Entry::new(Order::Pte, pmd.pfn() + (i - base));
            Some(if pmd.is_poisoned() {
                pte.poisoned()
            } else {
                pte
            })
        })
    }

    /// Replace this locked PMD entry by a leaf holding `pte(i)` for each
    /// page `i` of it that has one (the one at `index`, which must have one,
    /// locked), in one store, with the PMD's tags cleared; wake the PMD's
    /// waiters and return the guard of the PTE entry at `index`.
    fn into_ptes(
        self,
        index: u64,
        pte: impl Fn(u64) -> Option<Entry>,
    ) -> Result<EntryGuard<'a>, (EntryGuard<'a>, IndexError)> {
        let held = match pte(index) {
            Some(held)
                if self.entry.order() == Order::Pmd && Order::Pmd.align(index) == self.base =>
            {
                held
            }
            _ => {
                let entry = self.entry;
                return Err((self, IndexError::WrongState(entry)));
            }
        };
        let this = std::mem::ManuallyDrop::new(self);
        let index_ref = this.index;
        let slot = {
            let _writer = index_ref.lock_writer();
            for tag in Tag::ALL {
                index_ref.tag_locked(this.base, Order::Pmd, tag, false);
            }
            let leaf = Leaf::new();
            let mut used = 0;
            for i in (0..PMD_PAGES).map(|off| this.base + off) {
                if let Some(e) = pte(i) {
                    let e = if i == index { e.locked() } else { e };
                    leaf.slots[leaf_slot(i)].store(e.raw(), Relaxed);
                    used += 1;
                }
            }
            leaf.used.store(used, Relaxed);
            let leaf = Box::into_raw(leaf);
            // One store swaps the PMD for the leaf: readers see either.
            this.slot.store(leaf as u64, SeqCst);
            // SAFETY: just linked under the writer lock; the PTE entry at
            // `index` is locked, so the leaf stays linked while the new guard
            // lives.
            unsafe { &(*leaf).slots[leaf_slot(index)] }
        };
        wait::table().wake(index_ref.key(this.base, Order::Pmd));
        Ok(index_ref.guard(slot, held, index))
    }
}

impl Drop for EntryGuard<'_> {
    fn drop(&mut self) {
        self.slot.store(self.entry.raw(), Release);
        wait::table().wake(self.index.key(self.base, self.entry.order()));
    }
}
