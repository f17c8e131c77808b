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

/// A tree that has every structure: a directory of several blocks, a
/// file with an overflow extent chain, xattrs, short and long symlinks,
/// hard links, nested directories.
struct Tree {
    img: common::Image,
    /// /big: 300 entries (three directory blocks).
    big: u64,
    /// /frag: more extents than the inode holds.
    frag: u64,
}

fn frag_bytes() -> Vec<u8> {
    (0..40 * 4096)
        .map(|i| (i / 4096 * 7 + i % 13) as u8)
        .collect()
}

fn tree() -> Tree {
    let (img, fs) = common::image_with("daxfs-fsck", 64 * MIB, &rw());
    let big = fs.mkdir_path("/big", 0o755).unwrap().ino;
    for i in 0..300 {
        let a = fs
            .create(big, format!("entry-{i:03}").as_bytes(), 0o644, 0, 0, true)
            .unwrap()
            .0;
        fs.write(a.ino, 0, format!("file {i}").as_bytes()).unwrap();
    }
    // Two files written a block at a time in turn: neither's blocks are
    // contiguous, so /frag needs an overflow chain.
    let frag = fs.create_path("/frag", 0o644, true).unwrap().ino;
    let other = fs.create_path("/other", 0o644, true).unwrap().ino;
    let data = frag_bytes();
    for (i, chunk) in data.chunks(4096).enumerate() {
        fs.write(frag, (i * 4096) as u64, chunk).unwrap();
        fs.write(other, (i * 4096) as u64, &[0xee; 4096]).unwrap();
    }
    assert!(
        fs.file_extents(frag).unwrap().len() > 8,
        "an overflow chain"
    );
    fs.mkdir_path("/e", 0o755).unwrap();
    fs.mkdir_path("/e/inner", 0o755).unwrap();
    fs.create_path("/e/inner/x", 0o644, true).unwrap();
    fs.link_path("/e/inner/x", "/e/x-link").unwrap();
    fs.symlink_path("/e/short", b"inner/x").unwrap();
    fs.symlink_path("/e/long", "t".repeat(1000).as_bytes())
        .unwrap();
    fs.setxattr(frag, b"user.colour", b"blue", false, false)
        .unwrap();
    fs.unmount().unwrap();
    drop(fs);
    Tree { img, big, frag }
}

fn open(img: &common::Image, options: &DeviceOptions) -> Device {
    Device::open(&img.path, options).unwrap()
}

fn fsck(img: &common::Image, repair: bool) -> daxfs::FsckReport {
    daxfs::fsck(open(img, &rw()), repair).unwrap().0
}

fn poke(img: &common::Image, offset: u64, bytes: &[u8]) {
    open(img, &rw()).memcpy_persist(offset, bytes).unwrap();
}

fn peek(img: &common::Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    open(img, &ro()).read(offset, &mut buf).unwrap();
    buf
}

/// One `--repair` fixes everything it reports, a check then finds the
/// image clean, and a second `--repair` changes not one byte.
fn assert_repair_converges(img: &common::Image) -> daxfs::FsckReport {
    let report = fsck(img, true);
    assert_eq!(report.exit_code(), 1, "{:#?}", report.problems);
    let after = fsck(img, false);
    assert!(after.is_clean(), "after repair: {:#?}", after.problems);
    let before = snapshot(&img.path);
    let again = fsck(img, true);
    assert!(again.is_clean(), "{:#?}", again.problems);
    assert!(
        snapshot(&img.path) == before,
        "a second repair changed the image"
    );
    report
}

/// The device block of directory `dir`'s `n`th block.
fn dir_block(img: &common::Image, dir: u64, n: usize) -> u64 {
    let fs = Fs::mount(open(img, &ro())).unwrap();
    let extents = fs.file_extents(dir).unwrap();
    let mut blocks = extents
        .iter()
        .flat_map(|e| (0..e.len / BLOCK).map(move |i| e.device_offset / BLOCK + i));
    blocks.nth(n).unwrap()
}

