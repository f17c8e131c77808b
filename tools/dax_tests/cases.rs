//! The tests, modelled on ndctl's `dax-pmd`, `dax-errors`, `dax-poison` and
//! `mmap`, plus break layouts. Each runs against a [`Target`]: the library
//! or a mount.

use super::sigbus;
use super::target::{check, is_errno, Map, MapFlags, Res, Target};
use std::cell::RefCell;
use std::time::Duration;

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;

/// What a test gets.
pub struct Ctx<'a> {
    pub t: &'a dyn Target,
    /// The test's name (the mmap tests take their flags from it).
    pub name: &'a str,
    /// Size of the file the mmap tests map.
    pub mmap_size: u64,
    /// Remarks for the table (what ran differently here, and why).
    pub notes: RefCell<Vec<String>>,
}

impl Ctx<'_> {
    fn note(&self, text: impl Into<String>) {
        self.notes.borrow_mut().push(text.into());
    }
}

pub type CaseFn = fn(&Ctx) -> Res;

/// The byte a test file holds at `offset` (different on every page).
fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8 ^ ((offset / PAGE) as u8).wrapping_mul(31)
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(offset + i)).collect()
}

/// Create `name` holding `size` bytes of the pattern, written in 2 MiB
/// pieces (so a fresh filesystem lays it out in aligned 2 MiB extents).
fn pattern_file(t: &dyn Target, name: &str, size: u64) -> Res {
    t.create(name)?;
    let mut at = 0;
    while at < size {
        let n = (size - at).min(HUGE) as usize;
        let wrote = t
            .write(name, at, &pattern(at, n))
            .map_err(|e| format!("write {name} at {at}: {e}"))?;
        check!(wrote == n, "write {name} at {at}: {wrote} of {n} bytes");
        at += n as u64;
    }
    t.fsync(name)
}

/// `got` must be the failure `EIO`.
fn want_eio(got: std::io::Result<usize>, what: &str) -> Res {
    check!(
        matches!(&got, Err(e) if is_errno(e, libc::EIO)),
        "{what}: {got:?}, want EIO"
    );
    Ok(())
}

fn read_exact(t: &dyn Target, name: &str, offset: u64, len: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let got = t
        .read(name, offset, &mut buf)
        .map_err(|e| format!("read {name} at {offset}: {e}"))?;
    check!(got == len, "read {name} at {offset}: {got} of {len} bytes");
    Ok(buf)
}

/// Copy `len` bytes out of a mapping with volatile loads.
fn load(map: &dyn Map, offset: usize, len: usize) -> Vec<u8> {
    assert!(offset + len <= map.len(), "a load past the mapping");
    // SAFETY: inside the mapping (checked above).
    (0..len)
        .map(|i| unsafe { map.ptr().add(offset + i).read_volatile() })
        .collect()
}

fn store(map: &dyn Map, offset: usize, data: &[u8]) {
    assert!(offset + data.len() <= map.len(), "a store past the mapping");
    for (i, &b) in data.iter().enumerate() {
        // SAFETY: inside the mapping (checked above), which is writable.
        unsafe { map.ptr().add(offset + i).write_volatile(b) };
    }
}

/// `len` bytes of a mapping from `at`, as a slice for a system call to read
/// from or write into (as ndctl passes its mapping to write(2) and read(2)).
///
/// # Safety
/// `[at, at + len)` lies in a live mapping, and nothing else accesses
/// those bytes while the slice lives.
unsafe fn bytes<'a>(at: *mut u8, len: usize) -> &'a mut [u8] {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts_mut(at, len) }
}

// ---- dax-pmd ---------------------------------------------------------------

