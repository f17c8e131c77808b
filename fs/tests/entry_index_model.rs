//! The entry index against a reference model: random operation sequences of
//! both orders, compared step by step with a plain `BTreeMap`.
//!
//! Thousands of seeded cases run; a failure names its seed and step. Replay
//! one case with `INDEX_MODEL_SEED=<seed> cargo test -p daxfs --test
//! entry_index_model`.

mod common;

use common::Rng;
use daxfs::index::{Entry, EntryGuard, EntryIndex, IndexError, Order, Tag, PMD_PAGES};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq)]
struct ModelEntry {
    entry: Entry,
    locked: bool,
    tags: [bool; 2],
}

/// The reference: entries by first index.
#[derive(Default)]
struct Model {
    entries: BTreeMap<u64, ModelEntry>,
}

fn tag_no(tag: Tag) -> usize {
    match tag {
        Tag::Dirty => 0,
        Tag::Towrite => 1,
    }
}

fn end_of(base: u64, order: Order) -> u128 {
    base as u128 + order.pages() as u128
}

impl Model {
    /// The first index of the entry covering `i`.
    fn covering(&self, i: u64) -> Option<u64> {
        let pmd = Order::Pmd.align(i);
        match self.entries.get(&pmd) {
            Some(m) if m.entry.order() == Order::Pmd => Some(pmd),
            _ => self
                .entries
                .get(&i)
                .filter(|m| m.entry.order() == Order::Pte)
                .map(|_| i),
        }
    }

    fn first_pte_in_pmd(&self, i: u64) -> Option<ModelEntry> {
        let base = Order::Pmd.align(i);
        self.entries
            .range(base..=base + (PMD_PAGES - 1))
            .map(|(_, m)| *m)
            .find(|m| m.entry.order() == Order::Pte)
    }

    fn load(&self, i: u64) -> Option<(Entry, bool)> {
        self.covering(i).map(|b| {
            let m = self.entries[&b];
            (m.entry, m.locked)
        })
    }

    fn find_conflict(&self, i: u64, order: Order) -> Option<Entry> {
        match (self.covering(i), order) {
            (Some(b), _) => Some(self.entries[&b].entry),
            (None, Order::Pmd) => self.first_pte_in_pmd(i).map(|m| m.entry),
            (None, Order::Pte) => None,
        }
    }

    fn range(&self, start: u64, end: u64) -> Vec<(u64, Entry)> {
        if start >= end {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter(|(&b, m)| end_of(b, m.entry.order()) > start as u128 && b < end)
            .map(|(&b, m)| (b, m.entry))
            .collect()
    }

    fn next_tagged(&self, start: u64, tag: Tag) -> Option<(u64, Entry)> {
        self.entries
            .iter()
            .find(|(&b, m)| end_of(b, m.entry.order()) > start as u128 && m.tags[tag_no(tag)])
            .map(|(&b, m)| (b, m.entry))
    }
}

/// Compare an index error with the model's expectation, ignoring lock bits
/// in the entry but not the kind of error.
fn same_error(got: &IndexError, want: &IndexError) -> bool {
    match (got, want) {
        (IndexError::Conflict(a), IndexError::Conflict(b))
        | (IndexError::Locked(a), IndexError::Locked(b))
        | (IndexError::WrongState(a), IndexError::WrongState(b)) => a.unlocked() == b.unlocked(),
        (a, b) => a == b,
    }
}

/// Pick an index from a few regions: the start of a file, a place that needs
/// a taller tree, and the very top of the index space.
fn pick_index(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0 => (1 << 40) + rng.below(2048),
        1 => u64::MAX - rng.below(1100),
        _ => rng.below(2048),
    }
}

fn pick_entry(rng: &mut Rng, order: Order) -> Entry {
    let entry = match rng.below(4) {
        0 => Entry::zero(order),
        1 => Entry::empty(order),
        _ => Entry::new(order, rng.below(1 << 30)),
    };
    if rng.chance(10) {
        entry.poisoned()
    } else {
        entry
    }
}

fn pick_order(rng: &mut Rng) -> Order {
    if rng.chance(35) {
        Order::Pmd
    } else {
        Order::Pte
    }
}

fn pick_tag(rng: &mut Rng) -> Tag {
    if rng.chance(50) {
        Tag::Dirty
    } else {
        Tag::Towrite
    }
}

