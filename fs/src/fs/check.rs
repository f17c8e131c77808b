//! fsck: check every invariant of a filesystem image, and repair it as
//! e2fsck does.
//!
//! Checked, in passes: both superblock copies and their needs-check mark;
//! the journal (replayed, as mounting does; a damaged header is written
//! anew, losing what it held); the state block, the orphan list and the
//! bitmap checksums (by the mount, which contains what it finds: each is a
//! problem). Then every allocated inode (checksum and fields, extents
//! inside the data area, sorted and disjoint, the overflow chain, the
//! xattr block, the symlink target, the block count), blocks owned twice,
//! every directory block (each entry's checksum, its name, its type, what
//! it names, names repeated), the tree from the root (each directory one
//! parent, `..` right, every inode named), link counts, and the bitmap
//! against what is owned.
//!
//! A check goes on past any damage: it names the structure (inode N,
//! directory block N of inode M, ... at device offset X) and the rest is
//! checked as usual. Without repair it writes nothing (see [`fsck`]).
//!
//! Repaired, as e2fsck repairs: a damaged superblock copy (from the good
//! one); an inode that fails its checksum gets it rewritten when its fields
//! are sound, and is cleared otherwise (a poisoned one too); a size past
//! the limits is cut to the extents; extents that do not read are dropped
//! (the rest kept); a damaged xattr block is dropped; a symlink whose
//! target does not read is cleared; a block owned twice is copied for the
//! later owner (clone multiply-claimed blocks); a damaged directory entry is
//! cleared and the entries around it kept; entries that name nothing, or a
//! directory a second time, are dropped, and a wrong type is corrected; an
//! inode nothing names is reconnected into `/lost+found` (made if missing);
//! link counts and the bitmap are set to what was found. Repairs that make
//! others possible (a dropped entry changes a link count) are followed by
//! another pass, until a pass finds nothing to repair: one `--repair` leaves
//! an image a check finds clean, and a second `--repair` changes nothing.

use super::{Fs, HashSet, Ino, State, ROOT};
use crate::error::{Error, Result};
use crate::format::{
    Dirent, Extent, ExtentBlock, Inode, Superblock, BLOCK, INODE_SIZE, MAX_FILE_SIZE, SLOT,
};
use pmem::Device;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong, in one line.
    pub what: String,
    /// Whether the repair fixed it.
    pub fixed: bool,
}

/// What fsck found.
#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    /// What mounting had to say (journal replayed, orphans reclaimed).
    pub notes: Vec<String>,
    pub problems: Vec<Problem>,
}

impl FsckReport {
    /// No problems.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// fsck(8)'s exit code: 0 clean, 1 all problems corrected, 4 some left.
    pub fn exit_code(&self) -> i32 {
        if self.problems.is_empty() {
            0
        } else if self.problems.iter().all(|p| p.fixed) {
            1
        } else {
            4
        }
    }

    /// Record a problem; returns its index, for marking it fixed later.
    fn problem(&mut self, what: String, fixed: bool) -> usize {
        self.problems.push(Problem { what, fixed });
        self.problems.len() - 1
    }
}

/// Check (and with `repair`, repair) the filesystem on `dev`. An error means
/// the image could not be checked at all (fsck's operational error).
///
/// Without `repair`, nothing is written: the device is made private for
/// the check (a mount's journal replay, orphan reclaim and rebuilds happen
/// in memory, so the check sees what a mount would) and shared again
/// before it is returned. A device opened read-only can only be checked.
pub fn fsck(mut dev: Device, repair: bool) -> Result<(FsckReport, Device)> {
    if repair && dev.is_read_only() {
        return Err(pmem::Error::ReadOnly {
            path: dev.path().to_path_buf(),
            what: "a repair",
        }
        .into());
    }
    if dev.is_read_only() {
        return check(dev, false);
    }
    // A check first, in private; a repair only when it found something to
    // do (so a repair of a clean filesystem writes nothing).
    dev.set_private(true)?;
    let (report, mut dev) = check(dev, false)?;
    dev.set_private(false)?;
    if !repair || (report.is_clean() && report.notes.is_empty()) {
        return Ok((report, dev));
    }
    check(dev, true)
}

