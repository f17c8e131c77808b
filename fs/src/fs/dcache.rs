//! The dentry cache: `(directory, name)` to inode, read without locks.
//!
//! Path walks are the hottest reads a filesystem serves, so they must not
//! take the filesystem's state lock nor write a shared cache line. The cache
//! is a lock-free hash map ([`papaya`], whose readers only enter an epoch)
//! from a key of the parent's inode number followed by the name, to a
//! [`Dentry`]: positive (the inode and its type) or negative (the name is
//! known not to exist).
//!
//! ## Who writes, and why a walk can trust what it read
//!
//! Every write to the cache happens under the filesystem's state lock, and
//! only with facts that are true at that moment: a miss filled by a locked
//! lookup, or the names a committed transaction added, removed or retargeted
//! (applied after the journal commit, never before, so a failed call leaves
//! no trace here). A single read is therefore always a fact that held at
//! some instant.
//!
//! A walk of several components reads several entries at different instants.
//! Entries that only appear (a name created, a miss filled) cannot make a
//! walk wrong: every positive edge it read was still present at the end of
//! the walk. Only a name that disappears or changes target can, so every
//! committed change that removes or retargets names is a write section of a
//! sequence count (Linux's `rename_lock` seqlock, extended to unlink and
//! rmdir): a walk that saw the count change, or saw it odd, retries under
//! the lock. Removing an entry that is still true (the shrinker) needs no
//! write section: the walk just misses and takes the locked path.
//!
//! Entries whose parent directory is freed are purged before the inode
//! number can be reused, so a reused number never inherits names; for that
//! the cache keeps, per directory, the names it holds (touched only by
//! writers, under its own uncontended lock).

use super::Ino;
use crate::format::NAME_MAX;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;

/// What the cache knows of one name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dentry {
    /// The name exists: its inode and its `dtype` (see `format::dtype_of`).
    Positive { ino: Ino, kind: u8 },
    /// The name does not exist.
    Negative,
}

/// A key as stored: the parent's inode number (little endian), then the
/// name.
fn stored_key(parent: Ino, name: &[u8]) -> Box<[u8]> {
    let mut key = Vec::with_capacity(8 + name.len());
    key.extend_from_slice(&parent.to_le_bytes());
    key.extend_from_slice(name);
    key.into_boxed_slice()
}

/// A key to look up with, borrowed: hashes and compares as the stored key
/// would, without building it.
#[derive(Clone, Copy)]
struct KeyRef<'a> {
    parent: Ino,
    name: &'a [u8],
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // What `<[u8] as Hash>` does with the stored key: the length, then
        // the bytes (the parent's 8 bytes end on a word boundary, so writing
        // them apart hashes as writing them together).
        state.write_usize(8 + self.name.len());
        state.write(&self.parent.to_le_bytes());
        state.write(self.name);
    }
}

impl papaya::Equivalent<Box<[u8]>> for KeyRef<'_> {
    fn equivalent(&self, key: &Box<[u8]>) -> bool {
        key.len() == 8 + self.name.len()
            && key[..8] == self.parent.to_le_bytes()
            && key[8..] == *self.name
    }
}

/// Hashes keys a word at a time, from a random seed per mount so that no
/// one can choose names that pile into one bucket.
#[derive(Clone, Copy)]
pub(crate) struct KeyHasher {
    seed: u64,
}

impl KeyHasher {
    fn new() -> KeyHasher {
        KeyHasher {
            seed: std::collections::hash_map::RandomState::new().hash_one(0u64),
        }
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(self.seed)
    }
}

pub(crate) struct WordHasher(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        // The multiplies carry only upwards: mix the high bits back down
        // (murmur3's finaliser), or names that differ only in their last
        // characters would share their low bits and their buckets.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut tail = [0u8; 8];
            tail[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0.rotate_left(5) ^ n as u64).wrapping_mul(K);
    }
}

/// The dentry cache. Reads ([`Dcache::walk`], [`Dcache::get`]) take no
/// lock; every other call must be made under the filesystem's state lock.
pub(crate) struct Dcache {
    map: papaya::HashMap<Box<[u8]>, Dentry, KeyHasher>,
    /// Odd while a change that removes or retargets names is being applied.
    seq: AtomicU64,
    /// The names cached under each directory, so a freed directory's names
    /// can be purged.
    names: Mutex<HashMap<Ino, HashSet<Box<[u8]>>>>,
}

impl std::fmt::Debug for Dcache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dcache")
            .field("entries", &self.map.len())
            .finish_non_exhaustive()
    }
}

/// A name change committed by a transaction, applied to the cache after
/// the commit.
#[derive(Clone, Debug)]
pub(crate) struct NameChange {
    pub parent: Ino,
    pub name: Vec<u8>,
    pub to: Dentry,
    /// Whether the name existed before (its removal or retargeting needs a
    /// write section).
    pub existed: bool,
}

/// Bytes a cached dentry costs, on average (key, value, table slot, the
/// per-directory name set).
pub(crate) const DENTRY_COST: usize = 96;

