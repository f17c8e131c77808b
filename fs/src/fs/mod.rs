//! The filesystem: [`Fs`], its library API, and the machinery every call
//! shares (the inode cache, staged changes, the journal).
//!
//! ## How a call changes the filesystem
//!
//! Every changing call runs under the filesystem's state lock and builds a
//! [`Stage`]: the journal transaction, plus what to undo in memory if the call
//! fails before committing. Cached inodes it touches are invalidated on
//! failure (they reload from media, which the call never changed), inodes it
//! took are returned, and the allocator's staged allocations are undone. On
//! success the transaction commits (journal, then in place) and only then are
//! freed blocks and inodes released.
//!
//! File data is not journaled: new blocks are written (and zeroed where the
//! write does not cover them) before the transaction that points at them
//! commits, so a crash never exposes old contents; overwrites of existing
//! blocks go in place. Every write is durable when it returns, so `fsync` has
//! nothing left to do but a fence.
//!
//! ## Concurrency and lifecycle
//!
//! Changes are serialised by the state lock: the journal is one sequential
//! log, and a metadata change costs a couple of microseconds, so a single
//! writer at a time loses little and makes every change atomic against
//! every other, which is what removes the races Linux shipped (an `O_CREAT`
//! open racing a rename, a negative dentry turning positive under a caller):
//! [`Fs::open_create`] looks up, creates and opens in one hold of the lock.
//! Path walks take no lock at all: they read the dentry cache (`dcache`),
//! a lock-free map validated by a sequence count that every committed
//! removal or rename bumps, and fall back to the locked path on a miss.
//! This differs from DESIGN.md's per-inode locking; see the README.
//!
//! In-memory inodes are counted three ways (`Refs`): remembered lookups (the
//! FUSE protocol's `nlookup`, [`Fs::lookup_ref`] / [`Fs::forget`]), open
//! handles, and internal holds ([`Fs::hold`]). Unreferenced inodes may be
//! evicted by the shrinker (`shrink`), which a background worker runs when
//! the caches pass their budget. An inode whose last name goes while it is
//! referenced sits on the on-media orphan list until its last reference
//! goes; a crash leaves it for the next mount to reclaim.
//!
//! [`Fs::unmount`] is refused while any inode is referenced; once it goes
//! ahead, the worker is stopped (finishing its pass), the caches are emptied
//! and checked empty, and every later call fails with
//! [`Error::Unmounted`].

mod acl;
mod atime;
mod check;
mod claims;
mod dax;
mod dcache;
mod dir;
mod extents;
mod failure;
mod file;
mod flags;
mod layout;
mod namespace;
mod owner;
mod shrink;
mod user;
mod xattr;

pub use atime::Atime;
pub use check::{fsck, FsckReport, Problem};
pub use dax::{
    early_notice, map, map_at, Blocks, Breaking, BusSignal, DaxCounters, DaxStats, DevicePages,
    Fallback, FaultEvent, FaultResult, FaultSize, FileDax, Layout, MapOptions, Mapping, TraceSink,
};
pub use failure::{FailureHandler, MemoryFailure};
pub use file::Seek;
pub use flags::{from_xflags, to_xflags};
pub use layout::{Pin, Recall, RecallKind, DEFAULT_LAYOUT_TIMEOUT};
pub use owner::{FileExtent, Owner};

use crate::alloc::Allocator;
use crate::error::{Error, Result};
use crate::format::read_meta;
use crate::format::StateBlock;
use crate::format::{
    Dirent, Extent, ExtentBlock, Inode, Superblock, Time, BITMAP_PIECE, BLOCK,
    BLOCKS_PER_BITMAP_PIECE, INLINE_EXTENTS, INODE_SIZE, OVERFLOW_EXTENTS, ROOT_INO,
    SB_NEEDS_CHECK, SLOT, SLOTS_PER_BLOCK, STATE_LEN,
};
use crate::journal::{Journal, LogEnd, Tx};
use dcache::{Dcache, NameChange};
use dir::DirIndex;
use pmem::Device;
use std::collections::BTreeSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A hasher for inode and block numbers: one multiply, not SipHash (which
/// took a tenth of a 4 KiB append). The keys are not attacker-chosen.
#[derive(Default)]
pub(crate) struct NumberHasher(u64);

impl Hasher for NumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<NumberHasher>>;
pub(crate) type HashSet<K> = std::collections::HashSet<K, BuildHasherDefault<NumberHasher>>;

pub use crate::format::Time as Timestamp;

/// An inode number.
pub type Ino = u64;

/// The root directory's inode number.
pub const ROOT: Ino = ROOT_INO;

/// The kind of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix domain socket's name.
    Socket,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
}

impl FileKind {
    fn of(mode: u32) -> FileKind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => FileKind::File,
        }
    }

    fn of_dtype(dtype: u8) -> FileKind {
        match dtype {
            libc::DT_DIR => FileKind::Dir,
            libc::DT_LNK => FileKind::Symlink,
            libc::DT_FIFO => FileKind::Fifo,
            libc::DT_SOCK => FileKind::Socket,
            libc::DT_CHR => FileKind::CharDevice,
            libc::DT_BLK => FileKind::BlockDevice,
            _ => FileKind::File,
        }
    }
}

/// What `getattr` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// The whole `st_mode`: type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 4 KiB blocks in use (data and metadata of the file).
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// The device number of a device node, as Linux encodes a `dev_t`
    /// (`libc::makedev`); 0 for every other file.
    pub rdev: u64,
    /// The attribute flags (`FS_IOC_GETFLAGS`'s `FS_*_FL`; see [`Fs::set_flags`]).
    pub flags: u32,
    /// Tells this inode from earlier ones with the same number (file
    /// handles carry it): new inodes take the next of a counter started
    /// from the clock at mount.
    pub generation: u32,
    /// When the inode was made (statx's `btime`); `None` for an inode made
    /// before daxfs kept it. (Not through the mount: the FUSE library in
    /// use does not answer `FUSE_STATX`.)
    pub btime: Option<Timestamp>,
}

/// Changes for `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

/// One `readdir` entry; `next` is the offset to continue after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: FileKind,
    pub name: Vec<u8>,
    pub next: u64,
}

/// What `statfs` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    /// Free blocks a file may take: all but the few kept for the extent
    /// blocks that a hole punched in a full filesystem needs (`f_bavail`).
    pub available_blocks: u64,
    pub files: u64,
    pub free_files: u64,
    pub name_max: u64,
    /// Aligned, entirely free 2 MiB regions.
    pub free_huge_regions: u64,
}

/// Flags of `rename`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    /// Fail with `EEXIST` if the target exists (`RENAME_NOREPLACE`).
    pub noreplace: bool,
    /// Swap source and target, which must both exist (`RENAME_EXCHANGE`).
    pub exchange: bool,
    /// Leave a whiteout (a character device 0/0, as overlayfs marks a
    /// deleted name) where the source was, in the same transaction
    /// (`RENAME_WHITEOUT`). It has the moved file's owner.
    pub whiteout: bool,
}

/// How `open_create` creates and opens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// `O_EXCL`: fail with `EEXIST` if the name exists.
    pub exclusive: bool,
    /// `O_TRUNC`: an existing regular file is emptied.
    pub truncate: bool,
    /// Permission bits of a new file.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// An open file or directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle {
    pub ino: Ino,
    id: u64,
}

/// A cached inode, with what was read of it lazily.
#[derive(Debug)]
struct Cached {
    inode: Inode,
    /// All extents, sorted, once read.
    extents: Option<Vec<Extent>>,
    /// The overflow extent blocks, in chain order, once read.
    chain: Vec<u64>,
    dir: Option<DirIndex>,
    /// Used since the shrinker last looked (its second chance).
    accessed: bool,
}

/// Bytes a cached inode costs beyond its extents and directory index.
const INODE_COST: usize = std::mem::size_of::<Cached>() + 48;

impl Cached {
    fn new(inode: Inode) -> Cached {
        Cached {
            inode,
            extents: None,
            chain: Vec::new(),
            dir: None,
            accessed: true,
        }
    }

    /// What this inode costs in memory, roughly.
    fn cost(&self) -> usize {
        INODE_COST
            + self.extents.as_ref().map_or(0, |e| e.capacity() * 16)
            + self.chain.capacity() * 8
            + self.dir.as_ref().map_or(0, DirIndex::cost)
    }
}