fn check(dev: Device, repair: bool) -> Result<(FsckReport, Device)> {
    let mut report = FsckReport::default();
    let backup_at = (dev.size() / BLOCK - 1) * BLOCK;
    let primary = Superblock::read(&dev, 0);
    let backup = Superblock::read(&dev, backup_at);
    match (&primary, &backup) {
        (Ok(p), Ok(b)) if p == b => {}
        (Ok(p), _) => {
            let fixed = repair && dev.memcpy_persist(backup_at, &p.encode()).is_ok();
            report.problem(
                format!(
                    "backup superblock at {backup_at:#x} is damaged or differs from the primary"
                ),
                fixed,
            );
        }
        (Err(e), Ok(b)) => {
            let fixed = repair && dev.memcpy_persist(0, &b.encode()).is_ok();
            report.problem(
                format!("primary superblock is damaged ({e}); the backup is good"),
                fixed,
            );
        }
        (Err(_), Err(_)) => return Err(primary.expect_err("matched above")),
    }
    let fs = Fs::mount_for(dev, super::Purpose::Check)?;
    report.notes.extend(fs.mount_notes().iter().cloned());
    // What the mount found damaged and contained (written as contained
    // already: fixed, if repairing was asked for).
    for damage in fs.damage_found() {
        report.problem(damage.clone(), repair);
    }
    // Damage found by an earlier mount, or by this one (the journal: what
    // it cut off is discarded; the check below looks at what is left).
    let (marked, _) = Superblock::read_either(&fs.core.dev)?;
    let needs_check = marked.needs_check().then(|| {
        report.problem(
            format!(
                "the filesystem is marked as needing a check: {}",
                super::needs_check_reason(&marked)
            ),
            false,
        )
    });
    // The passes, again after every pass that repaired something (what one
    // repair changes, the next pass checks), at most a few times.
    let mut reported: HashMap<String, usize> = report
        .problems
        .iter()
        .enumerate()
        .map(|(i, p)| (p.what.clone(), i))
        .collect();
    for _ in 0..MAX_PASSES {
        let found = scan(&fs, repair)?;
        let mut repaired = false;
        let mut last = false;
        for Found { what, fix } in found {
            let fixed = match (repair, fix) {
                (true, Some(Fix::Along)) => last,
                (true, Some(fix)) => {
                    let done = apply(&fs, fix);
                    if let Err(e) = &done {
                        report
                            .notes
                            .push(format!("repair of \"{what}\" failed: {e}"));
                    }
                    last = done.is_ok();
                    last
                }
                _ => false,
            };
            repaired |= fixed;
            match reported.get(&what) {
                // Found again: what this pass's repair did is what counts
                // (a repair that did not hold is found again, unfixed).
                Some(&i) => report.problems[i].fixed = fixed,
                None => {
                    reported.insert(what.clone(), report.problem(what, fixed));
                }
            }
        }
        if !repaired {
            break;
        }
    }
    if repair {
        // What the mount corrected in memory (bitmap words) goes to media.
        fs.change(|_, _, _| Ok(()))?;
    }
    let dev = fs.into_device()?;
    if let (Some(problem), true) = (needs_check, repair) {
        // Checked (and repaired) through: the mark goes.
        let mut sb = marked;
        sb.flags &= !crate::format::SB_NEEDS_CHECK;
        sb.damaged_tx = 0;
        super::write_superblocks(&dev, &sb)?;
        report.problems[problem].fixed = true;
    }
    Ok((report, dev))
}

/// Passes of repair at most (each one is a full check).
const MAX_PASSES: usize = 6;

/// A problem, and what repairs it (none: it cannot be repaired here).
struct Found {
    what: String,
    fix: Option<Fix>,
}

/// A repair.
enum Fix {
    /// Write inode `ino` with these fields (and a new checksum).
    RewriteInode(Ino, Box<Inode>),
    /// Zero inode `ino`'s slot (all of the sectors it is in, when poisoned).
    ClearInode(Ino),
    /// Make a new, empty root directory (what the old one named is
    /// reconnected by the next pass).
    NewRoot,
    /// Keep these extents of `ino`, the ones that read (a new chain).
    KeepExtents(Ino, Vec<Extent>),
    /// Forget `ino`'s xattr block.
    DropXattrs(Ino),
    /// Give `ino` copies of these blocks, which an earlier inode owns too.
    Clone(Ino, Vec<u64>),
    /// Zero `len` bytes at device offset `at` of directory `dir`.
    ZeroDir { dir: Ino, at: u64, len: u64 },
    /// Drop directory `dir`'s entry `name`.
    DropEntry { dir: Ino, name: Vec<u8> },
    /// Correct the file type of `dir`'s entry `name`.
    EntryType { dir: Ino, name: Vec<u8>, kind: u8 },
    /// Name `ino` in `/lost+found`.
    Reconnect(Ino),
    /// Set `ino`'s `..` to `parent`.
    Parent(Ino, Ino),
    /// Set `ino`'s link count.
    Nlink(Ino, u32),
    /// Set bitmap words (`(word, value)`) and rebuild refused blocks.
    Bitmap(Vec<(usize, u64)>),
    /// Repaired by the repair before it (one repair, several problems).
    Along,
}

/// One full check: the problems found, each with its repair. When
/// repairing, the passes that count (link counts, the bitmap) wait for a
/// pass that found nothing to repair in the structure before them.
fn scan(fs: &Fs, repair: bool) -> Result<Vec<Found>> {
    let mut st = fs.lock()?;
    let st = &mut *st;
    let mut scan = Scan::new(fs);
    scan.inodes(st);
    scan.directories(st);
    scan.tree();
    scan.orphans(st);
    scan.unnamed();
    if !repair || scan.found.iter().all(|f| f.fix.is_none()) {
        scan.link_counts();
        scan.bitmap(st);
    }
    Ok(scan.found)
}

