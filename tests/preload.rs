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
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const MIB: u64 = 1 << 20;
const CHILD: &str = "DAXFS_PRELOAD_TEST_CHILD";

fn library() -> PathBuf {
    let lib = Path::new(env!("CARGO_BIN_EXE_daxfs")).with_file_name("libdaxfs_preload.so");
    assert!(
        lib.exists(),
        "{} is missing: build it with `cargo build -p daxfs-preload` (cargo xtask test does)",
        lib.display()
    );
    lib
}

/// This test binary, run as a program with the library preloaded, doing
/// `what` on `file`; `as_nobody` runs it as uid 65534.
fn program(test: &str, what: &str, file: &Path, as_nobody: bool) -> Child {
    let me = std::env::current_exe().unwrap();
    let mut cmd = match as_nobody {
        true => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&me);
            c
        }
        false => Command::new(&me),
    };
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("LD_PRELOAD", library())
        .env("DAXFS_PRELOAD_DEBUG", "1")
        .env(CHILD, what)
        .env("DAXFS_PRELOAD_TEST_FILE", file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
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
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
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

/// A `KEY VALUE` line for the parent (marked: libtest prints on the line
/// too).
macro_rules! say {
    ($($arg:tt)*) => {
        println!("\n@@ {}", format!($($arg)*))
    };
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
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    match what {
        "store" => {
            let p = map(libc::MAP_SHARED, rw) as *mut u8;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
            // SAFETY: loads inside the mapping.
            unsafe {
                say!("first {}", *p.add(4096));
                say!("second {}", *p.add(2 * MIB as usize + 4096));
            }
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
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            say!("mapped {} {errno}", p != libc::MAP_FAILED);
        }
        "hole" => {
            let p = map(libc::MAP_SHARED, rw) as *mut u8;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
            // SAFETY: stores inside the mapping, into holes of the file.
            unsafe {
                *p.add(3 * 4096 + 5) = 0xAB;
                *p.add(2 * MIB as usize + 7) = 0xCD;
            }
            let shown = maps_within(p as usize, len);
            say!("image {}", shown.iter().any(|m| m.3.contains(".img")));
        }
        "recall" => {
            let p = map(libc::MAP_SHARED, libc::PROT_READ) as *mut u8;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
            // SAFETY: a load inside the mapping.
            say!("before {}", unsafe { *p.add(5000) });
            let n = maps_within(p as usize, len).iter().filter(|m| m.3.contains(".img")).count();
            say!("mapped {n}");
            wait_for_parent();
            let n = maps_within(p as usize, len).iter().filter(|m| m.3.contains(".img")).count();
            say!("after {n}");
            // The file is empty now: this load raises SIGBUS.
            // SAFETY: a load inside the mapping (which SIGBUS ends).
            let v = unsafe { std::ptr::read_volatile(p.add(5000)) };
            say!("read {v}");
        }
        "kernel" => {
            let p = map(libc::MAP_SHARED, libc::PROT_READ) as *mut u8;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
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
    let f = OpenOptions::new().create(true).read(true).write(true).open(&file).unwrap();
    f.set_len(4 * MIB).unwrap();
    // (Preallocated: aligned 2 MiB extents.)
    let out = Command::new("fallocate")
        .args(["-l", "4MiB"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    f.write_all_at(&[7u8; 4096], 4096).unwrap();
    let layout = extents(&file);
    let mut child = program(
        "a_programs_mapping_is_the_devices_own_pages",
        "store",
        &file,
        false,
    );
    let seen = said(&mut child, Some("done"));
    let (status, stderr) = finish(child);
    assert!(status.success(), "{stderr}");
    assert_eq!(get(&seen, "first"), "7", "{seen:?}");
    assert_eq!(get(&seen, "second"), "0");
    let mut buf = [0u8; 19];
    f.read_exact_at(&mut buf, 8192).unwrap();
    assert_eq!(&buf, b"through the mapping");
    assert_eq!(get(&seen, "unmapped"), "true", "munmap left pieces: {seen:?}");
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
