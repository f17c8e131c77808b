//! `cargo xtask fsck-bench`: the time a full read-only check takes, daxfs
//! against e2fsck, on images holding the same tree (100 directories of
//! 1,000 files of 1 KiB), both 16 GiB, both on /dev/shm, in one run:
//! `daxfs mkfs --from TREE` and `mkfs.ext4 -d TREE` make them, then
//! `daxfs fsck IMAGE` and `e2fsck -fn IMAGE` run five times each, taking
//! turns; the medians and their ratio are printed. Needs e2fsprogs.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const ROUNDS: usize = 5;

pub fn fsck_bench(root: &Path) -> Result<(), String> {
    super::run(
        {
            let mut cmd = super::cargo();
            cmd.args(["build", "--release", "--bin", "daxfs"]);
            cmd
        },
        "release build of daxfs",
    )?;
    let daxfs = root.join("target/release/daxfs");
    let dir = Path::new("/dev/shm").join(format!("daxfs-fsck-bench-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone());
    let tree = dir.join("tree");
    eprintln!("xtask: making 100,000 files in {}", tree.display());
    for d in 0..100 {
        let sub = tree.join(format!("dir{d:03}"));
        std::fs::create_dir_all(&sub).map_err(|e| format!("{}: {e}", sub.display()))?;
        for f in 0..1000 {
            let file = sub.join(format!("file{f:04}"));
            std::fs::write(&file, [0x5au8; 1024])
                .map_err(|e| format!("{}: {e}", file.display()))?;
        }
    }
    let ours = dir.join("daxfs.img");
    let ext4 = dir.join("ext4.img");
    sh(
        Command::new(&daxfs)
            .args(["mkfs", "--size", "16G", "--from"])
            .arg(&tree)
            .arg(&ours),
        "daxfs mkfs --from",
    )?;
    sh(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-d"])
            .arg(&tree)
            .arg(&ext4)
            .arg("16G"),
        "mkfs.ext4 -d (apt-get install e2fsprogs)",
    )?;
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=ROUNDS {
        eprintln!("xtask: round {round} of {ROUNDS}");
        times[0].push(timed(
            Command::new(&daxfs).arg("fsck").arg(&ours),
            "daxfs fsck",
        )?);
        times[1].push(timed(
            Command::new("e2fsck").arg("-fn").arg(&ext4),
            "e2fsck -fn",
        )?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ours_s, theirs_s) = (median(&mut times[0]), median(&mut times[1]));
    println!("\nfull read-only check of a 16 GiB image with 100,000 files (median of {ROUNDS})");
    println!("{:<24} {:>10}", "daxfs fsck", format!("{:.3} s", ours_s));
    println!(
        "{:<24} {:>10}",
        "e2fsck -fn (ext4)",
        format!("{:.3} s", theirs_s)
    );
    println!(
        "{:<24} {:>10}",
        "daxfs / e2fsck",
        format!("{:.2}", ours_s / theirs_s)
    );
    Ok(())
}

/// Run to completion; its wall time in seconds. Exit status 0 is
/// required (a clean check).
fn timed(cmd: &mut Command, what: &str) -> Result<f64, String> {
    let start = Instant::now();
    sh(cmd, what)?;
    Ok(start.elapsed().as_secs_f64())
}

fn sh(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Removes the bench's directory, also when a step fails.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