/// Run one case; Err names the step that went wrong.
fn run_case(seed: u64, steps: usize) -> Result<(), String> {
    let mut rng = Rng(seed);
    let index = EntryIndex::new();
    let mut model = Model::default();
    let mut held: Vec<EntryGuard<'_>> = Vec::new();

    for step in 0..steps {
        let i = pick_index(&mut rng);
        let op = rng.below(100);
        let fail = |what: String| Err(format!("step {step}: {what}"));
        match op {
            0..=17 => {
                let order = pick_order(&mut rng);
                let entry = pick_entry(&mut rng, order);
                let got = index.store(i, entry);
                let base = entry.order().align(i);
                let want = match (model.covering(i), entry.order()) {
                    (Some(b), o) if model.entries[&b].entry.order() != o => {
                        Err(IndexError::Conflict(model.entries[&b].entry))
                    }
                    (Some(b), _) if model.entries[&b].locked => {
                        Err(IndexError::Locked(model.entries[&b].entry))
                    }
                    (Some(b), _) => {
                        let m = model.entries.get_mut(&b).unwrap();
                        let old = m.entry;
                        m.entry = entry;
                        Ok(Some(old))
                    }
                    (None, Order::Pmd) if model.first_pte_in_pmd(i).is_some() => Err(
                        IndexError::Conflict(model.first_pte_in_pmd(i).unwrap().entry),
                    ),
                    (None, _) => {
                        model.entries.insert(
                            base,
                            ModelEntry {
                                entry,
                                locked: false,
                                tags: [false; 2],
                            },
                        );
                        Ok(None)
                    }
                };
                let ok = match (&got, &want) {
                    (Ok(a), Ok(b)) => a.map(Entry::unlocked) == *b,
                    (Err(a), Err(b)) => same_error(a, b),
                    _ => false,
                };
                if !ok {
                    return fail(format!(
                        "store({i}, {entry:?}) gave {got:?}, model {want:?}"
                    ));
                }
            }
            18..=27 => {
                let got = index.erase(i);
                let want = match model.covering(i) {
                    Some(b) if model.entries[&b].locked => {
                        Err(IndexError::Locked(model.entries[&b].entry))
                    }
                    Some(b) => Ok(model.entries.remove(&b).map(|m| m.entry)),
                    None => Ok(None),
                };
                let ok = match (&got, &want) {
                    (Ok(a), Ok(b)) => a.map(Entry::unlocked) == *b,
                    (Err(a), Err(b)) => same_error(a, b),
                    _ => false,
                };
                if !ok {
                    return fail(format!("erase({i}) gave {got:?}, model {want:?}"));
                }
            }
            28..=39 => {
                let got = index.load(i).map(|e| (e.unlocked(), e.is_locked()));
                if got != model.load(i) {
                    return fail(format!("load({i}) gave {got:?}, model {:?}", model.load(i)));
                }
            }
            40..=45 => {
                let order = pick_order(&mut rng);
                let got = index.find_conflict(i, order).map(Entry::unlocked);
                let want = model.find_conflict(i, order);
                // Any overlapping entry will do for a PMD range of PTEs.
                let ok = match (got, want) {
                    (Some(g), Some(w)) if order == Order::Pmd && g.order() == Order::Pte => {
                        w.order() == Order::Pte
                            && model
                                .range(Order::Pmd.align(i), Order::Pmd.align(i).saturating_add(512))
                                .iter()
                                .any(|&(_, e)| e == g)
                    }
                    (g, w) => g == w,
                };
                if !ok {
                    return fail(format!(
                        "find_conflict({i}, {order:?}) gave {got:?}, model {want:?}"
                    ));
                }
            }
            46..=59 => {
                let order = pick_order(&mut rng);
                let got = index.try_lock_entry(i, order);
                let want: Result<(u64, Entry), IndexError> = match model.covering(i) {
                    Some(b)
                        if order == Order::Pmd && model.entries[&b].entry.order() == Order::Pte =>
                    {
                        Err(IndexError::Conflict(model.entries[&b].entry))
                    }
                    Some(b) if model.entries[&b].locked => {
                        Err(IndexError::Locked(model.entries[&b].entry))
                    }
                    Some(b) => {
                        let m = model.entries.get_mut(&b).unwrap();
                        m.locked = true;
                        Ok((b, m.entry))
                    }
                    None if order == Order::Pmd && model.first_pte_in_pmd(i).is_some() => Err(
                        IndexError::Conflict(model.first_pte_in_pmd(i).unwrap().entry),
                    ),
                    None => {
                        let base = order.align(i);
                        let entry = Entry::empty(order);
                        model.entries.insert(
                            base,
                            ModelEntry {
                                entry,
                                locked: true,
                                tags: [false; 2],
                            },
                        );
                        Ok((base, entry))
                    }
                };
                match (got, want) {
                    (Ok(guard), Ok((base, entry)))
                        if guard.base() == base && guard.entry() == entry =>
                    {
                        held.push(guard)
                    }
                    (Err(a), Err(b)) if same_error(&a, &b) => {}
                    (got, want) => {
                        return fail(format!(
                            "try_lock_entry({i}, {order:?}) gave {got:?}, model {want:?}"
                        ))
                    }
                }
            }
            60..=69 if !held.is_empty() => {
                // Release a guard: plain unlock, fill, erase, downgrade or split.
                let k = rng.below(held.len() as u64) as usize;
                let mut guard = held.swap_remove(k);
                let base = guard.base();
                let order = guard.entry().order();
                match rng.below(5) {
                    0 => {
                        let entry = pick_entry(&mut rng, order);
                        guard
                            .set(entry)
                            .map_err(|e| format!("step {step}: set: {e}"))?;
                        model.entries.get_mut(&base).unwrap().entry = entry;
                        if rng.chance(50) {
                            held.push(guard);
                            continue;
                        }
                        drop(guard);
                        model.entries.get_mut(&base).unwrap().locked = false;
                    }
                    1 => {
                        guard.erase();
                        model.entries.remove(&base);
                    }
                    2 if order == Order::Pmd => {
                        let at = base + rng.below(PMD_PAGES);
                        let mapped = guard.entry().is_mapped();
                        match guard.downgrade(at) {
                            Ok(pte) => {
                                if mapped {
                                    return fail(format!(
                                        "downgrade of a mapped PMD at {base} succeeded"
                                    ));
                                }
                                model.entries.remove(&base);
                                let entry = Entry::empty(Order::Pte);
                                model.entries.insert(
                                    at,
                                    ModelEntry {
                                        entry,
                                        locked: true,
                                        tags: [false; 2],
                                    },
                                );
                                if pte.base() != at || pte.entry() != entry {
                                    return fail(format!("downgrade gave {pte:?}"));
                                }
                                held.push(pte);
                            }
                            Err((back, _)) => {
                                if !mapped {
                                    return fail(format!("downgrade of a hole at {base} refused"));
                                }
                                held.push(back);
                            }
                        }
                    }
                    3 if order == Order::Pmd => {
                        let at = base + rng.below(PMD_PAGES);
                        let pmd = guard.entry();
                        match guard.split(at) {
                            Ok(pte) => {
                                if !pmd.is_mapped() {
                                    return fail(format!("split of a hole at {base} succeeded"));
                                }
                                model.entries.remove(&base);
                                for p in 0..PMD_PAGES {
                                    let mut entry = Entry::new(Order::Pte, pmd.pfn() + p);
                                    if pmd.is_poisoned() {
                                        entry = entry.poisoned();
                                    }
                                    model.entries.insert(
                                        base + p,
                                        ModelEntry {
                                            entry,
                                            locked: base + p == at,
                                            tags: [false; 2],
                                        },
                                    );
                                }
                                let want = model.entries[&at].entry;
                                if pte.base() != at || pte.entry() != want {
                                    return fail(format!("split gave {pte:?}, want {want:?}"));
                                }
                                held.push(pte);
                            }
                            Err((back, _)) => {
                                if pmd.is_mapped() {
                                    return fail(format!(
                                        "split of a mapped PMD at {base} refused"
                                    ));
                                }
                                held.push(back);
                            }
                        }
                    }
                    _ => {
                        drop(guard);
                        model.entries.get_mut(&base).unwrap().locked = false;
                    }
                }
            }
            70..=79 => {
                let tag = pick_tag(&mut rng);
                let on = rng.chance(60);
                let got = if on {
                    index.set_tag(i, tag)
                } else {
                    index.clear_tag(i, tag)
                };
                let want = match model.covering(i) {
                    Some(b) => {
                        model.entries.get_mut(&b).unwrap().tags[tag_no(tag)] = on;
                        true
                    }
                    None => false,
                };
                if got != want {
                    return fail(format!("tag({i}, {tag:?}, {on}) gave {got}, model {want}"));
                }
            }
            80..=83 => {
                let got = index.mark_dirty(i);
                let want = match model.covering(i) {
                    Some(b) if !model.entries[&b].entry.is_mapped() => {
                        Err(IndexError::WrongState(model.entries[&b].entry))
                    }
                    Some(b) => {
                        let m = model.entries.get_mut(&b).unwrap();
                        m.tags[0] = true;
                        Ok(m.entry)
                    }
                    None => Err(IndexError::Missing),
                };
                let ok = match (&got, &want) {
                    (Ok(a), Ok(b)) => a.unlocked() == *b,
                    (Err(a), Err(b)) => same_error(a, b),
                    _ => false,
                };
                if !ok {
                    return fail(format!("mark_dirty({i}) gave {got:?}, model {want:?}"));
                }
            }
            84..=89 => {
                let tag = pick_tag(&mut rng);
                let got = index.get_tag(i, tag);
                let want = model
                    .covering(i)
                    .is_some_and(|b| model.entries[&b].tags[tag_no(tag)]);
                if got != want {
                    return fail(format!("get_tag({i}, {tag:?}) gave {got}, model {want}"));
                }
                let got = index
                    .find_next_tagged(i, tag)
                    .map(|(b, e)| (b, e.unlocked()));
                let want = model.next_tagged(i, tag);
                if got != want {
                    return fail(format!(
                        "find_next_tagged({i}, {tag:?}) gave {got:?}, model {want:?}"
                    ));
                }
            }
            _ => {
                let len = rng.below(3000);
                let end = i.saturating_add(len);
                let got: Vec<(u64, Entry)> = index
                    .range(i..end)
                    .map(|(b, e)| (b, e.unlocked()))
                    .collect();
                let want = model.range(i, end);
                if got != want {
                    return fail(format!("range({i}..{end}) gave {got:?}, model {want:?}"));
                }
            }
        }
        if let Err(broken) = index.check_consistency() {
            return fail(format!("after op {op}: inconsistent tree: {broken}"));
        }
    }
    // Everything the model holds is what a full scan finds.
    drop(held);
    let all: Vec<(u64, Entry)> = index.range(..).collect();
    let want: Vec<(u64, Entry)> = model.entries.iter().map(|(&b, m)| (b, m.entry)).collect();
    if all
        .iter()
        .map(|&(b, e)| (b, e.unlocked()))
        .collect::<Vec<_>>()
        != want
    {
        return Err(format!("final scan {all:?}, model {want:?}"));
    }
    Ok(())
}