/// What one check has learned so far, pass by pass.
struct Scan<'a> {
    fs: &'a Fs,
    sb: Superblock,
    found: Vec<Found>,
    /// Who owns each block (the first to claim it).
    owner: HashMap<u64, Ino>,
    /// The inodes that read and own what they should, with their fields.
    allocated: Vec<(Ino, Inode)>,
    /// Inodes with a repair of their own pending (entries naming them wait).
    unsettled: HashSet<Ino>,
    /// Each directory's entries that read: (name, inode).
    names: BTreeMap<Ino, Vec<(Vec<u8>, Ino)>>,
    /// Names of each inode, subdirectories of each directory.
    refs: HashMap<Ino, u32>,
    subdirs: HashMap<Ino, u32>,
    /// Each directory's parent and its name there.
    parent_of: HashMap<Ino, (Ino, Vec<u8>)>,
    reachable: HashSet<Ino>,
    orphans: HashSet<Ino>,
}

impl<'a> Scan<'a> {
    fn new(fs: &'a Fs) -> Scan<'a> {
        Scan {
            fs,
            sb: fs.core.sb.clone(),
            found: Vec::new(),
            owner: HashMap::new(),
            allocated: Vec::new(),
            unsettled: HashSet::default(),
            names: BTreeMap::new(),
            refs: HashMap::new(),
            subdirs: HashMap::new(),
            parent_of: HashMap::from([(ROOT, (ROOT, Vec::new()))]),
            reachable: HashSet::default(),
            orphans: HashSet::default(),
        }
    }

    fn problem(&mut self, what: String, fix: Option<Fix>) {
        self.found.push(Found { what, fix });
    }

    /// Several problems that one repair fixes.
    fn problems(&mut self, whats: Vec<String>, fix: Fix) {
        let mut fix = Some(fix);
        for what in whats {
            self.problem(what, Some(fix.take().unwrap_or(Fix::Along)));
        }
    }

    /// Pass 1: every inode that is not free; who owns each block.
    fn inodes(&mut self, st: &mut State) {
        let fs = self.fs;
        for ino in not_free(st, self.sb.inode_count) {
            let inode = match fs.inode(st, ino) {
                Ok(inode) => inode,
                Err(Error::NotFound) => continue,
                Err(e) => {
                    self.unsettled.insert(ino);
                    let fix = damaged_inode(fs, ino);
                    let action = match &fix {
                        Fix::RewriteInode(..) => "its fields are sound: the checksum is rewritten",
                        Fix::NewRoot => "a new root directory is made",
                        _ => "the inode is cleared",
                    };
                    self.problem(format!("{e} ({action} on repair)"), Some(fix));
                    continue;
                }
            };
            if self.inode(st, ino, &inode) {
                self.allocated.push((ino, inode));
            }
        }
    }

    /// Check inode `ino`, which reads as `inode`: whether it is sound
    /// enough for the passes after (its own repair comes first otherwise).
    fn inode(&mut self, st: &mut State, ino: Ino, inode: &Inode) -> bool {
        let fs = self.fs;
        if ino == ROOT && !inode.is_dir() {
            self.unsettled.insert(ino);
            self.problem(
                "the root inode is not a directory (a new root directory is made on repair)"
                    .to_string(),
                Some(Fix::NewRoot),
            );
            return false;
        }
        let owned = match owned_blocks(fs, st, ino, inode) {
            Ok(owned) => owned,
            Err(e) => {
                self.unsettled.insert(ino);
                let keep = readable_extents(fs, inode);
                self.problem(
                    format!(
                        "{e} (the {} extents that read are kept on repair)",
                        keep.len()
                    ),
                    Some(Fix::KeepExtents(ino, keep)),
                );
                return false;
            }
        };
        if let Err(e) = fs.xattrs(st, ino) {
            self.unsettled.insert(ino);
            self.problem(
                format!("{e} (its extended attributes are dropped on repair)"),
                Some(Fix::DropXattrs(ino)),
            );
            return false;
        }
        if inode.kind() == libc::S_IFLNK {
            if let Err(e) = fs.link_target(st, ino, inode) {
                self.unsettled.insert(ino);
                self.problem(
                    format!("{e} (the symlink is cleared on repair)"),
                    Some(Fix::ClearInode(ino)),
                );
                return false;
            }
        }
        let mut shared: Vec<(u64, Ino)> = Vec::new();
        for block in owned.blocks() {
            if block < self.sb.data_start || block >= self.sb.backup_block {
                self.problem(
                    format!("inode {ino}: block {block} lies outside the data area"),
                    None,
                );
            } else if let Some(&first) = self.owner.get(&block) {
                shared.push((block, first));
            } else {
                self.owner.insert(block, ino);
            }
        }
        if !shared.is_empty() {
            self.unsettled.insert(ino);
            let blocks = shared.iter().map(|s| s.0).collect();
            let whats = shared
                .into_iter()
                .map(|(block, first)| {
                    format!(
                        "inodes {first} and {ino} both own block {block} (inode {ino} gets a \
                         copy on repair)"
                    )
                })
                .collect();
            self.problems(whats, Fix::Clone(ino, blocks));
            return false;
        }
        let count = owned.blocks().count() as u64;
        if count != inode.blocks {
            let mut right = inode.clone();
            right.blocks = count;
            self.problem(
                format!("inode {ino}: counts {} blocks, owns {count}", inode.blocks),
                Some(Fix::RewriteInode(ino, Box::new(right))),
            );
        }
        true
    }

    /// Pass 2: directories, each on its own (damage in one is only its
    /// own): their blocks and entries.
    fn directories(&mut self, st: &mut State) {
        let kinds: HashMap<Ino, u32> = self.allocated.iter().map(|(i, n)| (*i, n.kind())).collect();
        let dirs: Vec<Ino> = self
            .allocated
            .iter()
            .filter(|(_, n)| n.is_dir())
            .map(|(i, _)| *i)
            .collect();
        for dir in dirs {
            let read = match self.fs.read_dir(st, dir) {
                Ok(read) => read,
                Err(e) => {
                    self.problem(format!("directory {dir}: {e}"), None);
                    continue;
                }
            };
            for damage in read.damage {
                let (len, action) = match damage.slots {
                    Some((_, n)) => (
                        (n * SLOT) as u64,
                        "the entry is cleared on repair, the others in the block are kept",
                    ),
                    None => (BLOCK, "the block is cleared on repair"),
                };
                let at = damage.offset;
                self.problem(
                    format!("{} ({action})", damage.error),
                    Some(Fix::ZeroDir { dir, at, len }),
                );
            }
            let mut list = Vec::new();
            for (_, dirent, _) in read.entries {
                let shown = String::from_utf8_lossy(&dirent.name).into_owned();
                let target = dirent.ino;
                if self.unsettled.contains(&target) {
                    // Damaged itself: the inode's repair comes first.
                    list.push((dirent.name, target));
                    continue;
                }
                let Some(&kind) = kinds.get(&target) else {
                    self.problem(
                        format!(
                            "directory {dir}: entry {shown:?} names inode {target}, which is \
                             free or out of range (the entry is dropped on repair)"
                        ),
                        Some(Fix::DropEntry {
                            dir,
                            name: dirent.name,
                        }),
                    );
                    continue;
                };
                let want = crate::format::dtype_of(kind);
                if dirent.kind != want {
                    self.problem(
                        format!(
                            "directory {dir}: entry {shown:?} says type {}, inode {target} is \
                             {kind:#o} (corrected on repair)",
                            dirent.kind
                        ),
                        Some(Fix::EntryType {
                            dir,
                            name: dirent.name.clone(),
                            kind: want,
                        }),
                    );
                }
                list.push((dirent.name, target));
            }
            self.names.insert(dir, list);
        }
    }

    /// Pass 3: the tree from the root: one parent each, `..` right.
    fn tree(&mut self) {
        let is_dir: HashSet<Ino> = self
            .allocated
            .iter()
            .filter(|(_, n)| n.is_dir())
            .map(|(i, _)| *i)
            .collect();
        let names = std::mem::take(&mut self.names);
        for (&dir, list) in &names {
            for (name, target) in list {
                let shown = String::from_utf8_lossy(name);
                if is_dir.contains(target) {
                    let why = if *target == ROOT {
                        Some(format!("directory {dir}: entry {shown:?} names the root"))
                    } else {
                        self.parent_of.get(target).map(|(first, _)| {
                            format!(
                                "directory {target} has two parents ({first} and {dir}; the \
                                 entry {shown:?} in {dir})"
                            )
                        })
                    };
                    if let Some(why) = why {
                        let fix = Fix::DropEntry {
                            dir,
                            name: name.clone(),
                        };
                        self.problem(format!("{why} (dropped on repair)"), Some(fix));
                        continue;
                    }
                    self.parent_of.insert(*target, (dir, name.clone()));
                    *self.subdirs.entry(dir).or_default() += 1;
                }
                *self.refs.entry(*target).or_default() += 1;
            }
        }
        self.reachable.insert(ROOT);
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir) = queue.pop_front() {
            for (_, target) in names.get(&dir).into_iter().flatten() {
                let here = self.parent_of.get(target).is_some_and(|(p, _)| *p == dir);
                if here && self.reachable.insert(*target) {
                    queue.push_back(*target);
                }
            }
        }
        self.names = names;
        let wrong: Vec<(Ino, Ino, Ino)> = self
            .allocated
            .iter()
            .filter(|(ino, n)| n.is_dir() && self.reachable.contains(ino))
            .filter_map(|(ino, n)| {
                let &(parent, _) = self.parent_of.get(ino)?;
                (n.parent != parent).then_some((*ino, n.parent, parent))
            })
            .collect();
        for (ino, says, parent) in wrong {
            self.problem(
                format!(
                    "directory {ino}: `..` points to {says}, but it lives in {parent} \
                     (corrected on repair)"
                ),
                Some(Fix::Parent(ino, parent)),
            );
        }
    }