impl Dcache {
    pub fn new() -> Dcache {
        Dcache {
            map: papaya::HashMap::builder()
                .hasher(KeyHasher::new())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            seq: AtomicU64::new(0),
            names: Mutex::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// What the cache knows of `name` in `parent` (lock-free).
    #[cfg(test)]
    pub fn get(&self, parent: Ino, name: &[u8]) -> Option<Dentry> {
        self.map.pin().get(&KeyRef { parent, name }).copied()
    }

    /// Run a lock-free walk: `walk` reads entries through the lookup it is
    /// given and returns `Some` with its answer, or `None` when it needs the
    /// locked path (a miss, a symlink to follow). The answer is kept only if
    /// no name was removed or retargeted while it ran.
    pub fn walk<T>(
        &self,
        walk: impl FnOnce(&dyn Fn(Ino, &[u8]) -> Option<Dentry>) -> Option<T>,
    ) -> Option<T> {
        let before = self.seq.load(Ordering::Acquire);
        if before & 1 == 1 {
            return None;
        }
        let map = self.map.pin();
        let lookup = |parent: Ino, name: &[u8]| map.get(&KeyRef { parent, name }).copied();
        let answer = walk(&lookup)?;
        // Order the entry loads before the re-read of the count (the read
        // side of a seqlock).
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == before).then_some(answer)
    }

    /// Record a fact found under the lock (a filled miss).
    pub fn fill(&self, parent: Ino, name: &[u8], dentry: Dentry) {
        self.put(parent, name, dentry);
    }

    fn put(&self, parent: Ino, name: &[u8], dentry: Dentry) {
        if name.len() > NAME_MAX {
            return;
        }
        let key = stored_key(parent, name);
        let map = self.map.pin();
        if map.insert(key.clone(), dentry).is_none() {
            self.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(parent)
                .or_default()
                .insert(key);
        }
    }

    /// Apply the name changes of a committed transaction to the names the
    /// cache holds.
    pub fn apply(&self, changes: &[NameChange]) {
        if changes.is_empty() {
            return;
        }
        let section = changes.iter().any(|c| c.existed);
        if section {
            // Writers are serialised by the state lock: a plain store works.
            let seq = self.seq.load(Ordering::Relaxed);
            self.seq.store(seq + 1, Ordering::Relaxed);
            fence(Ordering::Release);
        }
        // Only names the cache holds need changing: a miss takes the locked
        // path anyway, and filling here would make every create pay for a
        // lookup that may never come.
        let map = self.map.pin();
        for change in changes {
            let key = KeyRef {
                parent: change.parent,
                name: &change.name,
            };
            if map.get(&key).is_some() {
                map.insert(stored_key(change.parent, &change.name), change.to);
            }
        }
        if section {
            let seq = self.seq.load(Ordering::Relaxed);
            self.seq.store(seq + 1, Ordering::Release);
        }
    }

    /// Forget every name under `dir` (freed, or its index dropped).
    pub fn purge_dir(&self, dir: Ino) {
        let Some(keys) = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dir)
        else {
            return;
        };
        let map = self.map.pin();
        for key in keys {
            map.remove(&key);
        }
    }

    /// Directories with cached names, and how many each has.
    pub fn dirs(&self) -> Vec<(Ino, usize)> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.iter().map(|(&dir, set)| (dir, set.len())).collect()
    }

    /// Forget everything (unmount).
    pub fn clear(&self) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.clear();
        self.map.pin().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_different_parents_do_not_collide() {
        let cache = Dcache::new();
        cache.fill(1, b"a", Dentry::Positive { ino: 5, kind: 1 });
        cache.fill(2, b"a", Dentry::Negative);
        assert_eq!(
            cache.get(1, b"a"),
            Some(Dentry::Positive { ino: 5, kind: 1 })
        );
        assert_eq!(cache.get(2, b"a"), Some(Dentry::Negative));
        assert_eq!(cache.get(3, b"a"), None);
        assert_eq!(cache.get(1, b"ab"), None);
        // Borrowed keys hash as stored ones, whatever the name's length.
        for len in [0, 1, 7, 8, 9, 255] {
            let name = vec![b'x'; len];
            let hasher = KeyHasher::new();
            assert_eq!(
                hasher.hash_one(KeyRef {
                    parent: 9,
                    name: &name
                }),
                hasher.hash_one(stored_key(9, &name))
            );
        }
        cache.purge_dir(1);
        assert_eq!(cache.get(1, b"a"), None);
        assert_eq!(cache.get(2, b"a"), Some(Dentry::Negative));
    }

    #[test]
    fn a_walk_during_a_removal_is_not_trusted() {
        let cache = Dcache::new();
        cache.fill(1, b"d", Dentry::Positive { ino: 7, kind: 2 });
        let answer = cache.walk(|get| {
            let first = get(1, b"d");
            // A rename commits while the walk runs.
            cache.apply(&[NameChange {
                parent: 1,
                name: b"d".to_vec(),
                to: Dentry::Negative,
                existed: true,
            }]);
            first
        });
        assert_eq!(answer, None, "the walk saw the count move");
        let answer = cache.walk(|get| get(1, b"d"));
        assert_eq!(answer, Some(Dentry::Negative));
    }
}
