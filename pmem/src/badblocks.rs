//! The list of poisoned 512-byte sectors, and the file that keeps it.
//!
//! ## The badblocks file
//!
//! An emulated device keeps its poison in a text file beside the image, named
//! `IMAGE.badblocks`, in the format of Linux's `/sys/block/pmemN/badblocks`:
//! one range per line, `FIRST_SECTOR COUNT`, in decimal, 512-byte sectors from
//! the start of the device. Lines starting with `#` are comments. The file is
//! replaced atomically (written beside, synced, renamed, directory synced), and
//! removed when the list becomes empty.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Size of a sector: the unit of poison, as in Linux's badblocks.
pub const SECTOR: u64 = 512;

/// A run of poisoned sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BadRange {
    /// First poisoned sector.
    pub sector: u64,
    /// Number of sectors, at least 1.
    pub count: u64,
}

impl BadRange {
    /// Device offset of the first poisoned byte.
    pub fn offset(&self) -> u64 {
        self.sector * SECTOR
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.count * SECTOR
    }

    /// Whether the range is empty (never true of a range in a list).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn end(&self) -> u64 {
        self.sector + self.count
    }
}

/// A set of poisoned sectors, kept as disjoint, non-adjacent runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct BadBlocks {
    /// First sector of each run -> number of sectors.
    runs: BTreeMap<u64, u64>,
}

impl BadBlocks {
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub(crate) fn ranges(&self) -> impl Iterator<Item = BadRange> + '_ {
        self.runs
            .iter()
            .map(|(&sector, &count)| BadRange { sector, count })
    }

    pub(crate) fn sector_count(&self) -> u64 {
        self.runs.values().sum()
    }

    /// Add sectors `[sector, sector + count)`, merging with neighbours.
    pub(crate) fn insert(&mut self, sector: u64, count: u64) {
        if count == 0 {
            return;
        }
        let mut start = sector;
        let mut end = sector + count;
        // Absorb every run that overlaps or touches [start, end).
        let touching: Vec<BadRange> = self.runs_touching(start, end).collect();
        for run in touching {
            start = start.min(run.sector);
            end = end.max(run.end());
            self.runs.remove(&run.sector);
        }
        self.runs.insert(start, end - start);
    }

    /// Remove sectors `[sector, sector + count)`, splitting runs as needed.
    pub(crate) fn remove(&mut self, sector: u64, count: u64) {
        let end = sector + count;
        let overlapping: Vec<BadRange> = self.runs_touching(sector, end).collect();
        for run in overlapping {
            if run.end() <= sector || run.sector >= end {
                continue; // only touching, not overlapping
            }
            self.runs.remove(&run.sector);
            if run.sector < sector {
                self.runs.insert(run.sector, sector - run.sector);
            }
            if run.end() > end {
                self.runs.insert(end, run.end() - end);
            }
        }
    }

    /// The first poisoned sector in `[start, end)`, if any.
    pub(crate) fn first_in(&self, start: u64, end: u64) -> Option<u64> {
        if let Some((&s, &c)) = self.runs.range(..=start).next_back() {
            if s + c > start {
                return Some(start);
            }
        }
        self.runs
            .range(start..end)
            .next()
            .map(|(&sector, _)| sector)
    }

    /// Every poisoned sector run that overlaps `[start, end)`, clipped to it.
    pub(crate) fn clipped(&self, start: u64, end: u64) -> Vec<BadRange> {
        self.runs_touching(start, end)
            .filter_map(|run| {
                let s = run.sector.max(start);
                let e = run.end().min(end);
                (s < e).then_some(BadRange {
                    sector: s,
                    count: e - s,
                })
            })
            .collect()
    }

    /// Runs that overlap or are adjacent to `[start, end)`.
    fn runs_touching(&self, start: u64, end: u64) -> impl Iterator<Item = BadRange> + '_ {
        let before = self
            .runs
            .range(..start)
            .next_back()
            .map(|(&sector, &count)| BadRange { sector, count })
            .filter(|run| run.end() >= start);
        let from = self
            .runs
            .range(start..=end)
            .map(|(&sector, &count)| BadRange { sector, count });
        before.into_iter().chain(from)
    }

    /// Parse the badblocks text format; `sectors` is the device size in sectors.
    pub(crate) fn parse(text: &str, path: &Path, sectors: u64) -> Result<BadBlocks> {
        let mut list = BadBlocks::default();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| Error::BadblocksFile {
                path: path.to_path_buf(),
                line: index + 1,
                reason,
            };
            let mut words = line.split_whitespace();
            let (Some(first), Some(count), None) = (words.next(), words.next(), words.next())
            else {
                return Err(bad(format!(
                    "expected `FIRST_SECTOR COUNT`, found {line:?}"
                )));
            };
            let number = |word: &str| {
                word.parse::<u64>()
                    .map_err(|_| bad(format!("{word:?} is not a sector number")))
            };
            let (first, count) = (number(first)?, number(count)?);
            if count == 0 {
                return Err(bad("a range of 0 sectors".to_string()));
            }
            if first.checked_add(count).is_none_or(|end| end > sectors) {
                return Err(bad(format!(
                    "sectors {first}+{count} lie past the end of the device ({sectors} sectors)"
                )));
            }
            list.insert(first, count);
        }
        Ok(list)
    }

    /// The text format, with a header comment.
    pub(crate) fn format(&self) -> String {
        let mut text = String::from(
            "# daxfs badblocks: FIRST_SECTOR COUNT, 512-byte sectors from the start of the device\n",
        );
        for run in self.ranges() {
            text.push_str(&format!("{} {}\n", run.sector, run.count));
        }
        text
    }
}