    /// The orphan list (the mount checked it and cut it where it was
    /// wrong): what is on it needs no name.
    fn orphans(&mut self, st: &mut State) {
        let mut at = st.orphan_head;
        while at != 0 && self.orphans.len() as u64 <= self.sb.inode_count && self.orphans.insert(at)
        {
            at = self.fs.inode(st, at).map_or(0, |inode| inode.next_orphan);
        }
    }

    /// Inodes nothing names (reconnected), and loops of directories that
    /// only name each other (cut, so that the next pass reconnects them).
    fn unnamed(&mut self) {
        let unnamed: Vec<Ino> = self
            .allocated
            .iter()
            .map(|(ino, _)| *ino)
            .filter(|ino| {
                *ino != ROOT && !self.refs.contains_key(ino) && !self.orphans.contains(ino)
            })
            .collect();
        // (Not while the root has a repair of its own pending: what it
        // names is known after that.)
        let can_reconnect = !self.unsettled.contains(&ROOT);
        for &ino in &unnamed {
            self.problem(
                format!(
                    "inode {ino} is allocated but no directory names it (reconnected in \
                     /lost+found on repair)"
                ),
                can_reconnect.then_some(Fix::Reconnect(ino)),
            );
        }
        if !unnamed.is_empty() {
            return;
        }
        let looped = self
            .allocated
            .iter()
            .filter(|(ino, n)| n.is_dir() && !self.reachable.contains(ino))
            .find_map(|(ino, _)| self.parent_of.get(ino).map(|p| (*ino, p.clone())));
        if let Some((dir, (parent, name))) = looped {
            self.problem(
                format!(
                    "directory {dir} is not reachable from the root: it is in a loop of \
                     directories (its entry in {parent} is dropped on repair)"
                ),
                Some(Fix::DropEntry { dir: parent, name }),
            );
        }
    }

