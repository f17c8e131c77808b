//! The library API behaves as POSIX says, with the errnos Linux gives, and
//! what it stores survives unmount, remount and crashes.

use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Error, FileKind, Fs, RenameFlags, SetAttr, ROOT};

struct Image {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn image(size: u64) -> (Image, Fs) {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-fs")
        .tempdir_in("/dev/shm")
        .unwrap();
    let path = dir.path().join("fs.img");
    let dev = Device::create(&path, size, &DeviceOptions::new()).unwrap();
    (Image { _dir: dir, path }, Fs::format(dev).unwrap())
}

fn remount(img: &Image, fs: Fs) -> Fs {
    let dev = fs.into_device().unwrap();
    drop(dev);
    Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap()
}

/// Drop the filesystem without unmounting: what a crash after the last call
/// returned leaves.
fn crash_and_mount(img: &Image, fs: Fs) -> Fs {
    drop(fs);
    Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap()
}

fn errno<T: std::fmt::Debug>(r: Result<T, Error>) -> i32 {
    r.unwrap_err().errno()
}

#[test]
fn a_new_filesystem_has_a_root_with_lost_and_found() {
    let (_img, fs) = image(64 << 20);
    let root = fs.getattr(ROOT).unwrap();
    assert_eq!(root.kind, FileKind::Dir);
    assert_eq!(root.nlink, 3);
    let found = fs.lookup(ROOT, b"lost+found").unwrap();
    assert_eq!(found.kind, FileKind::Dir);
    assert_eq!(found.mode & 0o7777, 0o700, "as mke2fs makes it");
    assert!(fs.readdir(found.ino, 2).unwrap().is_empty());
    let names: Vec<Vec<u8>> = fs
        .readdir(ROOT, 0)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        names,
        vec![b".".to_vec(), b"..".to_vec(), b"lost+found".to_vec()]
    );
    let st = fs.statfs();
    assert!(st.free_blocks > 0 && st.free_files > 0 && st.free_huge_regions > 0);
}

#[test]
fn files_survive_remount_and_crash() {
    let (img, fs) = image(64 << 20);
    fs.mkdir_path("/docs", 0o755).unwrap();
    fs.create_path("/docs/a.txt", 0o644, true).unwrap();
    fs.write_path("/docs/a.txt", 0, b"hello, pmem").unwrap();
    fs.symlink_path("/docs/link", b"a.txt").unwrap();
    let fs = remount(&img, fs);
    assert_eq!(fs.read_path("/docs/a.txt").unwrap(), b"hello, pmem");
    fs.write_path("/docs/a.txt", 7, b"PMEM and more").unwrap();
    let fs = crash_and_mount(&img, fs);
    assert_eq!(
        fs.read_path("/docs/a.txt").unwrap(),
        b"hello, PMEM and more"
    );
    let link = fs.resolve("/docs/link").unwrap();
    assert_eq!(fs.readlink(link).unwrap(), b"a.txt");
}

#[test]
fn holes_read_as_zeros_and_sparse_files_stay_sparse() {
    let (_img, fs) = image(64 << 20);
    let (attr, _) = fs.create(ROOT, b"sparse", 0o644, 0, 0, true).unwrap();
    fs.write(attr.ino, 1 << 20, b"end").unwrap();
    let a = fs.getattr(attr.ino).unwrap();
    assert_eq!(a.size, (1 << 20) + 3);
    assert!(
        a.blocks <= 2,
        "only the written block is allocated: {}",
        a.blocks
    );
    let mut buf = vec![0xFFu8; 8192];
    assert_eq!(fs.read(attr.ino, 4096, &mut buf).unwrap(), 8192);
    assert!(buf.iter().all(|&b| b == 0));
    let mut tail = [0u8; 10];
    assert_eq!(fs.read(attr.ino, 1 << 20, &mut tail).unwrap(), 3);
    assert_eq!(&tail[..3], b"end");
    assert_eq!(fs.read(attr.ino, (1 << 20) + 3, &mut tail).unwrap(), 0);
}

#[test]
fn errnos_match_linux() {
    let (_img, fs) = image(64 << 20);
    let dir = fs.mkdir(ROOT, b"d", 0o755, 0, 0).unwrap();
    let (file, _) = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap();
    fs.create(dir.ino, b"inside", 0o644, 0, 0, true).unwrap();
    assert_eq!(errno(fs.lookup(ROOT, b"missing")), libc::ENOENT);
    assert_eq!(
        errno(fs.create(ROOT, b"f", 0o644, 0, 0, true)),
        libc::EEXIST
    );
    assert_eq!(errno(fs.mkdir(ROOT, b"d", 0o755, 0, 0)), libc::EEXIST);
    assert_eq!(errno(fs.rmdir(ROOT, b"d")), libc::ENOTEMPTY);
    assert_eq!(errno(fs.rmdir(ROOT, b"f")), libc::ENOTDIR);
    assert_eq!(errno(fs.lookup(file.ino, b"x")), libc::ENOTDIR);
    assert_eq!(errno(fs.unlink(ROOT, b"d")), libc::EISDIR);
    assert_eq!(errno(fs.write(dir.ino, 0, b"x")), libc::EISDIR);
    assert_eq!(
        errno(fs.create(ROOT, &[b'n'; 256], 0o644, 0, 0, true)),
        libc::ENAMETOOLONG
    );
    assert!(fs.create(ROOT, &[b'n'; 255], 0o644, 0, 0, true).is_ok());
    assert_eq!(
        errno(fs.rename(ROOT, b"d", dir.ino, b"sub", RenameFlags::default())),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs.rename(ROOT, b"f", ROOT, b"d", RenameFlags::default())),
        libc::EISDIR
    );
    assert_eq!(
        errno(fs.rename(ROOT, b"d", ROOT, b"f", RenameFlags::default())),
        libc::ENOTDIR
    );
    assert_eq!(errno(fs.rmdir(ROOT, b".")), libc::EINVAL);
    assert_eq!(errno(fs.getxattr(file.ino, b"user.none")), libc::ENODATA);
    assert_eq!(
        errno(fs.setxattr(file.ino, b"system.x", b"v", false, false)),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno(fs.setxattr(file.ino, b"trusted.", b"v", false, false)),
        libc::EOPNOTSUPP,
        "a namespace with no name"
    );
    // Opening an existing file without O_EXCL returns it.
    let (again, created) = fs.create(ROOT, b"f", 0o644, 0, 0, false).unwrap();
    assert_eq!((again.ino, created), (file.ino, false));
}

