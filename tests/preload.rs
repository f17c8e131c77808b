//! The preload library through a real mount: programs' mappings of files
//! on the mount become mappings of the device's own pages (seen in
//! /proc/self/maps as the image, at the file's device offsets), stores
//! reach the file without a copy, layouts are recalled across processes
//! before blocks are freed, and whoever may not have the device gets the
//! kernel's mapping.
//!
//! Each program is this test binary run again with the library preloaded
//! (`CHILD` names what it does), so that its `mmap` calls are libc's, as in
//! any unmodified program; it says what it saw on stdout, one `KEY VALUE`
//! line each, and waits for a line on stdin where the parent acts between.

mod common;

use common::{daxfs, text, Mounted};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const MIB: u64 = 1 << 20;
const CHILD: &str = "DAXFS_PRELOAD_TEST_CHILD";

/// A `KEY VALUE` line for the parent (marked: libtest prints on the line
/// too).
macro_rules! say {
    ($($arg:tt)*) => {
        println!("\n@@ {}", format!($($arg)*))
    };
}

fn library() -> PathBuf {
    let lib = Path::new(env!("CARGO_BIN_EXE_daxfs")).with_file_name("libdaxfs_preload.so");
    assert!(
        lib.exists(),
        "{} is missing: build it with `cargo build -p daxfs-preload` (cargo xtask test does)",
        lib.display()
    );
    lib
}

/// How a program runs.
#[derive(Clone, Copy, PartialEq)]
enum Run<'a> {
    /// With the library, as root.
    Preloaded,
    /// With the library, as uid 65534.
    PreloadedAsNobody,
    /// Without the library.
    Plain,
    /// Through `daxfs exec --mount MNT`.
    Exec(&'a Path),
}

/// This test binary, run as a program doing `what` on `file`.
fn program(test: &str, what: &str, file: &Path, run: Run) -> Child {
    let as_nobody = run == Run::PreloadedAsNobody;
    let me = std::env::current_exe().unwrap();
    let mut cmd = match (as_nobody, run) {
        (true, _) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&me);
            c
        }
        (false, Run::Exec(mount)) => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_daxfs"));
            c.arg("exec").arg("--mount").arg(mount).arg("--").arg(&me);
            c
        }
        (false, _) => Command::new(&me),
    };
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("DAXFS_PRELOAD_DEBUG", "1")
        .env(CHILD, what)
        .env("DAXFS_PRELOAD_TEST_FILE", file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if matches!(run, Run::Preloaded | Run::PreloadedAsNobody) {
        cmd.env("LD_PRELOAD", library());
    }
    cmd.spawn().unwrap()
}

/// The `KEY VALUE` lines a program printed up to `until` (a key), or to its
/// end, in order.
fn said(child: &mut Child, until: Option<&str>) -> Vec<(String, String)> {
    let out = child.stdout.as_mut().unwrap();
    let mut reader = BufReader::new(out);
    let mut seen = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let Some((_, said)) = line.trim_end().split_once("@@ ") else {
            continue;
        };
        if let Some((k, v)) = said.split_once(' ') {
            seen.push((k.to_string(), v.to_string()));
            if Some(k) == until {
                break;
            }
        }
    }
    seen
}

/// The value of the last `key` line.
fn get<'a>(seen: &'a [(String, String)], key: &str) -> &'a str {
    seen.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {seen:?}"))
}

fn finish(mut child: Child) -> (std::process::ExitStatus, String) {
    let _ = child.stdin.take();
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `program(test, what, file, run)`, read what it says up to `until`
/// (or its end), and insist that it succeeds: what it said, and its
/// standard error.
fn run_to_end(
    test: &str,
    what: &str,
    file: &Path,
    run: Run,
    until: Option<&str>,
) -> (Vec<(String, String)>, String) {
    let mut child = program(test, what, file, run);
    let seen = said(&mut child, until);
    let (status, stderr) = finish(child);
    assert!(status.success(), "{stderr}");
    (seen, stderr)
}

/// In a program: the mapping lines of /proc/self/maps inside
/// `[base, base + len)`, as `start-end offset path`.
fn maps_within(base: usize, len: usize) -> Vec<(usize, usize, u64, String)> {
    fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (a, b) = f[0].split_once('-')?;
            let a = usize::from_str_radix(a, 16).ok()?;
            let b = usize::from_str_radix(b, 16).ok()?;
            let off = u64::from_str_radix(f[2], 16).ok()?;
            let path = f.get(5).copied().unwrap_or("").to_string();
            (a < base + len && base < b).then_some((a, b, off, path))
        })
        .collect()
}

/// A library's functions by name (`dlopen` of `lib`, which `package`
/// installs); a missing library or function fails the test, naming it.
fn library_functions(
    lib: &std::ffi::CStr,
    package: &str,
) -> impl Fn(&std::ffi::CStr) -> *mut libc::c_void {
    // SAFETY: dlopen of a NUL-terminated name.
    let handle = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW) };
    assert!(
        !handle.is_null(),
        "{lib:?} is not installed (apt-get install {package})"
    );
    move |name: &std::ffi::CStr| {
        // SAFETY: dlsym on a handle dlopen gave, by a NUL-terminated name.
        let f = unsafe { libc::dlsym(handle, name.as_ptr()) };
        assert!(!f.is_null(), "{name:?}");
        f
    }
}