    /// Pass 4: link counts.
    fn link_counts(&mut self) {
        let mut wrong = Vec::new();
        for (ino, inode) in &self.allocated {
            let names = self.refs.get(ino).copied().unwrap_or(0);
            let orphan = self.orphans.contains(ino);
            if *ino != ROOT && names == 0 && !orphan {
                continue; // reported as unnamed
            }
            let expected = match (inode.is_dir(), orphan) {
                (true, true) => 0,
                (true, false) => 2 + self.subdirs.get(ino).copied().unwrap_or(0),
                (false, _) => names,
            };
            if inode.nlink != expected {
                wrong.push((*ino, inode.nlink, expected));
            }
        }
        for (ino, nlink, expected) in wrong {
            self.problem(
                format!("inode {ino}: link count is {nlink}, should be {expected}"),
                Some(Fix::Nlink(ino, expected)),
            );
        }
    }

    /// Pass 5: the bitmap against what is owned, a word at a time (bit by
    /// bit only where they differ).
    fn bitmap(&mut self, st: &State) {
        let sb = &self.sb;
        let mut want_words = vec![0u64; sb.total_blocks.div_ceil(64) as usize];
        let mut mark = |block: u64| want_words[(block / 64) as usize] |= 1 << (block % 64);
        (0..sb.data_start).for_each(&mut mark);
        mark(sb.backup_block);
        self.owner.keys().copied().for_each(&mut mark);
        let mut words = Vec::new();
        let mut whats: Vec<String> = Vec::new();
        let (mut leaked, mut wrong) = (0u64, 0u64);
        for (word, &want) in want_words.iter().enumerate() {
            let have = st.alloc.word(word);
            let metadata_free = st.alloc.metadata_marked_free().contains(&word);
            if metadata_free {
                whats.push(format!(
                    "bitmap word {word} marks metadata blocks free (a sector cleared of poison \
                     reads as zeros)"
                ));
            }
            if want == have && !metadata_free {
                continue;
            }
            words.push((word, want));
            leaked += (have & !want).count_ones() as u64;
            let mut missing = want & !have;
            while missing != 0 {
                let block = word as u64 * 64 + missing.trailing_zeros() as u64;
                missing &= missing - 1;
                wrong += 1;
                if wrong <= 10 {
                    let owner = self.owner.get(&block).copied().unwrap_or(0);
                    whats.push(format!(
                        "block {block} is in use (inode {owner}) but marked free"
                    ));
                }
            }
        }
        if wrong > 10 {
            whats.push(format!(
                "blocks: {} more are in use but marked free",
                wrong - 10
            ));
        }
        if leaked > 0 {
            whats.push(format!(
                "blocks: {leaked} are marked in use but nothing owns them"
            ));
        }
        self.problems(whats, Fix::Bitmap(words));
    }
}

/// What one inode owns on the device.
pub(super) struct Owned {
    /// Its extents, in file order (none for an inline symlink).
    pub extents: Vec<crate::format::Extent>,
    /// Its overflow extent blocks.
    pub chain: Vec<u64>,
    /// Its xattr blocks.
    pub xattr: Vec<u64>,
}

impl Owned {
    /// Every block, with the role it has.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.extents
            .iter()
            .flat_map(|e| e.physical..e.physical + e.len as u64)
            .chain(self.chain.iter().copied())
            .chain(self.xattr.iter().copied())
    }
}

/// What allocated inode `ino` (whose inode is `inode`) owns.
pub(super) fn owned_blocks(fs: &Fs, st: &mut State, ino: Ino, inode: &Inode) -> Result<Owned> {
    let no_extents = !inode.has_extents();
    let extents = if no_extents {
        Vec::new()
    } else {
        fs.extents(st, ino)?.clone()
    };
    let chain = if no_extents {
        Vec::new()
    } else {
        fs.cached(st, ino)?.chain.clone()
    };
    Ok(Owned {
        extents,
        chain,
        xattr: fs.xattr_blocks(inode.xattr_block),
    })
}