#[test]
fn renames_of_every_kind() {
    let (img, fs) = image(64 << 20);
    let a = fs.mkdir(ROOT, b"a", 0o755, 0, 0).unwrap();
    let b = fs.mkdir(ROOT, b"b", 0o755, 0, 0).unwrap();
    let (x, _) = fs.create(a.ino, b"x", 0o644, 0, 0, true).unwrap();
    fs.write(x.ino, 0, b"x-data").unwrap();
    // Same directory.
    fs.rename(a.ino, b"x", a.ino, b"y", RenameFlags::default())
        .unwrap();
    assert_eq!(fs.lookup(a.ino, b"y").unwrap().ino, x.ino);
    assert_eq!(errno(fs.lookup(a.ino, b"x")), libc::ENOENT);
    // Across directories.
    fs.rename(a.ino, b"y", b.ino, b"z", RenameFlags::default())
        .unwrap();
    // Over an existing file: the old target is gone.
    let (old, _) = fs.create(a.ino, b"victim", 0o644, 0, 0, true).unwrap();
    fs.rename(b.ino, b"z", a.ino, b"victim", RenameFlags::default())
        .unwrap();
    assert_eq!(fs.lookup(a.ino, b"victim").unwrap().ino, x.ino);
    assert_eq!(errno(fs.getattr(old.ino)), libc::ENOENT);
    // NOREPLACE.
    let (w, _) = fs.create(b.ino, b"w", 0o644, 0, 0, true).unwrap();
    let noreplace = RenameFlags {
        noreplace: true,
        ..Default::default()
    };
    assert_eq!(
        errno(fs.rename(b.ino, b"w", a.ino, b"victim", noreplace)),
        libc::EEXIST
    );
    // EXCHANGE.
    let exchange = RenameFlags {
        exchange: true,
        ..Default::default()
    };
    fs.rename(b.ino, b"w", a.ino, b"victim", exchange).unwrap();
    assert_eq!(fs.lookup(a.ino, b"victim").unwrap().ino, w.ino);
    assert_eq!(fs.lookup(b.ino, b"w").unwrap().ino, x.ino);
    assert_eq!(
        errno(fs.rename(b.ino, b"w", a.ino, b"nothing", exchange)),
        libc::ENOENT
    );
    // A directory moves, and the link counts follow.
    fs.mkdir(a.ino, b"sub", 0o755, 0, 0).unwrap();
    assert_eq!(fs.getattr(a.ino).unwrap().nlink, 3);
    fs.rename(a.ino, b"sub", b.ino, b"sub", RenameFlags::default())
        .unwrap();
    assert_eq!(fs.getattr(a.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(b.ino).unwrap().nlink, 3);
    let sub = fs.lookup(b.ino, b"sub").unwrap();
    assert_eq!(fs.lookup(sub.ino, b"..").unwrap().ino, b.ino);
    let fs = remount(&img, fs);
    assert_eq!(fs.read_path("/b/w").unwrap(), b"x-data");
    assert_eq!(fs.getattr(b.ino).unwrap().nlink, 3);
}

#[test]
fn links_count_names_and_the_last_unlink_frees() {
    let (_img, fs) = image(64 << 20);
    let (f, _) = fs.create(ROOT, b"one", 0o644, 0, 0, true).unwrap();
    fs.write(f.ino, 0, &vec![7u8; 100_000]).unwrap();
    let free_before = fs.statfs().free_blocks;
    fs.link(f.ino, ROOT, b"two").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().nlink, 2);
    fs.unlink(ROOT, b"one").unwrap();
    assert_eq!(fs.read_path("/two").unwrap().len(), 100_000);
    fs.unlink(ROOT, b"two").unwrap();
    assert_eq!(errno(fs.getattr(f.ino)), libc::ENOENT);
    assert!(
        fs.statfs().free_blocks > free_before,
        "the file's blocks came back"
    );
}

#[test]
fn an_unlinked_open_file_stays_usable_until_closed_and_is_reclaimed_after_a_crash() {
    let (img, fs) = image(64 << 20);
    let (f, _) = fs.create(ROOT, b"tmp", 0o644, 0, 0, true).unwrap();
    let before = fs.statfs();
    let handle = fs.open(f.ino).unwrap();
    fs.unlink(ROOT, b"tmp").unwrap();
    fs.write(f.ino, 0, &vec![7u8; 3 << 20]).unwrap();
    fs.write(f.ino, 0, b"still here").unwrap();
    fs.truncate(f.ino, 1 << 20).unwrap();
    let mut buf = [0u8; 10];
    assert_eq!(fs.read(f.ino, 0, &mut buf).unwrap(), 10);
    assert_eq!(&buf, b"still here");
    let attr = fs.getattr(f.ino).unwrap();
    assert_eq!((attr.nlink, attr.size), (0, 1 << 20));
    assert!(fs.statfs().free_blocks < before.free_blocks);
    fs.close(handle).unwrap();
    assert_eq!(errno(fs.getattr(f.ino)), libc::ENOENT);
    let after = fs.statfs();
    assert_eq!(
        after.free_blocks, before.free_blocks,
        "close freed the blocks"
    );
    assert_eq!(after.free_files, before.free_files + 1, "and the inode");

    // Crash while an unlinked file is open: the next mount reclaims it.
    let (g, _) = fs.create(ROOT, b"tmp2", 0o644, 0, 0, true).unwrap();
    fs.write(g.ino, 0, &vec![1u8; 1 << 20]).unwrap();
    let _open = fs.open(g.ino).unwrap();
    fs.unlink(ROOT, b"tmp2").unwrap();
    let free = fs.statfs().free_blocks;
    let fs = crash_and_mount(&img, fs);
    assert_eq!(errno(fs.getattr(g.ino)), libc::ENOENT);
    assert!(fs.statfs().free_blocks >= free + 256);
    assert!(
        fs.mount_notes().iter().any(|n| n.contains("orphan")),
        "{:?}",
        fs.mount_notes()
    );
}

#[test]
fn readdir_offsets_stay_valid_while_the_directory_changes() {
    let (_img, fs) = image(64 << 20);
    for i in 0..300 {
        fs.create(ROOT, format!("f{i:03}").as_bytes(), 0o644, 0, 0, true)
            .unwrap();
    }
    let first = fs.readdir(ROOT, 0).unwrap();
    let resume = first[100].next;
    // Remove some entries before and after the resume point, add new ones.
    for i in [5, 50, 250, 299] {
        fs.unlink(ROOT, format!("f{i:03}").as_bytes()).unwrap();
    }
    for i in 0..10 {
        fs.create(ROOT, format!("new{i}").as_bytes(), 0o644, 0, 0, true)
            .unwrap();
    }
    let rest: Vec<Vec<u8>> = fs
        .readdir(ROOT, resume)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let before: Vec<Vec<u8>> = first[..=100].iter().map(|e| e.name.clone()).collect();
    // Every entry that survived appears exactly once across the two reads.
    for i in 0..300 {
        let name = format!("f{i:03}").into_bytes();
        if [5, 50, 250, 299].contains(&i) {
            continue;
        }
        let seen = before.iter().filter(|n| **n == name).count()
            + rest.iter().filter(|n| **n == name).count();
        assert_eq!(seen, 1, "{}", String::from_utf8_lossy(&name));
    }
}

#[test]
fn truncate_frees_and_zeroes() {
    let (_img, fs) = image(64 << 20);
    let (f, _) = fs.create(ROOT, b"t", 0o644, 0, 0, true).unwrap();
    fs.write(f.ino, 0, &vec![9u8; 10_000]).unwrap();
    fs.truncate(f.ino, 5000).unwrap();
    fs.setattr(
        f.ino,
        &SetAttr {
            size: Some(9000),
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 9000];
    assert_eq!(fs.read(f.ino, 0, &mut buf).unwrap(), 9000);
    assert!(buf[..5000].iter().all(|&b| b == 9));
    assert!(
        buf[5000..].iter().all(|&b| b == 0),
        "bytes past an old end read as zeros"
    );
    fs.truncate(f.ino, 0).unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().blocks, 0);
}

#[test]
fn fallocate_and_punch_hole() {
    let (_img, fs) = image(64 << 20);
    let (f, _) = fs.create(ROOT, b"p", 0o644, 0, 0, true).unwrap();
    fs.fallocate(f.ino, 0, 4 << 20, false).unwrap();
    let a = fs.getattr(f.ino).unwrap();
    assert_eq!((a.size, a.blocks), (4 << 20, 1024));
    assert!(
        (fs.huge_fraction().unwrap() - 1.0).abs() < 1e-9,
        "fallocate of 4 MiB takes two 2 MiB regions"
    );
    fs.write(f.ino, 0, &vec![5u8; 3 * 4096]).unwrap();
    fs.punch_hole(f.ino, 100, 2 * 4096).unwrap();
    let mut buf = vec![0u8; 3 * 4096];
    fs.read(f.ino, 0, &mut buf).unwrap();
    assert!(buf[..100].iter().all(|&b| b == 5));
    assert!(buf[100..100 + 2 * 4096].iter().all(|&b| b == 0));
    assert!(buf[100 + 2 * 4096..].iter().all(|&b| b == 5));
    assert_eq!(
        fs.getattr(f.ino).unwrap().blocks,
        1023,
        "one whole block was freed"
    );
    fs.fallocate(f.ino, 8 << 20, 4096, true).unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().size, 4 << 20, "KEEP_SIZE");
}

