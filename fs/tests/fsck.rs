//! fsck: a check that writes nothing (and reads images nobody may write),
//! that goes on past damage and names what is damaged, and repairs that
//! converge.

mod common;

use common::MIB;
use daxfs::format::{Superblock, BLOCK};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, ROOT};
use std::path::{Path, PathBuf};

fn rw() -> DeviceOptions {
    DeviceOptions::new()
}

fn ro() -> DeviceOptions {
    DeviceOptions::new().read_only(true)
}

/// The image and its badblocks file, byte for byte.
fn snapshot(path: &Path) -> (Vec<u8>, Option<Vec<u8>>) {
    let badblocks = path.with_extension("img.badblocks");
    (std::fs::read(path).unwrap(), std::fs::read(badblocks).ok())
}

/// An immutable file (`chattr +i`), made mutable again on drop, also when
/// the test fails.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        let status = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "chattr +i {}", path.display());
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A tree, with a file unlinked while open and transactions the journal
/// has not checkpointed: the image as a crash at that moment leaves it
/// (the live image's bytes, copied).
fn crashed_image(dir: &Path) -> PathBuf {
    let (img, fs) = common::image_with("daxfs-fsck", 32 * MIB, &rw());
    fs.mkdir_path("/d", 0o755).unwrap();
    for i in 0..40 {
        let a = fs.create_path(format!("/d/f{i}"), 0o644, true).unwrap();
        fs.write(a.ino, 0, &vec![i as u8; 3000 * i + 1]).unwrap();
    }
    let (open, _) = fs.create(ROOT, b"orphan", 0o644, 0, 0, true).unwrap();
    fs.write(open.ino, 0, &[9u8; 50_000]).unwrap();
    fs.open(open.ino).unwrap();
    fs.unlink(ROOT, b"orphan").unwrap();
    fs.rename_path("/d/f1", "/d/renamed", daxfs::RenameFlags::default())
        .unwrap();
    let copy = dir.join("crashed.img");
    std::fs::write(&copy, std::fs::read(&img.path).unwrap()).unwrap();
    copy
}

/// The journal of `path` holds transactions to replay.
fn pending(path: &Path) -> usize {
    let dev = Device::open(path, &ro()).unwrap();
    let sb = Superblock::read(&dev, 0).unwrap();
    daxfs::journal::scan(&dev, sb.journal_start, sb.journal_blocks, sb.uuid)
        .unwrap()
        .pending
        .len()
}

/// The seed report: a plain fsck rewrote the journal checkpoint, replayed
/// the journal and reclaimed orphans. Now not one byte changes, through a
/// read-write device or a read-only one, on a clean image, a crashed one
/// and a damaged one; and the report is what a mount would see.
#[test]
fn a_check_changes_no_byte_of_the_image() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let crashed = crashed_image(dir.path());
    assert!(pending(&crashed) > 0, "the crash left work for the journal");
    let clean = dir.path().join("clean.img");
    {
        let fs = Fs::format(Device::create(&clean, 16 * MIB, &rw()).unwrap()).unwrap();
        fs.create_path("/x", 0o644, true).unwrap();
        fs.unmount().unwrap();
    }
    let damaged = dir.path().join("damaged.img");
    std::fs::copy(&crashed, &damaged).unwrap();
    {
        let dev = Device::open(&damaged, &rw()).unwrap();
        let sb = Superblock::read(&dev, 0).unwrap();
        dev.memcpy_persist(sb.bitmap_start * BLOCK + 700, &[0u8; 64])
            .unwrap();
        dev.memcpy_persist(sb.state_block * BLOCK + 3, &[0x55])
            .unwrap();
        dev.inject(sb.inode_offset(30), 512).unwrap();
    }
    for (image, expect_clean) in [(&clean, true), (&crashed, true), (&damaged, false)] {
        for options in [rw(), ro()] {
            let before = snapshot(image);
            let (report, dev) = daxfs::fsck(Device::open(image, &options).unwrap(), false).unwrap();
            drop(dev);
            assert_eq!(
                report.is_clean(),
                expect_clean,
                "{}: {:?}",
                image.display(),
                report.problems
            );
            assert!(snapshot(image) == before, "{} changed", image.display());
        }
    }
    // What the check saw is what a mount sees.
    let (report, _) = daxfs::fsck(Device::open(&crashed, &ro()).unwrap(), false).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("replayed")),
        "{:?}",
        report.notes
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("reclaimed 1 orphan")),
        "{:?}",
        report.notes
    );
}

/// A read-only image (immutable here, which even root cannot write) can be
/// checked and mounted read-only, with the journal replayed in memory; a
/// repair, which must write, is refused with a clear error.
#[test]
fn a_read_only_image_can_be_checked_and_mounted() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let crashed = crashed_image(dir.path());
    let before = snapshot(&crashed);
    let _immutable = Immutable::set(&crashed);
    let (report, dev) = daxfs::fsck(Device::open(&crashed, &ro()).unwrap(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let fs = Fs::mount(dev).unwrap();
    assert_eq!(fs.read_path("/d/renamed").unwrap(), vec![1u8; 3001]);
    assert_eq!(fs.read_path("/d/f39").unwrap(), vec![39u8; 3000 * 39 + 1]);
    assert!(fs.resolve("/orphan").is_err());
    // Changes stay in memory.
    fs.create_path("/new", 0o644, true).unwrap();
    fs.unmount().unwrap();
    drop(fs);
    assert!(snapshot(&crashed) == before);
    let e = daxfs::fsck(Device::open(&crashed, &ro()).unwrap(), true).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert!(Device::open(&crashed, &rw()).is_err(), "immutable");
}
