//! Crash tracking: which stores a power failure could lose, under x86's rule
//! that a store is durable only after a flush of its line and then a fence.

mod common;

use pmem::{Device, DeviceOptions};
use std::sync::{Arc, Mutex};

fn tracked() -> (tempfile::TempDir, Device) {
    let dir = common::shm_dir();
    let dev = Device::create(
        dir.path().join("crash.img"),
        16 << 20,
        &DeviceOptions::new().crash_tracking(true),
    )
    .unwrap();
    (dir, dev)
}

fn byte_at(image: &[u8], offset: u64) -> u8 {
    image[offset as usize]
}

#[test]
fn an_unflushed_store_is_lost() {
    let (_dir, dev) = tracked();
    dev.write(4096, &[1; 8]).unwrap();
    dev.drain(); // a fence alone does not make it durable
    let image = dev.with_crash_point(|p| p.image(&[]).unwrap()).unwrap();
    assert_eq!(byte_at(&image, 4096), 0);
    let pending = dev.with_crash_point(|p| p.pending()).unwrap();
    assert_eq!(pending.len(), 1);
    assert!(!pending[0].flushed);
}

#[test]
fn flushed_but_not_fenced_is_not_durable() {
    let (_dir, dev) = tracked();
    dev.write(4096, &[1; 8]).unwrap();
    dev.flush(4096, 8).unwrap();
    let image = dev.with_crash_point(|p| p.image(&[]).unwrap()).unwrap();
    assert_eq!(byte_at(&image, 4096), 0);
    assert!(dev.with_crash_point(|p| p.pending()[0].flushed).unwrap());
}

#[test]
fn flushed_and_fenced_survives() {
    let (_dir, dev) = tracked();
    dev.write(4096, &[1; 8]).unwrap();
    dev.persist(4096, 8).unwrap();
    dev.memcpy_persist(8192, &[2; 1000]).unwrap(); // the non-temporal path
    dev.memset_persist(16384, 3, 100).unwrap();
    let (image, pending) = dev
        .with_crash_point(|p| (p.image(&[]).unwrap(), p.pending()))
        .unwrap();
    assert!(pending.is_empty(), "{pending:?}");
    assert_eq!(byte_at(&image, 4096), 1);
    assert!(image[8192..9192].iter().all(|&b| b == 2));
    assert!(image[16384..16484].iter().all(|&b| b == 3));
}

#[test]
fn a_store_after_a_flush_makes_the_line_pending_again() {
    let (_dir, dev) = tracked();
    dev.memcpy_persist(0, &[1; 64]).unwrap();
    dev.write(0, &[2; 64]).unwrap();
    dev.flush(0, 64).unwrap();
    dev.write(0, &[3; 1]).unwrap();
    dev.drain();
    let image = dev.with_crash_point(|p| p.image(&[]).unwrap()).unwrap();
    assert_eq!(
        &image[..64],
        &[1; 64],
        "the line's durable contents are from the last persist"
    );
}

#[test]
fn subset_images_are_exactly_those_asked_for() {
    let (_dir, dev) = tracked();
    let lines = [0u64, 64, 4096, 1 << 20];
    for (i, &line) in lines.iter().enumerate() {
        dev.memcpy_persist(line, &[0x10; 64]).unwrap();
        dev.write(line, &[0x20 + i as u8; 64]).unwrap();
    }
    dev.with_crash_point(|point| {
        let pending: Vec<u64> = point.pending().iter().map(|l| l.offset).collect();
        assert_eq!(pending, lines);
        let mut subsets: Vec<Vec<u64>> = vec![vec![]];
        for (i, &a) in lines.iter().enumerate() {
            subsets.push(vec![a]);
            for &b in &lines[i + 1..] {
                subsets.push(vec![a, b]);
            }
        }
        assert_eq!(subsets.len(), 1 + 4 + 6);
        for subset in subsets {
            let image = point.image(&subset).unwrap();
            for (i, &line) in lines.iter().enumerate() {
                let want = if subset.contains(&line) {
                    0x20 + i as u8
                } else {
                    0x10
                };
                assert!(
                    image[line as usize..line as usize + 64]
                        .iter()
                        .all(|&b| b == want),
                    "subset {subset:?}, line {line}"
                );
            }
        }
        assert!(
            point.image(&[128]).is_err(),
            "only pending lines can be chosen"
        );
    })
    .unwrap();
}

#[test]
fn the_fence_hook_sees_each_fence_before_its_lines_retire() {
    let (_dir, dev) = tracked();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    assert!(dev.on_fence(Some(Box::new(move |point| {
        let lost = point.image(&[]).unwrap();
        log.lock()
            .unwrap()
            .push((point.fences(), point.pending().len(), lost[4096]));
    }))));
    dev.memcpy_persist(4096, &[9; 64]).unwrap();
    dev.memcpy_persist(4096, &[8; 64]).unwrap();
    dev.on_fence(None);
    // At the first fence the line was pending and a crash could lose it (0);
    // at the second, its durable value was the first persist's (9).
    assert_eq!(*seen.lock().unwrap(), vec![(0, 1, 0), (1, 1, 9)]);
}

#[test]
fn a_crash_image_opens_as_a_device() {
    let (dir, dev) = tracked();
    dev.memcpy_persist(0, b"durable").unwrap();
    dev.write(64, b"volatile").unwrap();
    let copy = dir.path().join("after-crash.img");
    dev.with_crash_point(|p| p.write_image(&[], &copy).unwrap())
        .unwrap();
    let crashed = Device::open(&copy, &DeviceOptions::new()).unwrap();
    let mut buf = [0u8; 8];
    crashed.read(0, &mut buf[..7]).unwrap();
    assert_eq!(&buf[..7], b"durable");
    crashed.read(64, &mut buf).unwrap();
    assert_eq!(buf, [0; 8]);
}

/// An image rewritten for another subset of pending lines is the image
/// that subset leaves, whichever subset it was written for before.
#[test]
fn a_rewritten_image_is_the_image_of_its_subset() {
    let (dir, dev) = tracked();
    dev.memcpy_persist(0, &[1; 256]).unwrap();
    dev.write(0, &[2; 64]).unwrap(); // pending, over a durable line
    dev.write(4096, &[3; 64]).unwrap(); // pending, over zeros
    dev.write(8192 + 64, &[4; 64]).unwrap();
    let path = dir.path().join("scratch.img");
    dev.with_crash_point(|p| {
        let lines: Vec<u64> = p.pending().iter().map(|l| l.offset).collect();
        assert_eq!(lines, [0, 4096, 8256]);
        p.write_image(&lines, &path).unwrap();
        for subset in [vec![], vec![4096], vec![0, 8256], lines.clone(), vec![0]] {
            p.rewrite_image(&subset, &path).unwrap();
            let want = p.image(&subset).unwrap();
            assert!(std::fs::read(&path).unwrap() == want, "{subset:?}");
        }
        assert!(p.rewrite_image(&[64], &path).is_err(), "not pending");
    })
    .unwrap();
}

#[test]
fn untracked_devices_have_no_crash_point() {
    let dir = common::shm_dir();
    let (dev, _) = common::small_device(&dir);
    assert!(dev.with_crash_point(|_| ()).is_none());
    assert!(!dev.on_fence(None));
}