/// What libpmem2 (PMDK, unmodified, from Debian's package) says of a
/// mapping of the file: `pmem2_map_new` with the coarsest granularity
/// allowed, then `pmem2_map_get_store_granularity` (0 byte, 1 cache line,
/// 2 page), or the error it gives.
fn pmem2_granularity(fd: i32) -> String {
    type New = unsafe extern "C" fn(*mut *mut libc::c_void) -> i32;
    type FromFd = unsafe extern "C" fn(*mut *mut libc::c_void, i32) -> i32;
    type SetGranularity = unsafe extern "C" fn(*mut libc::c_void, i32) -> i32;
    type MapNew = unsafe extern "C" fn(
        *mut *mut libc::c_void,
        *const libc::c_void,
        *const libc::c_void,
    ) -> i32;
    type GetGranularity = unsafe extern "C" fn(*mut libc::c_void) -> i32;
    type ErrorMsg = unsafe extern "C" fn() -> *const libc::c_char;
    // SAFETY: each symbol is libpmem2's function of that name, whose C
    // signature its type spells; the objects it makes are used as its API
    // says.
    unsafe {
        let sym = library_functions(c"libpmem2.so.1", "libpmem2");
        let config_new: New = std::mem::transmute(sym(c"pmem2_config_new"));
        let source_from_fd: FromFd = std::mem::transmute(sym(c"pmem2_source_from_fd"));
        let set: SetGranularity =
            std::mem::transmute(sym(c"pmem2_config_set_required_store_granularity"));
        let map_new: MapNew = std::mem::transmute(sym(c"pmem2_map_new"));
        let get: GetGranularity = std::mem::transmute(sym(c"pmem2_map_get_store_granularity"));
        let errormsg: ErrorMsg = std::mem::transmute(sym(c"pmem2_errormsg"));
        let (mut cfg, mut src, mut map) = (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        assert_eq!(config_new(&mut cfg), 0);
        assert_eq!(source_from_fd(&mut src, fd), 0);
        assert_eq!(set(cfg, 2), 0); // PMEM2_GRANULARITY_PAGE: the coarsest
        if map_new(&mut map, cfg, src) != 0 {
            let why = std::ffi::CStr::from_ptr(errormsg())
                .to_string_lossy()
                .into_owned();
            return format!("error {}", why.replace(' ', "_"));
        }
        get(map).to_string()
    }
}

/// A libpmemobj program (PMDK, unmodified, from Debian's package): open
/// the pool, check that the 512 counters of its root object are equal
/// (`start VALUE`, or `inconsistent`), then add one to all of them in each
/// transaction, for ever (`running` after the first few).
fn pmemobj_counters(pool: &Path) {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Oid {
        pool_uuid_lo: u64,
        off: u64,
    }
    const N: usize = 512;
    type Open = unsafe extern "C" fn(*const libc::c_char, *const libc::c_char) -> *mut libc::c_void;
    type Root = unsafe extern "C" fn(*mut libc::c_void, usize) -> Oid;
    type Direct = unsafe extern "C" fn(Oid) -> *mut libc::c_void;
    type Begin = unsafe extern "C" fn(*mut libc::c_void, *mut libc::c_void, ...) -> i32;
    type AddRange = unsafe extern "C" fn(Oid, u64, usize) -> i32;
    type Step = unsafe extern "C" fn() -> i32;
    type ErrorMsg = unsafe extern "C" fn() -> *const libc::c_char;
    // SAFETY: each symbol is libpmemobj's function of that name, whose C
    // signature its type spells; the pool and root object are used as its
    // API says.
    unsafe {
        let sym = library_functions(c"libpmemobj.so.1", "libpmemobj1");
        let open: Open = std::mem::transmute(sym(c"pmemobj_open"));
        let root: Root = std::mem::transmute(sym(c"pmemobj_root"));
        let direct: Direct = std::mem::transmute(sym(c"pmemobj_direct"));
        let begin: Begin = std::mem::transmute(sym(c"pmemobj_tx_begin"));
        let add_range: AddRange = std::mem::transmute(sym(c"pmemobj_tx_add_range"));
        let commit: Step = std::mem::transmute(sym(c"pmemobj_tx_commit"));
        let end: Step = std::mem::transmute(sym(c"pmemobj_tx_end"));
        let errormsg: ErrorMsg = std::mem::transmute(sym(c"pmemobj_errormsg"));
        let path = std::ffi::CString::new(pool.as_os_str().as_encoded_bytes()).unwrap();
        let pop = open(path.as_ptr(), c"daxfs".as_ptr());
        if pop.is_null() {
            let why = std::ffi::CStr::from_ptr(errormsg())
                .to_string_lossy()
                .into_owned();
            say!("error {}", why.replace(' ', "_"));
            return;
        }
        let oid = root(pop, N * 8);
        let counters = direct(oid) as *mut u64;
        let first = *counters;
        let consistent = (0..N).all(|i| *counters.add(i) == first);
        match consistent {
            true => say!("start {first}"),
            false => {
                say!("inconsistent 1");
                return;
            }
        }
        for round in 0u64.. {
            assert_eq!(begin(pop, std::ptr::null_mut(), 0i32), 0, "tx_begin");
            assert_eq!(add_range(oid, 0, N * 8), 0, "tx_add_range");
            for i in 0..N {
                *counters.add(i) += 1;
            }
            assert_eq!(commit(), 0, "tx_commit");
            end();
            if round == 20 {
                let (pmd, pte) = faults();
                say!("faults {}", pmd + pte);
                say!("running 1");
            }
        }
    }
}

/// The library's fault counters in this program: PMD and PTE faults.
fn faults() -> (u64, u64) {
    // SAFETY: looks a symbol up by a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"daxfs_preload_stats".as_ptr()) };
    assert!(!f.is_null(), "the library is not loaded");
    type Stats = unsafe extern "C" fn(*mut u64, usize) -> usize;
    // SAFETY: the library's function of that name has this signature.
    let stats: Stats = unsafe { std::mem::transmute::<*mut libc::c_void, Stats>(f) };
    let mut out = [0u64; 2];
    // SAFETY: room for two values.
    unsafe { stats(out.as_mut_ptr(), 2) };
    (out[0], out[1])
}

/// Print `@@ bus CODE ADDR LSB` at the next SIGBUS, and exit.
fn on_sigbus_say_and_exit() {
    extern "C" fn handler(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel's (or the library's) siginfo of a SIGBUS.
        let bus = unsafe { daxfs::BusSignal::read(info) };
        // Async-signal-safe: digits into a buffer of our own, one write.
        let mut buf = [0u8; 96];
        let mut n = 0;
        for b in b"\n@@ bus " {
            buf[n] = *b;
            n += 1;
        }
        for (i, value) in [bus.code as u64, bus.addr as u64, bus.addr_lsb as u64]
            .into_iter()
            .enumerate()
        {
            let mut digits = [0u8; 20];
            let (mut v, mut d) = (value, 0);
            loop {
                digits[d] = b'0' + (v % 10) as u8;
                d += 1;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            while d > 0 {
                d -= 1;
                buf[n] = digits[d];
                n += 1;
            }
            buf[n] = if i == 2 { b'\n' } else { b' ' };
            n += 1;
        }
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(1, buf.as_ptr().cast(), n);
            libc::_exit(0);
        }
    }
    // SAFETY: installs a handler for SIGBUS with a valid sigaction.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()), 0);
    }
}

