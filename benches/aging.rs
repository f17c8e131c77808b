//! Aging, in the manner of WineFS: fill the filesystem to 75% with a seeded
//! mix of creates, appends and deletes (sizes from 4 KiB to 64 MiB), then
//! create and map new 2 MiB-aligned files and count how many of their
//! 2 MiB ranges get PMD entries (target: at least 90%). Prints the aligned
//! 2 MiB free-space fraction before and after aging too.
//!
//! ```text
//! cargo bench --bench aging [-- --seed N]
//! ```
//!
//! Not a timing benchmark: it measures layout, so one run says it all.

use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, MapOptions, ROOT};

const MIB: u64 = 1 << 20;
const DEVICE: u64 = 1 << 30;

/// xorshift64*: enough for a seeded workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A size from 4 KiB to 64 MiB, uniform in its logarithm, in 4 KiB
    /// units with a random tail.
    fn size(&mut self) -> u64 {
        let log = 12 + self.below(15); // 2^12 ..= 2^26
        let base = 1u64 << log;
        (base + self.below(base)).min(64 * MIB)
    }
}

/// Fraction of free space that lies in whole, aligned, free 2 MiB regions.
fn huge_fraction(fs: &Fs) -> f64 {
    let s = fs.statfs();
    (s.free_huge_regions * 512) as f64 / s.free_blocks.max(1) as f64
}

fn used_fraction(fs: &Fs) -> f64 {
    let s = fs.statfs();
    1.0 - s.free_blocks as f64 / s.blocks as f64
}

fn main() {
    let seed = std::env::args()
        .skip_while(|a| a != "--seed")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_da7a_u64);
    let dir = tempfile::Builder::new()
        .prefix("daxfs-aging")
        .tempdir_in("/dev/shm")
        .expect("a directory in /dev/shm");
    let dev = Device::create(dir.path().join("aging.img"), DEVICE, &DeviceOptions::new())
        .expect("create the device");
    let fs = Fs::format(dev).expect("format");
    let before = huge_fraction(&fs);

    let mut rng = Rng(seed | 1);
    let buf = vec![0xA5u8; (4 * MIB) as usize];
    let write = |fs: &Fs, ino: u64, mut at: u64, len: u64| -> bool {
        let end = at + len;
        while at < end {
            let n = (end - at).min(buf.len() as u64);
            if fs.write(ino, at, &buf[..n as usize]).is_err() {
                return false;
            }
            at += n;
        }
        true
    };
    let mut files: Vec<(Vec<u8>, u64, u64)> = Vec::new(); // name, ino, size
    let (mut creates, mut appends, mut deletes, mut serial) = (0, 0, 0, 0);
    while used_fraction(&fs) < 0.75 {
        match rng.below(10) {
            // Delete a random file (a third of the time, once there are some).
            0..=2 if files.len() > 4 => {
                let (name, _, _) = files.swap_remove(rng.below(files.len() as u64) as usize);
                fs.unlink(ROOT, &name).expect("unlink");
                deletes += 1;
            }
            // Append to a random file.
            3..=5 if !files.is_empty() => {
                let k = rng.below(files.len() as u64) as usize;
                let len = rng.size() / 4;
                let (_, ino, size) = files[k];
                if write(&fs, ino, size, len.max(4096)) {
                    files[k].2 += len.max(4096);
                }
                appends += 1;
            }
            // Create a file.
            _ => {
                serial += 1;
                let name = format!("f{serial}").into_bytes();
                let ino = fs
                    .create(ROOT, &name, 0o644, 0, 0, true)
                    .expect("create")
                    .0
                    .ino;
                let len = rng.size();
                let ok = write(&fs, ino, 0, len);
                files.push((name, ino, if ok { len } else { 0 }));
                creates += 1;
            }
        }
    }
    let aged = huge_fraction(&fs);
    let used = used_fraction(&fs);

    // New 2 MiB-aligned files, 4 MiB each, up to 10% of the device.
    let before_stats = fs.dax_stats();
    let mut ranges = 0u64;
    for i in 0..(DEVICE / 10 / (4 * MIB)) {
        let name = format!("new{i}").into_bytes();
        let ino = fs
            .create(ROOT, &name, 0o644, 0, 0, true)
            .expect("create")
            .0
            .ino;
        if !write(&fs, ino, 0, 4 * MIB) {
            break;
        }
        // SAFETY: loads only, of a file nothing else touches.
        let map = unsafe { fs.mmap(ino, 0, 4 * MIB, MapOptions::default()) }.expect("mmap");
        let mut sum = 0u64;
        for at in (0..4 * MIB as usize).step_by(2 * MIB as usize) {
            sum += map[at] as u64;
        }
        std::hint::black_box(sum);
        ranges += 2;
    }
    let after_stats = fs.dax_stats();
    let pmd = after_stats.pmd_faults - before_stats.pmd_faults;
    let pmd_fraction = pmd as f64 / ranges.max(1) as f64;

    println!("aging (seed {seed:#x}): {creates} creates, {appends} appends, {deletes} deletes, {:.1}% used", used * 100.0);
    println!(
        "aligned 2 MiB free-space fraction: {:.3} before aging, {:.3} after",
        before, aged
    );
    println!(
        "new 2 MiB-aligned files: {pmd} of {ranges} 2 MiB ranges got PMD entries: {:.3} (target >= 0.90)",
        pmd_fraction
    );
    fs.unmount().expect("unmount");
}
