//! Attribute flags, as `chattr` sets them and `lsattr` shows them
//! (`FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS`, and XFS's `FS_IOC_FSGETXATTR` /
//! `FS_IOC_FSSETXATTR`): immutable and append-only, enforced here as ext4
//! enforces them, and nodump and noatime, kept for the programs that read
//! them. Any other flag is refused (`EOPNOTSUPP`).
//!
//! The rules, Linux's (`may_delete`, `notify_change`, `vfs_link`,
//! `generic_write_checks`, `vfs_fallocate`, `xattr_permission`), each
//! refusal `EPERM`:
//!
//! * an **immutable** file does not change: not its data, attributes
//!   (mode, owner, times, size) or extended attributes; it takes no new
//!   link and cannot be removed or renamed, nor replaced by a rename; an
//!   immutable directory takes no new entry and loses none;
//! * an **append-only** file takes writes at its end only (opened with
//!   `O_APPEND`), is never truncated, punched or allocated past its end,
//!   keeps its mode and owner, takes no new link and cannot be removed or
//!   renamed; an append-only directory takes new entries and loses none.
//!
//! Clearing the flags is always allowed (`set_flags`). Who may set or
//! clear immutable and append-only (root: `CAP_LINUX_IMMUTABLE`) is the
//! caller's business, as every permission check is: the kernel checks it
//! before a mount sees the call.

use super::{Attr, Fs, Ino, State};
use crate::error::{Error, Result};
use crate::format::{Inode, Time, ATTR_FLAGS, FLAG_APPEND, FLAG_IMMUTABLE};

const IMMUTABLE: Error = Error::NotPermitted("the file is immutable");
const APPEND_ONLY: Error = Error::NotPermitted("the file is append-only");

/// `FS_XFLAG_*`: the same flags in `struct fsxattr`'s terms.
const XFLAG_IMMUTABLE: u32 = 0x8;
const XFLAG_APPEND: u32 = 0x10;
const XFLAG_NOATIME: u32 = 0x40;
const XFLAG_NODUMP: u32 = 0x80;
const XFLAGS: [(u32, u32); 4] = [
    (XFLAG_IMMUTABLE, FLAG_IMMUTABLE),
    (XFLAG_APPEND, FLAG_APPEND),
    (XFLAG_NOATIME, crate::format::FLAG_NOATIME),
    (XFLAG_NODUMP, crate::format::FLAG_NODUMP),
];

/// Attribute flags (`FS_*_FL`) in `struct fsxattr`'s terms.
pub fn to_xflags(flags: u32) -> u32 {
    XFLAGS
        .iter()
        .filter(|(_, f)| flags & f != 0)
        .fold(0, |x, (xf, _)| x | xf)
}

/// `struct fsxattr` flags in attribute flag (`FS_*_FL`) terms; `None` when
/// one of them is not one daxfs keeps.
pub fn from_xflags(xflags: u32) -> Option<u32> {
    let known = XFLAGS.iter().fold(0, |x, (xf, _)| x | xf);
    (xflags & !known == 0).then(|| {
        XFLAGS
            .iter()
            .filter(|(xf, _)| xflags & xf != 0)
            .fold(0, |f, (_, fl)| f | fl)
    })
}

impl Fs {
    /// The attribute flags of `ino` (`FS_IOC_GETFLAGS`).
    pub fn get_flags(&self, ino: Ino) -> Result<u32> {
        Ok(self.getattr(ino)?.flags)
    }

    /// Set the attribute flags of `ino` (`FS_IOC_SETFLAGS`): immutable,
    /// append-only, nodump and noatime; any other is refused with
    /// `EOPNOTSUPP` and nothing changes.
    pub fn set_flags(&self, ino: Ino, flags: u32) -> Result<Attr> {
        if flags & !ATTR_FLAGS != 0 {
            return Err(Error::Unsupported(
                "attribute flags other than immutable, append-only, nodump and noatime",
            ));
        }
        self.change(|fs, st, stage| {
            let mut inode = fs.inode(st, ino)?;
            if inode.flags & ATTR_FLAGS != flags {
                inode.flags = (inode.flags & !ATTR_FLAGS) | flags;
                inode.ctime = Time::now();
                fs.put_inode(st, stage, ino, inode.clone());
            }
            Ok(Fs::attr(ino, &inode))
        })
    }

    /// Whether `ino` may be opened for writing: never when immutable, and
    /// only to append (`append`: `O_APPEND`) when append-only.
    pub fn may_open_for_write(&self, ino: Ino, append: bool) -> Result<()> {
        let flags = self.getattr(ino)?.flags;
        if flags & FLAG_IMMUTABLE != 0 {
            return Err(IMMUTABLE);
        }
        if flags & FLAG_APPEND != 0 && !append {
            return Err(APPEND_ONLY);
        }
        Ok(())
    }

    /// Whether the name `ino` has in directory `dir` may go (unlink, rmdir,
    /// a rename from it or over it).
    pub(super) fn may_remove(&self, st: &mut State, dir: Ino, ino: Ino) -> Result<()> {
        unchangeable(&self.inode(st, dir)?)?;
        unchangeable(&self.inode(st, ino)?)
    }

    /// Whether directory `dir` may take a new entry.
    pub(super) fn may_add(&self, st: &mut State, dir: Ino) -> Result<()> {
        match self.inode(st, dir)?.flags & FLAG_IMMUTABLE {
            0 => Ok(()),
            _ => Err(IMMUTABLE),
        }
    }
}

/// Refused for an immutable or append-only inode: a new link, removal,
/// xattr changes, truncation, a change of mode or owner.
pub(super) fn unchangeable(inode: &Inode) -> Result<()> {
    if inode.flags & FLAG_IMMUTABLE != 0 {
        Err(IMMUTABLE)
    } else if inode.flags & FLAG_APPEND != 0 {
        Err(APPEND_ONLY)
    } else {
        Ok(())
    }
}

/// Refused for an immutable inode only: a change of its times.
pub(super) fn immutable(inode: &Inode) -> Result<()> {
    match inode.flags & FLAG_IMMUTABLE {
        0 => Ok(()),
        _ => Err(IMMUTABLE),
    }
}

/// A write of `[offset, end)`: none to an immutable file; to an
/// append-only one only at its end.
pub(super) fn may_write(inode: &Inode, offset: u64) -> Result<()> {
    immutable(inode)?;
    if inode.flags & FLAG_APPEND != 0 && offset < inode.size {
        return Err(APPEND_ONLY);
    }
    Ok(())
}