/// Where an emulated device's list lives: the file beside the image.
#[derive(Debug)]
pub(crate) struct Sidecar {
    path: PathBuf,
}

impl Sidecar {
    /// The badblocks file of the image at `image` (a canonical path).
    pub(crate) fn beside(image: &Path) -> Sidecar {
        let mut name = image.as_os_str().to_owned();
        name.push(".badblocks");
        Sidecar {
            path: PathBuf::from(name),
        }
    }

    pub(crate) fn at(path: PathBuf) -> Sidecar {
        Sidecar { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Read the list; a missing file is an empty list.
    pub(crate) fn load(&self, sectors: u64) -> Result<BadBlocks> {
        match fs::read_to_string(&self.path) {
            Ok(text) => BadBlocks::parse(&text, &self.path, sectors),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BadBlocks::default()),
            Err(e) => Err(Error::io(&self.path, "read the badblocks file", e)),
        }
    }

    /// Replace the file atomically with `list` (remove it when empty).
    pub(crate) fn store(&self, list: &BadBlocks) -> Result<()> {
        let io = |op, e| Error::io(&self.path, op, e);
        if list.is_empty() {
            match fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io("remove the badblocks file", e)),
            }
        } else {
            let mut tmp = self.path.as_os_str().to_owned();
            tmp.push(".tmp");
            let tmp = PathBuf::from(tmp);
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir).map_err(|e| io("create the badblocks directory", e))?;
            }
            let mut file = fs::File::create(&tmp).map_err(|e| io("write the badblocks file", e))?;
            file.write_all(list.format().as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| io("write the badblocks file", e))?;
            fs::rename(&tmp, &self.path).map_err(|e| io("replace the badblocks file", e))?;
        }
        if let Some(dir) = self.path.parent() {
            // Make the rename or removal itself durable.
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("sync the directory of the badblocks file", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn sectors(list: &BadBlocks) -> BTreeSet<u64> {
        list.ranges().flat_map(|r| r.sector..r.end()).collect()
    }

    proptest! {
        #[test]
        fn insert_and_remove_match_a_set_of_sectors(
            ops in proptest::collection::vec((any::<bool>(), 0u64..200, 1u64..20), 0..60)
        ) {
            let mut list = BadBlocks::default();
            let mut model = BTreeSet::new();
            for (add, sector, count) in ops {
                if add {
                    list.insert(sector, count);
                    model.extend(sector..sector + count);
                } else {
                    list.remove(sector, count);
                    for s in sector..sector + count { model.remove(&s); }
                }
                prop_assert_eq!(sectors(&list), model.clone());
                // Runs are disjoint and never adjacent.
                let runs: Vec<_> = list.ranges().collect();
                for pair in runs.windows(2) {
                    prop_assert!(pair[0].end() < pair[1].sector);
                }
                let start = sector.saturating_sub(7);
                let expected_first = model.range(start..sector + 9).next().copied();
                prop_assert_eq!(list.first_in(start, sector + 9), expected_first);
            }
        }
    }

    #[test]
    fn text_round_trips() {
        let mut list = BadBlocks::default();
        list.insert(8, 1);
        list.insert(100, 16);
        let parsed = BadBlocks::parse(&list.format(), Path::new("x"), 1000).unwrap();
        assert_eq!(parsed, list);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let text = "# comment\n8 1\n9 x\n";
        let err = BadBlocks::parse(text, Path::new("img.badblocks"), 100).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("img.badblocks: line 3"), "{msg}");
        assert!(msg.contains("\"x\""), "{msg}");
        let err = BadBlocks::parse("90 20\n", Path::new("b"), 100).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        let err = BadBlocks::parse("1 0\n", Path::new("b"), 100).unwrap_err();
        assert!(err.to_string().contains("0 sectors"), "{err}");
    }
}
