//! Poison: the badblocks list, machine-check-safe reads, and SIGBUS on direct
//! loads, as Linux presents them for pmem.

mod common;

use common::{shm_dir, small_device};
use pmem::{BadRange, Device, DeviceOptions, Error, McsafeRead, SECTOR};

/// Load one byte at `offset` through the device mapping in a child process,
/// and report the signal that killed the child (None when it exited normally).
fn load_in_child(dev: &Device, offset: u64) -> Option<i32> {
    // SAFETY: only an address is computed here; the load happens in the child.
    let addr = unsafe { dev.as_ptr().add(offset as usize) };
    // SAFETY: the child only performs a volatile load and `_exit`, both
    // async-signal-safe, so forking a multi-threaded test process is sound.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: the address lies inside the device mapping the child inherited;
        // a poisoned page answers with SIGBUS, which is what is being tested.
        unsafe {
            std::ptr::read_volatile(addr);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
}

#[test]
fn inject_list_clear_round_trip() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    dev.inject(8 * SECTOR, SECTOR).unwrap();
    dev.inject(100 * SECTOR + 7, 1000).unwrap(); // overlaps sectors 100 and 101
    dev.inject(9 * SECTOR, 2 * SECTOR).unwrap(); // merges with sector 8
    assert_eq!(
        dev.badblocks(),
        vec![
            BadRange {
                sector: 8,
                count: 3
            },
            BadRange {
                sector: 100,
                count: 2
            }
        ]
    );
    assert_eq!(dev.info().poisoned_sectors, 5);
    dev.clear(9 * SECTOR, SECTOR).unwrap();
    assert_eq!(
        dev.badblocks(),
        vec![
            BadRange {
                sector: 8,
                count: 1
            },
            BadRange {
                sector: 10,
                count: 1
            },
            BadRange {
                sector: 100,
                count: 2
            }
        ]
    );
    dev.clear_all().unwrap();
    assert!(dev.badblocks().is_empty());
}

#[test]
fn the_list_survives_reopening() {
    let dir = shm_dir();
    let (dev, path) = small_device(&dir);
    dev.inject(3 << 20, 4096).unwrap();
    drop(dev);
    let sidecar = dir.path().join("pmem0.img.badblocks");
    assert!(sidecar.exists(), "the list is kept beside the image");
    let dev = Device::open(&path, &DeviceOptions::new()).unwrap();
    assert_eq!(
        dev.badblocks(),
        vec![BadRange {
            sector: (3 << 20) / SECTOR,
            count: 8
        }]
    );
    // ...and the poison is still live after the restart.
    assert_eq!(load_in_child(&dev, 3 << 20), Some(libc::SIGBUS));
    dev.clear_all().unwrap();
    drop(dev);
    assert!(!sidecar.exists(), "an empty list leaves no file");
    let dev = Device::open(&path, &DeviceOptions::new()).unwrap();
    assert!(dev.badblocks().is_empty());
}

#[test]
fn read_mcsafe_returns_exactly_the_bytes_before_the_first_poisoned_sector() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    let pattern: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
    dev.memcpy_persist(65536, &pattern).unwrap();
    dev.inject(65536 + 5 * SECTOR, 1).unwrap(); // sector 5 of the pattern
    dev.inject(65536 + 20 * SECTOR, 1).unwrap();

    for start in [0u64, 1, 511, 512, 1000, 2047, 2559] {
        let mut buf = vec![0u8; 8192];
        let read = dev.read_mcsafe(65536 + start, &mut buf).unwrap();
        let expected = 5 * SECTOR - start;
        assert_eq!(
            read,
            McsafeRead {
                copied: expected as usize,
                poison: Some(65536 + 5 * SECTOR)
            },
            "read from {start}"
        );
        assert_eq!(
            &buf[..read.copied],
            &pattern[start as usize..(5 * SECTOR) as usize]
        );
        assert!(
            buf[read.copied..].iter().all(|&b| b == 0),
            "nothing past the poison is copied"
        );
    }
    // Starting inside the poisoned sector copies nothing.
    let mut buf = [0u8; 100];
    let read = dev.read_mcsafe(65536 + 5 * SECTOR + 100, &mut buf).unwrap();
    assert_eq!(
        read,
        McsafeRead {
            copied: 0,
            poison: Some(65536 + 5 * SECTOR + 100)
        }
    );
    // Between the two poisoned sectors, in the same pages, all bytes come.
    let mut buf = vec![0u8; 14 * SECTOR as usize];
    let read = dev.read_mcsafe(65536 + 6 * SECTOR, &mut buf).unwrap();
    assert_eq!(
        read,
        McsafeRead {
            copied: buf.len(),
            poison: None
        }
    );
    assert_eq!(&buf[..], &pattern[6 * 512..20 * 512]);
    assert!(
        matches!(dev.read(65536, &mut buf), Err(Error::Poisoned { offset }) if offset == 65536 + 5 * SECTOR)
    );
}