fn wait_for_parent() {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

/// A program's side of every test here.
fn child_main(what: &str) {
    let file = PathBuf::from(std::env::var_os("DAXFS_PRELOAD_TEST_FILE").unwrap());
    let f = OpenOptions::new().read(true).write(true).open(&file);
    let f = match f {
        Ok(f) => f,
        Err(_) => OpenOptions::new().read(true).open(&file).unwrap(),
    };
    let len = f.metadata().unwrap().len() as usize;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let map = |flags: i32, prot: i32| {
        // SAFETY: a new mapping of a file we opened, at an address the
        // kernel (or the library) picks.
        unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) }
    };
    let mapped = |flags: i32, prot: i32| {
        let p = map(flags, prot);
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        p as *mut u8
    };
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    match what {
        "store" => {
            let p = mapped(libc::MAP_SHARED, rw);
            // SAFETY: loads inside the mapping.
            unsafe {
                say!("first {}", *p.add(4096));
                say!("second {}", *p.add(2 * MIB as usize + 4096));
            }
            let (pmd, pte) = faults();
            say!("faults {pmd} {pte}");
            say!("base {:x}", p as usize);
            for (a, b, off, path) in maps_within(p as usize, len) {
                say!("piece {a:x} {b:x} {off} {path}");
            }
            // SAFETY: stores inside the mapping, then its msync.
            unsafe {
                std::ptr::copy_nonoverlapping(b"through the mapping".as_ptr(), p.add(8192), 19);
                assert_eq!(libc::msync(p.cast(), len, libc::MS_SYNC), 0);
            }
            // SAFETY: our mapping, unmapped once.
            assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
            let left = maps_within(p as usize, len);
            say!("unmapped {}", !left.iter().any(|m| m.3.contains(".img")));
        }
        "sync" => {
            let sync = 0x80000 | 0x03; // MAP_SYNC | MAP_SHARED_VALIDATE
            let p = map(sync, rw);
            let errno = match p == libc::MAP_FAILED {
                true => std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                false => 0,
            };
            say!("mapped {} {errno}", p != libc::MAP_FAILED);
        }
        "hole" => {
            let p = mapped(libc::MAP_SHARED, rw);
            let other = mapped(libc::MAP_SHARED, libc::PROT_READ);
            // SAFETY: loads and stores inside the mappings, into holes.
            unsafe {
                say!("hole {}", std::ptr::read_volatile(other.add(3 * 4096 + 5)));
                *p.add(3 * 4096 + 5) = 0xAB;
                *p.add(2 * MIB as usize + 7) = 0xCD;
                // The other mapping showed the hole: it shows the data now.
                say!("other {}", std::ptr::read_volatile(other.add(3 * 4096 + 5)));
                say!(
                    "far {}",
                    std::ptr::read_volatile(other.add(2 * MIB as usize + 7))
                );
            }
            let shown = maps_within(p as usize, len);
            say!("image {}", shown.iter().any(|m| m.3.contains(".img")));
        }
        "recall" => {
            let p = mapped(libc::MAP_SHARED, libc::PROT_READ);
            // SAFETY: a load inside the mapping.
            say!("before {}", unsafe { *p.add(5000) });
            let n = maps_within(p as usize, len)
                .iter()
                .filter(|m| m.3.contains(".img"))
                .count();
            say!("mapped {n}");
            wait_for_parent();
            let n = maps_within(p as usize, len)
                .iter()
                .filter(|m| m.3.contains(".img"))
                .count();
            say!("after {n}");
            // The file is empty now: this load raises SIGBUS.
            // SAFETY: a load inside the mapping (which SIGBUS ends).
            let v = unsafe { std::ptr::read_volatile(p.add(5000)) };
            say!("read {v}");
        }
        "poison" => {
            let p = mapped(libc::MAP_SHARED, rw);
            // SAFETY: a load inside the mapping.
            say!("before {}", unsafe {
                std::ptr::read_volatile(p.add(4096 + 100))
            });
            say!("addr {}", p as usize + 4096 + 100);
            wait_for_parent();
            on_sigbus_say_and_exit();
            // SAFETY: a load inside the mapping, of a poisoned page: SIGBUS.
            let v = unsafe { std::ptr::read_volatile(p.add(4096 + 100)) };
            say!("read {v}");
        }
        "fork" => {
            let p = mapped(libc::MAP_SHARED, libc::PROT_READ);
            // SAFETY: loads inside the mapping.
            let before = unsafe { *p.add(100) + *p.add(4096 + 100) };
            // SAFETY: fork; the child runs only the code below, then exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let shown = maps_within(p as usize, len)
                    .iter()
                    .filter(|m| m.3.contains(".img"))
                    .count();
                say!("inherited {shown} {before}");
                say!("mapped 1");
                wait_for_parent();
                let n = maps_within(p as usize, len)
                    .iter()
                    .filter(|m| m.3.contains(".img"))
                    .count();
                say!("after {n}");
                // SAFETY: a load inside the mapping: past the end of the
                // file now, so SIGBUS.
                let v = unsafe { std::ptr::read_volatile(p.add(100)) };
                say!("read {v}");
                // SAFETY: leaves the child without running the parent's code.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: waits for the child just forked.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            say!(
                "child {}",
                if libc::WIFSIGNALED(status) {
                    libc::WTERMSIG(status)
                } else {
                    -1
                }
            );
        }
        "pmem2" => say!("granularity {}", pmem2_granularity(fd)),
        "holes" => {
            let p = mapped(libc::MAP_SHARED, libc::PROT_READ);
            let count = || {
                let (pmd, pte) = faults();
                pmd + pte
            };
            // SAFETY: loads inside the mapping.
            unsafe {
                say!(
                    "before {} {}",
                    std::ptr::read_volatile(p),
                    std::ptr::read_volatile(p.add(5 * 4096))
                );
                let faulted = count();
                say!("ready 1");
                wait_for_parent();
                say!(
                    "after {} {}",
                    std::ptr::read_volatile(p),
                    std::ptr::read_volatile(p.add(5 * 4096))
                );
                say!("faults {}", count() - faulted);
            }
        }
        "unmap-part" | "unmap-touch" => {
            let p = mapped(libc::MAP_SHARED, rw);
            // SAFETY: loads and stores inside the mapping; munmap of parts
            // of it, and loads only of the parts left (but the last one of
            // "unmap-touch", which SIGSEGV ends).
            unsafe {
                for page in 0..3 {
                    *p.add(page * 4096) = page as u8 + 1;
                }
                say!("middle {}", libc::munmap(p.add(4096).cast(), 4096));
                say!("ends {} {}", *p, *p.add(8192));
                if what == "unmap-touch" {
                    let v = std::ptr::read_volatile(p.add(4096));
                    say!("touched {v}");
                }
                say!("first {}", libc::munmap(p.cast(), 4096));
                say!("last {}", libc::munmap(p.add(8192).cast(), 4096));
            }
            say!("left {}", maps_within(p as usize, len).len());
        }
        "trace-touch" => {
            let p = mapped(libc::MAP_SHARED, libc::PROT_READ);
            // SAFETY: loads inside the mapping (two aligned 2 MiB), then a
            // mapping 4 KiB into the file (no 2 MiB fits) and a load in it.
            unsafe {
                std::ptr::read_volatile(p);
                std::ptr::read_volatile(p.add(2 * MIB as usize));
                let q = libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    4096,
                );
                assert_ne!(q, libc::MAP_FAILED);
                std::ptr::read_volatile(q as *const u8);
            }
            say!("pid {}", std::process::id());
        }
        "fiemap" => {
            // FS_IOC_FIEMAP as filefrag and ndctl's dax-pmd make it: a
            // header, then room for `count` extents.
            let fiemap = |start: u64, len: u64, flags: u32, count: u32| {
                let mut buf = vec![0u64; (32 + 56 * count as usize) / 8];
                buf[0] = start;
                buf[1] = len;
                // fm_flags, then fm_mapped_extents; fm_extent_count.
                buf[2] = flags as u64;
                buf[3] = count as u64;
                // SAFETY: a header and room for `count` extents.
                let rc = unsafe { libc::ioctl(fd, 0xC020_660B, buf.as_mut_ptr()) };
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap();
                let mapped = (buf[2] >> 32) as usize;
                let extents: Vec<String> = (0..mapped.min(count as usize))
                    .map(|i| {
                        let e = &buf[4 + i * 7..4 + i * 7 + 7];
                        format!("{}+{}@{}/{}", e[0], e[2], e[1], e[5] as u32)
                    })
                    .collect();
                match rc {
                    0 => format!("{mapped} {}", extents.join(" ")).trim().to_string(),
                    _ => format!("errno {errno} flags {}", buf[2] as u32),
                }
            };
            say!("count {}", fiemap(0, u64::MAX, 0, 0));
            say!("all {}", fiemap(0, u64::MAX, 1, 64));
            say!("first {}", fiemap(0, u64::MAX, 0, 1));
            say!("range {}", fiemap(2 * MIB + 1, 1, 0, 64));
            say!("xattr {}", fiemap(0, u64::MAX, 2, 64));
            say!("empty {}", fiemap(0, 0, 0, 64));
        }
        "shrink" | "shrink-touch" => {
            let p = mapped(libc::MAP_SHARED, rw);
            // SAFETY: stores inside the mapping; mremap shrinking it in
            // place, then accesses to what it kept (and for "shrink-touch"
            // one past it, which SIGSEGV ends).
            unsafe {
                *p = 1;
                *p.add(4096) = 2;
                let flags = if what == "shrink" {
                    0
                } else {
                    libc::MREMAP_MAYMOVE
                };
                let kept = libc::mremap(p.cast(), 3 * 4096, 4096 + 1, flags) as *mut u8;
                say!("in-place {}", kept == p);
                say!("kept {} {}", *p, *p.add(4096));
                *p.add(4096) = 3;
                if what == "shrink-touch" {
                    let v = std::ptr::read_volatile(p.add(2 * 4096));
                    say!("touched {v}");
                }
                say!("rest {}", libc::munmap(p.cast(), 2 * 4096));
            }
            say!("left {}", maps_within(p as usize, len).len());
        }
        "move" => {
            let p = mapped(libc::MAP_SHARED, rw);
            // SAFETY: stores inside the mapping; mremap of its second page
            // elsewhere, and accesses to where it went.
            unsafe {
                *p.add(4096) = b'a';
                let before = faults();
                let moved =
                    libc::mremap(p.add(4096).cast(), 4096, 4096, libc::MREMAP_MAYMOVE) as *mut u8;
                assert_ne!(moved as *mut libc::c_void, libc::MAP_FAILED);
                say!("moved {}", std::ptr::read_volatile(moved));
                std::ptr::write_volatile(moved.add(1), b'b');
                let after = faults();
                say!("faults {}", (after.0 + after.1) - (before.0 + before.1));
                say!("stays {}", *p);
                let shown = maps_within(moved as usize, 4096);
                say!("image {}", shown.iter().any(|m| m.3.contains(".img")));
            }
        }
        "early" => {
            // Set before the first mapping: the library's threads (which
            // hear of the poison) inherit it, as threads do.
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_MCE_KILL,
                    libc::PR_MCE_KILL_SET,
                    libc::PR_MCE_KILL_EARLY,
                    0,
                    0,
                )
            };
            assert_eq!(rc, 0);
            on_sigbus_say_and_exit();
            let p = mapped(libc::MAP_SHARED, libc::PROT_READ);
            // SAFETY: a load inside the mapping.
            say!("before {}", unsafe { std::ptr::read_volatile(p.add(4096)) });
            say!("page {}", p as usize + 4096);
            // Never touches the page again: only early notice ends this.
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
            say!("no notice 1");
        }
        "fsync" => {
            let p = mapped(libc::MAP_SHARED, rw);
            let count = || {
                let (pmd, pte) = faults();
                pmd + pte
            };
            // SAFETY: stores inside the mapping; fsync of our descriptor.
            unsafe {
                std::ptr::write_volatile(p, 1);
                let dirtied = count();
                std::ptr::write_volatile(p.add(1), 2);
                say!("again {}", count() - dirtied);
                say!("fsync {}", libc::fsync(fd));
                std::ptr::write_volatile(p.add(2), 3);
                say!("after {}", count() - dirtied);
            }
        }
        "pmemobj" => pmemobj_counters(&file),
        "protect" => {
            let p = mapped(libc::MAP_SHARED, rw);
            // SAFETY: stores and loads inside the mapping, mprotect of it.
            unsafe {
                *p = 1;
                say!(
                    "readonly {}",
                    libc::mprotect(p.cast(), len, libc::PROT_READ)
                );
                say!("read {}", std::ptr::read_volatile(p));
                say!("writable {}", libc::mprotect(p.cast(), len, rw));
                *p.add(4096) = 2;
                say!("none {}", libc::mprotect(p.cast(), len, libc::PROT_NONE));
                say!(
                    "readonly {}",
                    libc::mprotect(p.cast(), len, libc::PROT_READ)
                );
                std::ptr::write_volatile(p.add(8192), 3);
                say!("stored 3");
            }
        }
        "kernel" => {
            let p = mapped(libc::MAP_SHARED, libc::PROT_READ);
            // SAFETY: a load inside the mapping.
            say!("first {}", unsafe { *p.add(4096) });
            let shown = maps_within(p as usize, len);
            say!("image {}", shown.iter().any(|m| m.3.contains(".img")));
        }
        other => panic!("no such program {other}"),
    }
    say!("done 1");
}

