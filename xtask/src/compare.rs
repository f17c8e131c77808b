//! `cargo xtask bench`'s end-to-end part: the same fio jobs, small-file
//! and metadata tests on a daxfs FUSE mount, on tmpfs, and on fuse2fs over
//! an ext4 image, all in one run, all on /dev/shm; and on daxfs mounts of
//! an image where `daxfs mount` puts its default image and of one in the
//! build directory (a disk, as the current directory usually is), to show
//! what the place of the image costs. Writes a table (printed, and to
//! `target/bench/compare.md`) and a bar chart (`target/bench/compare.svg`,
//! and `.png` when `rsvg-convert` is installed).
//!
//! Every mount is made in a temporary directory and unmounted by a guard,
//! also when a step fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// One filesystem under test.
struct Target {
    name: String,
    dir: PathBuf,
    /// Unmount command, if it is a mount.
    mounted: Option<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mnt) = &self.mounted {
            let ok = Command::new("umount")
                .arg(mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(mnt).status();
            }
        }
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn sh(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (label, unit) of each figure, in table order; higher is better.
const FIGURES: [(&str, &str); 9] = [
    ("sequential write, 1 MiB", "MiB/s"),
    ("sequential read, 1 MiB", "MiB/s"),
    ("random write, 4 KiB", "kIOPS"),
    ("random read, 4 KiB", "kIOPS"),
    ("small files (2,000 × create, 4 KiB write, close)", "k/s"),
    ("create (10,000 files)", "k/s"),
    ("stat (10,000 files)", "k/s"),
    ("statx with birth time (10,000 files)", "k/s"),
    ("unlink (10,000 files)", "k/s"),
];

pub fn compare(root: &Path, daxfs: &Path) -> Result<(), String> {
    if !have("fio") {
        eprintln!(
            "xtask: fio is missing: apt-get install fio (skipping the filesystem comparison)"
        );
        return Ok(());
    }
    let fuse2fs = have("fuse2fs") && have("mkfs.ext4");
    if !fuse2fs {
        eprintln!(
            "xtask: fuse2fs is missing: apt-get install fuse2fs e2fsprogs (comparing without it)"
        );
    }
    let work = tempdir()?;
    let mut targets = Vec::new();
    // daxfs, over an image on /dev/shm.
    targets.push(mount_daxfs(daxfs, "daxfs", &work, &work.join("daxfs"))?);
    // tmpfs: /dev/shm itself.
    let tmp = work.join("tmpfs");
    std::fs::create_dir(&tmp).map_err(|e| e.to_string())?;
    targets.push(Target {
        name: "tmpfs".into(),
        dir: tmp,
        mounted: None,
    });
    if fuse2fs {
        let img = work.join("ext4.img");
        let mnt = work.join("fuse2fs");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        sh(
            Command::new("truncate").args(["-s", "3G"]).arg(&img),
            "truncate",
        )?;
        sh(
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img),
            "mkfs.ext4",
        )?;
        sh(
            Command::new("fuse2fs")
                .arg(&img)
                .arg(&mnt)
                .args(["-o", "rw"]),
            "fuse2fs",
        )?;
        targets.push(Target {
            name: "fuse2fs".into(),
            dir: mnt.clone(),
            mounted: Some(mnt),
        });
    }
    // daxfs where `daxfs mount` puts its image when given none (a
    // directory of its own on the same filesystem, not the user's image),
    // and daxfs over an image in the build directory.
    let default = daxfs_client::images::default_image()?;
    let default_dir = match default.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let places = [
        ("default place", default_dir),
        ("build directory", root.join("target")),
    ];
    let mut scratch = Vec::new();
    for (what, dir) in places {
        let at = dir.join(format!("daxfs-compare-{}", std::process::id()));
        std::fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        scratch.push(Scratch(at.clone()));
        let name = format!("daxfs, {what} ({})", fs_type(&at));
        targets.push(mount_daxfs(
            daxfs,
            &name,
            &at,
            &work.join(what.replace(' ', "-")),
        )?);
    }
    let mut results: Vec<(String, Vec<f64>)> = Vec::new();
    for t in &targets {
        eprintln!("xtask: fio, small files and metadata on {}", t.name);
        results.push((t.name.clone(), measure(&t.dir)?));
    }
    drop(targets);
    drop(scratch);
    let _ = std::fs::remove_dir_all(&work);

    let column = |prefix: &str| results.iter().position(|r| r.0.starts_with(prefix));
    let mut ratios = vec![("daxfs / tmpfs", 0, 1)];
    if let Some(f) = column("fuse2fs") {
        ratios.push(("daxfs / fuse2fs", 0, f));
    }
    if let Some(d) = column("daxfs, default") {
        ratios.push(("default place / daxfs on /dev/shm", d, 0));
    }
    if let Some(b) = column("daxfs, build") {
        ratios.push(("build directory / daxfs on /dev/shm", b, 0));
    }
    let mut table = String::from("| figure | ");
    table += &results
        .iter()
        .map(|r| r.0.as_str())
        .chain(ratios.iter().map(|r| r.0))
        .collect::<Vec<_>>()
        .join(" | ");
    table += " |\n|---|";
    table += &"---:|".repeat(results.len() + ratios.len());
    table += "\n";
    for (i, (label, unit)) in FIGURES.iter().enumerate() {
        table += &format!("| {label} ({unit}) |");
        for r in &results {
            table += &format!(" {:.1} |", r.1[i]);
        }
        for (_, a, b) in &ratios {
            table += &format!(" {:.2} |", results[*a].1[i] / results[*b].1[i]);
        }
        table += "\n";
    }
    println!(
        "\nfilesystems through the kernel, same run (higher is better); daxfs, tmpfs and \
         fuse2fs on /dev/shm\n{table}"
    );
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("compare.md"), &table).map_err(|e| e.to_string())?;
    let svg = chart(&results);
    std::fs::write(out.join("compare.svg"), &svg).map_err(|e| e.to_string())?;
    if have("rsvg-convert") {
        let _ = Command::new("rsvg-convert")
            .arg(out.join("compare.svg"))
            .arg("-o")
            .arg(out.join("compare.png"))
            .status();
        eprintln!("xtask: chart in {}", out.join("compare.png").display());
    } else {
        eprintln!(
            "xtask: chart in {} (apt-get install librsvg2-bin for a PNG)",
            out.join("compare.svg").display()
        );
    }
    Ok(())
}

