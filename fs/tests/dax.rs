//! DAX mappings through the library: PMD and PTE faults, the zero page,
//! fallbacks, SIGBUS past the end, private and shared mappings.

mod common;

use common::{pattern, MIB};

use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, MapOptions, ROOT};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Run `f` in a forked child; the signal that ended it (0: none).
fn in_child(f: impl FnOnce()) -> i32 {
    // SAFETY: the child only runs `f` (loads and stores to mappings that
    // are already faulted in or fault through no lock another thread can
    // hold at fork) and exits.
    match unsafe { libc::fork() } {
        0 => {
            f();
            // SAFETY: leave the child without running the parent's atexit.
            unsafe { libc::_exit(0) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFSIGNALED(status) {
                libc::WTERMSIG(status)
            } else {
                0
            }
        }
    }
}

#[test]
fn an_aligned_file_in_2mib_extents_takes_pmd_faults_only() {
    let (_img, fs) = common::image("daxfs-dax");
    let ino = common::pattern_file(&fs, "big", 4 * MIB);
    let before = fs.dax_stats();
    // SAFETY: nothing else changes the file while the mapping is read.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    for at in (0..4 * MIB).step_by(4096) {
        assert_eq!(map[at as usize], pattern(at), "byte {at}");
    }
    let after = fs.dax_stats();
    assert_eq!(after.pmd_faults - before.pmd_faults, 2, "{after:?}");
    assert_eq!(after.pte_faults, before.pte_faults, "{after:?}");
    // Where the backing can map 2 MiB pages, the kernel really does.
    let info = fs.device().info();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let base = map.as_ptr() as usize;
    let huge_kb = smaps_field(&smaps, base, &["FilePmdMapped:", "ShmemPmdMapped:"]);
    if info.huge_pages.capable {
        assert!(huge_kb >= 2048, "PMD-mapped: {huge_kb} kB");
    } else {
        eprintln!(
            "skipping the smaps check: the backing cannot map 2 MiB pages ({})",
            info.huge_pages.reason
        );
    }
    drop(map);
    fs.unmount().unwrap();
}

/// The sum of `fields` (kB) over the smaps entries from `base` on.
fn smaps_field(smaps: &str, base: usize, fields: &[&str]) -> u64 {
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = usize::from_str_radix(start, 16) {
                    inside = start >= base && start < base + (4 * MIB) as usize;
                    continue;
                }
            }
        }
        if inside {
            for f in fields {
                if let Some(rest) = line.strip_prefix(f) {
                    total += rest
                        .trim()
                        .trim_end_matches(" kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0);
                }
            }
        }
    }
    total
}

#[test]
fn each_fallback_takes_the_pte_path_and_is_counted() {
    let (_img, fs) = common::image("daxfs-dax");
    let ino = common::pattern_file(&fs, "big", 4 * MIB);
    let opts = MapOptions::default();

    // Misaligned: the mapping starts 4 KiB into the first 2 MiB.
    let s = fs.dax_stats();
    // SAFETY (all mappings here): nothing else changes the bytes read.
    let map = unsafe { fs.mmap(ino, 4096, 4 * MIB - 4096, opts) }.unwrap();
    assert_eq!(map[0], pattern(4096));
    let d = fs.dax_stats();
    assert_eq!(
        (
            d.fallback_misaligned - s.fallback_misaligned,
            d.pte_faults - s.pte_faults
        ),
        (1, 1)
    );
    drop(map);

    // A PTE entry at page 1023, then a PMD fault at 512: the seed regression.
    // SAFETY: as above: nothing else changes the bytes this test reads.
    let one = unsafe { fs.mmap(ino, 1023 * 4096, 4096, opts) }.unwrap();
    assert_eq!(one[0], pattern(1023 * 4096));
    let s = fs.dax_stats();
    // SAFETY: as above: nothing else changes the bytes this test reads.
    let whole = unsafe { fs.mmap(ino, 0, 4 * MIB, opts) }.unwrap();
    assert_eq!(whole[(512 * 4096) as usize], pattern(512 * 4096));
    let d = fs.dax_stats();
    assert_eq!(
        d.fallback_pte_in_range - s.fallback_pte_in_range,
        1,
        "{d:?}"
    );
    assert_eq!(one[0], pattern(1023 * 4096), "the PTE mapping is intact");
    assert_eq!(whole[(1023 * 4096) as usize], pattern(1023 * 4096));
    drop((one, whole));

    // Past the end of file: the last 2 MiB reaches beyond it.
    let short = common::pattern_file(&fs, "short", 3 * MIB);
    let s = fs.dax_stats();
    // SAFETY: as above: nothing else changes the bytes this test reads.
    let map = unsafe { fs.mmap(short, 0, 4 * MIB, opts) }.unwrap();
    assert_eq!(map[(2 * MIB + 5) as usize], pattern(2 * MIB + 5));
    let d = fs.dax_stats();
    assert_eq!(d.fallback_past_eof - s.fallback_past_eof, 1);
    drop(map);

    // Not one 2 MiB extent: small writes made 4 KiB blocks (backwards: a
    // chunk completed by appends would move to an aligned region).
    let small = fs.create(ROOT, b"small", 0o644, 0, 0, true).unwrap().0.ino;
    for at in (0..2 * MIB / 4096).rev().map(|p| p * 4096) {
        fs.write(small, at, &[pattern(at); 4096]).unwrap();
    }
    fs.truncate(small, 4 * MIB).unwrap();
    let s = fs.dax_stats();
    // SAFETY: as above: nothing else changes the bytes this test reads.
    let map = unsafe { fs.mmap(small, 0, 4 * MIB, opts) }.unwrap();
    assert_eq!(map[8192], pattern(8192));
    let d = fs.dax_stats();
    assert_eq!(
        d.fallback_not_huge_extent - s.fallback_not_huge_extent,
        1,
        "{d:?}"
    );
    drop(map);

    // A store into a private mapping copies the page; the file is unchanged.
    let s = fs.dax_stats();
    let private = MapOptions {
        shared: false,
        ..opts
    };
    // SAFETY: as above: nothing else changes the bytes this test reads.
    let mut map = unsafe { fs.mmap(ino, 0, 4 * MIB, private) }.unwrap();
    map[100] = 0xAA;
    assert_eq!(map[100], 0xAA);
    let d = fs.dax_stats();
    assert_eq!(
        d.fallback_private_write - s.fallback_private_write,
        1,
        "{d:?}"
    );
    let mut byte = [0u8; 1];
    fs.read(ino, 100, &mut byte).unwrap();
    assert_eq!(
        byte[0],
        pattern(100),
        "a private store never reaches the file"
    );
    drop(map);
    fs.unmount().unwrap();
}

