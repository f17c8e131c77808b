//! `cargo xtask bench`'s end-to-end part: the same fio jobs and metadata
//! test on a daxfs FUSE mount, on tmpfs, and on fuse2fs over an ext4 image,
//! all in one run, all on /dev/shm. Writes a table (printed, and to
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
    name: &'static str,
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

/// (label, unit, higher is better) of each figure, in table order.
const FIGURES: [(&str, &str); 8] = [
    ("sequential write, 1 MiB", "MiB/s"),
    ("sequential read, 1 MiB", "MiB/s"),
    ("random write, 4 KiB", "kIOPS"),
    ("random read, 4 KiB", "kIOPS"),
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
    let img = work.join("daxfs.img");
    let mnt = work.join("daxfs");
    sh(
        Command::new(daxfs)
            .args(["create"])
            .arg(&img)
            .args(["--size", "3G"]),
        "daxfs create",
    )?;
    sh(
        Command::new(daxfs).arg("mkfs").arg(&img).arg("--force"),
        "daxfs mkfs",
    )?;
    sh(
        Command::new(daxfs)
            .arg("mount")
            .arg(&img)
            .arg(&mnt)
            .args(["-o", "threads=2"]),
        "daxfs mount",
    )?;
    targets.push(Target {
        name: "daxfs",
        dir: mnt.clone(),
        mounted: Some(mnt),
    });
    // tmpfs: /dev/shm itself.
    let tmp = work.join("tmpfs");
    std::fs::create_dir(&tmp).map_err(|e| e.to_string())?;
    targets.push(Target {
        name: "tmpfs",
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
            name: "fuse2fs",
            dir: mnt.clone(),
            mounted: Some(mnt),
        });
    }
    let mut results: Vec<(&str, Vec<f64>)> = Vec::new();
    for t in &targets {
        eprintln!("xtask: fio and metadata on {}", t.name);
        results.push((t.name, measure(&t.dir)?));
    }
    drop(targets);
    let _ = std::fs::remove_dir_all(&work);

    let mut table = String::from("| figure | ");
    table += &results.iter().map(|r| r.0).collect::<Vec<_>>().join(" | ");
    table += " | daxfs / tmpfs |";
    if fuse2fs {
        table += " daxfs / fuse2fs |";
    }
    table += "\n|---|";
    table += &"---:|".repeat(results.len() + if fuse2fs { 2 } else { 1 });
    table += "\n";
    for (i, (label, unit)) in FIGURES.iter().enumerate() {
        table += &format!("| {label} ({unit}) |");
        for r in &results {
            table += &format!(" {:.1} |", r.1[i]);
        }
        table += &format!(" {:.2} |", results[0].1[i] / results[1].1[i]);
        if fuse2fs {
            table += &format!(" {:.2} |", results[0].1[i] / results[2].1[i]);
        }
        table += "\n";
    }
    println!(
        "\nfilesystems through the kernel, same run, all on /dev/shm (higher is better)\n{table}"
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

/// A grouped bar chart, each figure's bars scaled to the largest of them.
fn chart(results: &[(&str, Vec<f64>)]) -> String {
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c"];
    let (w, row) = (900.0, 70.0);
    let h = 60.0 + row * FIGURES.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"15\">daxfs, tmpfs and fuse2fs (bar length relative to the best)</text>\n"
    );
    for (i, (name, _)) in results.iter().enumerate() {
        svg += &format!(
            "<rect x=\"{}\" y=\"30\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"41\">{name}</text>\n",
            500 + i * 120,
            colours[i % 3],
            516 + i * 120
        );
    }
    for (f, (label, unit)) in FIGURES.iter().enumerate() {
        let y = 60.0 + row * f as f64;
        svg += &format!(
            "<text x=\"10\" y=\"{}\">{label} ({unit})</text>\n",
            y + 25.0
        );
        let best = results.iter().map(|r| r.1[f]).fold(0.0, f64::max).max(1e-9);
        for (i, (_, values)) in results.iter().enumerate() {
            let len = 500.0 * values[f] / best;
            let by = y + 5.0 + i as f64 * 18.0;
            svg += &format!(
                "<rect x=\"230\" y=\"{by}\" width=\"{len:.1}\" height=\"15\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{}\">{:.1}</text>\n",
                colours[i % 3],
                235.0 + len,
                by + 12.0,
                values[f]
            );
        }
    }
    svg + "</svg>\n"
}