#[test]
fn the_index_matches_a_btreemap_model() {
    let (seeds, steps) = match std::env::var("INDEX_MODEL_SEED") {
        Ok(seed) => {
            let seed = seed.parse().expect("INDEX_MODEL_SEED is a number");
            (seed..seed + 1, 400)
        }
        Err(_) => (0..3000, 300),
    };
    for seed in seeds {
        if let Err(what) = run_case(seed, steps) {
            panic!("seed {seed} failed: {what}\nreplay: INDEX_MODEL_SEED={seed} cargo test -p daxfs --test entry_index_model");
        }
    }
}

/// Linux commit "dax: Fix huge page faults" (2018): with a PTE entry at
/// index 1023, a PMD fault at 512 looked up index 512 only, found nothing,
/// and stored a PMD entry over the PTE. Here every PMD path must see it.
#[test]
fn dax_fix_huge_page_faults_pte_at_1023_blocks_a_pmd_at_512() {
    let index = EntryIndex::new();
    let pte = Entry::new(Order::Pte, 77);
    index.store(1023, pte).unwrap();
    assert_eq!(index.load(512), None, "nothing at 512 itself");
    assert_eq!(index.find_conflict(512, Order::Pmd), Some(pte));
    assert_eq!(
        index.store(512, Entry::new(Order::Pmd, 1024)),
        Err(IndexError::Conflict(pte))
    );
    assert_eq!(index.lock_entry(512, Order::Pmd).unwrap_err(), pte);
    assert!(
        matches!(index.try_lock_entry(512, Order::Pmd), Err(IndexError::Conflict(e)) if e == pte)
    );
    assert_eq!(
        index.load(1023),
        Some(pte),
        "the PTE entry is still in place and visible"
    );
    assert_eq!(index.range(0..4096).collect::<Vec<_>>(), vec![(1023, pte)]);
    index.check_consistency().unwrap();
}

