//! Names: lookup, create, mkdir, symlink, link, unlink, rmdir, rename,
//! readlink, readdir, extended attributes, and the path-based calls.

use super::dcache::Dentry;
use super::dir::Slot;
use super::extents::map;
use super::user::{unmapped, unmapped_path};
use super::{
    Attr, CreateOptions, DirEntry, FileKind, Fs, Handle, Ino, RenameFlags, Stage, State, ROOT,
};
use crate::error::{Error, Result};
use crate::format::{
    dtype_of, Dirent, Extent, Inode, Time, BLOCK, FLAG_INLINE_LINK, INLINE_LINK_MAX, NAME_MAX,
    SLOT, SLOTS_PER_BLOCK,
};
use std::path::{Component, Path};

/// Offsets 0 and 1 of `readdir` are `.` and `..`; entries follow at 2 + slot.
const FIRST_ENTRY: u64 = 2;
const MAX_LINKS: u32 = 65000;
use crate::format::SYMLINK_MAX;
const MAX_SYMLINK_HOPS: u32 = 40;
const DT_DIR: u8 = libc::DT_DIR;
const DT_LNK: u8 = libc::DT_LNK;

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Error::Invalid("bad file name"));
    }
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    Ok(())
}

/// Whether `name` is `.` or `..`, which cannot be created or removed.
fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

