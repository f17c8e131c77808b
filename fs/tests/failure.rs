//! Memory failure through the library: the owner found, PMD entries split,
//! mappings torn down, `SIGBUS` with `BUS_MCEERR_AR`, handlers told, free
//! blocks kept out of allocation, damaged metadata refused, and clearing.
//!
//! The tests of this file share one process-wide SIGBUS handler, so they
//! run one at a time (`SERIAL`).

mod common;

use common::MIB;
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{BusSignal, Error, Fs, MapOptions, MemoryFailure, Owner, ROOT};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

static SERIAL: Mutex<()> = Mutex::new(());

// ---- a SIGBUS catcher --------------------------------------------------

/// What the last SIGBUS said: si_code, si_addr, si_addr_lsb; and how many.
static CODE: AtomicI32 = AtomicI32::new(0);
static ADDR: AtomicUsize = AtomicUsize::new(0);
static LSB: AtomicI32 = AtomicI32::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGBUS's siginfo to this SA_SIGINFO handler.
    let BusSignal {
        code,
        addr,
        addr_lsb,
    } = unsafe { BusSignal::read(info) };
    CODE.store(code, Ordering::SeqCst);
    ADDR.store(addr, Ordering::SeqCst);
    LSB.store(addr_lsb as i32, Ordering::SeqCst);
    COUNT.fetch_add(1, Ordering::SeqCst);
    if code == 4 {
        // BUS_MCEERR_AR: let the retried access read zeros from a page of
        // our own (what a program's recovery would do).
        // SAFETY: one page of the faulting test mapping.
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
}

struct Catcher(libc::sigaction);

impl Catcher {
    fn install() -> Catcher {
        COUNT.store(0, Ordering::SeqCst);
        CODE.store(0, Ordering::SeqCst);
        // SAFETY: installing an SA_SIGINFO handler; the old one is restored
        // on drop.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, &action, &mut old);
            Catcher(old)
        }
    }
}

impl Drop for Catcher {
    fn drop(&mut self) {
        // SAFETY: restoring the disposition saved by `install`.
        unsafe { libc::sigaction(libc::SIGBUS, &self.0, std::ptr::null_mut()) };
    }
}

fn faults(fs: &Fs) -> u64 {
    let s = fs.dax_stats();
    s.pmd_faults + s.pte_faults
}

// ---- tests -------------------------------------------------------------