#[test]
fn large_files_get_aligned_2mib_extents_and_small_ones_stay_out_of_the_way() {
    let (_img, fs) = image(64 << 20);
    let huge_before = fs.statfs().free_huge_regions;
    for i in 0..50 {
        let (f, _) = fs
            .create(ROOT, format!("small{i}").as_bytes(), 0o644, 0, 0, true)
            .unwrap();
        fs.write(f.ino, 0, &[1u8; 3000]).unwrap();
    }
    assert!(
        fs.statfs().free_huge_regions >= huge_before - 1,
        "50 small files break at most one region"
    );
    let (big, _) = fs.create(ROOT, b"big", 0o644, 0, 0, true).unwrap();
    fs.write(big.ino, 0, &vec![2u8; 6 << 20]).unwrap();
    let fraction = fs.huge_fraction().unwrap();
    assert!(fraction > 0.95, "aligned 2 MiB fraction {fraction}");
}

#[test]
fn a_full_device_gives_enospc_and_stays_usable() {
    let (img, fs) = image(32 << 20);
    let (f, _) = fs.create(ROOT, b"fill", 0o644, 0, 0, true).unwrap();
    let chunk = vec![3u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match fs.write(f.ino, written, &chunk) {
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
    };
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(fs.getattr(f.ino).unwrap().size, written);
    fs.truncate(f.ino, 0).unwrap();
    fs.create(ROOT, b"after", 0o644, 0, 0, true).unwrap();
    let fs = remount(&img, fs);
    assert!(fs.lookup(ROOT, b"after").is_ok());
}

#[test]
fn extended_attributes_round_trip() {
    let (img, fs) = image(64 << 20);
    let (f, _) = fs.create(ROOT, b"x", 0o644, 0, 0, true).unwrap();
    fs.setxattr(f.ino, b"user.color", b"blue", true, false)
        .unwrap();
    assert_eq!(
        errno(fs.setxattr(f.ino, b"user.color", b"red", true, false)),
        libc::EEXIST
    );
    assert_eq!(
        errno(fs.setxattr(f.ino, b"user.size", b"1", false, true)),
        libc::ENODATA
    );
    fs.setxattr(f.ino, b"user.size", b"big", false, false)
        .unwrap();
    let fs = remount(&img, fs);
    assert_eq!(fs.getxattr(f.ino, b"user.color").unwrap(), b"blue");
    assert_eq!(
        fs.listxattr(f.ino).unwrap(),
        vec![b"user.color".to_vec(), b"user.size".to_vec()]
    );
    fs.removexattr(f.ino, b"user.color").unwrap();
    assert_eq!(errno(fs.getxattr(f.ino, b"user.color")), libc::ENODATA);
}

#[test]
fn a_directory_of_20000_entries_works_by_name() {
    let (img, fs) = image(256 << 20);
    let dir = fs.mkdir(ROOT, b"big", 0o755, 0, 0).unwrap();
    for i in 0..20_000 {
        fs.create(dir.ino, format!("entry-{i}").as_bytes(), 0o644, 0, 0, true)
            .unwrap();
    }
    let fs = remount(&img, fs);
    for i in (0..20_000).step_by(997) {
        assert!(fs.lookup(dir.ino, format!("entry-{i}").as_bytes()).is_ok());
    }
    assert_eq!(fs.readdir(dir.ino, 0).unwrap().len(), 20_002);
}

/// Media errors are page-granular for reads, as on Linux fsdax (where
/// `dax_direct_access` refuses a page holding any bad sector): a read whose
/// first page holds poison fails with EIO, even of the page's good
/// sectors; one that reaches a poisoned page after good ones returns the
/// bytes up to that page. `read_mcsafe` reads up to the poisoned sector
/// itself. A write covering whole poisoned sectors clears them (as
/// `pmem_clear_poison`); one over part of a poisoned sector fails.
#[test]
fn poisoned_data_reads_page_granular_and_a_covering_write_clears_it() {
    let (_img, fs) = image(64 << 20);
    let (f, _) = fs.create(ROOT, b"data", 0o644, 0, 0, true).unwrap();
    fs.write(f.ino, 0, &vec![4u8; 3 * 4096]).unwrap();
    let dev = fs.device();
    let block = |page: u64| -> u64 {
        let at = page * 4096;
        let extents = fs.file_extents(f.ino).unwrap();
        let e = extents
            .iter()
            .find(|e| (e.file_offset..e.file_offset + e.len).contains(&at))
            .unwrap();
        (e.device_offset + at - e.file_offset) / 4096
    };
    // Sector 1 of the first page.
    dev.inject(block(0) * 4096 + 512, 512).unwrap();
    let mut buf = vec![0u8; 3 * 4096];
    for (offset, len) in [
        (0, 4096),
        (0, 512),
        (0, 100),
        (512, 512),
        (600, 10),
        (0, 3 * 4096),
    ] {
        assert_eq!(
            errno(fs.read(f.ino, offset, &mut buf[..len])),
            libc::EIO,
            "read of {len} at {offset}"
        );
    }
    assert_eq!(fs.read_mcsafe(f.ino, 0, &mut buf[..4096]).unwrap(), 512);
    assert_eq!(
        errno(fs.read_mcsafe(f.ino, 512, &mut buf[..4096])),
        libc::EIO
    );
    // The other pages read.
    assert_eq!(fs.read(f.ino, 4096, &mut buf[..8192]).unwrap(), 8192);
    // A write over part of the poisoned sector fails; one covering it,
    // not the page, clears it.
    assert_eq!(errno(fs.write(f.ino, 600, b"partial")), libc::EIO);
    fs.write(f.ino, 512, &[6u8; 512]).unwrap();
    assert_eq!(fs.read(f.ino, 0, &mut buf[..4096]).unwrap(), 4096);
    assert!(buf[..512].iter().all(|&b| b == 4));
    assert!(buf[512..1024].iter().all(|&b| b == 6));
    assert!(buf[1024..4096].iter().all(|&b| b == 4));
    // Two bad sectors in the last page; a read from the start stops at
    // that page; covering one of them leaves the page refused.
    dev.inject(block(2) * 4096 + 1024, 512).unwrap();
    dev.inject(block(2) * 4096 + 3072, 512).unwrap();
    assert_eq!(fs.read(f.ino, 0, &mut buf).unwrap(), 8192);
    assert_eq!(fs.read(f.ino, 100, &mut buf).unwrap(), 8192 - 100);
    assert_eq!(fs.read_mcsafe(f.ino, 0, &mut buf).unwrap(), 8192 + 1024);
    fs.write(f.ino, 8192 + 1024, &[7u8; 512]).unwrap();
    assert_eq!(errno(fs.read(f.ino, 8192, &mut buf[..512])), libc::EIO);
    assert_eq!(fs.read_mcsafe(f.ino, 8192, &mut buf).unwrap(), 3072);
    fs.write(f.ino, 8192 + 3072, &[7u8; 512]).unwrap();
    assert_eq!(fs.read(f.ino, 0, &mut buf).unwrap(), 3 * 4096);
}

#[test]
fn mount_refuses_damaged_images_and_falls_back_to_the_backup_superblock() {
    let (img, fs) = image(64 << 20);
    fs.create_path("/kept", 0o644, true).unwrap();
    let dev = fs.into_device().unwrap();
    dev.memset_persist(16, 0xAB, 8).unwrap(); // damage the primary superblock
    let fs = Fs::mount(dev).unwrap();
    assert!(
        fs.mount_notes().iter().any(|n| n.contains("backup")),
        "{:?}",
        fs.mount_notes()
    );
    assert!(fs.lookup(ROOT, b"kept").is_ok());
    let dev = fs.into_device().unwrap();
    let backup = dev.size() - 4096;
    dev.memset_persist(backup + 16, 0xAB, 8).unwrap();
    let err = Fs::mount(dev).unwrap_err();
    assert!(
        err.to_string().contains("superblock at device offset 0x0"),
        "{err}"
    );
    // A device that was never formatted.
    drop(img);
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let dev = Device::create(
        dir.path().join("blank.img"),
        16 << 20,
        &DeviceOptions::new(),
    )
    .unwrap();
    let err = Fs::mount(dev).unwrap_err();
    assert!(err.to_string().contains("not a daxfs filesystem"), "{err}");
}

#[test]
fn fsck_is_clean_after_a_busy_session_and_repairs_what_it_can() {
    let (img, fs) = image(64 << 20);
    for i in 0..20 {
        let d = fs
            .mkdir(ROOT, format!("d{i}").as_bytes(), 0o755, 0, 0)
            .unwrap();
        let (f, _) = fs.create(d.ino, b"f", 0o644, 0, 0, true).unwrap();
        fs.write(f.ino, 0, &vec![i as u8; 5000 * (i + 1)]).unwrap();
        fs.link(f.ino, ROOT, format!("l{i}").as_bytes()).unwrap();
        fs.setxattr(f.ino, b"user.k", b"v", false, false).unwrap();
    }
    for i in 0..10 {
        fs.unlink(ROOT, format!("l{i}").as_bytes()).unwrap();
        fs.rename(
            ROOT,
            format!("d{i}").as_bytes(),
            ROOT,
            format!("e{i}").as_bytes(),
            RenameFlags::default(),
        )
        .unwrap_or_else(|e| panic!("rename {i}: {e}"));
    }
    let dev = fs.into_device().unwrap();
    let (report, dev) = daxfs::fsck(dev, false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.exit_code(), 0);

    // Damage: a wrong link count (written raw, checksum fixed) and the backup superblock.
    let fs = Fs::mount(dev).unwrap();
    let ino = fs.lookup(ROOT, b"l15").unwrap().ino;
    let sb = fs.superblock().clone();
    let dev = fs.into_device().unwrap();
    let at = sb.inode_offset(ino);
    let mut raw = [0u8; 256];
    dev.read(at, &mut raw).unwrap();
    let mut inode = daxfs::format::Inode::decode(&raw, ino, at).unwrap();
    inode.nlink = 7;
    dev.memcpy_persist(at, &inode.encode()).unwrap();
    dev.memset_persist(dev.size() - 4096 + 20, 0x55, 4).unwrap();
    let (report, dev) = daxfs::fsck(dev, false).unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert_eq!(report.exit_code(), 4);
    let (report, dev) = daxfs::fsck(dev, true).unwrap();
    assert_eq!(report.exit_code(), 1, "{:?}", report.problems);
    let (report, _dev) = daxfs::fsck(dev, false).unwrap();
    assert!(report.is_clean(), "after repair: {:?}", report.problems);
    drop(img);
}

#[test]
fn poison_in_an_inode_is_eio_naming_it_and_the_inode_is_left_alone() {
    let (img, fs) = image(64 << 20);
    // Two inodes share a 512-byte sector: keep the root's sector out of it.
    for name in [b"a", b"b", b"c", b"d"] {
        fs.create(ROOT, name, 0o644, 0, 0, true).unwrap();
    }
    let (f, _) = fs.create(ROOT, b"victim", 0o644, 0, 0, true).unwrap();
    assert_eq!(f.ino % 2, 1, "the victim starts a sector");
    fs.write(f.ino, 0, b"data").unwrap();
    let offset = fs.superblock().inode_offset(f.ino);
    let dev = fs.into_device().unwrap();
    dev.inject(offset, 256).unwrap();
    let fs = Fs::mount(dev).unwrap();
    let err = fs.getattr(f.ino).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(
        err.to_string().contains(&format!("inode {}", f.ino)),
        "{err}"
    );
    assert_eq!(errno(fs.write(f.ino, 0, b"more")), libc::EIO);
    assert_eq!(
        errno(fs.unlink(ROOT, b"victim")),
        libc::EIO,
        "no change to a damaged inode"
    );
    // The rest of the filesystem carries on.
    fs.create(ROOT, b"other", 0o644, 0, 0, true).unwrap();
    drop(img);
}

#[test]
fn poison_under_a_cached_inode_fails_the_change_before_it_commits() {
    let (img, fs) = image(64 << 20);
    for name in [b"a", b"b", b"c"] {
        fs.create(ROOT, name, 0o644, 0, 0, true).unwrap();
    }
    let (f, _) = fs.create(ROOT, b"victim", 0o644, 0, 0, true).unwrap();
    // Poison arrives while the inode is cached: a change to it must fail
    // with EIO and leave nothing half-done in the journal.
    fs.device()
        .inject(fs.superblock().inode_offset(f.ino), 512)
        .unwrap();
    let set = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    assert_eq!(errno(fs.setattr(f.ino, &set)), libc::EIO);
    fs.create(ROOT, b"fine", 0o644, 0, 0, true).unwrap();
    let fs = crash_and_mount(&img, fs);
    assert!(
        fs.lookup(ROOT, b"fine").is_ok(),
        "the filesystem mounts and kept the later change"
    );
    assert_eq!(errno(fs.getattr(f.ino)), libc::EIO);
}

#[test]
fn unmount_is_refused_while_handles_are_open_waits_when_asked_and_happens_once() {
    let (img, fs) = image(64 << 20);
    let (f, _) = fs.create(ROOT, b"open", 0o644, 0, 0, true).unwrap();
    let handle = fs.open(f.ino).unwrap();
    let err = fs.unmount().unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY);
    assert!(
        err.to_string().contains(&format!(
            "1 inode referenced: inode {} (1 open handle)",
            f.ino
        )),
        "{err}"
    );
    // Still fully usable after a refused unmount.
    fs.write(f.ino, 0, b"still mounted").unwrap();
    // Waiting with a timeout that passes gives Busy; one that outlasts the
    // holder unmounts.
    assert_eq!(
        errno(fs.unmount_wait(std::time::Duration::from_millis(50))),
        libc::EBUSY
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            fs.close(handle).unwrap();
        });
        fs.unmount_wait(std::time::Duration::from_secs(10)).unwrap();
    });
    // Every later call, a second unmount included, is an error, not a crash.
    assert!(matches!(fs.unmount(), Err(Error::Unmounted)));
    assert!(matches!(fs.getattr(ROOT), Err(Error::Unmounted)));
    assert!(matches!(
        fs.create(ROOT, b"late", 0o644, 0, 0, true),
        Err(Error::Unmounted)
    ));
    // The image is clean and holds what was written.
    let (report, dev) = daxfs::fsck(fs.into_device().unwrap(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let fs = Fs::mount(dev).unwrap();
    assert_eq!(fs.read_path("/open").unwrap(), b"still mounted");
    drop(img);
}

#[test]
fn a_directory_removed_while_open_lists_nothing_and_takes_no_new_names() {
    let (img, fs) = image(64 << 20);
    let d = fs.mkdir(ROOT, b"gone", 0o755, 0, 0).unwrap();
    let handle = fs.open(d.ino).unwrap();
    fs.rmdir(ROOT, b"gone").unwrap();
    let names: Vec<Vec<u8>> = fs
        .readdir(d.ino, 2)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.is_empty(), "{names:?}");
    assert_eq!(
        errno(fs.create(d.ino, b"x", 0o644, 0, 0, true)),
        libc::ENOENT
    );
    assert_eq!(errno(fs.mkdir(d.ino, b"y", 0o755, 0, 0)), libc::ENOENT);
    let free = fs.statfs().free_files;
    fs.close(handle).unwrap();
    assert_eq!(
        fs.statfs().free_files,
        free + 1,
        "the last close frees the directory"
    );
    assert_eq!(errno(fs.getattr(d.ino)), libc::ENOENT);
    drop(img);
}