/// Who holds an in-memory inode. An inode with any reference is never
/// evicted, and one whose last name is gone is kept (on the orphan list)
/// until its last reference goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Refs {
    /// Lookups the kernel remembers (the FUSE protocol's `nlookup`).
    lookups: u64,
    /// Open handles.
    opens: u32,
    /// Internal holds ([`Hold`]).
    holds: u32,
}

impl Refs {
    fn is_zero(&self) -> bool {
        *self == Refs::default()
    }
}

impl std::fmt::Display for Refs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let mut part = |n: u64, what: &str| {
            if n > 0 {
                parts.push(format!("{n} {what}{}", if n == 1 { "" } else { "s" }));
            }
        };
        part(self.opens as u64, "open handle");
        part(self.lookups, "lookup");
        part(self.holds as u64, "hold");
        f.write_str(&parts.join(", "))
    }
}

struct State {
    journal: Journal,
    alloc: Allocator,
    free_inodes: BTreeSet<Ino>,
    inodes: HashMap<Ino, Cached>,
    /// References per inode; an inode with none has no entry.
    refs: HashMap<Ino, Refs>,
    handles: HashSet<u64>,
    next_handle: u64,
    orphan_head: Ino,
    /// The predecessor of each orphan on the list (0: the head), so that
    /// an orphan leaves the list without a walk of it (the on-media list
    /// is singly linked, as ext4's). Built from the list when first
    /// needed, and again after a change that failed.
    orphan_prev: Option<HashMap<Ino, Ino>>,
    /// Unnamed files made by `tmpfile` that `link` may name (Linux's
    /// `I_LINKABLE`): an `O_TMPFILE` without `O_EXCL`, until named.
    linkable: HashSet<Ino>,
    /// Inodes whose metadata is damaged or poisoned: never changed again.
    damaged: HashSet<Ino>,
    /// Poisoned pages of filesystem-wide structures (the journal, the
    /// bitmap, the superblocks, the state block): a change that would write
    /// into one is refused, naming it; a poisoned journal refuses every
    /// change. Until the poison is cleared.
    damaged_areas: Vec<owner::Area>,
    /// Set by a successful unmount: every later call fails.
    unmounted: bool,
    /// What the inode cache costs, roughly (exact after a shrinker pass).
    cache_cost: usize,
    /// Above this (inodes and dentries together) the shrinker runs.
    cache_budget: usize,
}

/// The held state lock; counted as held by this thread (see `user`).
type StateGuard<'a> = user::Counted<MutexGuard<'a, State>>;

/// The changes of one call, and how to undo them in memory if it fails.
struct Stage {
    tx: Tx,
    touched: HashSet<Ino>,
    taken_inodes: Vec<Ino>,
    freed_inodes: Vec<Ino>,
    old_orphan_head: Option<Ino>,
    /// Names added, removed or retargeted, for the dentry cache once
    /// committed.
    names: Vec<NameChange>,
}

impl Stage {
    /// Record that `name` in `dir` now reads `to` (`existed`: it named
    /// something before), for the dentry cache once committed.
    fn name_changed(&mut self, dir: Ino, name: &[u8], to: dcache::Dentry, existed: bool) {
        self.names.push(NameChange {
            parent: dir,
            name: name.to_vec(),
            to,
            existed,
        });
    }
}

/// A mounted daxfs filesystem. `Send + Sync`: share it between threads.
///
/// Dropping it without [`Fs::unmount`] stops its background work and
/// leaves the image as a crash would (the next mount replays the journal).
pub struct Fs {
    core: Arc<Core>,
    /// The background worker (the shrinker); `None` in the worker's own
    /// view of the filesystem and once stopped.
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What every view of one mounted filesystem shares.
struct Core {
    dev: Device,
    sb: Superblock,
    state: Mutex<State>,
    /// The dentry cache, read without the state lock.
    names: Dcache,
    /// DAX state (entry index, live mappings) of files mapped so far.
    dax: Mutex<HashMap<Ino, Arc<dax::FileDax>>>,
    /// Set (under the state lock) when the first file is mapped; until
    /// then the data path skips `dax`.
    dax_used: AtomicBool,
    dax_counters: dax::DaxCounters,
    /// How long a call that frees pinned blocks waits (see `layout`).
    layout_timeout_ms: AtomicU64,
    /// Bumped by `cancel_layout_breaks`.
    layout_cancel: AtomicU64,
    /// Calls waiting for pins to go (see `layout`).
    layout_waiting: AtomicU64,
    /// The generation the next new inode takes.
    next_generation: std::sync::atomic::AtomicU32,
    /// When reads update access times (an [`Atime`] as a number).
    atime: std::sync::atomic::AtomicU8,
    /// Memory failures handled and not cleared (see `failure`).
    failures: Mutex<Vec<failure::MemoryFailure>>,
    failure_handlers: Mutex<Vec<failure::FailureHandler>>,
    /// Set with `State::unmounted`, for the calls that take no lock.
    unmounted: AtomicBool,
    /// Signalled when an inode's last reference goes (for `unmount_wait`).
    closed: Condvar,
    /// Wakes the background worker.
    background: Mutex<Background>,
    background_cv: Condvar,
    notes: Vec<String>,
    /// Damage mount found and contained (also in `notes`).
    damage_found: Vec<String>,
}

#[derive(Debug, Default)]
struct Background {
    /// A shrinker pass is asked for.
    shrink: bool,
    /// The worker is to exit.
    stop: bool,
    /// Passes finished so far.
    passes: u64,
}

/// Default cache budget: 64 MiB of inodes and dentries.
pub const DEFAULT_CACHE_BUDGET: usize = 64 << 20;

/// What the inode and dentry caches hold (see [`Fs::cache_usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheUsage {
    /// Inodes in memory.
    pub inodes: usize,
    /// Inodes with a reference (lookups, handles or holds).
    pub referenced: usize,
    /// Cached names, positive and negative.
    pub dentries: usize,
    /// Their estimated memory, in bytes.
    pub bytes: usize,
    /// The budget the shrinker keeps them under.
    pub budget: usize,
    /// Shrinker passes run so far.
    pub shrinker_passes: u64,
}

/// What one shrinker pass evicted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shrunk {
    pub inodes: usize,
    pub dentries: usize,
}

/// An internal reference to an inode (like the kernel's `igrab`): while it
/// lives the inode stays in memory and, if its last name is removed, on the
/// orphan list. Dropping it releases the inode (freeing an unlinked one; if
/// that fails, the orphan is reclaimed at the next mount).
#[derive(Debug)]
pub struct Hold<'a> {
    inode: InodeRef,
    _fs: std::marker::PhantomData<&'a Fs>,
}

impl Hold<'_> {
    pub fn ino(&self) -> Ino {
        self.inode.ino
    }
}

/// One hold on an in-memory inode ([`Refs::holds`]), given back when
/// dropped: the inode stays in memory (an unlinked one is freed at its
/// last reference) and unmount waits for it. A [`Hold`], a DAX mapping and
/// a [`Pin`] each own one.
#[derive(Debug)]
pub(super) struct InodeRef {
    fs: Fs,
    ino: Ino,
}

impl InodeRef {
    /// Take a hold on `ino`, which the caller found, under the state lock.
    fn take(fs: &Fs, st: &mut State, ino: Ino) -> InodeRef {
        st.refs.entry(ino).or_default().holds += 1;
        InodeRef { fs: fs.view(), ino }
    }
}

impl Drop for InodeRef {
    fn drop(&mut self) {
        let _ = self.fs.put_ref(self.ino, |r| r.holds -= 1);
    }
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("device", &self.core.dev.path())
            .finish_non_exhaustive()
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Fs>();
};

fn uuid() -> [u8; 16] {
    let mut uuid = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut uuid);
    }
    let t = Time::now();
    uuid[..8]
        .iter_mut()
        .zip(t.nanos.to_le_bytes().iter().cycle())
        .for_each(|(u, n)| *u ^= n);
    uuid
}

