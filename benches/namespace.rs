//! The namespace under threads: lookups of a cached path (the lock-free
//! dentry walk) with one and two threads, creates and unlinks in one
//! directory from one and two threads, and a shrinker pass over 100,000
//! cached inodes. `stat` of the same path on tmpfs is measured alongside
//! for scale.
//!
//! ```text
//! cargo bench --bench namespace
//! ```
//!
//! The two-thread figures are the wall time for both threads to do one
//! operation each, so `2 x one-thread time / two-thread time` is the
//! scaling (2.0 is perfect).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, ROOT};
use std::time::{Duration, Instant};

const PATH: &str = "/usr/share/doc/daxfs";

fn setup(size: u64) -> (tempfile::TempDir, Fs) {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-bench")
        .tempdir_in("/dev/shm")
        .unwrap();
    let dev = Device::create(dir.path().join("bench.img"), size, &DeviceOptions::new()).unwrap();
    (dir, Fs::format(dev).unwrap())
}

/// Run `op` `iters` times on each of `threads` threads at once; the wall
/// time from the first thread's start to the last one's finish.
fn on_threads(threads: usize, iters: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, op) = (&barrier, &op);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..iters {
                        op(t, i);
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        let times: Vec<(Instant, Instant)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let start = times.iter().map(|t| t.0).min().unwrap();
        let end = times.iter().map(|t| t.1).max().unwrap();
        end - start
    })
}

fn lookups(c: &mut Criterion) {
    let (dir, fs) = setup(256 << 20);
    let mut at = ROOT;
    for name in ["usr", "share", "doc"] {
        at = fs.mkdir(at, name.as_bytes(), 0o755, 0, 0).unwrap().ino;
    }
    let file = fs.create(at, b"daxfs", 0o644, 0, 0, true).unwrap().0.ino;
    assert_eq!(fs.resolve(PATH).unwrap(), file);
    let tmpfs = dir.path().join("tmpfs");
    std::fs::create_dir_all(tmpfs.join("usr/share/doc")).unwrap();
    std::fs::write(tmpfs.join("usr/share/doc/daxfs"), b"").unwrap();
    let tmpfs_path = tmpfs.join("usr/share/doc/daxfs");

    let mut group = c.benchmark_group("namespace");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for threads in [1, 2] {
        group.bench_function(BenchmarkId::new("lookup_depth4", threads), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, |_, _| {
                    assert_eq!(fs.resolve(std::hint::black_box(PATH)).unwrap(), file);
                })
            })
        });
        group.bench_function(BenchmarkId::new("tmpfs_stat_depth4", threads), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, |_, _| {
                    std::fs::symlink_metadata(std::hint::black_box(&tmpfs_path)).unwrap();
                })
            })
        });
    }
    // Create and unlink in one directory, each thread its own names.
    let work = fs.mkdir(ROOT, b"work", 0o755, 0, 0).unwrap().ino;
    for threads in [1, 2] {
        group.bench_function(BenchmarkId::new("create_unlink", threads), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, |t, i| {
                    let name = format!("t{t}-{i}");
                    fs.create(work, name.as_bytes(), 0o644, 0, 0, true).unwrap();
                    fs.unlink(work, name.as_bytes()).unwrap();
                })
            })
        });
    }
    let tmp_work = tmpfs.join("work");
    std::fs::create_dir(&tmp_work).unwrap();
    for threads in [1, 2] {
        group.bench_function(BenchmarkId::new("tmpfs_create_unlink", threads), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, |t, i| {
                    let path = tmp_work.join(format!("t{t}-{i}"));
                    drop(std::fs::File::create(&path).unwrap());
                    std::fs::remove_file(&path).unwrap();
                })
            })
        });
    }
    group.finish();
    fs.unmount().unwrap();
}

fn shrinker(c: &mut Criterion) {
    const FILES: usize = 100_000;
    // 8 KiB of device per inode, and room for the directory.
    let (_dir, fs) = setup(1 << 30);
    let mut inos = Vec::with_capacity(FILES);
    for d in 0..100 {
        let dir = fs
            .mkdir(ROOT, format!("d{d}").as_bytes(), 0o755, 0, 0)
            .unwrap()
            .ino;
        for f in 0..FILES / 100 {
            let name = format!("f{f}");
            inos.push(
                fs.create(dir, name.as_bytes(), 0o644, 0, 0, true)
                    .unwrap()
                    .0
                    .ino,
            );
        }
    }
    let mut group = c.benchmark_group("namespace");
    group.sample_size(10);
    group.bench_function(BenchmarkId::new("shrink_pass", "100000_inodes"), |b| {
        b.iter_batched(
            || {
                for &ino in &inos {
                    fs.getattr(ino).unwrap();
                }
                let usage = fs.cache_usage().unwrap();
                assert!(usage.inodes > FILES, "{usage:?}");
            },
            // A whole pass: take every second chance, then evict all.
            |()| {
                let shrunk = fs.shrink_to(0).unwrap();
                assert!(shrunk.inodes >= FILES, "{shrunk:?}");
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    fs.unmount().unwrap();
}

criterion_group!(benches, lookups, shrinker);
criterion_main!(benches);