/// Linux commit "dax: Fix missed wakeup with PMD faults": a PMD fault that
/// found a locked PTE entry slept on it and could miss its wake-up. A PMD
/// request must instead return the conflict at once.
#[test]
fn dax_fix_missed_wakeup_with_pmd_faults_pmd_request_on_locked_pte_returns_at_once() {
    let index = EntryIndex::new();
    let held = index.lock_entry(700, Order::Pte).unwrap();
    assert!(held.entry().is_empty());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let got = index.lock_entry(512, Order::Pmd).map(|g| g.base());
            tx.send(got).unwrap();
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a PMD request on a locked PTE must not sleep");
        let conflict = got.unwrap_err();
        assert_eq!(conflict.order(), Order::Pte);
        assert!(conflict.is_locked());
    });
    drop(held);
}

#[test]
fn a_waiter_whose_pmd_was_downgraded_looks_again() {
    let index = EntryIndex::new();
    let pmd = index.lock_entry(512, Order::Pmd).unwrap();
    assert_eq!(pmd.base(), 512);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            // Sleeps on the PMD placeholder, which covers 600.
            let guard = index.lock_entry(600, Order::Pte).unwrap();
            (guard.base(), guard.entry())
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The holder turns its hole into a PTE placeholder at 700 and keeps it.
        let pte = pmd.downgrade(700).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || tx.send(waiter.join().unwrap()).unwrap());
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the waiter must wake and take its own PTE while 700 stays locked");
        assert_eq!(got, (600, Entry::empty(Order::Pte)));
        assert!(index.load(700).unwrap().is_locked());
        drop(pte);
    });
    index.check_consistency().unwrap();
}

