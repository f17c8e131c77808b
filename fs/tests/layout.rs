//! Break layouts: pins of device pages for direct I/O against truncate and
//! hole punch (Linux's `dax_layout_busy_page_range`).

mod common;

use common::MIB;
use daxfs::{Error, Fs, ROOT};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn file(fs: &Fs, name: &str, byte: u8, len: u64) -> u64 {
    let ino = fs
        .create(ROOT, name.as_bytes(), 0o644, 0, 0, true)
        .unwrap()
        .0
        .ino;
    fs.write(ino, 0, &vec![byte; len as usize]).unwrap();
    ino
}

#[test]
fn truncate_and_punch_wait_for_a_pin_and_the_pinned_data_never_changes() {
    let (_img, fs) = common::image("daxfs-layout");
    let f = file(&fs, "f", 0x5A, 4 * MIB);
    let free = fs.statfs().free_blocks;
    let pin = fs.pin(f, MIB, 8192).unwrap();
    assert_eq!(pin.extents().len(), 1);
    assert_eq!(pin.extents()[0].file_offset, MIB);
    assert_eq!(pin.extents()[0].len, 8192);
    assert!(fs.unmount().is_err(), "a pin holds the inode");
    let truncated = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            fs.truncate(f, 0).unwrap();
            truncated.store(true, Ordering::SeqCst);
        });
        // Meanwhile the pinned blocks keep their data and stay allocated.
        let until = Instant::now() + Duration::from_millis(300);
        let mut buf = vec![0u8; 8192];
        while Instant::now() < until {
            pin.read(MIB, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0x5A), "pinned data changed");
            assert!(!truncated.load(Ordering::SeqCst), "truncate did not wait");
        }
        assert!(
            fs.statfs().free_blocks < free + 8 * 2,
            "freed under the pin"
        );
        drop(pin);
    });
    assert!(truncated.load(Ordering::SeqCst));
    assert_eq!(fs.getattr(f).unwrap().size, 0);
    assert_eq!(fs.statfs().free_blocks, free + 1024, "freed after the pin");

    // Hole punch: only a pin in the punched range holds it up.
    fs.write(f, 0, &vec![0x77; (4 * MIB) as usize]).unwrap();
    let outside = fs.pin(f, 3 * MIB, 4096).unwrap();
    fs.punch_hole(f, 0, MIB).unwrap(); // does not wait
    let inside = fs.pin(f, MIB + 4096, 4096).unwrap();
    let punched = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            fs.punch_hole(f, MIB, MIB).unwrap();
            punched.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!punched.load(Ordering::SeqCst), "punch did not wait");
        drop(inside);
    });
    assert!(punched.load(Ordering::SeqCst));
    let mut buf = [1u8; 4];
    fs.read(f, MIB + 4096, &mut buf).unwrap();
    assert_eq!(buf, [0; 4]);
    drop(outside);
    fs.unmount().unwrap();
}

#[test]
fn a_break_that_times_out_or_is_cancelled_frees_nothing() {
    let (_img, fs) = common::image("daxfs-layout");
    let f = file(&fs, "f", 0x42, 2 * MIB);
    let free = fs.statfs().free_blocks;
    let pin = fs.pin(f, 0, 4096).unwrap();
    fs.set_layout_timeout(Duration::from_millis(100));
    let e = fs.truncate(f, 0).unwrap_err();
    assert!(
        matches!(&e, Error::Busy(m) if m.contains("pinned") && m.contains("gave up")),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EBUSY);
    assert_eq!(fs.getattr(f).unwrap().size, 2 * MIB);
    assert_eq!(fs.statfs().free_blocks, free);
    let mut buf = vec![0u8; 4096];
    fs.read(f, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));

    fs.set_layout_timeout(Duration::from_secs(60));
    std::thread::scope(|s| {
        let waiter = s.spawn(|| fs.punch_hole(f, 0, 2 * MIB));
        // Cancel until it gives up (a cancel before it started waiting
        // does not count for it).
        while !waiter.is_finished() {
            std::thread::sleep(Duration::from_millis(20));
            fs.cancel_layout_breaks();
        }
        let e = waiter.join().unwrap().unwrap_err();
        assert!(
            matches!(&e, Error::Busy(m) if m.contains("cancelled")),
            "{e}"
        );
    });
    assert_eq!(fs.statfs().free_blocks, free);
    drop(pin);
    fs.truncate(f, 0).unwrap();
    assert_eq!(fs.statfs().free_blocks, free + 512);
    fs.unmount().unwrap();
}

/// A new pin on a file whose layout is being broken waits until the break
/// is done, and then sees the new layout.
#[test]
fn a_new_pin_waits_for_a_break_in_progress() {
    let (_img, fs) = common::image("daxfs-layout");
    let f = file(&fs, "f", 0x33, 2 * MIB);
    let first = fs.pin(f, MIB, 4096).unwrap();
    let truncated = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            fs.truncate(f, 4096).unwrap();
            truncated.store(true, Ordering::SeqCst);
        });
        // Once the truncate waits for the first pin (it holds the file's
        // layout then), a new pin must wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while fs.layout_breaks_waiting() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the truncate never waited"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let second = s.spawn(|| {
            let pin = fs.pin(f, 0, 2 * MIB).unwrap();
            pin.extents().iter().map(|e| e.len).sum::<u64>()
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!second.is_finished(), "the new pin did not wait");
        assert!(!truncated.load(Ordering::SeqCst), "truncate did not wait");
        drop(first);
        assert_eq!(
            second.join().unwrap(),
            4096,
            "the new pin sees the truncated file"
        );
    });
    fs.unmount().unwrap();
}

