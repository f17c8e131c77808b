//! Journal recovery after a process crash (the filesystem dropped without
//! unmounting, as when the daemon is killed: every store reached the
//! device, nothing was checkpointed): replay never writes a stale record
//! over a block that was freed and reused, the ring is checkpointed as it
//! goes, a damaged transaction in the middle of the log is reported and the
//! filesystem marked as needing a check, and unmount leaves an empty ring.

mod common;

use common::MIB;
use daxfs::journal::{scan, LogEnd, Scan};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Error, Fs, ROOT};

/// A filesystem on a new image in /dev/shm.
fn fresh() -> (common::Image, Fs) {
    common::image_with("daxfs-recovery", 64 * MIB, &DeviceOptions::new())
}

/// Drop the filesystem as a killed process would leave it, and mount the
/// image again (checking that fsck finds it clean first).
fn crash_and_remount(img: &common::Image, fs: Fs) -> Fs {
    drop(fs);
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let (report, dev) = daxfs::fsck(dev, false).unwrap();
    assert!(report.is_clean(), "fsck after the crash: {:?}", report);
    Fs::mount(dev).unwrap()
}

/// The journal as it is on the image now (read-only).
fn journal_of(img: &common::Image) -> Scan {
    journal_on(&Device::open(&img.path, &DeviceOptions::new()).unwrap())
}

/// The journal on `dev`, read without changing it (also while mounted).
fn journal_on(dev: &Device) -> Scan {
    let sb = daxfs::format::Superblock::read(dev, 0).unwrap();
    scan(dev, sb.journal_start, sb.journal_blocks, sb.uuid).unwrap()
}

/// The seed report: a deleted file's xattr block, reused as a directory
/// block, was overwritten by the replay of the old xattr record (`ls d1`
/// gave EIO and fsck could not check the image).
#[test]
fn a_freed_xattr_block_reused_as_a_directory_block_survives_replay() {
    let (img, fs) = fresh();
    let x1 = fs.create_path("/x1", 0o644, true).unwrap().ino;
    fs.setxattr(x1, b"user.big", &[0x5a; 1500], false, false)
        .unwrap();
    fs.unlink_path("/x1").unwrap();
    fs.mkdir_path("/d1", 0o755).unwrap();
    fs.create_path("/d1/f", 0o644, true).unwrap();
    let fs = crash_and_remount(&img, fs);
    let names: Vec<Vec<u8>> = fs
        .readdir_path("/d1")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"f".to_vec()]);
    fs.unlink_path("/d1/f").unwrap();
    fs.rmdir_path("/d1").unwrap();
    fs.unmount().unwrap();
}

/// The seed report: 100 directory-entry removals replayed over the blocks
/// of the removed directory, which an fsync'd file's data had reused.
#[test]
fn fsynced_data_in_the_blocks_of_a_removed_directory_survives_replay() {
    let (img, fs) = fresh();
    fs.mkdir_path("/d", 0o755).unwrap();
    let long = "n".repeat(200);
    for i in 0..100 {
        fs.create_path(format!("/d/{long}{i}"), 0o644, true)
            .unwrap();
    }
    for i in 0..100 {
        fs.unlink_path(format!("/d/{long}{i}")).unwrap();
    }
    fs.rmdir_path("/d").unwrap();
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    let f = fs.create_path("/copy", 0o644, true).unwrap().ino;
    fs.write(f, 0, &data).unwrap();
    fs.fsync(f).unwrap();
    let fs = crash_and_remount(&img, fs);
    assert!(
        fs.read_path("/copy").unwrap() == data,
        "the fsync'd file changed"
    );
    fs.unmount().unwrap();
}

/// The zeroed edges of a punched hole go through the journal; file data
/// written over them afterwards (in place, without the journal) must not
/// be zeroed again by a replay.
#[test]
fn data_written_over_the_edge_of_a_punched_hole_survives_replay() {
    let (img, fs) = fresh();
    let f = fs.create_path("/f", 0o644, true).unwrap().ino;
    fs.write(f, 0, &[1u8; 16384]).unwrap();
    fs.punch_hole(f, 100, 8000).unwrap();
    fs.write(f, 0, &[2u8; 16384]).unwrap();
    let fs = crash_and_remount(&img, fs);
    assert!(
        fs.read_path("/f").unwrap() == vec![2u8; 16384],
        "a replayed punch zeroed newer data"
    );
    fs.unmount().unwrap();
}