impl Fs {
    /// The attributes of `name` in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        let name: &[u8] = &unmapped(name);
        let mut st = self.lock()?;
        let ino = self.lookup_ino(&mut st, parent, name)?;
        let inode = self.inode(&mut st, ino)?;
        Ok(Fs::attr(ino, &inode))
    }

    /// Never call this inside a change: it fills the dentry cache with what
    /// the directory index says now, which a failing change would undo.
    pub(super) fn lookup_ino(&self, st: &mut State, parent: Ino, name: &[u8]) -> Result<Ino> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        match name {
            b"." => {
                self.dir(st, parent)?;
                Ok(parent)
            }
            b".." => {
                self.dir(st, parent)?;
                Ok(self.inode(st, parent)?.parent)
            }
            _ => {
                check_name(name)?;
                let found = self.dir(st, parent)?.get(name).map(|s| (s.ino, s.kind));
                // A fact under the lock: the walks after this one need no lock.
                self.core.names.fill(
                    parent,
                    name,
                    match found {
                        Some((ino, kind)) => Dentry::Positive { ino, kind },
                        None => Dentry::Negative,
                    },
                );
                found.map(|f| f.0).ok_or(Error::NotFound)
            }
        }
    }

    /// Open `name` in `parent` with `O_CREAT` as one operation: look it up,
    /// create it if missing, apply `O_TRUNC`, and open it, all under one
    /// hold of the filesystem, so no rename or unlink can come between the
    /// steps. Returns the attributes, the handle and whether it was created.
    pub fn open_create(
        &self,
        parent: Ino,
        name: &[u8],
        opts: &CreateOptions,
    ) -> Result<(Attr, Handle, bool)> {
        let name: &[u8] = &unmapped(name);
        // O_TRUNC of a file that was DAX-mapped must first break its
        // mappings (outside the state lock: see `dax`); the name is looked up
        // for that, and if a racing rename put another mapped file there
        // meanwhile, the whole call runs again.
        loop {
            let target = match opts.truncate {
                true => self.lookup(parent, name).ok().map(|a| a.ino),
                false => None,
            };
            let dax = target.and_then(|ino| self.dax_of(ino));
            let _broken = self.dax_invalidate(&dax, 0, u64::MAX)?;
            match self.open_create_once(parent, name, opts) {
                Err(Error::MappedMeanwhile) => continue,
                result => return result,
            }
        }
    }

    fn open_create_once(
        &self,
        parent: Ino,
        name: &[u8],
        opts: &CreateOptions,
    ) -> Result<(Attr, Handle, bool)> {
        self.change(|fs, st, stage| {
            check_name(name)?;
            let (ino, created) = match fs.dir(st, parent)?.get(name).map(|s| s.ino) {
                Some(_) if opts.exclusive => return Err(Error::Exists),
                Some(ino) => {
                    let inode = fs.inode(st, ino)?;
                    if inode.is_dir() {
                        return Err(Error::IsDir);
                    }
                    if opts.truncate && inode.kind() == libc::S_IFREG && inode.size > 0 {
                        fs.truncate_staged(st, stage, ino, 0)?;
                    }
                    (ino, false)
                }
                None => {
                    let inode = fs.new_inode(
                        libc::S_IFREG | (opts.mode & 0o7777),
                        opts.uid,
                        opts.gid,
                        parent,
                    );
                    (fs.add_new(st, stage, parent, name, inode)?.0, true)
                }
            };
            let attr = Fs::attr(ino, &fs.inode(st, ino)?);
            Ok((attr, Fs::new_handle(st, ino), created))
        })
    }

    /// Create a regular file (open with `O_CREAT`). With `exclusive`
    /// (`O_EXCL`) an existing name fails with `EEXIST`; without it, an
    /// existing file is returned as it is. Returns the attributes and whether
    /// the file was created.
    pub fn create(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> Result<(Attr, bool)> {
        let name: &[u8] = &unmapped(name);
        self.change(|fs, st, stage| {
            check_name(name)?;
            if let Some(existing) = fs.dir(st, parent)?.get(name).map(|s| s.ino) {
                if exclusive {
                    return Err(Error::Exists);
                }
                let inode = fs.inode(st, existing)?;
                if inode.is_dir() {
                    return Err(Error::IsDir);
                }
                return Ok((Fs::attr(existing, &inode), false));
            }
            let inode = fs.new_inode(libc::S_IFREG | (mode & 0o7777), uid, gid, parent);
            let (ino, inode) = fs.add_new(st, stage, parent, name, inode)?;
            Ok((Fs::attr(ino, &inode), true))
        })
    }

    /// Create a file of any type but a directory or a symbolic link, as
    /// `mknod(2)`: a FIFO, a socket, a character or block device node with
    /// device number `rdev` (as Linux encodes a `dev_t`), or an empty
    /// regular file (type `S_IFREG` or 0). The name must be new. Whether
    /// the caller may make device nodes is the caller's business (the
    /// kernel checks `CAP_MKNOD` before a mount sees the call).
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let name: &[u8] = &unmapped(name);
        let kind = mode & libc::S_IFMT;
        match kind {
            0 | libc::S_IFREG => {
                return Ok(self.create(parent, name, mode, uid, gid, true)?.0);
            }
            libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK => {}
            libc::S_IFDIR => return Err(Error::NotPermitted("mknod makes no directories")),
            _ => return Err(Error::Invalid("unknown file type")),
        }
        self.change(|fs, st, stage| {
            check_name(name)?;
            let mut inode = fs.new_inode(kind | (mode & 0o7777), uid, gid, parent);
            if inode.is_device() {
                inode.set_rdev(rdev);
            }
            let (ino, inode) = fs.add_new(st, stage, parent, name, inode)?;
            Ok(Fs::attr(ino, &inode))
        })
    }

    /// Create an unnamed regular file in directory `parent` and open it,
    /// as `open(O_TMPFILE)`: its link count is 0 and it waits on the orphan
    /// list, so its last close frees it (and so does the next mount, after
    /// a crash), unless `link` names it first, which it may only if
    /// `linkable` (`O_TMPFILE` without `O_EXCL`). It takes its group and a
    /// default ACL from `parent` as a file created there would.
    pub fn tmpfile(
        &self,
        parent: Ino,
        mode: u32,
        uid: u32,
        gid: u32,
        linkable: bool,
    ) -> Result<(Attr, Handle)> {
        self.change(|fs, st, stage| {
            let mut inode = fs.new_inode(libc::S_IFREG | (mode & 0o7777), uid, gid, parent);
            inode.nlink = 0;
            let (ino, inode) = fs.init_new(st, stage, parent, inode)?;
            fs.add_orphan(st, stage, ino, inode.clone());
            if linkable {
                st.linkable.insert(ino);
            }
            Ok((Fs::attr(ino, &inode), Fs::new_handle(st, ino)))
        })
    }

    /// Create a directory.
    pub fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        let name: &[u8] = &unmapped(name);
        self.change(|fs, st, stage| {
            check_name(name)?;
            let mut inode = fs.new_inode(libc::S_IFDIR | (mode & 0o7777), uid, gid, parent);
            inode.nlink = 2;
            let (ino, inode) = fs.add_new(st, stage, parent, name, inode)?;
            Ok(Fs::attr(ino, &inode))
        })
    }

    /// Create a symbolic link to `target`.
    pub fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let name: &[u8] = &unmapped(name);
        let target: &[u8] = &unmapped(target);
        if target.is_empty() || target.len() > SYMLINK_MAX {
            return Err(if target.is_empty() {
                Error::NotFound
            } else {
                Error::NameTooLong
            });
        }
        self.change(|fs, st, stage| {
            check_name(name)?;
            let mut inode = fs.new_inode(libc::S_IFLNK | 0o777, uid, gid, parent);
            inode.size = target.len() as u64;
            if target.len() <= INLINE_LINK_MAX {
                inode.flags |= FLAG_INLINE_LINK;
                inode.inline[..target.len()].copy_from_slice(target);
            } else {
                let (block, _) = st.alloc.alloc(1).ok_or(Error::NoSpace)?;
                let mut data = target.to_vec();
                data.resize(BLOCK as usize, 0);
                fs.core.dev.memcpy_nodrain(block * BLOCK, &data)?;
                inode.parent = crate::format::symlink_check(target);
                inode.extent_count = 1;
                inode.blocks = 1;
                inode.set_inline_extents(&[Extent {
                    logical: 0,
                    len: 1,
                    physical: block,
                }]);
            }
            let (ino, inode) = fs.add_new(st, stage, parent, name, inode)?;
            Ok(Fs::attr(ino, &inode))
        })
    }

    /// The target of a symbolic link.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let mut st = self.lock()?;
        let inode = self.inode(&mut st, ino)?;
        if inode.kind() != libc::S_IFLNK {
            return Err(Error::Invalid("not a symbolic link"));
        }
        self.link_target(&mut st, ino, &inode)
    }

    /// The target of symlink `ino` (whose inode is `inode`), checked.
    pub(super) fn link_target(&self, st: &mut State, ino: Ino, inode: &Inode) -> Result<Vec<u8>> {
        let len = inode.size as usize;
        if inode.flags & FLAG_INLINE_LINK != 0 {
            return Ok(inode.inline[..len.min(INLINE_LINK_MAX)].to_vec());
        }
        let block = map(self.extents(st, ino)?, 0)
            .ok_or_else(|| {
                Error::corrupt(
                    format!("symlink {ino}"),
                    self.core.sb.inode_offset(ino),
                    "no target block",
                )
            })?
            .0;
        let mut target = vec![0u8; len.min(SYMLINK_MAX)];
        let what = format!("symlink target of inode {ino}");
        crate::format::read_meta(&self.core.dev, block * BLOCK, &mut target, &what)?;
        // (0: written before targets had a checksum.)
        if inode.parent != 0 && inode.parent != crate::format::symlink_check(&target) {
            return Err(Error::corrupt(what, block * BLOCK, "checksum mismatch"));
        }
        if target.contains(&0) {
            return Err(Error::corrupt(what, block * BLOCK, "holds a NUL byte"));
        }
        Ok(target)
    }

    /// Give `ino` (not a directory) another name. A file without one is
    /// named only if `tmpfile` made it linkable (then it leaves the orphan
    /// list); one whose names were all removed is `ENOENT`, as Linux's
    /// `vfs_link` says.
    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        let name: &[u8] = &unmapped(name);
        self.change(|fs, st, stage| {
            check_name(name)?;
            let mut inode = fs.inode(st, ino)?;
            if inode.is_dir() {
                return Err(Error::Unsupported("hard links to directories"));
            }
            let unnamed = inode.nlink == 0;
            if unnamed && !st.linkable.contains(&ino) {
                return Err(Error::NotFound);
            }
            super::flags::unchangeable(&inode)?;
            fs.may_add(st, parent)?;
            if inode.nlink >= MAX_LINKS {
                return Err(Error::TooManyLinks);
            }
            if fs.dir(st, parent)?.get(name).is_some() {
                return Err(Error::Exists);
            }
            if unnamed {
                fs.remove_orphan(st, stage, ino)?;
                inode.next_orphan = 0;
            }
            inode.nlink += 1;
            inode.ctime = Time::now();
            fs.put_inode(st, stage, ino, inode.clone());
            fs.add_entry(st, stage, parent, name, ino, dtype_of(inode.mode))?;
            if unnamed {
                st.linkable.remove(&ino);
            }
            Ok(Fs::attr(ino, &inode))
        })
    }

    /// Remove the name of a non-directory.
    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let name: &[u8] = &unmapped(name);
        self.change(|fs, st, stage| {
            if is_dot(name) {
                return Err(Error::IsDir);
            }
            check_name(name)?;
            let slot = fs.entry(st, parent, name)?;
            if fs.inode(st, slot.ino)?.is_dir() {
                return Err(Error::IsDir);
            }
            fs.may_remove(st, parent, slot.ino)?;
            fs.remove_entry(st, stage, parent, name, &slot)?;
            fs.drop_link(st, stage, slot.ino)
        })
    }

    /// Remove an empty directory.
    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let name: &[u8] = &unmapped(name);
        self.change(|fs, st, stage| {
            match name {
                b"." => return Err(Error::Invalid("cannot remove .")),
                b".." => return Err(Error::NotEmpty),
                _ => check_name(name)?,
            }
            let slot = fs.entry(st, parent, name)?;
            if !fs.inode(st, slot.ino)?.is_dir() {
                return Err(Error::NotDir);
            }
            if !fs.dir(st, slot.ino)?.is_empty() {
                return Err(Error::NotEmpty);
            }
            fs.may_remove(st, parent, slot.ino)?;
            fs.remove_entry(st, stage, parent, name, &slot)?;
            fs.drop_dir(st, stage, parent, slot.ino)
        })
    }

    /// Rename `name` in `parent` to `new_name` in `new_parent`.
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        let name: &[u8] = &unmapped(name);
        let new_name: &[u8] = &unmapped(new_name);
        if flags.exchange && (flags.noreplace || flags.whiteout) {
            return Err(Error::Invalid(
                "RENAME_EXCHANGE with RENAME_NOREPLACE or RENAME_WHITEOUT",
            ));
        }
        self.change(|fs, st, stage| {
            if is_dot(name) || is_dot(new_name) {
                return Err(Error::Invalid("cannot rename . or .."));
            }
            check_name(name)?;
            check_name(new_name)?;
            let src = fs.entry(st, parent, name)?;
            fs.dir(st, new_parent)?;
            let dst = fs.dir(st, new_parent)?.get(new_name).cloned();
            let src_inode = fs.inode(st, src.ino)?;
            // A directory may not move into its own subtree.
            if src_inode.is_dir() && fs.is_ancestor(st, src.ino, new_parent)? {
                return Err(Error::Invalid("a directory cannot move into itself"));
            }
            if let Some(dst) = &dst {
                if dst.ino == src.ino {
                    return Ok(()); // the same file under both names: nothing to do
                }
                let dst_inode = fs.inode(st, dst.ino)?;
                fs.may_remove(st, parent, src.ino)?;
                fs.may_remove(st, new_parent, dst.ino)?;
                if flags.exchange {
                    if dst_inode.is_dir() && fs.is_ancestor(st, dst.ino, parent)? {
                        return Err(Error::Invalid("a directory cannot move into itself"));
                    }
                    return fs.exchange(
                        st,
                        stage,
                        (parent, name, &src, &src_inode),
                        (new_parent, new_name, dst, &dst_inode),
                    );
                }
                if flags.noreplace {
                    return Err(Error::Exists);
                }
                match (src_inode.is_dir(), dst_inode.is_dir()) {
                    (true, false) => return Err(Error::NotDir),
                    (false, true) => return Err(Error::IsDir),
                    (true, true) if !fs.dir(st, dst.ino)?.is_empty() => {
                        return Err(Error::NotEmpty)
                    }
                    _ => {}
                }
            } else if flags.exchange {
                return Err(Error::NotFound);
            } else {
                fs.may_remove(st, parent, src.ino)?;
                fs.may_add(st, new_parent)?;
            }
            // Remove the source name, then put it at the target.
            fs.remove_entry(st, stage, parent, name, &src)?;
            match &dst {
                Some(dst) => {
                    fs.retarget_entry(st, stage, new_parent, new_name, dst, src.ino, src.kind)?;
                    if src_inode.is_dir() {
                        fs.drop_dir(st, stage, new_parent, dst.ino)?;
                    } else {
                        fs.drop_link(st, stage, dst.ino)?;
                    }
                }
                None => fs.add_entry(st, stage, new_parent, new_name, src.ino, src.kind)?,
            }
            if flags.whiteout {
                let mode = libc::S_IFCHR;
                let whiteout = fs.new_inode(mode, src_inode.uid, src_inode.gid, parent);
                fs.add_new(st, stage, parent, name, whiteout)?;
            }
            let now = Time::now();
            let mut moved = fs.inode(st, src.ino)?;
            moved.ctime = now;
            if src_inode.is_dir() && parent != new_parent {
                moved.parent = new_parent;
                fs.adjust_nlink(st, stage, parent, -1)?;
                fs.adjust_nlink(st, stage, new_parent, 1)?;
            }
            fs.put_inode(st, stage, src.ino, moved);
            Ok(())
        })
    }

    #[allow(clippy::type_complexity)]
    fn exchange(
        &self,
        st: &mut State,
        stage: &mut Stage,
        a: (Ino, &[u8], &Slot, &Inode),
        b: (Ino, &[u8], &Slot, &Inode),
    ) -> Result<()> {
        let (a_parent, a_name, a_slot, a_inode) = a;
        let (b_parent, b_name, b_slot, b_inode) = b;
        self.retarget_entry(st, stage, a_parent, a_name, a_slot, b_slot.ino, b_slot.kind)?;
        self.retarget_entry(st, stage, b_parent, b_name, b_slot, a_slot.ino, a_slot.kind)?;
        if a_parent != b_parent {
            for (ino, inode, new_parent) in [
                (a_slot.ino, a_inode, b_parent),
                (b_slot.ino, b_inode, a_parent),
            ] {
                if inode.is_dir() {
                    let mut moved = self.inode(st, ino)?;
                    moved.parent = new_parent;
                    self.put_inode(st, stage, ino, moved);
                    let old_parent = if new_parent == a_parent {
                        b_parent
                    } else {
                        a_parent
                    };
                    self.adjust_nlink(st, stage, old_parent, -1)?;
                    self.adjust_nlink(st, stage, new_parent, 1)?;
                }
            }
        }
        Ok(())
    }

    /// Whether `ancestor` is `ino` or lies on the path from `ino` to the root.
    fn is_ancestor(&self, st: &mut State, ancestor: Ino, mut ino: Ino) -> Result<bool> {
        for _ in 0..=self.core.sb.inode_count {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT {
                return Ok(false);
            }
            ino = self.inode(st, ino)?.parent;
        }
        Err(Error::corrupt("directory tree", 0, "parent pointers loop"))
    }

    /// The entries of directory `ino` from `offset` on (0 starts with `.`).
    /// A listing from the start updates the access time as a read does.
    pub fn readdir(&self, ino: Ino, offset: u64) -> Result<Vec<DirEntry>> {
        let (listed, atime_due) = self.readdir_from(ino, offset)?;
        if atime_due {
            self.touch_atime(ino);
        }
        Ok(listed)
    }

    /// The entries, and whether the listing is due to update the access
    /// time (one from the start), decided under the same lock.
    fn readdir_from(&self, ino: Ino, offset: u64) -> Result<(Vec<DirEntry>, bool)> {
        let mut st = self.lock()?;
        let inode = self.inode(&mut st, ino)?;
        let atime_due = offset == 0 && self.atime_due(&inode);
        let parent = inode.parent;
        let dir = self.dir(&mut st, ino)?;
        let mut out = Vec::new();
        if offset == 0 {
            out.push(DirEntry {
                ino,
                kind: FileKind::Dir,
                name: b".".to_vec(),
                next: 1,
            });
        }
        if offset <= 1 {
            out.push(DirEntry {
                ino: parent,
                kind: FileKind::Dir,
                name: b"..".to_vec(),
                next: FIRST_ENTRY,
            });
        }
        for (pos, name, slot) in dir.entries_from(offset.saturating_sub(FIRST_ENTRY)) {
            out.push(DirEntry {
                ino: slot.ino,
                kind: FileKind::of_dtype(slot.kind),
                name: name.to_vec(),
                next: pos + FIRST_ENTRY + 1,
            });
        }
        Ok((out, atime_due))
    }

    // ---- extended attributes (user.*, trusted.*, security.*) ------------------

    /// The namespaces kept: `user.*`, `trusted.*` (who may use it is the
    /// caller's business: the kernel allows it to `CAP_SYS_ADMIN` only)
    /// and `security.*` (labels, file capabilities).
    fn check_xattr_name(name: &[u8]) -> Result<()> {
        if name == super::acl::ACCESS || name == super::acl::DEFAULT {
            return Ok(());
        }
        let known = [&b"user."[..], b"trusted.", b"security."]
            .iter()
            .any(|prefix| name.starts_with(prefix) && name.len() > prefix.len());
        if !known {
            return Err(Error::Unsupported(
                "extended attributes other than user.*, trusted.*, security.* and POSIX ACLs",
            ));
        }
        if name.len() > 255 {
            return Err(Error::Range);
        }
        Ok(())
    }

    /// Set extended attribute `name`; `create` and `replace` as XATTR_CREATE
    /// and XATTR_REPLACE.
    pub fn setxattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        create: bool,
        replace: bool,
    ) -> Result<()> {
        let name: &[u8] = &unmapped(name);
        let value: &[u8] = &unmapped(value);
        Fs::check_xattr_name(name)?;
        if value.len() > super::xattr::MAX_VALUE {
            return Err(Error::Range);
        }
        self.change(|fs, st, stage| {
            super::flags::unchangeable(&fs.inode(st, ino)?)?;
            let mut attrs = fs.xattrs(st, ino)?;
            let exists = attrs.iter().any(|(n, _)| n == name);
            match exists {
                true if create => return Err(Error::Exists),
                false if replace => return Err(Error::NoAttr),
                _ => {}
            }
            if name == super::acl::ACCESS || name == super::acl::DEFAULT {
                fs.set_acl(st, stage, ino, name, value, &mut attrs)?;
            } else if let Some((_, v)) = attrs.iter_mut().find(|(n, _)| n == name) {
                *v = value.to_vec();
            } else {
                attrs.push((name.to_vec(), value.to_vec()));
            }
            fs.store_xattrs(st, stage, ino, &attrs)
        })
    }

    /// The value of attribute `name`.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        let name: &[u8] = &unmapped(name);
        let mut st = self.lock()?;
        let attrs = self.xattrs(&mut st, ino)?;
        attrs
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(Error::NoAttr)
    }

    /// The attribute names.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let mut st = self.lock()?;
        Ok(self
            .xattrs(&mut st, ino)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// Remove attribute `name`.
    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        let name: &[u8] = &unmapped(name);
        self.change(|fs, st, stage| {
            super::flags::unchangeable(&fs.inode(st, ino)?)?;
            let mut attrs = fs.xattrs(st, ino)?;
            let before = attrs.len();
            attrs.retain(|(n, _)| n != name);
            if attrs.len() == before {
                return Err(Error::NoAttr);
            }
            fs.store_xattrs(st, stage, ino, &attrs)
        })
    }

    // ---- helpers ------------------------------------------------------------

    fn new_inode(&self, mode: u32, uid: u32, gid: u32, parent: Ino) -> Inode {
        let now = Time::now();
        Inode {
            mode,
            nlink: 1,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            parent,
            generation: self
                .core
                .next_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..Inode::default()
        }
    }

    /// Take an inode for `inode` and link it as `name` in `parent`. In a
    /// set-group-ID directory the new inode takes the directory's group,
    /// and a new directory the set-group-ID bit too (as Linux's
    /// `inode_init_owner`). Returns the number and the inode as made.
    fn add_new(
        &self,
        st: &mut State,
        stage: &mut Stage,
        parent: Ino,
        name: &[u8],
        inode: Inode,
    ) -> Result<(Ino, Inode)> {
        if self.dir(st, parent)?.get(name).is_some() {
            return Err(Error::Exists);
        }
        let kind = dtype_of(inode.mode);
        let (ino, inode) = self.init_new(st, stage, parent, inode)?;
        self.add_entry(st, stage, parent, name, ino, kind)?;
        if inode.is_dir() {
            self.adjust_nlink(st, stage, parent, 1)?;
        }
        Ok((ino, inode))
    }

    /// Take an inode for `inode`, to be made in directory `parent` (not
    /// yet named there): the directory's group, and set-group-ID bit, in a
    /// set-group-ID directory, and its default ACL. Returns the number and
    /// the inode as made.
    fn init_new(
        &self,
        st: &mut State,
        stage: &mut Stage,
        parent: Ino,
        mut inode: Inode,
    ) -> Result<(Ino, Inode)> {
        self.dir(st, parent)?;
        let dir = self.inode(st, parent)?;
        if dir.nlink == 0 {
            return Err(Error::NotFound); // a removed directory takes no new entries
        }
        self.may_add(st, parent)?;
        if dir.mode & libc::S_ISGID != 0 {
            inode.gid = dir.gid;
            if inode.is_dir() {
                inode.mode |= libc::S_ISGID;
            }
        }
        let inherited = match inode.kind() == libc::S_IFLNK || dir.xattr_block == 0 {
            true => None,
            false => self.inherit_acl(st, parent, &mut inode)?,
        };
        let ino = self.take_inode(st, stage)?;
        self.put_inode(st, stage, ino, inode);
        if let Some(attrs) = inherited.filter(|a| !a.is_empty()) {
            self.store_xattrs(st, stage, ino, &attrs)?;
        }
        Ok((ino, self.inode(st, ino)?))
    }

    pub(super) fn adjust_nlink(
        &self,
        st: &mut State,
        stage: &mut Stage,
        ino: Ino,
        by: i32,
    ) -> Result<()> {
        let mut inode = self.inode(st, ino)?;
        inode.nlink = inode.nlink.checked_add_signed(by).ok_or_else(|| {
            Error::corrupt(
                format!("inode {ino}"),
                self.core.sb.inode_offset(ino),
                "link count underflow",
            )
        })?;
        self.put_inode(st, stage, ino, inode);
        Ok(())
    }

    /// The entry `name` of directory `dir`.
    fn entry(&self, st: &mut State, dir: Ino, name: &[u8]) -> Result<Slot> {
        self.dir(st, dir)?.get(name).cloned().ok_or(Error::NotFound)
    }

    /// The device offset of directory position `pos`.
    fn slot_offset(&self, st: &mut State, dir: Ino, pos: u64) -> Result<u64> {
        let block = pos / SLOTS_PER_BLOCK as u64;
        let (physical, _) = map(self.extents(st, dir)?, block).ok_or_else(|| {
            Error::corrupt(
                "directory",
                self.core.sb.inode_offset(dir),
                "slot in an unmapped block",
            )
        })?;
        Ok(physical * BLOCK + (pos % SLOTS_PER_BLOCK as u64) * SLOT as u64)
    }

    pub(super) fn add_entry(
        &self,
        st: &mut State,
        stage: &mut Stage,
        dir: Ino,
        name: &[u8],
        ino: Ino,
        kind: u8,
    ) -> Result<()> {
        stage.touched.insert(dir);
        let slots = Dirent::slots(name.len());
        let pos = match self.dir(st, dir)?.find_room(slots) {
            Some(pos) => pos,
            None => {
                // A new, zeroed directory block.
                let blocks = self.dir(st, dir)?.blocks() as u64;
                let (block, _) = st.alloc.alloc(1).ok_or(Error::NoSpace)?;
                self.core.dev.memset_nodrain(block * BLOCK, 0, BLOCK)?;
                super::extents::insert_extent(
                    self.extents(st, dir)?,
                    Extent {
                        logical: blocks,
                        len: 1,
                        physical: block,
                    },
                );
                let mut inode = self.store_extents(st, stage, dir)?;
                inode.size += BLOCK;
                inode.blocks += 1;
                self.put_inode(st, stage, dir, inode);
                self.dir(st, dir)?.add_block();
                blocks * SLOTS_PER_BLOCK as u64
            }
        };
        let dirent = Dirent {
            ino,
            kind,
            name: name.to_vec(),
        };
        self.write_slots(st, stage, dir, pos, &dirent.encode())?;
        self.dir(st, dir)?.insert(&dirent, pos, slots);
        stage.name_changed(dir, name, Dentry::Positive { ino, kind }, false);
        self.touch_dir(st, stage, dir)
    }

    /// Stage `bytes` at directory position `pos` of `dir`.
    pub(super) fn write_slots(
        &self,
        st: &mut State,
        stage: &mut Stage,
        dir: Ino,
        pos: u64,
        bytes: &[u8],
    ) -> Result<()> {
        stage.touched.insert(dir);
        let offset = self.slot_offset(st, dir, pos)?;
        stage.tx.write(offset, bytes);
        Ok(())
    }

    fn remove_entry(
        &self,
        st: &mut State,
        stage: &mut Stage,
        dir: Ino,
        name: &[u8],
        slot: &Slot,
    ) -> Result<()> {
        self.write_slots(st, stage, dir, slot.pos, &vec![0u8; slot.slots * SLOT])?;
        self.dir(st, dir)?.remove(name);
        stage.name_changed(dir, name, Dentry::Negative, true);
        self.touch_dir(st, stage, dir)
    }

    #[allow(clippy::too_many_arguments)]
    fn retarget_entry(
        &self,
        st: &mut State,
        stage: &mut Stage,
        dir: Ino,
        name: &[u8],
        slot: &Slot,
        ino: Ino,
        kind: u8,
    ) -> Result<()> {
        let dirent = Dirent {
            ino,
            kind,
            name: name.to_vec(),
        };
        self.write_slots(st, stage, dir, slot.pos, &dirent.encode())?;
        self.dir(st, dir)?.retarget(name, ino, kind);
        stage.name_changed(dir, name, Dentry::Positive { ino, kind }, true);
        self.touch_dir(st, stage, dir)
    }

    fn touch_dir(&self, st: &mut State, stage: &mut Stage, dir: Ino) -> Result<()> {
        let mut inode = self.inode(st, dir)?;
        let now = Time::now();
        inode.mtime = now;
        inode.ctime = now;
        self.put_inode(st, stage, dir, inode);
        Ok(())
    }

    /// One name of a non-directory is gone: drop a link, freeing the inode
    /// (or orphaning it while it is open) at the last one.
    fn drop_link(&self, st: &mut State, stage: &mut Stage, ino: Ino) -> Result<()> {
        let mut inode = self.inode(st, ino)?;
        inode.nlink = inode.nlink.saturating_sub(1);
        inode.ctime = Time::now();
        if inode.nlink > 0 {
            self.put_inode(st, stage, ino, inode);
            Ok(())
        } else {
            self.release_unlinked(st, stage, ino, inode)
        }
    }

    /// Directory `ino`, removed from `parent`: unlink it.
    fn drop_dir(&self, st: &mut State, stage: &mut Stage, parent: Ino, ino: Ino) -> Result<()> {
        self.adjust_nlink(st, stage, parent, -1)?;
        let mut inode = self.inode(st, ino)?;
        inode.nlink = 0;
        inode.ctime = Time::now();
        self.release_unlinked(st, stage, ino, inode)
    }

    /// An inode that just lost its last name: onto the orphan list while it
    /// is open, freed otherwise.
    fn release_unlinked(
        &self,
        st: &mut State,
        stage: &mut Stage,
        ino: Ino,
        inode: Inode,
    ) -> Result<()> {
        if st.refs.contains_key(&ino) {
            self.add_orphan(st, stage, ino, inode);
            Ok(())
        } else {
            self.free_inode(st, stage, ino)
        }
    }

    // ---- paths --------------------------------------------------------------

    /// The inode a path names, following symbolic links in every component
    /// but the last.
    ///
    /// A walk over cached names takes no lock (see the dentry cache); a
    /// miss, a symbolic link or a racing rename sends it down the locked
    /// path, which fills the cache for the next one.
    pub fn resolve(&self, path: impl AsRef<Path>) -> Result<Ino> {
        let path: &Path = &unmapped_path(path.as_ref());
        if let Some(answer) = self.resolve_cached(path, false) {
            return answer;
        }
        let mut st = self.lock()?;
        self.resolve_in(&mut st, ROOT, path, false, &mut 0)
    }

    /// The lock-free walk: `None` when it needs the locked path. With
    /// `want_dir`, the answer must be a directory (anything else, a symbolic
    /// link to follow included, takes the locked path).
    fn resolve_cached(&self, path: &Path, want_dir: bool) -> Option<Result<Ino>> {
        if self
            .core
            .unmounted
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Some(Err(Error::Unmounted));
        }
        // `Path::components` without its cost: empty names and `.` go, `..`
        // needs the parent pointer and so the locked path.
        let mut names = path
            .as_os_str()
            .as_encoded_bytes()
            .split(|&b| b == b'/')
            .filter(|name| !name.is_empty() && *name != b".")
            .peekable();
        self.core.names.walk(|get| {
            let mut at = ROOT;
            while let Some(name) = names.next() {
                if name == b".." {
                    return None;
                }
                match get(at, name)? {
                    Dentry::Negative => return Some(Err(Error::NotFound)),
                    Dentry::Positive { ino, kind } => {
                        let need_dir = want_dir || names.peek().is_some();
                        if kind == DT_LNK || (need_dir && kind != DT_DIR) {
                            return None;
                        }
                        at = ino;
                    }
                }
            }
            Some(Ok(at))
        })
    }

    /// The directory a path names, following a symbolic link in the last
    /// component too (as the parent of a new name is resolved).
    fn resolve_dir(&self, path: &Path) -> Result<Ino> {
        let path: &Path = &unmapped_path(path);
        if let Some(answer) = self.resolve_cached(path, true) {
            return answer;
        }
        let mut st = self.lock()?;
        let ino = self.resolve_in(&mut st, ROOT, path, true, &mut 0)?;
        if !self.inode(&mut st, ino)?.is_dir() {
            return Err(Error::NotDir);
        }
        Ok(ino)
    }

    fn resolve_in(
        &self,
        st: &mut State,
        start: Ino,
        path: &Path,
        follow_last: bool,
        hops: &mut u32,
    ) -> Result<Ino> {
        let mut at = if path.is_absolute() { ROOT } else { start };
        let components: Vec<Component> = path.components().collect();
        for (i, component) in components.iter().enumerate() {
            let name = match component {
                Component::RootDir | Component::CurDir => continue,
                Component::ParentDir => b"..".as_slice(),
                Component::Normal(n) => n.as_encoded_bytes(),
                Component::Prefix(_) => return Err(Error::Invalid("path prefix")),
            };
            let next = self.lookup_ino(st, at, name)?;
            let last = i + 1 == components.len();
            let inode = self.inode(st, next)?;
            if (!last || follow_last) && inode.kind() == libc::S_IFLNK {
                *hops += 1;
                if *hops > MAX_SYMLINK_HOPS {
                    return Err(Error::Invalid("too many levels of symbolic links"));
                }
                let len = inode.size as usize;
                let target = if inode.flags & FLAG_INLINE_LINK != 0 {
                    inode.inline[..len.min(INLINE_LINK_MAX)].to_vec()
                } else {
                    return Err(Error::Unsupported("long symlinks inside paths"));
                };
                let target = std::ffi::OsStr::from_bytes_compat(&target);
                at = self.resolve_in(st, at, Path::new(target), true, hops)?;
            } else {
                at = next;
            }
        }
        Ok(at)
    }

    fn split_path(path: &Path) -> Result<(&Path, &[u8])> {
        let name = path
            .file_name()
            .ok_or(Error::Invalid("path has no final name"))?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        Ok((parent, name.as_encoded_bytes()))
    }

    /// The attributes of what `path` names (the last component not followed).
    pub fn stat_path(&self, path: impl AsRef<Path>) -> Result<Attr> {
        let ino = self.resolve(path)?;
        self.getattr(ino)
    }

    /// Create a regular file at `path` (`exclusive` as `O_EXCL`).
    pub fn create_path(&self, path: impl AsRef<Path>, mode: u32, exclusive: bool) -> Result<Attr> {
        let (parent, name) = Fs::split_path(path.as_ref())?;
        let parent = self.resolve_dir(parent)?;
        Ok(self.create(parent, name, mode, 0, 0, exclusive)?.0)
    }

    /// Make a FIFO, a socket or a device node at `path` (see [`Fs::mknod`]).
    pub fn mknod_path(&self, path: impl AsRef<Path>, mode: u32, rdev: u64) -> Result<Attr> {
        let (parent, name) = Fs::split_path(path.as_ref())?;
        let parent = self.resolve_dir(parent)?;
        self.mknod(parent, name, mode, rdev, 0, 0)
    }

    /// Create a directory at `path`.
    pub fn mkdir_path(&self, path: impl AsRef<Path>, mode: u32) -> Result<Attr> {
        let (parent, name) = Fs::split_path(path.as_ref())?;
        let parent = self.resolve_dir(parent)?;
        self.mkdir(parent, name, mode, 0, 0)
    }

    /// Remove the file at `path`.
    pub fn unlink_path(&self, path: impl AsRef<Path>) -> Result<()> {
        let (parent, name) = Fs::split_path(path.as_ref())?;
        let parent = self.resolve_dir(parent)?;
        self.unlink(parent, name)
    }

    /// Remove the empty directory at `path`.
    pub fn rmdir_path(&self, path: impl AsRef<Path>) -> Result<()> {
        let (parent, name) = Fs::split_path(path.as_ref())?;
        let parent = self.resolve_dir(parent)?;
        self.rmdir(parent, name)
    }

    /// Rename `from` to `to`.
    pub fn rename_path(
        &self,
        from: impl AsRef<Path>,
        to: impl AsRef<Path>,
        flags: RenameFlags,
    ) -> Result<()> {
        let (from_parent, from_name) = Fs::split_path(from.as_ref())?;
        let (to_parent, to_name) = Fs::split_path(to.as_ref())?;
        let from_parent = self.resolve_dir(from_parent)?;
        let to_parent = self.resolve_dir(to_parent)?;
        self.rename(from_parent, from_name, to_parent, to_name, flags)
    }

    /// Give the file at `from` another name, `to`.
    pub fn link_path(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<Attr> {
        let ino = self.resolve(from)?;
        let (parent, name) = Fs::split_path(to.as_ref())?;
        let parent = self.resolve_dir(parent)?;
        self.link(ino, parent, name)
    }

    /// Create a symbolic link at `path` pointing to `target`.
    pub fn symlink_path(&self, path: impl AsRef<Path>, target: &[u8]) -> Result<Attr> {
        let (parent, name) = Fs::split_path(path.as_ref())?;
        let parent = self.resolve_dir(parent)?;
        self.symlink(parent, name, target, 0, 0)
    }

    /// The names in the directory at `path`, without `.` and `..`.
    pub fn readdir_path(&self, path: impl AsRef<Path>) -> Result<Vec<DirEntry>> {
        let ino = self.resolve(path)?;
        self.readdir(ino, FIRST_ENTRY)
    }

    /// The whole contents of the file at `path`.
    pub fn read_path(&self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let ino = self.resolve(path)?;
        let size = self.getattr(ino)?.size as usize;
        let mut buf = vec![0u8; size];
        let n = self.read(ino, 0, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Write `data` at `offset` of the file at `path`.
    pub fn write_path(&self, path: impl AsRef<Path>, offset: u64, data: &[u8]) -> Result<usize> {
        let ino = self.resolve(path)?;
        self.write(ino, offset, data)
    }
}

/// `OsStr::from_bytes`, spelled for the std API available everywhere.
trait FromBytesCompat {
    fn from_bytes_compat(bytes: &[u8]) -> &std::ffi::OsStr;
}

impl FromBytesCompat for std::ffi::OsStr {
    fn from_bytes_compat(bytes: &[u8]) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(bytes)
    }
}
