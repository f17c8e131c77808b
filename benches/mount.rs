//! Mount and check a large filesystem: a 16 GiB image holding 100,000
//! files (100 directories of 1,000 files of 1 KiB), on /dev/shm. Every
//! mount validates the checksums of what it reads and cross-checks what the
//! inodes claim against the bitmap (`fs/src/fs/claims.rs`); this is what
//! that costs. `fsck` is the whole check, read-only (e2fsck's `-fn`; `cargo
//! xtask fsck-bench` times it against e2fsck on ext4 holding the same
//! tree).
//!
//! The bench uses only API the filesystem has had from the start, so it
//! runs unchanged on an older checkout for a before/after comparison.
//!
//! ```text
//! cargo bench --bench mount
//! ```

use criterion::{criterion_group, criterion_main, Criterion};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, ROOT};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

fn benches(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-bench-mount")
        .tempdir_in("/dev/shm")
        .unwrap();
    let path = dir.path().join("big.img");
    let built = Instant::now();
    {
        let fs =
            Fs::format(Device::create(&path, 16 * GIB, &DeviceOptions::new()).unwrap()).unwrap();
        let data = [0x5au8; 1024];
        for d in 0..100 {
            let dir = fs
                .mkdir(ROOT, format!("dir{d:03}").as_bytes(), 0o755, 0, 0)
                .unwrap();
            for f in 0..1000 {
                let (a, _) = fs
                    .create(dir.ino, format!("file{f:04}").as_bytes(), 0o644, 0, 0, true)
                    .unwrap();
                fs.write(a.ino, 0, &data).unwrap();
            }
        }
        fs.unmount().unwrap();
    }
    eprintln!(
        "mount bench: 16 GiB image with 100,000 files built in {:.1} s",
        built.elapsed().as_secs_f64()
    );
    let mut group = c.benchmark_group("mount");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("16GiB_100k_files", |b| {
        b.iter(|| {
            let fs = Fs::mount(Device::open(&path, &DeviceOptions::new()).unwrap()).unwrap();
            fs.unmount().unwrap();
        })
    });
    group.bench_function("fsck_16GiB_100k_files", |b| {
        b.iter(|| {
            let dev = Device::open(&path, &DeviceOptions::new()).unwrap();
            let (report, _) = daxfs::fsck(dev, false).unwrap();
            assert!(report.is_clean(), "{:?}", report.problems);
        })
    });
    group.finish();
}

criterion_group!(mount, benches);
criterion_main!(mount);
