//! `FS_IOC_FIEMAP` for daxfs files: which extents to report, and how.
//!
//! The kernel never passes FIEMAP to a FUSE filesystem: the VFS answers it
//! itself (`do_vfs_ioctl` calls `ioctl_fiemap`, which needs
//! `inode->i_op->fiemap`, and FUSE has none), so on a plain mount it fails
//! with `EOPNOTSUPP`. The preload library answers it in the program, from
//! the file's extents as the daemon knows them; the library's users have
//! `Fs::file_extents`. Both report through [`answer`].
//!
//! What is reported, as ext4 and XFS report it: every extent that overlaps
//! the asked range, whole; extents that continue one another in the file
//! and on the device as one (the on-media list may split a run);
//! `FIEMAP_EXTENT_LAST` on the file's last extent. daxfs has no unwritten
//! extents (fallocate zeroes the blocks it allocates, which a DAX mapping
//! may show at once), so none is flagged unwritten; and none is
//! `FIEMAP_EXTENT_MERGED`, which is for filesystems without extents.

/// `_IOWR('f', 11, struct fiemap)`.
pub const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Write the file's data back first (a no-op: daxfs data is durable when
/// written).
pub const FIEMAP_FLAG_SYNC: u32 = 0x1;
/// The last extent of the file.
pub const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// The size of `struct fiemap` before its extents.
pub const HEADER: usize = 32;
/// The size of `struct fiemap_extent`.
pub const EXTENT: usize = 56;
/// The most extents one call may ask for (the kernel's
/// `FIEMAP_MAX_EXTENTS`).
pub const MAX_EXTENTS: u32 = (u32::MAX as usize / EXTENT) as u32;

/// One extent as FIEMAP reports it, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FiemapExtent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// The extents to report for `[start, start + len)` of a file whose
/// extents are `extents` (file offset, device offset, length, in file
/// order).
pub fn answer(
    extents: impl IntoIterator<Item = (u64, u64, u64)>,
    start: u64,
    len: u64,
) -> Vec<FiemapExtent> {
    let mut merged: Vec<FiemapExtent> = Vec::new();
    for (logical, physical, length) in extents {
        match merged.last_mut() {
            Some(last)
                if last.logical + last.length == logical
                    && last.physical + last.length == physical =>
            {
                last.length += length
            }
            _ => merged.push(FiemapExtent {
                logical,
                physical,
                length,
                flags: 0,
            }),
        }
    }
    if let Some(last) = merged.last_mut() {
        last.flags |= FIEMAP_EXTENT_LAST;
    }
    let end = start.saturating_add(len);
    merged.retain(|e| e.logical < end && start < e.logical + e.length);
    merged
}

/// The request's flags we cannot honour, if any (FIEMAP then fails with
/// `EBADR` and hands them back, as the kernel's `fiemap_prep` does).
pub fn unsupported(flags: u32) -> Option<u32> {
    let rest = flags & !FIEMAP_FLAG_SYNC;
    (rest != 0).then_some(rest)
}

/// Encode `extents` as `struct fiemap_extent`s.
pub fn encode(extents: &[FiemapExtent]) -> Vec<u8> {
    let mut out = vec![0u8; extents.len() * EXTENT];
    for (e, b) in extents.iter().zip(out.chunks_mut(EXTENT)) {
        b[0..8].copy_from_slice(&e.logical.to_ne_bytes());
        b[8..16].copy_from_slice(&e.physical.to_ne_bytes());
        b[16..24].copy_from_slice(&e.length.to_ne_bytes());
        b[40..44].copy_from_slice(&e.flags.to_ne_bytes());
    }
    out
}

/// Decode `struct fiemap_extent`s (what a caller of the ioctl reads).
pub fn decode(bytes: &[u8]) -> Vec<FiemapExtent> {
    let u64_at = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap());
    bytes
        .chunks_exact(EXTENT)
        .map(|b| FiemapExtent {
            logical: u64_at(b, 0),
            physical: u64_at(b, 8),
            length: u64_at(b, 16),
            flags: u32::from_ne_bytes(b[40..44].try_into().unwrap()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    fn e(logical: u64, physical: u64, length: u64, flags: u32) -> FiemapExtent {
        FiemapExtent {
            logical,
            physical,
            length,
            flags,
        }
    }

    #[test]
    fn extents_that_continue_each_other_are_one_and_the_last_is_marked() {
        let list = [
            (0, 10 * M, 2 * M),
            (2 * M, 12 * M, 2 * M),       // continues the first
            (4 * M, 40 * M, 4096),        // elsewhere on the device
            (8 * M, 40 * M + 4096, 4096), // after a hole
        ];
        assert_eq!(
            answer(list, 0, u64::MAX),
            [
                e(0, 10 * M, 4 * M, 0),
                e(4 * M, 40 * M, 4096, 0),
                e(8 * M, 40 * M + 4096, 4096, FIEMAP_EXTENT_LAST),
            ]
        );
        // Those overlapping the range, whole.
        assert_eq!(
            answer(list, 3 * M, 2 * M),
            [e(0, 10 * M, 4 * M, 0), e(4 * M, 40 * M, 4096, 0)]
        );
        assert_eq!(answer(list, 5 * M, M), []);
        assert_eq!(
            answer(list, 8 * M + 4095, 1),
            [e(8 * M, 40 * M + 4096, 4096, FIEMAP_EXTENT_LAST)]
        );
        assert_eq!(answer([], 0, u64::MAX), []);
    }

    #[test]
    fn extents_encode_as_the_kernel_lays_them_out() {
        let list = [e(1, 2, 3, 0), e(4096, 8192, 4096, FIEMAP_EXTENT_LAST)];
        let bytes = encode(&list);
        assert_eq!(bytes.len(), 2 * 56);
        assert_eq!(&bytes[56 + 40..56 + 44], &1u32.to_ne_bytes());
        assert_eq!(decode(&bytes), list);
        assert_eq!(unsupported(FIEMAP_FLAG_SYNC), None);
        assert_eq!(unsupported(0x2 | FIEMAP_FLAG_SYNC), Some(0x2));
    }
}