/// A crash replays a bounded tail of the log, however long the mount ran.
#[test]
fn the_ring_is_checkpointed_as_it_goes() {
    let (img, fs) = fresh();
    for i in 0..2000 {
        fs.create_path(format!("/f{i}"), 0o644, true).unwrap();
        if i % 3 == 0 {
            fs.unlink_path(format!("/f{i}")).unwrap();
        }
    }
    drop(fs);
    let journal = journal_of(&img);
    assert!(
        !journal.pending.is_empty()
            && journal.pending.len() as u64 <= daxfs::journal::CHECKPOINT_EVERY,
        "{} transactions to replay after 2,667",
        journal.pending.len()
    );
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let fs = Fs::mount(dev).unwrap();
    assert_eq!(
        fs.mount_notes()[0],
        format!("replayed {} journal transactions", journal.pending.len())
    );
    let names = fs.readdir(ROOT, 0).unwrap();
    assert_eq!(
        names.iter().filter(|e| e.name.starts_with(b"f")).count(),
        1333
    );
    fs.unmount().unwrap();
    drop(fs);
    let journal = journal_of(&img);
    assert!(journal.pending.is_empty(), "unmount leaves an empty ring");
    assert_eq!(journal.end, LogEnd::Clean);
}

/// Flip one bit in the ring at `at` (a ring offset).
fn flip_ring_bit(img: &common::Image, at: u64) {
    let journal = journal_of(img);
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let mut b = [0u8; 1];
    dev.read(journal.ring + at, &mut b).unwrap();
    b[0] ^= 0x10;
    dev.memcpy_persist(journal.ring + at, &b).unwrap();
}

/// Crash with at least `n` transactions to replay; returns their ring
/// offsets and lengths.
fn crash_with_pending(n: usize) -> (common::Image, Vec<(u64, u64)>) {
    let (img, fs) = fresh();
    let mut i = 0;
    loop {
        fs.create_path(format!("/f{i}"), 0o644, true).unwrap();
        i += 1;
        if i >= n && journal_on(fs.device()).pending.len() >= n {
            break;
        }
    }
    drop(fs);
    let pending = journal_of(&img)
        .pending
        .iter()
        .map(|t| (t.pos, t.len))
        .collect();
    (img, pending)
}

/// A bit flipped in a transaction that was applied, with intact ones after
/// it, is damage, not the end of the log: mount says so and refuses until
/// fsck --repair, which clears the mark; nothing past the damage replays.
#[test]
fn a_damaged_transaction_followed_by_intact_ones_needs_a_check() {
    let (img, pending) = crash_with_pending(4);
    let (pos, len) = pending[1];
    flip_ring_bit(&img, pos + len / 2);
    let journal = journal_of(&img);
    assert!(
        matches!(journal.end, LogEnd::Damaged { later, .. } if later as usize >= pending.len() - 2),
        "{:?}",
        journal.end
    );
    for attempt in 0..2 {
        let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
        match Fs::mount(dev) {
            Err(Error::NeedsCheck(why)) => {
                assert!(why.contains("fsck --repair"), "attempt {attempt}: {why}");
                assert!(
                    why.contains("journal transaction"),
                    "attempt {attempt}: {why}"
                );
            }
            Err(e) => panic!("attempt {attempt}: mount failed otherwise: {e}"),
            Ok(_) => panic!("attempt {attempt}: a damaged journal mounted"),
        }
    }
    // A check without repair reports it and leaves the mark.
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let (report, dev) = daxfs::fsck(dev, false).unwrap();
    assert_eq!(report.exit_code(), 4, "{report:?}");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("needing a check")),
        "{report:?}"
    );
    assert!(matches!(Fs::mount(dev), Err(Error::NeedsCheck(_))));
    // Repair clears it; the filesystem mounts and is clean.
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let (report, dev) = daxfs::fsck(dev, true).unwrap();
    assert!(report.problems.iter().all(|p| p.fixed), "{report:?}");
    let (report, dev) = daxfs::fsck(dev, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let fs = Fs::mount(dev).unwrap();
    fs.create_path("/after", 0o644, true).unwrap();
    fs.unmount().unwrap();
}

/// Damage in the last transaction is a crash while it was written (torn):
/// recovery stops there without a word.
#[test]
fn a_torn_last_transaction_is_silent() {
    let (img, pending) = crash_with_pending(3);
    let &(pos, len) = pending.last().unwrap();
    flip_ring_bit(&img, pos + len - 8);
    assert!(matches!(journal_of(&img).end, LogEnd::Torn { .. }));
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let fs = Fs::mount(dev).unwrap();
    assert_eq!(
        fs.mount_notes(),
        &[format!(
            "replayed {} journal transactions",
            pending.len() - 1
        )]
    );
    fs.unmount().unwrap();
}