/// Poison on a PMD-mapped page: the PMD is split, only that page goes, a
/// load of it raises exactly one SIGBUS (BUS_MCEERR_AR, its address, lsb
/// 12), read() gives EIO, handlers learn the file and offset; a covering
/// write clears it and the page maps again.
#[test]
fn poison_in_a_pmd_splits_it_and_only_the_page_goes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_img, fs) = common::image("daxfs-failure");
    let ino = common::pattern_file(&fs, "f", 4 * MIB);
    let told: Arc<Mutex<Vec<MemoryFailure>>> = Arc::default();
    {
        let told = told.clone();
        fs.on_memory_failure(Arc::new(move |f| told.lock().unwrap().push(f.clone())));
    }
    let opts = MapOptions {
        write: false,
        ..MapOptions::default()
    };
    // SAFETY: loads only; the poisoned page is read through the catcher.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, opts) }.unwrap();
    for at in (0..4 * MIB as usize).step_by(4096) {
        assert_eq!(map[at], (at % 251) as u8);
    }
    assert_eq!(fs.dax_stats().pmd_faults, 2, "PMD-mapped");
    let bad = 2 * MIB + 5 * 4096; // page 5 of the second PMD
    let dev_at = fs.device_offset(ino, bad).unwrap().unwrap();
    let failures = fs.inject_poison(dev_at, 512).unwrap();
    assert_eq!(failures.len(), 1);
    let f = &failures[0];
    assert_eq!(f.offset, dev_at);
    assert_eq!(f.owner, Owner::File { ino, offset: bad });
    assert!(f.split, "the PMD entry was split");
    let addr = map.as_ptr() as usize + bad as usize;
    assert_eq!(f.mapped_at, vec![addr]);
    assert_eq!(told.lock().unwrap().as_slice(), failures.as_slice());

    // The other 511 pages of that PMD (and the other PMD) stay mapped: no
    // fault to read them.
    let before = faults(&fs);
    for at in (0..4 * MIB as usize).step_by(4096) {
        if at as u64 != bad {
            assert_eq!(map[at + 7], ((at + 7) % 251) as u8);
        }
    }
    assert_eq!(faults(&fs), before, "pages around the poison faulted again");

    // A load of the poisoned page: exactly one SIGBUS, as Linux sends it.
    {
        let _catcher = Catcher::install();
        // SAFETY: a load of the poisoned page; the catcher maps zeros.
        let b = unsafe { std::ptr::read_volatile((addr + 100) as *const u8) };
        assert_eq!(b, 0);
        assert_eq!(COUNT.load(Ordering::SeqCst), 1, "exactly one SIGBUS");
        assert_eq!(CODE.load(Ordering::SeqCst), 4, "BUS_MCEERR_AR");
        assert_eq!(ADDR.load(Ordering::SeqCst), addr + 100);
        assert_eq!(LSB.load(Ordering::SeqCst), 12);
    }
    let mut page = vec![0u8; 4096];
    assert!(matches!(
        fs.read(ino, bad, &mut page),
        Err(Error::MediaError { .. })
    ));
    assert_eq!(fs.memory_failures().len(), 1);
    drop(map);

    // A write covering the page clears it; a new mapping maps it again.
    fs.write(ino, bad, &[0x5A; 4096]).unwrap();
    assert!(fs.memory_failures().is_empty());
    fs.read(ino, bad, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0x5A));
    // SAFETY: loads only.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, opts) }.unwrap();
    assert_eq!(map[bad as usize + 1], 0x5A);
    drop(map);
    fs.unmount().unwrap();
}

/// A page poisoned while mapped read-write with MAP_SYNC semantics and
/// populated up front; then a write that covers only part of it fails,
/// and punching a hole and writing 4 KiB there succeeds.
#[test]
fn poison_in_a_populated_writable_mapping_then_punch_and_write() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_img, fs) = common::image("daxfs-failure");
    let ino = common::pattern_file(&fs, "f", 64 * 1024);
    let opts = MapOptions {
        populate: true,
        ..MapOptions::default()
    };
    // SAFETY: only this test touches the file.
    let mut map = unsafe { fs.mmap(ino, 0, 64 * 1024, opts) }.unwrap();
    map[8192] = 1;
    let dev_at = fs.device_offset(ino, 8192).unwrap().unwrap();
    let f = fs.inject_poison(dev_at, 4096).unwrap();
    assert_eq!(f[0].mapped_at, vec![map.as_ptr() as usize + 8192]);
    {
        let _catcher = Catcher::install();
        let p = map.as_ptr() as usize + 8192 + 3;
        // SAFETY: a load of the poisoned page; the catcher maps zeros.
        let b = unsafe { std::ptr::read_volatile(p as *const u8) };
        assert_eq!(b, 0);
        assert_eq!(CODE.load(Ordering::SeqCst), 4);
        assert_eq!(ADDR.load(Ordering::SeqCst), p);
    }
    assert!(
        fs.write(ino, 8192 + 512, &[1; 100]).is_err(),
        "part of a poisoned sector"
    );
    fs.punch_hole(ino, 8192, 4096).unwrap();
    assert_eq!(
        fs.memory_failures().len(),
        1,
        "a punch does not clear poison"
    );
    fs.write(ino, 8192, &[7; 4096]).unwrap();
    let mut back = [0u8; 4096];
    fs.read(ino, 8192, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 7));
    drop(map);
    fs.unmount().unwrap();
}

