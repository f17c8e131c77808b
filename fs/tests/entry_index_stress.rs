//! Many threads lock overlapping PTE and PMD ranges of one index, with random
//! hold times and all the transitions a fault makes. Mutual exclusion is
//! checked with a counter per page; a lost wake-up or a deadlock stops all
//! progress, which a watchdog turns into a failure instead of a hang.

use daxfs::index::{Entry, EntryIndex, Order, PMD_PAGES};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

const PAGES: u64 = 8 * PMD_PAGES;
const THREADS: u64 = 6;
const ROUNDS: u64 = 4000;
/// No lock taken by anyone for this long means a thread is stuck for good.
const STALL: Duration = Duration::from_secs(20);

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Per page, how many guards claim it: must only ever be 0 or 1.
struct Owners {
    pages: Vec<AtomicU32>,
    violations: AtomicU64,
}

impl Owners {
    fn claim(&self, range: std::ops::Range<u64>) {
        for page in range {
            if self.pages[page as usize].fetch_add(1, SeqCst) != 0 {
                self.violations.fetch_add(1, SeqCst);
            }
        }
    }

    fn release(&self, range: std::ops::Range<u64>) {
        for page in range {
            self.pages[page as usize].fetch_sub(1, SeqCst);
        }
    }
}

fn span(base: u64, order: Order) -> std::ops::Range<u64> {
    base..base + order.pages()
}

fn hold(rng: &mut Rng) {
    match rng.below(4) {
        0 => {}
        1 => std::thread::yield_now(),
        2 => std::hint::spin_loop(),
        _ => std::thread::sleep(Duration::from_micros(rng.below(50))),
    }
}

fn worker(index: &EntryIndex, owners: &Owners, progress: &AtomicU64, seed: u64) -> (u64, u64) {
    let mut rng = Rng(seed | 1);
    let (mut locked, mut conflicts) = (0, 0);
    for _ in 0..ROUNDS {
        let page = rng.below(PAGES);
        let order = if rng.below(3) == 0 {
            Order::Pmd
        } else {
            Order::Pte
        };
        let mut guard = match index.lock_entry(page, order) {
            Ok(guard) => guard,
            Err(_) => {
                conflicts += 1;
                progress.fetch_add(1, SeqCst);
                continue;
            }
        };
        locked += 1;
        progress.fetch_add(1, SeqCst);
        let entry = guard.entry();
        let mut owned = span(guard.base(), entry.order());
        owners.claim(owned.clone());
        hold(&mut rng);
        match rng.below(6) {
            // A PTE fault inside a PMD hole: give back the rest of the PMD,
            // then downgrade to a PTE placeholder at `page`.
            0 if entry.order() == Order::Pmd && !entry.is_mapped() => {
                owners.release(owned.start..page);
                owners.release(page + 1..owned.end);
                match guard.downgrade(page) {
                    Ok(pte) => {
                        owned = span(page, Order::Pte);
                        hold(&mut rng);
                        owners.release(owned);
                        drop(pte);
                    }
                    Err((back, e)) => panic!("downgrade of {entry:?} refused: {e}; {back:?}"),
                }
                continue;
            }
            // The fault allocated: fill the placeholder.
            1 | 2 if entry.is_empty() => {
                let filled = Entry::new(entry.order(), guard.base());
                guard.set(filled).unwrap();
                hold(&mut rng);
            }
            // Truncate: the entry goes.
            3 => {
                owners.release(owned);
                guard.erase();
                continue;
            }
            // A read fault on a hole maps the zero page.
            4 if entry.is_empty() => {
                guard.set(Entry::zero(entry.order())).unwrap();
            }
            _ => {}
        }
        owners.release(owned);
        drop(guard);
    }
    (locked, conflicts)
}

