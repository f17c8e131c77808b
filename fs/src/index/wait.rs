//! Waiting for an entry lock: the wait table.
//!
//! Like Linux's `wait_table` for DAX entries, waiters do not queue on the
//! entry itself (an entry is one word in a slot) but on a bucket of a shared
//! table, chosen by hashing (tree, aligned index of the entry). Several entries
//! share a bucket, so a wake-up may be for someone else: a woken waiter always
//! looks at its entry again.
//!
//! ## The protocol, and why no wake-up is lost
//!
//! A waiter that found its entry locked:
//! 1. registers: `waiters += 1`, then a `SeqCst` fence;
//! 2. reads the bucket's wake sequence `s` (acquire);
//! 3. checks the entry again (`still_locked`); if it is no longer locked it
//!    unregisters and returns at once;
//! 4. otherwise sleeps, under the bucket mutex, until the sequence differs
//!    from `s`.
//!
//! An unlocker first stores the unlocked entry word, then a `SeqCst` fence,
//! then reads `waiters`; if it is not zero it bumps the sequence (release) and
//! notifies, under the bucket mutex.
//!
//! The two fences order the waiter's registration against the unlocker's
//! store (the store-buffering pattern): either the waiter's check in step 3
//! sees the entry unlocked, or the unlocker sees `waiters > 0` and bumps. A
//! waiter that read the bumped sequence in step 2 synchronises with the bump,
//! so step 3 then sees the unlock. Otherwise the bump and notify, made under
//! the bucket mutex, find the waiter either before its check of the sequence
//! (which then differs) or asleep on the condition variable. No lock of the
//! tree is held by anyone who sleeps here. (The fences, rather than `SeqCst`
//! accesses alone, are what loom can model-check.)

use super::sync::{fence, AtomicU64, AtomicUsize, Condvar, Mutex};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

/// Which bucket: a tree's id and the first index of the entry's range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WaitKey {
    pub(crate) tree: u64,
    pub(crate) index: u64,
}

struct Bucket {
    waiters: AtomicUsize,
    seq: AtomicU64,
    mutex: Mutex<()>,
    cv: Condvar,
}

/// A table of wait buckets.
pub(crate) struct WaitTable {
    buckets: Box<[Bucket]>,
}

impl WaitTable {
    pub(crate) fn new(buckets: usize) -> WaitTable {
        WaitTable {
            buckets: (0..buckets.next_power_of_two())
                .map(|_| Bucket {
                    waiters: AtomicUsize::new(0),
                    seq: AtomicU64::new(0),
                    mutex: Mutex::new(()),
                    cv: Condvar::new(),
                })
                .collect(),
        }
    }

    fn bucket(&self, key: WaitKey) -> &Bucket {
        // Fibonacci hashing of the mixed key.
        let mixed = (key.tree.rotate_left(32) ^ key.index).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let bits = self.buckets.len().trailing_zeros();
        let slot = if bits == 0 {
            0
        } else {
            (mixed >> (64 - bits)) as usize
        };
        &self.buckets[slot]
    }

    /// Sleep until a wake-up for `key`'s bucket, unless `still_locked`,
    /// checked after registering, says the entry is already free. Returns
    /// without promising anything about the entry: the caller looks again.
    pub(crate) fn wait(&self, key: WaitKey, still_locked: impl Fn() -> bool) {
        let bucket = self.bucket(key);
        bucket.waiters.fetch_add(1, Relaxed);
        fence(SeqCst);
        let seen = bucket.seq.load(Acquire);
        if still_locked() {
            let mut guard = bucket.mutex.lock().unwrap_or_else(|e| e.into_inner());
            while bucket.seq.load(Acquire) == seen {
                guard = bucket.cv.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        }
        bucket.waiters.fetch_sub(1, Relaxed);
    }

    /// Wake everyone waiting in `key`'s bucket. Call after the entry word
    /// has been changed.
    pub(crate) fn wake(&self, key: WaitKey) {
        let bucket = self.bucket(key);
        fence(SeqCst);
        if bucket.waiters.load(Relaxed) > 0 {
            let _guard = bucket.mutex.lock().unwrap_or_else(|e| e.into_inner());
            bucket.seq.fetch_add(1, Release);
            bucket.cv.notify_all();
        }
    }
}

/// The table shared by every entry index of the process (as Linux shares one).
/// (Under loom it exists only to compile: loom tests build their own table.)
pub(crate) fn table() -> &'static WaitTable {
    static TABLE: std::sync::OnceLock<WaitTable> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| WaitTable::new(1024))
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Model-check the protocol: a lock word, a holder that unlocks, and
    //! waiters that must all get through, in every interleaving loom finds.
    //! Run: `RUSTFLAGS="--cfg loom" cargo test -p daxfs --lib --release loom`.
    use super::*;
    use loom::sync::Arc;

    const LOCKED: u64 = 1;

    /// Take the lock word as the real index does: CAS, or wait and retry.
    fn lock(table: &WaitTable, word: &AtomicU64, key: WaitKey) {
        loop {
            let cur = word.load(Acquire);
            if cur & LOCKED == 0 {
                if word
                    .compare_exchange(cur, cur | LOCKED, Acquire, Relaxed)
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            table.wait(key, || word.load(Acquire) & LOCKED != 0);
        }
    }

    fn unlock(table: &WaitTable, word: &AtomicU64, key: WaitKey) {
        word.store(0, Release);
        table.wake(key);
    }

    #[test]
    fn no_waiter_sleeps_forever() {
        loom::model(|| {
            let table = Arc::new(WaitTable::new(1));
            let word = Arc::new(AtomicU64::new(LOCKED));
            let key = WaitKey { tree: 1, index: 0 };
            let waiter = {
                let (table, word) = (table.clone(), word.clone());
                loom::thread::spawn(move || {
                    lock(&table, &word, key);
                    unlock(&table, &word, key);
                })
            };
            unlock(&table, &word, key);
            waiter.join().unwrap();
            assert_eq!(word.load(Relaxed), 0);
        });
    }

    #[test]
    fn two_waiters_both_get_the_lock_in_turn() {
        // Three threads: bound the preemptions so the search ends (loom's
        // documented practice; bugs of this kind need very few).
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let table = Arc::new(WaitTable::new(1));
            let word = Arc::new(AtomicU64::new(LOCKED));
            let key = WaitKey { tree: 1, index: 0 };
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    let (table, word) = (table.clone(), word.clone());
                    loom::thread::spawn(move || {
                        lock(&table, &word, key);
                        unlock(&table, &word, key);
                    })
                })
                .collect();
            unlock(&table, &word, key);
            for waiter in waiters {
                waiter.join().unwrap();
            }
            assert_eq!(word.load(Relaxed), 0);
        });
    }

    #[test]
    fn a_wake_for_another_entry_in_the_bucket_is_harmless() {
        loom::model(|| {
            let table = Arc::new(WaitTable::new(1));
            let word = Arc::new(AtomicU64::new(LOCKED));
            let mine = WaitKey { tree: 1, index: 0 };
            let other = WaitKey {
                tree: 1,
                index: 512,
            };
            let waiter = {
                let (table, word) = (table.clone(), word.clone());
                loom::thread::spawn(move || lock(&table, &word, mine))
            };
            table.wake(other);
            unlock(&table, &word, mine);
            waiter.join().unwrap();
            assert_eq!(word.load(Relaxed), LOCKED, "the waiter took the lock");
        });
    }
}
