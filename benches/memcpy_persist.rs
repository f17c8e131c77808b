//! `memcpy_persist` against a plain copy followed by `persist`, and (with the
//! `pmdk` feature, which links Debian's libpmem) against PMDK's
//! `pmem_memcpy_persist` on the same mapping.
//!
//! ```text
//! cargo bench --bench memcpy_persist                  # daxfs only
//! cargo bench --bench memcpy_persist --features pmdk  # with PMDK
//! ```
//!
//! The device lives on /dev/shm (memory-backed), so `persist` is CPU flushes
//! and a fence on every side, with no msync.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pmem::{Device, DeviceOptions};
use std::time::Duration;

#[cfg(feature = "pmdk")]
#[path = "common/pmdk.rs"]
mod pmdk;

const SIZES: [(usize, &str); 3] = [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (2 << 20, "2MiB")];
/// Where the copies land: a 2 MiB-aligned device offset, as file data would be.
const TARGET: u64 = 8 << 20;

fn bench(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-bench")
        .tempdir_in("/dev/shm")
        .expect("a directory in /dev/shm");
    let dev = Device::create(
        dir.path().join("bench.img"),
        64 << 20,
        &DeviceOptions::new(),
    )
    .expect("create the bench device");
    // Touch the target so page faults are not measured.
    dev.memset_persist(0, 0, 32 << 20).unwrap();

    let mut group = c.benchmark_group("memcpy_persist");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for (len, name) in SIZES {
        let src: Vec<u8> = (0..len).map(|i| i as u8).collect();
        group.throughput(Throughput::Bytes(len as u64));
        #[cfg(feature = "pmdk")]
        group.bench_with_input(BenchmarkId::new("pmdk", name), &src, |b, src| {
            // SAFETY: [TARGET, TARGET + len) lies inside the device mapping
            // and nothing else touches it during the benchmark.
            let dst = unsafe { dev.as_ptr().add(TARGET as usize) };
            b.iter(|| {
                // SAFETY: dst is valid for src.len() bytes; the ranges are disjoint.
                unsafe { pmdk::pmem_memcpy_persist(dst.cast(), src.as_ptr().cast(), src.len()) }
            })
        });
        group.bench_with_input(BenchmarkId::new("daxfs", name), &src, |b, src| {
            b.iter(|| dev.memcpy_persist(TARGET, src).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("copy_then_persist", name),
            &src,
            |b, src| {
                b.iter(|| {
                    dev.write(TARGET, src).unwrap();
                    dev.persist(TARGET, src.len() as u64).unwrap();
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
