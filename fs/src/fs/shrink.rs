//! The shrinker: keeps the inode and dentry caches under a memory budget.
//!
//! Cached inodes cost memory (the inode, its extent list, a directory's
//! index) and so do cached names. When a call makes the caches outgrow the
//! budget, the background worker is woken and runs a pass; a pass can also
//! be run directly ([`Fs::shrink`]).
//!
//! A pass runs under the state lock, like every change, so it cannot race a
//! call halfway through, nor unmount (the "busy inodes after unmount" bug of
//! Linux came from a shrinker and an unmount each walking a tree the other
//! was freeing; here the two are serialised, and unmount stops the worker
//! before it checks that nothing is left). It evicts only inodes that no one
//! references (no lookup count, open handle or hold) and that were not used
//! since the previous pass (a second chance, as the kernel's LRU lists give).
//! Evicting a directory forgets the names cached under it, which are a copy
//! of part of its index; if the budget still is not met, the names cached
//! under the largest remaining directories go too. Nothing evicted is dirty:
//! every change is committed before the lock is released.

use super::dcache::DENTRY_COST;
use super::{CacheUsage, Fs, Ino, Shrunk, State, ROOT};
use crate::error::Result;

impl Fs {
    /// Add `bytes` to the cache's cost; past the budget, wake the shrinker.
    pub(super) fn charge(&self, st: &mut State, bytes: usize) {
        st.cache_cost += bytes;
        if st.cache_cost + self.core.names.len() * DENTRY_COST > st.cache_budget {
            self.wake_shrinker();
        }
    }

    fn wake_shrinker(&self) {
        let mut bg = self
            .core
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !bg.shrink {
            bg.shrink = true;
            self.core.background_cv.notify_all();
        }
    }

    /// What the caches hold now.
    pub fn cache_usage(&self) -> Result<CacheUsage> {
        let st = self.lock()?;
        let passes = self
            .core
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .passes;
        let dentries = self.core.names.len();
        Ok(CacheUsage {
            inodes: st.inodes.len(),
            referenced: st.refs.len(),
            dentries,
            bytes: st.cache_cost + dentries * DENTRY_COST,
            budget: st.cache_budget,
            shrinker_passes: passes,
        })
    }

    /// Set the memory budget of the inode and dentry caches, in bytes; a
    /// pass runs in the background if they are over it.
    pub fn set_cache_budget(&self, bytes: usize) -> Result<()> {
        let mut st = self.lock()?;
        st.cache_budget = bytes;
        self.charge(&mut st, 0);
        Ok(())
    }

    /// Run one shrinker pass now: if the caches are over budget, evict
    /// unreferenced, unused inodes and cached names until they are a
    /// quarter under it. Returns what was evicted.
    pub fn shrink(&self) -> Result<Shrunk> {
        let mut st = self.lock()?;
        let budget = st.cache_budget;
        Ok(self.shrink_locked(&mut st, budget))
    }

    /// Run one shrinker pass against `budget` instead of the configured
    /// one (which stays as it is).
    pub fn shrink_to(&self, budget: usize) -> Result<Shrunk> {
        let mut st = self.lock()?;
        Ok(self.shrink_locked(&mut st, budget))
    }

    fn shrink_locked(&self, st: &mut State, budget: usize) -> Shrunk {
        let names = &self.core.names;
        // Recount exactly: `charge` only estimates growth.
        st.cache_cost = st.inodes.values().map(|c| c.cost()).sum();
        let cost = |st: &State| st.cache_cost + names.len() * DENTRY_COST;
        let mut shrunk = Shrunk::default();
        if cost(st) <= budget {
            return shrunk;
        }
        let target = budget - budget / 4;
        // Two sweeps: the first may only take away second chances.
        for _ in 0..2 {
            if cost(st) <= target {
                break;
            }
            let mut victims: Vec<Ino> = Vec::new();
            for (&ino, cached) in st.inodes.iter_mut() {
                if ino == ROOT || st.refs.contains_key(&ino) {
                    continue;
                }
                if std::mem::take(&mut cached.accessed) {
                    continue;
                }
                victims.push(ino);
            }
            for ino in victims {
                if cost(st) <= target {
                    break;
                }
                let cached = st.inodes.remove(&ino).expect("listed above");
                st.cache_cost = st.cache_cost.saturating_sub(cached.cost());
                shrunk.inodes += 1;
                if cached.dir.is_some() {
                    let before = names.len();
                    names.purge_dir(ino);
                    shrunk.dentries += before.saturating_sub(names.len());
                }
            }
        }
        if cost(st) > target {
            // Still over: cached names go, largest directories first.
            let mut dirs = names.dirs();
            dirs.sort_unstable_by_key(|&(_, n)| std::cmp::Reverse(n));
            for (dir, _) in dirs {
                if cost(st) <= target {
                    break;
                }
                let before = names.len();
                names.purge_dir(dir);
                shrunk.dentries += before.saturating_sub(names.len());
            }
        }
        shrunk
    }

    /// Wait until the background worker has finished a pass that started
    /// after this call (for tests and tools that want a settled cache).
    pub fn wait_for_shrinker(&self, timeout: std::time::Duration) -> Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        let mut bg = self
            .core
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let target = bg.passes + 1;
        bg.shrink = true;
        self.core.background_cv.notify_all();
        while bg.passes < target {
            let now = std::time::Instant::now();
            if now >= deadline || bg.stop {
                return Ok(false);
            }
            bg = self
                .core
                .background_cv
                .wait_timeout(bg, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(true)
    }
}