/// A daxfs mount at `mnt` of a new 3 GiB image made in `dir`.
fn mount_daxfs(daxfs: &Path, name: &str, dir: &Path, mnt: &Path) -> Result<Target, String> {
    let img = dir.join("daxfs.img");
    sh(
        Command::new(daxfs)
            .args(["mkfs"])
            .arg(&img)
            .args(["--size", "3G"]),
        "daxfs mkfs",
    )?;
    sh(
        Command::new(daxfs)
            .arg("mount")
            .arg(&img)
            .arg(mnt)
            .args(["-o", "threads=2"]),
        "daxfs mount",
    )?;
    Ok(Target {
        name: name.to_string(),
        dir: mnt.to_path_buf(),
        mounted: Some(mnt.to_path_buf()),
    })
}

/// A directory of this run's, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The type of the filesystem `dir` is on, as `stat -f` names it.
fn fs_type(dir: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|t| !t.is_empty())
        // (ext4 shares ext2's magic number, so stat names it so.)
        .map(|t| t.replace("ext2/ext3", "ext2/3/4"))
        .unwrap_or_else(|| "?".into())
}

fn tempdir() -> Result<PathBuf, String> {
    let dir = PathBuf::from(format!("/dev/shm/daxfs-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// The figures of `FIGURES`, measured in `dir`.
fn measure(dir: &Path) -> Result<Vec<f64>, String> {
    let fio = |rw: &str, bs: &str, extra: &[&str]| -> Result<f64, String> {
        let mut cmd = Command::new("fio");
        cmd.args([
            "--name=job",
            "--filename=fio.data",
            "--size=1G",
            "--ioengine=psync",
            "--output-format=json",
        ])
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .args(extra)
        .current_dir(dir);
        let json: serde_json::Value = serde_json::from_str(&sh(&mut cmd, "fio")?)
            .map_err(|e| format!("fio's output: {e}"))?;
        let side = if rw.contains("write") {
            "write"
        } else {
            "read"
        };
        let job = &json["jobs"][0][side];
        Ok(if bs == "1M" {
            job["bw"].as_f64().unwrap_or(0.0) / 1024.0 // KiB/s to MiB/s
        } else {
            job["iops"].as_f64().unwrap_or(0.0) / 1000.0
        })
    };
    let timed = ["--time_based", "--runtime=5"];
    let mut figures = vec![
        fio("write", "1M", &["--end_fsync=1"])?,
        fio("read", "1M", &[])?,
        fio("randwrite", "4k", &timed)?,
        fio("randread", "4k", &timed)?,
    ];
    let _ = std::fs::remove_file(dir.join("fio.data"));
    figures.push(small_files(&dir.join("small"))?);
    let meta = dir.join("meta");
    std::fs::create_dir(&meta).map_err(|e| e.to_string())?;
    let names: Vec<PathBuf> = (0..10_000).map(|i| meta.join(format!("f{i}"))).collect();
    let rate = |f: &dyn Fn(&Path) -> std::io::Result<()>| -> Result<f64, String> {
        let start = Instant::now();
        for n in &names {
            f(n).map_err(|e| format!("{}: {e}", n.display()))?;
        }
        Ok(names.len() as f64 / start.elapsed().as_secs_f64() / 1000.0)
    };
    figures.push(rate(&|n| std::fs::File::create(n).map(drop))?);
    // stat(2) as glibc, ls and find make it (fstatat: the basic fields),
    // then statx(2) asking for everything, as Rust's std::fs::metadata
    // does: through FUSE the birth time costs a FUSE_STATX round trip per
    // inode whose attributes came from a lookup.
    figures.push(rate(&|n| {
        let c = std::ffi::CString::new(n.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: an all-zero stat is a valid value; stat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a stat to fill.
        match unsafe { libc::stat(c.as_ptr(), &mut st) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    })?);
    figures.push(rate(&|n| std::fs::metadata(n).map(drop))?);
    figures.push(rate(&|n| std::fs::remove_file(n))?);
    Ok(figures)
}

/// Thousands of files a second made as a script makes them: 2,000 times
/// create, write 4 KiB, close (each write durable when it returns, as
/// daxfs promises).
fn small_files(dir: &Path) -> Result<f64, String> {
    use std::io::Write;
    std::fs::create_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let data = [7u8; 4096];
    let start = Instant::now();
    for i in 0..2000 {
        let name = dir.join(format!("f{i}"));
        std::fs::File::create(&name)
            .and_then(|mut f| f.write_all(&data))
            .map_err(|e| format!("{}: {e}", name.display()))?;
    }
    let rate = 2000.0 / start.elapsed().as_secs_f64() / 1000.0;
    std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(rate)
}

/// A grouped bar chart, each figure's bars scaled to the largest of them.
fn chart(results: &[(String, Vec<f64>)]) -> String {
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];
    let n = results.len() as f64;
    let (w, row) = (1000.0, 16.0 + 18.0 * n);
    let top = 36.0 + 16.0 * n;
    let h = top + row * FIGURES.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"15\">daxfs, tmpfs and fuse2fs (bar length relative to the best)</text>\n"
    );
    for (i, (name, _)) in results.iter().enumerate() {
        let y = 30.0 + 16.0 * i as f64;
        svg += &format!(
            "<rect x=\"10\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"28\" y=\"{}\">{name}</text>\n",
            colours[i % colours.len()],
            y + 11.0
        );
    }
    for (f, (label, unit)) in FIGURES.iter().enumerate() {
        let y = top + row * f as f64;
        svg += &format!(
            "<text x=\"10\" y=\"{}\">{label}</text><text x=\"10\" y=\"{}\">({unit})</text>\n",
            y + 18.0,
            y + 33.0
        );
        let best = results.iter().map(|r| r.1[f]).fold(0.0, f64::max).max(1e-9);
        for (i, (_, values)) in results.iter().enumerate() {
            let len = 500.0 * values[f] / best;
            let by = y + 5.0 + i as f64 * 18.0;
            svg += &format!(
                "<rect x=\"330\" y=\"{by}\" width=\"{len:.1}\" height=\"15\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{}\">{:.1}</text>\n",
                colours[i % colours.len()],
                335.0 + len,
                by + 12.0,
                values[f]
            );
        }
    }
    svg + "</svg>\n"
}