/// The seed report: one damaged directory block made fsck give up, naming
/// an innocent inode. Now it names the block, checks everything else, and
/// the repair keeps every entry but the damaged one, whose file goes to
/// /lost+found whole.
#[test]
fn a_damaged_directory_block_is_named_contained_and_salvaged() {
    let t = tree();
    let block = dir_block(&t.img, t.big, 1);
    // Slot 5 of the second block: the name's first byte.
    let at = block * BLOCK + 5 * 32 + 16;
    poke(&t.img, at, &[peek(&t.img, at, 1)[0] ^ 0x20]);
    let report = fsck(&t.img, false);
    assert_eq!(report.exit_code(), 4);
    let named = format!("directory block 1 of inode {}", t.big);
    assert!(
        report.problems.iter().any(|p| p.what.contains(&named)
            && p.what.contains(&format!("{:#x}", block * BLOCK + 5 * 32))),
        "{:#?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .all(|p| !p.what.starts_with(&format!("inode {} at", t.big))),
        "the directory's inode is not what is damaged: {:#?}",
        report.problems
    );
    // Mounted: the directory refuses with EIO naming the block; its inode
    // and everything else work.
    {
        let fs = Fs::mount(open(&t.img, &ro())).unwrap();
        let e = fs.readdir(t.big, 0).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains(&named), "{e}");
        assert!(fs.getattr(t.big).is_ok());
        assert_eq!(fs.read_path("/frag").unwrap(), frag_bytes());
        assert!(fs.resolve("/e/inner/x").is_ok());
    }
    let report = assert_repair_converges(&t.img);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("reconnected")),
        "{:#?}",
        report.problems
    );
    let fs = Fs::mount(open(&t.img, &rw())).unwrap();
    let left = fs.readdir(t.big, 2).unwrap();
    assert_eq!(left.len(), 299, "every other entry is kept");
    let found = fs.readdir_path("/lost+found").unwrap();
    assert_eq!(found.len(), 1);
    let content = fs
        .read_path(format!(
            "/lost+found/{}",
            String::from_utf8_lossy(&found[0].name)
        ))
        .unwrap();
    assert!(
        content.starts_with(b"file "),
        "the file is whole: {content:?}"
    );
}

/// One bit in an unused inode slot: reported, cleared by the repair (the
/// seed report: "NOT FIXED" forever).
#[test]
fn a_damaged_unused_inode_slot_is_cleared() {
    let t = tree();
    let sb = Superblock::read(&open(&t.img, &ro()), 0).unwrap();
    let slot = sb.inode_count - 10;
    poke(&t.img, sb.inode_offset(slot) + 3, &[0x40]);
    let report = fsck(&t.img, false);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains(&format!("inode {slot} "))),
        "{:#?}",
        report.problems
    );
    assert_repair_converges(&t.img);
    assert_eq!(peek(&t.img, sb.inode_offset(slot), 256), vec![0u8; 256]);
}

/// What the mount reads and fsck did not check (the seed report's blind
/// spots): an xattr block, a name holding '/' under a valid checksum, a
/// size of 2^63; and an inode of a live file with one bit flipped. Each is
/// found, named, and repaired keeping what can be kept.
#[test]
fn blind_spots_are_checked_and_repaired() {
    let t = tree();
    let dev = open(&t.img, &ro());
    let sb = Superblock::read(&dev, 0).unwrap();
    let mut raw = [0u8; 256];
    dev.read(sb.inode_offset(t.frag), &mut raw).unwrap();
    let frag = daxfs::format::Inode::decode(&raw, t.frag, 0).unwrap();
    drop(dev);
    // An xattr block: one byte of its entries.
    let xattr_at = frag.xattr_block * BLOCK + 20;
    poke(&t.img, xattr_at, &[peek(&t.img, xattr_at, 1)[0] ^ 1]);
    // A name with '/', its checksum right: the first entry of /big.
    let block = dir_block(&t.img, t.big, 0);
    let mut slot = peek(&t.img, block * BLOCK, 32);
    slot[16 + 2] = b'/';
    slot[12..16].fill(0);
    let crc = crc32c::crc32c(&slot);
    slot[12..16].copy_from_slice(&crc.to_le_bytes());
    poke(&t.img, block * BLOCK, &slot);
    // /other's size: 2^63, its checksum right.
    let other = {
        let fs = Fs::mount(open(&t.img, &ro())).unwrap();
        fs.resolve("/other").unwrap()
    };
    let mut raw = peek(&t.img, sb.inode_offset(other), 256);
    raw[16..24].copy_from_slice(&(1u64 << 63).to_le_bytes());
    let crc = crc32c::crc32c(&raw[..252]);
    raw[252..256].copy_from_slice(&crc.to_le_bytes());
    poke(&t.img, sb.inode_offset(other), &raw);
    let report = fsck(&t.img, false);
    let has = |needle: &str| report.problems.iter().any(|p| p.what.contains(needle));
    assert!(
        has(&format!("xattr block of inode {}", t.frag)),
        "{:#?}",
        report.problems
    );
    assert!(
        has(&format!("directory block 0 of inode {}", t.big)),
        "{:#?}",
        report.problems
    );
    assert!(has(&format!("inode {other} at")), "{:#?}", report.problems);
    assert_repair_converges(&t.img);
    let fs = Fs::mount(open(&t.img, &rw())).unwrap();
    assert!(fs.read_path("/frag").unwrap() == frag_bytes(), "data kept");
    assert!(
        fs.listxattr(t.frag).unwrap().is_empty(),
        "the damaged xattrs went"
    );
    let other = fs.read_path("/other").unwrap();
    assert!(
        other == vec![0xee; 40 * 4096],
        "size cut to its extents: {}",
        other.len()
    );
    assert_eq!(fs.readdir(t.big, 2).unwrap().len(), 299);
}

