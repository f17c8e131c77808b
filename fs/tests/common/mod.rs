//! Helpers shared by the integration tests. (Each test binary uses some of
//! them, so the others are dead code there.)
#![allow(dead_code)]

use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, Ino, ROOT};

pub const MIB: u64 = 1 << 20;

/// A device image in a temporary directory on /dev/shm, removed on drop.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

/// A filesystem on a new image of `size` bytes made with `opts`.
pub fn image_with(prefix: &str, size: u64, opts: &DeviceOptions) -> (Image, Fs) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .unwrap();
    let path = dir.path().join("fs.img");
    let fs = Fs::format(Device::create(&path, size, opts).unwrap()).unwrap();
    (Image { dir, path }, fs)
}

/// A filesystem on a new, untracked 64 MiB image.
pub fn image(prefix: &str) -> (Image, Fs) {
    image_with(prefix, 64 * MIB, &DeviceOptions::new())
}

/// A file of `len` bytes of [`pattern`], written in one go (so 2 MiB
/// chunks get 2 MiB extents).
pub fn pattern_file(fs: &Fs, name: &str, len: u64) -> Ino {
    let ino = fs
        .create(ROOT, name.as_bytes(), 0o644, 0, 0, true)
        .unwrap()
        .0
        .ino;
    let data: Vec<u8> = (0..len).map(pattern).collect();
    fs.write(ino, 0, &data).unwrap();
    ino
}

/// The byte [`pattern_file`] puts at `at`.
pub fn pattern(at: u64) -> u8 {
    (at % 251) as u8
}

/// Group pending cache lines into the units a crash persists independently:
/// each line of a short run (metadata: journal transactions, inodes,
/// directory entries, bitmap words) on its own, and each long run (file data
/// and zeroing, more than 4 KiB) as a whole, as Chipmunk enumerates whole
/// writes. Without that, a 3 MiB fallocate alone would leave 49,152 pending
/// lines and a billion pairs.
pub fn crash_units(lines: &[u64]) -> Vec<Vec<u64>> {
    let mut runs: Vec<Vec<u64>> = Vec::new();
    for &line in lines {
        match runs.last_mut() {
            Some(run) if run.last() == Some(&(line - 64)) => run.push(line),
            _ => runs.push(vec![line]),
        }
    }
    runs.into_iter()
        .flat_map(|run| {
            if run.len() > 64 {
                vec![run]
            } else {
                run.into_iter().map(|l| vec![l]).collect()
            }
        })
        .collect()
}

/// SplitMix64: small, seedable, good enough to drive model and crash tests.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A number from `lo` to `hi`, both included.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}