/// ndctl's dax-pmd: a file laid out in aligned 2 MiB extents, its aligned
/// extent found through the extent report, the direct-I/O cases on a
/// 2 x 2 MiB mapping of it, and mremap of 4 KiB out of a PMD mapping.
pub fn dax_pmd(cx: &Ctx) -> Res {
    let t = cx.t;
    let file = "dax-pmd-data";
    pattern_file(t, file, 8 * HUGE)?;
    // As dax.sh counts fs_dax:dax_pmd_fault_done events while dax-pmd runs.
    let mut trace = t.trace()?;
    let start = t.dax_stats();
    let before = t.dax_stats();
    // Map 4 x 2 MiB and touch each 2 MiB once.
    {
        let map = t.map(file, 0, 4 * HUGE, MapFlags::SHARED_RW)?;
        for at in (0..4 * HUGE).step_by(HUGE as usize) {
            let got = load(&*map, at as usize + 7, 1)[0];
            check!(
                got == pattern_byte(at + 7),
                "mapping of 4 x 2 MiB: byte {} is {got:#x}",
                at + 7
            );
        }
    }
    if let (Some(b), Some(a)) = (before, t.dax_stats()) {
        check!(
            a.pmd_faults - b.pmd_faults == 4 && a.pte_faults == b.pte_faults,
            "4 x 2 MiB mapped with {} PMD and {} PTE faults, not 4 PMD faults (fallbacks: {a:?})",
            a.pmd_faults - b.pmd_faults,
            a.pte_faults - b.pte_faults
        );
    } else {
        cx.note("PMD fault counts are the library's: a FUSE mapping is the kernel's page cache");
    }

    // The aligned extent, as ndctl finds it with FIEMAP: the first extent
    // longer than 2 x 2 MiB, and its first 2 MiB-aligned device offset.
    let extents = fiemap_or_report(cx, file)?;
    let ext = extents
        .iter()
        .find(|e| e.len > 2 * HUGE)
        .ok_or_else(|| format!("no extent longer than 4 MiB in {extents:?}"))?;
    let p_align = ext.device_offset.next_multiple_of(HUGE) - ext.device_offset;
    let pmd_off = ext.file_offset + p_align;
    check!(
        pmd_off.is_multiple_of(HUGE) && ext.len - p_align >= 2 * HUGE,
        "extent {ext:?}: no 2 x 2 MiB aligned in the file and on the device"
    );

    let before = t.dax_stats();
    for case in 0..5 {
        directio(t, file, pmd_off, case).map_err(|e| format!("direct I/O case {case}: {e}"))?;
    }
    remap(cx, file, pmd_off)?;
    if let (Some(b), Some(a)) = (before, t.dax_stats()) {
        // Every one of the six mappings faults its first 2 MiB as a PMD.
        check!(
            a.pmd_faults - b.pmd_faults >= 6 && a.pte_faults == b.pte_faults,
            "the aligned mappings took {} PMD and {} PTE faults (want at least 6 PMD, no PTE)",
            a.pmd_faults - b.pmd_faults,
            a.pte_faults - b.pte_faults
        );
    }
    match (trace.as_mut(), start, t.dax_stats()) {
        (Some(trace), Some(s), Some(a)) => {
            let took = a.pmd_faults - s.pmd_faults;
            let traced = trace.pmd_nopage(took)?;
            check!(
                traced == took && traced >= 10,
                "the fault trace shows {traced} dax_pmd_fault_done NOPAGE events for {took} PMD \
                 faults (dax.sh wants at least 10)"
            );
        }
        _ => cx.note("no fault trace: the kernel's page cache takes no DAX faults"),
    }
    drop(trace);
    t.unlink(file)
}

/// The file's extents through FIEMAP, checked against the extent report
/// (continuing extents as one). Where mappings are DAX (the library, the
/// preload) FIEMAP must answer; through a plain mount the kernel does not
/// pass it to FUSE, and the report stands in, with a note.
fn fiemap_or_report(cx: &Ctx, file: &str) -> Res<Vec<super::target::Extent>> {
    let t = cx.t;
    let report = t.extents(file)?;
    let mut merged: Vec<super::target::Extent> = Vec::new();
    for e in &report {
        match merged.last_mut() {
            Some(m)
                if m.file_offset + m.len == e.file_offset
                    && m.device_offset + m.len == e.device_offset =>
            {
                m.len += e.len
            }
            _ => merged.push(*e),
        }
    }
    match t.fiemap(file)? {
        Some(found) => {
            check!(
                found == merged,
                "FIEMAP reports {found:?}, the extent report {merged:?}"
            );
            Ok(found)
        }
        None if t.direct() => Err("FIEMAP refused (EOPNOTSUPP) where mappings are DAX".into()),
        None => {
            cx.note(
                "FIEMAP: EOPNOTSUPP (the kernel's VFS answers it and never asks FUSE); \
                 extents from daxfs extents",
            );
            Ok(report)
        }
    }
}