#[test]
fn a_pte_lock_inside_a_pmd_entry_locks_the_whole_pmd() {
    let index = EntryIndex::new();
    let pmd = Entry::new(Order::Pmd, 4096);
    index.store(1000, pmd).unwrap();
    let guard = index.lock_entry(1000, Order::Pte).unwrap();
    assert_eq!((guard.base(), guard.entry()), (512, pmd));
    for page in [512, 700, 1023] {
        assert!(matches!(
            index.try_lock_entry(page, Order::Pte),
            Err(IndexError::Locked(_))
        ));
    }
    assert!(index.try_lock_entry(1024, Order::Pte).is_ok());
    drop(guard);
    assert_eq!(index.load(700), Some(pmd));
}

#[test]
fn a_pte_sized_write_dirties_the_whole_pmd() {
    let index = EntryIndex::new();
    index.store(512, Entry::new(Order::Pmd, 4096)).unwrap();
    index.mark_dirty(777).unwrap();
    assert!(index.get_tag(512, Tag::Dirty) && index.get_tag(1023, Tag::Dirty));
    assert_eq!(
        index.find_next_tagged(0, Tag::Dirty).map(|(b, _)| b),
        Some(512)
    );
    index.store(4096, Entry::zero(Order::Pmd)).unwrap();
    assert!(matches!(
        index.mark_dirty(4100),
        Err(IndexError::WrongState(_))
    ));
}

#[test]
fn a_tagged_scan_skips_untagged_entries() {
    let index = EntryIndex::new();
    for i in 0..20_000u64 {
        index.store(i, Entry::new(Order::Pte, i)).unwrap();
    }
    for i in [5u64, 9_000, 19_999] {
        index.set_tag(i, Tag::Towrite);
    }
    let mut found = Vec::new();
    let mut at = 0;
    while let Some((base, _)) = index.find_next_tagged(at, Tag::Towrite) {
        found.push(base);
        at = base + 1;
    }
    assert_eq!(found, vec![5, 9_000, 19_999]);
    index.check_consistency().unwrap();
}