impl Fs {
    /// Make a new, empty filesystem on `dev` and mount it.
    pub fn format(dev: Device) -> Result<Fs> {
        let now = Time::now();
        let sb = Superblock::for_device(dev.size(), uuid(), now.secs as u64)?;
        reserve_metadata(&dev, &sb)?;
        // Metadata areas start zeroed: a free inode is all zeros.
        dev.memset_nodrain(BLOCK, 0, BLOCK)?;
        dev.memcpy_nodrain(sb.state_block * BLOCK, &StateBlock::default().encode())?;
        dev.memset_nodrain(
            sb.inode_table_start * BLOCK,
            0,
            sb.inode_table_blocks * BLOCK,
        )?;
        let alloc = Allocator::new(&sb, Allocator::initial_bitmap(&sb));
        let bytes: Vec<u8> = (0..(sb.bitmap_blocks * BLOCK / 8) as usize)
            .flat_map(|w| alloc.word(w).to_le_bytes())
            .collect();
        dev.memcpy_nodrain(sb.bitmap_start * BLOCK, &bytes)?;
        dev.memcpy_nodrain(sb.bitmap_csum * BLOCK, &alloc.checksum_table(&sb))?;
        Journal::format(&dev, sb.journal_start, sb.journal_blocks, sb.uuid)?;
        let root = Inode::new_root(now);
        dev.memcpy_nodrain(sb.inode_offset(ROOT_INO), &root.encode())?;
        dev.drain();
        // The superblocks last: until they are durable this is no filesystem.
        let encoded = sb.encode();
        dev.memcpy_persist(sb.backup_block * BLOCK, &encoded)?;
        dev.memcpy_persist(0, &encoded)?;
        let fs = Fs::mount(dev)?;
        // Where fsck puts what nothing names, as mke2fs makes it.
        fs.mkdir(ROOT, check::LOST_AND_FOUND, 0o700, 0, 0)?;
        Ok(fs)
    }

    /// Mount the filesystem on `dev`: validate the superblock (falling back
    /// to the backup copy), replay the journal, rebuild the allocator, and
    /// reclaim orphans left by a crash. A filesystem marked as needing a
    /// check, or whose journal turns out damaged, is refused with
    /// [`Error::NeedsCheck`] (run `fsck` with repair).
    pub fn mount(dev: Device) -> Result<Fs> {
        Fs::mount_for(dev, Purpose::Use)
    }

    fn mount_for(dev: Device, purpose: Purpose) -> Result<Fs> {
        let mut notes = Vec::new();
        let (mut sb, primary) = Superblock::read_either(&dev)?;
        if let Some(primary) = primary {
            notes.push(format!(
                "primary superblock is bad ({primary}); mounted from the backup at {:#x}; run \
                 `daxfs fsck --repair` to restore it",
                sb.backup_block * BLOCK
            ));
        }
        if sb.needs_check() && purpose == Purpose::Use {
            return Err(Error::NeedsCheck(needs_check_text(&sb)));
        }
        reserve_metadata(&dev, &sb)?;
        let mut header_damage = None;
        let (mut journal, recovery) =
            match Journal::recover(&dev, sb.journal_start, sb.journal_blocks, sb.uuid) {
                Err(Error::Corrupt {
                    structure,
                    offset,
                    detail,
                }) if structure == "journal header" && purpose == Purpose::Check => {
                    // As e2fsck does with a damaged journal superblock: a
                    // new, empty journal (what the old one held is lost).
                    header_damage = Some(format!(
                        "the journal header at device offset {offset:#x} is damaged ({detail}): \
                         a new, empty journal is written, and the transactions it held are lost"
                    ));
                    // The old ring's transactions carry this filesystem's
                    // uuid and low sequence numbers: the new journal would
                    // replay them (stale metadata over newer) were they
                    // left there.
                    dev.memset_persist(
                        (sb.journal_start + 1) * BLOCK,
                        0,
                        (sb.journal_blocks - 1) * BLOCK,
                    )?;
                    Journal::format(&dev, sb.journal_start, sb.journal_blocks, sb.uuid)?;
                    Journal::recover(&dev, sb.journal_start, sb.journal_blocks, sb.uuid)?
                }
                other => other?,
            };
        if recovery.replayed > 0 {
            notes.push(format!(
                "replayed {} journal transactions",
                recovery.replayed
            ));
        }
        if recovery.poisoned > 0 {
            notes.push(format!(
                "{} journal records were not replayed: their metadata is poisoned and reads of it fail with EIO",
                recovery.poisoned
            ));
        }
        if let LogEnd::Damaged {
            seq,
            at,
            why,
            later,
            newest,
        } = &recovery.end
        {
            // Recorded in both superblocks before anything else, so that
            // the damage is never forgotten.
            sb.flags |= SB_NEEDS_CHECK;
            sb.damaged_tx = *seq;
            write_superblocks(&dev, &sb)?;
            let what = format!(
                "journal transaction {seq} (ring offset {at}) is damaged: {why}; {later} later \
                 transactions are intact and were not replayed"
            );
            if purpose == Purpose::Use {
                return Err(Error::NeedsCheck(format!(
                    "{what}; run `daxfs fsck --repair` on the image"
                )));
            }
            journal.discard_damaged(&dev, *newest)?;
            notes.push(what);
        }
        let (mut alloc, bitmap_damage) = Allocator::load(&dev, &sb)?;
        alloc.set_reserver(dev.reserver());
        if sb.bitmap_csum == 0 {
            // An image from before bitmap checksums: give it a table when
            // there is room (written before the superblocks name it).
            if let Some(at) = sb.bitmap_csum_room() {
                dev.memcpy_persist(at * BLOCK, &alloc.checksum_table(&sb))?;
                sb.bitmap_csum = at;
                write_superblocks(&dev, &sb)?;
                alloc.keep_checksums_at(at * BLOCK);
                notes.push("the allocation bitmap now has checksums".to_string());
            }
        }
        // Which inodes are free, and what the others claim (see `claims`).
        // A poisoned sector of the table makes its inodes damaged (neither
        // free nor usable), not the mount impossible.
        let mut damaged = HashSet::default();
        let mut free = Vec::new();
        let mut claims = claims::Claims::new(&dev, &sb);
        claims::scan_table(&dev, &sb, |ino, raw| match raw {
            None => {
                damaged.insert(ino);
            }
            Some(raw) if raw[..4] == [0; 4] => free.push(ino),
            Some(raw) => claims.add(ino, raw),
        })?;
        // (In order: built in bulk, not an insert at a time.)
        let free_inodes: BTreeSet<Ino> = free.into_iter().collect();
        let (unmarked, shared) = claims.apply(&mut alloc);
        let mut claim_damage = Vec::new();
        if unmarked > 0 {
            claim_damage.push(format!(
                "{unmarked} blocks that files own were marked free in the allocation bitmap: \
                 held in use (the bitmap is written at the next change)"
            ));
        }
        if !shared.is_empty() && purpose == Purpose::Use {
            // Everyone who claims a shared block refuses until fsck (which
            // sees them itself).
            for (ino, block) in claims::Claims::claimants(&dev, &sb, &shared)? {
                damaged.insert(ino);
                claim_damage.push(format!(
                    "inode {ino} shares block {block} with another file: refused until \
                     `daxfs fsck --repair` gives each its own copy"
                ));
            }
        }
        // A damaged state block is contained: its orphan list is dropped
        // (fsck reports what it held as inodes nothing names), and the
        // block is written anew below.
        let mut raw_state = [0u8; STATE_LEN];
        let state = read_meta(&dev, sb.state_block * BLOCK, &mut raw_state, "state block")
            .and_then(|()| StateBlock::decode(&raw_state, sb.state_block * BLOCK));
        let (orphan_head, state_damage) = match state {
            Ok(state) => (state.orphan_head, None),
            Err(e) => (0, Some(e)),
        };
        let mut fs = Fs {
            core: Arc::new(Core {
                dev,
                sb,
                state: Mutex::new(State {
                    journal,
                    alloc,
                    free_inodes,
                    inodes: HashMap::default(),
                    refs: HashMap::default(),
                    handles: HashSet::default(),
                    next_handle: 1,
                    orphan_head,
                    orphan_prev: None,
                    linkable: HashSet::default(),
                    damaged,
                    damaged_areas: Vec::new(),
                    unmounted: false,
                    cache_cost: 0,
                    cache_budget: DEFAULT_CACHE_BUDGET,
                }),
                names: Dcache::new(),
                dax: Mutex::new(HashMap::default()),
                dax_used: AtomicBool::new(false),
                dax_counters: dax::DaxCounters::default(),
                layout_timeout_ms: AtomicU64::new(layout::DEFAULT_LAYOUT_TIMEOUT.as_millis() as u64),
                layout_cancel: AtomicU64::new(0),
                layout_waiting: AtomicU64::new(0),
                atime: Default::default(),
                next_generation: {
                    let now = crate::format::Time::now();
                    (now.secs as u32).rotate_left(12) ^ now.nanos
                }
                .into(),
                failures: Mutex::new(Vec::new()),
                failure_handlers: Mutex::new(Vec::new()),
                unmounted: AtomicBool::new(false),
                closed: Condvar::new(),
                background: Mutex::new(Background::default()),
                background_cv: Condvar::new(),
                notes,
                damage_found: Vec::new(),
            }),
            worker: Mutex::new(None),
        };
        // (fsck checks, and makes anew, a damaged root.)
        if purpose == Purpose::Use {
            let root = fs.getattr(ROOT)?;
            if root.kind != FileKind::Dir {
                return Err(Error::corrupt(
                    "root inode",
                    fs.core.sb.inode_offset(ROOT),
                    "not a directory",
                ));
            }
        }
        let mut notes = Vec::new();
        // Damage found and contained (fsck reports each as a problem).
        let mut damage_found: Vec<String> = header_damage.into_iter().collect();
        // (Read before any commit, which writes those words back.)
        let marked_free = fs.lock()?.alloc.metadata_marked_free().len();
        if marked_free > 0 {
            notes.push(format!(
                "{marked_free} bitmap words marked metadata blocks free (corrected; written at the next change)"
            ));
        }
        if !bitmap_damage.is_empty() {
            damage_found.extend(fs.rebuild_bitmap(&bitmap_damage, purpose)?);
        }
        if let Some(damage) = state_damage {
            let poisoned = fs
                .core
                .dev
                .first_poison(fs.core.sb.state_block * BLOCK, BLOCK)
                .is_some();
            if !poisoned {
                fs.change(|fs, st, stage| {
                    fs.set_orphan_head(st, stage, 0);
                    st.orphan_prev = None;
                    Ok(())
                })?;
            }
            damage_found.push(format!(
                "{damage}: the orphan list it held is dropped{}",
                if poisoned {
                    ""
                } else {
                    " and the block written anew"
                }
            ));
        }
        damage_found.extend(claim_damage);
        let (reclaimed, cut) = fs.reclaim_orphans()?;
        if reclaimed > 0 {
            notes.push(format!("reclaimed {reclaimed} orphaned inodes"));
        }
        damage_found.extend(cut);
        notes.extend(damage_found.iter().cloned());
        // Free blocks on poisoned media stay out of allocation; poisoned
        // filesystem-wide structures are not written.
        let quarantined = {
            let mut st = fs.lock()?;
            let mut n = 0;
            for range in fs.core.dev.badblocks() {
                let first = range.offset() / crate::format::BLOCK;
                let end = (range.offset() + range.len()).div_ceil(crate::format::BLOCK);
                n += (first..end).filter(|&b| st.alloc.quarantine(b)).count();
                for block in first..end {
                    fs.damage_area(&mut st, block * crate::format::BLOCK);
                }
            }
            n
        };
        if quarantined > 0 {
            notes.push(format!(
                "{quarantined} free blocks on poisoned media kept out of allocation"
            ));
        }
        let core = Arc::get_mut(&mut fs.core).expect("no other view before the worker starts");
        core.notes.extend(notes);
        core.damage_found = damage_found;
        fs.start_worker()?;
        Ok(fs)
    }