/// One of ndctl's `test_dax_directio` cases: a 2 x 2 MiB mapping at
/// `pmd_off` used as the buffer of write(2) and read(2) on another file.
fn directio(t: &dyn Target, file: &str, pmd_off: u64, case: u32) -> Res {
    let map = t.map(file, pmd_off, 2 * HUGE, MapFlags::SHARED_RW)?;
    let map = &*map;
    let other = "test_dax_data";
    t.create(other)?;
    let page = PAGE as usize;
    match case {
        0 => {
            // write(2) from an unfaulted mapping, then read(2) into it.
            // SAFETY: only the system call touches these bytes meanwhile.
            let wrote = t.write(other, 0, unsafe { bytes(map.ptr(), page) });
            check!(
                matches!(wrote, Ok(n) if n == page),
                "write from an unfaulted mapping: {wrote:?}"
            );
            check!(
                read_exact(t, other, 0, page)? == pattern(pmd_off, page),
                "write from an unfaulted mapping wrote other bytes than the file's"
            );
            // SAFETY: as above.
            let got = t.read(other, 0, unsafe { bytes(map.ptr(), page) });
            check!(
                matches!(got, Ok(n) if n == page),
                "read into the mapping: {got:?}"
            );
            check!(
                load(map, 0, page) == pattern(pmd_off, page),
                "read into the mapping changed it"
            );
        }
        1 => {
            // A write fault, then write(2) from the mapping and read back.
            store(map, 0, b"odirect data\0");
            // SAFETY: as above.
            let wrote = t.write(other, 0, unsafe { bytes(map.ptr(), page) });
            check!(
                matches!(wrote, Ok(n) if n == page),
                "write from a faulted mapping: {wrote:?}"
            );
            let back = read_exact(t, other, 0, page)?;
            check!(
                back.starts_with(b"odirect data\0"),
                "read back {:?}",
                &back[..13]
            );
        }
        2 => {
            // fork with the PMD faulted in: the child sees the same bytes.
            store(map, 0, b"fork data\0");
            // SAFETY: the child only loads from the (faulted) mapping and
            // exits; it takes no lock and allocates nothing.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let same = (0..10).all(|i| {
                    // SAFETY: inside the mapping, faulted in before the fork.
                    unsafe { map.ptr().add(i).read_volatile() == b"fork data\0"[i] }
                });
                // SAFETY: leaving the child at once, without unwinding.
                unsafe { libc::_exit(if same { 0 } else { 1 }) };
            }
            check!(pid > 0, "fork: {}", std::io::Error::last_os_error());
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            check!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the forked child saw other bytes (status {status:#x})"
            );
        }
        3 => {
            // A read fault then a store of the same word (read-only to
            // read-write), which must reach the file.
            // SAFETY: inside the mapping.
            let word = unsafe { (map.ptr() as *const u32).read_volatile() };
            // SAFETY: as above.
            unsafe { (map.ptr() as *mut u32).write_volatile(word ^ 0xA5A5_A5A5) };
            map.sync()?;
            let back = read_exact(t, file, pmd_off, 4)?;
            check!(
                back == (word ^ 0xA5A5_A5A5).to_ne_bytes(),
                "the store after a read fault did not reach the file"
            );
        }
        _ => {
            // write(2) to the other file, then read(2) into an unfaulted
            // mapping: the bytes land in the mapped file.
            let mut buf = b"O_DIRECT write of unfaulted address\n".to_vec();
            buf.resize(page, 0);
            let wrote = t.write(other, 0, &buf);
            check!(matches!(wrote, Ok(n) if n == page), "write: {wrote:?}");
            // SAFETY: as above.
            let got = t.read(other, 0, unsafe { bytes(map.ptr(), page) });
            check!(
                matches!(got, Ok(n) if n == page),
                "read into an unfaulted mapping: {got:?}"
            );
            check!(
                load(map, 0, page) == buf,
                "the mapping does not show what was read"
            );
            map.sync()?;
            check!(
                read_exact(t, file, pmd_off, page)? == buf,
                "read into the mapping did not reach the mapped file"
            );
        }
    }
    t.unlink(other)
}