/// Poison in free space: the block is kept out of allocation until it is
/// cleared, also across a remount.
#[test]
fn poisoned_free_blocks_are_never_allocated_until_cleared() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (img, fs) = common::image("daxfs-failure");
    let probe = common::pattern_file(&fs, "probe", 4096);
    let block = fs.device_offset(probe, 0).unwrap().unwrap();
    fs.unlink(ROOT, b"probe").unwrap();
    let free = fs.statfs().free_blocks;
    let f = fs.inject_poison(block, 4096).unwrap();
    assert_eq!(f[0].owner, Owner::Free);
    assert_eq!(fs.statfs().free_blocks, free - 1, "kept out");
    // Fill the filesystem: no file gets the block.
    let big = fs.create(ROOT, b"big", 0o644, 0, 0, true).unwrap().0.ino;
    let chunk = vec![3u8; MIB as usize];
    let mut at = 0;
    while fs.write(big, at, &chunk).is_ok() {
        at += MIB;
    }
    let mut small = 0;
    while fs.write(big, at, &[3; 4096]).is_ok() {
        at += 4096;
        small += 1;
    }
    assert!(small < 256);
    for e in fs.file_extents(big).unwrap() {
        assert!(
            !(e.device_offset..e.device_offset + e.len).contains(&block),
            "the poisoned block was allocated"
        );
    }
    fs.unmount().unwrap();
    drop(fs);
    // Across a remount the poison (kept by the device) keeps it out.
    let fs = Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap();
    assert!(fs
        .mount_notes()
        .iter()
        .any(|n| n.contains("kept out of allocation")));
    // (Full: what is left is the reserve for extent blocks.)
    assert_eq!(fs.statfs().available_blocks, 0);
    fs.clear_poison(block, 4096).unwrap();
    assert_eq!(fs.statfs().available_blocks, 1, "given back once cleared");
    fs.write(big, at, &[3; 4096]).unwrap();
    fs.unmount().unwrap();
}

/// Poison in a file's inode slot: that inode is never changed again, the
/// error names it, other files work, and fsck reports it.
#[test]
fn poisoned_metadata_is_refused_and_fsck_reports_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (img, fs) = common::image("daxfs-failure");
    for name in ["a", "b", "c", "d"] {
        common::pattern_file(&fs, name, 10);
    }
    let ino = common::pattern_file(&fs, "victim", 4096); // in another sector than the root's
    let other = common::pattern_file(&fs, "other", 4096);
    let slot = {
        // The inode table follows the superblock's layout; find the slot
        // through the owner of each block of the table.
        let mut at = 0;
        loop {
            if let Ok(Owner::Metadata(what)) = fs.owner_of(at) {
                if what.contains(&format!("(inode {ino})")) {
                    break at;
                }
            }
            at += 256;
        }
    };
    let f = fs.inject_poison(slot / 512 * 512, 512).unwrap();
    assert!(matches!(&f[0].owner, Owner::Metadata(w) if w.contains("inode table")));
    let e = fs.write(ino, 0, b"x").unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    fs.write(other, 0, b"fine").unwrap_or_else(|e| {
        // Another inode in the same poisoned sector is damaged too.
        assert_eq!(e.errno(), libc::EIO);
        0
    });
    fs.unmount().unwrap();
    drop(fs);
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let (report, _) = daxfs::fsck(dev, false).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains(&format!("inode {ino}"))),
        "{:?}",
        report.problems
    );
}