#[test]
fn holes_map_the_zero_page_until_a_store_allocates() {
    let (img, fs) = common::image("daxfs-dax");
    let ino = fs.create(ROOT, b"holey", 0o644, 0, 0, true).unwrap().0.ino;
    fs.truncate(ino, 4 * MIB).unwrap();
    let free = fs.statfs().free_blocks;
    let s = fs.dax_stats();
    // SAFETY: only this test touches the file.
    let mut map = unsafe { fs.mmap(ino, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    assert!(
        map.iter().step_by(4096).all(|&b| b == 0),
        "holes read as zeros"
    );
    let d = fs.dax_stats();
    assert_eq!(d.zero_maps - s.zero_maps, 2, "two zero PMDs: {d:?}");
    assert_eq!(
        fs.statfs().free_blocks,
        free,
        "a read fault allocates nothing"
    );
    // A store allocates (a whole 2 MiB here) and replaces the zero entry.
    map[3 * MIB as usize + 7] = 42;
    assert!(fs.statfs().free_blocks < free);
    let mut byte = [0u8; 1];
    fs.read(ino, 3 * MIB + 7, &mut byte).unwrap();
    assert_eq!(
        byte[0], 42,
        "a store through the mapping is visible to read() at once"
    );
    assert_eq!(map[3 * MIB as usize + 7], 42);
    map.sync().unwrap();
    drop(map);
    fs.unmount().unwrap();
    drop(fs);
    let fs = Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap();
    fs.read(ino, 3 * MIB + 7, &mut byte).unwrap();
    assert_eq!(byte[0], 42, "and after remount");
    fs.unmount().unwrap();
}

#[test]
fn past_the_end_is_sigbus_and_fork_shares_a_shared_mapping() {
    let (_img, fs) = common::image("daxfs-dax");
    let ino = common::pattern_file(&fs, "f", 10_000);
    let opts = MapOptions {
        populate: true,
        ..MapOptions::default()
    };
    // SAFETY: only this test (and its children) touch the file.
    let map = unsafe { fs.mmap(ino, 0, 8 * 4096, opts) }.unwrap();
    let ptr = map.as_ptr();
    assert_eq!(map[9_999], pattern(9_999));
    // SAFETY: loads in a child of bytes inside the mapping.
    let sig = in_child(|| unsafe {
        std::ptr::read_volatile(ptr.add(5 * 4096));
    });
    assert_eq!(sig, libc::SIGBUS, "a load past the end of the file");
    // A shared mapping is shared with a child: its store is ours to see.
    // SAFETY: a store in a child to a byte of the (populated) mapping.
    let sig = in_child(|| unsafe {
        std::ptr::write_volatile(ptr.add(100), 0x5A);
    });
    assert_eq!(sig, 0);
    assert_eq!(map[100], 0x5A);
    let mut byte = [0u8; 1];
    fs.read(ino, 100, &mut byte).unwrap();
    assert_eq!(byte[0], 0x5A);
    drop(map);
    fs.unmount().unwrap();
}

#[test]
fn a_read_only_mapping_refuses_stores_and_write_goes_through_an_unfaulted_mapping() {
    let (_img, fs) = common::image("daxfs-dax");
    let src = common::pattern_file(&fs, "src", 64 * 1024);
    let dst = fs.create(ROOT, b"dst", 0o644, 0, 0, true).unwrap().0.ino;
    // SAFETY: nothing changes `src` while it is mapped.
    let map = unsafe {
        fs.mmap(
            src,
            0,
            64 * 1024,
            MapOptions {
                write: false,
                ..MapOptions::default()
            },
        )
    }
    .unwrap();
    // The write path faults its (unfaulted) source in before its locks.
    fs.write(dst, 0, &map).unwrap();
    let mut back = vec![0u8; 64 * 1024];
    fs.read(dst, 0, &mut back).unwrap();
    assert!(back[..] == map[..]);
    let ptr = map.as_ptr();
    // SAFETY: a store in a child to a read-only mapping, which must fail.
    let sig = in_child(|| unsafe { std::ptr::write_volatile(ptr.add(10), 1) });
    assert_eq!(sig, libc::SIGSEGV);
    drop(map);
    fs.unmount().unwrap();
}

#[test]
fn truncate_and_punch_unmap_first_sigbus_past_the_new_end_zeros_in_the_hole() {
    let (_img, fs) = common::image("daxfs-dax");
    let ino = common::pattern_file(&fs, "f", 4 * MIB);
    let opts = MapOptions {
        write: false,
        ..MapOptions::default()
    };
    // SAFETY: the test reads only bytes that the calls below define.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, opts) }.unwrap();
    assert_eq!(map[(3 * MIB) as usize], pattern(3 * MIB));
    assert_eq!(map[5000], pattern(5000));
    fs.truncate(ino, MIB).unwrap();
    let ptr = map.as_ptr();
    // SAFETY: a load in a child, past the new end of the file.
    let sig = in_child(|| unsafe {
        std::ptr::read_volatile(ptr.add((3 * MIB) as usize));
    });
    assert_eq!(sig, libc::SIGBUS, "past the new end of file");
    assert_eq!(map[5000], pattern(5000), "below it the data is still there");
    fs.punch_hole(ino, 4096, 8192).unwrap();
    assert_eq!(map[5000], 0, "a punched hole reads as zeros");
    assert_eq!(map[13000], pattern(13000));
    drop(map);
    fs.unmount().unwrap();
}

/// Punches and rewrites race readers of a mapping while another file
/// reuses the freed blocks with a marker: a reader that ever sees the
/// marker saw a freed block through a stale mapping. (Checked to fail when
/// truncate and punch do not unmap first.)
#[test]
fn punches_racing_faults_never_expose_a_freed_block() {
    let (_img, fs) = common::image("daxfs-dax");
    let f = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap().0.ino;
    let g = fs.create(ROOT, b"g", 0o644, 0, 0, true).unwrap().0.ino;
    let body = vec![0x11u8; (2 * MIB) as usize];
    fs.write(f, 0, &body).unwrap();
    let opts = MapOptions {
        write: false,
        ..MapOptions::default()
    };
    // SAFETY: readers only load; the bytes may change under them, which the
    // test tolerates (0x11 or 0).
    let map = unsafe { fs.mmap(f, 0, 2 * MIB, opts) }.unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let base = map.as_ptr() as usize;
    std::thread::scope(|s| {
        s.spawn(|| {
            // The other file takes the freed blocks at once (the allocator
            // hands out the lowest free region first).
            let marker = vec![0xEEu8; (2 * MIB) as usize];
            while std::time::Instant::now() < deadline {
                fs.punch_hole(f, 0, 2 * MIB).unwrap();
                fs.write(g, 0, &marker).unwrap();
                fs.truncate(g, 0).unwrap();
                fs.write(f, 0, &body).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        for t in 0..2u64 {
            let stop = &stop;
            s.spawn(move || {
                let mut at = t * 4096 + 17;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // SAFETY: a load inside the mapping (2 MiB, never shrunk).
                    let b = unsafe { std::ptr::read_volatile((base + at as usize) as *const u8) };
                    assert!(b == 0x11 || b == 0, "byte {at} read {b:#x}: a freed block");
                    at = (at + 4096 * 7 + 1) % (2 * MIB);
                }
            });
        }
    });
    drop(map);
    fs.unmount().unwrap();
}

/// MAP_SYNC's promise: once a write fault returns, the block mapping is
/// durable, so flushing the data is enough. Every crash image the
/// crash-tracking device can leave right after the store and its flush
/// holds the data.
#[test]
fn after_a_write_fault_and_a_flush_every_crash_image_keeps_the_data() {
    let tracked = DeviceOptions::new().crash_tracking(true);
    let (img, fs) = common::image_with("daxfs-dax", 64 * MIB, &tracked);
    let dir = &img.dir;
    let ino = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap().0.ino;
    fs.truncate(ino, 4 * MIB).unwrap();
    // SAFETY: only this test touches the file.
    let mut map = unsafe { fs.mmap(ino, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    let at = (MIB + 12_345) as usize;
    map[at..at + 16].copy_from_slice(b"durable by flush");
    map.persist(at, 16).unwrap();
    let images = fs
        .device()
        .with_crash_point(|point| {
            let mut sets: Vec<Vec<u64>> = vec![Vec::new()];
            sets.extend(point.pending().iter().map(|p| vec![p.offset]));
            sets.into_iter()
                .take(64)
                .enumerate()
                .map(|(i, set)| {
                    let image = dir.path().join(format!("crash-{i}.img"));
                    point.write_image(&set, &image).unwrap();
                    image
                })
                .collect::<Vec<_>>()
        })
        .expect("a crash-tracking device");
    for image in images {
        let fs = Fs::mount(Device::open(&image, &DeviceOptions::new()).unwrap()).unwrap();
        let mut buf = [0u8; 16];
        fs.read(ino, at as u64, &mut buf).unwrap();
        assert_eq!(&buf, b"durable by flush", "{}", image.display());
        fs.unmount().unwrap();
    }
    drop(map);
}

/// The write fault's commit, fence by fence: it allocates, zeroes and
/// commits before it maps. A crash at any fence of it, with any single
/// pending unit persisted (or none, or all), leaves an image that mounts and
/// checks clean and shows the 2 MiB as a hole or as zeros, never what the
/// freed blocks held before. The fences after the fault (the store's own
/// persist) may add the stored bytes, and nothing else.
#[test]
fn a_write_fault_into_a_hole_is_atomic_at_every_fence() {
    let tracked = DeviceOptions::new().crash_tracking(true);
    let (img, fs) = common::image_with("daxfs-dax", 16 * MIB, &tracked);
    let dir = &img.dir;
    // Fill the free space with a marker, then free it: the fault's blocks
    // held the marker before.
    let old = fs.create(ROOT, b"old", 0o644, 0, 0, true).unwrap().0.ino;
    let fill = (fs.statfs().free_blocks * 4096).saturating_sub(MIB);
    fs.write(old, 0, &vec![0xEE; fill as usize]).unwrap();
    fs.unlink(ROOT, b"old").unwrap();
    let ino = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap().0.ino;
    fs.truncate(ino, 4 * MIB).unwrap();
    fs.fsync(ino).unwrap();
    let data = b"durable by flush";
    let at = (MIB + 12_345) as usize;

    let scratch = dir.path().join("crash.img");
    let failures = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = std::sync::Arc::new(Mutex::new((0usize, 0usize, 0usize))); // holes, zeros, data
    {
        let (failures, seen) = (failures.clone(), seen.clone());
        fs.device().on_fence(Some(Box::new(move |point| {
            let lines: Vec<u64> = point.pending().iter().map(|l| l.offset).collect();
            let units = common::crash_units(&lines);
            let mut subsets: Vec<Vec<u64>> = vec![Vec::new(), lines.clone()];
            subsets.extend(units);
            for subset in subsets {
                let check = || -> Result<&'static str, String> {
                    let _ = std::fs::remove_file(&scratch);
                    point
                        .write_image(&subset, &scratch)
                        .map_err(|e| e.to_string())?;
                    let dev =
                        Device::open(&scratch, &DeviceOptions::new()).map_err(|e| e.to_string())?;
                    let (report, dev) = daxfs::fsck(dev, false).map_err(|e| e.to_string())?;
                    if !report.is_clean() {
                        return Err(format!("fsck: {:?}", report.problems));
                    }
                    let fs = Fs::mount(dev).map_err(|e| e.to_string())?;
                    let allocated = !fs.file_extents(ino).map_err(|e| e.to_string())?.is_empty();
                    let mut chunk = vec![0u8; (2 * MIB) as usize];
                    fs.read(ino, 0, &mut chunk).map_err(|e| e.to_string())?;
                    fs.unmount().map_err(|e| e.to_string())?;
                    let stored = chunk[at..at + data.len()].to_vec();
                    chunk[at..at + data.len()].fill(0);
                    if let Some(bad) = chunk.iter().position(|&b| b != 0) {
                        return Err(format!("byte {bad} reads {:#x}", chunk[bad]));
                    }
                    match (allocated, stored == *data, stored.iter().all(|&b| b == 0)) {
                        (false, _, true) => Ok("hole"),
                        (true, false, true) => Ok("zeros"),
                        (true, true, _) => Ok("data"),
                        _ => Err(format!("the stored bytes read {stored:?}")),
                    }
                };
                match check() {
                    Ok(kind) => {
                        let mut s = seen.lock().unwrap();
                        match kind {
                            "hole" => s.0 += 1,
                            "zeros" => s.1 += 1,
                            _ => s.2 += 1,
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(format!(
                        "fence {} with {} lines persisted: {e}",
                        point.fences(),
                        subset.len()
                    )),
                }
            }
        })));
    }
    // SAFETY: only this test touches the file.
    let mut map = unsafe { fs.mmap(ino, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    map[at..at + data.len()].copy_from_slice(data);
    map.persist(at, data.len()).unwrap();
    fs.device().on_fence(None);
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let (holes, zeros, stored) = *seen.lock().unwrap();
    assert!(
        holes > 0 && zeros > 0 && stored > 0,
        "crash images seen: {holes} with the hole, {zeros} with zeroed blocks, {stored} with the data"
    );
    drop(map);
}

/// Truncates down and writes that grow the file back race loads through a
/// mapping, while another file takes the freed blocks with a marker. A
/// load may raise SIGBUS only while the file may be short, never reads the
/// marker, and once the file is whole again every page reads its data.
#[test]
fn truncates_racing_faults_sigbus_only_past_the_end() {
    static BASE: AtomicUsize = AtomicUsize::new(0);
    static LEN: AtomicUsize = AtomicUsize::new(0);
    /// Per reader (page parity): the address of its last SIGBUS.
    static HIT: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
    extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers.
        let addr = unsafe { (*info).si_addr() } as usize;
        let base = BASE.load(Ordering::Acquire);
        let page = addr.wrapping_sub(base) / 4096;
        if addr < base || addr >= base + LEN.load(Ordering::Acquire) {
            // Not the race's (a child of another test expecting SIGBUS):
            // the default, which the retried access then takes.
            // SAFETY: restoring the default disposition.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
            return;
        }
        HIT[page % 2].store(addr, Ordering::Release);
        // Let the retried load read zeros (the next size change unmaps it).
        // SAFETY: one page of the test's own mapping.
        unsafe {
            libc::mmap(
                (addr & !4095) as *mut libc::c_void,
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
    }

    let (_img, fs) = common::image("daxfs-dax");
    let f = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap().0.ino;
    let g = fs.create(ROOT, b"g", 0o644, 0, 0, true).unwrap().0.ino;
    let body = vec![0x11u8; (4 * MIB) as usize];
    fs.write(f, 0, &body).unwrap();
    let opts = MapOptions {
        write: false,
        ..MapOptions::default()
    };
    // SAFETY: readers only load; the bytes may change under them, which the
    // test tolerates.
    let map = unsafe { fs.mmap(f, 0, 4 * MIB, opts) }.unwrap();
    BASE.store(map.as_ptr() as usize, Ordering::Release);
    LEN.store(map.len(), Ordering::Release);
    // SAFETY: a handler for SIGBUS with SA_SIGINFO; restored below.
    let previous = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, &action, &mut old);
        old
    };
    // Odd while the file may be shorter than 4 MiB.
    let generation = AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let base = map.as_ptr() as usize;
    let (sigbus, loads) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            let marker = vec![0xEEu8; (3 * MIB) as usize];
            let mut round = 0u64;
            while std::time::Instant::now() < deadline {
                generation.fetch_add(1, Ordering::SeqCst);
                fs.truncate(f, MIB + round % 3 * 4096).unwrap();
                fs.write(g, 0, &marker).unwrap();
                fs.truncate(g, 0).unwrap();
                // Grow back by a write (half the time with a hole first).
                if round.is_multiple_of(2) {
                    fs.write(f, MIB, &body[..(3 * MIB) as usize]).unwrap();
                } else {
                    fs.write(f, 3 * MIB, &body[..MIB as usize]).unwrap();
                    fs.write(f, MIB, &body[..(2 * MIB) as usize]).unwrap();
                }
                generation.fetch_add(1, Ordering::SeqCst);
                round += 1;
            }
            stop.store(true, Ordering::Relaxed);
        });
        for (t, hit) in HIT.iter().enumerate() {
            let (stop, generation, sigbus, loads) = (&stop, &generation, &sigbus, &loads);
            s.spawn(move || {
                let mut page = 256 + t; // from 1 MiB on, pages of our parity
                while !stop.load(Ordering::Relaxed) {
                    let addr = base + page * 4096 + 100;
                    let before = generation.load(Ordering::SeqCst);
                    hit.store(0, Ordering::Release);
                    // SAFETY: a load inside the mapping; past the end of the
                    // file it raises SIGBUS, which the handler turns into zeros.
                    let b = unsafe { std::ptr::read_volatile(addr as *const u8) };
                    let after = generation.load(Ordering::SeqCst);
                    assert_ne!(
                        b, 0xEE,
                        "page {page}: a freed block, reused by another file"
                    );
                    if hit.load(Ordering::Acquire) == addr {
                        sigbus.fetch_add(1, Ordering::Relaxed);
                        assert!(
                            before % 2 == 1 || before != after,
                            "page {page}: SIGBUS while the file was 4 MiB long"
                        );
                    } else {
                        loads.fetch_add(1, Ordering::Relaxed);
                        assert!(b == 0x11 || b == 0, "page {page} read {b:#x}");
                    }
                    page = 256 + (page - 256 + 2 * 37) % 768;
                }
            });
        }
    });
    // SAFETY: putting back the disposition saved above.
    unsafe { libc::sigaction(libc::SIGBUS, &previous, std::ptr::null_mut()) };
    LEN.store(0, Ordering::Release);
    let (sigbus, loads) = (sigbus.into_inner(), loads.into_inner());
    assert!(
        sigbus > 0 && loads > 0,
        "{sigbus} SIGBUS, {loads} loads: the race did not happen"
    );
    // The file is 4 MiB again: no page may still raise SIGBUS or read stale.
    // Checked through a fresh mapping and read(): the old mapping may hold
    // a page of zeros the handler put over a SIGBUS that was raised just
    // before the file grew back (the grow unmaps the file's pages, not the
    // handler's anonymous one), which is the test's doing, not the
    // filesystem's.
    drop(map);
    // SAFETY: nothing else touches the file any more.
    let fresh = unsafe { fs.mmap(f, 0, 4 * MIB, opts) }.unwrap();
    let mut read = vec![0u8; (4 * MIB) as usize];
    assert_eq!(fs.read(f, 0, &mut read).unwrap(), read.len());
    for at in (0..4 * MIB as usize).step_by(4096) {
        assert_eq!(fresh[at + 100], 0x11, "mapped byte {}", at + 100);
        assert_eq!(read[at + 100], 0x11, "read byte {}", at + 100);
    }
    drop(fresh);
    fs.unmount().unwrap();
}

/// What a file costs in DAX state lasts while it is mapped: the last unmap
/// writes back its dirty pages and forgets its entries.
#[test]
fn the_last_unmap_writes_back_and_forgets_the_files_dax_state() {
    let tracked = DeviceOptions::new().crash_tracking(true);
    let (img, fs) = common::image_with("daxfs-dax", 64 * MIB, &tracked);
    let dir = &img.dir;
    let f = common::pattern_file(&fs, "f", 4 * MIB);
    let g = common::pattern_file(&fs, "g", 64 * 1024);
    fs.fsync(f).unwrap();
    assert_eq!(fs.dax_files(), 0);
    // SAFETY: only this test touches the files.
    let mut a = unsafe { fs.mmap(f, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    // SAFETY: as above.
    let b = unsafe { fs.mmap(f, 0, 2 * MIB, MapOptions::default()) }.unwrap();
    // SAFETY: as above.
    let c = unsafe { fs.mmap(g, 0, 64 * 1024, MapOptions::default()) }.unwrap();
    assert_eq!(fs.dax_files(), 2);
    a[5000] = 0xAB; // dirty, not synced
    assert_eq!(b[5000], 0xAB);
    drop(b);
    assert_eq!(fs.dax_files(), 2, "f is still mapped by a");
    drop(c);
    assert_eq!(fs.dax_files(), 1, "g's state went with its only mapping");
    drop(a);
    assert_eq!(fs.dax_files(), 0, "f's state went with its last mapping");
    // The store was written back: a crash now, losing every line not
    // flushed, keeps it.
    let image = dir.path().join("crash.img");
    fs.device()
        .with_crash_point(|point| point.write_image(&[], &image).unwrap())
        .unwrap();
    let crashed = Fs::mount(Device::open(&image, &DeviceOptions::new()).unwrap()).unwrap();
    let mut byte = [0u8; 1];
    crashed.read(f, 5000, &mut byte).unwrap();
    assert_eq!(byte[0], 0xAB);
    crashed.unmount().unwrap();
    // A new mapping starts afresh and sees the data.
    // SAFETY: as above.
    let again = unsafe { fs.mmap(f, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    assert_eq!(again[5000], 0xAB);
    assert_eq!(again[(3 * MIB) as usize], pattern(3 * MIB));
    drop(again);
    assert_eq!(fs.dax_files(), 0);
    fs.unmount().unwrap();
}

#[test]
fn writeback_flushes_dirty_entries_and_write_protects_them_again() {
    let (_img, fs) = common::image("daxfs-dax");
    let ino = common::pattern_file(&fs, "f", 64 * 1024);
    // SAFETY: only this test touches the file.
    let mut map = unsafe { fs.mmap(ino, 0, 64 * 1024, MapOptions::default()) }.unwrap();
    assert_eq!(map[0], pattern(0)); // a read fault maps read-only
    let faults = |fs: &Fs| {
        let s = fs.dax_stats();
        s.pmd_faults + s.pte_faults
    };
    let before = faults(&fs);
    map[1] = 7; // a store faults again: dirty
    assert_eq!(faults(&fs), before + 1, "the first store write-faults");
    map[2] = 8; // already writable
    assert_eq!(faults(&fs), before + 1);
    map.sync().unwrap();
    map[3] = 9; // cleaned pages are write-protected again
    assert_eq!(
        faults(&fs),
        before + 2,
        "a store after writeback faults again"
    );
    let mut back = [0u8; 4];
    fs.read(ino, 0, &mut back).unwrap();
    assert_eq!(back, [pattern(0), 7, 8, 9]);
    // fsync of the file writes back too.
    fs.fsync(ino).unwrap();
    map[4] = 10;
    assert_eq!(faults(&fs), before + 3, "a store after fsync faults again");
    drop(map);
    fs.unmount().unwrap();
}

/// On memory that can back 2 MiB pages (a tmpfs mounted huge=always, made
/// here when running as root), a PMD piece is a real PMD mapping.
#[test]
fn on_huge_page_memory_the_kernel_maps_pmd_pieces_huge() {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-huge")
        .tempdir_in("/dev/shm")
        .unwrap();
    let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C strings; mounting over our own empty temporary dir.
    let mounted = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"huge=always,size=128m".as_ptr().cast(),
        )
    } == 0;
    if !mounted {
        eprintln!(
            "skipping: cannot mount a huge=always tmpfs here ({})",
            std::io::Error::last_os_error()
        );
        return;
    }
    struct Unmount(std::ffi::CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: unmounting the tmpfs this test mounted (lazily if busy).
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _unmount = Unmount(target.clone());
    let path = dir.path().join("fs.img");
    let fs = Fs::format(Device::create(&path, 64 * MIB, &DeviceOptions::new()).unwrap()).unwrap();
    if !fs.device().info().huge_pages.capable {
        eprintln!("skipping: {}", fs.device().info().huge_pages.reason);
        return;
    }
    let ino = common::pattern_file(&fs, "big", 4 * MIB);
    // SAFETY: loads only.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    for at in (0..4 * MIB).step_by(4096) {
        assert_eq!(map[at as usize], pattern(at));
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let huge = smaps_field(
        &smaps,
        map.as_ptr() as usize,
        &["FilePmdMapped:", "ShmemPmdMapped:"],
    );
    assert!(huge >= 2048, "PMD-mapped: {huge} kB");
    drop(map);
    fs.unmount().unwrap();
}

#[test]
fn threads_faulting_the_same_pages_see_one_mapping() {
    let (_img, fs) = common::image("daxfs-dax");
    let ino = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap().0.ino;
    fs.truncate(ino, 4 * MIB).unwrap();
    // SAFETY: the threads store distinct bytes; all read after joining.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    let base = map.as_ptr() as usize;
    let free = fs.statfs().free_blocks;
    std::thread::scope(|s| {
        for t in 0..4usize {
            s.spawn(move || {
                // Every thread stores into every page: the first store of a
                // page allocates; the others must find that block.
                for page in 0..1024usize {
                    // SAFETY: a store inside the mapping, byte t of the page.
                    unsafe {
                        std::ptr::write_volatile((base + page * 4096 + t) as *mut u8, t as u8 + 1)
                    };
                }
            });
        }
    });
    for page in 0..1024usize {
        for t in 0..4usize {
            assert_eq!(map[page * 4096 + t], t as u8 + 1, "page {page}, thread {t}");
        }
    }
    // One allocation per 2 MiB, not one per thread.
    assert_eq!(
        free - fs.statfs().free_blocks,
        1024,
        "blocks allocated once"
    );
    let mut back = [0u8; 4];
    fs.read(ino, 4096 * 700, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4]);
    drop(map);
    fs.unmount().unwrap();
}

/// `Mapping::lock` faults every page in and locks it (mlock(2) itself
/// refuses an unfaulted library mapping); pages mapped again after a punch
/// are locked as they are mapped; `unlock` undoes it.
#[test]
fn lock_faults_in_and_locks_and_pages_mapped_later_stay_locked() {
    let (_img, fs) = common::image("daxfs-dax");
    let ino = common::pattern_file(&fs, "locked", 4 * MIB);
    // SAFETY: the test touches the mapping with volatile loads only.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, MapOptions::default()) }.unwrap();
    let base = map.as_ptr() as usize;
    // Locked memory of the process, kB (no other test of this binary locks).
    let locked = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
        line[6..]
            .trim()
            .trim_end_matches(" kB")
            .parse::<u64>()
            .unwrap()
    };
    // SAFETY: the mapping's own, unfaulted range; mlock changes nothing.
    let raw = unsafe { libc::mlock(base as *const libc::c_void, (4 * MIB) as usize) };
    assert_eq!(raw, -1, "mlock(2) of an unfaulted reservation is refused");
    // (It still marks the range locked, as Linux does on a failed mlock.)
    // SAFETY: as above.
    unsafe { libc::munlock(base as *const libc::c_void, (4 * MIB) as usize) };
    assert_eq!(locked(), 0);

    map.lock().unwrap();
    assert_eq!(locked(), 4 * 1024, "every page locked (kB)");
    let faults = fs.dax_stats().pmd_faults;
    assert_eq!(faults, 2, "populated by two PMD faults");

    // A punch unmaps the 2 MiB around it; pages mapped again (now PTEs,
    // and the zero page for the hole) are locked as they are mapped.
    fs.punch_hole(ino, MIB, 4096).unwrap();
    assert_eq!(locked(), 2 * 1024, "the punch unmapped 2 MiB");
    for at in (0..2 * MIB).step_by(4096) {
        // SAFETY: a load inside the mapping.
        let b = unsafe { std::ptr::read_volatile((base + at as usize) as *const u8) };
        assert_eq!(b, if at == MIB { 0 } else { pattern(at) });
    }
    assert_eq!(locked(), 4 * 1024, "the pages mapped again are locked");

    map.unlock().unwrap();
    assert_eq!(locked(), 0);
    drop(map);
    fs.unmount().unwrap();
}

/// Reads into, and writes from, DAX mappings through buffers that start
/// inside a page and straddle pages: of another file and of the same file,
/// over data and over a hole, down to two bytes across a page boundary.
/// Nothing of the buffer may fault while the filesystem's lock is held
/// (the fault needs that lock: the thread would wait for itself). A
/// watchdog fails the test if the calls do not return.
#[test]
fn buffers_in_mappings_at_any_alignment_neither_hang_nor_lose_bytes() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (_img, fs) = common::image("daxfs-dax");
        let src = common::pattern_file(&fs, "src", 64 * 1024);
        let want = |at: u64, len: usize| (at..at + len as u64).map(pattern).collect::<Vec<u8>>();
        // (offset in the mapping, length): inside a page, across three
        // pages and into a fourth, two bytes across a boundary.
        let cases = [(100usize, 3 * 4096usize), (4095, 2), (4000, 8192 + 200)];
        for (i, &(at, len)) in cases.iter().enumerate() {
            // Read into a fresh mapping of another file: data, then a hole.
            let data = common::pattern_file(&fs, &format!("data{i}"), 64 * 1024);
            let hole = fs.create(ROOT, format!("hole{i}").as_bytes(), 0o644, 0, 0, true);
            let hole = hole.unwrap().0.ino;
            fs.truncate(hole, 64 * 1024).unwrap();
            for dst in [data, hole] {
                // SAFETY: nothing else changes `dst` while it is mapped.
                let mut map = unsafe { fs.mmap(dst, 0, 64 * 1024, MapOptions::default()) }.unwrap();
                assert_eq!(fs.read(src, 7, &mut map[at..at + len]).unwrap(), len);
                assert!(
                    map[at..at + len] == want(7, len)[..],
                    "read into {dst} at {at}"
                );
            }
            // Write from a fresh, read-only mapping of another file.
            let out = fs.create(ROOT, format!("out{i}").as_bytes(), 0o644, 0, 0, true);
            let out = out.unwrap().0.ino;
            let read_only = MapOptions {
                write: false,
                ..MapOptions::default()
            };
            // SAFETY: nothing changes `src` while it is mapped.
            let map = unsafe { fs.mmap(src, 0, 64 * 1024, read_only) }.unwrap();
            assert_eq!(fs.write(out, 0, &map[at..at + len]).unwrap(), len);
            let mut back = vec![0u8; len];
            fs.read(out, 0, &mut back).unwrap();
            assert!(back == want(at as u64, len), "write from a mapping at {at}");
            drop(map);
            // The same file: its second half mapped, its first half read
            // into it and written back from it.
            let same = common::pattern_file(&fs, &format!("same{i}"), 64 * 1024);
            // SAFETY: only these calls change `same` while it is mapped.
            let map = unsafe { fs.mmap(same, 32 * 1024, 32 * 1024, MapOptions::default()) };
            let mut map = map.unwrap();
            assert_eq!(fs.read(same, 0, &mut map[at..at + len]).unwrap(), len);
            assert!(map[at..at + len] == want(0, len)[..], "same file at {at}");
            assert_eq!(fs.write(same, 1, &map[at..at + len]).unwrap(), len);
            drop(map);
            let mut back = vec![0u8; len];
            fs.read(same, 1, &mut back).unwrap();
            assert!(back == want(0, len), "same file written back at {at}");
        }
        // Names, a path, a symlink target and an attribute value that lie
        // in (fresh, unfaulted) mappings, across page boundaries.
        let words = fs.create(ROOT, b"words", 0o644, 0, 0, true).unwrap().0.ino;
        fs.truncate(words, 16 * 1024).unwrap();
        fs.write(words, 4090, b"mapped-name").unwrap();
        fs.write(words, 8190, b"/a-dir").unwrap();
        fs.write(words, 12285, b"link-target").unwrap();
        let read_only = MapOptions {
            write: false,
            ..MapOptions::default()
        };
        // SAFETY: nothing changes `words` while it is mapped.
        let fresh = || unsafe { fs.mmap(words, 0, 16 * 1024, read_only) }.unwrap();
        fs.create(ROOT, &fresh()[4090..4101], 0o644, 0, 0, true)
            .unwrap();
        assert!(fs.lookup(ROOT, &fresh()[4090..4101]).is_ok());
        fn path(bytes: &[u8]) -> &std::path::Path {
            std::path::Path::new(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(bytes),
            )
        }
        fs.mkdir_path(path(&fresh()[8190..8196]), 0o755).unwrap();
        assert!(fs.resolve(path(&fresh()[8190..8196])).is_ok());
        let link = fs
            .symlink(ROOT, b"sl", &fresh()[12285..12296], 0, 0)
            .unwrap();
        assert_eq!(fs.readlink(link.ino).unwrap(), b"link-target");
        fs.setxattr(src, b"user.v", &fresh()[4000..4400], false, false)
            .unwrap();
        assert!(fs.getxattr(src, b"user.v").unwrap() == fresh()[4000..4400]);
        fs.rename(
            ROOT,
            &fresh()[4090..4101],
            ROOT,
            b"renamed",
            Default::default(),
        )
        .unwrap();
        fs.unlink(ROOT, b"renamed").unwrap();
        fs.unmount().unwrap();
        tx.send(()).unwrap();
    });
    match rx.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("a read or write with a buffer in a mapping did not return in 120 s")
        }
        Err(e) => panic!("the test thread failed: {e}"),
    }
}