#[test]
fn overlapping_pte_and_pmd_locks_exclude_each_other_and_never_hang() {
    let index = EntryIndex::new();
    let owners = Owners {
        pages: (0..PAGES).map(|_| AtomicU32::new(0)).collect(),
        violations: AtomicU64::new(0),
    };
    let progress = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (index, owners, progress) = (&index, &owners, &progress);
                s.spawn(move || worker(index, owners, progress, 0x5EED + t * 7919))
            })
            .collect();
        // The watchdog: fail (not hang) when nothing moves for STALL.
        let watchdog = s.spawn(|| {
            let mut last = (progress.load(SeqCst), Instant::now());
            while !done.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                let now = progress.load(SeqCst);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > STALL {
                    eprintln!(
                        "watchdog: no lock taken for {STALL:?} after {now} operations: \
                         a lost wake-up or a deadlock; locked entries: {:?}",
                        index
                            .range(0..PAGES)
                            .filter(|(_, e)| e.is_locked())
                            .collect::<Vec<_>>()
                    );
                    std::process::abort();
                }
            }
        });
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        done.store(true, SeqCst);
        watchdog.join().unwrap();
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect::<Vec<(u64, u64)>>()
    });
    let locked: u64 = results.iter().map(|r| r.0).sum();
    let conflicts: u64 = results.iter().map(|r| r.1).sum();
    assert_eq!(
        owners.violations.load(SeqCst),
        0,
        "two guards held the same page"
    );
    assert!(owners.pages.iter().all(|c| c.load(SeqCst) == 0));
    assert_eq!(locked + conflicts, THREADS * ROUNDS);
    assert!(
        locked > THREADS * ROUNDS / 2,
        "most requests should lock: {locked}"
    );
    assert!(
        conflicts > 0,
        "PMD requests over PTEs should have met conflicts"
    );
    assert!(
        index.range(0..PAGES).all(|(_, e)| !e.is_locked()),
        "every lock was released"
    );
    index.check_consistency().unwrap();
}

#[test]
fn readers_see_whole_entries_while_writers_churn() {
    // Entries whose pfn encodes their index: a torn or misplaced entry would
    // show a pfn that does not match where it was found. The writer toggles
    // entries (stored on one visit, erased on the next), so about half exist
    // at any time; readers start once it is going and make a fixed number of
    // loads, however the threads are scheduled.
    let index = EntryIndex::new();
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut rng = Rng(99);
            while !stop.load(SeqCst) {
                let pmd = rng.below(8) * PMD_PAGES;
                let (at, entry) = if rng.below(2) == 0 {
                    (pmd, Entry::new(Order::Pmd, pmd << 1 | 1))
                } else {
                    let page = pmd + rng.below(PMD_PAGES);
                    (page, Entry::new(Order::Pte, page << 1))
                };
                if index.load(at) == Some(entry) {
                    index.erase(at).unwrap();
                } else {
                    let _ = index.store(at, entry); // may meet a conflict: fine
                }
                writes.fetch_add(1, SeqCst);
            }
        });
        let readers: Vec<_> = (0..2)
            .map(|t| {
                let (index, writes) = (&index, &writes);
                s.spawn(move || {
                    while writes.load(SeqCst) < 1000 {
                        std::thread::yield_now();
                    }
                    let mut rng = Rng(7 + t);
                    let mut seen = 0u64;
                    for _ in 0..100_000 {
                        let page = rng.below(PAGES);
                        if let Some(e) = index.load(page) {
                            seen += 1;
                            match e.order() {
                                Order::Pmd => assert_eq!(e.pfn(), Order::Pmd.align(page) << 1 | 1),
                                Order::Pte => assert_eq!(e.pfn(), page << 1),
                            }
                        }
                        for (base, e) in index.range(page..page + 64) {
                            let want = match e.order() {
                                Order::Pmd => base << 1 | 1,
                                Order::Pte => base << 1,
                            };
                            assert_eq!(e.pfn(), want);
                        }
                    }
                    seen
                })
            })
            .collect();
        let seen: Vec<u64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        stop.store(true, SeqCst);
        assert!(
            seen.iter().all(|&n| n > 0),
            "readers saw no entries at all: {seen:?}"
        );
    });
    index.check_consistency().unwrap();
}
