//! The allocation bitmap is checksummed per block and never trusted when
//! its checksum fails: mount rebuilds the block from the inodes' extents
//! (or, when an inode cannot be read, allocates nothing from it until fsck
//! repairs it). (The seed report: zeroing 128 bytes of the bitmap, then
//! writing a 4 MiB file, silently overwrote a 3 MiB file.)

mod common;

use common::MIB;
use daxfs::format::{Superblock, BLOCK, INODE_SIZE};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::Fs;

fn open(img: &common::Image) -> Device {
    Device::open(&img.path, &DeviceOptions::new()).unwrap()
}

fn superblock(img: &common::Image) -> Superblock {
    Superblock::read(&open(img), 0).unwrap()
}

/// Write `bytes` at `offset` of the (unmounted) image.
fn poke(img: &common::Image, offset: u64, bytes: &[u8]) {
    open(img).memcpy_persist(offset, bytes).unwrap();
}

/// The mount said something holding all of `words`.
fn assert_noted(fs: &Fs, words: &[&str]) {
    assert!(
        fs.mount_notes()
            .iter()
            .any(|n| words.iter().all(|w| n.contains(w))),
        "the mount should say {words:?}: {:?}",
        fs.mount_notes()
    );
}

/// A repair fixes everything it finds, and a check then finds nothing.
fn assert_repairs(img: &common::Image) {
    let report = fsck(img, true);
    assert!(
        report.problems.iter().all(|p| p.fixed),
        "{:?}",
        report.problems
    );
    assert!(fsck(img, false).is_clean());
}

/// fsck found a problem saying `what`.
fn assert_found(report: &daxfs::FsckReport, what: &str) {
    assert!(
        report.problems.iter().any(|p| p.what.contains(what)),
        "no problem says {what:?}: {:?}",
        report.problems
    );
}

/// Unmount and let the device go.
fn done(fs: Fs) {
    fs.unmount().unwrap();
}

fn fsck(img: &common::Image, repair: bool) -> daxfs::FsckReport {
    daxfs::fsck(open(img), repair).unwrap().0
}

fn file_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// An image holding /first (3 MiB), unmounted; and the device offset of
/// the bitmap bytes that mark /first's blocks.
fn image_with_first() -> (common::Image, u64) {
    let (img, fs) = common::image_with("daxfs-bitmap", 64 * MIB, &DeviceOptions::new());
    fs.create_path("/first", 0o644, true).unwrap();
    fs.write_path("/first", 0, &file_bytes(3 << 20, 1)).unwrap();
    let ino = fs.resolve("/first").unwrap();
    let first_block = fs.file_extents(ino).unwrap()[0].device_offset / BLOCK;
    let sb = fs.superblock().clone();
    done(fs);
    (img, sb.bitmap_start * BLOCK + first_block / 8)
}

