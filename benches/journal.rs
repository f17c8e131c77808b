//! The journal: how long a mount takes after a crash (a killed process left
//! the ring with every transaction since its last checkpoint) against a
//! mount after a clean unmount (an empty ring), on the same 256 MiB image.
//!
//! The crash is made once, after 32,800 metadata changes (which, under a checkpoint-when-full policy, leave a 256 MiB image's 4 MiB ring nearly full), and measured
//! again and again: each iteration puts the journal's header block back as
//! the crash left it (replay rewrites only what the ring holds, so the
//! image is the crashed one again) and mounts. Commit latency of small
//! changes is `cargo bench --bench fs_ops` (create_close, unlink,
//! append_4k).
//!
//! ```text
//! cargo bench --bench journal
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use daxfs::journal::scan;
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, ROOT};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// The journal's header block of the image at `path`: its offset and bytes.
fn header_block(path: &std::path::Path) -> (u64, Vec<u8>, usize) {
    let dev = Device::open(path, &DeviceOptions::new()).unwrap();
    let sb = daxfs::format::Superblock::read(&dev, 0).unwrap();
    let at = sb.journal_start * daxfs::format::BLOCK;
    let mut block = vec![0u8; 4096];
    dev.read(at, &mut block).unwrap();
    let pending = scan(&dev, sb.journal_start, sb.journal_blocks, sb.uuid)
        .unwrap()
        .pending
        .len();
    (at, block, pending)
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-bench")
        .tempdir_in("/dev/shm")
        .unwrap();
    let path = dir.path().join("j.img");
    let fs = Fs::format(Device::create(&path, 256 * MIB, &DeviceOptions::new()).unwrap()).unwrap();
    for i in 0..32_800u32 {
        let name = format!("f{}", i % 3000);
        if i % 3000 < 1500 || fs.unlink(ROOT, name.as_bytes()).is_err() {
            let _ = fs.create(ROOT, name.as_bytes(), 0o644, 0, 0, false);
        }
    }
    drop(fs); // a crash: nothing checkpointed since the last time the journal chose to
    let (at, crashed, pending) = header_block(&path);
    eprintln!("journal: {pending} transactions to replay after the crash");

    let mut group = c.benchmark_group("journal");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(20);
    group.bench_function(BenchmarkId::new("mount", "after_crash"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dev = Device::open(&path, &DeviceOptions::new()).unwrap();
                dev.memcpy_persist(at, &crashed).unwrap();
                let start = Instant::now();
                let fs = Fs::mount(dev).unwrap();
                total += start.elapsed();
                drop(fs);
            }
            total
        })
    });
    // A clean unmount: the ring is empty.
    let fs = Fs::mount(Device::open(&path, &DeviceOptions::new()).unwrap()).unwrap();
    fs.unmount().unwrap();
    drop(fs);
    group.bench_function(BenchmarkId::new("mount", "clean"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dev = Device::open(&path, &DeviceOptions::new()).unwrap();
                let start = Instant::now();
                let fs = Fs::mount(dev).unwrap();
                total += start.elapsed();
                fs.unmount().unwrap();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(journal, benches);
criterion_main!(journal);
