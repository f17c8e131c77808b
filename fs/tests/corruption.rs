//! Seeded random corruption of metadata: mount and fsck answer with errors
//! that name what is damaged, and never panic.

use daxfs::format::BLOCK;
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, Ino, ROOT};

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Use a mounted filesystem the way a program would, bounded.
fn exercise(fs: &Fs) {
    fn walk(fs: &Fs, dir: Ino, depth: u32) {
        let Ok(entries) = fs.readdir(dir, 2) else {
            return;
        };
        for e in entries.into_iter().take(100) {
            if let Ok(a) = fs.getattr(e.ino) {
                let mut buf = vec![0u8; a.size.min(1 << 20) as usize];
                let _ = fs.read(e.ino, 0, &mut buf);
                let _ = fs.readlink(e.ino);
                let _ = fs.listxattr(e.ino);
                if a.kind == daxfs::FileKind::Dir && depth < 8 && e.ino != dir {
                    walk(fs, e.ino, depth + 1);
                }
            }
        }
    }
    walk(fs, ROOT, 0);
    let _ = fs.create(ROOT, b"after-damage", 0o644, 0, 0, false);
    let _ = fs.write_path("/after-damage", 0, b"x");
    let _ = fs.unlink(ROOT, b"d1");
    let _ = fs.rename_path("/d2", "/d3", daxfs::RenameFlags::default());
}

#[test]
fn random_metadata_corruption_gives_errors_never_panics() {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-corrupt")
        .tempdir_in("/dev/shm")
        .unwrap();
    let pristine = dir.path().join("pristine.img");
    let fs =
        Fs::format(Device::create(&pristine, 16 << 20, &DeviceOptions::new()).unwrap()).unwrap();
    for i in 0..6 {
        let d = fs
            .mkdir(ROOT, format!("d{i}").as_bytes(), 0o755, 0, 0)
            .unwrap();
        for j in 0..12 {
            let (f, _) = fs
                .create(d.ino, format!("f{j}").as_bytes(), 0o644, 0, 0, true)
                .unwrap();
            fs.write(f.ino, 0, &vec![j as u8; 700 * j + 1]).unwrap();
        }
        fs.symlink(d.ino, b"link", b"f1", 0, 0).unwrap();
        fs.setxattr(d.ino, b"user.k", b"v", false, false).unwrap();
    }
    let sb = fs.superblock().clone();
    fs.into_device().unwrap();
    let bytes = std::fs::read(&pristine).unwrap();
    // The metadata regions, and the first megabyte of the data area, where
    // directory, extent and xattr blocks of this small tree live.
    let regions = [
        (0, BLOCK * 2),
        (sb.journal_start * BLOCK, sb.journal_blocks * BLOCK),
        (sb.inode_table_start * BLOCK, 100 * 256),
        (sb.bitmap_start * BLOCK, BLOCK),
        (sb.data_start * BLOCK, 1 << 20),
    ];
    let (mut refused, mut problems, mut clean) = (0, 0, 0);
    let image = dir.path().join("damaged.img");
    for seed in 0..300u64 {
        let mut rng = Rng(seed);
        let mut damaged = bytes.clone();
        for _ in 0..1 + rng.below(16) {
            let (start, len) = regions[rng.below(regions.len() as u64) as usize];
            let at = (start + rng.below(len)) as usize;
            damaged[at] ^= 1 << rng.below(8);
        }
        std::fs::write(&image, &damaged).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            let dev = Device::open(&image, &DeviceOptions::new()).unwrap();
            match daxfs::fsck(dev, false) {
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    (1, 0, 0)
                }
                Ok((report, dev)) => {
                    if let Ok(fs) = Fs::mount(dev) {
                        exercise(&fs);
                    }
                    if report.is_clean() {
                        (0, 0, 1)
                    } else {
                        (0, 1, 0)
                    }
                }
            }
        });
        match outcome {
            Ok((r, p, c)) => {
                refused += r;
                problems += p;
                clean += c;
            }
            Err(_) => panic!("seed {seed}: the filesystem panicked on a damaged image"),
        }
    }
    eprintln!("300 damaged images: {refused} refused by mount, {problems} with problems found by fsck, {clean} clean");
    assert!(
        refused + problems > 100,
        "corruption should mostly be noticed: {refused} + {problems}"
    );
}
