//! Break layouts and memory failure: the cost of a pin plus unpin, and the
//! latency of memory failure from injection until every mapping of the page
//! is gone, with 1 and with 100 mappings of the file.
//!
//! ```text
//! cargo bench --bench failure
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, MapOptions, Mapping, ROOT};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn benches(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-bench")
        .tempdir_in("/dev/shm")
        .unwrap();
    let dev = Device::create(dir.path().join("f.img"), 256 * MIB, &DeviceOptions::new()).unwrap();
    let fs = Fs::format(dev).unwrap();
    let ino = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap().0.ino;
    fs.write(ino, 0, &vec![1u8; (4 * MIB) as usize]).unwrap();

    let mut group = c.benchmark_group("failure");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.bench_function(BenchmarkId::new("pin_unpin", "4KiB"), |b| {
        b.iter(|| drop(fs.pin(ino, MIB, 4096).unwrap()))
    });
    // With a mapping alive the file's DAX state stays (no setup per pin).
    // SAFETY: nothing touches the mapping.
    let held = unsafe { fs.mmap(ino, 0, 4096, MapOptions::default()) }.unwrap();
    group.bench_function(BenchmarkId::new("pin_unpin", "4KiB_mapped_file"), |b| {
        b.iter(|| drop(fs.pin(ino, MIB, 4096).unwrap()))
    });
    drop(held);

    let page = 2 * MIB + 8192;
    let at = fs.device_offset(ino, page).unwrap().unwrap();
    for n in [1usize, 100] {
        let opts = MapOptions {
            write: false,
            ..MapOptions::default()
        };
        let maps: Vec<Mapping> = (0..n)
            // SAFETY: loads only.
            .map(|_| unsafe { fs.mmap(ino, 0, 4 * MIB, opts) }.unwrap())
            .collect();
        group.bench_function(
            BenchmarkId::new("memory_failure", format!("{n}_mappings")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        fs.clear_poison(at, 4096).unwrap();
                        for m in &maps {
                            std::hint::black_box(m[page as usize]); // mapped again
                        }
                        let start = Instant::now();
                        let f = fs.inject_poison(at, 512).unwrap();
                        total += start.elapsed();
                        assert_eq!(f[0].mapped_at.len(), n);
                    }
                    fs.clear_poison(at, 4096).unwrap();
                    total
                })
            },
        );
    }
    group.finish();
    fs.unmount().unwrap();
}

criterion_group!(failure, benches);
criterion_main!(failure);