#[test]
fn open_create_truncates_and_exactly_one_of_many_racing_exclusive_creates_wins() {
    let (_img, fs) = image(64 << 20);
    let opts = daxfs::CreateOptions {
        mode: 0o644,
        ..Default::default()
    };
    let (a, h, created) = fs.open_create(ROOT, b"t", &opts).unwrap();
    assert!(created);
    fs.write(a.ino, 0, b"old contents").unwrap();
    fs.close(h).unwrap();
    let trunc = daxfs::CreateOptions {
        truncate: true,
        ..opts
    };
    let (b, h, created) = fs.open_create(ROOT, b"t", &trunc).unwrap();
    assert_eq!((b.ino, b.size, created), (a.ino, 0, false));
    fs.close(h).unwrap();

    let exclusive = daxfs::CreateOptions {
        exclusive: true,
        ..opts
    };
    for round in 0..100 {
        let name = format!("race{round}");
        let wins = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| match fs.open_create(ROOT, name.as_bytes(), &exclusive) {
                    Ok((_, h, true)) => {
                        wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        fs.close(h).unwrap();
                    }
                    Ok(other) => panic!("an exclusive create opened an existing file: {other:?}"),
                    Err(e) => assert_eq!(e.errno(), libc::EEXIST),
                });
            }
        });
        assert_eq!(
            wins.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "round {round}"
        );
    }
}

