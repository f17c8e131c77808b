//! Who owns a device block: the reverse map memory-failure handling needs
//! (Linux asks the filesystem the same question through `->notify_failure`
//! and the reverse mapping of XFS).

use super::{Fs, Ino};
use crate::error::{Error, Result};
use crate::format::{Superblock, BLOCK, INODE_SIZE};

/// One extent of a file, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileExtent {
    /// Where it starts in the file.
    pub file_offset: u64,
    /// Where it starts on the device.
    pub device_offset: u64,
    pub len: u64,
}

impl FileExtent {
    /// Whether it is a whole 2 MiB region, aligned in the file and on the
    /// device (what a PMD mapping needs).
    pub fn is_huge_aligned(&self) -> bool {
        const HUGE: u64 = 2 << 20;
        self.file_offset.is_multiple_of(HUGE)
            && self.device_offset.is_multiple_of(HUGE)
            && self.len >= HUGE
    }
}

/// What a device block holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Data of a file (or a directory's entries) at `offset` in it.
    File { ino: Ino, offset: u64 },
    /// A block of a file's metadata (its extent list or its xattrs).
    FileMetadata { ino: Ino, what: &'static str },
    /// Filesystem metadata: the superblock, the journal, the bitmap...
    Metadata(String),
    /// Nothing: a free block.
    Free,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::File { ino, offset } => write!(f, "inode {ino}, file offset {offset}"),
            Owner::FileMetadata { ino, what } => write!(f, "inode {ino}, {what}"),
            Owner::Metadata(what) => f.write_str(what),
            Owner::Free => f.write_str("free space"),
        }
    }
}

/// A filesystem-wide metadata structure and where it lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Area {
    pub name: &'static str,
    /// Device byte range.
    pub start: u64,
    pub end: u64,
    /// Whether every change writes it (the journal).
    pub every_change: bool,
}

/// The filesystem-wide structure holding device offset `offset`, if any
/// (the inode table is per inode, and not one of them).
pub(super) fn metadata_area(sb: &Superblock, offset: u64) -> Option<Area> {
    let blocks = |name, start: u64, len: u64| Area {
        name,
        start: start * BLOCK,
        end: (start + len) * BLOCK,
        every_change: start == sb.journal_start,
    };
    [
        blocks("the superblock", 0, 1),
        blocks("the backup superblock", sb.backup_block, 1),
        blocks("the state block (orphan list)", sb.state_block, 1),
        blocks("the journal", sb.journal_start, sb.journal_blocks),
        blocks("the allocation bitmap", sb.bitmap_start, sb.bitmap_blocks),
        blocks(
            "the bitmap checksums",
            sb.bitmap_csum,
            if sb.bitmap_csum == 0 {
                0
            } else {
                sb.bitmap_csum_blocks()
            },
        ),
    ]
    .into_iter()
    .find(|a| (a.start..a.end).contains(&offset))
}

impl Fs {
    /// The extents of regular file or directory `ino`, in file order.
    pub fn file_extents(&self, ino: Ino) -> Result<Vec<FileExtent>> {
        let mut st = self.lock()?;
        let inode = self.inode(&mut st, ino)?;
        if !inode.has_extents() {
            return Ok(Vec::new());
        }
        Ok(self
            .extents(&mut st, ino)?
            .iter()
            .map(|e| FileExtent {
                file_offset: e.logical * BLOCK,
                device_offset: e.physical * BLOCK,
                len: e.len as u64 * BLOCK,
            })
            .collect())
    }

    /// The device offset that holds byte `offset` of file `ino`, or `None`
    /// in a hole.
    pub fn device_offset(&self, ino: Ino, offset: u64) -> Result<Option<u64>> {
        let mut st = self.lock()?;
        let extents = self.extents(&mut st, ino)?;
        Ok(super::extents::map(extents, offset / BLOCK)
            .map(|(physical, _)| physical * BLOCK + offset % BLOCK))
    }

    /// Who owns the block at device offset `offset`. Metadata areas are
    /// known from the superblock; data blocks are found by walking every
    /// inode's extents (a memory failure is rare; this is not a hot path).
    pub fn owner_of(&self, offset: u64) -> Result<Owner> {
        let sb = self.core.sb.clone();
        let block = offset / BLOCK;
        let area = |start: u64, len: u64| (start..start + len).contains(&block);
        if let Some(area) = metadata_area(&sb, offset) {
            return Ok(Owner::Metadata(area.name.into()));
        }
        if area(sb.inode_table_start, sb.inode_table_blocks) {
            let ino = (offset - sb.inode_table_start * BLOCK) / INODE_SIZE + 1;
            return Ok(Owner::Metadata(format!("the inode table (inode {ino})")));
        }
        if block < sb.data_start || block >= sb.total_blocks {
            return Err(Error::Invalid("offset is outside the device"));
        }
        let mut st = self.lock()?;
        if st.alloc.is_free(block) {
            return Ok(Owner::Free);
        }
        for ino in 1..=sb.inode_count {
            if st.free_inodes.contains(&ino) || st.damaged.contains(&ino) {
                continue;
            }
            let Ok(inode) = self.inode(&mut st, ino) else {
                continue;
            };
            if inode.xattr_block != 0 && self.xattr_blocks(inode.xattr_block).contains(&block) {
                return Ok(Owner::FileMetadata {
                    ino,
                    what: "extended attributes",
                });
            }
            if !inode.has_extents() {
                continue;
            }
            let Ok(extents) = self.extents(&mut st, ino) else {
                continue;
            };
            if let Some(e) = extents
                .iter()
                .find(|e| (e.physical..e.physical + e.len as u64).contains(&block))
            {
                let offset = (e.logical + (block - e.physical)) * BLOCK + offset % BLOCK;
                return Ok(Owner::File { ino, offset });
            }
            if self.cached(&mut st, ino)?.chain.contains(&block) {
                return Ok(Owner::FileMetadata {
                    ino,
                    what: "extent list",
                });
            }
        }
        Ok(Owner::Metadata("an allocated block no inode claims".into()))
    }
}
