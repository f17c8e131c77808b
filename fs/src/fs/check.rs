//! fsck: check every invariant of a filesystem image, and repair what can be
//! repaired without guessing.
//!
//! Checked: both superblock copies and their needs-check mark (set when a
//! mount found the journal damaged: what the damage cut off is discarded,
//! and the check looks at what is left); the journal (replayed, as mounting
//! does);
//! every allocated inode (checksum, type, extents inside the data area,
//! sorted and disjoint, overflow chain and extent count); no block owned
//! twice; the allocation bitmap against the blocks files and metadata own;
//! the directory tree from the root (entries name allocated inodes of the
//! type they say, each directory has one parent and its `..` points there);
//! link counts; the orphan list (checked by the mount first: a damaged
//! state block drops it, and the list is cut at the first entry that is not
//! an allocated, unlinked inode other than the root, met once; each is a
//! problem); allocated inodes that nothing names.
//!
//! Repaired with `repair`: a damaged superblock copy (rewritten from the good
//! one), wrong link counts, and bitmap bits (leaked blocks freed, owned
//! blocks marked); the needs-check mark is cleared once the check went
//! through. Everything else is reported and left alone.

use super::{Fs, Ino, State, ROOT};
use crate::error::{Error, Result};
use crate::format::{Inode, Superblock, BLOCK, FLAG_INLINE_LINK};
use pmem::Device;
use std::collections::{HashMap, VecDeque};

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
    let shared_after = !repair && !dev.is_read_only();
    if shared_after {
        dev.set_private(true)?;
    }
    let (report, mut dev) = check(dev, repair)?;
    if shared_after {
        dev.set_private(false)?;
    }
    Ok((report, dev))
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
    let bitmap_fix = {
        let mut st = fs.lock()?;
        check_tree(&fs, &mut st, &mut report, repair)?
    };
    for (problem, ino, nlink) in bitmap_fix.nlinks {
        report.problems[problem].fixed = repair
            && fs
                .change(|fs, st, stage| {
                    let mut inode = fs.inode(st, ino)?;
                    inode.nlink = nlink;
                    fs.put_inode(st, stage, ino, inode);
                    Ok(())
                })
                .is_ok();
    }
    if repair {
        // Through the allocator, so that its checksums are written too,
        // and in pieces that fit in the journal.
        for chunk in bitmap_fix.words.chunks(512) {
            fs.change(|_, st, _| {
                for &(word, value) in chunk {
                    for bit in 0..64 {
                        let block = word as u64 * 64 + bit;
                        if block < fs.core.sb.total_blocks {
                            st.alloc.set(block, value & 1 << bit != 0);
                        }
                    }
                }
                Ok(())
            })?;
        }
        let refused: Vec<u64> = fs.lock()?.alloc.refused().iter().copied().collect();
        if !refused.is_empty() {
            let owned = {
                let mut st = fs.lock()?;
                owned_by_all(&fs, &mut st)
            };
            if let Ok(owned) = owned {
                fs.change(|fs, st, _| {
                    for &index in &refused {
                        st.alloc
                            .rebuild(&fs.core.sb, index, |block| owned.contains_key(&block));
                    }
                    Ok(())
                })?;
            }
        }
        let still_refused = !fs.lock()?.alloc.refused().is_empty();
        for &problem in &bitmap_fix.bitmap_problems {
            report.problems[problem].fixed = !still_refused;
        }
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

/// What one inode owns on the device.
pub(super) struct Owned {
    /// Its extents, in file order (none for an inline symlink).
    pub extents: Vec<crate::format::Extent>,
    /// Its overflow extent blocks.
    pub chain: Vec<u64>,
    /// Its xattr block.
    pub xattr: Option<u64>,
}

impl Owned {
    /// Every block, with the role it has.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.extents
            .iter()
            .flat_map(|e| e.physical..e.physical + e.len as u64)
            .chain(self.chain.iter().copied())
            .chain(self.xattr)
    }
}

/// What allocated inode `ino` (whose inode is `inode`) owns.
pub(super) fn owned_blocks(fs: &Fs, st: &mut State, ino: Ino, inode: &Inode) -> Result<Owned> {
    let inline_link = inode.kind() == libc::S_IFLNK && inode.flags & FLAG_INLINE_LINK != 0;
    let extents = if inline_link {
        Vec::new()
    } else {
        fs.extents(st, ino)?.clone()
    };
    let chain = if inline_link {
        Vec::new()
    } else {
        fs.cached(st, ino)?.chain.clone()
    };
    Ok(Owned {
        extents,
        chain,
        xattr: (inode.xattr_block != 0).then_some(inode.xattr_block),
    })
}