#[test]
fn the_owner_of_a_device_block_is_found() {
    let (_img, fs) = image(64 << 20);
    let (f, _) = fs.create(ROOT, b"data", 0o644, 0, 0, true).unwrap();
    fs.write(f.ino, 0, &vec![1u8; 3 * 4096]).unwrap();
    fs.write(f.ino, 1 << 20, b"far").unwrap();
    let at = fs.device_offset(f.ino, 4096 + 10).unwrap().unwrap();
    assert_eq!(
        fs.owner_of(at).unwrap(),
        daxfs::Owner::File {
            ino: f.ino,
            offset: 4096 + 10
        }
    );
    assert_eq!(fs.device_offset(f.ino, 512 << 10).unwrap(), None, "a hole");
    let extents = fs.file_extents(f.ino).unwrap();
    assert!(extents.iter().all(|e| e.len % 4096 == 0) && !extents.is_empty());
    let sb = fs.superblock().clone();
    assert!(matches!(
        fs.owner_of(sb.journal_start * 4096).unwrap(),
        daxfs::Owner::Metadata(m) if m.contains("journal")
    ));
    let last = (sb.backup_block - 1) * 4096;
    assert_eq!(fs.owner_of(last).unwrap(), daxfs::Owner::Free);
}

/// The largest file: a write, truncate or fallocate past it is EFBIG (not
/// EINVAL), and a write that crosses it writes what fits and says how
/// much, as write(2) does.
#[test]
fn past_the_largest_file_is_efbig_and_a_crossing_write_is_short() {
    let (_img, fs) = image(64 << 20);
    let f = fs.create_path("/f", 0o644, true).unwrap().ino;
    let max = daxfs::format::MAX_FILE_SIZE;
    assert_eq!(errno(fs.write(f, max, b"x")), libc::EFBIG);
    assert_eq!(errno(fs.write(f, u64::MAX - 1, b"xy")), libc::EFBIG);
    assert_eq!(errno(fs.truncate(f, max + 1)), libc::EFBIG);
    assert_eq!(errno(fs.fallocate(f, max - 4096, 8192, false)), libc::EFBIG);
    assert_eq!(fs.write(f, max - 3, b"abcdef").unwrap(), 3, "what fits");
    assert_eq!(fs.getattr(f).unwrap().size, max);
    let mut tail = [0u8; 8];
    assert_eq!(fs.read(f, max - 3, &mut tail).unwrap(), 3);
    assert_eq!(&tail[..3], b"abc");
    fs.truncate(f, max).unwrap();
}