fn run_child() -> bool {
    match std::env::var(CHILD) {
        Ok(what) => {
            child_main(&what);
            true
        }
        Err(_) => false,
    }
}

/// Poison `sectors` sectors of `file` from byte `offset`, through the
/// mount's daemon (`daxfs inject-error`), which returns once memory
/// failure is over for every process.
fn inject(m: &Mounted, file: &Path, offset: u64, sectors: u64) {
    let (offset, sectors) = (offset.to_string(), sectors.to_string());
    let out = daxfs(&[
        "inject-error".as_ref(),
        m.mnt.as_os_str(),
        "--file".as_ref(),
        file.as_os_str(),
        "--offset".as_ref(),
        offset.as_ref(),
        "--count".as_ref(),
        sectors.as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A new file of `len` bytes, all hole, open for reading and writing.
fn sparse(path: &Path, len: u64) -> std::fs::File {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.set_len(len).unwrap();
    f
}

/// The extents of `file` as `(file offset, device offset, length)`
/// (`daxfs extents`).
fn extents(file: &Path) -> Vec<(u64, u64, u64)> {
    let out = daxfs(&["extents".as_ref(), "--json".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["file_offset"].as_u64().unwrap(),
                e["device_offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A program maps a file of the mount: the pieces are the image's pages at
/// the file's device offsets (2 MiB pieces where the file has aligned
/// 2 MiB extents), its loads see the file, its stores reach the file with
/// no write through the mount, and munmap gives the pages back.
#[test]
fn a_programs_mapping_is_the_devices_own_pages() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    let f = sparse(&file, 4 * MIB);
    // (Preallocated: aligned 2 MiB extents.)
    let out = Command::new("fallocate")
        .args(["-l", "4MiB"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    f.write_all_at(&[7u8; 4096], 4096).unwrap();
    let layout = extents(&file);
    let (seen, _) = run_to_end(
        "a_programs_mapping_is_the_devices_own_pages",
        "store",
        &file,
        Run::Preloaded,
        Some("done"),
    );
    assert_eq!(get(&seen, "first"), "7", "{seen:?}");
    assert_eq!(get(&seen, "second"), "0");
    // Both 2 MiB of the file are aligned extents: one PMD fault each.
    assert_eq!(get(&seen, "faults"), "2 0", "PMD and PTE faults");
    let mut buf = [0u8; 19];
    f.read_exact_at(&mut buf, 8192).unwrap();
    assert_eq!(&buf, b"through the mapping");
    assert_eq!(
        get(&seen, "unmapped"),
        "true",
        "munmap left pieces: {seen:?}"
    );
    let base = usize::from_str_radix(get(&seen, "base"), 16).unwrap();
    let image = fs::canonicalize(&m.img).unwrap();
    let mut huge = 0;
    for (_, piece) in seen.iter().filter(|(k, _)| k == "piece") {
        let f: Vec<&str> = piece.split(' ').collect();
        let (a, b) = (
            usize::from_str_radix(f[0], 16).unwrap(),
            usize::from_str_radix(f[1], 16).unwrap(),
        );
        let device_offset: u64 = f[2].parse().unwrap();
        if Path::new(f.get(3).copied().unwrap_or("")) != image {
            continue; // (not faulted yet)
        }
        for at in (a..b).step_by(4096) {
            let file_offset = (at - base) as u64;
            let device = device_offset + (at - a) as u64;
            let e = layout
                .iter()
                .find(|e| e.0 <= file_offset && file_offset < e.0 + e.2)
                .unwrap_or_else(|| panic!("a piece at {file_offset} outside {layout:?}"));
            assert_eq!(device, e.1 + (file_offset - e.0), "{piece} vs {e:?}");
        }
        if (b - a) % (2 * MIB as usize) == 0 && a % (2 * MIB as usize) == 0 {
            huge += 1;
        }
    }
    let aligned = layout
        .iter()
        .filter(|e| e.0 % (2 * MIB) == 0 && e.1 % (2 * MIB) == 0 && e.2 >= 2 * MIB)
        .count();
    assert!(aligned > 0, "fallocate gave no aligned extent: {layout:?}");
    assert!(huge >= 1, "no 2 MiB piece for an aligned extent: {seen:?}");
}

/// Stores into holes of a sparse file: each write fault gets zeroed blocks,
/// committed before it returns (MAP_SYNC's promise), and the bytes are the
/// file's at once, with no msync, for a reader through the mount.
#[test]
fn stores_into_holes_get_blocks_before_the_fault_returns() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("sparse");
    let f = sparse(&file, 4 * MIB);
    assert!(extents(&file).is_empty());
    let test = "stores_into_holes_get_blocks_before_the_fault_returns";
    let (seen, stderr) = run_to_end(test, "hole", &file, Run::Preloaded, Some("done"));
    assert_eq!(get(&seen, "image"), "true", "{stderr}");
    assert_eq!(get(&seen, "hole"), "0");
    assert_eq!(
        get(&seen, "other"),
        "171",
        "a stale zero page in another mapping"
    );
    assert_eq!(get(&seen, "far"), "205");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 3 * 4096 + 5).unwrap();
    assert_eq!(b[0], 0xAB);
    f.read_exact_at(&mut b, 2 * MIB + 7).unwrap();
    assert_eq!(b[0], 0xCD);
    let mut rest = vec![0u8; 4096];
    f.read_exact_at(&mut rest, 3 * 4096).unwrap();
    assert!(rest
        .iter()
        .enumerate()
        .all(|(i, &x)| x == if i == 5 { 0xAB } else { 0 }));
    let layout = extents(&file);
    for at in [3 * 4096, 2 * MIB] {
        assert!(
            layout.iter().any(|e| e.0 <= at && at < e.0 + e.2),
            "no block at {at}: {layout:?}"
        );
    }
}

/// A truncate through the mount recalls the layout from the program that
/// maps the file, which unmaps the range and answers; only then are the
/// blocks freed, and the truncate succeeds. The program's next access to
/// the range faults anew, past the end of the file now: SIGBUS.
#[test]
fn a_truncate_recalls_a_programs_mapping_before_freeing() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![9u8; 3 * 4096]).unwrap();
    let test = "a_truncate_recalls_a_programs_mapping_before_freeing";
    let mut child = program(test, "recall", &file, Run::Preloaded);
    let seen = said(&mut child, Some("mapped"));
    assert_eq!(get(&seen, "before"), "9", "{seen:?}");
    assert!(
        get(&seen, "mapped").parse::<u32>().unwrap() >= 1,
        "{seen:?}"
    );
    let free = fs::metadata(&file).unwrap();
    assert_eq!(free.len(), 3 * 4096);
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .expect("the truncate waits for the recall, then frees");
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    let seen = said(&mut child, None);
    let (status, stderr) = finish(child);
    assert_eq!(get(&seen, "after"), "0", "pieces left after the recall");
    assert!(
        !seen.iter().any(|(k, _)| k == "read"),
        "a load past EOF: {seen:?}"
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?} {stderr}");
    assert!(extents(&file).is_empty());
}

/// The device goes only to the mount's owner and root: another user's
/// program gets the kernel's mapping (the same bytes), and the library
/// says why when asked to.
#[test]
fn another_user_gets_the_kernels_mapping() {
    if run_child() {
        return;
    }
    let m = Mounted::new("allow_other");
    let file = m.path("f");
    fs::write(&file, vec![5u8; 8192]).unwrap();
    let test = "another_user_gets_the_kernels_mapping";
    let mut child = program(test, "kernel", &file, Run::PreloadedAsNobody);
    let seen = said(&mut child, Some("done"));
    let (status, stderr) = finish(child);
    assert!(status.success(), "{stderr}");
    assert_eq!(get(&seen, "first"), "5");
    assert_eq!(get(&seen, "image"), "false");
    assert!(stderr.contains("permission denied"), "{stderr}");
    // Root (the owner) gets the device's pages.
    let (seen, _) = run_to_end(test, "kernel", &file, Run::Preloaded, Some("done"));
    assert_eq!(get(&seen, "image"), "true");
}

/// MAP_SYNC (with MAP_SHARED_VALIDATE) is accepted for a mapping of the
/// device's pages, and refused (EOPNOTSUPP) by the kernel's FUSE mapping,
/// as Linux refuses it on a filesystem without DAX.
#[test]
fn map_sync_is_accepted_only_for_the_devices_pages() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![1u8; 8192]).unwrap();
    let test = "map_sync_is_accepted_only_for_the_devices_pages";
    for (run, expect) in [
        (Run::Preloaded, "true 0".to_string()),
        (Run::Plain, format!("false {}", libc::EOPNOTSUPP)),
    ] {
        let (seen, _) = run_to_end(test, "sync", &file, run, Some("done"));
        assert_eq!(get(&seen, "mapped"), expect);
    }
}

/// Poison injected into a page a program maps (through the mount's
/// daemon) reaches the program: its next access raises SIGBUS with
/// BUS_MCEERR_AR, the exact address and si_addr_lsb 12, as on Linux fsdax.
/// A write through the mount that covers the page clears the poison, and
/// the page maps again with the new data.
#[test]
fn poison_reaches_a_programs_mapping_and_a_covering_write_clears_it() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![3u8; 3 * 4096]).unwrap();
    let test = "poison_reaches_a_programs_mapping_and_a_covering_write_clears_it";
    let mut child = program(test, "poison", &file, Run::Preloaded);
    let seen = said(&mut child, Some("addr"));
    assert_eq!(get(&seen, "before"), "3", "{seen:?}");
    let addr = get(&seen, "addr").to_string();
    inject(&m, &file, 4096, 8);
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    let seen = said(&mut child, None);
    let (status, stderr) = finish(child);
    assert!(status.success(), "{status:?} {stderr}");
    assert!(!seen.iter().any(|(k, _)| k == "read"), "{seen:?}");
    assert_eq!(get(&seen, "bus"), format!("4 {addr} 12"), "{stderr}");

    // A write of the whole page clears it.
    let f = OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&[6u8; 4096], 4096).unwrap();
    let mut child = program(test, "poison", &file, Run::Preloaded);
    let seen = said(&mut child, Some("addr"));
    assert_eq!(get(&seen, "before"), "6", "{seen:?}");
    drop(finish(child));
}