/// With a trace sink set, every fault is an event in the kernel's shape:
/// a PMD fault `dax_pmd_fault_done ... NOPAGE` at its 2 MiB; a misaligned
/// one `FALLBACK` with its reason, then `dax_pte_fault_done ... NOPAGE`;
/// past the end of the file `SIGBUS`. Unset, nothing more comes.
#[test]
fn the_fault_trace_reports_each_fault_as_the_kernel_does() {
    let (_img, fs) = common::image("daxfs-dax");
    let ino = common::pattern_file(&fs, "big", 4 * MIB);
    let events = std::sync::Arc::new(Mutex::new(Vec::<daxfs::dax::FaultEvent>::new()));
    let seen = std::sync::Arc::clone(&events);
    fs.trace_faults(Some(std::sync::Arc::new(
        move |e: &daxfs::dax::FaultEvent| seen.lock().unwrap().push(*e),
    )));
    let opts = MapOptions::default();
    // SAFETY (all mappings here): nothing else changes the bytes read.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, opts) }.unwrap();
    let base = map.as_ptr() as u64;
    assert_eq!(map[(2 * MIB + 5) as usize], pattern(2 * MIB + 5));
    let lines: Vec<String> = events
        .lock()
        .unwrap()
        .drain(..)
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        lines,
        [format!(
            "dax_pmd_fault_done: ino {ino:#x} shared READ address {:#x} vm_start {base:#x} \
             vm_end {:#x} pgoff 0x200 max_pgoff 0x3ff NOPAGE",
            base + 2 * MIB,
            base + 4 * MIB
        )]
    );
    drop(map);
    // SAFETY: as above.
    let map = unsafe { fs.mmap(ino, 4096, 4 * MIB - 4096, opts) }.unwrap();
    let base = map.as_ptr() as u64;
    map.fault_in(4096, 1, true).unwrap();
    let got = events.lock().unwrap().drain(..).collect::<Vec<_>>();
    use daxfs::dax::{FaultResult, FaultSize};
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        (got[0].size, got[0].result, got[0].write, got[0].pgoff),
        (
            FaultSize::Pmd,
            FaultResult::Fallback(daxfs::Fallback::Misaligned),
            true,
            2
        )
    );
    assert!(
        got[0].to_string().contains("WRITE")
            && got[0]
                .to_string()
                .ends_with("FALLBACK (the 2 MiB is not inside the mapping, aligned)")
    );
    assert_eq!(
        (got[1].size, got[1].result, got[1].address),
        (FaultSize::Pte, FaultResult::NoPage, base + 4096)
    );
    drop(map);
    // Past the end: a mapping longer than the file.
    // SAFETY: as above.
    let map = unsafe { fs.mmap(ino, 0, 6 * MIB, opts) }.unwrap();
    map.fault_in((5 * MIB) as usize, 1, false).unwrap();
    let got = events.lock().unwrap().drain(..).collect::<Vec<_>>();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].size, got[0].result),
        (FaultSize::Pte, FaultResult::Sigbus)
    );
    assert!(got[0]
        .to_string()
        .ends_with("pgoff 0x500 max_pgoff 0x3ff SIGBUS"));
    fs.trace_faults(None);
    assert_eq!(map[7], pattern(7));
    assert!(
        events.lock().unwrap().is_empty(),
        "events after the trace was unset"
    );
    drop(map);
    fs.unmount().unwrap();
}