/// A file may be as large as Linux allows (2^63 - 1 bytes, the VFS's
/// MAX_LFS_FILESIZE), sparse: blocks far past 16 TiB (whose block numbers
/// need every bit of the logical field) are written, read back across a
/// remount and a crash, punched and truncated away, and fsck stays clean.
#[test]
fn a_sparse_file_may_be_as_large_as_linux_allows() {
    let (img, fs) = image(64 << 20);
    let f = fs.create_path("/huge", 0o644, true).unwrap().ino;
    let max = i64::MAX as u64;
    assert_eq!(daxfs::format::MAX_FILE_SIZE, max);
    fs.truncate(f, max).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, max);
    // Block numbers with bits set at 32, 47, 48 and 50, and the very last.
    let at: Vec<u64> = vec![
        0,
        (1 << 32) * 4096,
        ((1 << 47) + 5) * 4096 + 100,
        ((1 << 48) + 3) * 4096,
        (1 << 50) * 4096 + 7,
        max - 5,
    ];
    for (i, &off) in at.iter().enumerate() {
        let data = format!("block {i}");
        let want = data.len().min((max - off) as usize);
        assert_eq!(fs.write(f, off, data.as_bytes()).unwrap(), want, "{off}");
    }
    assert_eq!(fs.getattr(f).unwrap().size, max);
    let check = |fs: &Fs| {
        for (i, &off) in at.iter().enumerate() {
            let data = format!("block {i}");
            let want = data.len().min((max - off) as usize);
            let mut back = vec![0u8; 16];
            let n = 16.min(max - off) as usize;
            assert_eq!(fs.read(f, off, &mut back).unwrap(), n, "{off}");
            assert_eq!(&back[..want], &data.as_bytes()[..want], "at {off}");
            assert!(back[want..n].iter().all(|&b| b == 0), "at {off}");
        }
        // A hole between them reads as zeros.
        let mut hole = [1u8; 8];
        assert_eq!(fs.read(f, (1 << 40) * 4096, &mut hole).unwrap(), 8);
        assert_eq!(hole, [0; 8]);
        assert_eq!(fs.getattr(f).unwrap().size, max);
    };
    check(&fs);
    let fs = remount(&img, fs);
    check(&fs);
    let fs = crash_and_mount(&img, fs);
    check(&fs);
    let blocks = fs.getattr(f).unwrap().blocks;
    fs.punch_hole(f, (1 << 48) * 4096, 16 * 4096).unwrap();
    let mut back = [1u8; 7];
    fs.read(f, ((1 << 48) + 3) * 4096, &mut back).unwrap();
    assert_eq!(back, [0; 7], "punched");
    assert!(fs.getattr(f).unwrap().blocks < blocks);
    fs.truncate(f, (1 << 47) * 4096).unwrap();
    fs.truncate(f, max).unwrap();
    let mut back = [1u8; 7];
    fs.read(f, (1 << 50) * 4096 + 7, &mut back).unwrap();
    assert_eq!(back, [0; 7], "truncated away");
    let fs = remount(&img, fs);
    fs.unmount().unwrap();
    let (report, _) = daxfs::fsck(fs.into_device().unwrap(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// `open(O_TMPFILE)`: an unnamed file (link count 0) is freed at its last
/// close, or named by `link` and kept; made exclusive (`O_EXCL`) it may
/// never be named, nor may an open file whose names were all removed (both
/// ENOENT, as Linux's `vfs_link`). It takes a set-group-ID directory's
/// group. A crash reclaims the unnamed ones and keeps the named one, and
/// fsck is clean.
#[test]
fn an_unnamed_file_is_freed_at_its_last_close_or_named_by_link() {
    let (img, fs) = image(64 << 20);
    let d = fs.mkdir(ROOT, b"d", 0o2755, 0, 50).unwrap().ino;
    let free = fs.statfs().free_files;
    // Never named: gone at its last close.
    let (a, h) = fs.tmpfile(d, 0o600, 7, 8, true).unwrap();
    assert_eq!(
        (a.nlink, a.kind, a.mode & 0o7777, a.uid, a.gid),
        (0, FileKind::File, 0o600, 7, 50)
    );
    fs.write(a.ino, 0, b"scratch").unwrap();
    assert_eq!(fs.readdir(d, 2).unwrap().len(), 0, "no name");
    assert_eq!(fs.statfs().free_files, free - 1);
    fs.close(h).unwrap();
    assert_eq!(fs.statfs().free_files, free, "freed at its last close");
    assert_eq!(errno(fs.getattr(a.ino)), libc::ENOENT);
    // Named by link: an ordinary file from then on, kept with its data.
    let (b, h) = fs.tmpfile(d, 0o644, 0, 0, true).unwrap();
    fs.write(b.ino, 0, b"kept").unwrap();
    assert_eq!(fs.link(b.ino, d, b"named").unwrap().nlink, 1);
    assert_eq!(fs.link(b.ino, ROOT, b"second").unwrap().nlink, 2);
    fs.unlink(ROOT, b"second").unwrap();
    fs.close(h).unwrap();
    assert_eq!(fs.read_path("/d/named").unwrap(), b"kept");
    // O_TMPFILE | O_EXCL: never linkable.
    let (c, _hc) = fs.tmpfile(d, 0o644, 0, 0, false).unwrap();
    assert_eq!(errno(fs.link(c.ino, d, b"no")), libc::ENOENT);
    // An open file whose names are gone stays unnamed.
    let e = fs.create(d, b"e", 0o644, 0, 0, true).unwrap().0.ino;
    let _he = fs.open(e).unwrap();
    fs.unlink(d, b"e").unwrap();
    assert_eq!(errno(fs.link(e, d, b"back")), libc::ENOENT);
    assert_eq!(errno(fs.lookup(d, b"back")), libc::ENOENT);
    // Not in a file, nor in a removed directory.
    assert_eq!(errno(fs.tmpfile(b.ino, 0o644, 0, 0, true)), libc::ENOTDIR);
    let gone = fs.mkdir(ROOT, b"gone", 0o755, 0, 0).unwrap().ino;
    let _hg = fs.open(gone).unwrap();
    fs.rmdir(ROOT, b"gone").unwrap();
    assert_eq!(errno(fs.tmpfile(gone, 0o644, 0, 0, true)), libc::ENOENT);
    let (f, _hf) = fs.tmpfile(d, 0o644, 0, 0, true).unwrap();
    fs.write(f.ino, 0, &[9u8; 100_000]).unwrap();
    // A crash with c, e, f and the removed directory open.
    let fs = crash_and_mount(&img, fs);
    assert_eq!(fs.read_path("/d/named").unwrap(), b"kept");
    assert_eq!(
        fs.statfs().free_files,
        free - 1,
        "only the named file is left"
    );
    fs.unmount().unwrap();
    let (report, _) = daxfs::fsck(fs.into_device().unwrap(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// SEEK_DATA and SEEK_HOLE: data from where blocks are mapped, holes
/// where none are and at the end of the file, None (ENXIO) at or past the
/// end and for data when only a hole is left; on an empty file and a
/// symlink too.
#[test]
fn seek_finds_data_and_holes_as_lseek_does() {
    use daxfs::Seek::{Data, Hole};
    let (_img, fs) = image(64 << 20);
    let f = fs.create_path("/f", 0o644, true).unwrap().ino;
    // Blocks 2..4 and 10 hold data; the size ends inside a hole after them.
    fs.write(f, 2 * 4096, &[1u8; 2 * 4096]).unwrap();
    fs.write(f, 10 * 4096 + 100, b"x").unwrap();
    fs.truncate(f, 20 * 4096 + 5).unwrap();
    let seek = |at: u64, what| fs.seek(f, at, what).unwrap();
    assert_eq!(seek(0, Data), Some(2 * 4096));
    assert_eq!(seek(0, Hole), Some(0));
    assert_eq!(seek(2 * 4096 + 7, Data), Some(2 * 4096 + 7));
    assert_eq!(seek(2 * 4096 + 7, Hole), Some(4 * 4096));
    assert_eq!(seek(5 * 4096, Data), Some(10 * 4096));
    assert_eq!(seek(10 * 4096, Hole), Some(11 * 4096));
    assert_eq!(seek(11 * 4096, Data), None, "only a hole is left");
    assert_eq!(seek(11 * 4096, Hole), Some(11 * 4096));
    assert_eq!(seek(20 * 4096 + 5, Data), None, "at the end");
    assert_eq!(seek(20 * 4096 + 5, Hole), None);
    assert_eq!(seek(u64::MAX, Hole), None);
    // Data up to the end: the hole is the end.
    let g = fs.create_path("/g", 0o644, true).unwrap().ino;
    fs.write(g, 0, &[2u8; 5000]).unwrap();
    assert_eq!(fs.seek(g, 10, Hole).unwrap(), Some(5000));
    assert_eq!(fs.seek(g, 4999, Data).unwrap(), Some(4999));
    let empty = fs.create_path("/e", 0o644, true).unwrap().ino;
    assert_eq!(fs.seek(empty, 0, Data).unwrap(), None);
    assert_eq!(fs.seek(empty, 0, Hole).unwrap(), None);
    let link = fs.symlink_path("/l", b"f").unwrap().ino;
    assert_eq!(fs.seek(link, 0, Hole).unwrap(), Some(0));
}

/// A write that runs out of space writes what fits and returns the short
/// count; only a write that can write nothing is ENOSPC. What was written
/// reads back, and the filesystem checks clean.
#[test]
fn a_write_that_runs_out_of_space_is_short_not_refused() {
    let (img, fs) = image(32 << 20);
    let f = fs.create_path("/fill", 0o644, true).unwrap().ino;
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    let n = fs.write(f, 0, &data).unwrap();
    assert!(n > 0 && n < data.len(), "short: {n}");
    let free = fs.statfs().available_blocks;
    assert!(free < 16, "what fit was written: {free} blocks left");
    let mut back = vec![0u8; n];
    assert_eq!(fs.read(f, 0, &mut back).unwrap(), n);
    assert!(back == data[..n], "what was written reads back");
    // Nothing fits at all: ENOSPC.
    let g = fs.create_path("/g", 0o644, true).unwrap().ino;
    let mut last = fs.write(g, 0, &data[..1 << 20]);
    while let Ok(k) = last {
        assert!(k > 0);
        last = fs.write(g, fs.getattr(g).unwrap().size, &data[..1 << 20]);
    }
    assert_eq!(last.unwrap_err().errno(), libc::ENOSPC);
    fs.unmount().unwrap();
    let dev = fs.into_device().unwrap();
    let (report, _) = daxfs::fsck(dev, false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    drop(img);
}

/// In a set-group-ID directory, new files take the directory's group and
/// new directories the set-group-ID bit too; elsewhere, the creator's.
#[test]
fn a_setgid_directory_passes_its_group_and_bit_on() {
    let (_img, fs) = image(64 << 20);
    let d = fs.mkdir(ROOT, b"d", 0o2775, 0, 500).unwrap();
    assert_eq!(d.mode & 0o7777, 0o2775);
    let (f, _) = fs.create(d.ino, b"f", 0o644, 1000, 1000, true).unwrap();
    assert_eq!((f.uid, f.gid), (1000, 500), "the directory's group");
    assert_eq!(fs.getattr(f.ino).unwrap().gid, 500);
    let sub = fs.mkdir(d.ino, b"sub", 0o755, 1000, 1000).unwrap();
    assert_eq!(sub.gid, 500);
    assert_eq!(sub.mode & 0o7777, 0o2755, "inherits S_ISGID");
    let l = fs.symlink(d.ino, b"l", b"f", 1000, 1000).unwrap();
    assert_eq!(l.gid, 500);
    // Not inherited past a directory without the bit.
    let plain = fs.mkdir(ROOT, b"plain", 0o755, 0, 0).unwrap();
    let (g, _) = fs.create(plain.ino, b"g", 0o644, 1000, 1000, true).unwrap();
    assert_eq!(g.gid, 1000);
}

/// The attribute flags through the library: immutable and append-only
/// refuse what Linux refuses, the calls that have no system-call check in
/// front of them (a write below the end, fallocate, punch, a writable
/// shared mapping) included; unknown flags are refused; clearing works
/// and the flags survive a crash.
#[test]
fn immutable_and_append_only_files_refuse_changes() {
    use daxfs::MapOptions;
    let (img, fs) = image(64 << 20);
    let f = fs.create_path("/f", 0o644, true).unwrap().ino;
    fs.write(f, 0, &[1u8; 8192]).unwrap();
    let eperm = libc::EPERM;
    assert_eq!(errno(fs.set_flags(f, 0x4)), libc::EOPNOTSUPP, "compression");
    assert_eq!(fs.get_flags(f).unwrap(), 0);

    fs.set_flags(f, 0x20).unwrap(); // append-only
    assert_eq!(errno(fs.write(f, 0, b"x")), eperm, "a write below the end");
    assert_eq!(fs.write(f, 8192, b"tail").unwrap(), 4, "appending");
    assert_eq!(errno(fs.truncate(f, 0)), eperm);
    assert_eq!(errno(fs.punch_hole(f, 0, 4096)), eperm);
    assert_eq!(errno(fs.fallocate(f, 0, 1 << 20, false)), eperm);
    fs.fallocate(f, 0, 1 << 20, true).unwrap(); // KEEP_SIZE is allowed
                                                // SAFETY: no slice of the mapping is ever made.
    let writable = unsafe { fs.mmap(f, 0, 4096, MapOptions::default()) };
    assert_eq!(errno(writable), eperm);
    let read_only = MapOptions {
        write: false,
        ..MapOptions::default()
    };
    // SAFETY: as above.
    drop(unsafe { fs.mmap(f, 0, 4096, read_only) }.unwrap());
    assert_eq!(errno(fs.may_open_for_write(f, false)), eperm);
    fs.may_open_for_write(f, true).unwrap();

    fs.set_flags(f, 0x10 | 0x40).unwrap(); // immutable, nodump
    assert_eq!(errno(fs.write(f, 8196, b"x")), eperm, "not even at the end");
    assert_eq!(errno(fs.may_open_for_write(f, true)), eperm);
    let chmod = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    assert_eq!(errno(fs.setattr(f, &chmod)), eperm);
    assert_eq!(errno(fs.setxattr(f, b"user.a", b"1", false, false)), eperm);
    assert_eq!(errno(fs.link(f, ROOT, b"g")), eperm);
    assert_eq!(errno(fs.unlink(ROOT, b"f")), eperm);
    let other = fs.create_path("/other", 0o644, true).unwrap().ino;
    let replace = fs.rename(ROOT, b"other", ROOT, b"f", RenameFlags::default());
    assert_eq!(errno(replace), eperm);
    let d = fs.mkdir_path("/d", 0o755).unwrap().ino;
    fs.set_flags(d, 0x10).unwrap();
    assert_eq!(errno(fs.create(d, b"n", 0o644, 0, 0, true)), eperm);
    assert_eq!(
        errno(fs.rename(ROOT, b"other", d, b"o", RenameFlags::default())),
        eperm
    );
    fs.set_flags(d, 0x20).unwrap(); // append-only: takes entries, loses none
    fs.rename(ROOT, b"other", d, b"o", RenameFlags::default())
        .unwrap();
    assert_eq!(errno(fs.unlink(d, b"o")), eperm);
    assert_eq!(fs.stat_path("/d/o").unwrap().ino, other);

    let fs = crash_and_mount(&img, fs);
    assert_eq!(fs.get_flags(f).unwrap(), 0x10 | 0x40);
    assert_eq!(fs.getattr(d).unwrap().flags, 0x20);
    fs.set_flags(f, 0).unwrap();
    fs.unlink(ROOT, b"f").unwrap();
}

/// Punching holes in a full filesystem: each punch in the middle of an
/// extent splits it, and past eight extents the file needs an overflow
/// block; that must not fail for want of the space the punch frees (it
/// used to fail with ENOSPC almost every time). The reserve it comes from
/// is not space a file can take: statfs's available blocks leave it out.
#[test]
fn punching_holes_in_a_full_filesystem_never_needs_space() {
    let (_img, fs) = image(16 << 20);
    let f = fs.create_path("/full", 0o644, true).unwrap().ino;
    let chunk = vec![5u8; 1 << 20];
    let mut size = 0u64;
    loop {
        match fs.write(f, size, &chunk) {
            Ok(n) => size += n as u64,
            Err(e) => {
                assert_eq!(e.errno(), libc::ENOSPC, "{e}");
                break;
            }
        }
    }
    let st = fs.statfs();
    assert_eq!(st.available_blocks, 0, "{st:?}");
    assert!(st.free_blocks > 0 && st.free_blocks <= 64, "{st:?}");
    let punches = (size / 8192).min(600);
    for i in 0..punches {
        fs.punch_hole(f, i * 8192 + 4096, 4096)
            .unwrap_or_else(|e| panic!("punch {i} of {punches}: {e}"));
    }
    assert!(fs.file_extents(f).unwrap().len() as u64 > punches / 2);
    let mut back = vec![0u8; size as usize];
    fs.read(f, 0, &mut back).unwrap();
    for (i, block) in back.chunks(4096).enumerate() {
        let hole = i % 2 == 1 && (i as u64) < punches * 2;
        assert!(
            block.iter().all(|&b| b == if hole { 0 } else { 5 }),
            "block {i}"
        );
    }
    let (report, _) = daxfs::fsck(fs.into_device().unwrap(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// The birth time is set when an inode is made and never changes after:
/// not by writes, new times, renames or a crash.
#[test]
fn birth_time_is_kept_from_creation() {
    let (img, fs) = image(16 << 20);
    let before = daxfs::Timestamp::now();
    let f = fs.create_path("/f", 0o644, true).unwrap();
    let d = fs.mkdir_path("/d", 0o755).unwrap();
    let born = f.btime.expect("a birth time");
    assert!(born >= before, "{born:?} < {before:?}");
    assert!(d.btime.is_some());
    fs.write(f.ino, 0, b"data").unwrap();
    let old = daxfs::Timestamp {
        secs: 1_000_000_000,
        nanos: 0,
    };
    let times = SetAttr {
        atime: Some(old),
        mtime: Some(old),
        ..Default::default()
    };
    fs.setattr(f.ino, &times).unwrap();
    fs.rename(ROOT, b"f", d.ino, b"g", RenameFlags::default())
        .unwrap();
    let fs = crash_and_mount(&img, fs);
    let after = fs.getattr(f.ino).unwrap();
    assert_eq!(after.btime, Some(born));
    assert_eq!(after.mtime, old);
    assert!(fs.getattr(ROOT).unwrap().btime.is_some(), "mkfs's root");
}

/// One inode holds far more than a block of attributes: 600 of them
/// (about 70 KiB) and a value of 64 KiB, the VFS's largest, all kept
/// across a crash; past the limit (256 KiB) a set is ENOSPC and changes
/// nothing;
/// removing them gives every block back, and fsck is clean throughout.
#[test]
fn an_inode_holds_64k_of_xattrs_and_a_64k_value() {
    let (img, fs) = image(32 << 20);
    let f = fs.create_path("/f", 0o644, true).unwrap().ino;
    let free = fs.statfs().free_blocks;
    let value = |i: usize| format!("{i:0100}").into_bytes();
    for i in 0..600 {
        fs.setxattr(f, format!("user.k{i}").as_bytes(), &value(i), false, false)
            .unwrap();
    }
    let big: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    fs.setxattr(f, b"trusted.big", &big, false, false).unwrap();
    assert_eq!(
        errno(fs.setxattr(f, b"user.huge", &[0; 65537], false, false)),
        libc::ERANGE
    );
    let fs = crash_and_mount(&img, fs);
    assert_eq!(fs.listxattr(f).unwrap().len(), 601);
    for i in [0, 299, 599] {
        assert_eq!(
            fs.getxattr(f, format!("user.k{i}").as_bytes()).unwrap(),
            value(i)
        );
    }
    assert!(fs.getxattr(f, b"trusted.big").unwrap() == big);
    let blocks = fs.getattr(f).unwrap().blocks;
    assert!(blocks >= 32, "a chain of blocks: {blocks}");
    // Up to the limit (256 KiB), then ENOSPC, and nothing changed.
    let more = vec![1u8; 60_000];
    let mut added = 0;
    let refused = loop {
        match fs.setxattr(
            f,
            format!("user.more{added}").as_bytes(),
            &more,
            false,
            false,
        ) {
            Ok(()) => added += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(refused.errno(), libc::ENOSPC);
    assert!((1..=3).contains(&added), "{added}");
    assert_eq!(fs.listxattr(f).unwrap().len(), 601 + added);
    for i in 0..600 {
        fs.removexattr(f, format!("user.k{i}").as_bytes()).unwrap();
    }
    for i in 0..added {
        fs.removexattr(f, format!("user.more{i}").as_bytes())
            .unwrap();
    }
    fs.removexattr(f, b"trusted.big").unwrap();
    assert_eq!(fs.getattr(f).unwrap().blocks, 0);
    assert_eq!(fs.statfs().free_blocks, free, "every block back");
    let (report, _) = daxfs::fsck(fs.into_device().unwrap(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// Under relatime the first read after a change updates the access time and
/// the reads right after it do not, even within one tick of the coarse clock
/// that stamped the change (the stamp a read leaves must be later than the
/// change it follows, or every read of a just-changed file is a transaction).
#[test]
fn relatime_updates_once_after_a_change_even_within_a_clock_tick() {
    let (_img, fs) = image(16 << 20);
    let f = fs.create_path("/f", 0o644, true).unwrap().ino;
    let old = daxfs::Timestamp {
        secs: 1_000_000_000,
        nanos: 0,
    };
    let mut buf = [0u8; 8];
    for round in 0..200 {
        fs.write(f, 0, b"data").unwrap();
        let times = SetAttr {
            atime: Some(old),
            mtime: Some(old),
            ..Default::default()
        };
        fs.setattr(f, &times).unwrap();
        fs.read(f, 0, &mut buf).unwrap();
        let first = fs.getattr(f).unwrap();
        assert!(first.atime > old, "round {round}: the first read updates");
        assert!(first.atime > first.ctime, "round {round}: {first:?}");
        fs.read(f, 0, &mut buf).unwrap();
        let second = fs.getattr(f).unwrap();
        assert_eq!(second.atime, first.atime, "round {round}: the second read");
    }
}

/// Files written by appends are PMD-eligible from their first byte: once an
/// append completes a 2 MiB chunk that lies in small extents (the file was
/// small when they came), the chunk moves to one aligned region. At least
/// 90% of the bytes of files of 4 MiB and more land in aligned 2 MiB
/// extents, whatever the append size; the data is unchanged, across a
/// crash; small files use the blocks they did; fsck is clean.
#[test]
fn files_written_by_appends_are_aligned_from_their_first_byte() {
    let (img, fs) = image(256 << 20);
    let aligned = |fs: &Fs, ino: u64| {
        let size = fs.getattr(ino).unwrap().size;
        let huge: u64 = fs
            .file_extents(ino)
            .unwrap()
            .iter()
            .map(|e| {
                // Whole aligned 2 MiB pieces, aligned in the file and on
                // the device.
                let mut n = 0;
                let mut at = e.file_offset.next_multiple_of(2 << 20);
                while at + (2 << 20) <= e.file_offset + e.len {
                    let dev = e.device_offset + (at - e.file_offset);
                    if dev % (2 << 20) == 0 {
                        n += 2 << 20;
                    }
                    at += 2 << 20;
                }
                n
            })
            .sum();
        huge as f64 / size as f64
    };
    let pattern = |at: u64| (at / 4096 % 251) as u8;
    let mut files = Vec::new();
    for (i, (piece, total)) in [
        (4096u64, 4 << 20),
        (65536, 4 << 20),
        (1 << 20, 4 << 20),
        (128 << 10, (6 << 20) + 100),
        (4096, 16 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let f = fs.create_path(format!("/big{i}"), 0o644, true).unwrap().ino;
        let mut at = 0u64;
        while at < total {
            let n = piece.min(total - at);
            let data: Vec<u8> = (at..at + n).map(|x| pattern(x - x % 4096)).collect();
            fs.write(f, at, &data).unwrap();
            at += n;
        }
        let fraction = aligned(&fs, f);
        assert!(
            fraction >= 0.9 * ((total / (2 << 20)) * (2 << 20)) as f64 / total as f64,
            "appends of {piece} to {total}: {fraction}"
        );
        files.push((f, total));
    }
    // Small files take one block each, as before.
    let free = fs.statfs().free_blocks;
    for i in 0..200 {
        let f = fs
            .create_path(format!("/small{i}"), 0o644, true)
            .unwrap()
            .ino;
        fs.write(f, 0, &[1u8; 3000]).unwrap();
    }
    assert!(
        free - fs.statfs().free_blocks <= 200 + 8,
        "small files grew"
    );
    let fs = crash_and_mount(&img, fs);
    for (f, total) in files {
        let mut buf = vec![0u8; total as usize];
        fs.read(f, 0, &mut buf).unwrap();
        let bad = (0..total).find(|&x| buf[x as usize] != pattern(x - x % 4096));
        assert_eq!(bad, None, "data moved wrong");
    }
    let (report, _) = daxfs::fsck(fs.into_device().unwrap(), false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}
