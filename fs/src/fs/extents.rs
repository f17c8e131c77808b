//! A file's extent map, kept sorted by logical block with no overlaps:
//! lookup, the next mapped block, insertion over a hole (merging with a
//! contiguous neighbour) and removal of a range. The data path, the
//! namespace, fsck and the DAX fault routine's block map all use it.

use crate::format::{Extent, MAX_EXTENT_LEN};

/// The device block of logical block `lblock`, and how many blocks the
/// mapping continues for.
pub(super) fn map(extents: &[Extent], lblock: u64) -> Option<(u64, u64)> {
    let i = extents.partition_point(|e| e.end() <= lblock);
    let e = extents.get(i)?;
    (e.logical <= lblock).then(|| {
        let skip = lblock - e.logical;
        (e.physical + skip, e.len as u64 - skip)
    })
}

/// The first logical block at or after `lblock` that is mapped.
pub(super) fn next_mapped(extents: &[Extent], lblock: u64) -> Option<u64> {
    let i = extents.partition_point(|e| e.end() <= lblock);
    extents.get(i).map(|e| e.logical.max(lblock))
}

/// Add a new extent (over a hole), merging with a contiguous neighbour.
pub(super) fn insert_extent(extents: &mut Vec<Extent>, new: Extent) {
    let i = extents.partition_point(|e| e.logical < new.logical);
    if i > 0 {
        let prev = &mut extents[i - 1];
        if prev.end() == new.logical
            && prev.physical + prev.len as u64 == new.physical
            && prev.len as u64 + new.len as u64 <= MAX_EXTENT_LEN
        {
            prev.len += new.len;
            return;
        }
    }
    extents.insert(i, new);
}

/// Unmap logical blocks `[start, end)`; returns the device runs freed.
pub(super) fn remove_range(extents: &mut Vec<Extent>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut freed = Vec::new();
    let mut kept = Vec::with_capacity(extents.len() + 1);
    for e in extents.drain(..) {
        let (a, b) = (e.logical, e.end());
        if b <= start || a >= end {
            kept.push(e);
            continue;
        }
        let cut_a = a.max(start);
        let cut_b = b.min(end);
        freed.push((e.physical + (cut_a - a), cut_b - cut_a));
        if a < cut_a {
            kept.push(Extent {
                logical: e.logical,
                len: (cut_a - a) as u32,
                physical: e.physical,
            });
        }
        if cut_b < b {
            kept.push(Extent {
                logical: cut_b,
                len: (b - cut_b) as u32,
                physical: e.physical + (cut_b - a),
            });
        }
    }
    *extents = kept;
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_map_merge_and_split() {
        let mut ex = Vec::new();
        insert_extent(
            &mut ex,
            Extent {
                logical: 0,
                len: 2,
                physical: 100,
            },
        );
        insert_extent(
            &mut ex,
            Extent {
                logical: 2,
                len: 3,
                physical: 102,
            },
        );
        assert_eq!(ex.len(), 1, "contiguous extents merge");
        insert_extent(
            &mut ex,
            Extent {
                logical: 10,
                len: 1,
                physical: 50,
            },
        );
        assert_eq!(map(&ex, 3), Some((103, 2)));
        assert_eq!(map(&ex, 6), None);
        assert_eq!(next_mapped(&ex, 6), Some(10));
        let freed = remove_range(&mut ex, 1, 4);
        assert_eq!(freed, vec![(101, 3)]);
        assert_eq!(
            ex,
            vec![
                Extent {
                    logical: 0,
                    len: 1,
                    physical: 100
                },
                Extent {
                    logical: 4,
                    len: 1,
                    physical: 104
                },
                Extent {
                    logical: 10,
                    len: 1,
                    physical: 50
                },
            ]
        );
    }
}
