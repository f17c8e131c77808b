//! The state block and the orphan list it heads are checked before they are
//! trusted: a damaged state block drops its list (and is written anew), and
//! an orphan list that names anything but an allocated, unlinked inode,
//! once, is cut there; nothing past the cut is freed. (The seed reports: one
//! bit in the state block made fsck "reclaim" the root; a head pointing at
//! a live file deleted it.)

mod common;

use common::MIB;
use daxfs::format::{StateBlock, Superblock, BLOCK, STATE_LEN};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, ROOT};

/// An image with a tree, unmounted cleanly: the root, /keep (a file with
/// data), /d/inner.
fn image_with_files() -> common::Image {
    let (img, fs) = common::image_with("daxfs-orphans", 32 * MIB, &DeviceOptions::new());
    fs.create_path("/keep", 0o644, true).unwrap();
    fs.write_path("/keep", 0, &[7u8; 10_000]).unwrap();
    fs.mkdir_path("/d", 0o755).unwrap();
    fs.create_path("/d/inner", 0o644, true).unwrap();
    fs.unmount().unwrap();
    img
}

fn state_offset(img: &common::Image) -> u64 {
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    Superblock::read(&dev, 0).unwrap().state_block * BLOCK
}

/// Write `bytes` at `offset` of the (unmounted) image.
fn poke(img: &common::Image, offset: u64, bytes: &[u8]) {
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    dev.memcpy_persist(offset, bytes).unwrap();
}

/// fsck without repair: its problems.
fn problems(img: &common::Image) -> Vec<String> {
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let (report, _) = daxfs::fsck(dev, false).unwrap();
    report.problems.into_iter().map(|p| p.what).collect()
}

/// The tree is whole: the root, /keep with its bytes, /d/inner.
fn assert_tree_whole(img: &common::Image) {
    let fs = Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap();
    assert_eq!(fs.read_path("/keep").unwrap(), vec![7u8; 10_000]);
    assert!(fs.resolve("/d/inner").is_ok());
    assert_eq!(fs.getattr(ROOT).unwrap().kind, daxfs::FileKind::Dir);
    fs.unmount().unwrap();
}

#[test]
fn one_flipped_bit_in_the_state_block_is_found_and_frees_nothing() {
    let img = image_with_files();
    let at = state_offset(&img);
    // The seed report's bit: the orphan head 0 -> 1 (the root).
    poke(&img, at, &[1]);
    let found = problems(&img);
    assert!(
        found
            .iter()
            .any(|p| p.contains("state block") && p.contains("checksum")),
        "{found:?}"
    );
    assert_tree_whole(&img);
    assert!(problems(&img).is_empty(), "the block was written anew");
}

#[test]
fn an_orphan_head_naming_a_live_file_or_nothing_is_cut_not_followed() {
    for (what, head) in [
        ("the root", ROOT),
        ("a live file", 2),
        ("past the inode table", u64::MAX / 2),
        ("a free inode", 1000),
    ] {
        let img = image_with_files();
        let at = state_offset(&img);
        // A field edit with the checksum recomputed.
        let state = StateBlock { orphan_head: head };
        poke(&img, at, &state.encode());
        let found = problems(&img);
        assert!(
            found
                .iter()
                .any(|p| p.contains("orphan list") && p.contains("cut")),
            "{what}: {found:?}"
        );
        assert_tree_whole(&img);
        assert!(problems(&img).is_empty(), "{what}: contained for good");
    }
}