/// Poison in a filesystem-wide structure: changes that would write it are
/// refused with an error naming it (a poisoned journal refuses every
/// change), reads go on, nothing half-done; clearing the poison lifts it.
#[test]
fn poisoned_bitmap_or_journal_refuses_changes_naming_it_until_cleared() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_img, fs) = common::image("daxfs-failure");
    let ino = common::pattern_file(&fs, "f", 8192);
    let sb = fs.superblock().clone();
    for (name, block) in [
        ("the allocation bitmap", sb.bitmap_start),
        ("the journal", sb.journal_start),
    ] {
        let at = block * 4096;
        let f = fs.inject_poison(at, 512).unwrap();
        assert_eq!(f[0].owner, Owner::Metadata(name.into()));
        // Allocating writes the bitmap and the journal: refused, by name.
        let e = fs.write(ino, 1 << 20, &[7; 4096]).unwrap_err();
        assert!(
            matches!(&e, Error::Corrupt { structure, .. } if structure == name),
            "{name}: {e}"
        );
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains("poisoned"), "{e}");
        assert_eq!(fs.getattr(ino).unwrap().size, 8192, "nothing half-done");
        let mut buf = [0u8; 8192];
        assert_eq!(fs.read(ino, 0, &mut buf).unwrap(), 8192, "reads go on");
        assert_eq!(buf[100], common::pattern(100));
        if name == "the journal" {
            // Every change writes the journal.
            let e = fs.create_path("/g", 0o644, true).unwrap_err();
            assert!(matches!(&e, Error::Corrupt { structure, .. } if structure == name));
        }
        fs.clear_poison(at, 512).unwrap();
        fs.write(ino, 1 << 20, &[7; 4096]).unwrap();
        fs.truncate(ino, 8192).unwrap();
    }
    fs.unmount().unwrap();
}

/// A bitmap sector cleared of poison reads as zeros, marking the metadata
/// blocks free: its block fails its checksum, fsck reports it, and a mount
/// rebuilds it and never hands those blocks out.
#[test]
fn a_bitmap_sector_cleared_of_poison_never_frees_metadata_blocks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (img, fs) = common::image_with("daxfs-failure", 64 * MIB, &DeviceOptions::new());
    let sb = fs.superblock().clone();
    let bitmap = sb.bitmap_start * 4096;
    fs.inject_poison(bitmap, 512).unwrap();
    fs.clear_poison(bitmap, 512).unwrap();
    fs.unmount().unwrap();
    drop(fs);
    let dev = Device::open(&img.path, &DeviceOptions::new()).unwrap();
    let mut word = [0xffu8; 8];
    dev.read(bitmap, &mut word).unwrap();
    assert_eq!(word, [0; 8], "the cleared sector reads zeros");
    let (report, dev) = daxfs::fsck(dev, false).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("allocation bitmap at device offset")),
        "{:?}",
        report.problems
    );
    let fs = Fs::mount(dev).unwrap();
    assert!(
        fs.mount_notes()
            .iter()
            .any(|n| n.contains("allocation bitmap at device offset") && n.contains("rebuilt")),
        "{:?}",
        fs.mount_notes()
    );
    // Fill the device: no file gets a block of the metadata area.
    let mut n = 0;
    while let Ok(a) = fs.create_path(format!("/fill{n}"), 0o644, true) {
        if fs.write(a.ino, 0, &[1; 1 << 20]).is_err() {
            break;
        }
        for e in fs.file_extents(a.ino).unwrap() {
            assert!(
                e.device_offset >= sb.data_start * 4096,
                "a metadata block was handed out: {e:?}"
            );
        }
        n += 1;
    }
    assert!(n > 10, "filled {n} MiB");
    fs.unmount().unwrap();
    let dev = fs.into_device().unwrap();
    let (report, _) = daxfs::fsck(dev, false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Poison that a read finds runs memory failure too (handlers are told);
/// so does a scrub, once per page.
#[test]
fn poison_found_by_a_read_or_a_scrub_runs_memory_failure() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_img, fs) = common::image("daxfs-failure");
    let ino = common::pattern_file(&fs, "f", 64 * 1024);
    let told = Arc::new(AtomicU64::new(0));
    {
        let told = told.clone();
        fs.on_memory_failure(Arc::new(move |_| {
            told.fetch_add(1, Ordering::SeqCst);
        }));
    }
    let at = fs.device_offset(ino, 4096).unwrap().unwrap();
    fs.device().inject(at, 512).unwrap(); // behind the filesystem's back
    let mut buf = vec![0u8; 8192];
    assert_eq!(fs.read(ino, 0, &mut buf).unwrap(), 4096, "up to the poison");
    assert_eq!(told.load(Ordering::SeqCst), 1);
    assert_eq!(
        fs.memory_failures()[0].owner,
        Owner::File { ino, offset: 4096 }
    );
    let _ = fs.read(ino, 4096, &mut buf);
    assert_eq!(told.load(Ordering::SeqCst), 1, "once per page");
    let at2 = fs.device_offset(ino, 40960).unwrap().unwrap();
    fs.device().inject(at2, 512).unwrap();
    let found = fs.scrub(&mut |_, _| {}).unwrap();
    assert_eq!(found.len(), 1, "only the new page");
    assert_eq!(found[0].owner, Owner::File { ino, offset: 40960 });
    assert_eq!(told.load(Ordering::SeqCst), 2);
    fs.unmount().unwrap();
}

