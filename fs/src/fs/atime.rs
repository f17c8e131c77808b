//! Access times, as Linux keeps them: `relatime` by default (a read
//! updates the access time when it is not later than the last change of
//! the data or the inode, or more than a day old), `noatime` (never) and
//! `strictatime` (every read). A file with the noatime attribute flag
//! (`chattr +A`) is never updated; neither is anything on a read-only
//! device. An update is a transaction of its own, taken only when the rule
//! says so: a read that changes nothing costs nothing more than a look at
//! the cached inode.

use super::{Fs, Ino};
use crate::format::{Inode, Time, FLAG_NOATIME};
use std::sync::atomic::Ordering;

/// When reads update access times (the mount options of the same names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Atime {
    /// When the access time is not later than the modification or change
    /// time, or is more than a day old (Linux's default).
    #[default]
    Relatime,
    /// Never.
    NoAtime,
    /// On every read.
    StrictAtime,
}

const DAY: i64 = 24 * 60 * 60;

impl Fs {
    /// Set when reads update access times.
    pub fn set_atime(&self, mode: Atime) {
        self.core.atime.store(mode as u8, Ordering::Relaxed);
    }

    /// When reads update access times.
    pub fn atime(&self) -> Atime {
        match self.core.atime.load(Ordering::Relaxed) {
            1 => Atime::NoAtime,
            2 => Atime::StrictAtime,
            _ => Atime::Relatime,
        }
    }

    /// Whether a read of `inode` now should update its access time.
    pub(super) fn atime_due(&self, inode: &Inode) -> bool {
        if inode.flags & FLAG_NOATIME != 0 || self.core.dev.is_read_only() {
            return false;
        }
        match self.atime() {
            Atime::NoAtime => false,
            Atime::StrictAtime => true,
            Atime::Relatime => {
                inode.atime <= inode.mtime
                    || inode.atime <= inode.ctime
                    || Time::now().secs - inode.atime.secs >= DAY
            }
        }
    }

    /// Update the access time of `ino` after a read, if it is still due.
    /// Best effort: a read that succeeded stays a success whatever happens
    /// here (a damaged inode, a full journal).
    pub(super) fn touch_atime(&self, ino: Ino) {
        let _ = self.change(|fs, st, stage| {
            let mut inode = fs.inode(st, ino)?;
            if fs.atime_due(&inode) {
                inode.atime = Time::precise();
                fs.put_inode(st, stage, ino, inode);
            }
            Ok(())
        });
    }
}