    /// Start the background worker: the shrinker, woken when the caches
    /// grow past their budget.
    fn start_worker(&self) -> Result<()> {
        let view = self.view();
        let handle = std::thread::Builder::new()
            .name("daxfs-shrinker".into())
            .spawn(move || view.run_background())
            .map_err(|source| {
                Error::Device(pmem::Error::Io {
                    path: self.core.dev.path().to_path_buf(),
                    op: "start the background worker thread for",
                    source,
                })
            })?;
        *self.worker.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    fn run_background(&self) {
        loop {
            {
                let mut bg = self.background();
                while !bg.shrink && !bg.stop {
                    bg = self
                        .core
                        .background_cv
                        .wait(bg)
                        .unwrap_or_else(|e| e.into_inner());
                }
                if bg.stop {
                    return;
                }
                bg.shrink = false;
            }
            // An error means the filesystem is unmounted: wait for stop.
            let _ = self.shrink();
            self.background().passes += 1;
            self.core.background_cv.notify_all();
        }
    }

    fn background(&self) -> MutexGuard<'_, Background> {
        self.core
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Stop the background worker and wait for it to finish its pass.
    fn stop_worker(&self) {
        let handle = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            self.background().stop = true;
            self.core.background_cv.notify_all();
            // The worker never panics on purpose; if it did, the pass it was
            // running held only in-memory state that unmount throws away.
            let _ = handle.join();
        }
    }

    /// Unmount: refused with [`Error::Busy`], naming them, while inodes are
    /// referenced (open handles, remembered lookups, holds); otherwise the
    /// background work is stopped (a shrinker pass in flight finishes
    /// first), the journal is checkpointed, and the caches are emptied.
    /// Every later call fails with [`Error::Unmounted`], a second unmount
    /// too.
    pub fn unmount(&self) -> Result<()> {
        {
            let mut st = self.lock()?;
            if !st.refs.is_empty() {
                return Err(Error::Busy(busy_inodes(&st)));
            }
            st.journal.close(&self.core.dev)?;
            st.unmounted = true;
            self.core.unmounted.store(true, Ordering::Release);
            st.inodes.clear();
            st.cache_cost = 0;
            self.core.names.clear();
        }
        self.stop_worker();
        // Nothing may be left behind: not by the worker's last pass, not by
        // a call that raced the unmount.
        let st = self.lock_any();
        if !st.inodes.is_empty() || !st.refs.is_empty() || self.core.names.len() > 0 {
            let mut left: Vec<Ino> = st.inodes.keys().chain(st.refs.keys()).copied().collect();
            left.sort_unstable();
            left.dedup();
            return Err(Error::Busy(format!(
                "in-memory inodes left after unmount: {left:?} ({} dentries)",
                self.core.names.len()
            )));
        }
        Ok(())
    }

