//! The preload library end to end, in one run on /dev/shm: map and touch
//! one byte of every page of a 1 GiB file (loads, then stores) through the
//! library (`Fs::mmap`), through the mount with the preload library, and
//! through the plain mount (the kernel's FUSE mapping); sequential load
//! bandwidth through a preload mapping against `memcpy` from anonymous
//! memory; `pmem_memcpy_persist` (PMDK's libpmem, when installed) into a
//! preload mapping against the same into anonymous memory; and the cost of
//! a layout recall: truncating a mapped 2 MiB range with 1 and with 10
//! client processes mapping it, against no client.
//!
//! ```text
//! cargo build --release -p daxfs-preload && cargo bench --bench preload
//! ```
//!
//! (`cargo xtask bench` does both.) Each figure is the median of ROUNDS
//! rounds (`DAXFS_BENCH_ROUNDS`, default 5), the cases of a round run one
//! after another, so a noisy machine slows them alike; the table gives
//! ratios. `DAXFS_BENCH_DIR=DIR` puts the images in DIR instead of
//! /dev/shm: on a huge-page tmpfs (where `daxfs create --huge` puts
//! images), the library and the preload map 2 MiB pages.

use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, MapOptions, ROOT};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[path = "common/anonymous.rs"]
mod anonymous;
use anonymous::anonymous;

const MIB: u64 = 1 << 20;
const BIG: u64 = 1 << 30;
const CHILD: &str = "DAXFS_PRELOAD_BENCH_CHILD";

/// A program's part: map `file` (1 GiB) and run `what`, printing seconds.
fn child(what: &str, file: &Path) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let map = || {
        // SAFETY: a new shared mapping of a file we opened.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        p as *mut u8
    };
    let unmap = |p: *mut u8| {
        // SAFETY: the mapping made above, unused from now on.
        unsafe { libc::munmap(p.cast(), len) };
    };
    match what {
        "touch-read" | "touch-write" => {
            let t = Instant::now();
            let p = map();
            touch(p, len, what == "touch-write");
            unmap(p);
            println!("{}", t.elapsed().as_secs_f64());
        }
        "load" => {
            let p = map();
            touch(p, len, false);
            let anon = anonymous(len);
            let t = Instant::now();
            // SAFETY: both are `len` bytes, mapped.
            unsafe { std::ptr::copy_nonoverlapping(p, anon, len) };
            let mapped = t.elapsed().as_secs_f64();
            let src = anonymous(len);
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(src, 1, len) };
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(src, anon, len) };
            let anonymous = t.elapsed().as_secs_f64();
            println!("{mapped} {anonymous}");
        }
        "persist" => {
            let Some(copy) = pmem_memcpy_persist() else {
                println!("none");
                return;
            };
            let p = map();
            touch(p, len, true);
            let src = anonymous(len);
            // SAFETY: `len` bytes, mapped.
            unsafe { std::ptr::write_bytes(src, 7, len) };
            let dst = anonymous(len);
            let t = Instant::now();
            // SAFETY: both are `len` bytes, mapped and writable.
            unsafe { copy(p.cast(), src.cast(), len) };
            let mapped = t.elapsed().as_secs_f64();
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { copy(dst.cast(), src.cast(), len) };
            let anonymous = t.elapsed().as_secs_f64();
            println!("{mapped} {anonymous}");
        }
        "hold" => {
            // Map, fault the first 2 MiB in, say so, and wait to be killed.
            let p = map();
            touch(p, 2 * MIB as usize, false);
            println!("ready");
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        other => panic!("no such part {other}"),
    }
}

type Copy =
    unsafe extern "C" fn(*mut libc::c_void, *const libc::c_void, usize) -> *mut libc::c_void;

/// PMDK's `pmem_memcpy_persist`, if libpmem is installed.
fn pmem_memcpy_persist() -> Option<Copy> {
    // SAFETY: dlopen and dlsym with NUL-terminated names.
    unsafe {
        let lib = libc::dlopen(c"libpmem.so.1".as_ptr(), libc::RTLD_NOW);
        if lib.is_null() {
            return None;
        }
        let f = libc::dlsym(lib, c"pmem_memcpy_persist".as_ptr());
        // SAFETY: libpmem's function of that name has this signature.
        (!f.is_null()).then(|| std::mem::transmute::<*mut libc::c_void, Copy>(f))
    }
}

fn touch(p: *mut u8, len: usize, store: bool) {
    for at in (0..len).step_by(4096) {
        // SAFETY: inside the mapping.
        unsafe {
            if store {
                std::ptr::write_volatile(p.add(at), 1);
            } else {
                std::ptr::read_volatile(p.add(at));
            }
        }
    }
}

/// Run `cmd`, which must succeed (else its stderr is the panic); its
/// output, trimmed.
fn checked(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `fallocate -l LEN FILE`: aligned 2 MiB extents.
fn fallocate(file: &Path, len: &str) {
    checked(Command::new("fallocate").args(["-l", len]).arg(file));
}

fn daxfs() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_daxfs"))
}

fn preload() -> PathBuf {
    let lib = daxfs().with_file_name("libdaxfs_preload.so");
    assert!(
        lib.exists(),
        "{} is missing: cargo build --release -p daxfs-preload",
        lib.display()
    );
    lib
}

/// This program as a child doing `what` on `file`, preloaded or not; its
/// first line.
fn run(what: &str, file: &Path, preloaded: bool) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CHILD, what).env("DAXFS_BENCH_FILE", file);
    if preloaded {
        cmd.env("LD_PRELOAD", preload());
    }
    checked(&mut cmd)
}