/// A program that does not answer a recall (stopped here) makes the
/// truncate fail with EBUSY after the layout timeout, freeing nothing: the
/// program's mapping still shows the file's data. Once it is gone (killed:
/// the daemon sees its session close), its leases are too, and the
/// truncate goes through.
#[test]
fn a_program_that_does_not_answer_holds_the_blocks_until_it_is_gone() {
    if run_child() {
        return;
    }
    let m = Mounted::new("layout_timeout=1");
    let file = m.path("f");
    fs::write(&file, vec![9u8; 3 * 4096]).unwrap();
    let test = "a_program_that_does_not_answer_holds_the_blocks_until_it_is_gone";
    let mut child = program(test, "recall", &file, Run::Preloaded);
    let seen = said(&mut child, Some("mapped"));
    assert_eq!(get(&seen, "before"), "9", "{seen:?}");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let err = f.set_len(0).expect_err("freed under a mapping");
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    assert_eq!(f.metadata().unwrap().len(), 3 * 4096);
    let mut back = vec![0u8; 3 * 4096];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 9));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = finish(child);
    f.set_len(0).expect("the leases went with the program");
    assert!(extents(&file).is_empty());
}

/// A child after fork keeps the parent's mappings working, and the daemon
/// knows it maps them: a truncate recalls the layout from both processes
/// before it frees, and the child's next access faults anew (SIGBUS past
/// the end of the file) instead of reading freed blocks.
#[test]
fn a_forked_child_holds_leases_of_its_own() {
    if run_child() {
        return;
    }
    let m = Mounted::new("layout_timeout=10");
    let file = m.path("f");
    fs::write(&file, vec![9u8; 3 * 4096]).unwrap();
    let test = "a_forked_child_holds_leases_of_its_own";
    let mut child = program(test, "fork", &file, Run::Preloaded);
    let seen = said(&mut child, Some("mapped"));
    assert_eq!(get(&seen, "inherited"), "1 18", "{seen:?}");
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .expect("both processes answer the recall");
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    let seen = said(&mut child, None);
    let (status, stderr) = finish(child);
    assert!(status.success(), "{stderr}");
    assert_eq!(get(&seen, "after"), "0", "{seen:?} {stderr}");
    assert!(
        !seen.iter().any(|(k, _)| k == "read"),
        "read freed blocks: {seen:?}"
    );
    assert_eq!(get(&seen, "child"), libc::SIGBUS.to_string());
}