    /// Unmount once every reference is gone, waiting up to `timeout` for
    /// them; on timeout, [`Error::Busy`] names what is still referenced.
    pub fn unmount_wait(&self, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.lock()?;
        while !st.refs.is_empty() {
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(Error::Busy(busy_inodes(&st)));
            }
            st = st.wait_timeout(&self.core.closed, deadline - now);
            if st.unmounted {
                return Err(Error::Unmounted);
            }
        }
        drop(st);
        self.unmount()
    }

    /// Unmount (if not done yet) and give the device back.
    pub fn into_device(self) -> Result<Device> {
        match self.unmount() {
            Ok(()) | Err(Error::Unmounted) => {}
            Err(e) => return Err(e),
        }
        self.stop_worker();
        let core = Arc::clone(&self.core);
        drop(self);
        match Arc::try_unwrap(core) {
            Ok(core) => Ok(core.dev),
            Err(_) => Err(Error::Busy(
                "another view of the filesystem is alive".into(),
            )),
        }
    }

    /// What mount had to say (a backup superblock used, journal replayed,
    /// orphans reclaimed).
    pub fn mount_notes(&self) -> &[String] {
        &self.core.notes
    }

    /// The device under the filesystem.
    pub fn device(&self) -> &Device {
        &self.core.dev
    }

    /// The filesystem's geometry.
    pub fn superblock(&self) -> &Superblock {
        &self.core.sb
    }

    /// The state, for a call on a mounted filesystem.
    fn lock(&self) -> Result<StateGuard<'_>> {
        let st = self.lock_any();
        if st.unmounted {
            return Err(Error::Unmounted);
        }
        Ok(st)
    }

    /// The state, mounted or not.
    fn lock_any(&self) -> StateGuard<'_> {
        user::Counted::new(self.core.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Run a changing call: `f` stages its changes; they commit if it
    /// succeeds and are undone in memory if it fails.
    fn change<T>(&self, f: impl FnOnce(&Fs, &mut State, &mut Stage) -> Result<T>) -> Result<T> {
        let mut st = self.lock()?;
        let mut stage = Stage {
            tx: Tx::new(),
            touched: HashSet::default(),
            taken_inodes: Vec::new(),
            freed_inodes: Vec::new(),
            old_orphan_head: None,
            names: Vec::new(),
        };
        let result = f(self, &mut st, &mut stage).and_then(|value| {
            st.alloc.stage(&mut stage.tx);
            let tx = std::mem::take(&mut stage.tx);
            if let Some(area) = st
                .damaged_areas
                .iter()
                .find(|a| a.every_change || tx.touches(a.start, a.end))
            {
                return Err(Error::corrupt(
                    area.name,
                    area.start,
                    "poisoned: changes that write it are refused until the poison is cleared \
                     (then run fsck)",
                ));
            }
            let State { journal, .. } = &mut *st;
            journal.commit(&self.core.dev, tx)?;
            Ok(value)
        });
        match result {
            Ok(value) => {
                st.alloc.committed();
                self.core.names.apply(&stage.names);
                for ino in stage.freed_inodes {
                    // Its names and DAX entries go before its number can be
                    // reused.
                    self.core.names.purge_dir(ino);
                    self.dax_forget(ino);
                    st.free_inodes.insert(ino);
                    if let Some(cached) = st.inodes.remove(&ino) {
                        st.cache_cost = st.cache_cost.saturating_sub(cached.cost());
                    }
                }
                Ok(value)
            }
            Err(e) => {
                st.alloc.abort();
                for ino in stage.touched.iter().chain(&stage.taken_inodes) {
                    // Reloaded from media when next used; the dentry cache
                    // never saw the uncommitted names.
                    if let Some(cached) = st.inodes.remove(ino) {
                        st.cache_cost = st.cache_cost.saturating_sub(cached.cost());
                    }
                }
                st.free_inodes.extend(stage.taken_inodes);
                if let Some(head) = stage.old_orphan_head {
                    st.orphan_head = head;
                    st.orphan_prev = None;
                }
                Err(e)
            }
        }
    }

    // ---- inodes -------------------------------------------------------------

    fn check_ino(&self, ino: Ino) -> Result<()> {
        if ino == 0 || ino > self.core.sb.inode_count {
            return Err(Error::NotFound);
        }
        Ok(())
    }

    /// The cached inode `ino`, read from media on first use.
    fn cached<'s>(&self, st: &'s mut State, ino: Ino) -> Result<&'s mut Cached> {
        self.check_ino(ino)?;
        if st.damaged.contains(&ino) {
            return Err(Error::corrupt(
                format!("inode {ino}"),
                self.core.sb.inode_offset(ino),
                "damaged; it will not be changed",
            ));
        }
        if !st.inodes.contains_key(&ino) {
            let offset = self.core.sb.inode_offset(ino);
            let mut raw = [0u8; INODE_SIZE as usize];
            let inode = read_meta(&self.core.dev, offset, &mut raw, &format!("inode {ino}"))
                .and_then(|()| Inode::decode(&raw, ino, offset));
            let inode = match inode {
                Ok(inode) => inode,
                Err(e) => {
                    st.damaged.insert(ino);
                    return Err(e);
                }
            };
            if inode.is_free() {
                return Err(Error::NotFound);
            }
            st.inodes.insert(ino, Cached::new(inode));
            self.charge(st, INODE_COST);
        }
        let cached = st.inodes.get_mut(&ino).expect("inserted above");
        cached.accessed = true;
        Ok(cached)
    }

    /// Drop inode `ino` from the cache (read from media at its next use).
    fn forget_cached(&self, st: &mut State, ino: Ino) {
        if let Some(cached) = st.inodes.remove(&ino) {
            st.cache_cost = st.cache_cost.saturating_sub(cached.cost());
        }
    }

    /// Drop directory `dir`'s index and names (read from media at their
    /// next use).
    fn forget_dir(&self, st: &mut State, dir: Ino) {
        if let Some(cached) = st.inodes.get_mut(&dir) {
            if let Some(index) = cached.dir.take() {
                st.cache_cost = st.cache_cost.saturating_sub(index.cost());
            }
        }
        self.core.names.purge_dir(dir);
    }

    fn inode(&self, st: &mut State, ino: Ino) -> Result<Inode> {
        Ok(self.cached(st, ino)?.inode.clone())
    }

    /// Stage inode `ino` as `inode`.
    fn put_inode(&self, st: &mut State, stage: &mut Stage, ino: Ino, inode: Inode) {
        stage
            .tx
            .write(self.core.sb.inode_offset(ino), &inode.encode());
        stage.touched.insert(ino);
        match st.inodes.get_mut(&ino) {
            Some(cached) => cached.inode = inode,
            None => {
                st.inodes.insert(ino, Cached::new(inode));
                self.charge(st, INODE_COST);
            }
        }
    }

    /// Take a free inode for a new file.
    fn take_inode(&self, st: &mut State, stage: &mut Stage) -> Result<Ino> {
        loop {
            let ino = st.free_inodes.pop_first().ok_or(Error::NoSpace)?;
            // A free slot on poisoned media is never handed out.
            if self
                .core
                .dev
                .first_poison(self.core.sb.inode_offset(ino), INODE_SIZE)
                .is_some()
            {
                st.damaged.insert(ino);
                continue;
            }
            stage.taken_inodes.push(ino);
            return Ok(ino);
        }
    }

    fn attr(ino: Ino, inode: &Inode) -> Attr {
        Attr {
            ino,
            kind: FileKind::of(inode.mode),
            mode: inode.mode,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            size: inode.size,
            blocks: inode.blocks,
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            rdev: inode.rdev(),
            flags: inode.flags & crate::format::ATTR_FLAGS,
            generation: inode.generation,
            btime: (inode.btime != Timestamp::default()).then_some(inode.btime),
        }
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let mut st = self.lock()?;
        let inode = self.inode(&mut st, ino)?;
        Ok(Fs::attr(ino, &inode))
    }

    /// Change attributes; a size change truncates or extends.
    pub fn setattr(&self, ino: Ino, set: &SetAttr) -> Result<Attr> {
        let first = set.size.map_or(u64::MAX, |size| size / BLOCK);
        self.breaking_mappings(ino, first, u64::MAX, || self.setattr_once(ino, set))
    }

    fn setattr_once(&self, ino: Ino, set: &SetAttr) -> Result<Attr> {
        self.change(|fs, st, stage| {
            let inode = fs.inode(st, ino)?;
            flags::immutable(&inode)?;
            if set.size.is_some() || set.mode.is_some() || set.uid.is_some() || set.gid.is_some() {
                flags::unchangeable(&inode)?;
            }
            if let Some(size) = set.size {
                fs.truncate_staged(st, stage, ino, size)?;
            }
            let mut inode = fs.inode(st, ino)?;
            if let Some(mode) = set.mode {
                inode.mode = (inode.mode & libc::S_IFMT) | (mode & 0o7777);
            }
            if let Some(uid) = set.uid {
                inode.uid = uid;
            }
            if let Some(gid) = set.gid {
                inode.gid = gid;
            }
            if let Some(t) = set.atime {
                inode.atime = t;
            }
            if let Some(t) = set.mtime {
                inode.mtime = t;
            }
            inode.ctime = Time::now();
            fs.put_inode(st, stage, ino, inode.clone());
            if let (Some(mode), true) = (set.mode, inode.xattr_block != 0) {
                // An access ACL follows the mode (`posix_acl_chmod`).
                let mut attrs = fs.xattrs(st, ino)?;
                if Fs::chmod_acl(&mut attrs, mode) {
                    fs.store_xattrs(st, stage, ino, &attrs)?;
                }
            }
            Ok(Fs::attr(ino, &inode))
        })
    }

    /// Filesystem usage.
    pub fn statfs(&self) -> StatFs {
        let st = self.lock_any();
        StatFs {
            block_size: BLOCK,
            blocks: self.core.sb.total_blocks - self.core.sb.data_start,
            free_blocks: st.alloc.free_blocks(),
            available_blocks: st.alloc.free_blocks().saturating_sub(crate::alloc::RESERVE),
            files: self.core.sb.inode_count,
            free_files: st.free_inodes.len() as u64,
            name_max: crate::format::NAME_MAX as u64,
            free_huge_regions: st.alloc.free_regions(),
        }
    }

    // ---- extents ------------------------------------------------------------

    /// The extents of `ino`, read on first use.
    fn extents<'s>(&self, st: &'s mut State, ino: Ino) -> Result<&'s mut Vec<Extent>> {
        let cached = self.cached(st, ino)?;
        if cached.extents.is_none() {
            let inode = &cached.inode;
            let mut extents = inode.inline_extents();
            let mut chain = Vec::new();
            let mut next = inode.extent_block;
            let longest = (inode.extent_count as usize).div_ceil(OVERFLOW_EXTENTS) + 1;
            while next != 0 && extents.len() < inode.extent_count as usize {
                if next < self.core.sb.data_start
                    || next >= self.core.sb.total_blocks
                    || chain.len() > longest
                    || chain.contains(&next)
                {
                    return Err(Error::corrupt(
                        "extent chain",
                        self.core.sb.inode_offset(ino),
                        "points outside the data area",
                    ));
                }
                let mut raw = vec![0u8; BLOCK as usize];
                read_meta(&self.core.dev, next * BLOCK, &mut raw, "extent block")?;
                let block = ExtentBlock::decode(&raw, next * BLOCK)?;
                chain.push(next);
                extents.extend(block.extents);
                next = block.next;
            }
            if extents.len() != inode.extent_count as usize {
                return Err(Error::corrupt(
                    "extent map",
                    self.core.sb.inode_offset(ino),
                    "extent count does not match",
                ));
            }
            let mut last_end = 0;
            for e in &extents {
                let inside = e.len > 0
                    && e.physical >= self.core.sb.data_start
                    && e.physical
                        .checked_add(e.len as u64)
                        .is_some_and(|end| end <= self.core.sb.backup_block)
                    && e.fits()
                    && e.logical >= last_end;
                if !inside {
                    st.damaged.insert(ino);
                    let offset = self.core.sb.inode_offset(ino);
                    return Err(Error::corrupt(
                        format!("extent map of inode {ino}"),
                        offset,
                        format!("bad extent {e:?}"),
                    ));
                }
                last_end = e.end();
            }
            let cached = self.cached(st, ino)?;
            cached.chain = chain;
            let cost = extents.capacity() * 16;
            cached.extents = Some(extents);
            self.charge(st, cost);
        }
        Ok(self.cached(st, ino)?.extents.as_mut().expect("read above"))
    }

    /// Stage the extents of `ino` (already changed in the cache) into its
    /// inode and overflow blocks. Returns the updated inode (not yet staged).
    fn store_extents(&self, st: &mut State, stage: &mut Stage, ino: Ino) -> Result<Inode> {
        let extents = self.extents(st, ino)?.clone();
        let overflow = extents.len().saturating_sub(INLINE_EXTENTS);
        let need = overflow.div_ceil(OVERFLOW_EXTENTS);
        let mut chain = self.cached(st, ino)?.chain.clone();
        while chain.len() > need {
            let block = chain.pop().expect("longer than need");
            st.alloc.free(block, 1);
        }
        while chain.len() < need {
            chain.push(st.alloc.alloc_extent_block().ok_or(Error::NoSpace)?);
        }
        for (i, &block) in chain.iter().enumerate() {
            let part = &extents[INLINE_EXTENTS + i * OVERFLOW_EXTENTS..];
            let eb = ExtentBlock {
                next: chain.get(i + 1).copied().unwrap_or(0),
                extents: part[..part.len().min(OVERFLOW_EXTENTS)].to_vec(),
            };
            stage.tx.write(block * BLOCK, &eb.encode());
        }
        let cached = self.cached(st, ino)?;
        let old_chain = cached.chain.len() as u64;
        cached.chain = chain.clone();
        let mut inode = cached.inode.clone();
        inode.extent_count = extents.len() as u32;
        inode.extent_block = chain.first().copied().unwrap_or(0);
        inode.set_inline_extents(&extents);
        inode.blocks = (inode.blocks + chain.len() as u64).saturating_sub(old_chain);
        stage.touched.insert(ino);
        Ok(inode)
    }

    // ---- references, handles and orphans ----------------------------------

    /// Open `ino`; the file stays usable after unlink until its last handle
    /// closes.
    pub fn open(&self, ino: Ino) -> Result<Handle> {
        let mut st = self.lock()?;
        self.inode(&mut st, ino)?;
        Ok(Fs::new_handle(&mut st, ino))
    }

    fn new_handle(st: &mut State, ino: Ino) -> Handle {
        let id = st.next_handle;
        st.next_handle += 1;
        st.handles.insert(id);
        st.refs.entry(ino).or_default().opens += 1;
        Handle { ino, id }
    }

    /// Close a handle; the last reference to an unlinked file frees it.
    pub fn close(&self, handle: Handle) -> Result<()> {
        let free = {
            let mut st = self.lock()?;
            if !st.handles.remove(&handle.id) {
                return Err(Error::Invalid("handle is not open"));
            }
            self.put_ref_locked(&mut st, handle.ino, |r| r.opens -= 1)
        };
        self.release_if_unlinked(handle.ino, free)
    }

    /// `lookup` that the caller remembers (the FUSE protocol's lookup
    /// count): the inode stays referenced until [`Fs::forget`] gives the
    /// lookups back, and an unlinked one stays usable until then.
    pub fn lookup_ref(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        let name: &[u8] = &user::unmapped(name);
        let mut st = self.lock()?;
        let ino = self.lookup_ino(&mut st, parent, name)?;
        let inode = self.inode(&mut st, ino)?;
        st.refs.entry(ino).or_default().lookups += 1;
        Ok(Fs::attr(ino, &inode))
    }

    /// `lookup_ref` by number (the FUSE protocol's lookup of "." that
    /// resolves a file handle whose inode the kernel no longer caches):
    /// `ino` if it is allocated and still named or referenced, `NotFound`
    /// if it is gone (a stale handle).
    pub fn lookup_ref_ino(&self, ino: Ino) -> Result<Attr> {
        let mut st = self.lock()?;
        let inode = self.inode(&mut st, ino)?;
        if inode.nlink == 0 && !st.refs.contains_key(&ino) {
            return Err(Error::NotFound);
        }
        st.refs.entry(ino).or_default().lookups += 1;
        Ok(Fs::attr(ino, &inode))
    }

    /// Count one more remembered lookup of `ino`, which the caller holds
    /// some other reference to (a handle it just opened, a hold, a lookup).
    pub fn remember(&self, ino: Ino) -> Result<()> {
        let mut st = self.lock()?;
        match st.refs.get_mut(&ino) {
            Some(refs) => {
                refs.lookups += 1;
                Ok(())
            }
            None => Err(Error::Invalid("remember needs a referenced inode")),
        }
    }

    /// Give back `n` remembered lookups of `ino` (FUSE `forget`).
    pub fn forget(&self, ino: Ino, n: u64) -> Result<()> {
        {
            let st = self.lock()?;
            if st.refs.get(&ino).is_none_or(|r| r.lookups < n) {
                return Err(Error::Invalid("forget of more lookups than were made"));
            }
        }
        self.put_ref(ino, |r| r.lookups -= n)?;
        Ok(())
    }

    /// Give back every remembered lookup (the kernel that made them is
    /// gone: FUSE `destroy`). Returns how many inodes are still referenced
    /// by handles or holds afterwards; unlinked inodes that only lookups
    /// kept are freed.
    pub fn forget_all_lookups(&self) -> Result<u64> {
        let (released, left) = {
            let mut st = self.lock()?;
            let remembered: Vec<Ino> = st
                .refs
                .iter()
                .filter(|(_, r)| r.lookups > 0)
                .map(|(&ino, _)| ino)
                .collect();
            let mut released = Vec::new();
            for ino in remembered {
                if self.put_ref_locked(&mut st, ino, |r| r.lookups = 0) {
                    released.push(ino);
                }
            }
            (released, st.refs.len() as u64)
        };
        for ino in released {
            self.release_if_unlinked(ino, true)?;
        }
        Ok(left)
    }

    /// Hold `ino` in memory (and, once unlinked, on the orphan list) until
    /// the returned [`Hold`] is dropped.
    pub fn hold(&self, ino: Ino) -> Result<Hold<'_>> {
        let mut st = self.lock()?;
        self.inode(&mut st, ino)?;
        Ok(Hold {
            inode: InodeRef::take(self, &mut st, ino),
            _fs: std::marker::PhantomData,
        })
    }

    /// Drop one reference (`put` changes the counts; the caller checked it
    /// may). At the last one, an unlinked inode is freed.
    fn put_ref(&self, ino: Ino, put: impl FnOnce(&mut Refs)) -> Result<()> {
        let free = {
            let mut st = self.lock()?;
            if !st.refs.contains_key(&ino) {
                return Err(Error::Invalid("inode is not referenced"));
            }
            self.put_ref_locked(&mut st, ino, put)
        };
        self.release_if_unlinked(ino, free)
    }

    /// Drop one reference of a referenced inode; whether it was the last
    /// of an inode that may be unlinked.
    fn put_ref_locked(&self, st: &mut State, ino: Ino, put: impl FnOnce(&mut Refs)) -> bool {
        let refs = st.refs.get_mut(&ino).expect("the caller checked");
        put(refs);
        if !refs.is_zero() {
            return false;
        }
        st.refs.remove(&ino);
        self.core.closed.notify_all();
        st.inodes.get(&ino).is_none_or(|c| c.inode.nlink == 0)
    }

    /// Free `ino` if `maybe` says it lost its last reference and it has
    /// no name left.
    fn release_if_unlinked(&self, ino: Ino, maybe: bool) -> Result<()> {
        if !maybe {
            return Ok(());
        }
        // A new reference may have come in meanwhile: decide again under
        // the lock the freeing takes.
        self.change(|fs, st, stage| {
            if st.refs.contains_key(&ino) {
                return Ok(());
            }
            match fs.inode(st, ino) {
                Ok(inode) if inode.nlink == 0 => {
                    fs.remove_orphan(st, stage, ino)?;
                    fs.free_inode(st, stage, ino)
                }
                Ok(_) | Err(Error::NotFound) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn set_orphan_head(&self, st: &mut State, stage: &mut Stage, head: Ino) {
        stage.old_orphan_head.get_or_insert(st.orphan_head);
        st.orphan_head = head;
        let state = StateBlock { orphan_head: head };
        stage
            .tx
            .write(self.core.sb.state_block * BLOCK, &state.encode());
    }

    fn add_orphan(&self, st: &mut State, stage: &mut Stage, ino: Ino, mut inode: Inode) {
        let old_head = st.orphan_head;
        inode.next_orphan = old_head;
        self.put_inode(st, stage, ino, inode);
        self.set_orphan_head(st, stage, ino);
        if let Some(prev) = &mut st.orphan_prev {
            prev.insert(ino, 0);
            if old_head != 0 {
                prev.insert(old_head, ino);
            }
        }
    }

    /// Take `ino` off the orphan list: its predecessor (or the head) is
    /// pointed past it.
    fn remove_orphan(&self, st: &mut State, stage: &mut Stage, ino: Ino) -> Result<()> {
        let next = self.inode(st, ino)?.next_orphan;
        let prev = match self.orphan_prev(st)?.remove(&ino) {
            Some(prev) => prev,
            None => {
                return Err(Error::corrupt(
                    "orphan list",
                    self.core.sb.state_block * BLOCK,
                    format!("inode {ino} is not on it"),
                ))
            }
        };
        if next != 0 {
            self.orphan_prev(st)?.insert(next, prev);
        }
        if prev == 0 {
            self.set_orphan_head(st, stage, next);
        } else {
            let mut inode = self.inode(st, prev)?;
            inode.next_orphan = next;
            self.put_inode(st, stage, prev, inode);
        }
        Ok(())
    }

    /// The predecessor map of the orphan list, built by walking it when
    /// there is none.
    fn orphan_prev<'s>(&self, st: &'s mut State) -> Result<&'s mut HashMap<Ino, Ino>> {
        if st.orphan_prev.is_none() {
            let mut prev = HashMap::default();
            let (mut before, mut at) = (0, st.orphan_head);
            while at != 0 {
                if prev.insert(at, before).is_some() || prev.len() as u64 > self.core.sb.inode_count
                {
                    return Err(Error::corrupt(
                        "orphan list",
                        self.core.sb.state_block * BLOCK,
                        format!("it loops at inode {at}"),
                    ));
                }
                before = at;
                at = self.inode(st, at)?.next_orphan;
            }
            st.orphan_prev = Some(prev);
        }
        Ok(st.orphan_prev.as_mut().expect("built above"))
    }

    /// Free every orphan (files unlinked while open when the last mount
    /// ended). The whole list is checked first: every entry must be an
    /// allocated inode other than the root, with no links, on the list
    /// once. At the first that is not, the list is cut (nothing past it is
    /// followed, let alone freed), and what was wrong is returned.
    fn reclaim_orphans(&self) -> Result<(u64, Option<String>)> {
        let (valid, cut) = {
            let mut st = self.lock()?;
            let mut valid: Vec<Ino> = Vec::new();
            let mut seen: HashSet<Ino> = HashSet::default();
            let mut at = st.orphan_head;
            let mut cut = None;
            while at != 0 {
                let why = if self.check_ino(at).is_err() {
                    Some("is not an inode number".to_string())
                } else if at == ROOT {
                    Some("is the root directory".to_string())
                } else if seen.contains(&at) {
                    Some("is on it twice (it loops)".to_string())
                } else {
                    match self.inode(&mut st, at) {
                        Err(e) => Some(format!("cannot be read ({e})")),
                        Ok(inode) if inode.mode == 0 => Some("is a free inode".to_string()),
                        Ok(inode) if inode.nlink != 0 => {
                            Some(format!("has {} links, so is no orphan", inode.nlink))
                        }
                        Ok(_) => None,
                    }
                };
                if let Some(why) = why {
                    cut = Some(format!(
                        "orphan list: entry {} (inode {at}) {why}; the list is cut before it",
                        valid.len() + 1
                    ));
                    break;
                }
                valid.push(at);
                seen.insert(at);
                at = self.inode(&mut st, at)?.next_orphan;
            }
            (valid, cut)
        };
        if cut.is_some() {
            self.change(|fs, st, stage| match valid.last() {
                None => {
                    fs.set_orphan_head(st, stage, 0);
                    st.orphan_prev = None;
                    Ok(())
                }
                Some(&last) => {
                    st.orphan_prev = None;
                    let mut inode = fs.inode(st, last)?;
                    inode.next_orphan = 0;
                    fs.put_inode(st, stage, last, inode);
                    Ok(())
                }
            })?;
        }
        for &ino in &valid {
            self.change(|fs, st, stage| {
                let next = fs.inode(st, ino)?.next_orphan;
                fs.set_orphan_head(st, stage, next);
                st.orphan_prev = None;
                fs.free_inode(st, stage, ino)
            })?;
        }
        Ok((valid.len() as u64, cut))
    }

    /// Set the pieces of the bitmap that failed their checksum (`damaged`)
    /// from what the inodes own. A piece stays refused (nothing is
    /// allocated from it) when its media is poisoned or some inode cannot
    /// be read (its blocks are unknown): fsck repairs it. Says what was
    /// done.
    /// For fsck (`purpose` Check), a damaged inode owns what of it reads.
    fn rebuild_bitmap(&self, damaged: &[u64], purpose: Purpose) -> Result<Vec<String>> {
        let sb = &self.core.sb;
        let piece_at = |index: u64| sb.bitmap_start * BLOCK + index * BITMAP_PIECE;
        let describe = |index: u64| {
            let first = index * BLOCKS_PER_BITMAP_PIECE;
            format!(
                "the allocation bitmap at device offset {:#x} (blocks {first} to {}) fails its \
                 checksum",
                piece_at(index),
                first + BLOCKS_PER_BITMAP_PIECE - 1
            )
        };
        let mut said = Vec::new();
        let mut rebuild = Vec::new();
        for &index in damaged {
            if self
                .core
                .dev
                .first_poison(piece_at(index), BITMAP_PIECE)
                .is_some()
            {
                said.push(format!(
                    "{}: its media is poisoned; nothing is allocated from \
                         the blocks it covers",
                    describe(index)
                ));
            } else {
                rebuild.push(index);
            }
        }
        if rebuild.is_empty() {
            return Ok(said);
        }
        if let Err(unreadable) = self.rebuild_bitmap_blocks(&rebuild, purpose == Purpose::Check)? {
            for index in rebuild {
                said.push(format!(
                    "{}: {unreadable}, so it cannot be rebuilt; nothing is allocated from \
                     the blocks it covers until `daxfs fsck --repair`",
                    describe(index)
                ));
            }
            return Ok(said);
        }
        said.extend(
            rebuild
                .into_iter()
                .map(|index| format!("{}: rebuilt from the inodes' extents", describe(index))),
        );
        Ok(said)
    }

    /// Set bitmap pieces `indexes` from what the inodes own, or say which
    /// inode cannot be read (then nothing changes). `tolerant`: see
    /// `check::owned_by_all`.
    fn rebuild_bitmap_blocks(
        &self,
        indexes: &[u64],
        tolerant: bool,
    ) -> Result<std::result::Result<(), String>> {
        let owned = {
            let mut st = self.lock()?;
            match check::owned_by_all(self, &mut st, tolerant) {
                Ok(owned) => owned,
                Err(unreadable) => return Ok(Err(unreadable)),
            }
        };
        self.change(|fs, st, _| {
            for &index in indexes {
                st.alloc
                    .rebuild(&fs.core.sb, index, |block| owned.contains_key(&block));
            }
            Ok(())
        })?;
        Ok(Ok(()))
    }

    /// Damage this mount found and contained: each has been made harmless
    /// (fsck reports them as problems).
    pub(crate) fn damage_found(&self) -> &[String] {
        &self.core.damage_found
    }

    /// Free an inode with no links and no handles: its blocks, extent
    /// blocks, xattr block, and the inode itself.
    fn free_inode(&self, st: &mut State, stage: &mut Stage, ino: Ino) -> Result<()> {
        st.linkable.remove(&ino);
        let inode = self.inode(st, ino)?;
        if inode.has_extents() {
            let extents = self.extents(st, ino)?.clone();
            for e in &extents {
                st.alloc.free(e.physical, e.len as u64);
            }
            for &block in &self.cached(st, ino)?.chain.clone() {
                st.alloc.free(block, 1);
            }
        }
        for block in self.xattr_blocks(inode.xattr_block) {
            st.alloc.free(block, 1);
        }
        stage
            .tx
            .write(self.core.sb.inode_offset(ino), &[0u8; INODE_SIZE as usize]);
        stage.touched.insert(ino);
        stage.freed_inodes.push(ino);
        Ok(())
    }

    // ---- directories (the shared part) ----------------------------------------

    /// The directory index of `ino`, read on first use. A directory with
    /// a damaged block gives an error naming the block, at every access:
    /// its inode (attributes, the other directories) stays usable.
    fn dir<'s>(&self, st: &'s mut State, ino: Ino) -> Result<&'s mut DirIndex> {
        let cached = self.cached(st, ino)?;
        if !cached.inode.is_dir() {
            return Err(Error::NotDir);
        }
        if cached.dir.is_none() {
            let read = self.read_dir(st, ino)?;
            if let Some(damage) = read.damage.into_iter().next() {
                return Err(damage.error);
            }
            let mut index = DirIndex::with_blocks(read.blocks);
            for (pos, dirent, slots) in &read.entries {
                index.insert(dirent, *pos, *slots);
            }
            let cost = index.cost();
            self.cached(st, ino)?.dir = Some(index);
            self.charge(st, cost);
        }
        Ok(self.cached(st, ino)?.dir.as_mut().expect("read above"))
    }

    /// Every entry of directory `ino` that reads whole, and every piece
    /// that does not (fsck goes on past those; [`Fs::dir`] refuses).
    fn read_dir(&self, st: &mut State, ino: Ino) -> Result<DirRead> {
        let blocks = self.block_list(st, ino)?;
        let mut read = DirRead {
            blocks: blocks.len(),
            ..DirRead::default()
        };
        let mut names: HashSet<Vec<u8>> = HashSet::default();
        let mut raw = vec![0u8; BLOCK as usize];
        for (i, &block) in blocks.iter().enumerate() {
            let offset = block * BLOCK;
            let what = || format!("directory block {i} of inode {ino}");
            if let Err(e) = read_meta(&self.core.dev, offset, &mut raw, &what()) {
                read.damage.push(DirDamage {
                    offset,
                    slots: None,
                    error: e,
                });
                continue;
            }
            let mut slot = 0;
            while slot < SLOTS_PER_BLOCK {
                let at = offset + (slot * SLOT) as u64;
                let pos = (i * SLOTS_PER_BLOCK + slot) as u64;
                match Dirent::decode(&raw, slot, offset) {
                    Ok(Some((dirent, n))) if !names.insert(dirent.name.clone()) => {
                        read.damage.push(DirDamage {
                            offset: at,
                            slots: Some((slot, n)),
                            error: Error::corrupt(
                                what(),
                                at,
                                format!(
                                    "entry {:?} at slot {slot} repeats a name",
                                    String::from_utf8_lossy(&dirent.name)
                                ),
                            ),
                        });
                        slot += n;
                    }
                    Ok(Some((dirent, n))) => {
                        read.entries.push((pos, dirent, n));
                        slot += n;
                    }
                    Ok(None) => slot += 1,
                    Err(e) => {
                        let detail = match e {
                            Error::Corrupt { detail, .. } => detail,
                            other => other.to_string(),
                        };
                        read.damage.push(DirDamage {
                            offset: at,
                            slots: Some((slot, 1)),
                            error: Error::corrupt(what(), at, format!("slot {slot}: {detail}")),
                        });
                        slot += 1;
                    }
                }
            }
        }
        Ok(read)
    }

    /// The device blocks of a file in logical order (for directories, whose
    /// blocks are all mapped).
    fn block_list(&self, st: &mut State, ino: Ino) -> Result<Vec<u64>> {
        let extents = self.extents(st, ino)?;
        let mut blocks = Vec::new();
        for e in extents.iter() {
            if e.logical != blocks.len() as u64 {
                return Err(Error::corrupt(
                    "directory",
                    self.core.sb.inode_offset(ino),
                    "its blocks have a hole",
                ));
            }
            blocks.extend(e.physical..e.physical + e.len as u64);
        }
        Ok(blocks)
    }
}

