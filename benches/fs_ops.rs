//! Filesystem operations through the daxfs library (an image on /dev/shm)
//! against the same operations through `std::fs` on a tmpfs directory (the
//! kernel's path), measured in the same run.
//!
//! ```text
//! cargo bench --bench fs_ops
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, ROOT};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// Files made per timed batch (then removed, untimed), so that no run fills
/// the image or the directory without bound.
const BATCH: u64 = 4000;

struct Sides {
    _dir: tempfile::TempDir,
    fs: Fs,
    tmpfs: std::path::PathBuf,
}

fn sides() -> Sides {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-bench")
        .tempdir_in("/dev/shm")
        .unwrap();
    let dev = Device::create(dir.path().join("bench.img"), 1 << 30, &DeviceOptions::new()).unwrap();
    let fs = Fs::format(dev).unwrap();
    let tmpfs = dir.path().join("tmpfs");
    std::fs::create_dir(&tmpfs).unwrap();
    Sides {
        _dir: dir,
        fs,
        tmpfs,
    }
}

/// Time `op(i)` for `iters` values of `i`, in batches of `BATCH` with an
/// untimed `reset` between them.
fn batched(iters: u64, mut op: impl FnMut(u64), mut reset: impl FnMut(u64)) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let start = Instant::now();
        for i in 0..n {
            op(i);
        }
        total += start.elapsed();
        reset(n);
        left -= n;
    }
    total
}

fn metadata(c: &mut Criterion) {
    let s = sides();
    let (fs, tmp) = (&s.fs, &s.tmpfs);
    let mut group = c.benchmark_group("fs_ops");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let name = |i: u64| format!("f{i}");

    group.bench_function(BenchmarkId::new("create_close", "daxfs"), |b| {
        b.iter_custom(|iters| {
            batched(
                iters,
                |i| {
                    let (attr, _) = fs
                        .create(ROOT, name(i).as_bytes(), 0o644, 0, 0, true)
                        .unwrap();
                    fs.close(fs.open(attr.ino).unwrap()).unwrap();
                },
                |n| (0..n).for_each(|i| fs.unlink(ROOT, name(i).as_bytes()).unwrap()),
            )
        })
    });
    group.bench_function(BenchmarkId::new("create_close", "tmpfs"), |b| {
        b.iter_custom(|iters| {
            batched(
                iters,
                |i| {
                    drop(
                        OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(tmp.join(name(i)))
                            .unwrap(),
                    )
                },
                |n| (0..n).for_each(|i| std::fs::remove_file(tmp.join(name(i))).unwrap()),
            )
        })
    });

    group.bench_function(BenchmarkId::new("unlink", "daxfs"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                (0..n).for_each(|i| {
                    fs.create(ROOT, name(i).as_bytes(), 0o644, 0, 0, true)
                        .unwrap();
                });
                let start = Instant::now();
                (0..n).for_each(|i| fs.unlink(ROOT, name(i).as_bytes()).unwrap());
                total += start.elapsed();
                left -= n;
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("unlink", "tmpfs"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                (0..n).for_each(|i| drop(File::create(tmp.join(name(i))).unwrap()));
                let start = Instant::now();
                (0..n).for_each(|i| std::fs::remove_file(tmp.join(name(i))).unwrap());
                total += start.elapsed();
                left -= n;
            }
            total
        })
    });

    fs.mkdir(ROOT, b"d", 0o755, 0, 0).unwrap();
    fs.create_path("/d/target", 0o644, true).unwrap();
    std::fs::create_dir(tmp.join("d")).unwrap();
    File::create(tmp.join("d/target")).unwrap();
    group.bench_function(BenchmarkId::new("stat", "daxfs"), |b| {
        b.iter(|| fs.stat_path("/d/target").unwrap())
    });
    let target = tmp.join("d/target");
    group.bench_function(BenchmarkId::new("stat", "tmpfs"), |b| {
        b.iter(|| std::fs::metadata(&target).unwrap())
    });

    // readdir of 10,000 entries.
    let big = fs.mkdir(ROOT, b"big", 0o755, 0, 0).unwrap();
    std::fs::create_dir(tmp.join("big")).unwrap();
    for i in 0..10_000 {
        fs.create(big.ino, name(i).as_bytes(), 0o644, 0, 0, true)
            .unwrap();
        File::create(tmp.join("big").join(name(i))).unwrap();
    }
    group.throughput(Throughput::Elements(10_000));
    group.bench_function(BenchmarkId::new("readdir_10000", "daxfs"), |b| {
        b.iter(|| assert_eq!(fs.readdir(big.ino, 0).unwrap().len(), 10_002))
    });
    let big_dir = tmp.join("big");
    group.bench_function(BenchmarkId::new("readdir_10000", "tmpfs"), |b| {
        b.iter(|| assert_eq!(std::fs::read_dir(&big_dir).unwrap().count(), 10_000))
    });
    group.finish();
}

fn data(c: &mut Criterion) {
    let s = sides();
    let (fs, tmp) = (&s.fs, &s.tmpfs);
    let mut group = c.benchmark_group("fs_ops");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let page = vec![0x5Au8; 4096];
    let huge = vec![0xA5u8; 2 << 20];

    // 4 KiB append: write plus a durable size update (fdatasync on tmpfs).
    let (file, _) = fs.create(ROOT, b"append", 0o644, 0, 0, true).unwrap();
    group.throughput(Throughput::Bytes(4096));
    group.bench_function(BenchmarkId::new("append_4k", "daxfs"), |b| {
        b.iter_custom(|iters| {
            batched(
                iters,
                |i| {
                    fs.write(file.ino, i * 4096, &page).unwrap();
                },
                |_| fs.truncate(file.ino, 0).unwrap(),
            )
        })
    });
    let mut std_file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(tmp.join("append"))
        .unwrap();
    group.bench_function(BenchmarkId::new("append_4k", "tmpfs"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                let start = Instant::now();
                for _ in 0..n {
                    std_file.write_all(&page).unwrap();
                    std_file.sync_data().unwrap();
                }
                total += start.elapsed();
                std_file.set_len(0).unwrap();
                std::io::Seek::rewind(&mut std_file).unwrap();
                left -= n;
            }
            total
        })
    });

    // Overwrites of existing data.
    let (over, _) = fs.create(ROOT, b"over", 0o644, 0, 0, true).unwrap();
    fs.write(over.ino, 0, &huge).unwrap();
    let std_over = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(tmp.join("over"))
        .unwrap();
    std_over.write_all_at(&huge, 0).unwrap();
    group.bench_function(BenchmarkId::new("overwrite_4k", "daxfs"), |b| {
        b.iter(|| fs.write(over.ino, 8192, &page).unwrap())
    });
    group.bench_function(BenchmarkId::new("overwrite_4k", "tmpfs"), |b| {
        b.iter(|| {
            std_over.write_all_at(&page, 8192).unwrap();
            std_over.sync_data().unwrap();
        })
    });
    group.throughput(Throughput::Bytes(2 << 20));
    group.bench_function(BenchmarkId::new("write_2m", "daxfs"), |b| {
        b.iter(|| fs.write(over.ino, 0, &huge).unwrap())
    });
    group.bench_function(BenchmarkId::new("write_2m", "tmpfs"), |b| {
        b.iter(|| {
            std_over.write_all_at(&huge, 0).unwrap();
            std_over.sync_data().unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, metadata, data);
criterion_main!(benches);