#[test]
fn a_direct_load_of_a_poisoned_page_raises_sigbus_until_cleared() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    dev.memcpy_persist(1 << 20, &[0x5A; 4096]).unwrap();
    assert_eq!(
        load_in_child(&dev, (1 << 20) + 4000),
        None,
        "a clean page loads"
    );
    dev.inject((1 << 20) + 1024, SECTOR).unwrap();
    // Any byte of the page holding the poisoned sector raises SIGBUS...
    assert_eq!(load_in_child(&dev, (1 << 20) + 4000), Some(libc::SIGBUS));
    assert_eq!(load_in_child(&dev, 1 << 20), Some(libc::SIGBUS));
    // ...and the neighbouring pages do not.
    assert_eq!(load_in_child(&dev, (1 << 20) + 4096), None);
    assert_eq!(load_in_child(&dev, (1 << 20) - 1), None);
    dev.clear((1 << 20) + 1024, SECTOR).unwrap();
    assert_eq!(
        load_in_child(&dev, (1 << 20) + 4000),
        None,
        "clearing restores access"
    );
    // SAFETY: the page is clean again, inside the mapping, and no one writes it.
    let byte = unsafe { std::ptr::read_volatile(dev.as_ptr().add((1 << 20) + 4000)) };
    assert_eq!(byte, 0x5A, "the page's other sectors kept their contents");
    let mut sector = [0xFFu8; 512];
    dev.read((1 << 20) + 1024, &mut sector).unwrap();
    assert!(
        sector.iter().all(|&b| b == 0),
        "a cleared sector reads as zeros"
    );
}

#[test]
fn a_write_of_whole_poisoned_sectors_clears_them_and_a_partial_one_fails() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    let at = 2 << 20;
    dev.inject(at, 2 * SECTOR).unwrap();
    // Partly covering the first poisoned sector: refused, list unchanged.
    let err = dev.memcpy_persist(at + 10, &[1; 100]).unwrap_err();
    assert!(
        matches!(err, Error::PartialPoisonWrite { sector_offset } if sector_offset == at),
        "{err:?}"
    );
    // Covering the first sector whole and the second in part: refused too.
    let err = dev.memcpy_persist(at, &[1; 600]).unwrap_err();
    assert!(
        matches!(err, Error::PartialPoisonWrite { sector_offset } if sector_offset == at + SECTOR),
        "{err:?}"
    );
    assert_eq!(
        dev.badblocks(),
        vec![BadRange {
            sector: at / SECTOR,
            count: 2
        }]
    );
    // A write of a good sector in the poisoned page works and clears nothing.
    dev.memcpy_persist(at + 4 * SECTOR, &[3; 512]).unwrap();
    assert_eq!(dev.badblocks().len(), 1);
    // Covering the first sector exactly clears it and stores the data.
    dev.memcpy_persist(at, &[7; 512]).unwrap();
    assert_eq!(
        dev.badblocks(),
        vec![BadRange {
            sector: at / SECTOR + 1,
            count: 1
        }]
    );
    let mut buf = [0u8; 512];
    dev.read(at, &mut buf).unwrap();
    assert_eq!(buf, [7; 512]);
    dev.read(at + 4 * SECTOR, &mut buf).unwrap();
    assert_eq!(buf, [3; 512]);
    // A fill that covers the rest clears the page.
    dev.memset_persist(at + SECTOR - 8, 9, SECTOR + 16).unwrap();
    assert!(dev.badblocks().is_empty());
    assert_eq!(load_in_child(&dev, at), None);
}

#[test]
fn clear_takes_whole_sectors_only() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    dev.inject(0, SECTOR).unwrap();
    assert!(matches!(dev.clear(1, SECTOR), Err(Error::Unaligned { .. })));
    assert!(matches!(dev.clear(0, 100), Err(Error::Unaligned { .. })));
    assert_eq!(dev.badblocks().len(), 1);
}

#[test]
fn a_corrupt_badblocks_file_is_refused_with_its_line() {
    let dir = shm_dir();
    let (dev, path) = small_device(&dir);
    drop(dev);
    std::fs::write(dir.path().join("pmem0.img.badblocks"), "8 1\nbanana\n").unwrap();
    let msg = Device::open(&path, &DeviceOptions::new())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("pmem0.img.badblocks: line 2"), "{msg}");
}

#[test]
fn scrub_finds_all_poison_and_reports_progress() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    dev.memset_persist(4 << 20, 1, 1 << 20).unwrap(); // some data to read
    dev.inject((4 << 20) + 8192, 512).unwrap(); // in data
    dev.inject(12 << 20, 1024).unwrap(); // in a hole
    let mut last = (0, 0);
    let report = dev.scrub(&mut |done, total| last = (done, total)).unwrap();
    assert_eq!(last, (16 << 20, 16 << 20));
    assert_eq!(
        report.poisoned,
        vec![
            BadRange {
                sector: ((4 << 20) + 8192) / SECTOR,
                count: 1
            },
            BadRange {
                sector: (12 << 20) / SECTOR,
                count: 2
            }
        ]
    );
    assert!(
        report.scanned >= 1 << 20,
        "the data range was read: {}",
        report.scanned
    );
}

#[test]
fn injecting_and_clearing_while_other_threads_copy_never_faults_them() {
    // A poison change must never pull a page from under a copy in flight: if
    // it did, the copying thread would take SIGBUS and kill this process.
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    let dev = std::sync::Arc::new(dev);
    let region = 1u64 << 20;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|id| {
            let (dev, stop, started) = (dev.clone(), stop.clone(), started.clone());
            std::thread::spawn(move || {
                let page = vec![id as u8; 4096];
                let mut buf = vec![0u8; 16384];
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let at = region + (rounds % 8) * 4096;
                    // Whole pages: they clear any poison they cover.
                    dev.memcpy_persist(at, &page).unwrap();
                    let read = dev.read_mcsafe(region, &mut buf).unwrap();
                    assert!(read.copied <= buf.len());
                    rounds += 1;
                    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                rounds
            })
        })
        .collect();
    // Inject only once both workers are copying, however they are scheduled.
    while started.load(std::sync::atomic::Ordering::Relaxed) < 20 {
        std::thread::yield_now();
    }
    for i in 0..300u64 {
        let at = region + (i % 16) * SECTOR * 3;
        dev.inject(at, SECTOR).unwrap();
        if i % 3 == 0 {
            dev.clear(at, SECTOR).unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(rounds >= 20, "the workers copied while poison changed");
}