/// A directory as read from media, damage and all.
#[derive(Debug, Default)]
struct DirRead {
    /// How many blocks it has.
    blocks: usize,
    /// `(position, entry, slots)` of each entry that reads whole.
    entries: Vec<(u64, Dirent, usize)>,
    damage: Vec<DirDamage>,
}

/// A piece of a directory that does not read.
#[derive(Debug)]
struct DirDamage {
    /// Device offset of the block, or of the slot.
    offset: u64,
    /// The slot and how many slots it claims; `None`: the whole block
    /// (unreadable media).
    slots: Option<(usize, usize)>,
    /// What is wrong, naming the block and the directory.
    error: Error,
}

/// "2 inodes referenced: inode 5 (1 open handle), inode 9 (2 lookups)".
fn busy_inodes(st: &State) -> String {
    let mut refs: Vec<(Ino, Refs)> = st.refs.iter().map(|(&i, &r)| (i, r)).collect();
    refs.sort_unstable_by_key(|r| r.0);
    let list: Vec<String> = refs
        .iter()
        .map(|(ino, r)| format!("inode {ino} ({r})"))
        .collect();
    format!(
        "{} inode{} referenced: {}",
        refs.len(),
        if refs.len() == 1 { "" } else { "s" },
        list.join(", ")
    )
}