/// A damaged root inode and a damaged journal header: e2fsck makes both
/// anew, and so does the repair; the files the root named are in
/// /lost+found.
#[test]
fn a_damaged_root_and_journal_header_are_made_anew() {
    let t = tree();
    let sb = Superblock::read(&open(&t.img, &ro()), 0).unwrap();
    poke(&t.img, sb.inode_offset(ROOT), &[0xff; 8]);
    poke(&t.img, sb.journal_start * BLOCK, &[0xab; 128]);
    assert!(Fs::mount(open(&t.img, &rw())).is_err(), "mount refuses");
    let report = fsck(&t.img, false);
    assert_eq!(report.exit_code(), 4, "{:#?}", report.problems);
    let report = assert_repair_converges(&t.img);
    let fs = Fs::mount(open(&t.img, &rw())).unwrap();
    let found = fs.readdir_path("/lost+found").unwrap();
    assert!(found.len() >= 4, "{found:?} {:#?}", report.problems);
    let frag = found
        .iter()
        .find(|e| e.ino == t.frag)
        .expect("/frag is reconnected");
    let path = format!("/lost+found/{}", String::from_utf8_lossy(&frag.name));
    assert!(fs.read_path(path).unwrap() == frag_bytes());
}

/// A block owned by two files: the later one gets a copy, and writing
/// one no longer changes the other.
#[test]
fn a_block_owned_twice_is_cloned() {
    let t = tree();
    let (first, second) = {
        let fs = Fs::mount(open(&t.img, &ro())).unwrap();
        (fs.resolve("/frag").unwrap(), fs.resolve("/other").unwrap())
    };
    // Point /other's first extent at /frag's first block.
    let sb = Superblock::read(&open(&t.img, &ro()), 0).unwrap();
    let frag_block = {
        let fs = Fs::mount(open(&t.img, &ro())).unwrap();
        fs.file_extents(first).unwrap()[0].device_offset / BLOCK
    };
    let mut raw = peek(&t.img, sb.inode_offset(second), 256);
    raw[112 + 8..112 + 16].copy_from_slice(&frag_block.to_le_bytes());
    let crc = crc32c::crc32c(&raw[..252]);
    raw[252..256].copy_from_slice(&crc.to_le_bytes());
    poke(&t.img, sb.inode_offset(second), &raw);
    let report = fsck(&t.img, false);
    assert!(
        report.problems.iter().any(|p| p.what.contains(&format!(
            "inodes {first} and {second} both own block {frag_block}"
        ))),
        "{:#?}",
        report.problems
    );
    assert_repair_converges(&t.img);
    let fs = Fs::mount(open(&t.img, &rw())).unwrap();
    assert!(fs.read_path("/frag").unwrap() == frag_bytes());
    fs.write(second, 0, &[0x11; 4096]).unwrap();
    assert!(
        fs.read_path("/frag").unwrap() == frag_bytes(),
        "no longer shared"
    );
}

/// Rewrite inode `ino` through `change`, its checksum made right again.
fn rewrite_inode(img: &common::Image, ino: u64, change: impl FnOnce(&mut [u8])) {
    let sb = Superblock::read(&open(img, &ro()), 0).unwrap();
    let mut raw = peek(img, sb.inode_offset(ino), 256);
    change(&mut raw);
    let crc = crc32c::crc32c(&raw[..252]);
    raw[252..256].copy_from_slice(&crc.to_le_bytes());
    poke(img, sb.inode_offset(ino), &raw);
}