/// PMDK's libpmem2, unmodified, maps a file on the mount: with the preload
/// it gets MAP_SYNC and reports cache-line store granularity (flushes
/// reach persistence, as on fsdax); without it, page granularity (msync),
/// as on any filesystem without DAX.
#[test]
fn libpmem2_sees_cache_line_granularity_only_through_the_preload() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("pool");
    fs::write(&file, vec![0u8; 4 << 20]).unwrap();
    let test = "libpmem2_sees_cache_line_granularity_only_through_the_preload";
    for (run, expect) in [(Run::Preloaded, "1"), (Run::Plain, "2")] {
        let (seen, stderr) = run_to_end(test, "pmem2", &file, run, Some("done"));
        assert_eq!(get(&seen, "granularity"), expect, "{stderr}");
    }
}

/// mprotect of a whole mapping between read-only and read-write works as
/// the kernel's: read-only, a store raises SIGSEGV (and changes nothing);
/// writable again, stores reach the file. Other protections are refused.
#[test]
fn mprotect_makes_a_mapping_read_only_and_writable_again() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![0u8; 3 * 4096]).unwrap();
    let test = "mprotect_makes_a_mapping_read_only_and_writable_again";
    let mut child = program(test, "protect", &file, Run::Preloaded);
    let seen = said(&mut child, None);
    let (status, stderr) = finish(child);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGSEGV), "{seen:?} {stderr}");
    assert_eq!(get(&seen, "read"), "1");
    assert_eq!(get(&seen, "writable"), "0");
    assert_eq!(get(&seen, "none"), "-1");
    assert!(
        seen.iter()
            .filter(|(k, v)| k == "readonly" && v == "0")
            .count()
            == 2
    );
    assert!(!seen.iter().any(|(k, _)| k == "stored"), "{seen:?}");
    let data = fs::read(&file).unwrap();
    assert_eq!((data[0], data[4096], data[8192]), (1, 2, 0));
}

/// PMDK's libpmemobj, unmodified, through the preload: a pool made by
/// `pmempool create obj` on the mount, a program that adds one to 512
/// counters in each transaction, killed with SIGKILL at a different moment
/// each time: every reopening finds the counters equal (the transactions
/// are atomic on the device's pages), and they grow.
#[test]
fn a_pmemobj_program_killed_mid_transaction_reopens_consistent() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let pool = m.path("pool");
    let out = Command::new("pmempool")
        .args(["create", "obj", "--layout=daxfs", "--size=32M"])
        .arg(&pool)
        .env("LD_PRELOAD", library())
        .output()
        .expect("pmempool (apt-get install pmdk-tools)");
    assert!(out.status.success(), "{}", text(&out));
    let test = "a_pmemobj_program_killed_mid_transaction_reopens_consistent";
    let mut last = 0u64;
    for trial in 0..10u64 {
        let mut child = program(test, "pmemobj", &pool, Run::Preloaded);
        let seen = said(&mut child, Some("running"));
        let start: u64 = get(&seen, "start")
            .parse()
            .unwrap_or_else(|_| panic!("trial {trial}: {seen:?}"));
        let faults: u64 = get(&seen, "faults").parse().unwrap();
        assert!(faults > 0, "the pool is not mapped through the preload");
        assert!(
            start >= last,
            "trial {trial}: went back from {last} to {start}"
        );
        assert!(trial == 0 || start > 0, "trial {trial}: nothing committed");
        last = start;
        // Kill it at a different point of its loop each time (the workload
        // runs on; the delay only varies where it is cut).
        std::thread::sleep(std::time::Duration::from_millis(3 + trial * 7));
        child.kill().unwrap();
        let _ = finish(child);
    }
    let mut child = program(test, "pmemobj", &pool, Run::Preloaded);
    let seen = said(&mut child, Some("start"));
    child.kill().unwrap();
    let _ = finish(child);
    let end: u64 = get(&seen, "start").parse().unwrap();
    assert!(end >= last && end > 0, "{seen:?}");
}

/// fsync of a file a program maps writes back the stores made through the
/// mapping (Linux's fsync of a DAX file): its pages are clean afterwards,
/// so the next store faults again to mark them dirty, where a store before
/// the fsync did not.
#[test]
fn fsync_writes_back_the_stores_of_a_programs_mapping() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![0u8; 4096]).unwrap();
    let test = "fsync_writes_back_the_stores_of_a_programs_mapping";
    let (seen, _) = run_to_end(test, "fsync", &file, Run::Preloaded, Some("done"));
    assert_eq!(get(&seen, "again"), "0", "a dirty page faulted again");
    assert_eq!(get(&seen, "fsync"), "0");
    assert_eq!(get(&seen, "after"), "1", "fsync left the page dirty");
    assert_eq!(&fs::read(&file).unwrap()[..3], &[1, 2, 3]);
}

/// A program that asked for early notice (PR_MCE_KILL_EARLY) hears of
/// poison in a page it maps at once, before touching it: SIGBUS with
/// BUS_MCEERR_AO, the page's address and si_addr_lsb 12.
#[test]
fn early_notice_of_poison_reaches_a_program_that_asked_for_it() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![4u8; 3 * 4096]).unwrap();
    let test = "early_notice_of_poison_reaches_a_program_that_asked_for_it";
    let mut child = program(test, "early", &file, Run::Preloaded);
    let seen = said(&mut child, Some("page"));
    assert_eq!(get(&seen, "before"), "4", "{seen:?}");
    let page = get(&seen, "page").to_string();
    inject(&m, &file, 4096, 1);
    // (stdin stays open: the program ends only if the notice comes; a
    // watchdog kills it if it never does, and the test fails.)
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done, watched) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watched
            .recv_timeout(std::time::Duration::from_secs(120))
            .is_err()
        {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let seen = said(&mut child, Some("bus"));
    let _ = done.send(());
    watchdog.join().unwrap();
    let (status, stderr) = finish(child);
    assert!(status.success(), "{stderr}");
    assert_eq!(
        get(&seen, "bus"),
        format!("5 {page} 12"),
        "{seen:?} {stderr}"
    );
}