/// The owner of every block some inode owns; an error names an inode
/// whose blocks cannot be known (damaged, or its extents unreadable).
pub(super) fn owned_by_all(
    fs: &Fs,
    st: &mut State,
) -> std::result::Result<HashMap<u64, Ino>, String> {
    let mut owner = HashMap::new();
    for ino in 1..=fs.core.sb.inode_count {
        if st.free_inodes.contains(&ino) {
            continue;
        }
        let owned = match fs.inode(st, ino) {
            Ok(inode) => owned_blocks(fs, st, ino, &inode),
            Err(Error::NotFound) => continue,
            Err(e) => Err(e),
        };
        match owned {
            Ok(owned) => owner.extend(owned.blocks().map(|b| (b, ino))),
            Err(e) => return Err(format!("inode {ino} cannot be read ({e})")),
        }
    }
    Ok(owner)
}

struct Fixes {
    /// Link-count problems: the problem's index, the inode, the right count.
    nlinks: Vec<(usize, Ino, u32)>,
    /// Indexes of the problems a rewrite of the bitmap fixes.
    bitmap_problems: Vec<usize>,
    /// Bitmap words that should hold this.
    words: Vec<(usize, u64)>,
}

fn check_tree(fs: &Fs, st: &mut State, report: &mut FsckReport, _repair: bool) -> Result<Fixes> {
    let sb: Superblock = fs.core.sb.clone();
    // Who owns each block: 0 nobody, else the inode (u64::MAX: metadata).
    let mut owner: HashMap<u64, Ino> = HashMap::new();
    let mut claim = |report: &mut FsckReport, block: u64, ino: Ino| {
        if block < sb.data_start || block >= sb.backup_block {
            report.problem(
                format!("inode {ino}: block {block} lies outside the data area"),
                false,
            );
        } else if let Some(other) = owner.insert(block, ino) {
            report.problem(
                format!("inodes {other} and {ino} both own block {block}"),
                false,
            );
        }
    };
    let mut allocated: Vec<Ino> = Vec::new();
    for ino in 1..=sb.inode_count {
        if st.free_inodes.contains(&ino) {
            continue;
        }
        let inode = match fs.inode(st, ino) {
            Ok(inode) => inode,
            Err(Error::NotFound) => continue,
            Err(e) => {
                report.problem(format!("inode {ino}: {e}"), false);
                continue;
            }
        };
        let kind = inode.kind();
        if ![libc::S_IFREG, libc::S_IFDIR, libc::S_IFLNK].contains(&kind) {
            report.problem(
                format!("inode {ino}: unknown file type {:#o}", inode.mode),
                false,
            );
            continue;
        }
        allocated.push(ino);
        let owned = match owned_blocks(fs, st, ino, &inode) {
            Ok(owned) => owned,
            Err(e) => {
                report.problem(format!("inode {ino}: {e}"), false);
                continue;
            }
        };
        let mut last_end = 0;
        let mut count = 0;
        for e in &owned.extents {
            if e.len == 0 || (e.logical as u64) < last_end {
                report.problem(
                    format!(
                        "inode {ino}: extents overlap or are out of order at logical block {}",
                        e.logical
                    ),
                    false,
                );
            }
            last_end = e.end();
            for block in e.physical..e.physical + e.len as u64 {
                claim(report, block, ino);
            }
            count += e.len as u64;
        }
        for &block in owned.chain.iter().chain(&owned.xattr) {
            claim(report, block, ino);
        }
        count += owned.chain.len() as u64 + owned.xattr.is_some() as u64;
        if count != inode.blocks {
            report.problem(
                format!("inode {ino}: counts {} blocks, owns {count}", inode.blocks),
                false,
            );
        }
    }
    // The directory tree.
    let mut refs: HashMap<Ino, u32> = HashMap::new();
    let mut subdirs: HashMap<Ino, u32> = HashMap::new();
    let mut seen_dirs: HashMap<Ino, Ino> = HashMap::from([(ROOT, ROOT)]);
    let mut queue = VecDeque::from([ROOT]);
    while let Some(dir) = queue.pop_front() {
        let entries: Vec<(Vec<u8>, Ino, u8)> = match fs.dir(st, dir) {
            Ok(index) => index
                .entries_from(0)
                .map(|(_, name, slot)| (name.to_vec(), slot.ino, slot.kind))
                .collect(),
            Err(e) => {
                report.problem(format!("directory {dir}: {e}"), false);
                continue;
            }
        };
        for (name, ino, kind) in entries {
            let shown = String::from_utf8_lossy(&name).into_owned();
            let inode = match fs.inode(st, ino) {
                Ok(inode) => inode,
                Err(_) => {
                    report.problem(
                        format!(
                            "directory {dir}: entry {shown:?} names free or damaged inode {ino}"
                        ),
                        false,
                    );
                    continue;
                }
            };
            if crate::format::dtype_of(inode.mode) != kind {
                report.problem(
                    format!(
                        "directory {dir}: entry {shown:?} says type {kind}, inode {ino} is {:#o}",
                        inode.mode & libc::S_IFMT
                    ),
                    false,
                );
            }
            *refs.entry(ino).or_default() += 1;
            if inode.is_dir() {
                *subdirs.entry(dir).or_default() += 1;
                if let Some(first) = seen_dirs.insert(ino, dir) {
                    report.problem(
                        format!("directory {ino} has two parents ({first} and {dir})"),
                        false,
                    );
                    continue;
                }
                if inode.parent != dir {
                    report.problem(
                        format!(
                            "directory {ino}: `..` points to {}, but it lives in {dir}",
                            inode.parent
                        ),
                        false,
                    );
                }
                queue.push_back(ino);
            }
        }
    }
    // The orphan list.
    let mut orphans = Vec::new();
    let mut at = st.orphan_head;
    while at != 0 {
        if orphans.contains(&at) || orphans.len() as u64 > sb.inode_count {
            report.problem("the orphan list loops".into(), false);
            break;
        }
        orphans.push(at);
        at = match fs.inode(st, at) {
            Ok(inode) => inode.next_orphan,
            Err(e) => {
                report.problem(format!("orphan list: inode {at}: {e}"), false);
                break;
            }
        };
    }
    let mut nlinks = Vec::new();
    for &ino in &allocated {
        let inode = fs.inode(st, ino)?;
        let names = refs.get(&ino).copied().unwrap_or(0);
        let orphan = orphans.contains(&ino);
        if ino != ROOT && names == 0 && !orphan {
            report.problem(
                format!("inode {ino} is allocated but no directory names it"),
                false,
            );
            continue;
        }
        let expected = if inode.is_dir() {
            if orphan {
                0
            } else {
                2 + subdirs.get(&ino).copied().unwrap_or(0)
            }
        } else {
            names
        };
        if inode.nlink != expected {
            let what = format!(
                "inode {ino}: link count is {}, should be {expected}",
                inode.nlink
            );
            nlinks.push((report.problem(what, false), ino, expected));
        }
    }
    // The bitmap against ownership.
    let mut words = Vec::new();
    let mut bitmap_problems = Vec::new();
    let mut leaked = 0;
    for word in 0..(sb.total_blocks.div_ceil(64) as usize) {
        let mut want = 0u64;
        for bit in 0..64 {
            let block = word as u64 * 64 + bit;
            if block >= sb.total_blocks {
                break;
            }
            let used =
                block < sb.data_start || block == sb.backup_block || owner.contains_key(&block);
            if used {
                want |= 1 << bit;
            }
            match (used, st.alloc.is_used(block)) {
                (true, false) => {
                    let owner = owner.get(&block).copied().unwrap_or(0);
                    let what = format!("block {block} is in use (inode {owner}) but marked free");
                    bitmap_problems.push(report.problem(what, false));
                }
                (false, true) => leaked += 1,
                _ => {}
            }
        }
        let have = (0..64)
            .filter(|&bit| {
                word as u64 * 64 + bit < sb.total_blocks && st.alloc.is_used(word as u64 * 64 + bit)
            })
            .fold(0u64, |w, bit| w | 1 << bit);
        let metadata_free = st.alloc.metadata_marked_free().contains(&word);
        if metadata_free {
            let what = format!(
                "bitmap word {word} marks metadata blocks free (a sector cleared of poison reads as zeros)"
            );
            bitmap_problems.push(report.problem(what, false));
        }
        if want != have || metadata_free {
            words.push((word, want));
        }
    }
    if leaked > 0 {
        let what = format!("blocks: {leaked} are marked in use but nothing owns them");
        bitmap_problems.push(report.problem(what, false));
    }
    Ok(Fixes {
        nlinks,
        words,
        bitmap_problems,
    })
}