/// FIFOs, sockets and device nodes are checked as every inode is: a clean
/// image with them is clean; one that claims data, a FIFO with a device
/// number, or an unknown flag, is reported and repaired into what it was
/// (the device number of a device node kept), not cleared.
#[test]
fn special_files_are_checked_and_repaired() {
    let (img, fs) = common::image_with("daxfs-fsck-special", 16 * MIB, &rw());
    let null = libc::makedev(1, 3);
    let nvme = libc::makedev(259, 0x12345);
    let fifo = fs.mknod_path("/fifo", libc::S_IFIFO | 0o640, 0).unwrap();
    let chr = fs.mknod_path("/null", libc::S_IFCHR | 0o666, null).unwrap();
    let blk = fs.mknod_path("/nvme", libc::S_IFBLK | 0o660, nvme).unwrap();
    let sock = fs.mknod_path("/sock", libc::S_IFSOCK | 0o755, 0).unwrap();
    fs.link_path("/null", "/null2").unwrap();
    fs.unmount().unwrap();
    drop(fs);
    let report = fsck(&img, false);
    assert!(report.is_clean(), "{:#?}", report.problems);

    rewrite_inode(&img, fifo.ino, |raw| raw[112] = 9); // a device number
    rewrite_inode(&img, chr.ino, |raw| raw[16] = 1); // a size
    rewrite_inode(&img, blk.ino, |raw| raw[68] = 3); // extents
    rewrite_inode(&img, sock.ino, |raw| raw[61] = 1); // a flag daxfs does not know
    let report = fsck(&img, false);
    for ino in [fifo.ino, chr.ino, blk.ino, sock.ino] {
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.what.contains(&format!("inode {ino} at"))),
            "inode {ino}: {:#?}",
            report.problems
        );
    }
    assert_repair_converges(&img);
    let fs = Fs::mount(open(&img, &rw())).unwrap();
    let got = |path: &str| {
        let a = fs.getattr(fs.resolve(path).unwrap()).unwrap();
        (a.kind, a.mode, a.rdev, a.size, a.nlink)
    };
    use daxfs::FileKind::*;
    assert_eq!(got("/fifo"), (Fifo, libc::S_IFIFO | 0o640, 0, 0, 1));
    assert_eq!(
        got("/null2"),
        (CharDevice, libc::S_IFCHR | 0o666, null, 0, 2)
    );
    assert_eq!(
        got("/nvme"),
        (BlockDevice, libc::S_IFBLK | 0o660, nvme, 0, 1)
    );
    assert_eq!(got("/sock"), (Socket, libc::S_IFSOCK | 0o755, 0, 0, 1));
    assert_eq!(sock.rdev, 0);
    let kinds: Vec<_> = fs.readdir(daxfs::ROOT, 2).unwrap();
    let kind_of = |name: &[u8]| kinds.iter().find(|e| e.name == name).unwrap().kind;
    assert_eq!(
        [
            kind_of(b"fifo"),
            kind_of(b"null"),
            kind_of(b"nvme"),
            kind_of(b"sock")
        ],
        [Fifo, CharDevice, BlockDevice, Socket]
    );
}

/// A chain of xattr blocks with a damaged block in its middle: fsck names
/// the inode's xattrs, the repair drops them (the chain's blocks go back
/// to the free space) and keeps the file; a second repair changes nothing.
#[test]
fn a_damaged_block_in_an_xattr_chain_is_named_and_dropped() {
    let (img, fs) = common::image_with("daxfs-fsck-xattr", 16 * MIB, &rw());
    let f = fs.create_path("/f", 0o644, true).unwrap().ino;
    fs.write(f, 0, b"the data stays").unwrap();
    fs.setxattr(f, b"user.big", &vec![7u8; 20_000], false, false)
        .unwrap();
    let free = fs.statfs().free_blocks;
    fs.unmount().unwrap();
    drop(fs);
    let sb = Superblock::read(&open(&img, &ro()), 0).unwrap();
    let raw = peek(&img, sb.inode_offset(f), 256);
    let first = u64::from_le_bytes(raw[80..88].try_into().unwrap());
    let second = u64::from_le_bytes(peek(&img, first * BLOCK + 8, 8).try_into().unwrap());
    assert!(second != 0, "a chain");
    let at = second * BLOCK + 100;
    poke(&img, at, &[peek(&img, at, 1)[0] ^ 0x40]);
    let report = fsck(&img, false);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains(&format!("xattr block of inode {f}"))),
        "{:#?}",
        report.problems
    );
    assert_repair_converges(&img);
    let fs = Fs::mount(open(&img, &rw())).unwrap();
    assert_eq!(fs.read_path("/f").unwrap(), b"the data stays");
    assert!(fs.listxattr(f).unwrap().is_empty());
    assert_eq!(
        fs.statfs().free_blocks,
        free + 5,
        "the chain's blocks are free again"
    );
}