/// The lease protocol refuses what makes no sense, with an errno, and the
/// session goes on: a page range past the largest file (EINVAL, not an
/// overflow), an inode that does not exist (ENOENT), a line that is not a
/// request; then a good request is answered.
#[test]
fn the_daemon_refuses_nonsense_leases_and_goes_on() {
    use daxfs_client::lease::{Event, Hello, Reply, Request, SESSION};
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![1u8; 8192]).unwrap();
    let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&file).unwrap());
    let stream = daxfs_client::socket::connect(&m.mnt).unwrap();
    writeln!(&stream, "{{\"op\":\"{SESSION}\"}}").unwrap();
    let (hello, _device) = Hello::receive(&stream).unwrap();
    assert_eq!(hello.device, fs::canonicalize(&m.img).unwrap());
    let mut lines = BufReader::new(&stream).lines();
    let mut ask = |line: String| match Event::parse(&lines.next().unwrap().unwrap()) {
        Ok(Event::Reply { reply, .. }) => (line, reply),
        other => panic!("{line}: {other:?}"),
    };
    let huge = 1u64 << 62;
    let requests = [
        Request::Lease {
            ino,
            first: huge,
            end: huge + 1,
        }
        .to_line(1),
        Request::Allocate {
            ino,
            first: huge,
            end: huge + 1,
        }
        .to_line(2),
        Request::Lease {
            ino: 999_999,
            first: 0,
            end: 1,
        }
        .to_line(3),
        "{\"op\":\"lease\"".to_string(),
        Request::Lease {
            ino,
            first: 0,
            end: 2,
        }
        .to_line(5),
    ];
    let mut answers = Vec::new();
    for line in requests {
        writeln!(&stream, "{line}").unwrap();
        answers.push(ask(line));
    }
    let errno = |r: &Reply| match r {
        Reply::Failed { errno, .. } => *errno,
        _ => 0,
    };
    assert_eq!(errno(&answers[0].1), libc::EINVAL, "{answers:?}");
    assert_eq!(errno(&answers[1].1), libc::EINVAL, "{answers:?}");
    assert_eq!(errno(&answers[2].1), libc::ENOENT, "{answers:?}");
    assert_eq!(errno(&answers[3].1), libc::EINVAL, "{answers:?}");
    match &answers[4].1 {
        Reply::Granted(g) => {
            assert_eq!(g.size, 8192);
            assert_eq!(g.extents.iter().map(|e| e.pages).sum::<u64>(), 2);
        }
        other => panic!("{other:?}"),
    }
}

/// `daxfs exec --mount MNT -- PROGRAM` runs the program with the library,
/// for files of that mount only: a file of another daxfs mount gets the
/// kernel's mapping. A mount point that is not a daxfs mount is refused.
#[test]
fn daxfs_exec_maps_the_named_mounts_only() {
    if run_child() {
        return;
    }
    let (a, b) = (Mounted::new(""), Mounted::new(""));
    for m in [&a, &b] {
        fs::write(m.path("f"), vec![6u8; 8192]).unwrap();
    }
    let test = "daxfs_exec_maps_the_named_mounts_only";
    for (file, expect) in [(a.path("f"), "true"), (b.path("f"), "false")] {
        let (seen, stderr) = run_to_end(test, "kernel", &file, Run::Exec(&a.mnt), Some("done"));
        assert_eq!(get(&seen, "first"), "6");
        assert_eq!(get(&seen, "image"), expect, "{}: {stderr}", file.display());
    }
    let out = daxfs(&[
        "exec".as_ref(),
        "--mount".as_ref(),
        "/tmp".as_ref(),
        "--".as_ref(),
        "true".as_ref(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/tmp: not a daxfs mount"),
        "{}",
        text(&out)
    );
}

/// munmap of part of a mapping: those pages go (an access is SIGSEGV), the
/// rest stay; unmapping the rest releases the whole address range.
#[test]
fn munmap_of_part_of_a_mapping_takes_those_pages_only() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![0u8; 3 * 4096]).unwrap();
    let test = "munmap_of_part_of_a_mapping_takes_those_pages_only";
    let (seen, _) = run_to_end(test, "unmap-part", &file, Run::Preloaded, Some("done"));
    assert_eq!(get(&seen, "middle"), "0");
    assert_eq!(get(&seen, "ends"), "1 3");
    assert_eq!((get(&seen, "first"), get(&seen, "last")), ("0", "0"));
    assert_eq!(
        get(&seen, "left"),
        "0",
        "the address range was not released"
    );
    assert_eq!(
        &fs::read(&file).unwrap()[..],
        &{
            let mut d = vec![0u8; 3 * 4096];
            (d[0], d[4096], d[8192]) = (1, 2, 3);
            d
        }[..]
    );
    let mut child = program(test, "unmap-touch", &file, Run::Preloaded);
    let seen = said(&mut child, None);
    let (status, stderr) = finish(child);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGSEGV), "{seen:?} {stderr}");
    assert!(!seen.iter().any(|(k, _)| k == "touched"));
}

/// mremap of one page out of a mapping moves it: the moved page shows the
/// file at once, with no new fault (as the kernel moves page table
/// entries), a store through it reaches the file, and the page it left
/// behind is no longer shown.
#[test]
fn mremap_moves_a_page_out_of_a_mapping() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![0u8; 2 * 4096]).unwrap();
    let test = "mremap_moves_a_page_out_of_a_mapping";
    let (seen, _) = run_to_end(test, "move", &file, Run::Preloaded, Some("done"));
    assert_eq!(get(&seen, "moved"), (b'a').to_string());
    assert_eq!(get(&seen, "faults"), "0", "the moved page faulted again");
    assert_eq!(get(&seen, "image"), "true");
    assert_eq!(&fs::read(&file).unwrap()[4096..4098], b"ab");
}