#[test]
fn a_valid_orphan_list_with_a_bad_tail_frees_the_valid_part_only() {
    let (img, fs) = common::image_with("daxfs-orphans", 32 * MIB, &DeviceOptions::new());
    fs.create_path("/keep", 0o644, true).unwrap();
    fs.write_path("/keep", 0, &[7u8; 10_000]).unwrap();
    fs.mkdir_path("/d", 0o755).unwrap();
    fs.create_path("/d/inner", 0o644, true).unwrap();
    let gone = fs.create_path("/gone", 0o644, true).unwrap().ino;
    fs.write_path("/gone", 0, &[1u8; 8192]).unwrap();
    let held = fs.open(gone).unwrap();
    fs.unlink_path("/gone").unwrap();
    let free = fs.statfs().free_blocks;
    // Enough changes after it that no transaction a replay would apply
    // touches its inode (the tail moves at least every 16).
    for i in 0..40 {
        fs.create_path(format!("/d/n{i}"), 0o644, true).unwrap();
    }
    let _ = held; // still open at the crash
    drop(fs); // a crash with /gone on the orphan list
              // Its next pointer now names a live file (checksum recomputed).
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let sb = Superblock::read(&dev, 0).unwrap();
    let mut state = [0u8; STATE_LEN];
    dev.read(sb.state_block * BLOCK, &mut state).unwrap();
    assert_eq!(
        StateBlock::decode(&state, 0).unwrap().orphan_head,
        gone,
        "the orphan is on the list"
    );
    let mut raw = vec![0u8; 256];
    dev.read(sb.inode_offset(gone), &mut raw).unwrap();
    let mut inode = daxfs::format::Inode::decode(&raw, gone, sb.inode_offset(gone)).unwrap();
    inode.next_orphan = 2;
    dev.memcpy_persist(sb.inode_offset(gone), &inode.encode())
        .unwrap();
    drop(dev);
    let fs = Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap();
    assert!(
        fs.mount_notes().iter().any(|n| n.contains("reclaimed 1")),
        "{:?}",
        fs.mount_notes()
    );
    assert!(fs.mount_notes().iter().any(|n| n.contains("cut")));
    assert_eq!(
        fs.statfs().free_blocks,
        free + 2,
        "the orphan's blocks freed"
    );
    fs.unmount().unwrap();
    drop(fs);
    assert_tree_whole(&img);
}

#[test]
fn a_state_block_from_before_its_checksum_still_mounts() {
    let img = image_with_files();
    let at = state_offset(&img);
    poke(&img, at, &[0u8; STATE_LEN]);
    assert!(problems(&img).is_empty());
    assert_tree_whole(&img);
}

/// Orphans leave the list in any order (the list is singly linked on
/// media; the mount keeps each one's predecessor): 500 files unlinked
/// while open are closed in a scrambled order, a crash comes halfway, and
/// the next mount reclaims exactly the rest; fsck is clean, every inode
/// is free again.
#[test]
fn orphans_closed_in_any_order_around_a_crash_are_all_reclaimed() {
    let img = image_with_files();
    let fs = Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap();
    let free_before = fs.statfs().free_files;
    let mut handles: Vec<_> = (0..500)
        .map(|i| {
            let name = format!("o{i}");
            let (a, _) = fs.create(ROOT, name.as_bytes(), 0o644, 0, 0, true).unwrap();
            fs.write(a.ino, 0, &[i as u8; 5000]).unwrap();
            let h = fs.open(a.ino).unwrap();
            fs.unlink(ROOT, name.as_bytes()).unwrap();
            h
        })
        .collect();
    // A scrambled order: head, tail and middle of the list all go.
    let mut order: Vec<usize> = (0..500).map(|i| (i * 263) % 500).collect();
    order.truncate(250);
    order.sort_unstable_by(|a, b| b.cmp(a));
    for i in order {
        fs.close(handles.remove(i)).unwrap();
    }
    assert_eq!(fs.statfs().free_files, free_before - 250);
    drop(handles);
    drop(fs); // a crash: 250 orphans still on the list
    let fs = Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap();
    assert!(
        fs.mount_notes()
            .iter()
            .any(|n| n.contains("reclaimed 250 orphaned inodes")),
        "{:?}",
        fs.mount_notes()
    );
    assert_eq!(fs.statfs().free_files, free_before);
    let (report, _) = daxfs::fsck(fs.into_device().unwrap(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}