fn secs(s: &str) -> f64 {
    s.parse().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Where the images go.
fn bench_dir() -> PathBuf {
    std::env::var_os("DAXFS_BENCH_DIR").map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from)
}

/// A mount of a new image; unmounted when dropped.
struct Mount {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Mount {
    fn new() -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("daxfs-preload-bench")
            .tempdir_in(bench_dir())
            .unwrap();
        let img = dir.path().join("img");
        Fs::format(Device::create(&img, BIG + 512 * MIB, &DeviceOptions::new()).unwrap())
            .unwrap()
            .into_device()
            .unwrap();
        let mnt = dir.path().join("mnt");
        checked(Command::new(daxfs()).arg("mount").arg(&img).arg(&mnt));
        Mount { _dir: dir, mnt }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new(daxfs())
            .arg("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Seconds to truncate a mapped 2 MiB range away while `clients` processes
/// (with the preload library) map it, each round with new blocks.
fn recall(file: &Path, clients: usize, rounds: usize) -> f64 {
    let mut times = Vec::new();
    for _ in 0..rounds {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(file)
            .unwrap();
        fallocate(file, "4MiB");
        let mut children: Vec<_> = (0..clients)
            .map(|_| {
                Command::new(std::env::current_exe().unwrap())
                    .env(CHILD, "hold")
                    .env("DAXFS_BENCH_FILE", file)
                    .env("LD_PRELOAD", preload())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in &mut children {
            let mut line = String::new();
            BufReader::new(c.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "ready");
        }
        let t = Instant::now();
        f.set_len(2 * MIB).unwrap();
        times.push(t.elapsed().as_secs_f64());
        for mut c in children {
            let _ = writeln!(c.stdin.as_mut().unwrap());
            let _ = c.wait();
        }
    }
    median(times)
}

fn main() {
    if let Ok(what) = std::env::var(CHILD) {
        let file = PathBuf::from(std::env::var_os("DAXFS_BENCH_FILE").unwrap());
        return child(&what, &file);
    }
    if std::env::args().any(|a| a == "--list") {
        return; // (cargo bench asks; there is nothing to list)
    }
    let rounds: usize = std::env::var("DAXFS_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let m = Mount::new();
    let file = m.mnt.join("big");
    fallocate(&file, "1GiB");

    // The library, on an image of its own.
    let dir = tempfile::Builder::new()
        .prefix("daxfs-preload-bench-lib")
        .tempdir_in(bench_dir())
        .unwrap();
    let fs = Fs::format(
        Device::create(
            dir.path().join("img"),
            BIG + 512 * MIB,
            &DeviceOptions::new(),
        )
        .unwrap(),
    )
    .unwrap();
    let ino = fs.create(ROOT, b"big", 0o644, 0, 0, true).unwrap().0.ino;
    fs.fallocate(ino, 0, BIG, false).unwrap();
    let library = |store: bool| {
        let t = Instant::now();
        // SAFETY: nothing else changes the file meanwhile.
        let map = unsafe { fs.mmap(ino, 0, BIG, MapOptions::default()) }.unwrap();
        touch(map.as_ptr(), BIG as usize, store);
        drop(map);
        t.elapsed().as_secs_f64()
    };

    let mut touch_times: [[Vec<f64>; 2]; 3] = Default::default();
    let (mut loads, mut persists) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (i, what) in ["touch-read", "touch-write"].into_iter().enumerate() {
            touch_times[0][i].push(library(i == 1));
            touch_times[1][i].push(secs(&run(what, &file, true)));
            touch_times[2][i].push(secs(&run(what, &file, false)));
        }
        let load = run("load", &file, true);
        let (a, b) = load.split_once(' ').unwrap();
        loads.push(secs(b) / secs(a));
        let persist = run("persist", &file, true);
        if let Some((a, b)) = persist.split_once(' ') {
            persists.push(secs(b) / secs(a));
        }
    }
    let recall_rounds = rounds.max(5);
    let small = m.mnt.join("recalled");
    let recalls: Vec<f64> = [0, 1, 10]
        .into_iter()
        .map(|n| recall(&small, n, recall_rounds))
        .collect();

    let ms = |v: &Vec<f64>| median(v.clone()) * 1e3;
    println!("\n## preload: map and touch 1 GiB, one byte per page ({rounds} rounds, medians)\n");
    println!("| | library | mount + preload | plain mount | preload / library | plain / preload |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, label) in ["loads", "stores"].into_iter().enumerate() {
        let (lib, pre, plain) = (
            ms(&touch_times[0][i]),
            ms(&touch_times[1][i]),
            ms(&touch_times[2][i]),
        );
        println!(
            "| {label} | {lib:.0} ms | {pre:.0} ms | {plain:.0} ms | {:.2}x | {:.1}x |",
            pre / lib,
            plain / pre
        );
    }
    println!(
        "\nsequential load bandwidth through a preload mapping / memcpy from anonymous memory: {:.2}x",
        median(loads)
    );
    match persists.is_empty() {
        true => {
            println!("pmem_memcpy_persist: libpmem is not installed (apt-get install libpmem1)")
        }
        false => println!(
            "pmem_memcpy_persist into a preload mapping / into anonymous memory: {:.2}x",
            median(persists)
        ),
    }
    println!(
        "\nlayout recall: truncate of a mapped 2 MiB range ({recall_rounds} rounds, medians): \
         no client {:.2} ms, 1 client {:.2} ms, 10 clients {:.2} ms",
        recalls[0] * 1e3,
        recalls[1] * 1e3,
        recalls[2] * 1e3
    );
}