/// ndctl's `test_dax_remap`: move 4 KiB out of a PMD mapping with mremap
/// onto anonymous memory and touch it; no SIGBUS, and the store reaches
/// the file.
fn remap(cx: &Ctx, file: &str, pmd_off: u64) -> Res {
    let t = cx.t;
    let anon_len = 4 * PAGE as usize;
    // SAFETY: a new anonymous mapping.
    let anon = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            anon_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    check!(
        anon != libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: our anonymous mapping.
    unsafe { std::ptr::write_bytes(anon as *mut u8, b'a', anon_len) };
    let result = (|| {
        let map = t.map(file, pmd_off, 2 * HUGE, MapFlags::SHARED_RW)?;
        store(&*map, 0, &vec![b'i'; 2 * HUGE as usize]);
        let signals = sigbus::count();
        // SAFETY: moves the mapping's first page over our anonymous page.
        let moved = unsafe {
            libc::mremap(
                map.ptr().cast(),
                PAGE as usize,
                PAGE as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                anon,
            )
        };
        if moved == libc::MAP_FAILED {
            cx.note(format!(
                "mremap refused ({}), which ndctl accepts too",
                std::io::Error::last_os_error()
            ));
            return Ok(());
        }
        check!(moved == anon, "mremap moved to {moved:?}, not {anon:?}");
        // SAFETY: the page just moved there, and our own pages after it.
        unsafe {
            let p = anon as *mut u32;
            check!(
                p.read_volatile() == u32::from_ne_bytes(*b"iiii"),
                "the moved page lost its bytes"
            );
            p.write_volatile(0xAA);
            check!(
                p.read_volatile() == 0xAA,
                "a store to the moved page did not stick"
            );
            check!(
                *(anon as *const u8).add(PAGE as usize) == b'a',
                "mremap changed the page after"
            );
            libc::msync(anon, PAGE as usize, libc::MS_SYNC);
        }
        check!(
            sigbus::count() == signals,
            "SIGBUS after mremap: {:?}",
            sigbus::last()
        );
        check!(
            read_exact(t, file, pmd_off, 4)? == 0xAAu32.to_ne_bytes(),
            "the store to the moved page did not reach the file"
        );
        Ok(())
    })();
    // SAFETY: our anonymous range (now partly the moved file page).
    unsafe { libc::munmap(anon, anon_len) };
    result
}

// ---- dax-errors ------------------------------------------------------------

/// ndctl's dax-errors: poison in a file's first page; `list --media-errors`
/// shows it; read(2) gives EIO; a mapped read raises exactly one SIGBUS; a
/// covering write clears it.
pub fn dax_errors(cx: &Ctx) -> Res {
    let t = cx.t;
    let file = "dax-errors-data";
    pattern_file(t, file, 4 * PAGE)?;
    let extents = t.extents(file)?;
    let first = extents.first().ok_or("the file has no extent")?;
    check!(
        first.file_offset == 0,
        "the file starts with a hole: {extents:?}"
    );
    let sector = first.device_offset / 512;
    let covered = |errors: &[(u64, u64)]| {
        errors
            .iter()
            .any(|&(s, n)| s <= sector && sector + 8 <= s + n)
    };
    let before = t.media_errors()?;
    check!(
        !covered(&before),
        "the file's page is poisoned already: {before:?}"
    );
    t.inject(file, 0, PAGE)?;
    let after = t.media_errors()?;
    check!(
        covered(&after),
        "list --media-errors after injection: {after:?}, want sectors {sector}..{}",
        sector + 8
    );

    let mut buf = vec![0u8; PAGE as usize];
    want_eio(t.read(file, 0, &mut buf), "read of the poisoned page")?;
    check!(
        read_exact(t, file, PAGE, PAGE as usize)? == pattern(PAGE, PAGE as usize),
        "the page after the poison reads wrong"
    );

    {
        let map = t.map(file, 0, PAGE, MapFlags::SHARED_RW)?;
        let signals = sigbus::count();
        let _ = load(&*map, 0, PAGE as usize);
        let got = sigbus::count() - signals;
        check!(
            got == 1,
            "a mapped read of the poisoned page raised {got} SIGBUS, want 1"
        );
        let sig = sigbus::last();
        check!(
            sig.addr & !4095 == map.ptr() as usize,
            "SIGBUS at {:#x}, not in the page at {:?}",
            sig.addr,
            map.ptr()
        );
    }

    let zeros = vec![0u8; PAGE as usize];
    let wrote = t.write(file, 0, &zeros);
    check!(
        matches!(wrote, Ok(n) if n == PAGE as usize),
        "covering write: {wrote:?}"
    );
    let cleared = t.media_errors()?;
    check!(
        !covered(&cleared),
        "list --media-errors after the covering write: {cleared:?}"
    );
    check!(
        read_exact(t, file, 0, PAGE as usize)? == zeros,
        "the written page reads wrong"
    );
    let map = t.map(file, 0, PAGE, MapFlags::SHARED_RW)?;
    let signals = sigbus::count();
    check!(
        load(&*map, 0, PAGE as usize) == zeros,
        "the mapping shows other bytes"
    );
    check!(
        sigbus::count() == signals,
        "SIGBUS after the poison was cleared"
    );
    drop(map);
    t.unlink(file)
}

// ---- pmem-errors ------------------------------------------------------------

/// ndctl's pmem-errors.sh, on a file: one bad sector (sector 1) in the
/// file's first page. Direct and buffered 4 KiB reads fail with EIO, and
/// so do reads of the bad sector alone and of the good sector before it
/// (the page is refused whole, as `dax_direct_access` refuses it); the
/// next page reads. A write covering the bad sector, not the page, clears
/// it (as `pmem_clear_poison`), and the page reads what was written.
pub fn pmem_errors(cx: &Ctx) -> Res {
    let t = cx.t;
    let file = "pmem-errors-data";
    pattern_file(t, file, 4 * PAGE)?;
    let first = *t.extents(file)?.first().ok_or("the file has no extent")?;
    check!(first.file_offset == 0, "the file starts with a hole");
    let bad = first.device_offset / 512 + 1;
    let covered = |errors: &[(u64, u64)]| errors.iter().any(|&(s, n)| s <= bad && bad < s + n);
    t.inject(file, 512, 512)?;
    let errors = t.media_errors()?;
    check!(
        covered(&errors),
        "list --media-errors: {errors:?}, want sector {bad}"
    );
    check!(
        !errors.iter().any(|&(s, n)| s < bad && bad < s + n + 1),
        "the sector before the bad one is poisoned too: {errors:?}"
    );
    let mut buf = vec![0u8; PAGE as usize];
    type Read<'a> = &'a dyn Fn(&mut [u8], u64) -> std::io::Result<usize>;
    let direct: Read = &|buf, at| t.read_direct(file, at, buf);
    let buffered: Read = &|buf, at| t.read(file, at, buf);
    for (what, read, at, len) in [
        ("a direct 4 KiB read", direct, 0, PAGE as usize),
        ("a buffered 4 KiB read", buffered, 0, PAGE as usize),
        ("a direct read of the bad sector", direct, 512, 512),
        ("a buffered read of the bad sector", buffered, 512, 512),
        ("a direct read of the good sector before it", direct, 0, 512),
        (
            "a direct read of the page's last sector",
            direct,
            PAGE - 512,
            512,
        ),
    ] {
        want_eio(
            read(&mut buf[..len], at),
            &format!("{what} in the poisoned page"),
        )?;
    }
    let whole = t.read_direct(file, 0, &mut vec![0u8; 3 * PAGE as usize]);
    want_eio(whole, "a read from the poisoned page on")?;
    check!(
        read_exact(t, file, PAGE, PAGE as usize)? == pattern(PAGE, PAGE as usize),
        "the page after the poison reads wrong"
    );
    let wrote = t.write(file, 512, &[0u8; 512]);
    check!(
        matches!(wrote, Ok(512)),
        "a write covering the bad sector: {wrote:?}"
    );
    let errors = t.media_errors()?;
    check!(
        !covered(&errors),
        "still poisoned after the covering write: {errors:?}"
    );
    let mut want = pattern(0, PAGE as usize);
    want[512..1024].fill(0);
    let got = t.read_direct(file, 0, &mut buf);
    check!(
        matches!(got, Ok(n) if n == PAGE as usize) && buf == want,
        "the page after the covering write: {got:?}, other bytes"
    );
    t.unlink(file)
}

// ---- dax-poison ------------------------------------------------------------

/// ndctl's dax-poison: a page of a `MAP_SHARED_VALIDATE | MAP_SYNC`
/// mapping populated up front is poisoned; the access raises
/// `BUS_MCEERR_AR` with `si_addr_lsb` 12; punching a hole there and writing
/// 4 KiB succeeds, and the page maps again.
pub fn dax_poison(cx: &Ctx) -> Res {
    let t = cx.t;
    let file = "dax-poison-data";
    pattern_file(t, file, 2 * HUGE)?;
    let bad = HUGE / 2;
    let map = match t.map_sync(file, 0, 2 * HUGE)? {
        Some(map) => map,
        None => {
            cx.note("FUSE refuses MAP_SYNC (EOPNOTSUPP, checked): ran with MAP_SHARED | MAP_POPULATE; the kernel reports a failed page read as BUS_ADRERR, not BUS_MCEERR_AR");
            t.map(
                file,
                0,
                2 * HUGE,
                MapFlags {
                    populate: true,
                    ..MapFlags::SHARED_RW
                },
            )?
        }
    };
    let map = &*map;
    check!(
        load(map, bad as usize, 8) == pattern(bad, 8),
        "the mapping reads wrong before the poison"
    );
    let faults = |t: &dyn Target| t.dax_stats().map(|s| s.pmd_faults + s.pte_faults);
    t.inject(file, bad, PAGE)?;

    let signals = sigbus::count();
    let addr = map.ptr() as usize + bad as usize + 64;
    // SAFETY: inside the mapping; the catcher maps zeros over the page.
    let _ = unsafe { (addr as *const u32).read_volatile() };
    check!(
        sigbus::count() - signals == 1,
        "{} SIGBUS for one access, want 1",
        sigbus::count() - signals
    );
    let sig = sigbus::last();
    check!(sig.addr == addr, "si_addr {:#x}, want {addr:#x}", sig.addr);
    if t.direct() {
        check!(
            sig.code == sigbus::BUS_MCEERR_AR,
            "si_code {}, want BUS_MCEERR_AR (4)",
            sig.code
        );
        check!(sig.addr_lsb == 12, "si_addr_lsb {}, want 12", sig.addr_lsb);
    } else {
        check!(
            sig.code == sigbus::BUS_ADRERR,
            "si_code {}, want BUS_ADRERR (2)",
            sig.code
        );
    }
    // The rest of the mapping stays (the library: without faulting again).
    let before = faults(t);
    for at in (0..2 * HUGE).step_by(PAGE as usize) {
        if at != bad {
            check!(
                load(map, at as usize + 3, 1)[0] == pattern_byte(at + 3),
                "page at {at} reads wrong after the poison"
            );
        }
    }
    check!(faults(t) == before, "pages around the poison faulted again");
    check!(
        sigbus::count() - signals == 1,
        "SIGBUS from a page that is not poisoned"
    );

    t.punch(file, bad, PAGE)
        .map_err(|e| format!("punch the poisoned page: {e}"))?;
    let data = vec![0x5Au8; PAGE as usize];
    let wrote = t.write(file, bad, &data);
    check!(
        matches!(wrote, Ok(n) if n == PAGE as usize),
        "write 4 KiB at the poisoned offset: {wrote:?}"
    );
    t.fsync(file)?;
    map.restore(bad as usize)?;
    check!(
        load(map, bad as usize, PAGE as usize) == data,
        "the page does not map the written data again"
    );
    check!(
        sigbus::count() - signals == 1,
        "SIGBUS after punch and write"
    );
    t.unlink(file)
}

// ---- truncate of a mapped file ------------------------------------------

/// Break layouts between processes, as ndctl's tests see them: a file of
/// 2 x 2 MiB is mapped and every page touched; another party (a process of
/// its own through a mount, a thread in the library) truncates it to 2 MiB
/// and succeeds; the first 2 MiB still read the file, an access past the
/// new end raises exactly one `SIGBUS` (`BUS_ADRERR`, at its address), and
/// the file has no blocks past 2 MiB any more.
pub fn truncate_mapped(cx: &Ctx) -> Res {
    let t = cx.t;
    let file = "truncate-mapped-data";
    pattern_file(t, file, 2 * HUGE)?;
    let map = t.map(file, 0, 2 * HUGE, MapFlags::SHARED_RW)?;
    let map = &*map;
    for at in (0..2 * HUGE).step_by(PAGE as usize) {
        check!(
            load(map, at as usize, 1)[0] == pattern_byte(at),
            "byte {at} reads wrong before the truncate"
        );
    }
    t.truncate_elsewhere(file, HUGE)?;
    for at in (0..HUGE).step_by(64 * PAGE as usize) {
        check!(
            load(map, at as usize + 9, 1)[0] == pattern_byte(at + 9),
            "byte {} reads wrong after the truncate",
            at + 9
        );
    }
    let signals = sigbus::count();
    let beyond = HUGE as usize + 5 * PAGE as usize + 17;
    let _ = load(map, beyond, 1);
    check!(
        sigbus::count() - signals == 1,
        "{} SIGBUS for an access past the new end, want 1",
        sigbus::count() - signals
    );
    let sig = sigbus::last();
    check!(
        sig.addr == map.ptr() as usize + beyond && sig.code == sigbus::BUS_ADRERR,
        "SIGBUS code {} at {:#x}, want BUS_ADRERR (2) at {:#x}",
        sig.code,
        sig.addr,
        map.ptr() as usize + beyond
    );
    let extents = t.extents(file)?;
    check!(
        extents.iter().all(|e| e.file_offset + e.len <= HUGE),
        "blocks past the new end: {extents:?}"
    );
    t.unlink(file)
}

// ---- mmap ------------------------------------------------------------------

/// The flag sets of ndctl's mmap.sh, each one test.
pub const MMAP_FLAGS: [&str; 18] = [
    "-Mrwps", "-Arwps", "-RMrps", "-rwps", "-Rrps", "-Mrws", "-RMrs", "-rws", "-Rrs", "-Mrwp",
    "-RMrp", "-rwp", "-Rrp", "-Mrw", "-RMr", "-MSr", "-rw", "-Rr",
];

/// ndctl's mmap test: map the whole file with the flags in the test's name
/// (R read-only, M mlock, S no mlock in the first round, A mlockall,
/// p populate, s shared (else private), r read loop, w write loop) and run
/// three rounds of the loops. Then: a shared write loop reached the file, a
/// private one did not, and every read loop read the file's words.
pub fn mmap(cx: &Ctx) -> Res {
    let t = cx.t;
    let flags = cx.name.rsplit('-').next().unwrap_or("");
    let has = |c: char| flags.contains(c);
    let (read_only, mlock, skip, mlockall) = (has('R'), has('M'), has('S'), has('A'));
    let (shared, read_test, write_test) = (has('s'), has('r'), has('w'));
    let file = "mmap-data";
    let size = cx.mmap_size;
    pattern_file(t, file, size)?;
    let mapping = t.map(
        file,
        0,
        size,
        MapFlags {
            write: !read_only,
            shared,
            populate: has('p'),
        },
    )?;
    let map = &*mapping;
    let words = size as usize / 8;
    let ptr = map.ptr() as *mut u64;
    // What a read loop must sum to: the file's words, or all ones once a
    // write loop ran.
    let file_sum = {
        let mut sum = 0u64;
        for chunk in (0..size).step_by(HUGE as usize) {
            let n = (size - chunk).min(HUGE) as usize;
            for w in pattern(chunk, n).chunks_exact(8) {
                sum = sum.wrapping_add(u64::from_ne_bytes(w.try_into().expect("8 bytes")));
            }
        }
        sum
    };
    let mut first_round = true;
    for round in 1..=3 {
        if mlock && !(skip && first_round) {
            map.lock()?;
        } else if mlockall {
            // SAFETY: locks this process's memory; no contents change.
            let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
            check!(rc == 0, "mlockall: {}", std::io::Error::last_os_error());
        }
        if write_test {
            for i in 0..words {
                // SAFETY: inside the writable mapping.
                unsafe { ptr.add(i).write_volatile(1) };
            }
        }
        if read_test {
            let mut sum = 0u64;
            for i in 0..words {
                // SAFETY: inside the mapping.
                sum = sum.wrapping_add(unsafe { ptr.add(i).read_volatile() });
            }
            let want = if write_test { words as u64 } else { file_sum };
            check!(
                sum == want,
                "round {round}: the read loop summed {sum:#x}, want {want:#x}"
            );
        }
        if mlock && !(skip && first_round) {
            map.unlock()?;
        } else if mlockall {
            // SAFETY: undoes mlockall.
            let rc = unsafe { libc::munlockall() };
            check!(rc == 0, "munlockall: {}", std::io::Error::last_os_error());
        }
        first_round = false;
    }
    if write_test && shared {
        map.sync()?;
    }
    drop(mapping);
    // What the file holds now: ones after a shared write loop, else the
    // pattern (a private mapping's stores never reach it).
    for chunk in (0..size).step_by(HUGE as usize) {
        let n = (size - chunk).min(HUGE) as usize;
        let got = read_exact(t, file, chunk, n)?;
        let want = if write_test && shared {
            1u64.to_ne_bytes().repeat(n / 8)
        } else {
            pattern(chunk, n)
        };
        check!(
            got == want,
            "the file at {chunk}..{} holds other bytes after the loops",
            chunk + n as u64
        );
    }
    t.unlink(file)
}

// ---- break layouts ---------------------------------------------------------

/// Truncate and punch while another thread holds a pin: they wait for it,
/// the pinned bytes never change meanwhile, and once it goes the blocks are
/// freed. A break that times out frees nothing.
pub fn break_layouts(cx: &Ctx) -> Res {
    let t = cx.t;
    let fs = t.library().ok_or("pins are a library call")?;
    let file = "layout-data";
    let size = 4 * HUGE;
    pattern_file(t, file, size)?;
    let ino = fs.resolve(format!("/{file}")).map_err(|e| e.to_string())?;
    let free = || fs.statfs().free_blocks;
    let (pin_at, pin_len) = (HUGE + 3 * PAGE, 16 * PAGE);

    for (what, from) in [("punch", HUGE), ("truncate", 0)] {
        let pin = fs
            .pin(ino, pin_at, pin_len)
            .map_err(|e| format!("pin: {e}"))?;
        let free_before = free();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| -> Res {
            let breaker = s.spawn(|| {
                let r = if what == "punch" {
                    fs.punch_hole(ino, from, 2 * HUGE)
                } else {
                    fs.truncate(ino, from)
                };
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                r
            });
            // While the pin holds, the call waits and the bytes stay.
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(60));
                let mut buf = vec![0u8; pin_len as usize];
                pin.read(pin_at, &mut buf)
                    .map_err(|e| format!("read through the pin: {e}"))?;
                check!(
                    buf == pattern(pin_at, pin_len as usize),
                    "the pinned bytes changed under the pin ({what})"
                );
                check!(
                    !done.load(std::sync::atomic::Ordering::SeqCst),
                    "{what} did not wait for the pin"
                );
            }
            check!(
                free() == free_before,
                "{what} freed blocks while they were pinned"
            );
            drop(pin);
            let r = breaker
                .join()
                .map_err(|_| format!("the {what} thread panicked"))?;
            r.map_err(|e| format!("{what} after the pin went: {e}"))
        })?;
        check!(
            free() >= free_before + (2 * HUGE) / PAGE,
            "{what} freed {} blocks, want {}",
            free() - free_before,
            2 * HUGE / PAGE
        );
        pattern_file(t, file, size)?;
    }

    // A break that gives up frees nothing and changes nothing.
    fs.set_layout_timeout(Duration::from_millis(200));
    let pin = fs
        .pin(ino, pin_at, pin_len)
        .map_err(|e| format!("pin: {e}"))?;
    let free_before = free();
    let got = fs.truncate(ino, 0);
    check!(
        matches!(got, Err(daxfs::Error::Busy(_))),
        "a truncate that timed out: {got:?}, want EBUSY"
    );
    check!(free() == free_before, "a timed-out truncate freed blocks");
    drop(pin);
    fs.set_layout_timeout(daxfs::DEFAULT_LAYOUT_TIMEOUT);
    check!(
        read_exact(t, file, 0, size as usize)? == pattern(0, size as usize),
        "a timed-out truncate changed the file"
    );
    t.unlink(file)
}