/// Memory failure racing faults, truncates and writebacks of the same file
/// from other threads, and clearing racing faults: no deadlock (a watchdog
/// ends the process), and no mapping shows the poisoned page afterwards.
#[test]
fn memory_failure_races_faults_truncates_and_writeback() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let done = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(120));
            if !done.load(Ordering::SeqCst) {
                eprintln!("memory failure race: deadlock (120 s)");
                std::process::exit(101);
            }
        });
    }
    let (_img, fs) = common::image("daxfs-failure");
    let ino = common::pattern_file(&fs, "f", 4 * MIB);
    let opts = MapOptions::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let _catcher = Catcher::install();
    std::thread::scope(|s| {
        // Faulting and storing through mappings made and dropped in a loop.
        for t in 0..2u64 {
            let (fs, stop) = (&fs, &stop);
            s.spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: stores of one byte per page; the poisoned page
                    // is avoided (page 3 of each PMD), others are fair game.
                    let mut map = unsafe { fs.mmap(ino, 0, 4 * MIB, opts) }.unwrap();
                    let size = fs.getattr(ino).unwrap().size as usize;
                    for at in (0..size.min(map.len())).step_by(4096 * 5) {
                        if (at / 4096) % 512 != 3 && fs.getattr(ino).unwrap().size as usize > at {
                            map[at + t as usize] = round as u8;
                        }
                    }
                    let _ = map.sync();
                    round += 1;
                }
            });
        }
        // Truncates and writebacks.
        {
            let (fs, stop) = (&fs, &stop);
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    fs.truncate(ino, 4 * MIB).unwrap();
                    fs.fsync(ino).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
        }
        // Poison and clear page 3 of each PMD, over and over.
        let mut rounds = 0;
        while std::time::Instant::now() < deadline {
            for pmd in 0..2u64 {
                let off = pmd * 2 * MIB + 3 * 4096;
                if let Some(at) = fs.device_offset(ino, off).unwrap() {
                    fs.inject_poison(at, 4096).unwrap();
                    fs.clear_poison(at, 4096).unwrap();
                    fs.inject_poison(at, 4096).unwrap();
                }
            }
            rounds += 1;
        }
        stop.store(true, Ordering::SeqCst);
        assert!(rounds > 0);
    });
    // The poison stays on page 3 of each PMD: a fresh mapping must not
    // show it, and the pages around it read fine.
    let failures = fs.memory_failures();
    assert_eq!(failures.len(), 2, "{failures:?}");
    // SAFETY: loads only.
    let map = unsafe { fs.mmap(ino, 0, 4 * MIB, opts) }.unwrap();
    for pmd in 0..2usize {
        let p = map.as_ptr() as usize + pmd * 2 * MIB as usize + 3 * 4096;
        COUNT.store(0, Ordering::SeqCst);
        // SAFETY: a load of a poisoned page, caught.
        unsafe { std::ptr::read_volatile(p as *const u8) };
        assert_eq!(
            COUNT.load(Ordering::SeqCst),
            1,
            "the poisoned page was mapped"
        );
        assert_eq!(CODE.load(Ordering::SeqCst), 4);
        let near = pmd * 2 * MIB as usize + 4 * 4096 + 9;
        assert_eq!(map[near], (near % 251) as u8, "a neighbour");
    }
    drop(map);
    done.store(true, Ordering::SeqCst);
    fs.unmount().unwrap();
}