/// The owner of every block some inode owns; an error names an inode
/// whose blocks cannot be known (damaged, or its extents unreadable).
///
/// With `tolerant` (fsck, which repairs such inodes), a damaged inode owns
/// what of it reads: its extents as far as they read (see
/// [`readable_extents`], what its repair keeps) and its xattr block.
pub(super) fn owned_by_all(
    fs: &Fs,
    st: &mut State,
    tolerant: bool,
) -> std::result::Result<HashMap<u64, Ino>, String> {
    let sb = &fs.core.sb;
    let mut owner = HashMap::new();
    for ino in not_free(st, sb.inode_count) {
        let owned = match fs.inode(st, ino) {
            Ok(inode) => owned_blocks(fs, st, ino, &inode),
            Err(Error::NotFound) => continue,
            Err(e) => Err(e),
        };
        match owned {
            Ok(owned) => owner.extend(owned.blocks().map(|b| (b, ino))),
            Err(e) if !tolerant => return Err(format!("inode {ino} cannot be read ({e})")),
            Err(_) => {
                let mut raw = [0u8; INODE_SIZE as usize];
                if fs.core.dev.read(sb.inode_offset(ino), &mut raw).is_err() {
                    continue;
                }
                let inode = Inode::decode_unchecked(&raw);
                let blocks = readable_extents(fs, &inode)
                    .into_iter()
                    .flat_map(|e| e.physical..e.physical + e.len as u64)
                    .chain(fs.xattr_blocks(inode.xattr_block));
                for block in blocks {
                    owner.entry(block).or_insert(ino);
                }
            }
        }
    }
    Ok(owner)
}

/// The inodes that are not free (the gaps between free ones), and the
/// damaged ones, in order.
fn not_free(st: &State, inode_count: u64) -> Vec<Ino> {
    let mut inos: Vec<Ino> = Vec::new();
    let mut next = 1;
    for &free in st.free_inodes.iter() {
        inos.extend(next..free);
        next = free + 1;
    }
    inos.extend(next..=inode_count);
    inos.extend(st.damaged.iter().filter(|i| st.free_inodes.contains(i)));
    inos.sort_unstable();
    inos
}

/// The repair of inode `ino`, which does not read: its fields made right
/// where they can be (a size past the limits cut to its extents) and the
/// checksum rewritten when they are sound then; cleared otherwise.
fn damaged_inode(fs: &Fs, ino: Ino) -> Fix {
    let offset = fs.core.sb.inode_offset(ino);
    let mut raw = [0u8; INODE_SIZE as usize];
    if fs.core.dev.read(offset, &mut raw).is_err() {
        return Fix::ClearInode(ino);
    }
    let mut inode = Inode::decode_unchecked(&raw);
    // Flags daxfs does not know are dropped.
    inode.flags &= crate::format::FLAG_INLINE_LINK | crate::format::ATTR_FLAGS;
    if inode.is_special() {
        // A special file holds no data: what says otherwise is damage.
        let rdev = if inode.is_device() { inode.rdev() } else { 0 };
        (inode.size, inode.extent_count, inode.extent_block) = (0, 0, 0);
        inode.set_rdev(rdev);
    } else if inode.kind() != libc::S_IFLNK && inode.size > MAX_FILE_SIZE {
        let extents = readable_extents(fs, &inode);
        inode.size = extents.last().map_or(0, |e| e.end() * BLOCK);
    }
    let sane_links = inode.nlink > 0 || inode.next_orphan != 0;
    match inode.unsound() {
        None if sane_links
            && inode.extent_count as usize >= inline_count(&inode)
            && (ino != ROOT || inode.is_dir()) =>
        {
            Fix::RewriteInode(ino, Box::new(inode))
        }
        _ if ino == ROOT => Fix::NewRoot,
        _ => Fix::ClearInode(ino),
    }
}

/// How many of the inline extent slots an inode uses.
fn inline_count(inode: &Inode) -> usize {
    if !inode.has_extents() {
        0
    } else {
        (inode.extent_count as usize).min(crate::format::INLINE_EXTENTS)
    }
}

/// The extents of `inode` that read and make sense, in order: the inline
/// ones, then the overflow chain as far as it reads; each inside the data
/// area, after the one before. A directory keeps only its first run from
/// block 0 (its blocks may have no hole).
fn readable_extents(fs: &Fs, inode: &Inode) -> Vec<Extent> {
    let sb = &fs.core.sb;
    let mut all = inode.inline_extents();
    all.truncate(inline_count(inode));
    let mut next = inode.extent_block;
    let mut seen = HashSet::default();
    while next != 0 && all.len() < inode.extent_count as usize {
        if next < sb.data_start || next >= sb.backup_block || !seen.insert(next) {
            break;
        }
        let mut raw = vec![0u8; BLOCK as usize];
        let Ok(block) = fs
            .core
            .dev
            .read(next * BLOCK, &mut raw)
            .map_err(Error::from)
            .and_then(|()| ExtentBlock::decode(&raw, next * BLOCK))
        else {
            break;
        };
        all.extend(block.extents);
        next = block.next;
    }
    let mut kept: Vec<Extent> = Vec::new();
    for e in all {
        let after = kept.last().map_or(0, |k| k.end());
        let inside = e.len > 0
            && e.physical >= sb.data_start
            && e.physical
                .checked_add(e.len as u64)
                .is_some_and(|end| end <= sb.backup_block)
            && e.fits()
            && e.logical >= after;
        if !inside || (inode.is_dir() && e.logical != after) {
            if inode.is_dir() {
                break;
            }
            continue;
        }
        kept.push(e);
    }
    kept
}