/// `daxfs trace` prints a line per fault of a program mapping the mount's
/// files through the library, in the kernel's shape: the PMD faults
/// `dax_pmd_fault_done ... NOPAGE` at their 2 MiB, a misaligned mapping's
/// `FALLBACK` with its reason and then `dax_pte_fault_done ... NOPAGE`,
/// each line naming the program's pid.
#[test]
fn daxfs_trace_shows_each_fault_of_a_program_on_the_mount() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    let f = sparse(&file, 0);
    f.write_all_at(&vec![1u8; 4 * MIB as usize], 0).unwrap();
    drop(f);
    let mut tracer = Command::new(env!("CARGO_BIN_EXE_daxfs"))
        .arg("trace")
        .arg(&m.mnt)
        .args(["--count", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed whatever happens (it ends by itself after its four lines).
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut started = String::new();
    BufReader::new(tracer.stderr.take().unwrap())
        .read_line(&mut started)
        .unwrap();
    assert!(
        started.starts_with("daxfs: tracing DAX faults on"),
        "{started}"
    );
    let mut tracer = Kill(tracer);
    let test = "daxfs_trace_shows_each_fault_of_a_program_on_the_mount";
    let (seen, _) = run_to_end(test, "trace-touch", &file, Run::Preloaded, None);
    let pid = get(&seen, "pid");
    let mut out = String::new();
    tracer
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(tracer.0.wait().unwrap().success(), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for l in &lines {
        assert!(l.contains(&format!("-{pid} ")), "not the program's: {l}");
    }
    let events: Vec<&str> = lines
        .iter()
        .map(|l| daxfs_client::trace::event_of(l))
        .collect();
    let pmd = |i: usize, pgoff: &str| {
        assert!(
            events[i].starts_with("dax_pmd_fault_done: ")
                && events[i].contains(" shared READ ")
                && events[i].contains(&format!(" pgoff {pgoff} max_pgoff 0x3ff NOPAGE")),
            "{}",
            events[i]
        )
    };
    pmd(0, "0x0");
    pmd(1, "0x200");
    assert!(
        events[2].starts_with("dax_pmd_fault_done: ")
            && events[2].ends_with("FALLBACK (the 2 MiB is not inside the mapping, aligned)"),
        "{}",
        events[2]
    );
    assert!(
        events[3].starts_with("dax_pte_fault_done: ")
            && events[3].contains(" pgoff 0x1 ")
            && events[3].ends_with("NOPAGE"),
        "{}",
        events[3]
    );
}

/// Extents that continue one another in the file and on the device, as
/// one (as FIEMAP reports them).
fn merged(list: &[(u64, u64, u64)]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for &(l, p, n) in list {
        match out.last_mut() {
            Some(e) if e.0 + e.2 == l && e.1 + e.2 == p => e.2 += n,
            _ => out.push((l, p, n)),
        }
    }
    out
}

/// FIEMAP, which the kernel never passes to FUSE, is answered by the
/// library for daxfs files: the extents of `daxfs extents`, continuing
/// ones as one, overlapping ones only for a range, `LAST` on the file's
/// last, the count alone for no room, unsupported flags handed back with
/// EBADR, an empty range EINVAL. Without the library: EOPNOTSUPP.
#[test]
fn fiemap_reports_the_extents_of_a_daxfs_file() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    // Three aligned 2 MiB extents, then (after a hole) 8 KiB.
    let f = sparse(&file, 0);
    f.write_all_at(&vec![1u8; 6 * MIB as usize], 0).unwrap();
    f.write_all_at(&[2u8; 8192], 8 * MIB).unwrap();
    drop(f);
    let expected = merged(&extents(&file));
    assert!(expected.len() >= 2, "{expected:?}");
    let shown = |list: &[(u64, u64, u64)]| {
        list.iter()
            .enumerate()
            .map(|(i, (l, p, n))| format!("{l}+{n}@{p}/{}", u32::from(i == expected.len() - 1)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let test = "fiemap_reports_the_extents_of_a_daxfs_file";
    let (seen, _) = run_to_end(test, "fiemap", &file, Run::Preloaded, None);
    assert_eq!(get(&seen, "count"), expected.len().to_string());
    assert_eq!(
        get(&seen, "all"),
        format!("{} {}", expected.len(), shown(&expected))
    );
    assert_eq!(get(&seen, "first"), format!("1 {}", shown(&expected[..1])));
    let around: Vec<_> = expected
        .iter()
        .copied()
        .filter(|&(l, _, n)| l <= 2 * MIB + 1 && 2 * MIB + 1 < l + n)
        .collect();
    let range = get(&seen, "range");
    assert!(
        range.starts_with("1 ") && range.contains(&format!("{}+", around[0].0)),
        "{range}"
    );
    assert_eq!(
        get(&seen, "xattr"),
        format!("errno {} flags 2", libc::EBADR)
    );
    assert_eq!(
        get(&seen, "empty"),
        format!("errno {} flags 0", libc::EINVAL)
    );
    let (seen, _) = run_to_end(test, "fiemap", &file, Run::Plain, None);
    assert!(
        get(&seen, "count").starts_with(&format!("errno {}", libc::EOPNOTSUPP)),
        "{seen:?}"
    );
}

/// `filefrag -v`, run with `daxfs exec`, shows the extents `daxfs extents`
/// shows (in 4 KiB blocks), the last marked last.
#[test]
fn filefrag_shows_the_extents_of_daxfs_extents() {
    let m = Mounted::new("");
    let file = m.path("f");
    let f = sparse(&file, 0);
    f.write_all_at(&vec![1u8; 4 * MIB as usize], 0).unwrap();
    f.write_all_at(&[2u8; 4096], 6 * MIB).unwrap();
    drop(f);
    let out = Command::new(env!("CARGO_BIN_EXE_daxfs"))
        .arg("exec")
        .arg("--mount")
        .arg(&m.mnt)
        .args(["--", "filefrag", "-v", "-b4096"])
        .arg(&file)
        .env("DAXFS_PRELOAD", library())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    // "   0:        0..     511:       4096..      4607:    512:   ...flags"
    let rows: Vec<(u64, u64, u64, bool)> = said
        .lines()
        .filter(|l| {
            l.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .map(|l| {
            let cols: Vec<&str> = l.split(':').collect();
            let range = |c: &str| -> u64 { c.split("..").next().unwrap().trim().parse().unwrap() };
            (
                range(cols[1]),
                range(cols[2]),
                cols[3].trim().parse().unwrap(),
                l.contains("last"),
            )
        })
        .collect();
    let expected: Vec<(u64, u64, u64)> = merged(&extents(&file))
        .iter()
        .map(|&(l, p, n)| (l / 4096, p / 4096, n / 4096))
        .collect();
    assert_eq!(rows.len(), expected.len(), "{said}");
    for (i, (row, want)) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(row.0..row.0 + row.2, want.0..want.0 + want.2, "{said}");
        assert_eq!(row.1, want.1, "{said}");
        assert_eq!(row.3, i == rows.len() - 1, "{said}");
    }
}

/// mremap to a shorter length shrinks a mapping in place, as Linux does
/// whether or not it may move: what is kept stays mapped and writable, the
/// tail is gone (SIGSEGV), and the rest unmaps as usual.
#[test]
fn mremap_shrinks_a_mapping_in_place() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![0u8; 3 * 4096]).unwrap();
    let test = "mremap_shrinks_a_mapping_in_place";
    let (seen, _) = run_to_end(test, "shrink", &file, Run::Preloaded, Some("done"));
    assert_eq!(get(&seen, "in-place"), "true");
    assert_eq!(get(&seen, "kept"), "1 2");
    assert_eq!(get(&seen, "rest"), "0");
    assert_eq!(
        get(&seen, "left"),
        "0",
        "the address range was not released"
    );
    assert_eq!(
        &fs::read(&file).unwrap()[..4097],
        &{
            let mut d = vec![0u8; 4097];
            (d[0], d[4096]) = (1, 3);
            d
        }[..]
    );
    let mut child = program(test, "shrink-touch", &file, Run::Preloaded);
    let seen = said(&mut child, None);
    let (status, stderr) = finish(child);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGSEGV), "{seen:?} {stderr}");
    assert_eq!(get(&seen, "in-place"), "true");
    assert!(!seen.iter().any(|(k, _)| k == "touched"));
}

/// Another process writes into a hole of a file a program maps: the
/// program sees the new data at once, and only the hole faults again (its
/// pages mapped from the device stay mapped).
#[test]
fn a_write_into_a_hole_by_another_process_unmaps_only_the_hole() {
    if run_child() {
        return;
    }
    let m = Mounted::new("");
    let file = m.path("f");
    fs::write(&file, vec![7u8; 4096]).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    f.set_len(16 * 4096).unwrap();
    let test = "a_write_into_a_hole_by_another_process_unmaps_only_the_hole";
    let mut child = program(test, "holes", &file, Run::Preloaded);
    let seen = said(&mut child, Some("ready"));
    assert_eq!(get(&seen, "before"), "7 0", "{seen:?}");
    f.write_all_at(&[9u8; 4096], 5 * 4096).unwrap();
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    let seen = said(&mut child, Some("done"));
    let (status, stderr) = finish(child);
    assert!(status.success(), "{stderr}");
    assert_eq!(get(&seen, "after"), "7 9", "a stale zero page");
    assert_eq!(
        get(&seen, "faults"),
        "1",
        "more than the hole faulted again"
    );
}