/// Punches race readers that pin, read through the pin and unpin, while
/// another file takes every freed block with a marker: no pinned read ever
/// sees the marker.
#[test]
fn pinned_blocks_are_never_reused_while_pinned() {
    let (_img, fs) = common::image("daxfs-layout");
    let f = file(&fs, "f", 0x11, 2 * MIB);
    let g = fs.create(ROOT, b"g", 0o644, 0, 0, true).unwrap().0.ino;
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut reads, mut holes) = (0u64, 0u64);
    std::thread::scope(|s| {
        s.spawn(|| {
            let marker = vec![0xEEu8; (2 * MIB) as usize];
            let body = vec![0x11u8; (2 * MIB) as usize];
            while Instant::now() < deadline {
                fs.punch_hole(f, 0, 2 * MIB).unwrap();
                fs.write(g, 0, &marker).unwrap();
                fs.truncate(g, 0).unwrap();
                fs.write(f, 0, &body).unwrap();
            }
            stop.store(true, Ordering::SeqCst);
        });
        let mut at = 0u64;
        let mut buf = vec![0u8; 4096];
        while !stop.load(Ordering::SeqCst) {
            let pin = fs.pin(f, at, 4096).unwrap();
            if pin.extents().is_empty() {
                holes += 1;
            } else {
                // Read, give the punching thread time to try to free and
                // reuse the block, and read again.
                for _ in 0..2 {
                    pin.read(at, &mut buf).unwrap();
                    assert!(
                        buf.iter().all(|&b| b == 0x11),
                        "offset {at}: a pinned block changed"
                    );
                    std::thread::sleep(Duration::from_micros(300));
                }
                reads += 1;
            }
            drop(pin);
            at = (at + 4096 * 37) % (2 * MIB);
        }
    });
    assert!(reads > 0, "no pinned read ({holes} holes)");
    fs.unmount().unwrap();
}

/// A lease is a pin whose holder is told when its range is about to change:
/// a truncate recalls it (Freeing) and waits until it is dropped; a lease
/// asked for while that break runs is refused at once (`Recalled`), never
/// waited for (its holder may be the one the break waits for); a write that
/// fills a hole in a leased range recalls it as FillingHoles and waits
/// until it is given back; a lease of a range nothing touches is not
/// recalled.
#[test]
fn a_lease_is_recalled_before_its_blocks_change_and_the_change_waits_for_it() {
    use daxfs::dax::{Recall, RecallKind};
    use std::sync::mpsc;
    use std::sync::Arc;
    let (_img, fs) = common::image("daxfs-lease");
    let f = file(&fs, "f", 0x33, 4 * MIB);
    let g = file(&fs, "g", 0x44, MIB);
    let (told, recalls) = mpsc::channel::<(&'static str, RecallKind)>();
    let recall = |name: &'static str| -> Recall {
        let told = std::sync::Mutex::new(told.clone());
        Arc::new(move |why| {
            told.lock().unwrap().send((name, why)).unwrap();
            true
        })
    };
    let lease = fs.lease(f, 2 * MIB, 4096, recall("f")).unwrap();
    assert_eq!(lease.extents().len(), 1);
    let other = fs.lease(g, 0, MIB, recall("g")).unwrap();
    let truncated = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            fs.truncate(f, MIB).unwrap();
            truncated.store(true, Ordering::SeqCst);
        });
        assert_eq!(
            recalls.recv_timeout(Duration::from_secs(60)).unwrap(),
            ("f", RecallKind::Freeing)
        );
        assert!(!truncated.load(Ordering::SeqCst), "freed under the lease");
        match fs.lease(f, 0, 4096, recall("again")) {
            Err(Error::Recalled) => {}
            other => panic!("a lease during the break: {other:?}"),
        }
        drop(lease);
    });
    assert!(truncated.load(Ordering::SeqCst));
    assert_eq!(fs.getattr(f).unwrap().size, MIB);

    // Filling a hole of a leased range: told, and the write waits until
    // the holder gives the lease back (its zero pages gone).
    fs.truncate(f, 4 * MIB).unwrap();
    let hole = fs.lease(f, 2 * MIB, MIB, recall("hole")).unwrap();
    assert!(hole.extents().is_empty(), "{:?}", hole.extents());
    let written = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            fs.write(f, 2 * MIB + 4096, b"fills").unwrap();
            written.store(true, Ordering::SeqCst);
        });
        assert_eq!(
            recalls.recv_timeout(Duration::from_secs(60)).unwrap(),
            ("hole", RecallKind::FillingHoles)
        );
        assert!(!written.load(Ordering::SeqCst), "filled before the answer");
        drop(hole);
    });
    assert!(written.load(Ordering::SeqCst));
    assert!(recalls.try_recv().is_err(), "g was never touched");
    drop(other);
}