/// Carry out one repair.
fn apply(fs: &Fs, fix: Fix) -> Result<()> {
    let sb = fs.core.sb.clone();
    match fix {
        Fix::RewriteInode(ino, inode) => fs.change(|fs, st, stage| {
            st.damaged.remove(&ino);
            fs.put_inode(st, stage, ino, *inode);
            Ok(())
        }),
        Fix::ClearInode(ino) => {
            let offset = sb.inode_offset(ino);
            // A poisoned inode goes with its sector (all of whose inodes
            // are unreadable): only a covering write clears poison.
            let (at, len) = match fs.core.dev.first_poison(offset, INODE_SIZE) {
                Some(_) => {
                    let start = offset / pmem::SECTOR * pmem::SECTOR;
                    let end = (offset + INODE_SIZE).div_ceil(pmem::SECTOR) * pmem::SECTOR;
                    (start, end - start)
                }
                None => (offset, INODE_SIZE),
            };
            fs.change(|_, st, stage| {
                stage.tx.write(at, &vec![0u8; len as usize]);
                let first = (at - sb.inode_table_start * BLOCK) / INODE_SIZE + 1;
                for cleared in first..first + len / INODE_SIZE {
                    // (Freed inodes leave the cache when the change commits.)
                    st.damaged.remove(&cleared);
                    stage.freed_inodes.push(cleared);
                }
                Ok(())
            })
        }
        Fix::NewRoot => fs.change(|fs, st, stage| {
            let root = Inode::new_root(crate::format::Time::now());
            st.damaged.remove(&ROOT);
            fs.forget_cached(st, ROOT);
            fs.core.names.purge_dir(ROOT);
            fs.put_inode(st, stage, ROOT, root);
            Ok(())
        }),
        Fix::KeepExtents(ino, keep) => fs.change(|fs, st, stage| {
            let offset = sb.inode_offset(ino);
            let mut raw = [0u8; INODE_SIZE as usize];
            fs.core.dev.read(offset, &mut raw)?;
            let mut inode = Inode::decode_unchecked(&raw);
            // Start from the inode alone: no chain (its blocks are the
            // bitmap pass's to free), the kept extents.
            inode.extent_count = 0;
            inode.extent_block = 0;
            inode.set_inline_extents(&[]);
            inode.blocks = fs.xattr_blocks(inode.xattr_block).len() as u64;
            st.damaged.remove(&ino);
            fs.forget_cached(st, ino);
            fs.put_inode(st, stage, ino, inode.clone());
            *fs.extents(st, ino)? = keep.clone();
            let mut inode = fs.store_extents(st, stage, ino)?;
            inode.blocks += keep.iter().map(|e| e.len as u64).sum::<u64>();
            if inode.is_dir() {
                inode.size = keep.last().map_or(0, |e| e.end() * BLOCK);
            }
            fs.put_inode(st, stage, ino, inode);
            Ok(())
        }),
        Fix::DropXattrs(ino) => fs.change(|fs, st, stage| {
            let mut inode = fs.inode(st, ino)?;
            let chain = fs.xattr_blocks(inode.xattr_block).len() as u64;
            inode.xattr_block = 0;
            inode.blocks = inode.blocks.saturating_sub(chain);
            fs.put_inode(st, stage, ino, inode);
            Ok(())
        }),
        Fix::Clone(ino, shared) => fs.change(|fs, st, stage| {
            let shared: HashSet<u64> = shared.into_iter().collect();
            let copy = |st: &mut State, block: u64| -> Result<u64> {
                let (new, _) = st.alloc.alloc(1).ok_or(Error::NoSpace)?;
                let mut data = vec![0u8; BLOCK as usize];
                let got = fs.core.dev.read_mcsafe(block * BLOCK, &mut data)?;
                data[got.copied..].fill(0);
                fs.core.dev.memcpy_nodrain(new * BLOCK, &data)?;
                Ok(new)
            };
            let mut inode = fs.inode(st, ino)?;
            let chain = fs.xattr_blocks(inode.xattr_block);
            if chain.iter().any(|b| shared.contains(b)) {
                // A new chain of the same attributes (none if they do not
                // read); the shared blocks stay the other owner's.
                let attrs = fs.xattrs(st, ino).unwrap_or_default();
                inode.xattr_block = 0;
                inode.blocks = inode.blocks.saturating_sub(chain.len() as u64);
                fs.put_inode(st, stage, ino, inode);
                fs.store_xattrs(st, stage, ino, &attrs)?;
            }
            let old = fs.extents(st, ino)?.clone();
            let mut new = Vec::new();
            for e in old {
                for i in 0..e.len {
                    let block = e.physical + i as u64;
                    let physical = if shared.contains(&block) {
                        copy(st, block)?
                    } else {
                        block
                    };
                    super::extents::insert_extent(
                        &mut new,
                        Extent {
                            logical: e.logical + i as u64,
                            len: 1,
                            physical,
                        },
                    );
                }
            }
            *fs.extents(st, ino)? = new;
            if fs.cached(st, ino)?.chain.iter().any(|b| shared.contains(b)) {
                // A new chain (the shared one stays its first owner's).
                fs.cached(st, ino)?.chain.clear();
            }
            let inode = fs.store_extents(st, stage, ino)?;
            fs.put_inode(st, stage, ino, inode);
            Ok(())
        }),
        Fix::ZeroDir { dir, at, len } => fs.change(|fs, st, stage| {
            stage.tx.write(at, &vec![0u8; len as usize]);
            stage.touched.insert(dir);
            fs.forget_dir(st, dir);
            Ok(())
        }),
        Fix::DropEntry { dir, name } => fs.change(|fs, st, stage| {
            let read = fs.read_dir(st, dir)?;
            let Some((pos, _, slots)) = read.entries.iter().find(|(_, d, _)| d.name == name) else {
                return Err(Error::NotFound);
            };
            fs.write_slots(st, stage, dir, *pos, &vec![0u8; slots * SLOT])?;
            fs.forget_dir(st, dir);
            Ok(())
        }),
        Fix::EntryType { dir, name, kind } => fs.change(|fs, st, stage| {
            let read = fs.read_dir(st, dir)?;
            let Some((pos, dirent, _)) = read.entries.iter().find(|(_, d, _)| d.name == name)
            else {
                return Err(Error::NotFound);
            };
            let dirent = Dirent {
                kind,
                ..dirent.clone()
            };
            fs.write_slots(st, stage, dir, *pos, &dirent.encode())?;
            fs.forget_dir(st, dir);
            Ok(())
        }),
        Fix::Reconnect(ino) => {
            let found = match fs.lookup(ROOT, LOST_AND_FOUND) {
                Ok(attr) if attr.kind == super::FileKind::Dir => attr.ino,
                Ok(attr) => {
                    // Something else has the name: moved aside (e2fsck
                    // unlinks it; a rename loses nothing).
                    let aside = format!("lost+found.{}", attr.ino);
                    fs.rename(
                        ROOT,
                        LOST_AND_FOUND,
                        ROOT,
                        aside.as_bytes(),
                        super::RenameFlags::default(),
                    )?;
                    fs.mkdir(ROOT, LOST_AND_FOUND, 0o700, 0, 0)?.ino
                }
                Err(Error::NotFound) => fs.mkdir(ROOT, LOST_AND_FOUND, 0o700, 0, 0)?.ino,
                Err(e) => return Err(e),
            };
            fs.change(|fs, st, stage| {
                let mut inode = fs.inode(st, ino)?;
                let name = format!("#{ino}");
                fs.add_entry(
                    st,
                    stage,
                    found,
                    name.as_bytes(),
                    ino,
                    crate::format::dtype_of(inode.mode),
                )?;
                if inode.is_dir() {
                    inode.parent = found;
                    fs.put_inode(st, stage, ino, inode);
                    fs.adjust_nlink(st, stage, found, 1)?;
                }
                Ok(())
            })
        }
        Fix::Parent(ino, parent) => fs.change(|fs, st, stage| {
            let mut inode = fs.inode(st, ino)?;
            inode.parent = parent;
            fs.put_inode(st, stage, ino, inode);
            Ok(())
        }),
        Fix::Nlink(ino, nlink) => fs.change(|fs, st, stage| {
            let mut inode = fs.inode(st, ino)?;
            inode.nlink = nlink;
            fs.put_inode(st, stage, ino, inode);
            Ok(())
        }),
        Fix::Bitmap(words) => {
            // Through the allocator, so that its checksums are written
            // too, and in pieces that fit in the journal.
            for chunk in words.chunks(512) {
                fs.change(|_, st, _| {
                    for &(word, value) in chunk {
                        for bit in 0..64 {
                            let block = word as u64 * 64 + bit;
                            if block < sb.total_blocks {
                                st.alloc.set(block, value & 1 << bit != 0);
                            }
                        }
                    }
                    Ok(())
                })?;
            }
            let refused: Vec<u64> = fs.lock()?.alloc.refused().iter().copied().collect();
            if !refused.is_empty() {
                fs.rebuild_bitmap_blocks(&refused, true)?.map_err(|why| {
                    Error::corrupt("allocation bitmap", sb.bitmap_start * BLOCK, why)
                })?;
            }
            Ok(())
        }
        Fix::Along => Ok(()),
    }
}

/// The directory where fsck puts what nothing names (made by mkfs).
pub const LOST_AND_FOUND: &[u8] = b"lost+found";