/// What a mount is for. A filesystem that needs a check is mounted only to
/// be checked: fsck discards what a damaged journal cut off and checks
/// what is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Use,
    Check,
}

/// Why a superblock says the filesystem needs a check, in words.
fn needs_check_reason(sb: &Superblock) -> String {
    if sb.damaged_tx > 0 {
        format!(
            "journal transaction {} was found damaged and replay stopped before it",
            sb.damaged_tx
        )
    } else {
        "damage was found".to_string()
    }
}

/// Why mount refuses, and what to do.
fn needs_check_text(sb: &Superblock) -> String {
    format!(
        "{}; run `daxfs fsck --repair` on the image",
        needs_check_reason(sb)
    )
}

/// Write both superblock copies (the backup first: a crash in between
/// leaves one of them whole).
fn write_superblocks(dev: &Device, sb: &Superblock) -> Result<()> {
    let encoded = sb.encode();
    dev.memcpy_persist(sb.backup_block * BLOCK, &encoded)?;
    dev.memcpy_persist(0, &encoded)?;
    Ok(())
}

/// Reserve the storage under the metadata areas (and the backup
/// superblock) of an emulated device whose file may be sparse, before they
/// are written: a store into storage the backing filesystem cannot give
/// kills the process with `SIGBUS`, where this fails with an error naming
/// the full filesystem. (Data blocks are reserved a region at a time as
/// the allocator hands them out.)
fn reserve_metadata(dev: &Device, sb: &Superblock) -> Result<()> {
    if let Some(reserver) = dev.reserver() {
        reserver.reserve(0, sb.data_start * BLOCK)?;
        reserver.reserve(sb.backup_block * BLOCK, BLOCK)?;
    }
    Ok(())
}
