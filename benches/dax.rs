//! DAX mappings: the cost of PMD and PTE faults (with the fault trace off,
//! as always unless someone traces, and on), and load and store
//! bandwidth through a mapping against the same copies over anonymous
//! memory and through the device's own `memcpy_persist`, in the same run.
//!
//! ```text
//! cargo bench --bench dax                   # daxfs only
//! cargo bench --bench dax --features pmdk   # and PMDK's pmem_memcpy_persist
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use daxfs::pmem::{Device, DeviceOptions, Writer};
use daxfs::{Fs, MapOptions, ROOT};
use std::time::{Duration, Instant};

#[cfg(feature = "pmdk")]
#[path = "common/pmdk.rs"]
mod pmdk;

#[path = "common/anonymous.rs"]
mod anonymous;
use anonymous::anonymous;

const MIB: u64 = 1 << 20;
const BIG: u64 = 1 << 30;

fn benches(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-bench")
        .tempdir_in("/dev/shm")
        .unwrap();
    let dev = Device::create(
        dir.path().join("dax.img"),
        BIG + 512 * MIB,
        &DeviceOptions::new(),
    )
    .unwrap();
    let fs = Fs::format(dev).unwrap();
    let ino = fs.create(ROOT, b"big", 0o644, 0, 0, true).unwrap().0.ino;
    fs.fallocate(ino, 0, BIG, false).unwrap();

    let mut group = c.benchmark_group("dax");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    // Map and touch one byte per page of 1 GiB, 2 MiB at a time: aligned
    // mappings take one PMD fault each; the same ranges 4 KiB shorter at the
    // front cannot hold a PMD and take a PTE fault per page.
    // With the trace on, each event is formatted as `daxfs trace` sends it.
    group.throughput(Throughput::Bytes(BIG));
    let events = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = std::sync::Arc::clone(&events);
    let sink: daxfs::dax::TraceSink = std::sync::Arc::new(move |e: &daxfs::dax::FaultEvent| {
        std::hint::black_box(e.to_string());
        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    for (name, skip, traced) in [
        ("pmd", 0, false),
        ("pte", 4096, false),
        ("pmd_traced", 0, true),
        ("pte_traced", 4096, true),
    ] {
        fs.trace_faults(traced.then(|| sink.clone()));
        group.bench_function(BenchmarkId::new("map_touch_1g", name), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut sum = 0u64;
                    for chunk in (0..BIG).step_by(2 * MIB as usize) {
                        let len = 2 * MIB - skip;
                        // SAFETY: loads only.
                        let map = unsafe { fs.mmap(ino, chunk + skip, len, MapOptions::default()) }
                            .unwrap();
                        for at in (0..len as usize).step_by(4096) {
                            sum += map[at] as u64;
                        }
                    }
                    std::hint::black_box(sum);
                }
                start.elapsed()
            })
        });
    }
    fs.trace_faults(None);
    assert!(
        events.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no event traced"
    );
    // Bandwidth over a populated 1 GiB mapping, in 64 MiB copies.
    let chunk = (64 * MIB) as usize;
    let opts = MapOptions {
        populate: true,
        ..MapOptions::default()
    };
    // SAFETY: only this benchmark touches the file.
    let map = unsafe { fs.mmap(ino, 0, BIG, opts) }.unwrap();
    let anon = anonymous(BIG as usize);
    let buf = anonymous(chunk);
    group.throughput(Throughput::Bytes(BIG));
    let load = |src: *const u8| {
        for off in (0..BIG as usize).step_by(chunk) {
            // SAFETY: both ranges are mapped, disjoint, `chunk` long.
            unsafe { std::ptr::copy_nonoverlapping(src.add(off), buf, chunk) };
        }
    };
    group.bench_function(BenchmarkId::new("load_1g", "mapping"), |b| {
        b.iter(|| load(map.as_ptr()))
    });
    group.bench_function(BenchmarkId::new("load_1g", "anonymous"), |b| {
        b.iter(|| load(anon))
    });
    let writer = Writer::detect();
    group.bench_function(BenchmarkId::new("store_persist_1g", "mapping"), |b| {
        b.iter(|| {
            for off in (0..BIG as usize).step_by(chunk) {
                // SAFETY: the mapping is writable and `chunk` long at `off`.
                unsafe { writer.copy_flushed(map.as_ptr().add(off), buf, chunk) };
            }
            fs.device().drain();
        })
    });
    // PMDK's copy into the same mapping: pmem_memcpy_persist assumes pmem
    // (non-temporal stores or flushes, then a fence), as a MAP_SYNC
    // application uses it.
    #[cfg(feature = "pmdk")]
    group.bench_function(BenchmarkId::new("store_persist_1g", "pmdk"), |b| {
        b.iter(|| {
            for off in (0..BIG as usize).step_by(chunk) {
                // SAFETY: the mapping is writable and `chunk` long at `off`;
                // `buf` is a separate mapping of `chunk` bytes.
                unsafe {
                    pmdk::pmem_memcpy_persist(map.as_ptr().add(off).cast(), buf.cast(), chunk)
                };
            }
        })
    });
    let extents = fs.file_extents(ino).unwrap();
    group.bench_function(BenchmarkId::new("store_persist_1g", "device"), |b| {
        // SAFETY: `buf` is `chunk` long and initialised (zero pages).
        let src = unsafe { std::slice::from_raw_parts(buf, chunk) };
        b.iter(|| {
            for e in &extents {
                for off in (0..e.len).step_by(chunk) {
                    let n = (e.len - off).min(chunk as u64) as usize;
                    fs.device()
                        .memcpy_persist(e.device_offset + off, &src[..n])
                        .unwrap();
                }
            }
        })
    });
    group.finish();
    drop(map);
    fs.unmount().unwrap();
}

criterion_group!(dax, benches);
criterion_main!(dax);