/// The seed report, on the image it describes: the zeroed bytes are found
/// and rebuilt at mount, and the new file gets blocks of its own.
#[test]
fn zeroed_bitmap_bytes_never_hand_out_a_files_blocks() {
    let (img, at) = image_with_first();
    poke(&img, at, &[0u8; 128]);
    let fs = Fs::mount(open(&img)).unwrap();
    assert_noted(&fs, &["allocation bitmap at device offset", "rebuilt"]);
    fs.create_path("/second", 0o644, true).unwrap();
    fs.write_path("/second", 0, &file_bytes(4 << 20, 2))
        .unwrap();
    assert_eq!(fs.read_path("/first").unwrap(), file_bytes(3 << 20, 1));
    assert_eq!(fs.read_path("/second").unwrap(), file_bytes(4 << 20, 2));
    done(fs);
    let report = fsck(&img, false);
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// Damage anywhere in the bitmap is caught (its checksums cover it in
/// 512-byte pieces), and so is damage to the checksum table itself.
#[test]
fn any_changed_byte_of_a_bitmap_block_or_its_checksum_is_caught() {
    let (img, _) = image_with_first();
    let sb = superblock(&img);
    assert_ne!(sb.bitmap_csum, 0, "a new image has bitmap checksums");
    let pristine = std::fs::read(&img.path).unwrap();
    let bitmap = sb.bitmap_start * BLOCK;
    for at in [
        bitmap,
        bitmap + 777,
        bitmap + BLOCK - 1,
        sb.bitmap_csum * BLOCK + 2,
    ] {
        std::fs::write(&img.path, &pristine).unwrap();
        let dev = open(&img);
        let mut b = [0u8];
        dev.read(at, &mut b).unwrap();
        dev.memcpy_persist(at, &[b[0] ^ 0x10]).unwrap();
        drop(dev);
        assert_found(&fsck(&img, false), "allocation bitmap at device offset");
        // The mount rebuilt it; a second mount finds it whole.
        done(Fs::mount(open(&img)).unwrap());
        assert!(fsck(&img, false).is_clean());
        assert_eq!(
            Fs::mount(open(&img)).unwrap().read_path("/first").unwrap(),
            file_bytes(3 << 20, 1)
        );
    }
}

/// When some inode cannot be read, what a damaged piece of the bitmap says
/// cannot be rebuilt: nothing is allocated from the blocks it covers (a new
/// file's blocks come from elsewhere, never a file's), and `fsck --repair`
/// then rebuilds it once the inode is dealt with.
#[test]
fn a_bitmap_block_that_cannot_be_rebuilt_is_not_allocated_from() {
    let (img, at) = image_with_first();
    let sb = superblock(&img);
    poke(&img, at, &[0u8; 128]);
    // A bad checksum on an unused inode slot: its blocks are unknown.
    poke(&img, sb.inode_offset(50), &[1]);
    let fs = Fs::mount(open(&img)).unwrap();
    assert_noted(&fs, &["cannot be rebuilt", "inode 50"]);
    // The piece holding /first's bits covers blocks 0 to 4095.
    let piece = (at - sb.bitmap_start * BLOCK) / 512;
    let refused = piece * 4096..(piece + 1) * 4096;
    fs.create_path("/second", 0o644, true).unwrap();
    fs.write_path("/second", 0, &file_bytes(4 << 20, 2))
        .unwrap();
    let second = fs.resolve("/second").unwrap();
    for e in fs.file_extents(second).unwrap() {
        let first = e.device_offset / BLOCK;
        assert!(
            !refused.contains(&first) && !refused.contains(&(first + e.len / BLOCK - 1)),
            "allocated from the refused piece: {e:?}"
        );
    }
    assert_eq!(fs.read_path("/first").unwrap(), file_bytes(3 << 20, 1));
    done(fs);
    // The repair clears the inode slot and rebuilds the bitmap.
    assert_repairs(&img);
    assert_eq!(
        std::fs::read(&img.path).unwrap()[sb.inode_offset(50) as usize..][..INODE_SIZE as usize],
        [0u8; INODE_SIZE as usize]
    );
    let fs = Fs::mount(open(&img)).unwrap();
    assert_eq!(fs.read_path("/first").unwrap(), file_bytes(3 << 20, 1));
    assert!(fs.read_path("/second").unwrap() == file_bytes(4 << 20, 2));
}

/// An image made before bitmap checksums (the superblock's table field is
/// 0) gets a table at its first mount, and damage is caught from then on.
#[test]
fn an_image_without_bitmap_checksums_gets_them() {
    let (img, at) = image_with_first();
    let mut sb = superblock(&img);
    let table = sb.bitmap_csum;
    sb.bitmap_csum = 0;
    poke(&img, table * BLOCK, &vec![0u8; BLOCK as usize]);
    poke(&img, sb.backup_block * BLOCK, &sb.encode());
    poke(&img, 0, &sb.encode());
    let fs = Fs::mount(open(&img)).unwrap();
    assert_noted(&fs, &["bitmap now has checksums"]);
    done(fs);
    assert_eq!(superblock(&img).bitmap_csum, table);
    assert!(fsck(&img, false).is_clean());
    poke(&img, at, &[0u8; 128]);
    assert_found(&fsck(&img, false), "allocation bitmap at device offset");
}

/// A bitmap that marks a file's blocks free under a valid checksum (no
/// checksum can catch that): the mount's cross-check of what the inodes
/// claim holds them in use, so a new file never takes them; fsck reports
/// it and the repair writes the bitmap right.
#[test]
fn a_consistently_checksummed_bitmap_lie_never_hands_out_a_files_blocks() {
    let (img, at) = image_with_first();
    let sb = superblock(&img);
    poke(&img, at, &[0u8; 128]);
    // The checksum of the piece, recomputed over the lie.
    let piece = (at - sb.bitmap_start * BLOCK) / 512;
    let mut bytes = [0u8; 512];
    open(&img)
        .read(sb.bitmap_start * BLOCK + piece * 512, &mut bytes)
        .unwrap();
    let crc = daxfs::format::bitmap_crc(piece, &bytes);
    poke(&img, sb.bitmap_csum * BLOCK + piece * 4, &crc.to_le_bytes());
    let report = fsck(&img, false);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("marked free")),
        "{:?}",
        report.problems
    );
    let fs = Fs::mount(open(&img)).unwrap();
    fs.create_path("/second", 0o644, true).unwrap();
    fs.write_path("/second", 0, &file_bytes(4 << 20, 2))
        .unwrap();
    assert!(fs.read_path("/first").unwrap() == file_bytes(3 << 20, 1));
    done(fs);
    assert_repairs(&img);
}

/// A new filesystem has its bitmap checksums from the start: its first
/// mount finds nothing to rebuild or correct.
#[test]
fn a_new_filesystem_mounts_with_nothing_to_say() {
    let (img, fs) = common::image_with("daxfs-bitmap", 64 * MIB, &DeviceOptions::new());
    assert!(fs.mount_notes().is_empty(), "{:?}", fs.mount_notes());
    done(fs);
    let fs = Fs::mount(open(&img)).unwrap();
    assert!(fs.mount_notes().is_empty(), "{:?}", fs.mount_notes());
    done(fs);
    assert!(fsck(&img, false).is_clean());
}
